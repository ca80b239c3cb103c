//! Exactly-once commands (the Raft paper's client sessions). A client numbers the writes it
//! makes in a session — a lease it holds — 1, 2, 3…, one at a time. The store remembers,
//! per session, the last number it applied, a digest of that command and what a retry of
//! it is answered. When a leader crashes after committing a command and before answering,
//! the client retries with the same number wherever it can, and gets the remembered answer:
//! the command ran once.
//!
//! The memory is replicated state like the rest of the store (it is in snapshots and counts
//! in [`Store::size_bytes`], so the quota sees it), so every member answers a retry the same
//! way, and it lives exactly as long as the lease: revoking or expiring the lease frees it.
//!
//! What a retry is answered (see [`retry_answer`]): everything a write's answer says about
//! the write — the header revision of the first run, every transaction's `succeeded`, each
//! operation's revision, how many keys each delete removed, each range's `count` and `more`
//! — but no key-values: no range's `kvs`, no put's `prev_kv`, no delete's `prev_kvs`. Those
//! are reads, as large as the store; keeping them would let one small command pin any
//! amount of memory on every member for the lease's life. What the memory holds is thus
//! bounded by the shape of the command (a few bytes per operation), not by the data. The
//! first run's answer, returned to the client that sent it, is complete.

use crate::error::{Error, Result};
use crate::lease::LeaseId;
use crate::store::{Request, Response, Store};
use crate::types::*;

/// A command's place in its client's session.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Session {
    /// The lease the session lives in.
    pub lease: LeaseId,
    /// The command's number; 1 for the first, each next one greater.
    pub seq: u64,
}

/// What a session remembers of its last command.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Remembered {
    pub seq: u64,
    /// The command's answer, a refusal included: a retry is refused the same way. In the
    /// store's memory it is always [`retry_answer`]'s form; [`Store::apply_in_session`]
    /// returns the complete answer for a command's first run.
    pub result: Result<Response>,
    /// The store's revision right after the command (its answer's header revision).
    pub revision: Revision,
    /// [`digest`] of the command, so that a retry with another body is refused. `None` for
    /// memory restored from a version 3 snapshot, which did not keep it: such a retry is
    /// answered as before (this lasts only until the session's next command).
    pub digest: Option<u32>,
}

impl Remembered {
    /// What this memory costs in [`Store::size_bytes`]: the bytes it takes in a snapshot.
    pub(crate) fn cost(&self) -> u64 {
        // lease, seq, revision, digest flag and digest, then the answer.
        (8 + 8 + 8 + 1 + 4 + result_len(&self.result)) as u64
    }
}

/// The answer a retry gets: `r` without key-values (see the module's doc).
pub fn retry_answer(r: &Result<Response>) -> Result<Response> {
    match r {
        Err(e) => Err(e.clone()),
        Ok(resp) => Ok(match resp {
            Response::Range(x) => Response::Range(strip_range(x)),
            Response::Put(_) => Response::Put(PutResponse { prev_kv: None }),
            Response::DeleteRange(x) => Response::DeleteRange(DeleteRangeResponse {
                deleted: x.deleted,
                prev_kvs: Vec::new(),
            }),
            Response::Txn(t) => Response::Txn(strip_txn(t)),
            Response::Compact => Response::Compact,
            Response::Lease(l) => Response::Lease(l.clone()),
        }),
    }
}

fn strip_range(x: &RangeResponse) -> RangeResponse {
    RangeResponse {
        kvs: Vec::new(),
        more: x.more,
        count: x.count,
    }
}

fn strip_txn(t: &TxnResponse) -> TxnResponse {
    TxnResponse {
        succeeded: t.succeeded,
        responses: t
            .responses
            .iter()
            .map(|op| match op {
                ResponseOp::Range(x) => ResponseOp::Range(strip_range(x)),
                ResponseOp::Put(_) => ResponseOp::Put(PutResponse { prev_kv: None }),
                ResponseOp::DeleteRange(x) => ResponseOp::DeleteRange(DeleteRangeResponse {
                    deleted: x.deleted,
                    prev_kvs: Vec::new(),
                }),
                ResponseOp::Txn(t) => ResponseOp::Txn(strip_txn(t)),
            })
            .collect(),
        revisions: t.revisions.clone(),
    }
}

/// Bytes a stripped answer takes in a snapshot (see `snapshot.rs`, "remembered answers").
pub(crate) fn result_len(r: &Result<Response>) -> usize {
    fn op(o: &ResponseOp) -> usize {
        match o {
            ResponseOp::Range(_) => 1 + 1 + 8,
            ResponseOp::Put(_) => 1,
            ResponseOp::DeleteRange(_) => 1 + 8,
            ResponseOp::Txn(t) => txn(t),
        }
    }
    fn txn(t: &TxnResponse) -> usize {
        1 + 1 + 4 + t.responses.iter().map(|o| 8 + op(o)).sum::<usize>()
    }
    1 + match r {
        Err(Error::StaleSequence { .. }) => 1 + 8,
        Err(_) => 1,
        Ok(Response::Range(_)) => op(&ResponseOp::Range(RangeResponse::default())),
        Ok(Response::Put(_)) => 1,
        Ok(Response::DeleteRange(_)) => 1 + 8,
        Ok(Response::Txn(t)) => txn(t),
        // Not run in a session: encoded as a bare tag.
        Ok(Response::Compact | Response::Lease(_)) => 1,
    }
}

/// A digest of a command: CRC-32C of a canonical encoding of every field, in a fixed order
/// with lengths, so it is the same on every member and for every build. It catches a client
/// that reuses a number for another command (a bug on its side); it is not meant to resist
/// forgery — only the session's own client could forge one, and only against itself.
pub fn digest(req: &Request) -> u32 {
    let mut d = Digester(0);
    match req {
        Request::Put(p) => {
            d.u8(1);
            d.put(p);
        }
        Request::DeleteRange(x) => {
            d.u8(2);
            d.delete(x);
        }
        Request::Txn(t) => {
            d.u8(3);
            d.txn(t);
        }
        // Not run in a session: the kind alone.
        Request::Range(_) => d.u8(4),
        Request::Compact(_) => d.u8(5),
        Request::LeaseGrant { .. } => d.u8(6),
        Request::LeaseRevoke(_) => d.u8(7),
        Request::LeaseCheckpoint(_) => d.u8(8),
    }
    d.0
}

struct Digester(u32);

impl Digester {
    fn bytes(&mut self, b: &[u8]) {
        self.i64(b.len() as i64);
        self.0 = crc32c::crc32c_append(self.0, b);
    }
    fn i64(&mut self, n: i64) {
        self.0 = crc32c::crc32c_append(self.0, &n.to_le_bytes());
    }
    fn u8(&mut self, n: u8) {
        self.0 = crc32c::crc32c_append(self.0, &[n]);
    }
    fn range(&mut self, r: &KeyRange) {
        self.bytes(&r.key);
        self.bytes(&r.range_end);
    }
    fn put(&mut self, p: &PutRequest) {
        self.bytes(&p.key);
        self.bytes(&p.value);
        self.i64(p.lease);
        self.u8(p.prev_kv as u8 | (p.ignore_value as u8) << 1 | (p.ignore_lease as u8) << 2);
    }
    fn delete(&mut self, x: &DeleteRangeRequest) {
        self.range(&x.range);
        self.u8(x.prev_kv as u8);
    }
    fn read(&mut self, r: &RangeRequest) {
        self.range(&r.range);
        for n in [
            r.limit,
            r.revision,
            r.min_mod_revision,
            r.max_mod_revision,
            r.min_create_revision,
            r.max_create_revision,
        ] {
            self.i64(n);
        }
        self.u8(r.sort_order as u8);
        self.u8(r.sort_target as u8);
        self.u8(r.keys_only as u8 | (r.count_only as u8) << 1);
    }
    fn txn(&mut self, t: &TxnRequest) {
        self.i64(t.compare.len() as i64);
        for c in &t.compare {
            self.range(&c.range);
            self.u8(c.result as u8);
            match &c.target {
                CompareTarget::Version(n) => {
                    self.u8(1);
                    self.i64(*n);
                }
                CompareTarget::Create(n) => {
                    self.u8(2);
                    self.i64(*n);
                }
                CompareTarget::Mod(n) => {
                    self.u8(3);
                    self.i64(*n);
                }
                CompareTarget::Value(v) => {
                    self.u8(4);
                    self.bytes(v);
                }
                CompareTarget::Lease(n) => {
                    self.u8(5);
                    self.i64(*n);
                }
            }
        }
        for branch in [&t.success, &t.failure] {
            self.i64(branch.len() as i64);
            for op in branch {
                match op {
                    RequestOp::Range(r) => {
                        self.u8(1);
                        self.read(r);
                    }
                    RequestOp::Put(p) => {
                        self.u8(2);
                        self.put(p);
                    }
                    RequestOp::DeleteRange(x) => {
                        self.u8(3);
                        self.delete(x);
                    }
                    RequestOp::Txn(t) => {
                        self.u8(4);
                        self.txn(t);
                    }
                }
            }
        }
    }
}

impl Store {
    /// A retry's answer, if `s` names the command this session applied last. Refused: a
    /// session whose lease does not exist, number 0, a number older than the last applied,
    /// the last number with another command than the one applied, and requests that are
    /// not writes. `Ok(None)`: a new command, to run (see [`Store::apply_in_session`]).
    ///
    /// This reads nothing but the session's memory, so a member can answer a retry before
    /// any other check (quota, alarms): the command already ran, and a retry adds nothing.
    pub fn session_retry(&self, s: Session, req: &Request) -> Result<Option<Remembered>> {
        if !matches!(
            req,
            Request::Put(_) | Request::DeleteRange(_) | Request::Txn(_)
        ) {
            return Err(Error::NotInSession);
        }
        if s.seq == 0 {
            return Err(Error::BadSequence);
        }
        if !self.leases.contains_key(&s.lease) {
            return Err(Error::LeaseNotFound);
        }
        let Some(last) = self.sessions.get(&s.lease) else {
            return Ok(None);
        };
        if s.seq < last.seq {
            return Err(Error::StaleSequence { last: last.seq });
        }
        if s.seq > last.seq {
            return Ok(None);
        }
        if last.digest.is_some_and(|d| d != digest(req)) {
            return Err(Error::SessionMismatch { seq: last.seq });
        }
        Ok(Some(last.clone()))
    }

    /// Apply a write once per sequence number of its session. Returns the answer and the
    /// revision after the command: complete for its first run, [`retry_answer`]'s form from
    /// memory if this number was applied already. Refusals are [`Store::session_retry`]'s
    /// (and are not remembered).
    pub fn apply_in_session(&mut self, s: Session, req: &Request) -> Result<Remembered> {
        if let Some(remembered) = self.session_retry(s, req)? {
            return Ok(remembered);
        }
        let digest = Some(digest(req));
        let result = self.apply(req);
        let memory = Remembered {
            seq: s.seq,
            result: retry_answer(&result),
            revision: self.revision,
            digest,
        };
        self.remember(s.lease, memory);
        Ok(Remembered {
            seq: s.seq,
            result,
            revision: self.revision,
            digest,
        })
    }

    /// Replace a session's memory, keeping [`Store::size_bytes`] in step.
    pub(crate) fn remember(&mut self, lease: LeaseId, memory: Remembered) {
        self.size += memory.cost();
        if let Some(old) = self.sessions.insert(lease, memory) {
            self.size -= old.cost();
        }
    }

    /// Forget a session (its lease ended), keeping [`Store::size_bytes`] in step.
    pub(crate) fn forget_session(&mut self, lease: LeaseId) {
        if let Some(old) = self.sessions.remove(&lease) {
            self.size -= old.cost();
        }
    }

    /// What a session remembers (for tests and tools).
    pub fn session(&self, lease: LeaseId) -> Option<&Remembered> {
        self.sessions.get(&lease)
    }

    pub fn session_count(&self) -> usize {
        self.sessions.len()
    }
}
