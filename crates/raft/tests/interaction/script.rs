//! The script format: parsing, running, comparing and rewriting.
//!
//! A script is a sequence of blocks separated by blank lines:
//!
//! ```text
//! # comments and blank lines between blocks are kept as they are
//! command arg key=value key=(a,b)
//! ----
//! expected output, one or more lines, never blank
//! ```
//!
//! The expected output ends at the first blank line (or the end of the file). A command whose
//! output would be empty prints `ok`, so every block has at least one output line and the
//! format stays unambiguous without any quoting.

use std::fmt::Write as _;

/// One parsed command line.
#[derive(Debug, Clone)]
pub struct Cmd {
    pub name: String,
    /// Arguments without `=`, in order.
    pub pos: Vec<String>,
    /// `key=value` arguments, in order. A value `(a,b,c)` is kept with its parentheses; see
    /// [`Cmd::list`].
    pub kv: Vec<(String, String)>,
}

impl Cmd {
    fn parse(line: &str) -> Cmd {
        let mut toks = line.split_whitespace();
        let name = toks
            .next()
            .expect("a command line is not blank")
            .to_string();
        let (mut pos, mut kv) = (Vec::new(), Vec::new());
        for t in toks {
            match t.split_once('=') {
                Some((k, v)) => kv.push((k.to_string(), v.to_string())),
                None => pos.push(t.to_string()),
            }
        }
        Cmd { name, pos, kv }
    }

    /// Every positional argument as a node id.
    pub fn ids(&self) -> Result<Vec<u64>, String> {
        self.pos.iter().map(|s| parse_u64(s)).collect()
    }

    /// The `i`th positional argument as a number.
    pub fn num(&self, i: usize) -> Result<u64, String> {
        let s = self
            .pos
            .get(i)
            .ok_or_else(|| format!("`{}` needs argument {}", self.name, i + 1))?;
        parse_u64(s)
    }

    pub fn arg(&self, i: usize) -> Result<&str, String> {
        self.pos
            .get(i)
            .map(String::as_str)
            .ok_or_else(|| format!("`{}` needs argument {}", self.name, i + 1))
    }

    pub fn get(&self, key: &str) -> Option<&str> {
        self.kv
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    /// Refuses keys the command does not know, so a typo cannot silently change a test.
    pub fn only_keys(&self, known: &[&str]) -> Result<(), String> {
        match self.kv.iter().find(|(k, _)| !known.contains(&k.as_str())) {
            Some((k, _)) => Err(format!("`{}` has no option `{k}`", self.name)),
            None => Ok(()),
        }
    }

    pub fn expect_pos(&self, min: usize, max: usize) -> Result<(), String> {
        let n = self.pos.len();
        if n < min || n > max {
            return Err(format!(
                "`{}` takes {min}..={max} positional arguments, got {n}",
                self.name
            ));
        }
        Ok(())
    }

    pub fn u64_or(&self, key: &str, default: u64) -> Result<u64, String> {
        self.get(key).map_or(Ok(default), parse_u64)
    }

    pub fn bool_or(&self, key: &str, default: bool) -> Result<bool, String> {
        match self.get(key) {
            None => Ok(default),
            Some("true") => Ok(true),
            Some("false") => Ok(false),
            Some(v) => Err(format!("`{key}` must be true or false, got `{v}`")),
        }
    }

    /// A `key=(1,2,3)` list of numbers; `None` if the key is absent. `()` is the empty list.
    pub fn list(&self, key: &str) -> Result<Option<Vec<u64>>, String> {
        let Some(v) = self.get(key) else {
            return Ok(None);
        };
        let inner = v
            .strip_prefix('(')
            .and_then(|v| v.strip_suffix(')'))
            .ok_or_else(|| format!("`{key}` must be a list like (1,2), got `{v}`"))?;
        if inner.is_empty() {
            return Ok(Some(Vec::new()));
        }
        inner
            .split(',')
            .map(parse_u64)
            .collect::<Result<_, _>>()
            .map(Some)
    }
}

fn parse_u64(s: &str) -> Result<u64, String> {
    s.parse()
        .map_err(|_| format!("expected a number, got `{s}`"))
}

/// A block whose actual output differed from the expected one.
pub struct Mismatch {
    pub loc: String,
    pub command: String,
    pub expected: String,
    pub actual: String,
}

/// The result of running one script file.
pub struct Outcome {
    pub mismatches: Vec<Mismatch>,
    /// The file with every expected output replaced by the actual one.
    pub rewritten: String,
    /// A harness error or a panic: the file stopped at that command.
    pub aborted: Option<String>,
}

/// Runs the script `text` (from `file`), calling `exec` for each command. `exec` returns the
/// output, or an error for a malformed command (which aborts the file: the script is wrong,
/// not the code under test).
pub fn run(
    file: &str,
    text: &str,
    mut exec: impl FnMut(&Cmd) -> Result<String, String>,
) -> Outcome {
    let lines: Vec<&str> = text.lines().collect();
    let mut out = Outcome {
        mismatches: Vec::new(),
        rewritten: String::new(),
        aborted: None,
    };
    let mut i = 0;
    while i < lines.len() {
        let line = lines[i];
        if line.trim().is_empty() || line.trim_start().starts_with('#') {
            out.rewritten.push_str(line);
            out.rewritten.push('\n');
            i += 1;
            continue;
        }
        let loc = format!("{file}:{}", i + 1);
        if lines.get(i + 1).map(|l| l.trim()) != Some("----") {
            out.aborted = Some(format!("{loc}: expected `----` after `{line}`"));
            return out;
        }
        let start = i + 2;
        let mut end = start;
        while end < lines.len() && !lines[end].trim().is_empty() {
            end += 1;
        }
        let expected = lines[start..end].join("\n");
        let cmd = Cmd::parse(line);
        // A panic in the core is a failure of this script, not of the whole test run: report it
        // with the command that caused it and go on to the next file.
        let res = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| exec(&cmd)));
        let actual = match res {
            Ok(Ok(s)) if s.is_empty() => "ok".to_string(),
            Ok(Ok(s)) => s,
            Ok(Err(e)) => {
                out.aborted = Some(format!("{loc}: `{line}`: {e}"));
                return out;
            }
            Err(p) => {
                let msg = p
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_else(|| "(non-string panic)".into());
                out.aborted = Some(format!("{loc}: `{line}` panicked: {msg}"));
                return out;
            }
        };
        assert!(
            !actual.lines().any(|l| l.trim().is_empty()),
            "{loc}: output of `{line}` has a blank line, which the format cannot hold"
        );
        writeln!(out.rewritten, "{line}\n----\n{actual}").unwrap();
        if actual != expected {
            out.mismatches.push(Mismatch {
                loc,
                command: line.to_string(),
                expected,
                actual,
            });
        }
        i = end;
    }
    out
}

/// A line diff (longest common subsequence): `-` expected only, `+` actual only.
pub fn diff(expected: &str, actual: &str) -> String {
    let a: Vec<&str> = expected.lines().collect();
    let b: Vec<&str> = actual.lines().collect();
    // lcs[i][j] = length of the LCS of a[i..] and b[j..].
    let mut lcs = vec![vec![0usize; b.len() + 1]; a.len() + 1];
    for i in (0..a.len()).rev() {
        for j in (0..b.len()).rev() {
            lcs[i][j] = if a[i] == b[j] {
                lcs[i + 1][j + 1] + 1
            } else {
                lcs[i + 1][j].max(lcs[i][j + 1])
            };
        }
    }
    let (mut i, mut j, mut s) = (0, 0, String::new());
    while i < a.len() || j < b.len() {
        if i < a.len() && j < b.len() && a[i] == b[j] {
            writeln!(s, "  {}", a[i]).unwrap();
            i += 1;
            j += 1;
        } else if j < b.len() && (i == a.len() || lcs[i][j + 1] >= lcs[i + 1][j]) {
            writeln!(s, "+ {}", b[j]).unwrap();
            j += 1;
        } else {
            writeln!(s, "- {}", a[i]).unwrap();
            i += 1;
        }
    }
    s
}
