//! Linearizability checking of the client histories the simulator records.
//!
//! The store is a map of independent registers, and linearizability is compositional (Herlihy &
//! Wing 1990): a history is linearizable iff the sub-history of every key is. So each key is
//! checked on its own, which keeps the exponential part of the problem as small as it can be.
//!
//! Per key, the search is the Wing & Gong backtracking search with Lowe's memoisation (the scheme
//! porcupine uses): walk the invocation/return events in time order, try as the next to take
//! effect each operation invoked before the first return still pending, backtrack on reaching a
//! return whose operation has not taken effect, and never re-explore a (set of operations taken
//! effect, register value) node that already failed. Two additions keep unknown-outcome writes from
//! blowing it up, see `mark_unobserved_writes` and `Memo`.
//!
//! Semantics the simulator must know:
//! - Operation A precedes B in real time only if A completed at a tick strictly before the tick B
//!   was invoked at. Equal ticks count as concurrent: a coarse clock can hide a violation, but it
//!   can never invent one.
//! - Every key starts absent; there is no delete.
//! - An operation whose outcome is unknown (timeout, crashed node) stays [`Status::Pending`]. Such
//!   a write may take effect at any point after its invocation, or never; such a read constrains
//!   nothing and is ignored. An operation known never to have taken effect is
//!   [`History::fail_definitely`] and ignored too.
//! - Values need not be unique per write for correctness, but with unique values the search
//!   prunes far more and the explanations are unambiguous.
//!
//! Limits:
//! - The problem is NP-complete. The search is exponential in how many operations on one key are
//!   concurrent with each other; unknown-outcome writes count as concurrent with everything
//!   after their invocation unless nothing reads their value. [`Limits::max_steps_per_key`]
//!   bounds the work (the default is about a second), and a key that hits it yields
//!   [`CheckResult::Unknown`], never `Ok`. Memory is bounded by the same number: at most one
//!   memo entry, two small bitsets, per step.
//! - Linearizable histories are cheap: a few hundred operations per key from a handful of
//!   clients take well under a millisecond. Refuting a violation costs more, because every
//!   interleaving before it must be ruled out. Keys of a few hundred operations refute in
//!   milliseconds. Only with many concurrent clients, many unknown outcomes and CASes of
//!   arbitrary expected values on one key (or keys of thousands of operations) can the bound be
//!   hit.

use std::collections::hash_map::Entry;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt::{self, Write as _};
use std::hash::{BuildHasherDefault, Hasher};

pub type Key = u64;
pub type Value = u64;
pub type ClientId = u64;
/// Simulator time (a tick or step number). Only its order matters.
pub type Tick = u64;

/// An operation as a client issued it. Every operation touches exactly one key.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Op {
    Put {
        key: Key,
        value: Value,
    },
    Get {
        key: Key,
    },
    /// Writes `new` iff the key currently holds `expected`; `expected: None` means "key absent".
    Cas {
        key: Key,
        expected: Option<Value>,
        new: Value,
    },
}

impl Op {
    pub fn key(&self) -> Key {
        match *self {
            Op::Put { key, .. } | Op::Get { key } | Op::Cas { key, .. } => key,
        }
    }
}

/// The response a client received. Must be of the same kind as its [`Op`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Output {
    Put,
    Get(Option<Value>),
    /// Whether the swap happened.
    Cas(bool),
}

/// Index of an operation in its [`History`], stable for the history's lifetime.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct OpId(usize);

impl OpId {
    pub fn index(self) -> usize {
        self.0
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Status {
    /// Outcome unknown: not answered yet, or never will be (the client gave up). Checked as an
    /// operation that may or may not take effect, at any time after its invocation.
    Pending,
    Completed {
        at: Tick,
        output: Output,
    },
    /// Definitely never took effect (e.g. rejected before it was proposed); the checker ignores it.
    Failed,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Record {
    pub client: ClientId,
    pub op: Op,
    pub invoked_at: Tick,
    pub status: Status,
}

/// Bounds on the checker's work. The default keeps a pathological key to about a second.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Attempts to make one operation take effect, per key, before giving up with
    /// [`CheckResult::Unknown`]. A key with `n` operations needs at least `n`.
    pub max_steps_per_key: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_steps_per_key: 2_000_000,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
#[must_use]
pub enum CheckResult {
    Ok,
    /// The operations on `key` have no linearization; `explanation` is meant for a human.
    Violation {
        key: Key,
        explanation: String,
    },
    /// The search on `key` hit [`Limits::max_steps_per_key`] without finding a violation on any
    /// key; nothing is known about `key`.
    Unknown {
        key: Key,
    },
}

impl CheckResult {
    pub fn is_ok(&self) -> bool {
        matches!(self, CheckResult::Ok)
    }
}

impl fmt::Display for CheckResult {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CheckResult::Ok => write!(f, "linearizable"),
            // The explanation names the key.
            CheckResult::Violation { explanation, .. } => {
                write!(f, "NOT linearizable: {explanation}")
            }
            CheckResult::Unknown { key } => {
                write!(f, "unknown: search limit hit on key {key}")
            }
        }
    }
}

/// A recorder of client operations. The simulator calls [`History::invoke`] when a client sends
/// a request and [`History::complete`] when it gets the answer, then [`History::check`]s at the
/// end of the run.
#[derive(Clone, Debug, Default)]
pub struct History {
    records: Vec<Record>,
}

impl History {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn invoke(&mut self, client: ClientId, at: Tick, op: Op) -> OpId {
        self.records.push(Record {
            client,
            op,
            invoked_at: at,
            status: Status::Pending,
        });
        OpId(self.records.len() - 1)
    }

    /// Panics on a mismatched output kind, a second answer, or time running backwards: each is a
    /// simulator bug that would otherwise surface as a bogus verdict.
    pub fn complete(&mut self, id: OpId, at: Tick, output: Output) {
        let record = &mut self.records[id.0];
        assert_eq!(
            record.status,
            Status::Pending,
            "{id} answered after it was already resolved"
        );
        assert!(
            at >= record.invoked_at,
            "{id} completed at {at}, before its invocation at {}",
            record.invoked_at
        );
        let kinds_match = matches!(
            (record.op, output),
            (Op::Put { .. }, Output::Put)
                | (Op::Get { .. }, Output::Get(_))
                | (Op::Cas { .. }, Output::Cas(_))
        );
        assert!(kinds_match, "{id}: output {output:?} for {:?}", record.op);
        record.status = Status::Completed { at, output };
    }

    /// Records that the operation certainly never took effect and never will.
    pub fn fail_definitely(&mut self, id: OpId) {
        let record = &mut self.records[id.0];
        assert_eq!(
            record.status,
            Status::Pending,
            "{id} failed after it was already resolved"
        );
        record.status = Status::Failed;
    }

    pub fn get(&self, id: OpId) -> &Record {
        &self.records[id.0]
    }

    pub fn records(&self) -> &[Record] {
        &self.records
    }

    pub fn len(&self) -> usize {
        self.records.len()
    }

    pub fn is_empty(&self) -> bool {
        self.records.is_empty()
    }

    pub fn check(&self) -> CheckResult {
        self.check_with(Limits::default())
    }

    /// Keys are checked in ascending order. A violation on any key wins over a limit hit on
    /// another, because a definite answer is worth more than an unknown one.
    pub fn check_with(&self, limits: Limits) -> CheckResult {
        let mut per_key: BTreeMap<Key, Vec<KeyOp>> = BTreeMap::new();
        for (index, record) in self.records.iter().enumerate() {
            let effect = match (record.op, record.status) {
                (_, Status::Failed) | (Op::Get { .. }, Status::Pending) => continue,
                (Op::Put { value, .. }, _) => Effect::Write(value),
                (Op::Get { .. }, Status::Completed { output, .. }) => match output {
                    Output::Get(value) => Effect::Read(value),
                    _ => unreachable!("complete() checks output kinds"),
                },
                (
                    Op::Cas { expected, .. },
                    Status::Completed {
                        output: Output::Cas(false),
                        ..
                    },
                ) => Effect::CasFailed { expected },
                // An unknown-outcome CAS that failed would change nothing, so it only needs to
                // be tried as a success.
                (Op::Cas { expected, new, .. }, _) => Effect::CasOk { expected, new },
            };
            let returned_at = match record.status {
                Status::Completed { at, .. } => Some(at),
                _ => None,
            };
            per_key.entry(record.op.key()).or_default().push(KeyOp {
                id: OpId(index),
                invoked_at: record.invoked_at,
                returned_at,
                effect,
                unobserved: false,
            });
        }

        let mut unknown = None;
        for (key, ops) in per_key {
            match check_key(self, key, ops, limits.max_steps_per_key) {
                KeyVerdict::Linearizable => {}
                KeyVerdict::GaveUp => {
                    unknown.get_or_insert(key);
                }
                KeyVerdict::Violation(explanation) => {
                    return CheckResult::Violation { key, explanation };
                }
            }
        }
        match unknown {
            Some(key) => CheckResult::Unknown { key },
            None => CheckResult::Ok,
        }
    }
}

impl fmt::Display for History {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (index, record) in self.records.iter().enumerate() {
            writeln!(f, "{} {record}", OpId(index))?;
        }
        Ok(())
    }
}

impl fmt::Display for OpId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "op#{}", self.0)
    }
}

impl fmt::Display for Op {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Op::Put { key, value } => write!(f, "Put(key {key}, {value})"),
            Op::Get { key } => write!(f, "Get(key {key})"),
            Op::Cas { key, expected, new } => {
                write!(f, "Cas(key {key}, {} -> {new})", RegisterValue(expected))
            }
        }
    }
}

impl fmt::Display for Record {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "client {} [{}, ", self.client, self.invoked_at)?;
        match self.status {
            Status::Pending => write!(f, "?] {} -> unknown outcome", self.op),
            Status::Failed => write!(f, "-] {} -> definitely failed", self.op),
            Status::Completed { at, output } => {
                write!(f, "{at}] {} -> ", self.op)?;
                match output {
                    Output::Put => write!(f, "ok"),
                    Output::Get(value) => write!(f, "{}", RegisterValue(value)),
                    Output::Cas(swapped) => write!(f, "{swapped}"),
                }
            }
        }
    }
}

/// Renders a register's content the way people talk about it ("absent", not "None").
struct RegisterValue(Option<Value>);

impl fmt::Display for RegisterValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            None => write!(f, "absent"),
            Some(value) => write!(f, "{value}"),
        }
    }
}

/// What taking effect requires of the register and does to it. Status and output are folded in
/// here so the search's inner loop is a single match on a `Copy` value.
#[derive(Clone, Copy, Debug)]
enum Effect {
    /// A put, answered or not.
    Write(Value),
    /// An answered get.
    Read(Option<Value>),
    /// A CAS answered `true`, or one with unknown outcome.
    CasOk { expected: Option<Value>, new: Value },
    /// A CAS answered `false`.
    CasFailed { expected: Option<Value> },
}

impl Effect {
    /// The register after taking effect on `state`, or `None` if the response rules it out.
    fn apply(self, state: Option<Value>) -> Option<Option<Value>> {
        match self {
            Effect::Write(value) => Some(Some(value)),
            Effect::Read(seen) => (seen == state).then_some(state),
            Effect::CasOk { expected, new } => (expected == state).then_some(Some(new)),
            Effect::CasFailed { expected } => (expected != state).then_some(state),
        }
    }
}

#[derive(Clone, Copy, Debug)]
struct KeyOp {
    id: OpId,
    invoked_at: Tick,
    /// `None`: unknown outcome, i.e. returns at +infinity and need not take effect at all.
    returned_at: Option<Tick>,
    effect: Effect,
    /// An unknown-outcome write of a value no operation mentions; see `mark_unobserved_writes`.
    unobserved: bool,
}

enum KeyVerdict {
    Linearizable,
    Violation(String),
    GaveUp,
}

fn check_key(history: &History, key: Key, mut ops: Vec<KeyOp>, max_steps: u64) -> KeyVerdict {
    if let Some(explanation) = find_unwritten_observation(history, key, &ops) {
        return KeyVerdict::Violation(explanation);
    }
    mark_unobserved_writes(&mut ops);
    match search(&ops, max_steps) {
        SearchOutcome::Linearizable => KeyVerdict::Linearizable,
        SearchOutcome::GaveUp => KeyVerdict::GaveUp,
        SearchOutcome::NoLinearization { longest_prefix } => KeyVerdict::Violation(
            explain_no_linearization(history, key, &ops, &longest_prefix),
        ),
    }
}

/// A cheap pre-check for the commonest corruption, a read of a value nothing wrote. The search
/// would find it too, but only after exhausting every interleaving, which is exponential when
/// many writes are concurrent; here it costs one pass and gives a one-line explanation.
fn find_unwritten_observation(history: &History, key: Key, ops: &[KeyOp]) -> Option<String> {
    let written: HashSet<Value> = ops
        .iter()
        .filter_map(|op| match op.effect {
            Effect::Write(value) | Effect::CasOk { new: value, .. } => Some(value),
            Effect::Read(_) | Effect::CasFailed { .. } => None,
        })
        .collect();
    ops.iter().find_map(|op| {
        let seen = match op.effect {
            // An unknown-outcome CAS expecting a value never written just never took effect.
            Effect::CasOk {
                expected: Some(value),
                ..
            } if op.returned_at.is_some() => value,
            Effect::Read(Some(value)) => value,
            _ => return None,
        };
        (!written.contains(&seen)).then(|| {
            format!(
                "{} {} observed {seen}, which no operation on key {key} writes",
                op.id,
                history.get(op.id)
            )
        })
    })
}

/// Unknown-outcome writes are what makes refuting a violation expensive: each may take effect at
/// any later point or never, so each one left floating doubles the states to rule out. Those
/// whose value nothing observes (no read returns it, no successful or unknown CAS expects it;
/// typically a timed-out write that was overwritten or never applied) can be pinned down.
///
/// Say a linearization has such a write `w` take effect on value `s`. The next op cannot
/// observe `w`'s value, so it is a put or nothing (then deleting `w` leaves a linearization) or
/// a run of failed CASes that `w`'s value satisfies. Then move `w` to just before the first of
/// them that expects `s`, or delete it if none does: still a linearization, since an op that
/// never returns may always move later, and an unknown CAS's precondition (value `s`) still
/// holds there. So the search need only try such a write immediately before a failed CAS that
/// the current value contradicts; see `Helpers`.
fn mark_unobserved_writes(ops: &mut [KeyOp]) {
    let observed: HashSet<Value> = ops
        .iter()
        .filter_map(|op| match op.effect {
            Effect::Read(seen) => seen,
            Effect::CasOk { expected, .. } => expected,
            Effect::Write(_) | Effect::CasFailed { .. } => None,
        })
        .collect();
    for op in ops.iter_mut() {
        op.unobserved = op.returned_at.is_none()
            && match op.effect {
                Effect::Write(value) | Effect::CasOk { new: value, .. } => {
                    !observed.contains(&value)
                }
                Effect::Read(_) | Effect::CasFailed { .. } => false,
            };
    }
}

enum SearchOutcome {
    Linearizable,
    /// Indices into the key's ops, in the order they took effect, of a longest prefix of a
    /// would-be linearization. Every operation that could come next contradicts it.
    NoLinearization {
        longest_prefix: Vec<usize>,
    },
    GaveUp,
}

const NIL: usize = usize::MAX;
const HEAD: usize = 0;

/// Invocation and return events in time order, as a doubly linked list so that an operation's
/// two events can be unlinked when it takes effect and relinked in O(1) when that is undone
/// (undos are LIFO, which is what makes relinking from the stale neighbour links valid).
/// Unobserved unknown-outcome writes are left out: they only take effect alongside a failed CAS.
struct Events {
    next: Vec<usize>,
    prev: Vec<usize>,
    node: Vec<EventNode>,
    call_node: Vec<usize>,
    /// `NIL` for unknown-outcome ops: they never return, so no return forces them to take effect.
    return_node: Vec<usize>,
}

#[derive(Clone, Copy)]
struct EventNode {
    op: usize,
    is_call: bool,
    at: Tick,
}

impl Events {
    fn new(ops: &[KeyOp]) -> Self {
        let mut events: Vec<(Tick, bool, usize)> = Vec::with_capacity(ops.len() * 2);
        for (index, op) in ops.iter().enumerate().filter(|(_, op)| !op.unobserved) {
            events.push((op.invoked_at, false, index));
            if let Some(at) = op.returned_at {
                events.push((at, true, index));
            }
        }
        // Invocations sort before returns at the same tick: equal ticks are concurrent.
        events.sort_unstable();

        let len = events.len() + 1;
        let mut list = Events {
            next: (1..len).chain([NIL]).collect(),
            prev: (0..len).map(|node| node.wrapping_sub(1)).collect(),
            node: vec![
                EventNode {
                    op: NIL,
                    is_call: false,
                    at: 0,
                };
                len
            ],
            call_node: vec![NIL; ops.len()],
            return_node: vec![NIL; ops.len()],
        };
        for (position, &(at, is_return, op)) in events.iter().enumerate() {
            let node = position + 1;
            list.node[node] = EventNode {
                op,
                is_call: !is_return,
                at,
            };
            if is_return {
                list.return_node[op] = node;
            } else {
                list.call_node[op] = node;
            }
        }
        list
    }

    fn unlink(&mut self, node: usize) {
        let (prev, next) = (self.prev[node], self.next[node]);
        self.next[prev] = next;
        if next != NIL {
            self.prev[next] = prev;
        }
    }

    fn relink(&mut self, node: usize) {
        let (prev, next) = (self.prev[node], self.next[node]);
        self.next[prev] = node;
        if next != NIL {
            self.prev[next] = node;
        }
    }

    fn lift(&mut self, op: usize) {
        self.unlink(self.call_node[op]);
        if self.return_node[op] != NIL {
            self.unlink(self.return_node[op]);
        }
    }

    fn unlift(&mut self, op: usize) {
        if self.return_node[op] != NIL {
            self.relink(self.return_node[op]);
        }
        self.relink(self.call_node[op]);
    }

    /// The tick of the first return at or after `node`: the latest an op may have been invoked
    /// and still take effect now. Callers pass a node with only invocations before it.
    fn deadline_from(&self, mut node: usize) -> Tick {
        loop {
            let event = self.node[node];
            if !event.is_call {
                return event.at;
            }
            node = self.next[node];
            assert_ne!(
                node, NIL,
                "called for an op whose return is still ahead in the list"
            );
        }
    }
}

/// Unobserved unknown-outcome writes (see `mark_unobserved_writes`), which the search only
/// lets take effect right before a failed CAS that they explain ("helpers").
///
/// Helpers whose value no failed CAS expects either are interchangeable once their
/// precondition holds (puts have none, CASes need their expected value): they differ only in
/// invocation time, and the deadline for being usable only moves later as the search goes
/// deeper, so any one usable now stays usable and which is used never matters. The search tries
/// just one per precondition, the earliest-invoked unused: that way the helpers used from a
/// group are always its first few, and the memo can tell that fewer is better. The others (a
/// failed CAS happened to expect their value) each leave a value that behaves differently, so
/// each is its own alternative.
struct Helpers {
    anonymous_puts: Vec<(Tick, usize)>,
    anonymous_cases: BTreeMap<Option<Value>, Vec<(Tick, usize)>>,
    distinct: Vec<(Tick, usize)>,
    /// Op -> its index among the helpers, for the compact set of helpers used.
    ordinal: Vec<usize>,
    count: usize,
}

/// Alternative 0 is for an op to take effect alone. A failed CAS that the current value
/// contradicts may instead take effect right after an anonymous put helper, an anonymous CAS
/// helper, or each distinct helper in turn.
const ANONYMOUS_PUT: usize = 1;
const ANONYMOUS_CAS: usize = 2;
const FIRST_DISTINCT: usize = 3;

enum Alternative {
    Exhausted,
    Impossible,
    /// The helper that takes effect first, if any, and the register value left.
    Possible(Option<usize>, Option<Value>),
}

impl Helpers {
    fn new(ops: &[KeyOp]) -> Self {
        let expected_by_failed_cas: HashSet<Value> = ops
            .iter()
            .filter_map(|op| match op.effect {
                Effect::CasFailed { expected } => expected,
                _ => None,
            })
            .collect();
        let mut helpers = Helpers {
            anonymous_puts: Vec::new(),
            anonymous_cases: BTreeMap::new(),
            distinct: Vec::new(),
            ordinal: vec![NIL; ops.len()],
            count: 0,
        };
        for (index, op) in ops.iter().enumerate().filter(|(_, op)| op.unobserved) {
            helpers.ordinal[index] = helpers.count;
            helpers.count += 1;
            let entry = (op.invoked_at, index);
            match op.effect {
                Effect::Write(value) | Effect::CasOk { new: value, .. }
                    if expected_by_failed_cas.contains(&value) =>
                {
                    helpers.distinct.push(entry);
                }
                Effect::Write(_) => helpers.anonymous_puts.push(entry),
                Effect::CasOk { expected, .. } => helpers
                    .anonymous_cases
                    .entry(expected)
                    .or_default()
                    .push(entry),
                Effect::Read(_) | Effect::CasFailed { .. } => {
                    unreachable!("only writes are marked unobserved")
                }
            }
        }
        helpers.anonymous_puts.sort_unstable();
        helpers.distinct.sort_unstable();
        for group in helpers.anonymous_cases.values_mut() {
            group.sort_unstable();
        }
        helpers
    }

    fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// The helper behind alternative `which` (at least `ANONYMOUS_PUT`), if it exists, was
    /// invoked by `deadline` and has not taken effect yet.
    fn get(
        &self,
        which: usize,
        state: Option<Value>,
        deadline: Tick,
        used: &Bitset,
    ) -> Result<Option<usize>, ()> {
        let usable = |group: &[(Tick, usize)]| {
            group
                .iter()
                .find(|&&(_, op)| !used.contains(self.ordinal[op]))
                .filter(|&&(invoked_at, _)| invoked_at <= deadline)
                .map(|&(_, op)| op)
        };
        match which {
            ANONYMOUS_PUT => Ok(usable(&self.anonymous_puts)),
            ANONYMOUS_CAS => Ok(self.anonymous_cases.get(&state).and_then(|g| usable(g))),
            _ => match self.distinct.get(which - FIRST_DISTINCT) {
                Some(&(invoked_at, op)) if invoked_at <= deadline => {
                    Ok((!used.contains(self.ordinal[op])).then_some(op))
                }
                // Sorted by invocation: every later one is too late as well.
                _ => Err(()),
            },
        }
    }
}

struct Bitset {
    words: Vec<u64>,
}

impl Bitset {
    fn new(bits: usize) -> Self {
        Bitset {
            words: vec![0; bits.div_ceil(64)],
        }
    }

    fn set(&mut self, bit: usize) {
        self.words[bit / 64] |= 1 << (bit % 64);
    }

    fn clear(&mut self, bit: usize) {
        self.words[bit / 64] &= !(1 << (bit % 64));
    }

    fn contains(&self, bit: usize) -> bool {
        self.words[bit / 64] & (1 << (bit % 64)) != 0
    }
}

fn is_subset(small: &[u64], large: &[u64]) -> bool {
    small.iter().zip(large).all(|(s, l)| s & !l == 0)
}

type FastHashSet<K> = HashSet<K, BuildHasherDefault<WordHasher>>;
type FastHashMap<K, V> = HashMap<K, V, BuildHasherDefault<WordHasher>>;

/// Search nodes already explored, every one of which failed: the search stops at the first
/// success, and nodes on the stack cannot come round again because each frame adds an op to
/// `taken`.
///
/// A node is the set of ops taken effect, the register value and the set of helpers used. The
/// same ops and value mean the same future, except that having used fewer helpers leaves more
/// options; so a node is hopeless if one with the same ops and value and a subset of its
/// helpers failed. Without this subsumption, whether an early failed CAS took a helper would
/// split every later state in two.
enum Memo {
    /// No helpers on this key: exact matching is all there is, and is cheaper.
    Exact(FastHashSet<OpsAndValue>),
    /// The minimal helper sets that failed, per (ops, value).
    Subsuming(FastHashMap<OpsAndValue, Vec<Box<[u64]>>>),
}

/// The words of `taken`, and the register value.
type OpsAndValue = (Box<[u64]>, Option<Value>);

impl Memo {
    fn new(helpers: &Helpers) -> Self {
        if helpers.is_empty() {
            Memo::Exact(FastHashSet::default())
        } else {
            Memo::Subsuming(FastHashMap::default())
        }
    }

    /// Records the node and says whether it may succeed, i.e. whether to explore it.
    fn first_visit(&mut self, taken: &Bitset, state: Option<Value>, used: &Bitset) -> bool {
        let key = (taken.words.as_slice().into(), state);
        match self {
            Memo::Exact(seen) => seen.insert(key),
            Memo::Subsuming(failed) => match failed.entry(key) {
                Entry::Vacant(entry) => {
                    entry.insert(vec![used.words.as_slice().into()]);
                    true
                }
                Entry::Occupied(mut entry) => {
                    let sets = entry.get_mut();
                    if sets.iter().any(|old| is_subset(old, &used.words)) {
                        return false;
                    }
                    // Sets this one subsumes would never prune anything it does not.
                    sets.retain(|old| !is_subset(&used.words, old));
                    sets.push(used.words.as_slice().into());
                    true
                }
            },
        }
    }
}

/// One op that took effect, possibly preceded by a helper.
#[derive(Clone, Copy)]
struct Frame {
    op: usize,
    helper: Option<usize>,
    /// Which alternative it was, so backtracking can resume with the next.
    alternative: usize,
    /// The register before the frame, to restore on backtracking.
    before: Option<Value>,
}

fn search(ops: &[KeyOp], max_steps: u64) -> SearchOutcome {
    let mut events = Events::new(ops);
    let helpers = Helpers::new(ops);
    // Ops that took effect, with the helpers among them kept apart so the memo can subsume on
    // them.
    let mut taken = Bitset::new(ops.len());
    let mut used = Bitset::new(helpers.count);
    let mut memo = Memo::new(&helpers);
    let mut stack: Vec<Frame> = Vec::with_capacity(ops.len());
    let mut longest: Vec<Frame> = Vec::new();
    let mut state: Option<Value> = None;
    let mut steps = 0u64;

    let mut node = events.next[HEAD];
    let mut first_alternative = 0;
    'scan: loop {
        if node == NIL {
            // Every op with a return took effect; unknown ones left over simply never did.
            return SearchOutcome::Linearizable;
        }
        let EventNode { op, is_call, .. } = events.node[node];
        if !is_call {
            // `op` returned without taking effect: undo the latest choice and try the next.
            // Recording the prefix only here, on the way back, keeps the happy path copy-free.
            if stack.len() > longest.len() {
                longest.clone_from(&stack);
            }
            let Some(frame) = stack.pop() else {
                let longest_prefix = longest
                    .iter()
                    .flat_map(|frame| frame.helper.into_iter().chain([frame.op]))
                    .collect();
                return SearchOutcome::NoLinearization { longest_prefix };
            };
            state = frame.before;
            taken.clear(frame.op);
            if let Some(helper) = frame.helper {
                used.clear(helpers.ordinal[helper]);
            }
            events.unlift(frame.op);
            node = events.call_node[frame.op];
            first_alternative = frame.alternative + 1;
            continue;
        }

        for alternative in first_alternative.. {
            steps += 1;
            if steps > max_steps {
                return SearchOutcome::GaveUp;
            }
            let (helper, after) =
                match try_alternative(ops, &events, &helpers, &used, node, alternative, state) {
                    Alternative::Exhausted => break,
                    Alternative::Impossible => continue,
                    Alternative::Possible(helper, after) => (helper, after),
                };
            taken.set(op);
            if let Some(helper) = helper {
                used.set(helpers.ordinal[helper]);
            }
            if memo.first_visit(&taken, after, &used) {
                stack.push(Frame {
                    op,
                    helper,
                    alternative,
                    before: state,
                });
                state = after;
                events.lift(op);
                node = events.next[HEAD];
                first_alternative = 0;
                continue 'scan;
            }
            taken.clear(op);
            if let Some(helper) = helper {
                used.clear(helpers.ordinal[helper]);
            }
        }
        node = events.next[node];
        first_alternative = 0;
    }
}

/// Alternative number `which` for the op invoked at `node` to take effect now: 0 is alone, the
/// rest are with a helper before it.
fn try_alternative(
    ops: &[KeyOp],
    events: &Events,
    helpers: &Helpers,
    used: &Bitset,
    node: usize,
    which: usize,
    state: Option<Value>,
) -> Alternative {
    let effect = ops[events.node[node].op].effect;
    if which == 0 {
        return match effect.apply(state) {
            Some(after) => Alternative::Possible(None, after),
            None => Alternative::Impossible,
        };
    }
    // Only a failed CAS that the current value contradicts can need a helper.
    match effect {
        Effect::CasFailed { expected } if expected == state && !helpers.is_empty() => {}
        _ => return Alternative::Exhausted,
    }
    let Ok(helper) = helpers.get(which, state, events.deadline_from(node), used) else {
        return Alternative::Exhausted;
    };
    let after = helper
        .and_then(|helper| ops[helper].effect.apply(state))
        .and_then(|after_helper| effect.apply(after_helper));
    match after {
        Some(after) => Alternative::Possible(helper, after),
        None => Alternative::Impossible,
    }
}

/// Operation lines shown before the point where the search got stuck; older ones are rarely
/// what went wrong and would drown it.
const PREFIX_LINES_SHOWN: usize = 12;

fn explain_no_linearization(
    history: &History,
    key: Key,
    ops: &[KeyOp],
    longest_prefix: &[usize],
) -> String {
    let mut out = String::new();
    let unknown = ops.iter().filter(|op| op.returned_at.is_none()).count();
    let _ = writeln!(
        out,
        "no linearization of the {} operations on key {key} ({unknown} of unknown outcome).",
        ops.len()
    );

    let mut done = vec![false; ops.len()];
    let mut state = None;
    let _ = writeln!(
        out,
        "Longest linearizable prefix: {} operations{}",
        longest_prefix.len(),
        if longest_prefix.len() > PREFIX_LINES_SHOWN {
            format!(", the last {PREFIX_LINES_SHOWN} of them:")
        } else {
            ":".to_owned()
        }
    );
    let first_shown = longest_prefix.len().saturating_sub(PREFIX_LINES_SHOWN);
    for (position, &index) in longest_prefix.iter().enumerate() {
        state = ops[index]
            .effect
            .apply(state)
            .expect("the search only records prefixes that apply");
        done[index] = true;
        if position >= first_shown {
            let id = ops[index].id;
            let _ = writeln!(
                out,
                "  {id} {}   => key holds {}",
                history.get(id),
                RegisterValue(state)
            );
        }
    }

    // What may come next is exactly what the search tried: ops invoked no later than the first
    // return among the ops still to take effect.
    let deadline = (0..ops.len())
        .filter(|&index| !done[index])
        .filter_map(|index| ops[index].returned_at.map(|at| (at, index)))
        .min();
    let _ = writeln!(
        out,
        "after which no operation that may come next is consistent with key {key} holding {}:",
        RegisterValue(state)
    );
    for (index, op) in ops.iter().enumerate() {
        let may_come_next = deadline.is_none_or(|(at, _)| op.invoked_at <= at);
        if !done[index] && !op.unobserved && may_come_next {
            let _ = writeln!(out, "  {} {}", op.id, history.get(op.id));
        }
    }
    if let Some((at, index)) = deadline {
        let _ = write!(
            out,
            "and {} returned at tick {at}, so one of them must have taken effect by then.",
            ops[index].id
        );
    }
    out
}

/// Multiply-rotate hashing (the FxHash idea) with a final avalanche. The memo is hashed on every
/// search step, and SipHash's DoS resistance buys nothing for simulator-made keys.
#[derive(Default)]
struct WordHasher(u64);

impl Hasher for WordHasher {
    fn write(&mut self, bytes: &[u8]) {
        for chunk in bytes.chunks(8) {
            let mut word = [0u8; 8];
            word[..chunk.len()].copy_from_slice(chunk);
            self.write_u64(u64::from_le_bytes(word));
        }
    }

    fn write_u64(&mut self, word: u64) {
        self.0 = (self.0.rotate_left(5) ^ word).wrapping_mul(0x51_7c_c1_b7_27_22_0a_95);
    }

    fn write_usize(&mut self, word: usize) {
        self.write_u64(word as u64);
    }

    fn finish(&self) -> u64 {
        // Multiplication only carries upwards, so without this the low bits, which pick the
        // bucket, would ignore the high bits of every word.
        let mut hash = self.0;
        hash ^= hash >> 33;
        hash = hash.wrapping_mul(0xff51_afd7_ed55_8ccd);
        hash ^ (hash >> 33)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const K: Key = 1;

    fn put(value: Value) -> Op {
        Op::Put { key: K, value }
    }

    fn get() -> Op {
        Op::Get { key: K }
    }

    fn cas(expected: Option<Value>, new: Value) -> Op {
        Op::Cas {
            key: K,
            expected,
            new,
        }
    }

    /// Records an operation that completed.
    fn done(
        h: &mut History,
        client: ClientId,
        invoked: Tick,
        returned: Tick,
        op: Op,
        out: Output,
    ) -> OpId {
        let id = h.invoke(client, invoked, op);
        h.complete(id, returned, out);
        id
    }

    fn assert_ok(h: &History) {
        let result = h.check();
        assert_eq!(result, CheckResult::Ok, "{result}\nhistory:\n{h}");
    }

    /// Returns the explanation so tests can check it names the culprit.
    fn assert_violation(h: &History, key: Key) -> String {
        match h.check() {
            CheckResult::Violation {
                key: bad,
                explanation,
            } => {
                assert_eq!(bad, key, "{explanation}");
                explanation
            }
            other => panic!("expected a violation on key {key}, got {other}\nhistory:\n{h}"),
        }
    }

    #[test]
    fn empty_history_is_linearizable() {
        assert_ok(&History::new());
    }

    #[test]
    fn sequential_history_is_linearizable() {
        let mut h = History::new();
        done(&mut h, 1, 0, 1, get(), Output::Get(None));
        done(&mut h, 1, 2, 3, cas(Some(7), 1), Output::Cas(false));
        done(&mut h, 1, 4, 5, cas(None, 1), Output::Cas(true));
        done(&mut h, 2, 6, 7, get(), Output::Get(Some(1)));
        done(&mut h, 2, 8, 9, put(2), Output::Put);
        done(&mut h, 1, 10, 11, cas(Some(1), 3), Output::Cas(false));
        done(&mut h, 1, 12, 13, cas(Some(2), 3), Output::Cas(true));
        done(&mut h, 2, 14, 15, get(), Output::Get(Some(3)));
        done(&mut h, 2, 16, 17, cas(None, 9), Output::Cas(false));
        done(&mut h, 2, 18, 19, Op::Get { key: 2 }, Output::Get(None));
        assert_ok(&h);
    }

    #[test]
    fn overlapping_history_is_linearizable() {
        let mut h = History::new();
        // The read overlaps the put, so it may see either side of it.
        done(&mut h, 1, 0, 10, put(1), Output::Put);
        done(&mut h, 2, 1, 2, get(), Output::Get(None));
        done(&mut h, 3, 3, 4, get(), Output::Get(Some(1)));
        done(&mut h, 2, 5, 6, get(), Output::Get(Some(1)));
        // Concurrent CAS race: exactly one wins.
        done(&mut h, 1, 11, 20, cas(Some(1), 2), Output::Cas(false));
        done(&mut h, 2, 12, 19, cas(Some(1), 3), Output::Cas(true));
        done(&mut h, 3, 21, 22, get(), Output::Get(Some(3)));
        assert_ok(&h);
    }

    #[test]
    fn needs_backtracking_over_the_first_choice() {
        // Trying invocation order first (put 1, then put 2) leaves 2, contradicting the read, so
        // the search must undo and order the puts the other way.
        let mut h = History::new();
        done(&mut h, 1, 0, 10, put(1), Output::Put);
        done(&mut h, 2, 1, 10, put(2), Output::Put);
        done(&mut h, 3, 11, 12, get(), Output::Get(Some(1)));
        assert_ok(&h);
    }

    #[test]
    fn equal_ticks_are_concurrent() {
        let mut h = History::new();
        done(&mut h, 1, 0, 1, put(1), Output::Put);
        done(&mut h, 1, 2, 5, put(2), Output::Put);
        // Invoked at the tick put(2) completed: may still precede it.
        done(&mut h, 2, 5, 6, get(), Output::Get(Some(1)));
        assert_ok(&h);

        let mut h = History::new();
        done(&mut h, 1, 0, 1, put(1), Output::Put);
        done(&mut h, 1, 2, 5, put(2), Output::Put);
        done(&mut h, 2, 6, 7, get(), Output::Get(Some(1)));
        assert_violation(&h, K);
    }

    #[test]
    fn stale_read_is_caught() {
        let mut h = History::new();
        done(&mut h, 1, 0, 1, put(1), Output::Put);
        done(&mut h, 1, 2, 3, put(2), Output::Put);
        let stale = done(&mut h, 2, 4, 5, get(), Output::Get(Some(1)));
        let explanation = assert_violation(&h, K);
        assert!(explanation.contains(&stale.to_string()), "{explanation}");
    }

    #[test]
    fn read_of_never_written_value_is_caught() {
        let mut h = History::new();
        done(&mut h, 1, 0, 1, put(1), Output::Put);
        let bad = done(&mut h, 2, 0, 5, get(), Output::Get(Some(42)));
        let explanation = assert_violation(&h, K);
        assert!(explanation.contains(&bad.to_string()), "{explanation}");
        assert!(explanation.contains("42"), "{explanation}");
    }

    #[test]
    fn second_cas_from_the_same_value_is_caught() {
        let mut h = History::new();
        done(&mut h, 1, 0, 1, put(1), Output::Put);
        done(&mut h, 1, 2, 3, cas(Some(1), 2), Output::Cas(true));
        done(&mut h, 2, 4, 5, cas(Some(1), 3), Output::Cas(true));
        assert_violation(&h, K);
    }

    #[test]
    fn lost_write_is_caught() {
        let mut h = History::new();
        done(&mut h, 1, 0, 1, put(1), Output::Put);
        done(&mut h, 2, 2, 3, get(), Output::Get(None));
        done(&mut h, 2, 4, 5, get(), Output::Get(None));
        assert_violation(&h, K);
    }

    #[test]
    fn non_monotonic_reads_are_caught() {
        // Each read alone is fine (both overlap put(2)); together they go back in time.
        let mut h = History::new();
        done(&mut h, 1, 0, 1, put(1), Output::Put);
        done(&mut h, 1, 2, 10, put(2), Output::Put);
        done(&mut h, 2, 3, 4, get(), Output::Get(Some(2)));
        let mut fine = h.clone();
        done(&mut h, 3, 5, 6, get(), Output::Get(Some(1)));
        assert_violation(&h, K);
        // Control: the same later read, overlapping the first one, is fine.
        done(&mut fine, 3, 4, 6, get(), Output::Get(Some(1)));
        assert_ok(&fine);
    }

    #[test]
    fn failed_cas_that_should_have_succeeded_is_caught() {
        let mut h = History::new();
        done(&mut h, 1, 0, 1, put(1), Output::Put);
        done(&mut h, 2, 2, 3, cas(Some(1), 2), Output::Cas(false));
        assert_violation(&h, K);
    }

    #[test]
    fn unknown_put_may_be_observed() {
        let mut h = History::new();
        done(&mut h, 1, 0, 1, put(1), Output::Put);
        h.invoke(1, 2, put(2)); // timed out
        done(&mut h, 2, 5, 6, get(), Output::Get(Some(2)));
        done(&mut h, 2, 7, 8, get(), Output::Get(Some(2)));
        assert_ok(&h);
    }

    #[test]
    fn unknown_put_may_never_happen() {
        let mut h = History::new();
        done(&mut h, 1, 0, 1, put(1), Output::Put);
        h.invoke(1, 2, put(2));
        done(&mut h, 2, 5, 6, get(), Output::Get(Some(1)));
        done(&mut h, 2, 100, 101, get(), Output::Get(Some(1)));
        assert_ok(&h);
    }

    #[test]
    fn unknown_put_observed_then_unobserved_is_caught() {
        let mut h = History::new();
        done(&mut h, 1, 0, 1, put(1), Output::Put);
        h.invoke(1, 2, put(2));
        done(&mut h, 2, 3, 4, get(), Output::Get(Some(2)));
        done(&mut h, 2, 5, 6, get(), Output::Get(Some(1)));
        assert_violation(&h, K);
    }

    #[test]
    fn unknown_put_cannot_take_effect_before_its_invocation() {
        let mut h = History::new();
        done(&mut h, 1, 0, 1, put(1), Output::Put);
        done(&mut h, 2, 2, 3, get(), Output::Get(Some(2)));
        h.invoke(1, 4, put(2));
        assert_violation(&h, K);
    }

    #[test]
    fn unobserved_unknown_put_can_explain_a_failed_cas() {
        // Guards the pre-search pruning of unobserved unknown writes: here the unknown put(2) is
        // never read, yet it is the only reason the CAS may have failed.
        let mut h = History::new();
        done(&mut h, 1, 0, 1, put(1), Output::Put);
        h.invoke(1, 2, put(2));
        done(&mut h, 2, 3, 4, cas(Some(1), 3), Output::Cas(false));
        assert_ok(&h);

        let mut h = History::new();
        done(&mut h, 1, 0, 1, put(1), Output::Put);
        done(&mut h, 2, 3, 4, cas(Some(1), 3), Output::Cas(false));
        assert_violation(&h, K);
    }

    #[test]
    fn ordering_that_saves_an_unknown_write_for_later_is_found() {
        // Taking put(1) before the failed CAS needs the one unknown write to explain the CAS,
        // and then the second failed CAS has nothing to explain it. The search meets the same
        // ops and value (after put(3)) again without having used the unknown write, and must
        // not treat that as the failure it already saw.
        let mut h = History::new();
        h.invoke(3, 0, put(9));
        done(&mut h, 1, 0, 10, put(1), Output::Put);
        done(&mut h, 2, 1, 10, cas(Some(1), 5), Output::Cas(false));
        done(&mut h, 1, 11, 12, put(3), Output::Put);
        done(&mut h, 1, 13, 14, put(2), Output::Put);
        done(&mut h, 2, 15, 16, cas(Some(2), 6), Output::Cas(false));
        assert_ok(&h);

        // Control: with the first CAS forced after put(1), one unknown write is not enough.
        let mut h = History::new();
        h.invoke(3, 0, put(9));
        done(&mut h, 1, 0, 1, put(1), Output::Put);
        done(&mut h, 2, 2, 10, cas(Some(1), 5), Output::Cas(false));
        done(&mut h, 1, 11, 12, put(3), Output::Put);
        done(&mut h, 1, 13, 14, put(2), Output::Put);
        done(&mut h, 2, 15, 16, cas(Some(2), 6), Output::Cas(false));
        assert_violation(&h, K);
    }

    #[test]
    fn one_unknown_write_explains_one_failed_cas_only() {
        let history = |second_unknown_at: Option<Tick>| {
            let mut h = History::new();
            h.invoke(3, 0, put(8));
            if let Some(at) = second_unknown_at {
                h.invoke(4, at, put(9));
            }
            done(&mut h, 1, 1, 2, put(1), Output::Put);
            done(&mut h, 2, 3, 4, cas(Some(1), 5), Output::Cas(false));
            done(&mut h, 1, 5, 6, put(2), Output::Put);
            done(&mut h, 2, 7, 8, cas(Some(2), 6), Output::Cas(false));
            h
        };
        assert_violation(&history(None), K);
        assert_ok(&history(Some(6)));
        // Invoked after the second CAS returned: too late to explain it.
        assert_violation(&history(Some(9)), K);
    }

    #[test]
    fn unknown_cas_explains_a_failed_cas_only_from_its_expected_value() {
        let history = |unknown_expects| {
            let mut h = History::new();
            done(&mut h, 1, 0, 1, put(1), Output::Put);
            h.invoke(3, 2, cas(unknown_expects, 7));
            done(&mut h, 2, 3, 4, cas(Some(1), 5), Output::Cas(false));
            h
        };
        assert_ok(&history(Some(1)));
        assert_violation(&history(Some(4)), K);
    }

    #[test]
    fn unknown_cas_may_take_effect_or_not() {
        let mut h = History::new();
        done(&mut h, 1, 0, 1, put(1), Output::Put);
        h.invoke(1, 2, cas(Some(1), 2));
        done(&mut h, 2, 3, 4, get(), Output::Get(Some(1)));
        done(&mut h, 2, 5, 6, get(), Output::Get(Some(2)));
        assert_ok(&h);

        // It can only take effect from the expected value.
        let mut h = History::new();
        done(&mut h, 1, 0, 1, put(1), Output::Put);
        h.invoke(1, 2, cas(Some(5), 2));
        done(&mut h, 2, 3, 4, get(), Output::Get(Some(2)));
        assert_violation(&h, K);
    }

    #[test]
    fn unknown_get_is_ignored() {
        let mut h = History::new();
        done(&mut h, 1, 0, 1, put(1), Output::Put);
        h.invoke(2, 2, get());
        assert_ok(&h);
    }

    #[test]
    fn definitely_failed_op_is_ignored() {
        let mut h = History::new();
        done(&mut h, 1, 0, 1, put(1), Output::Put);
        let rejected = h.invoke(1, 2, put(2));
        h.fail_definitely(rejected);
        done(&mut h, 2, 3, 4, get(), Output::Get(Some(1)));
        assert_ok(&h);

        // The same read of 2 would be fine had the put stayed unknown; failed means it is not.
        done(&mut h, 2, 5, 6, get(), Output::Get(Some(2)));
        assert_violation(&h, K);
    }

    #[test]
    fn keys_are_independent_and_the_bad_one_is_named() {
        let mut h = History::new();
        h.invoke(9, 0, Op::Put { key: 7, value: 1 });
        done(&mut h, 1, 0, 1, Op::Put { key: 1, value: 1 }, Output::Put);
        done(&mut h, 1, 2, 3, Op::Get { key: 2 }, Output::Get(None));
        done(&mut h, 1, 4, 5, Op::Get { key: 1 }, Output::Get(Some(1)));
        assert_ok(&h);
        // A value written on key 1 must not be visible on key 3.
        done(&mut h, 1, 6, 7, Op::Get { key: 3 }, Output::Get(Some(1)));
        assert_violation(&h, 3);
    }

    #[test]
    fn explanation_shows_prefix_and_stuck_candidates() {
        let mut h = History::new();
        let first = done(&mut h, 1, 0, 1, put(1), Output::Put);
        let second = done(&mut h, 1, 2, 3, put(2), Output::Put);
        let stale = done(&mut h, 2, 4, 5, get(), Output::Get(Some(1)));
        let explanation = assert_violation(&h, K);
        let prefix_line = |id: OpId| {
            explanation
                .lines()
                .position(|line| line.trim_start().starts_with(&format!("{id} ")))
        };
        let (a, b, c) = (prefix_line(first), prefix_line(second), prefix_line(stale));
        assert!(
            a < b && b < c && a.is_some(),
            "prefix then stuck op in order:\n{explanation}"
        );
        assert!(
            explanation.contains("Longest linearizable prefix: 2 operations"),
            "{explanation}"
        );
        assert!(explanation.contains("holding 2"), "{explanation}");
    }

    #[test]
    #[should_panic(expected = "output")]
    fn mismatched_output_kind_panics() {
        let mut h = History::new();
        let id = h.invoke(1, 0, get());
        h.complete(id, 1, Output::Cas(true));
    }

    #[test]
    #[should_panic(expected = "already resolved")]
    fn double_completion_panics() {
        let mut h = History::new();
        let id = done(&mut h, 1, 0, 1, put(1), Output::Put);
        h.complete(id, 2, Output::Put);
    }

    /// Many clients writing and reading at once, all overlapping: the worst case for the search.
    fn highly_concurrent(writers: u64) -> History {
        let mut h = History::new();
        for value in 1..=writers {
            done(&mut h, value, 0, 100, put(value), Output::Put);
            done(
                &mut h,
                1000 + value,
                0,
                100,
                get(),
                Output::Get(Some(value)),
            );
        }
        h
    }

    #[test]
    fn search_limit_gives_unknown_never_ok() {
        let h = highly_concurrent(64);
        let tight = Limits {
            max_steps_per_key: 50,
        };
        assert_eq!(h.check_with(tight), CheckResult::Unknown { key: K });
        // Control: the history is linearizable, so the tight limit is the only thing in the way.
        assert_ok(&h);

        // A refutation that needs a 2^n search gives up too rather than guessing either way.
        let mut h = highly_concurrent(20);
        done(&mut h, 1, 200, 201, get(), Output::Get(None));
        let limits = Limits {
            max_steps_per_key: 10_000,
        };
        assert_eq!(h.check_with(limits), CheckResult::Unknown { key: K });
    }

    #[test]
    fn violation_on_one_key_beats_unknown_on_another() {
        let mut h = highly_concurrent(64);
        done(&mut h, 1, 0, 1, Op::Get { key: 2 }, Output::Get(Some(5)));
        let tight = Limits {
            max_steps_per_key: 50,
        };
        assert!(matches!(
            h.check_with(tight),
            CheckResult::Violation { key: 2, .. }
        ));
    }

    /// splitmix64: a few lines of deterministic randomness, no dependency.
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = self.0;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            z ^ (z >> 31)
        }

        fn below(&mut self, n: u64) -> u64 {
            self.next() % n
        }

        fn chance(&mut self, percent: u64) -> bool {
            self.below(100) < percent
        }
    }

    #[derive(Clone, Copy, PartialEq)]
    enum Fate {
        Answered,
        /// Times out; took effect or not, as `applies` says.
        Unknown {
            applies: bool,
        },
        Rejected,
    }

    struct InFlight {
        id: OpId,
        op: Op,
        takes_effect_at: Tick,
        returns_at: Tick,
        fate: Fate,
        output: Option<Output>,
    }

    struct Shape {
        clients: u64,
        keys: u64,
        ops_per_client: u64,
        /// Ticks from invocation to taking effect, and from that to return, are below this.
        max_delay: u64,
        unknown_percent: u64,
    }

    impl Shape {
        fn random(rng: &mut Rng) -> Self {
            Shape {
                clients: 1 + rng.below(6),
                keys: 1 + rng.below(3),
                ops_per_client: 10 + rng.below(60),
                max_delay: 1 + rng.below(6),
                unknown_percent: rng.below(15),
            }
        }
    }

    /// Runs clients against a real sequential map, each op taking effect at one tick inside its
    /// interval, so the recorded history is linearizable by construction. Values are unique.
    fn generate(rng: &mut Rng, shape: &Shape) -> History {
        let Shape {
            clients,
            keys,
            ops_per_client,
            max_delay,
            unknown_percent,
        } = *shape;
        let mut h = History::new();
        let mut store: BTreeMap<Key, Value> = BTreeMap::new();
        let mut next_value: Value = 1;
        let mut in_flight: Vec<Option<InFlight>> = (0..clients).map(|_| None).collect();
        let mut issued = vec![0u64; clients as usize];
        let mut now: Tick = 0;
        loop {
            for client in 0..clients as usize {
                if in_flight[client].is_some()
                    || issued[client] == ops_per_client
                    || !rng.chance(50)
                {
                    continue;
                }
                let key = rng.below(keys);
                let op = match rng.below(3) {
                    0 => Op::Get { key },
                    1 => {
                        next_value += 1;
                        Op::Put {
                            key,
                            value: next_value,
                        }
                    }
                    _ => {
                        next_value += 1;
                        let expected = match rng.below(3) {
                            0 => None,
                            1 => store.get(&key).copied(),
                            _ => Some(rng.below(next_value)),
                        };
                        Op::Cas {
                            key,
                            expected,
                            new: next_value,
                        }
                    }
                };
                let fate = if rng.chance(unknown_percent) {
                    Fate::Unknown {
                        applies: rng.chance(50),
                    }
                } else if rng.chance(3) {
                    Fate::Rejected
                } else {
                    Fate::Answered
                };
                let takes_effect_at = now + rng.below(max_delay);
                in_flight[client] = Some(InFlight {
                    id: h.invoke(client as u64, now, op),
                    op,
                    takes_effect_at,
                    returns_at: takes_effect_at + rng.below(max_delay),
                    fate,
                    output: None,
                });
                issued[client] += 1;
            }
            for flight in in_flight.iter_mut().flatten() {
                let applies = matches!(
                    flight.fate,
                    Fate::Answered | Fate::Unknown { applies: true }
                );
                if flight.takes_effect_at != now || !applies {
                    continue;
                }
                flight.output = Some(match flight.op {
                    Op::Get { key } => Output::Get(store.get(&key).copied()),
                    Op::Put { key, value } => {
                        store.insert(key, value);
                        Output::Put
                    }
                    Op::Cas { key, expected, new } => {
                        let swapped = store.get(&key).copied() == expected;
                        if swapped {
                            store.insert(key, new);
                        }
                        Output::Cas(swapped)
                    }
                });
            }
            for slot in in_flight.iter_mut() {
                if slot.as_ref().is_some_and(|f| f.returns_at == now) {
                    let flight = slot.take().unwrap();
                    match flight.fate {
                        Fate::Answered => h.complete(flight.id, now, flight.output.unwrap()),
                        Fate::Rejected => h.fail_definitely(flight.id),
                        Fate::Unknown { .. } => {}
                    }
                }
            }
            if issued.iter().all(|&n| n == ops_per_client) && in_flight.iter().all(Option::is_none)
            {
                return h;
            }
            now += 1;
        }
    }

    fn completed_gets(h: &History) -> Vec<(OpId, Key, Tick, Tick)> {
        h.records()
            .iter()
            .enumerate()
            .filter_map(|(index, r)| match (r.op, r.status) {
                (Op::Get { key }, Status::Completed { at, .. }) => {
                    Some((OpId(index), key, r.invoked_at, at))
                }
                _ => None,
            })
            .collect()
    }

    fn set_get_output(h: &mut History, id: OpId, value: Option<Value>) {
        match &mut h.records[id.0].status {
            Status::Completed { output, .. } => *output = Output::Get(value),
            other => panic!("{id} is {other:?}"),
        }
    }

    /// A write that must have been overwritten before `read` was invoked, if any: `old` completed
    /// before a newer completed write was invoked, and that one completed before `read`.
    fn overwritten_before(h: &History, key: Key, read_invoked: Tick) -> Option<Value> {
        let writes: Vec<(Value, Tick, Tick)> = h
            .records()
            .iter()
            .filter(|r| r.op.key() == key)
            .filter_map(|r| match (r.op, r.status) {
                (Op::Put { value, .. }, Status::Completed { at, .. })
                | (
                    Op::Cas { new: value, .. },
                    Status::Completed {
                        at,
                        output: Output::Cas(true),
                    },
                ) => Some((value, r.invoked_at, at)),
                _ => None,
            })
            .collect();
        writes.iter().find_map(|&(old, _, old_done)| {
            writes
                .iter()
                .any(|&(_, newer_start, newer_done)| {
                    old_done < newer_start && newer_done < read_invoked
                })
                .then_some(old)
        })
    }

    #[test]
    fn random_linearizable_histories_pass_and_mutations_fail() {
        let mut stale_reads_tried = 0;
        for seed in 0..300 {
            let mut rng = Rng(seed);
            let shape = Shape::random(&mut rng);
            let mut h = generate(&mut rng, &shape);
            assert!(h.check().is_ok(), "seed {seed}: {}\n{h}", h.check());

            let gets = completed_gets(&h);
            if gets.is_empty() {
                continue;
            }
            let (id, key, invoked, _) = gets[rng.below(gets.len() as u64) as usize];

            // Values are unique, so reading a value overwritten before the read began is stale.
            if let Some(old) = overwritten_before(&h, key, invoked) {
                let mut stale = h.clone();
                set_get_output(&mut stale, id, Some(old));
                assert!(
                    matches!(stale.check(), CheckResult::Violation { key: k, .. } if k == key),
                    "seed {seed}: stale read of {old} by {id} not caught: {}\n{stale}",
                    stale.check()
                );
                stale_reads_tried += 1;
            }

            set_get_output(&mut h, id, Some(Value::MAX));
            match h.check() {
                CheckResult::Violation { key: bad, .. } => assert_eq!(bad, key, "seed {seed}"),
                other => panic!("seed {seed}: mutated {id} gave {other}\n{h}"),
            }
        }
        // Guards the generator: the stale-read mutation must actually get exercised.
        assert!(stale_reads_tried > 50, "only {stale_reads_tried}");
    }

    /// Every order of every subset of unknown ops, checked directly against the definition:
    /// exponential, so only for a handful of ops, but with no pruning to get wrong.
    fn brute_force_linearizable(h: &History) -> bool {
        let ops: Vec<&Record> = h
            .records()
            .iter()
            .filter(|r| {
                !matches!(
                    (r.op, r.status),
                    (_, Status::Failed) | (Op::Get { .. }, Status::Pending)
                )
            })
            .collect();
        let returned = |r: &Record| match r.status {
            Status::Completed { at, .. } => Some(at),
            _ => None,
        };
        fn extend(
            ops: &[&Record],
            returned: &dyn Fn(&Record) -> Option<Tick>,
            done: &mut Vec<bool>,
            store: &mut BTreeMap<Key, Value>,
        ) -> bool {
            let all_answered_done = ops
                .iter()
                .zip(done.iter())
                .all(|(r, &d)| d || returned(r).is_none());
            if all_answered_done {
                return true;
            }
            for next in 0..ops.len() {
                let blocked = (0..ops.len()).any(|other| {
                    !done[other]
                        && other != next
                        && returned(ops[other]).is_some_and(|at| at < ops[next].invoked_at)
                });
                if done[next] || blocked {
                    continue;
                }
                let before = store.clone();
                let current = store.get(&ops[next].op.key()).copied();
                let output = match ops[next].status {
                    Status::Completed { output, .. } => Some(output),
                    _ => None,
                };
                let consistent = match (ops[next].op, output) {
                    (Op::Put { key, value }, _) => {
                        store.insert(key, value);
                        true
                    }
                    (Op::Get { .. }, Some(Output::Get(seen))) => seen == current,
                    (Op::Cas { expected, .. }, Some(Output::Cas(false))) => current != expected,
                    (Op::Cas { key, expected, new }, _) => {
                        store.insert(key, new);
                        current == expected
                    }
                    (Op::Get { .. }, _) => unreachable!(),
                };
                done[next] = true;
                if consistent && extend(ops, returned, done, store) {
                    return true;
                }
                done[next] = false;
                *store = before;
            }
            false
        }
        extend(
            &ops,
            &returned,
            &mut vec![false; ops.len()],
            &mut BTreeMap::new(),
        )
    }

    /// Small histories of random ops with random, mostly wrong, outputs; values repeat.
    fn random_small_history(rng: &mut Rng) -> History {
        let mut h = History::new();
        let value = |rng: &mut Rng| 1 + rng.below(3);
        let maybe = |rng: &mut Rng| rng.chance(70).then(|| value(rng));
        for client in 0..1 + rng.below(8) {
            let key = if rng.chance(85) { 1 } else { 2 };
            let op = match rng.below(3) {
                0 => Op::Get { key },
                1 => Op::Put {
                    key,
                    value: value(rng),
                },
                _ => Op::Cas {
                    key,
                    expected: maybe(rng),
                    new: value(rng),
                },
            };
            let invoked_at = rng.below(10);
            let id = h.invoke(client, invoked_at, op);
            match rng.below(100) {
                0..=9 => h.fail_definitely(id),
                10..=29 => {}
                _ => {
                    let output = match op {
                        Op::Get { .. } => Output::Get(maybe(rng)),
                        Op::Put { .. } => Output::Put,
                        Op::Cas { .. } => Output::Cas(rng.chance(50)),
                    };
                    h.complete(id, invoked_at + rng.below(5), output);
                }
            }
        }
        h
    }

    #[test]
    fn agrees_with_brute_force_on_small_histories() {
        let mut verdicts = [0; 2];
        for seed in 0..20_000 {
            let h = random_small_history(&mut Rng(seed));
            let expected = brute_force_linearizable(&h);
            let result = h.check();
            assert!(
                !matches!(result, CheckResult::Unknown { .. }),
                "seed {seed}: {result}"
            );
            assert_eq!(
                result.is_ok(),
                expected,
                "seed {seed}: checker says {result}\n{h}"
            );
            verdicts[usize::from(expected)] += 1;
        }
        // Guards the generator: both verdicts must be common for the comparison to mean much.
        assert!(verdicts.iter().all(|&n| n > 4000), "{verdicts:?}");
    }
}
