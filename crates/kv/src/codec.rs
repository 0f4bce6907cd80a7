//! The binary format of commands (Raft log payloads) and of the values a snapshot stores.
//!
//! Hand-written rather than prost because apply must be total: every byte string decodes to a
//! command or to an error, with the depth of nested txns bounded and no allocation sized by an
//! untrusted count. Integers are LEB128 varints (signed ones zigzag-encoded), byte strings are a
//! varint length then the bytes, enums and flag sets are one byte. A command starts with
//! [`COMMAND_FORMAT_VERSION`] so that the format can change without misreading old logs.

use bytes::Bytes;

use crate::types::{
    Command, CompactRequest, CompactResponse, Compare, CompareResult, CompareTarget,
    DeleteRangeRequest, DeleteRangeResponse, KeyValue, LeaseCheckpoint, LeaseCheckpointRequest,
    LeaseCheckpointResponse, LeaseGrantRequest, LeaseGrantResponse, LeaseRevokeRequest,
    LeaseRevokeResponse, Op, PutRequest, PutResponse, RangeRequest, RangeResponse, RequestId,
    RequestOp, Response, ResponseOp, SortOrder, SortTarget, TxnRequest, TxnResponse,
};
use crate::{DecodeError, Error, MAX_TXN_DEPTH};

/// First byte of every encoded command.
pub const COMMAND_FORMAT_VERSION: u8 = 1;

/// Decoding reserves at most this many elements up front, whatever count the input claims: a lying
/// count then costs at most this much before the input runs out.
const MAX_PREALLOC: usize = 256;

pub(crate) struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
    /// Nested txns currently being decoded; bounded by [`MAX_TXN_DEPTH`] so recursion cannot
    /// overflow the stack.
    depth: usize,
}

impl<'a> Reader<'a> {
    pub(crate) fn new(buf: &'a [u8]) -> Reader<'a> {
        Reader {
            buf,
            pos: 0,
            depth: 0,
        }
    }

    pub(crate) fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }

    pub(crate) fn invalid(&self, what: &'static str) -> DecodeError {
        DecodeError::Invalid {
            what,
            offset: self.pos,
        }
    }

    pub(crate) fn finish(self) -> Result<(), DecodeError> {
        match self.remaining() {
            0 => Ok(()),
            n => Err(DecodeError::TrailingBytes(n)),
        }
    }

    pub(crate) fn take(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        if n > self.remaining() {
            return Err(DecodeError::Truncated(self.buf.len()));
        }
        let out = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(out)
    }

    pub(crate) fn u8(&mut self) -> Result<u8, DecodeError> {
        Ok(self.take(1)?[0])
    }

    pub(crate) fn uvarint(&mut self) -> Result<u64, DecodeError> {
        let start = self.pos;
        let mut v = 0u64;
        for i in 0..10 {
            let b = self.u8()?;
            // The tenth byte carries bit 63 only; anything more would overflow.
            if i == 9 && b > 1 {
                return Err(DecodeError::Invalid {
                    what: "varint",
                    offset: start,
                });
            }
            v |= u64::from(b & 0x7f) << (7 * i);
            if b & 0x80 == 0 {
                return Ok(v);
            }
        }
        Err(DecodeError::Invalid {
            what: "varint",
            offset: start,
        })
    }

    pub(crate) fn ivarint(&mut self) -> Result<i64, DecodeError> {
        let u = self.uvarint()?;
        Ok(((u >> 1) as i64) ^ -((u & 1) as i64))
    }

    pub(crate) fn u32v(&mut self) -> Result<u32, DecodeError> {
        let at = self.pos;
        u32::try_from(self.uvarint()?).map_err(|_| DecodeError::Invalid {
            what: "u32",
            offset: at,
        })
    }

    pub(crate) fn bool(&mut self) -> Result<bool, DecodeError> {
        match self.u8()? {
            0 => Ok(false),
            1 => Ok(true),
            _ => Err(DecodeError::Invalid {
                what: "bool",
                offset: self.pos - 1,
            }),
        }
    }

    /// A byte string, copied out so that it does not pin the whole input buffer in memory.
    pub(crate) fn bytes(&mut self) -> Result<Bytes, DecodeError> {
        let at = self.pos;
        let n = self.uvarint()?;
        let n = usize::try_from(n).map_err(|_| DecodeError::Invalid {
            what: "length",
            offset: at,
        })?;
        Ok(Bytes::copy_from_slice(self.take(n)?))
    }

    /// An element count. Every element takes at least one byte, so a count above the bytes left is
    /// a lie.
    pub(crate) fn count(&mut self) -> Result<usize, DecodeError> {
        let at = self.pos;
        let n = self.uvarint()?;
        match usize::try_from(n) {
            Ok(n) if n <= self.remaining() => Ok(n),
            _ => Err(DecodeError::Invalid {
                what: "count",
                offset: at,
            }),
        }
    }

    pub(crate) fn vec<T>(
        &mut self,
        mut elem: impl FnMut(&mut Reader<'a>) -> Result<T, DecodeError>,
    ) -> Result<Vec<T>, DecodeError> {
        let n = self.count()?;
        let mut out = Vec::with_capacity(n.min(MAX_PREALLOC));
        for _ in 0..n {
            out.push(elem(self)?);
        }
        Ok(out)
    }

    fn enter_txn(&mut self) -> Result<(), DecodeError> {
        if self.depth >= MAX_TXN_DEPTH {
            return Err(self.invalid("txn nesting depth"));
        }
        self.depth += 1;
        Ok(())
    }

    fn leave_txn(&mut self) {
        self.depth -= 1;
    }
}

pub(crate) fn put_uvarint(buf: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        buf.push((v as u8) | 0x80);
        v >>= 7;
    }
    buf.push(v as u8);
}

pub(crate) fn put_ivarint(buf: &mut Vec<u8>, v: i64) {
    put_uvarint(buf, ((v << 1) ^ (v >> 63)) as u64);
}

pub(crate) fn put_bytes(buf: &mut Vec<u8>, b: &[u8]) {
    put_uvarint(buf, b.len() as u64);
    buf.extend_from_slice(b);
}

pub(crate) fn put_bool(buf: &mut Vec<u8>, b: bool) {
    buf.push(u8::from(b));
}

/// A type with a binary form. `get` must accept exactly what `put` writes and refuse anything else
/// without panicking.
pub(crate) trait Wire: Sized {
    fn put(&self, buf: &mut Vec<u8>);
    fn get(r: &mut Reader<'_>) -> Result<Self, DecodeError>;
}

pub(crate) fn put_vec<T: Wire>(buf: &mut Vec<u8>, items: &[T]) {
    put_uvarint(buf, items.len() as u64);
    for item in items {
        item.put(buf);
    }
}

fn get_vec<T: Wire>(r: &mut Reader<'_>) -> Result<Vec<T>, DecodeError> {
    r.vec(T::get)
}

impl<T: Wire> Wire for Option<T> {
    fn put(&self, buf: &mut Vec<u8>) {
        match self {
            None => buf.push(0),
            Some(v) => {
                buf.push(1);
                v.put(buf);
            }
        }
    }

    fn get(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
        Ok(if r.bool()? { Some(T::get(r)?) } else { None })
    }
}

impl Wire for KeyValue {
    fn put(&self, buf: &mut Vec<u8>) {
        put_bytes(buf, &self.key);
        put_ivarint(buf, self.create_revision);
        put_ivarint(buf, self.mod_revision);
        put_ivarint(buf, self.version);
        put_bytes(buf, &self.value);
        put_ivarint(buf, self.lease);
    }

    fn get(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
        Ok(KeyValue {
            key: r.bytes()?,
            create_revision: r.ivarint()?,
            mod_revision: r.ivarint()?,
            version: r.ivarint()?,
            value: r.bytes()?,
            lease: r.ivarint()?,
        })
    }
}

/// Packs named flags into one byte and refuses unknown bits, so that a flipped bit cannot pass
/// unnoticed.
fn get_flags(r: &mut Reader<'_>, known: u8) -> Result<u8, DecodeError> {
    let flags = r.u8()?;
    if flags & !known != 0 {
        return Err(DecodeError::Invalid {
            what: "flags",
            offset: r.pos - 1,
        });
    }
    Ok(flags)
}

impl Wire for RangeRequest {
    fn put(&self, buf: &mut Vec<u8>) {
        put_bytes(buf, &self.key);
        put_bytes(buf, &self.range_end);
        put_ivarint(buf, self.limit);
        put_ivarint(buf, self.revision);
        buf.push(self.sort_order as u8);
        buf.push(self.sort_target as u8);
        buf.push(u8::from(self.keys_only) | (u8::from(self.count_only) << 1));
        put_ivarint(buf, self.min_mod_revision);
        put_ivarint(buf, self.max_mod_revision);
        put_ivarint(buf, self.min_create_revision);
        put_ivarint(buf, self.max_create_revision);
    }

    fn get(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
        let key = r.bytes()?;
        let range_end = r.bytes()?;
        let limit = r.ivarint()?;
        let revision = r.ivarint()?;
        let sort_order = match r.u8()? {
            0 => SortOrder::None,
            1 => SortOrder::Ascend,
            2 => SortOrder::Descend,
            _ => {
                return Err(DecodeError::Invalid {
                    what: "sort order",
                    offset: r.pos - 1,
                })
            }
        };
        let sort_target = match r.u8()? {
            0 => SortTarget::Key,
            1 => SortTarget::Version,
            2 => SortTarget::Create,
            3 => SortTarget::Mod,
            4 => SortTarget::Value,
            _ => {
                return Err(DecodeError::Invalid {
                    what: "sort target",
                    offset: r.pos - 1,
                })
            }
        };
        let flags = get_flags(r, 0b11)?;
        Ok(RangeRequest {
            key,
            range_end,
            limit,
            revision,
            sort_order,
            sort_target,
            keys_only: flags & 1 != 0,
            count_only: flags & 2 != 0,
            min_mod_revision: r.ivarint()?,
            max_mod_revision: r.ivarint()?,
            min_create_revision: r.ivarint()?,
            max_create_revision: r.ivarint()?,
        })
    }
}

impl Wire for PutRequest {
    fn put(&self, buf: &mut Vec<u8>) {
        put_bytes(buf, &self.key);
        put_bytes(buf, &self.value);
        put_ivarint(buf, self.lease);
        buf.push(
            u8::from(self.prev_kv)
                | (u8::from(self.ignore_value) << 1)
                | (u8::from(self.ignore_lease) << 2),
        );
    }

    fn get(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
        let key = r.bytes()?;
        let value = r.bytes()?;
        let lease = r.ivarint()?;
        let flags = get_flags(r, 0b111)?;
        Ok(PutRequest {
            key,
            value,
            lease,
            prev_kv: flags & 1 != 0,
            ignore_value: flags & 2 != 0,
            ignore_lease: flags & 4 != 0,
        })
    }
}

impl Wire for DeleteRangeRequest {
    fn put(&self, buf: &mut Vec<u8>) {
        put_bytes(buf, &self.key);
        put_bytes(buf, &self.range_end);
        put_bool(buf, self.prev_kv);
    }

    fn get(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
        Ok(DeleteRangeRequest {
            key: r.bytes()?,
            range_end: r.bytes()?,
            prev_kv: r.bool()?,
        })
    }
}

impl Wire for Compare {
    fn put(&self, buf: &mut Vec<u8>) {
        buf.push(self.result as u8);
        match &self.target {
            CompareTarget::Version(v) => {
                buf.push(0);
                put_ivarint(buf, *v);
            }
            CompareTarget::Create(v) => {
                buf.push(1);
                put_ivarint(buf, *v);
            }
            CompareTarget::Mod(v) => {
                buf.push(2);
                put_ivarint(buf, *v);
            }
            CompareTarget::Value(v) => {
                buf.push(3);
                put_bytes(buf, v);
            }
            CompareTarget::Lease(v) => {
                buf.push(4);
                put_ivarint(buf, *v);
            }
        }
        put_bytes(buf, &self.key);
        put_bytes(buf, &self.range_end);
    }

    fn get(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
        let result = match r.u8()? {
            0 => CompareResult::Equal,
            1 => CompareResult::Greater,
            2 => CompareResult::Less,
            3 => CompareResult::NotEqual,
            _ => {
                return Err(DecodeError::Invalid {
                    what: "compare result",
                    offset: r.pos - 1,
                })
            }
        };
        let target = match r.u8()? {
            0 => CompareTarget::Version(r.ivarint()?),
            1 => CompareTarget::Create(r.ivarint()?),
            2 => CompareTarget::Mod(r.ivarint()?),
            3 => CompareTarget::Value(r.bytes()?),
            4 => CompareTarget::Lease(r.ivarint()?),
            _ => {
                return Err(DecodeError::Invalid {
                    what: "compare target",
                    offset: r.pos - 1,
                })
            }
        };
        Ok(Compare {
            result,
            target,
            key: r.bytes()?,
            range_end: r.bytes()?,
        })
    }
}

impl Wire for TxnRequest {
    fn put(&self, buf: &mut Vec<u8>) {
        put_vec(buf, &self.compare);
        put_vec(buf, &self.success);
        put_vec(buf, &self.failure);
    }

    fn get(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
        r.enter_txn()?;
        let txn = TxnRequest {
            compare: get_vec(r)?,
            success: get_vec(r)?,
            failure: get_vec(r)?,
        };
        r.leave_txn();
        Ok(txn)
    }
}

impl Wire for RequestOp {
    fn put(&self, buf: &mut Vec<u8>) {
        match self {
            RequestOp::Range(x) => {
                buf.push(0);
                x.put(buf);
            }
            RequestOp::Put(x) => {
                buf.push(1);
                x.put(buf);
            }
            RequestOp::DeleteRange(x) => {
                buf.push(2);
                x.put(buf);
            }
            RequestOp::Txn(x) => {
                buf.push(3);
                x.put(buf);
            }
        }
    }

    fn get(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
        Ok(match r.u8()? {
            0 => RequestOp::Range(RangeRequest::get(r)?),
            1 => RequestOp::Put(PutRequest::get(r)?),
            2 => RequestOp::DeleteRange(DeleteRangeRequest::get(r)?),
            3 => RequestOp::Txn(TxnRequest::get(r)?),
            _ => {
                return Err(DecodeError::Invalid {
                    what: "request op",
                    offset: r.pos - 1,
                })
            }
        })
    }
}

impl Wire for LeaseCheckpoint {
    fn put(&self, buf: &mut Vec<u8>) {
        put_ivarint(buf, self.id);
        put_ivarint(buf, self.remaining_ttl);
    }

    fn get(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
        Ok(LeaseCheckpoint {
            id: r.ivarint()?,
            remaining_ttl: r.ivarint()?,
        })
    }
}

impl Wire for Op {
    fn put(&self, buf: &mut Vec<u8>) {
        match self {
            Op::Noop => buf.push(0),
            Op::Put(x) => {
                buf.push(1);
                x.put(buf);
            }
            Op::DeleteRange(x) => {
                buf.push(2);
                x.put(buf);
            }
            Op::Txn(x) => {
                buf.push(3);
                x.put(buf);
            }
            Op::Compact(x) => {
                buf.push(4);
                put_ivarint(buf, x.revision);
            }
            Op::LeaseGrant(x) => {
                buf.push(5);
                put_ivarint(buf, x.id);
                put_ivarint(buf, x.ttl);
            }
            Op::LeaseRevoke(x) => {
                buf.push(6);
                put_ivarint(buf, x.id);
            }
            Op::LeaseCheckpoint(x) => {
                buf.push(7);
                put_vec(buf, &x.checkpoints);
            }
        }
    }

    fn get(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
        Ok(match r.u8()? {
            0 => Op::Noop,
            1 => Op::Put(PutRequest::get(r)?),
            2 => Op::DeleteRange(DeleteRangeRequest::get(r)?),
            3 => Op::Txn(TxnRequest::get(r)?),
            4 => Op::Compact(CompactRequest {
                revision: r.ivarint()?,
            }),
            5 => Op::LeaseGrant(LeaseGrantRequest {
                id: r.ivarint()?,
                ttl: r.ivarint()?,
            }),
            6 => Op::LeaseRevoke(LeaseRevokeRequest { id: r.ivarint()? }),
            7 => Op::LeaseCheckpoint(LeaseCheckpointRequest {
                checkpoints: get_vec(r)?,
            }),
            _ => {
                return Err(DecodeError::Invalid {
                    what: "op",
                    offset: r.pos - 1,
                })
            }
        })
    }
}

impl Command {
    /// The Raft log payload for this command.
    pub fn encode(&self) -> Bytes {
        let mut buf = Vec::new();
        self.encode_to(&mut buf);
        Bytes::from(buf)
    }

    pub fn encode_to(&self, buf: &mut Vec<u8>) {
        buf.push(COMMAND_FORMAT_VERSION);
        match self.request_id {
            None => buf.push(0),
            Some(id) => {
                buf.push(1);
                put_uvarint(buf, id.proposer);
                put_uvarint(buf, id.seq);
            }
        }
        self.op.put(buf);
    }

    /// Reads back what [`Command::encode`] wrote. Any other input, including trailing bytes, is an
    /// error, never a panic.
    pub fn decode(data: &[u8]) -> Result<Command, DecodeError> {
        let mut r = Reader::new(data);
        let version = r.u8()?;
        if version != COMMAND_FORMAT_VERSION {
            return Err(DecodeError::UnsupportedVersion(u32::from(version)));
        }
        let request_id = match get_flags(&mut r, 1)? {
            0 => None,
            _ => Some(RequestId {
                proposer: r.uvarint()?,
                seq: r.uvarint()?,
            }),
        };
        let op = Op::get(&mut r)?;
        r.finish()?;
        Ok(Command { request_id, op })
    }
}

// Responses and errors have a binary form only because the dedup table, which a snapshot carries,
// remembers them.

impl Wire for RangeResponse {
    fn put(&self, buf: &mut Vec<u8>) {
        put_ivarint(buf, self.revision);
        put_vec(buf, &self.kvs);
        put_bool(buf, self.more);
        put_ivarint(buf, self.count);
    }

    fn get(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
        Ok(RangeResponse {
            revision: r.ivarint()?,
            kvs: get_vec(r)?,
            more: r.bool()?,
            count: r.ivarint()?,
        })
    }
}

impl Wire for PutResponse {
    fn put(&self, buf: &mut Vec<u8>) {
        put_ivarint(buf, self.revision);
        self.prev_kv.put(buf);
    }

    fn get(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
        Ok(PutResponse {
            revision: r.ivarint()?,
            prev_kv: Option::get(r)?,
        })
    }
}

impl Wire for DeleteRangeResponse {
    fn put(&self, buf: &mut Vec<u8>) {
        put_ivarint(buf, self.revision);
        put_ivarint(buf, self.deleted);
        put_vec(buf, &self.prev_kvs);
    }

    fn get(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
        Ok(DeleteRangeResponse {
            revision: r.ivarint()?,
            deleted: r.ivarint()?,
            prev_kvs: get_vec(r)?,
        })
    }
}

impl Wire for TxnResponse {
    fn put(&self, buf: &mut Vec<u8>) {
        put_ivarint(buf, self.revision);
        put_bool(buf, self.succeeded);
        put_vec(buf, &self.responses);
    }

    fn get(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
        r.enter_txn()?;
        let resp = TxnResponse {
            revision: r.ivarint()?,
            succeeded: r.bool()?,
            responses: get_vec(r)?,
        };
        r.leave_txn();
        Ok(resp)
    }
}

impl Wire for ResponseOp {
    fn put(&self, buf: &mut Vec<u8>) {
        match self {
            ResponseOp::Range(x) => {
                buf.push(0);
                x.put(buf);
            }
            ResponseOp::Put(x) => {
                buf.push(1);
                x.put(buf);
            }
            ResponseOp::DeleteRange(x) => {
                buf.push(2);
                x.put(buf);
            }
            ResponseOp::Txn(x) => {
                buf.push(3);
                x.put(buf);
            }
        }
    }

    fn get(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
        Ok(match r.u8()? {
            0 => ResponseOp::Range(RangeResponse::get(r)?),
            1 => ResponseOp::Put(PutResponse::get(r)?),
            2 => ResponseOp::DeleteRange(DeleteRangeResponse::get(r)?),
            3 => ResponseOp::Txn(TxnResponse::get(r)?),
            _ => {
                return Err(DecodeError::Invalid {
                    what: "response op",
                    offset: r.pos - 1,
                })
            }
        })
    }
}

impl Wire for Response {
    fn put(&self, buf: &mut Vec<u8>) {
        match self {
            Response::Noop => buf.push(0),
            Response::Put(x) => {
                buf.push(1);
                x.put(buf);
            }
            Response::DeleteRange(x) => {
                buf.push(2);
                x.put(buf);
            }
            Response::Txn(x) => {
                buf.push(3);
                x.put(buf);
            }
            Response::Compact(x) => {
                buf.push(4);
                put_ivarint(buf, x.revision);
            }
            Response::LeaseGrant(x) => {
                buf.push(5);
                put_ivarint(buf, x.revision);
                put_ivarint(buf, x.id);
                put_ivarint(buf, x.ttl);
            }
            Response::LeaseRevoke(x) => {
                buf.push(6);
                put_ivarint(buf, x.revision);
            }
            Response::LeaseCheckpoint(x) => {
                buf.push(7);
                put_ivarint(buf, x.revision);
            }
        }
    }

    fn get(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
        Ok(match r.u8()? {
            0 => Response::Noop,
            1 => Response::Put(PutResponse::get(r)?),
            2 => Response::DeleteRange(DeleteRangeResponse::get(r)?),
            3 => Response::Txn(TxnResponse::get(r)?),
            4 => Response::Compact(CompactResponse {
                revision: r.ivarint()?,
            }),
            5 => Response::LeaseGrant(LeaseGrantResponse {
                revision: r.ivarint()?,
                id: r.ivarint()?,
                ttl: r.ivarint()?,
            }),
            6 => Response::LeaseRevoke(LeaseRevokeResponse {
                revision: r.ivarint()?,
            }),
            7 => Response::LeaseCheckpoint(LeaseCheckpointResponse {
                revision: r.ivarint()?,
            }),
            _ => {
                return Err(DecodeError::Invalid {
                    what: "response",
                    offset: r.pos - 1,
                })
            }
        })
    }
}

impl Wire for Error {
    fn put(&self, buf: &mut Vec<u8>) {
        match self {
            Error::EmptyKey => buf.push(1),
            Error::KeyNotFound => buf.push(2),
            Error::ValueProvided => buf.push(3),
            Error::LeaseProvided => buf.push(4),
            Error::DuplicateKey => buf.push(5),
            Error::TooManyOps => buf.push(6),
            Error::Compacted => buf.push(7),
            Error::FutureRevision => buf.push(8),
            Error::LeaseNotFound => buf.push(9),
            Error::LeaseExists => buf.push(10),
            Error::LeaseTtlTooLarge => buf.push(11),
            Error::TxnTooDeep => buf.push(12),
            Error::StaleRequest { proposer, seq } => {
                buf.push(13);
                put_uvarint(buf, *proposer);
                put_uvarint(buf, *seq);
            }
            Error::TxnNotReadOnly => buf.push(14),
        }
    }

    fn get(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
        Ok(match r.u8()? {
            1 => Error::EmptyKey,
            2 => Error::KeyNotFound,
            3 => Error::ValueProvided,
            4 => Error::LeaseProvided,
            5 => Error::DuplicateKey,
            6 => Error::TooManyOps,
            7 => Error::Compacted,
            8 => Error::FutureRevision,
            9 => Error::LeaseNotFound,
            10 => Error::LeaseExists,
            11 => Error::LeaseTtlTooLarge,
            12 => Error::TxnTooDeep,
            13 => Error::StaleRequest {
                proposer: r.uvarint()?,
                seq: r.uvarint()?,
            },
            14 => Error::TxnNotReadOnly,
            _ => {
                return Err(DecodeError::Invalid {
                    what: "error code",
                    offset: r.pos - 1,
                })
            }
        })
    }
}

impl Wire for Result<Response, Error> {
    fn put(&self, buf: &mut Vec<u8>) {
        match self {
            Ok(resp) => {
                buf.push(0);
                resp.put(buf);
            }
            Err(e) => {
                buf.push(1);
                e.put(buf);
            }
        }
    }

    fn get(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
        Ok(if r.bool()? {
            Err(Error::get(r)?)
        } else {
            Ok(Response::get(r)?)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn varint_roundtrip(v: u64) -> usize {
        let mut buf = Vec::new();
        put_uvarint(&mut buf, v);
        let mut r = Reader::new(&buf);
        assert_eq!(r.uvarint().unwrap(), v);
        r.finish().unwrap();
        buf.len()
    }

    #[test]
    fn varint_edges() {
        assert_eq!(varint_roundtrip(0), 1);
        assert_eq!(varint_roundtrip(127), 1);
        assert_eq!(varint_roundtrip(128), 2);
        assert_eq!(varint_roundtrip(u64::MAX), 10);
        for v in [0i64, -1, 1, i64::MIN, i64::MAX, -64, 64] {
            let mut buf = Vec::new();
            put_ivarint(&mut buf, v);
            assert_eq!(Reader::new(&buf).ivarint().unwrap(), v);
        }
        // Small negative numbers stay small: that is what zigzag is for.
        let mut buf = Vec::new();
        put_ivarint(&mut buf, -1);
        assert_eq!(buf, [1]);
    }

    #[test]
    fn varint_refuses_overflow_and_truncation() {
        let eleven = [0xffu8; 11];
        assert!(matches!(
            Reader::new(&eleven).uvarint(),
            Err(DecodeError::Invalid { what: "varint", .. })
        ));
        let mut ten = [0xffu8; 10];
        ten[9] = 0x02;
        assert!(matches!(
            Reader::new(&ten).uvarint(),
            Err(DecodeError::Invalid { what: "varint", .. })
        ));
        assert_eq!(
            Reader::new(&[0x80]).uvarint(),
            Err(DecodeError::Truncated(1))
        );
    }

    #[test]
    fn count_larger_than_input_is_refused_before_allocating() {
        let mut buf = Vec::new();
        put_uvarint(&mut buf, u64::MAX);
        assert!(matches!(
            Reader::new(&buf).count(),
            Err(DecodeError::Invalid { what: "count", .. })
        ));
        let mut buf = Vec::new();
        put_uvarint(&mut buf, 3);
        buf.extend_from_slice(&[0, 0]);
        assert!(Reader::new(&buf).count().is_err());
    }

    #[test]
    fn unknown_flag_bits_are_refused() {
        let mut buf = Vec::new();
        PutRequest {
            key: Bytes::from_static(b"k"),
            ..Default::default()
        }
        .put(&mut buf);
        *buf.last_mut().unwrap() = 0b1000;
        assert!(matches!(
            PutRequest::get(&mut Reader::new(&buf)),
            Err(DecodeError::Invalid { what: "flags", .. })
        ));
    }

    #[test]
    fn nesting_beyond_the_limit_is_refused() {
        fn nested(depth: usize) -> TxnRequest {
            let mut t = TxnRequest::default();
            for _ in 1..depth {
                t = TxnRequest {
                    success: vec![RequestOp::Txn(t)],
                    ..Default::default()
                };
            }
            t
        }
        let ok = Command::new(Op::Txn(nested(MAX_TXN_DEPTH))).encode();
        assert!(Command::decode(&ok).is_ok());
        let deep = Command::new(Op::Txn(nested(MAX_TXN_DEPTH + 1))).encode();
        assert!(matches!(
            Command::decode(&deep),
            Err(DecodeError::Invalid {
                what: "txn nesting depth",
                ..
            })
        ));
    }
}
