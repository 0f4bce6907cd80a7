//! The small replicated key-value state machine the simulator runs on top of Raft: put, get and
//! compare-and-set on u64 keys and values. Deterministic; snapshot and restore.

use crate::linearizability::{Key, Op, Output, Value};
use std::collections::BTreeMap;

/// A command as stored in a log entry: who asked (so the proposing node can answer its client)
/// and what to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Command {
    pub client: u64,
    pub seq: u64,
    pub op: Op,
}

const CMD_LEN: usize = 1 + 8 * 5 + 1;

impl Command {
    pub fn encode(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(CMD_LEN);
        let (kind, key, a, c, has_expected) = match self.op {
            Op::Put { key, value } => (1u8, key, value, 0, 0u8),
            Op::Get { key } => (2u8, key, 0, 0, 0u8),
            Op::Cas { key, expected, new } => (
                3u8,
                key,
                new,
                expected.unwrap_or(0),
                expected.is_some() as u8,
            ),
        };
        b.push(kind);
        for v in [self.client, self.seq, key, a, c] {
            b.extend_from_slice(&v.to_le_bytes());
        }
        b.push(has_expected);
        b
    }

    pub fn decode(b: &[u8]) -> Option<Command> {
        if b.len() != CMD_LEN {
            return None;
        }
        let u = |i: usize| u64::from_le_bytes(b[1 + 8 * i..9 + 8 * i].try_into().unwrap());
        let (client, seq, key, a, c) = (u(0), u(1), u(2), u(3), u(4));
        let op = match b[0] {
            1 => Op::Put { key, value: a },
            2 => Op::Get { key },
            3 => Op::Cas {
                key,
                expected: (b[CMD_LEN - 1] == 1).then_some(c),
                new: a,
            },
            _ => return None,
        };
        Some(Command { client, seq, op })
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Kv {
    pub data: BTreeMap<Key, Value>,
    /// Index of the last log entry applied. Invariant: entries are applied once each, in order.
    pub applied: u64,
    /// Highest sequence number applied per client, with its result. A command can reach the log
    /// twice (a forwarded proposal duplicated by the network, or retried); applying it again
    /// would break at-most-once semantics (Raft thesis §6.3), so a repeat returns the first
    /// result and changes nothing.
    pub sessions: BTreeMap<u64, (u64, Output)>,
}

impl Kv {
    pub fn apply(&mut self, index: u64, cmd: &Command) -> Output {
        assert!(
            index > self.applied,
            "entry {index} applied after {}",
            self.applied
        );
        self.applied = index;
        if let Some(&(seq, out)) = self.sessions.get(&cmd.client) {
            if cmd.seq <= seq {
                return out;
            }
        }
        let out = self.apply_op(&cmd.op);
        self.sessions.insert(cmd.client, (cmd.seq, out));
        out
    }

    fn apply_op(&mut self, op: &Op) -> Output {
        match *op {
            Op::Put { key, value } => {
                self.data.insert(key, value);
                Output::Put
            }
            Op::Get { key } => Output::Get(self.data.get(&key).copied()),
            Op::Cas { key, expected, new } => {
                if self.data.get(&key).copied() == expected {
                    self.data.insert(key, new);
                    Output::Cas(true)
                } else {
                    Output::Cas(false)
                }
            }
        }
    }

    /// Marks an entry without a command (leader's empty entry, membership change) as applied.
    pub fn skip(&mut self, index: u64) {
        assert!(
            index > self.applied,
            "entry {index} skipped after {}",
            self.applied
        );
        self.applied = index;
    }

    pub fn read(&self, key: Key) -> Option<Value> {
        self.data.get(&key).copied()
    }

    pub fn snapshot(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(8 + 16 * self.data.len());
        b.extend_from_slice(&self.applied.to_le_bytes());
        b.extend_from_slice(&(self.data.len() as u64).to_le_bytes());
        for (k, v) in &self.data {
            b.extend_from_slice(&k.to_le_bytes());
            b.extend_from_slice(&v.to_le_bytes());
        }
        for (c, (seq, out)) in &self.sessions {
            let (tag, v) = match *out {
                Output::Put => (0, 0),
                Output::Get(None) => (1, 0),
                Output::Get(Some(v)) => (2, v),
                Output::Cas(ok) => (3, ok as u64),
            };
            for x in [*c, *seq, tag, v] {
                b.extend_from_slice(&x.to_le_bytes());
            }
        }
        b
    }

    pub fn restore(b: &[u8]) -> Kv {
        if b.is_empty() {
            return Kv::default();
        }
        let u = |i: usize| u64::from_le_bytes(b[i..i + 8].try_into().unwrap());
        let mut kv = Kv {
            applied: u(0),
            ..Default::default()
        };
        let n = u(8) as usize;
        let mut i = 16;
        for _ in 0..n {
            kv.data.insert(u(i), u(i + 8));
            i += 16;
        }
        assert!(
            (b.len() - i).is_multiple_of(32),
            "snapshot of {} bytes is malformed",
            b.len()
        );
        while i < b.len() {
            let out = match u(i + 16) {
                0 => Output::Put,
                1 => Output::Get(None),
                2 => Output::Get(Some(u(i + 24))),
                _ => Output::Cas(u(i + 24) == 1),
            };
            kv.sessions.insert(u(i), (u(i + 8), out));
            i += 32;
        }
        kv
    }

    /// A digest of the state, to compare replicas.
    pub fn digest(&self) -> u64 {
        let mut h = crate::Fnv::default();
        for (k, v) in &self.data {
            h.write_u64(*k);
            h.write_u64(*v);
        }
        h.finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn command_round_trip() {
        for op in [
            Op::Put { key: 1, value: 9 },
            Op::Get { key: 3 },
            Op::Cas {
                key: 2,
                expected: None,
                new: 4,
            },
            Op::Cas {
                key: 2,
                expected: Some(0),
                new: 4,
            },
        ] {
            let c = Command {
                client: 5,
                seq: 6,
                op,
            };
            assert_eq!(Command::decode(&c.encode()), Some(c));
        }
        assert_eq!(Command::decode(b"short"), None);
    }

    #[test]
    fn apply_and_snapshot() {
        let mut kv = Kv::default();
        let c = |seq, op| Command { client: 1, seq, op };
        assert_eq!(
            kv.apply(1, &c(1, Op::Put { key: 1, value: 5 })),
            Output::Put
        );
        let cas = |e, n| Op::Cas {
            key: 1,
            expected: e,
            new: n,
        };
        assert_eq!(kv.apply(2, &c(2, cas(Some(4), 6))), Output::Cas(false));
        assert_eq!(kv.apply(3, &c(3, cas(Some(5), 6))), Output::Cas(true));
        assert_eq!(kv.apply(4, &c(4, Op::Get { key: 1 })), Output::Get(Some(6)));
        let r = Kv::restore(&kv.snapshot());
        assert_eq!(r, kv);
    }

    #[test]
    fn duplicate_command_applies_once() {
        let mut kv = Kv::default();
        let put = |seq, value| Command {
            client: 7,
            seq,
            op: Op::Put { key: 1, value },
        };
        kv.apply(1, &put(1, 10));
        kv.apply(2, &put(2, 20));
        // The first command arrives again (a duplicated forward): no effect.
        assert_eq!(kv.apply(3, &put(1, 10)), Output::Put);
        assert_eq!(kv.read(1), Some(20));
        assert_eq!(kv.applied, 3);
    }
}
