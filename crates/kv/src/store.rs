//! The MVCC store. Every key keeps its history — one version per write, a tombstone per
//! delete — ordered by revision, so a read at any revision since the last compaction is a
//! binary search. Writes only ever append to a history, which makes a failed transaction
//! cheap to undo. Everything is an ordered map or a `Vec`: the same log applied anywhere
//! gives the same state and the same answers.
//!
//! The key index is a persistent B-tree (`imbl::OrdMap`): cloning the store shares every
//! node, and later writes copy only the path they change. A snapshot therefore freezes the
//! store in O(1) on the raft loop and serializes the frozen copy on another thread.

use crate::error::{Error, Result};
use crate::lease::{Lease, LeaseId, LeaseResponse};
use crate::session::Remembered;
use crate::types::*;
use bytes::Bytes;
use imbl::{OrdMap, Vector};
use std::ops::Bound;

/// etcd's default `--max-txn-ops`.
pub const MAX_TXN_OPS: usize = 128;

/// One write of a key: the value it got at `rev`, or `None` if it was deleted then.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Version {
    pub(crate) rev: Revision,
    pub(crate) kv: Option<KeyValue>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Store {
    /// Invariant: each history is non-empty, its revisions strictly increase, and at most
    /// its first version is at or below `compact_revision` (and that one is live).
    pub(crate) keys: OrdMap<Bytes, Vec<Version>>,
    pub(crate) revision: Revision,
    pub(crate) compact_revision: Revision,
    /// Bytes of keys and values across all retained versions, kept up to date as versions
    /// come and go (a restored store recounts, so equality checks the bookkeeping).
    pub(crate) size: u64,
    /// The keys each revision wrote, in the order it wrote them (etcd's sub-revisions): the
    /// index watchers catch up from, so replaying revisions costs what they wrote, not a
    /// scan of the keyspace. Invariant: element `i` is revision `first_indexed() + i`, and
    /// every revision from there to `revision` is held (each one wrote at least one key);
    /// every key listed has its version of that revision in `keys`. A persistent vector:
    /// it clones in O(1) with the rest of the store.
    pub(crate) by_rev: Vector<Vec<Bytes>>,
    /// Every lease, by id (see `lease.rs`). Invariant: a lease's keys are exactly the keys
    /// whose live version names it.
    pub(crate) leases: OrdMap<LeaseId, Lease>,
    /// Per session (a lease), its last command (see `session.rs`). Invariant: every
    /// session's lease exists.
    pub(crate) sessions: OrdMap<LeaseId, Remembered>,
}

/// A new store is at revision 1, as etcd's is (its first write is revision 2): revision 1
/// wrote nothing. Clients and tools that treat revision 0 as "none" or "any" (Kubernetes'
/// resource version 0, say) never see it as a real revision.
impl Default for Store {
    fn default() -> Store {
        Store {
            keys: OrdMap::new(),
            revision: 1,
            compact_revision: 0,
            size: 0,
            by_rev: Vector::unit(Vec::new()),
            leases: OrdMap::new(),
            sessions: OrdMap::new(),
        }
    }
}

/// What one version of a key costs in [`Store::size_bytes`].
pub(crate) fn cost(key: &[u8], v: &Version) -> u64 {
    (key.len() + v.kv.as_ref().map_or(0, |kv| kv.value.len())) as u64
}

/// A request applied through the log.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Request {
    Range(RangeRequest),
    Put(PutRequest),
    DeleteRange(DeleteRangeRequest),
    Txn(TxnRequest),
    Compact(Revision),
    /// Create a lease with this id and TTL (seconds).
    LeaseGrant {
        id: LeaseId,
        ttl: i64,
    },
    /// End a lease, deleting its keys: asked by a client, or decided by the leader when the
    /// lease expired.
    LeaseRevoke(LeaseId),
    /// The leader's record of leases' remaining TTLs (seconds).
    LeaseCheckpoint(Vec<(LeaseId, i64)>),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Response {
    Range(RangeResponse),
    Put(PutResponse),
    DeleteRange(DeleteRangeResponse),
    Txn(TxnResponse),
    Compact,
    Lease(LeaseResponse),
}

/// The state of one transaction being applied.
struct Txn {
    /// The revision its writes get.
    rev: Revision,
    wrote: bool,
    /// Keys that got a new version, newest last, to undo on failure.
    undo: Vec<Bytes>,
}

impl Txn {
    /// Reads inside a transaction see its own writes.
    fn read_rev(&self) -> Revision {
        if self.wrote {
            self.rev
        } else {
            self.rev - 1
        }
    }
}

fn at(history: &[Version], rev: Revision) -> Option<&KeyValue> {
    let i = history.partition_point(|v| v.rev <= rev);
    history.get(i.checked_sub(1)?)?.kv.as_ref()
}

impl Store {
    pub fn new() -> Store {
        Store::default()
    }

    /// The current revision: that of the latest write.
    pub fn revision(&self) -> Revision {
        self.revision
    }

    pub fn compact_revision(&self) -> Revision {
        self.compact_revision
    }

    /// The oldest revision whose writes [`Store::by_rev`] holds: the compact revision (or 1).
    pub(crate) fn first_indexed(&self) -> Revision {
        self.compact_revision.max(1)
    }

    /// Bytes of keys and values held, across all retained versions (what etcd reports as
    /// its database size, roughly).
    pub fn size_bytes(&self) -> u64 {
        self.size
    }

    /// Apply one request. Reads change nothing; a failed request changes nothing.
    pub fn apply(&mut self, req: &Request) -> Result<Response> {
        match req {
            Request::Range(r) => self.range(r, self.revision).map(Response::Range),
            Request::Compact(rev) => self.compact(*rev).map(|_| Response::Compact),
            Request::Put(p) => {
                let txn = single(RequestOp::Put(p.clone()));
                self.txn(&txn).map(|mut t| match t.responses.pop() {
                    Some(ResponseOp::Put(p)) => Response::Put(p),
                    _ => unreachable!("a put answers with a put"),
                })
            }
            Request::DeleteRange(d) => {
                let txn = single(RequestOp::DeleteRange(d.clone()));
                self.txn(&txn).map(|mut t| match t.responses.pop() {
                    Some(ResponseOp::DeleteRange(d)) => Response::DeleteRange(d),
                    _ => unreachable!("a delete answers with a delete"),
                })
            }
            Request::Txn(t) => self.txn(t).map(Response::Txn),
            Request::LeaseGrant { id, ttl } => self.grant(*id, *ttl).map(Response::Lease),
            Request::LeaseRevoke(id) => self.revoke(*id).map(Response::Lease),
            Request::LeaseCheckpoint(c) => Ok(Response::Lease(self.checkpoint(c))),
        }
    }

    /// Range over keys, at the current revision or a past one.
    pub fn range(&self, req: &RangeRequest, current: Revision) -> Result<RangeResponse> {
        let rev = if req.revision <= 0 {
            current
        } else {
            req.revision
        };
        if rev > current {
            return Err(Error::FutureRevision);
        }
        if rev < self.compact_revision {
            return Err(Error::Compacted);
        }
        // etcd's order of work, which its answers show: the keys live at `rev` are counted
        // (before any filter), and the first `limit + 1` of them in key order are taken —
        // all of them when the answer is to be sorted or filtered; the revision filters
        // prune those; a sort on another target than the key is ascending unless told
        // otherwise (so with order NONE it sorts only the keys taken); then the limit cuts.
        let filtered = req.min_mod_revision != 0
            || req.max_mod_revision != 0
            || req.min_create_revision != 0
            || req.max_create_revision != 0;
        let fetch = if req.limit <= 0 || req.sort_order != SortOrder::None || filtered {
            usize::MAX
        } else {
            req.limit as usize + 1
        };
        let mut count = 0;
        let mut kvs: Vec<KeyValue> = Vec::new();
        for kv in self.histories(&req.range).filter_map(|(_, h)| at(h, rev)) {
            count += 1;
            if !req.count_only && kvs.len() < fetch {
                kvs.push(kv.clone());
            }
        }
        kvs.retain(|kv| passes_filters(req, kv));
        let order = match (req.sort_order, req.sort_target) {
            (SortOrder::None, SortTarget::Key) => SortOrder::None,
            (SortOrder::None, _) => SortOrder::Ascend,
            (o, _) => o,
        };
        sort(&mut kvs, order, req.sort_target);
        let more = req.limit > 0 && kvs.len() > req.limit as usize;
        if more {
            kvs.truncate(req.limit as usize);
        }
        if req.keys_only {
            for kv in &mut kvs {
                kv.value = Bytes::new();
            }
        }
        Ok(RangeResponse { kvs, more, count })
    }

    fn histories<'a>(
        &'a self,
        range: &KeyRange,
    ) -> Box<dyn Iterator<Item = (&'a Bytes, &'a Vec<Version>)> + 'a> {
        if range.range_end.is_empty() {
            return Box::new(self.keys.get_key_value(&range.key).into_iter());
        }
        let start = Bound::Included(range.key.clone());
        if &range.range_end[..] == b"\0" {
            return Box::new(self.keys.range((start, Bound::Unbounded)));
        }
        if range.key >= range.range_end {
            return Box::new(std::iter::empty());
        }
        Box::new(
            self.keys
                .range((start, Bound::Excluded(range.range_end.clone()))),
        )
    }

    /// Run a transaction atomically: if any operation fails, nothing it did remains.
    pub fn txn(&mut self, req: &TxnRequest) -> Result<TxnResponse> {
        check_txn(req)?;
        self.run_unchecked(req)
    }

    /// A transaction already checked (or made by the store itself).
    pub(crate) fn run_unchecked(&mut self, req: &TxnRequest) -> Result<TxnResponse> {
        let mut txn = Txn {
            rev: self.revision + 1,
            wrote: false,
            undo: Vec::new(),
        };
        // etcd decides every branch first, nested transactions' too, on the state before the
        // transaction; then it runs the operations on that path.
        let mut path = Vec::new();
        self.choose(req, txn.read_rev(), &mut path);
        let mut path = path.into_iter();
        match self.run_txn(req, &mut txn, &mut path) {
            Ok(resp) => {
                if txn.wrote {
                    self.revision = txn.rev;
                    self.reattach(&txn.undo, txn.rev);
                    // The undo list is exactly the keys written, in order.
                    self.by_rev.push_back(txn.undo);
                    debug_assert_eq!(
                        self.first_indexed() + self.by_rev.len() as Revision - 1,
                        self.revision
                    );
                }
                Ok(resp)
            }
            Err(e) => {
                self.undo(txn.undo);
                Err(e)
            }
        }
    }

    /// The branch each transaction on the path takes (this one's, then its nested ones' in
    /// order), every compare read at `rev`.
    fn choose(&self, req: &TxnRequest, rev: Revision, path: &mut Vec<bool>) {
        let succeeded = req.compare.iter().all(|c| self.compare(c, rev));
        path.push(succeeded);
        let ops = if succeeded {
            &req.success
        } else {
            &req.failure
        };
        for op in ops {
            if let RequestOp::Txn(t) = op {
                self.choose(t, rev, path);
            }
        }
    }

    fn run_txn(
        &mut self,
        req: &TxnRequest,
        txn: &mut Txn,
        path: &mut impl Iterator<Item = bool>,
    ) -> Result<TxnResponse> {
        let succeeded = path.next().expect("a branch chosen for every transaction");
        let ops = if succeeded {
            &req.success
        } else {
            &req.failure
        };
        let mut responses = Vec::with_capacity(ops.len());
        let mut revisions = Vec::with_capacity(ops.len());
        for op in ops {
            responses.push(match op {
                RequestOp::Range(r) => ResponseOp::Range(self.range(r, txn.read_rev())?),
                RequestOp::Put(p) => ResponseOp::Put(self.put(p, txn)?),
                RequestOp::DeleteRange(d) => ResponseOp::DeleteRange(self.delete(d, txn)),
                RequestOp::Txn(t) => ResponseOp::Txn(self.run_txn(t, txn, path)?),
            });
            revisions.push(match op {
                RequestOp::Txn(_) => 0,
                _ => txn.read_rev(),
            });
        }
        Ok(TxnResponse {
            succeeded,
            responses,
            revisions,
        })
    }

    fn put(&mut self, req: &PutRequest, txn: &mut Txn) -> Result<PutResponse> {
        if req.key.is_empty() {
            return Err(Error::EmptyKey);
        }
        let prev = self
            .keys
            .get(&req.key)
            .and_then(|h| h.last())
            .and_then(|v| v.kv.clone());
        if (req.ignore_value || req.ignore_lease) && prev.is_none() {
            return Err(Error::KeyNotFound);
        }
        self.check_lease(req.lease)?;
        let p = prev.as_ref();
        let kv = KeyValue {
            key: req.key.clone(),
            create_revision: p.map_or(txn.rev, |p| p.create_revision),
            mod_revision: txn.rev,
            version: p.map_or(1, |p| p.version + 1),
            value: match p {
                Some(p) if req.ignore_value => p.value.clone(),
                _ => req.value.clone(),
            },
            lease: match p {
                Some(p) if req.ignore_lease => p.lease,
                _ => req.lease,
            },
        };
        self.push(req.key.clone(), Some(kv), txn);
        Ok(PutResponse {
            prev_kv: if req.prev_kv { prev } else { None },
        })
    }

    fn delete(&mut self, req: &DeleteRangeRequest, txn: &mut Txn) -> DeleteRangeResponse {
        let live: Vec<KeyValue> = self
            .histories(&req.range)
            .filter_map(|(_, h)| h.last().and_then(|v| v.kv.clone()))
            .collect();
        for kv in &live {
            self.push(kv.key.clone(), None, txn);
        }
        DeleteRangeResponse {
            deleted: live.len() as i64,
            prev_kvs: if req.prev_kv { live } else { Vec::new() },
        }
    }

    fn push(&mut self, key: Bytes, kv: Option<KeyValue>, txn: &mut Txn) {
        let history = self.keys.entry(key.clone()).or_default();
        // `check_txn` guarantees one write per key per transaction.
        debug_assert!(history.last().is_none_or(|v| v.rev < txn.rev));
        let version = Version { rev: txn.rev, kv };
        self.size += cost(&key, &version);
        history.push(version);
        txn.undo.push(key);
        txn.wrote = true;
    }

    fn undo(&mut self, keys: Vec<Bytes>) {
        for key in keys.into_iter().rev() {
            let history = self.keys.get_mut(&key).expect("undo of a written key");
            if let Some(v) = history.pop() {
                self.size -= cost(&key, &v);
            }
            if history.is_empty() {
                self.keys.remove(&key);
            }
        }
    }

    /// Does every key in the compare's range satisfy it? A missing key has version,
    /// create and mod revision 0 and lease 0, and no value (a value compare fails).
    fn compare(&self, c: &Compare, rev: Revision) -> bool {
        let kvs: Vec<Option<&KeyValue>> = if c.range.range_end.is_empty() {
            vec![self.keys.get(&c.range.key).and_then(|h| at(h, rev))]
        } else {
            self.histories(&c.range)
                .filter_map(|(_, h)| at(h, rev))
                .map(Some)
                .collect()
        };
        // A range that holds no key compares as one missing key (etcd's empty key-value).
        if kvs.is_empty() {
            return compare_one(c, None);
        }
        kvs.iter().all(|kv| compare_one(c, *kv))
    }

    /// Every value the store holds, in every retained version.
    pub fn values(&self) -> impl Iterator<Item = &Bytes> + '_ {
        self.keys
            .values()
            .flat_map(|h| h.iter().filter_map(|v| v.kv.as_ref().map(|kv| &kv.value)))
    }

    /// Move values to other memory without changing them: every value for which `wants`
    /// says yes is replaced by what `copy` makes of it, which must hold the same bytes (the
    /// store's contents, answers and hash do not change). Only the histories that hold such
    /// a value are touched, so a frozen clone shares the rest. Looks at `max_keys` keys at
    /// most, those after `after` (from the first if `None`), so a large store is done in
    /// steps; returns the bytes moved and, if keys may remain, the last key looked at (the
    /// next step's `after`).
    pub fn rehome_values(
        &mut self,
        after: Option<&Bytes>,
        max_keys: usize,
        wants: impl Fn(&Bytes) -> bool,
        mut copy: impl FnMut(&Bytes) -> Bytes,
    ) -> (u64, Option<Bytes>) {
        let holds = |h: &Vec<Version>| {
            h.iter()
                .any(|v| v.kv.as_ref().is_some_and(|kv| wants(&kv.value)))
        };
        let start = after.map_or(Bound::Unbounded, |k| Bound::Excluded(k.clone()));
        let (mut last, mut next, mut seen): (Option<&Bytes>, _, _) = (None, None, 0);
        let mut keys: Vec<Bytes> = Vec::new();
        for (k, h) in self.keys.range((start, Bound::Unbounded)) {
            if seen == max_keys.max(1) {
                next = last.cloned();
                break;
            }
            seen += 1;
            if holds(h) {
                keys.push(k.clone());
            }
            last = Some(k);
        }
        let mut moved = 0;
        for key in keys {
            let history = self.keys.get_mut(&key).expect("a key just listed");
            for kv in history.iter_mut().filter_map(|v| v.kv.as_mut()) {
                if wants(&kv.value) {
                    let new = copy(&kv.value);
                    // Lengths only: comparing the bytes would read (and map in) every one.
                    debug_assert_eq!(new.len(), kv.value.len());
                    moved += new.len() as u64;
                    kv.value = new;
                }
            }
        }
        (moved, next)
    }

    /// Forget history before `rev`: reads below it fail from now on.
    pub fn compact(&mut self, rev: Revision) -> Result<()> {
        if rev <= self.compact_revision {
            return Err(Error::Compacted);
        }
        if rev > self.revision {
            return Err(Error::FutureRevision);
        }
        let mut freed = 0;
        // Collect the changes first and touch only the keys that lose versions: a shared
        // (snapshotted) index is then copied along those paths alone.
        let mut changed = Vec::new();
        for (key, history) in self.keys.iter() {
            // Keep the version in force at `rev` (unless it is a tombstone) and later ones.
            let mut keep_from = history.partition_point(|v| v.rev <= rev).saturating_sub(1);
            if history[keep_from].rev <= rev && history[keep_from].kv.is_none() {
                keep_from += 1;
            }
            if keep_from == 0 {
                continue;
            }
            freed += history[..keep_from]
                .iter()
                .map(|v| cost(key, v))
                .sum::<u64>();
            changed.push((key.clone(), history[keep_from..].to_vec()));
        }
        for (key, history) in changed {
            if history.is_empty() {
                self.keys.remove(&key);
            } else {
                self.keys.insert(key, history);
            }
        }
        self.size -= freed;
        let old_first = self.first_indexed();
        self.compact_revision = rev;
        self.compact_index(old_first, rev);
        Ok(())
    }

    /// Drop from the revision index the revisions below `rev`, and at `rev` itself the keys
    /// whose version compaction removed (a delete at `rev` leaves no tombstone).
    fn compact_index(&mut self, old_first: Revision, rev: Revision) {
        self.by_rev = self.by_rev.skip((rev - old_first) as usize);
        let keys = &self.keys;
        if let Some(written) = self.by_rev.front_mut() {
            written.retain(|k| {
                keys.get(k)
                    .is_some_and(|h| h.first().is_some_and(|v| v.rev == rev))
            });
        }
    }
}

fn single(op: RequestOp) -> TxnRequest {
    TxnRequest {
        compare: Vec::new(),
        success: vec![op],
        failure: Vec::new(),
    }
}

fn compare_one(c: &Compare, kv: Option<&KeyValue>) -> bool {
    use std::cmp::Ordering;
    let ord: Ordering = match (&c.target, kv) {
        (CompareTarget::Value(_), None) => return false,
        (CompareTarget::Value(v), Some(kv)) => kv.value[..].cmp(&v[..]),
        (CompareTarget::Version(v), kv) => kv.map_or(0, |k| k.version).cmp(v),
        (CompareTarget::Create(v), kv) => kv.map_or(0, |k| k.create_revision).cmp(v),
        (CompareTarget::Mod(v), kv) => kv.map_or(0, |k| k.mod_revision).cmp(v),
        (CompareTarget::Lease(v), kv) => kv.map_or(0, |k| k.lease).cmp(v),
    };
    match c.result {
        CompareResult::Equal => ord == Ordering::Equal,
        CompareResult::NotEqual => ord != Ordering::Equal,
        CompareResult::Greater => ord == Ordering::Greater,
        CompareResult::Less => ord == Ordering::Less,
    }
}

fn passes_filters(req: &RangeRequest, kv: &KeyValue) -> bool {
    (req.min_mod_revision == 0 || kv.mod_revision >= req.min_mod_revision)
        && (req.max_mod_revision == 0 || kv.mod_revision <= req.max_mod_revision)
        && (req.min_create_revision == 0 || kv.create_revision >= req.min_create_revision)
        && (req.max_create_revision == 0 || kv.create_revision <= req.max_create_revision)
}

fn sort(kvs: &mut [KeyValue], order: SortOrder, target: SortTarget) {
    // Keys come out ascending already; anything else is sorted (ascending by default).
    if order == SortOrder::None && target == SortTarget::Key {
        return;
    }
    kvs.sort_by(|a, b| {
        let o = match target {
            SortTarget::Key => a.key.cmp(&b.key),
            SortTarget::Version => a.version.cmp(&b.version),
            SortTarget::Create => a.create_revision.cmp(&b.create_revision),
            SortTarget::Mod => a.mod_revision.cmp(&b.mod_revision),
            SortTarget::Value => a.value.cmp(&b.value),
        };
        if order == SortOrder::Descend {
            o.reverse()
        } else {
            o
        }
    });
}

/// etcd's checks before a transaction runs: bounded size, and no key written twice (two
/// puts, or a put inside a deleted range) on any path through it, nested transactions
/// included.
fn check_txn(req: &TxnRequest) -> Result<()> {
    if req.compare.len() > MAX_TXN_OPS {
        return Err(Error::TooManyOps);
    }
    for branch in [&req.success, &req.failure] {
        check_branch(branch, &mut Vec::new(), &mut Vec::new())?;
    }
    Ok(())
}

fn check_branch<'a>(
    ops: &'a [RequestOp],
    puts: &mut Vec<&'a Bytes>,
    deletes: &mut Vec<&'a KeyRange>,
) -> Result<()> {
    if ops.len() > MAX_TXN_OPS {
        return Err(Error::TooManyOps);
    }
    let conflicts = |key: &Bytes, puts: &[&Bytes], deletes: &[&KeyRange]| {
        puts.contains(&key) || deletes.iter().any(|r| r.contains(key))
    };
    for op in ops {
        match op {
            RequestOp::Put(p) => {
                if conflicts(&p.key, puts, deletes) {
                    return Err(Error::DuplicateKey);
                }
                puts.push(&p.key);
            }
            RequestOp::DeleteRange(d) => {
                if puts.iter().any(|k| d.range.contains(k)) {
                    return Err(Error::DuplicateKey);
                }
                deletes.push(&d.range);
            }
            RequestOp::Txn(t) => {
                if t.compare.len() > MAX_TXN_OPS {
                    return Err(Error::TooManyOps);
                }
                // Either nested branch may run after what came before; what follows must
                // not clash with either.
                let (mut p1, mut d1) = (puts.clone(), deletes.clone());
                check_branch(&t.success, &mut p1, &mut d1)?;
                let (mut p2, mut d2) = (puts.clone(), deletes.clone());
                check_branch(&t.failure, &mut p2, &mut d2)?;
                for k in p1.into_iter().chain(p2) {
                    if !puts.contains(&k) {
                        puts.push(k);
                    }
                }
                deletes.extend(d1.into_iter().chain(d2));
            }
            RequestOp::Range(_) => {}
        }
    }
    Ok(())
}
