//! The simulated members' state machine: the real kv store, driven by a compact command
//! encoding of the simulator's own (the server's is protobuf; this one is a tag and a few
//! words, so that a command is cheap to build and to decode in a hot loop).
//!
//! Besides the single-key operations of the checked history there are the lease requests
//! (grant, revoke, checkpoint), puts of keys attached to a lease, and puts in a session
//! (exactly once per sequence number). Like the server's machine, this one collects the
//! lease grants and revokes it applied for the member's lease clock, and it checks what a
//! revoke did to the store: every attached key deleted, all at one revision.

use crate::linearizability::Output;
use bytes::Bytes;
use driver::{RequestId, StateMachine};
use kv::{LeaseId, LeaseResponse, Revision, Session};
use raft::{Entry, EntryKind, Snapshot};

/// A command: the simulator's stand-in for an etcd request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Op {
    Put(u64, u64),
    Delete(u64),
    Cas(u64, Option<u64>, u64),
    /// A put of a key attached to a lease (keys outside the checked history's).
    PutLeased(u64, u64, LeaseId),
    /// A lease with this id and TTL (seconds).
    Grant(LeaseId, i64),
    Revoke(LeaseId),
    /// Leases' remaining TTLs (seconds), as the leader's lessor records them.
    Checkpoint(Vec<(LeaseId, i64)>),
    /// A put run once per sequence number of its session.
    InSession(Session, u64, u64),
}

impl Op {
    /// A tag and the words after it.
    fn words(&self) -> (u8, Vec<u64>) {
        match self {
            Op::Put(k, v) => (0, vec![*k, *v]),
            Op::Delete(k) => (1, vec![*k]),
            Op::Cas(k, None, new) => (2, vec![*k, *new]),
            Op::Cas(k, Some(old), new) => (3, vec![*k, *old, *new]),
            Op::PutLeased(k, v, lease) => (4, vec![*k, *v, *lease as u64]),
            Op::Grant(lease, ttl) => (5, vec![*lease as u64, *ttl as u64]),
            Op::Revoke(lease) => (6, vec![*lease as u64]),
            Op::Checkpoint(c) => (
                7,
                c.iter()
                    .flat_map(|(id, left)| [*id as u64, *left as u64])
                    .collect(),
            ),
            Op::InSession(s, k, v) => (8, vec![s.lease as u64, s.seq, *k, *v]),
        }
    }

    fn from_words(tag: u8, w: &[u64]) -> Option<Op> {
        Some(match (tag, w) {
            (0, &[k, v]) => Op::Put(k, v),
            (1, &[k]) => Op::Delete(k),
            (2, &[k, new]) => Op::Cas(k, None, new),
            (3, &[k, old, new]) => Op::Cas(k, Some(old), new),
            (4, &[k, v, lease]) => Op::PutLeased(k, v, lease as i64),
            (5, &[lease, ttl]) => Op::Grant(lease as i64, ttl as i64),
            (6, &[lease]) => Op::Revoke(lease as i64),
            (7, pairs) if pairs.len() % 2 == 0 => Op::Checkpoint(
                pairs
                    .chunks(2)
                    .map(|p| (p[0] as i64, p[1] as i64))
                    .collect(),
            ),
            (8, &[lease, seq, k, v]) => Op::InSession(
                Session {
                    lease: lease as i64,
                    seq,
                },
                k,
                v,
            ),
            _ => return None,
        })
    }
}

/// The request id (three words), the tag, then the op's words.
pub fn encode(id: RequestId, op: &Op) -> Bytes {
    let (tag, words) = op.words();
    let mut v = Vec::with_capacity(25 + 8 * words.len());
    for x in [id.member, id.boot, id.seq] {
        v.extend_from_slice(&x.to_le_bytes());
    }
    v.push(tag);
    for x in words {
        v.extend_from_slice(&x.to_le_bytes());
    }
    v.into()
}

pub fn decode(data: &[u8]) -> Option<(RequestId, Op)> {
    if data.len() < 25 || (data.len() - 25) % 8 != 0 {
        return None;
    }
    let word = |i: usize| u64::from_le_bytes(data[i..i + 8].try_into().unwrap());
    let id = RequestId {
        member: word(0),
        boot: word(8),
        seq: word(16),
    };
    let words: Vec<u64> = (25..data.len()).step_by(8).map(word).collect();
    Some((id, Op::from_words(data[24], &words)?))
}

pub fn key(k: u64) -> kv::KeyRange {
    kv::KeyRange {
        key: Bytes::copy_from_slice(&k.to_be_bytes()),
        range_end: Bytes::new(),
    }
}

pub fn value(v: u64) -> Bytes {
    Bytes::copy_from_slice(&v.to_le_bytes())
}

/// The inverse of [`value`].
pub fn number(b: &[u8]) -> Option<u64> {
    Some(u64::from_le_bytes(b.get(..8)?.try_into().ok()?))
}

fn put(k: u64, v: u64, lease: LeaseId) -> kv::PutRequest {
    kv::PutRequest {
        key: key(k).key,
        value: value(v),
        lease,
        ..Default::default()
    }
}

/// What a command returned on the member that applied it (the same on every member).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Applied {
    /// A single-key operation of the checked history.
    Kv(Output),
    /// A put attached to a lease: refused once the lease is gone.
    Leased(Result<(), kv::Error>),
    Lease(Result<LeaseResponse, kv::Error>),
    /// A put in a session: the revision right after its first run (a retry gets the same),
    /// or why it was refused.
    Session(Result<Revision, kv::Error>),
}

/// The kv store as the simulated members' state machine.
#[derive(Default, Debug)]
pub struct SimKv {
    pub store: kv::Store,
    /// Requests applied since the simulator last looked, with what they returned.
    pub applied: Vec<(RequestId, Applied)>,
    /// Lease grants and revokes applied since the member's lease clock last took them (as
    /// the server's machine collects them).
    pub lease_changes: Vec<LeaseResponse>,
    /// What a revoke did that it must not have (see [`check_revoke`]).
    pub broken: Vec<String>,
}

impl SimKv {
    fn run(&mut self, op: Op) -> Result<Applied, String> {
        let s = &mut self.store;
        let answer = match op {
            Op::Put(k, v) => {
                s.apply(&kv::Request::Put(put(k, v, 0)))
                    .map_err(|e| e.to_string())?;
                Applied::Kv(Output::Ok)
            }
            Op::Delete(k) => {
                let del = kv::DeleteRangeRequest {
                    range: key(k),
                    prev_kv: false,
                };
                s.apply(&kv::Request::DeleteRange(del))
                    .map_err(|e| e.to_string())?;
                Applied::Kv(Output::Ok)
            }
            Op::Cas(k, expect, new) => match s.apply(&cas(k, expect, new)) {
                Ok(kv::Response::Txn(t)) => Applied::Kv(Output::Cas(t.succeeded)),
                other => return Err(format!("a compare-and-swap answered {other:?}")),
            },
            Op::PutLeased(k, v, lease) => {
                let r = s.apply(&kv::Request::Put(put(k, v, lease)));
                Applied::Leased(r.map(|_| ()))
            }
            Op::Grant(id, ttl) => self.lease(&kv::Request::LeaseGrant { id, ttl }),
            Op::Revoke(id) => self.revoke(id),
            Op::Checkpoint(c) => self.lease(&kv::Request::LeaseCheckpoint(c)),
            Op::InSession(session, k, v) => {
                let r = s.apply_in_session(session, &kv::Request::Put(put(k, v, 0)));
                Applied::Session(r.and_then(|m| m.result.map(|_| m.revision)))
            }
        };
        Ok(answer)
    }

    /// A lease request; grants and revokes are news for the lease clock.
    fn lease(&mut self, req: &kv::Request) -> Applied {
        let r = match self.store.apply(req) {
            Ok(kv::Response::Lease(l)) => Ok(l),
            Ok(other) => unreachable!("a lease request answered {other:?}"),
            Err(e) => Err(e),
        };
        if let Ok(change) = &r {
            if !matches!(change, LeaseResponse::Checkpointed) {
                self.lease_changes.push(change.clone());
            }
        }
        Applied::Lease(r)
    }

    fn revoke(&mut self, id: LeaseId) -> Applied {
        let attached: Vec<Bytes> = self
            .store
            .lease(id)
            .map(|l| l.keys.iter().cloned().collect())
            .unwrap_or_default();
        let before = self.store.revision();
        let answer = self.lease(&kv::Request::LeaseRevoke(id));
        if let Applied::Lease(Ok(LeaseResponse::Revoked { deleted, .. })) = &answer {
            if let Err(why) = check_revoke(&self.store, id, &attached, before, *deleted) {
                self.broken.push(why);
            }
        }
        answer
    }
}

fn cas(k: u64, expect: Option<u64>, new: u64) -> kv::Request {
    kv::Request::Txn(kv::TxnRequest {
        compare: vec![kv::Compare {
            range: key(k),
            result: kv::CompareResult::Equal,
            target: match expect {
                None => kv::CompareTarget::Create(0),
                Some(old) => kv::CompareTarget::Value(value(old)),
            },
        }],
        success: vec![kv::RequestOp::Put(put(k, new, 0))],
        failure: vec![],
    })
}

/// A revoke of lease `id`, which had `attached` keys at revision `before`, said it deleted
/// `deleted`: it must have deleted exactly those keys, all at revision `before + 1` (one
/// revision, so a watcher sees them go together), or — without keys — written nothing.
pub fn check_revoke(
    store: &kv::Store,
    id: LeaseId,
    attached: &[Bytes],
    before: Revision,
    deleted: i64,
) -> Result<(), String> {
    let expect_rev = before + i64::from(!attached.is_empty());
    if deleted != attached.len() as i64 || store.revision() != expect_rev {
        return Err(format!(
            "the revoke of lease {id} (with {} keys at revision {before}) said it deleted \
             {deleted} keys and left the store at revision {}; expected {expect_rev}",
            attached.len(),
            store.revision()
        ));
    }
    if attached.is_empty() {
        return Ok(());
    }
    let events = store.events_at(expect_rev, None);
    let mut gone: Vec<&Bytes> = events
        .iter()
        .filter(|e| e.kind == kv::EventKind::Delete)
        .map(|e| &e.kv.key)
        .collect();
    gone.sort();
    let want: Vec<&Bytes> = attached.iter().collect();
    if events.len() != attached.len() || gone != want {
        return Err(format!(
            "the revoke of lease {id} deleted {} of its {} keys at revision {expect_rev} \
             ({} events there)",
            gone.len(),
            attached.len(),
            events.len()
        ));
    }
    Ok(())
}

impl StateMachine for SimKv {
    type Output = Applied;
    type Query = u64;
    type Answer = Option<u64>;
    type Frozen = kv::Store;

    fn apply(&mut self, e: &Entry) -> Result<Option<(RequestId, Applied)>, String> {
        if e.kind == EntryKind::Noop {
            return Ok(None);
        }
        let (id, op) = decode(&e.data).ok_or("undecodable command")?;
        let out = self.run(op)?;
        self.applied.push((id, out.clone()));
        Ok(Some((id, out)))
    }

    fn query(&self, k: &u64) -> Option<u64> {
        let req = kv::RangeRequest {
            range: key(*k),
            ..Default::default()
        };
        let resp = self.store.range(&req, self.store.revision()).ok()?;
        number(&resp.kvs.first()?.value)
    }

    fn freeze(&self) -> kv::Store {
        self.store.clone()
    }

    fn restore(&mut self, s: &Snapshot) -> Result<(), String> {
        self.store = kv::Store::restore(&s.data).map_err(|e| e.to_string())?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_command_decodes_to_itself() {
        let id = RequestId {
            member: 3,
            boot: u64::MAX,
            seq: 9,
        };
        let ops = [
            Op::Put(1, 2),
            Op::Delete(7),
            Op::Cas(1, None, 4),
            Op::Cas(1, Some(3), 4),
            Op::PutLeased(1 << 40, 5, 12),
            Op::Grant(12, 3),
            Op::Revoke(12),
            Op::Checkpoint(vec![]),
            Op::Checkpoint(vec![(12, 2), (13, 0)]),
            Op::InSession(Session { lease: 12, seq: 4 }, 99, 4),
        ];
        for op in ops {
            let bytes = encode(id, &op);
            assert_eq!(decode(&bytes), Some((id, op.clone())), "{op:?}");
            // A command cut inside a word is refused.
            for n in (0..bytes.len()).filter(|n| *n < 25 || (n - 25) % 8 != 0) {
                assert_eq!(decode(&bytes[..n]), None, "{op:?} cut to {n} bytes");
            }
        }
    }
}
