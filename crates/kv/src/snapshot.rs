//! The store as bytes, for raft snapshots. Layout (little endian):
//!
//! ```text
//! magic "RKVKV004" | revision i64 | compact_revision i64 | key count u64 |
//!   per key: key len u32 | key | version count u32 |
//!     per version: rev i64 | sub u32 | live u8 | if live: create i64 | version i64 |
//!                                                    lease i64 | value len u32 | value
//! lease count u64 | per lease: id i64 | ttl i64 | remaining i64
//! session count u64 | per session: lease i64 | seq u64 | revision i64 |
//!                                  has digest u8 | digest u32 | result
//! ```
//!
//! `sub` is the version's place among the writes of its revision (etcd's sub-revision),
//! from which the revision index that watchers replay is rebuilt. A lease's keys are not
//! stored: they are the live keys naming it. A session's result is what a retry of its last
//! command is answered (see `session.rs` and `encode_result`): no key-values.
//!
//! Older versions still restore: version 3 ("RKVKV003") kept whole answers (key-values
//! included) and no digest — they are stripped to a retry's answer as they are read, and
//! the digest is unknown; version 2 ("RKVKV002") had no leases or sessions; version 1
//! ("RKVKV001") had no `sub` either, and its writes of one revision replay in key order.
//!
//! A snapshot is produced in chunks ([`Store::snapshot_chunks`]) from a frozen copy of the
//! store, so a backup streams in memory bounded by a chunk, whatever the store's size;
//! [`Store::snapshot_len`] says its length up front (a backup's header carries it).
//!
//! Integrity is the snapshot file's job (it carries a CRC); decoding still checks every
//! length and invariant, and never panics on bad bytes.

use crate::error::{Error, Result};
use crate::lease::{Lease, LeaseId};
use crate::session::{retry_answer, Remembered};
use crate::store::{cost, Response, Store, Version};
use crate::types::*;
use bytes::{Buf, BufMut, Bytes, BytesMut};
use imbl::{OrdSet, Vector};
use std::ops::Bound;

const MAGIC: &[u8; 8] = b"RKVKV004";
const MAGIC_V3: &[u8; 8] = b"RKVKV003";
const MAGIC_V2: &[u8; 8] = b"RKVKV002";
const MAGIC_V1: &[u8; 8] = b"RKVKV001";
/// Deepest nesting of transactions a remembered answer may have (the server's own limit on
/// a request's nesting bounds it far below this).
const MAX_DEPTH: usize = 64;

/// A snapshot being produced, chunk by chunk, from a frozen copy of the store (cloning a
/// store is O(1): it shares every node with the original). Each chunk holds at least the
/// target's bytes (but the last), and at most the target plus one key's history (or one
/// lease, or one session): what it holds beyond the store itself is one chunk.
pub struct SnapshotChunks {
    store: Store,
    target: usize,
    stage: Stage,
}

/// Where the next chunk starts: after the item named (`None`: at the first).
enum Stage {
    Head,
    Keys(Option<Bytes>),
    Leases(Option<LeaseId>),
    Sessions(Option<LeaseId>),
    Done,
}

impl Iterator for SnapshotChunks {
    type Item = Bytes;

    fn next(&mut self) -> Option<Bytes> {
        let target = self.target.max(1);
        let mut b = BytesMut::with_capacity(target.min(1 << 20));
        let s = &self.store;
        while b.len() < target {
            self.stage = match std::mem::replace(&mut self.stage, Stage::Done) {
                Stage::Head => {
                    b.put_slice(MAGIC);
                    b.put_i64_le(s.revision);
                    b.put_i64_le(s.compact_revision);
                    b.put_u64_le(s.keys.len() as u64);
                    Stage::Keys(None)
                }
                Stage::Keys(after) => {
                    let keys: Box<dyn Iterator<Item = (&Bytes, &Vec<Version>)>> = match after {
                        None => Box::new(s.keys.iter()),
                        Some(k) => Box::new(s.keys.range((Bound::Excluded(k), Bound::Unbounded))),
                    };
                    let mut last = None;
                    for (key, history) in keys {
                        s.encode_key(&mut b, key, history);
                        if b.len() >= target {
                            last = Some(key.clone());
                            break;
                        }
                    }
                    match last {
                        Some(k) => Stage::Keys(Some(k)),
                        None => {
                            b.put_u64_le(s.leases.len() as u64);
                            Stage::Leases(None)
                        }
                    }
                }
                Stage::Leases(after) => {
                    let from = after.map_or(Bound::Unbounded, Bound::Excluded);
                    let mut last = None;
                    for (id, l) in s.leases.range((from, Bound::Unbounded)) {
                        b.put_i64_le(l.id);
                        b.put_i64_le(l.ttl);
                        b.put_i64_le(l.remaining);
                        if b.len() >= target {
                            last = Some(*id);
                            break;
                        }
                    }
                    match last {
                        Some(id) => Stage::Leases(Some(id)),
                        None => {
                            b.put_u64_le(s.sessions.len() as u64);
                            Stage::Sessions(None)
                        }
                    }
                }
                Stage::Sessions(after) => {
                    let from = after.map_or(Bound::Unbounded, Bound::Excluded);
                    let mut last = None;
                    for (lease, m) in s.sessions.range((from, Bound::Unbounded)) {
                        b.put_i64_le(*lease);
                        b.put_u64_le(m.seq);
                        b.put_i64_le(m.revision);
                        b.put_u8(m.digest.is_some() as u8);
                        b.put_u32_le(m.digest.unwrap_or(0));
                        encode_result(&mut b, &m.result);
                        if b.len() >= target {
                            last = Some(*lease);
                            break;
                        }
                    }
                    match last {
                        Some(lease) => Stage::Sessions(Some(lease)),
                        None => Stage::Done,
                    }
                }
                Stage::Done => break,
            };
        }
        (!b.is_empty()).then(|| b.freeze())
    }
}

impl Store {
    /// The whole snapshot in one buffer (what a raft snapshot stores).
    pub fn snapshot(&self) -> Bytes {
        // With no target, the first chunk is the whole snapshot.
        let mut chunks = self.clone().snapshot_chunks(usize::MAX);
        chunks.next().unwrap_or_default()
    }

    /// The snapshot of this store (a frozen copy: later writes to the original do not show)
    /// in chunks of about `target` bytes; their concatenation is [`Store::snapshot`].
    pub fn snapshot_chunks(self, target: usize) -> SnapshotChunks {
        SnapshotChunks {
            store: self,
            target,
            stage: Stage::Head,
        }
    }

    /// The length of [`Store::snapshot`], computed without producing it.
    pub fn snapshot_len(&self) -> u64 {
        let mut n = 8 + 8 + 8 + 8;
        for (key, history) in &self.keys {
            n += 4 + key.len() as u64 + 4;
            for v in history {
                n += 8 + 4 + 1;
                if let Some(kv) = &v.kv {
                    n += 8 + 8 + 8 + 4 + kv.value.len() as u64;
                }
            }
        }
        n += 8 + 24 * self.leases.len() as u64;
        // A session's cost is exactly its bytes here.
        n += 8 + self.sessions.values().map(|m| m.cost()).sum::<u64>();
        n
    }

    fn encode_key(&self, b: &mut BytesMut, key: &Bytes, history: &[Version]) {
        b.put_u32_le(key.len() as u32);
        b.put_slice(key);
        b.put_u32_le(history.len() as u32);
        for v in history {
            b.put_i64_le(v.rev);
            b.put_u32_le(self.sub_of(key, v.rev));
            match &v.kv {
                None => b.put_u8(0),
                Some(kv) => {
                    b.put_u8(1);
                    b.put_i64_le(kv.create_revision);
                    b.put_i64_le(kv.version);
                    b.put_i64_le(kv.lease);
                    b.put_u32_le(kv.value.len() as u32);
                    b.put_slice(&kv.value);
                }
            }
        }
    }

    /// Rebuild a store from [`Store::snapshot`]'s bytes.
    pub fn restore(data: &Bytes) -> Result<Store> {
        let mut r = Reader(data.clone());
        let version = match r.take(8)? {
            m if m == MAGIC[..] => 4,
            m if m == MAGIC_V3[..] => 3,
            m if m == MAGIC_V2[..] => 2,
            m if m == MAGIC_V1[..] => 1,
            _ => return Err(Error::BadSnapshot("not a kv snapshot")),
        };
        let v1 = version == 1;
        let mut store = Store {
            revision: r.i64()?,
            compact_revision: r.i64()?,
            ..Store::default()
        };
        if store.compact_revision < 0 || store.compact_revision > store.revision {
            return Err(Error::BadSnapshot("compact revision out of range"));
        }
        let keys = r.u64()?;
        let mut prev_key: Option<Bytes> = None;
        // (revision, sub-revision, key) of every indexed version.
        let mut writes: Vec<(Revision, u32, Bytes)> = Vec::new();
        let first = store.first_indexed();
        for _ in 0..keys {
            let len = r.u32()? as usize;
            let key = r.take(len)?;
            if prev_key.as_ref().is_some_and(|p| *p >= key) || key.is_empty() {
                return Err(Error::BadSnapshot("keys out of order"));
            }
            let n = r.u32()? as usize;
            let mut history: Vec<Version> = Vec::with_capacity(n.min(1024));
            for _ in 0..n {
                let rev = r.i64()?;
                if history.last().is_some_and(|v| v.rev >= rev) || rev > store.revision {
                    return Err(Error::BadSnapshot("revisions out of order"));
                }
                let sub = if v1 { 0 } else { r.u32()? };
                if rev >= first {
                    writes.push((rev, sub, key.clone()));
                }
                let kv = match r.u8()? {
                    0 => None,
                    1 => Some(KeyValue {
                        key: key.clone(),
                        create_revision: r.i64()?,
                        mod_revision: rev,
                        version: r.i64()?,
                        lease: r.i64()?,
                        value: {
                            let len = r.u32()? as usize;
                            r.take(len)?
                        },
                    }),
                    _ => return Err(Error::BadSnapshot("bad version tag")),
                };
                history.push(Version { rev, kv });
            }
            if history.is_empty() {
                return Err(Error::BadSnapshot("key without history"));
            }
            store.size += history.iter().map(|v| cost(&key, v)).sum::<u64>();
            store.keys.insert(key.clone(), history);
            prev_key = Some(key);
        }
        if version >= 3 {
            restore_leases(&mut r, &mut store, version)?;
        }
        if r.0.has_remaining() {
            return Err(Error::BadSnapshot("trailing bytes"));
        }
        store.by_rev = index(writes, first, store.revision)?;
        store.rebuild_attachments()?;
        Ok(store)
    }

    /// The values a snapshot in this build's format holds, as slices of `data`, in the
    /// order [`Store::values`] gives those of the store it was taken from: what lets a
    /// member point its values into the snapshot file it just wrote, instead of the heap.
    /// Read as they are asked for, so a caller can release what it has read as it goes.
    pub fn snapshot_values(data: &Bytes) -> Result<SnapshotValues> {
        let mut r = Reader(data.clone());
        if r.take(8)? != MAGIC[..] {
            return Err(Error::BadSnapshot("not a current kv snapshot"));
        }
        r.take(16)?; // revision, compact revision
        let keys = r.u64()?;
        Ok(SnapshotValues {
            r,
            len: data.len(),
            keys,
            versions: 0,
        })
    }

    /// A version's place among its revision's writes (0 if the index no longer holds it).
    fn sub_of(&self, key: &Bytes, rev: Revision) -> u32 {
        let first = self.first_indexed();
        if rev < first {
            return 0;
        }
        self.by_rev
            .get((rev - first) as usize)
            .and_then(|w| w.iter().position(|k| k == key))
            .map_or(0, |p| p as u32)
    }
}

/// The values of a snapshot, read one at a time (see [`Store::snapshot_values`]). Each
/// item is a value, or the error that ends the walk.
pub struct SnapshotValues {
    r: Reader,
    /// The whole snapshot's length.
    len: usize,
    /// Keys not yet started.
    keys: u64,
    /// Versions left in the current key's history.
    versions: u32,
}

impl SnapshotValues {
    /// How far into the snapshot the walk has read.
    pub fn read(&self) -> usize {
        self.len - self.r.0.len()
    }

    fn next_value(&mut self) -> Result<Option<Bytes>> {
        loop {
            while self.versions == 0 {
                if self.keys == 0 {
                    return Ok(None);
                }
                self.keys -= 1;
                let len = self.r.u32()? as usize;
                self.r.take(len)?;
                self.versions = self.r.u32()?;
            }
            self.versions -= 1;
            self.r.take(8 + 4)?; // revision, sub-revision
            if self.r.bool()? {
                self.r.take(8 + 8 + 8)?; // create revision, version, lease
                let len = self.r.u32()? as usize;
                return self.r.take(len).map(Some);
            }
        }
    }
}

impl Iterator for SnapshotValues {
    type Item = Result<Bytes>;

    fn next(&mut self) -> Option<Result<Bytes>> {
        match self.next_value() {
            Ok(v) => v.map(Ok),
            Err(e) => {
                self.keys = 0;
                self.versions = 0;
                Some(Err(e))
            }
        }
    }
}

/// The revision index from each indexed version's (revision, sub-revision, key): every
/// revision from `first` to `last` must have written something, except `first` itself,
/// whose writes compaction may have removed.
fn index(
    mut writes: Vec<(Revision, u32, Bytes)>,
    first: Revision,
    last: Revision,
) -> Result<Vector<Vec<Bytes>>> {
    // Keys come in order, so equal sub-revisions (a version 1 snapshot) stay in key order.
    writes.sort_by_key(|w| (w.0, w.1));
    let mut by_rev: Vector<Vec<Bytes>> = Vector::new();
    let mut writes = writes.into_iter().peekable();
    for rev in first..=last {
        let mut written = Vec::new();
        while let Some((_, sub, key)) = writes.next_if(|w| w.0 == rev) {
            if sub as usize != written.len() && sub != 0 {
                return Err(Error::BadSnapshot("sub-revisions out of order"));
            }
            written.push(key);
        }
        if written.is_empty() && rev != first {
            return Err(Error::BadSnapshot("a revision without writes"));
        }
        by_rev.push_back(written);
    }
    Ok(by_rev)
}

fn restore_leases(r: &mut Reader, store: &mut Store, version: u8) -> Result<()> {
    let n = r.u64()?;
    for _ in 0..n {
        let (id, ttl, remaining) = (r.i64()?, r.i64()?, r.i64()?);
        if id == 0 || store.leases.get_max().is_some_and(|(last, _)| *last >= id) {
            return Err(Error::BadSnapshot("leases out of order"));
        }
        let keys = OrdSet::new();
        store.leases.insert(
            id,
            Lease {
                id,
                ttl,
                remaining,
                keys,
            },
        );
    }
    let n = r.u64()?;
    for _ in 0..n {
        let lease = r.i64()?;
        if !store.leases.contains_key(&lease) || store.sessions.contains_key(&lease) {
            return Err(Error::BadSnapshot("a session without its lease"));
        }
        let (seq, revision) = (r.u64()?, r.i64()?);
        let (digest, result) = if version >= 4 {
            let has = r.bool()?;
            let d = r.u32()?;
            let result = decode_result(r, false)?;
            // Written stripped; `retry_answer` is the identity on it, which `cost` assumes.
            if retry_answer(&result) != result {
                return Err(Error::BadSnapshot("a remembered answer with key-values"));
            }
            (has.then_some(d), result)
        } else {
            // Version 3 kept whole answers: keep what a retry needs, as a version 4 does.
            (None, retry_answer(&decode_result(r, true)?))
        };
        store.remember(
            lease,
            Remembered {
                seq,
                result,
                revision,
                digest,
            },
        );
    }
    Ok(())
}

// ---- remembered answers -------------------------------------------------------------------
//
// result:   0 | response    or    1 | error code u8 (| last u64 for a stale sequence)
// response: 1 range | 2 put | 3 delete | 4 txn (only writes run in a session)
// range:    more u8 | count i64
// put:      (nothing)
// delete:   deleted i64
// txn:      succeeded u8 | op count u32 | per op: revision i64 | response
//
// Version 3 also had the key-values (see `decode_op`):
// range:    more u8 | count i64 | kv count u32 | kvs
// put:      has prev u8 | prev kv
// delete:   deleted i64 | kv count u32 | kvs
// kv:       key len u32 | key | create i64 | mod i64 | version i64 | lease i64 |
//           value len u32 | value
//
// `session::result_len` is the length of this encoding.

fn encode_result(b: &mut BytesMut, r: &Result<Response>) {
    match r {
        Ok(resp) => {
            b.put_u8(0);
            encode_response(b, resp);
        }
        Err(e) => {
            b.put_u8(1);
            let (code, last) = error_code(e);
            b.put_u8(code);
            if let Some(last) = last {
                b.put_u64_le(last);
            }
        }
    }
}

fn error_code(e: &Error) -> (u8, Option<u64>) {
    match e {
        Error::Compacted => (1, None),
        Error::FutureRevision => (2, None),
        Error::KeyNotFound => (3, None),
        Error::DuplicateKey => (4, None),
        Error::TooManyOps => (5, None),
        Error::EmptyKey => (6, None),
        Error::LeaseNotFound => (7, None),
        Error::LeaseExists => (8, None),
        Error::LeaseTtlTooLarge => (9, None),
        Error::StaleSequence { last } => (10, Some(*last)),
        Error::BadSequence => (11, None),
        Error::NotInSession => (12, None),
        // Never an answer to a command.
        Error::BadSnapshot(_) | Error::SessionMismatch { .. } => (0, None),
    }
}

fn decode_error(r: &mut Reader) -> Result<Error> {
    Ok(match r.u8()? {
        1 => Error::Compacted,
        2 => Error::FutureRevision,
        3 => Error::KeyNotFound,
        4 => Error::DuplicateKey,
        5 => Error::TooManyOps,
        6 => Error::EmptyKey,
        7 => Error::LeaseNotFound,
        8 => Error::LeaseExists,
        9 => Error::LeaseTtlTooLarge,
        10 => Error::StaleSequence { last: r.u64()? },
        11 => Error::BadSequence,
        12 => Error::NotInSession,
        _ => return Err(Error::BadSnapshot("bad error code")),
    })
}

/// A remembered result; `v3`: in version 3's encoding, with key-values.
fn decode_result(r: &mut Reader, v3: bool) -> Result<Result<Response>> {
    Ok(match r.u8()? {
        0 => Ok(match decode_op(r, 0, v3)? {
            ResponseOp::Range(x) => Response::Range(x),
            ResponseOp::Put(x) => Response::Put(x),
            ResponseOp::DeleteRange(x) => Response::DeleteRange(x),
            ResponseOp::Txn(x) => Response::Txn(x),
        }),
        1 => Err(decode_error(r)?),
        _ => return Err(Error::BadSnapshot("bad result tag")),
    })
}

fn encode_response(b: &mut BytesMut, r: &Response) {
    match r {
        Response::Range(x) => encode_range(b, x),
        Response::Put(_) => b.put_u8(2),
        Response::DeleteRange(x) => {
            b.put_u8(3);
            b.put_i64_le(x.deleted);
        }
        Response::Txn(x) => encode_txn(b, x),
        // Not run in a session (see `Store::apply_in_session`).
        Response::Compact | Response::Lease(_) => b.put_u8(0),
    }
}

fn encode_txn(b: &mut BytesMut, t: &TxnResponse) {
    b.put_u8(4);
    b.put_u8(t.succeeded as u8);
    b.put_u32_le(t.responses.len() as u32);
    for (op, rev) in t.responses.iter().zip(&t.revisions) {
        b.put_i64_le(*rev);
        encode_op(b, op);
    }
}

fn encode_range(b: &mut BytesMut, x: &RangeResponse) {
    b.put_u8(1);
    b.put_u8(x.more as u8);
    b.put_i64_le(x.count);
}

/// Only what a retry is answered is written (the memory holds nothing else).
fn encode_op(b: &mut BytesMut, op: &ResponseOp) {
    match op {
        ResponseOp::Range(x) => encode_range(b, x),
        ResponseOp::Put(_) => b.put_u8(2),
        ResponseOp::DeleteRange(x) => {
            b.put_u8(3);
            b.put_i64_le(x.deleted);
        }
        ResponseOp::Txn(t) => encode_txn(b, t),
    }
}

fn decode_op(r: &mut Reader, depth: usize, v3: bool) -> Result<ResponseOp> {
    if depth > MAX_DEPTH {
        return Err(Error::BadSnapshot("answers nested too deep"));
    }
    let kvs = |r: &mut Reader| if v3 { decode_kvs(r) } else { Ok(Vec::new()) };
    Ok(match r.u8()? {
        1 => ResponseOp::Range(RangeResponse {
            more: r.bool()?,
            count: r.i64()?,
            kvs: kvs(r)?,
        }),
        2 => ResponseOp::Put(PutResponse {
            prev_kv: if v3 && r.bool()? {
                Some(decode_kv(r)?)
            } else {
                None
            },
        }),
        3 => ResponseOp::DeleteRange(DeleteRangeResponse {
            deleted: r.i64()?,
            prev_kvs: kvs(r)?,
        }),
        4 => {
            let succeeded = r.bool()?;
            let n = r.u32()? as usize;
            // Each op takes at least 9 bytes: a bad count cannot make a huge allocation.
            let cap = n.min(r.0.remaining() / 9);
            let (mut responses, mut revisions) = (Vec::with_capacity(cap), Vec::with_capacity(cap));
            for _ in 0..n {
                revisions.push(r.i64()?);
                responses.push(decode_op(r, depth + 1, v3)?);
            }
            ResponseOp::Txn(TxnResponse {
                succeeded,
                responses,
                revisions,
            })
        }
        _ => return Err(Error::BadSnapshot("bad answer tag")),
    })
}

fn decode_kvs(r: &mut Reader) -> Result<Vec<KeyValue>> {
    let n = r.u32()? as usize;
    // Each key-value takes at least 44 bytes: a bad count cannot make a huge allocation.
    let mut kvs = Vec::with_capacity(n.min(r.0.remaining() / 44));
    for _ in 0..n {
        kvs.push(decode_kv(r)?);
    }
    Ok(kvs)
}

fn decode_kv(r: &mut Reader) -> Result<KeyValue> {
    let len = r.u32()? as usize;
    Ok(KeyValue {
        key: r.take(len)?,
        create_revision: r.i64()?,
        mod_revision: r.i64()?,
        version: r.i64()?,
        lease: r.i64()?,
        value: {
            let len = r.u32()? as usize;
            r.take(len)?
        },
    })
}

struct Reader(Bytes);

impl Reader {
    fn take(&mut self, n: usize) -> Result<Bytes> {
        if self.0.remaining() < n {
            return Err(Error::BadSnapshot("truncated"));
        }
        Ok(self.0.split_to(n))
    }
    fn u8(&mut self) -> Result<u8> {
        Ok(self.take(1)?[0])
    }
    fn bool(&mut self) -> Result<bool> {
        match self.u8()? {
            0 => Ok(false),
            1 => Ok(true),
            _ => Err(Error::BadSnapshot("bad flag")),
        }
    }
    fn u32(&mut self) -> Result<u32> {
        Ok(u32::from_le_bytes(self.take(4)?[..].try_into().unwrap()))
    }
    fn u64(&mut self) -> Result<u64> {
        Ok(u64::from_le_bytes(self.take(8)?[..].try_into().unwrap()))
    }
    fn i64(&mut self) -> Result<i64> {
        Ok(i64::from_le_bytes(self.take(8)?[..].try_into().unwrap()))
    }
}
