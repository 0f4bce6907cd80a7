//! At-most-once apply: the results of recent requests, per proposer.

use std::collections::BTreeMap;

use crate::codec::{put_uvarint, Reader, Wire};
use crate::types::{RequestId, Response};
use crate::{DecodeError, Error, DEDUP_MAX_PROPOSERS, DEDUP_WINDOW};

/// Ordered maps, not hash maps: the table is part of the snapshot and must encode identically on
/// every member.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub(crate) struct Dedup {
    /// Invariant: at most [`DEDUP_MAX_PROPOSERS`] entries.
    proposers: BTreeMap<u64, Window>,
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
struct Window {
    /// Index of this proposer's last applied request: the proposer silent longest is the one
    /// forgotten.
    last_index: u64,
    /// Highest seq evicted from `results`. A seq at or below it that `results` lacks may have been
    /// applied, so it is refused.
    floor: Option<u64>,
    /// Invariant: at most [`DEDUP_WINDOW`] entries, all above `floor`.
    results: BTreeMap<u64, Result<Response, Error>>,
}

pub(crate) enum Seen<'a> {
    New,
    Applied(&'a Result<Response, Error>),
    TooOld,
}

impl Dedup {
    pub(crate) fn check(&self, id: RequestId) -> Seen<'_> {
        let Some(window) = self.proposers.get(&id.proposer) else {
            return Seen::New;
        };
        if let Some(result) = window.results.get(&id.seq) {
            return Seen::Applied(result);
        }
        match window.floor {
            Some(floor) if id.seq <= floor => Seen::TooOld,
            _ => Seen::New,
        }
    }

    pub(crate) fn record(&mut self, id: RequestId, index: u64, result: &Result<Response, Error>) {
        let window = self.proposers.entry(id.proposer).or_default();
        window.last_index = index;
        window.results.insert(id.seq, result.clone());
        while window.results.len() > DEDUP_WINDOW {
            if let Some((seq, _)) = window.results.pop_first() {
                window.floor = Some(window.floor.map_or(seq, |f| f.max(seq)));
            }
        }
        if self.proposers.len() > DEDUP_MAX_PROPOSERS {
            // The proposer just recorded has the highest index of all, so it is never the one
            // chosen.
            let stalest = self
                .proposers
                .iter()
                .min_by_key(|(_, w)| w.last_index)
                .map(|(&p, _)| p);
            if let Some(p) = stalest {
                self.proposers.remove(&p);
            }
        }
    }

    pub(crate) fn put(&self, buf: &mut Vec<u8>) {
        put_uvarint(buf, self.proposers.len() as u64);
        for (&proposer, w) in &self.proposers {
            put_uvarint(buf, proposer);
            put_uvarint(buf, w.last_index);
            match w.floor {
                None => buf.push(0),
                Some(f) => {
                    buf.push(1);
                    put_uvarint(buf, f);
                }
            }
            put_uvarint(buf, w.results.len() as u64);
            for (&seq, result) in &w.results {
                put_uvarint(buf, seq);
                result.put(buf);
            }
        }
    }

    /// Reads what `put` wrote, refusing a table that breaks the invariants above.
    pub(crate) fn get(r: &mut Reader<'_>) -> Result<Dedup, DecodeError> {
        let n = r.count()?;
        if n > DEDUP_MAX_PROPOSERS {
            return Err(DecodeError::Inconsistent(
                "dedup table has too many proposers",
            ));
        }
        let mut proposers = BTreeMap::new();
        for _ in 0..n {
            let proposer = r.uvarint()?;
            let last_index = r.uvarint()?;
            let floor = if r.bool()? { Some(r.uvarint()?) } else { None };
            let m = r.count()?;
            if m > DEDUP_WINDOW {
                return Err(DecodeError::Inconsistent("dedup window too large"));
            }
            let mut results = BTreeMap::new();
            for _ in 0..m {
                let seq = r.uvarint()?;
                if floor.is_some_and(|f| seq <= f) {
                    return Err(DecodeError::Inconsistent(
                        "dedup result at or below its window's floor",
                    ));
                }
                let result = Result::<Response, Error>::get(r)?;
                if results.insert(seq, result).is_some() {
                    return Err(DecodeError::Inconsistent("dedup seq repeated"));
                }
            }
            if proposers
                .insert(
                    proposer,
                    Window {
                        last_index,
                        floor,
                        results,
                    },
                )
                .is_some()
            {
                return Err(DecodeError::Inconsistent("dedup proposer repeated"));
            }
        }
        Ok(Dedup { proposers })
    }
}
