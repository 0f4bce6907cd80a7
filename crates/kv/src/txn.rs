//! Txn: compares, the choice of branches, and running them at one revision.
//!
//! As in etcd, a txn runs in three passes so that it is atomic without undo:
//! 1. every compare, nested ones included, is evaluated against the state before the txn, which
//!    fixes the path through the branches;
//! 2. every op on that path is checked against the store (leases exist, `ignore_*` keys exist, read
//!    revisions are servable);
//! 3. the path runs, and nothing on it can fail any more.

use std::cmp::Ordering;

use crate::store::{visible, Entry, Store, Write};
use crate::types::{
    Compare, CompareResult, CompareTarget, Event, RequestOp, ResponseOp, TxnRequest, TxnResponse,
};
use crate::Error;

fn branch(txn: &TxnRequest, succeeded: bool) -> &[RequestOp] {
    if succeeded {
        &txn.success
    } else {
        &txn.failure
    }
}

/// `field <result> target` for one version, or for a missing key (`e` is `None`): all fields 0.
fn compare_entry(c: &Compare, e: Option<&Entry>) -> bool {
    let ord = match &c.target {
        CompareTarget::Version(v) => e.map_or(0, |e| e.version).cmp(v),
        CompareTarget::Create(v) => e.map_or(0, |e| e.create_revision).cmp(v),
        CompareTarget::Mod(v) => e.map_or(0, |e| e.mod_revision).cmp(v),
        CompareTarget::Lease(v) => e.map_or(0, |e| e.lease).cmp(v),
        CompareTarget::Value(v) => e.map_or(&[][..], |e| &e.value[..]).cmp(&v[..]),
    };
    match c.result {
        CompareResult::Equal => ord == Ordering::Equal,
        CompareResult::Greater => ord == Ordering::Greater,
        CompareResult::Less => ord == Ordering::Less,
        CompareResult::NotEqual => ord != Ordering::Equal,
    }
}

impl Store {
    /// etcd's `applyCompare` at revision `rev`: every live key in the range must pass; an empty
    /// range compares as a missing key, except that a value comparison then fails (a missing value
    /// cannot be told from an empty one).
    pub(crate) fn compare_holds(&self, c: &Compare, rev: i64) -> bool {
        let mut any = false;
        for (_, hist) in self.scan(&c.key, &c.range_end) {
            if let Some(e) = visible(hist, rev) {
                any = true;
                if !compare_entry(c, Some(e)) {
                    return false;
                }
            }
        }
        any || (!matches!(c.target, CompareTarget::Value(_)) && compare_entry(c, None))
    }

    /// Pass 1: one outcome per txn on the path, in the order pass 3 visits them.
    fn txn_path(&self, txn: &TxnRequest, path: &mut Vec<bool>) {
        let succeeded = txn
            .compare
            .iter()
            .all(|c| self.compare_holds(c, self.revision));
        path.push(succeeded);
        for op in branch(txn, succeeded) {
            if let RequestOp::Txn(t) = op {
                self.txn_path(t, path);
            }
        }
    }

    /// Pass 2.
    fn check_path(&self, txn: &TxnRequest, path: &[bool], at: &mut usize) -> Result<(), Error> {
        let succeeded = path[*at];
        *at += 1;
        for op in branch(txn, succeeded) {
            match op {
                RequestOp::Range(r) => self.check_read_revision(r.revision, self.revision)?,
                RequestOp::Put(p) => self.check_put(p)?,
                RequestOp::DeleteRange(_) => {}
                RequestOp::Txn(t) => self.check_path(t, path, at)?,
            }
        }
        Ok(())
    }

    /// Passes 1 and 2, for a txn that passed `validate`.
    fn plan(&self, txn: &TxnRequest) -> Result<Vec<bool>, Error> {
        let mut path = Vec::new();
        self.txn_path(txn, &mut path);
        self.check_path(txn, &path, &mut 0)?;
        Ok(path)
    }

    pub(crate) fn apply_txn(
        &mut self,
        txn: &TxnRequest,
    ) -> Result<(TxnResponse, Vec<Event>), Error> {
        txn.validate()?;
        let path = self.plan(txn)?;
        let mut w = self.begin();
        let resp = self.exec_txn(&mut w, txn, &path, &mut 0);
        Ok((resp, self.end(w)))
    }

    /// Pass 3. Reads see the writes of earlier ops; the response revision of each level is the one
    /// reads after it would see.
    fn exec_txn(
        &mut self,
        w: &mut Write,
        txn: &TxnRequest,
        path: &[bool],
        at: &mut usize,
    ) -> TxnResponse {
        let succeeded = path[*at];
        *at += 1;
        let ops = branch(txn, succeeded);
        let mut responses = Vec::with_capacity(ops.len());
        for op in ops {
            responses.push(match op {
                RequestOp::Range(r) => {
                    let current = self.read_rev(w);
                    let rev = if r.revision > 0 { r.revision } else { current };
                    ResponseOp::Range(self.range_unchecked(r, rev, current))
                }
                RequestOp::Put(p) => ResponseOp::Put(self.exec_put(w, p)),
                RequestOp::DeleteRange(d) => ResponseOp::DeleteRange(self.exec_delete(w, d)),
                RequestOp::Txn(t) => ResponseOp::Txn(self.exec_txn(w, t, path, at)),
            });
        }
        TxnResponse {
            revision: self.read_rev(w),
            succeeded,
            responses,
        }
    }

    /// Serves a txn that only reads without going through the log (a serializable txn, or a
    /// linearizable one after ReadIndex). A txn that writes is refused with
    /// [`Error::TxnNotReadOnly`]: it must be proposed.
    pub fn txn_read(&self, txn: &TxnRequest) -> Result<TxnResponse, Error> {
        txn.validate()?;
        if !txn.is_read_only() {
            return Err(Error::TxnNotReadOnly);
        }
        let path = self.plan(txn)?;
        Ok(self.read_txn(txn, &path, &mut 0))
    }

    fn read_txn(&self, txn: &TxnRequest, path: &[bool], at: &mut usize) -> TxnResponse {
        let succeeded = path[*at];
        *at += 1;
        let responses = branch(txn, succeeded)
            .iter()
            .filter_map(|op| match op {
                RequestOp::Range(r) => {
                    let rev = if r.revision > 0 {
                        r.revision
                    } else {
                        self.revision
                    };
                    Some(ResponseOp::Range(self.range_unchecked(
                        r,
                        rev,
                        self.revision,
                    )))
                }
                RequestOp::Txn(t) => Some(ResponseOp::Txn(self.read_txn(t, path, at))),
                // `is_read_only` ruled these out.
                RequestOp::Put(_) | RequestOp::DeleteRange(_) => None,
            })
            .collect();
        TxnResponse {
            revision: self.revision,
            succeeded,
            responses,
        }
    }
}
