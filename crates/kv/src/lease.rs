//! Leases as replicated state: which leases exist, their granted TTL, the remaining TTL last
//! checkpointed, and the keys attached to each. What is *not* here is time: when a lease
//! expires is the leader's business alone, by its own clock (see `lessor.rs`); every member
//! learns of an expiry only as a `LeaseRevoke` entry in the log, so all of them delete the
//! same keys at the same revision.
//!
//! A key is attached to the lease of its live version. Attachments are derived when a
//! transaction commits, from the versions it wrote, so a failed transaction has nothing to
//! undo here.

use crate::error::{Error, Result};
use crate::store::Store;
use crate::types::{DeleteRangeRequest, KeyRange, RequestOp, Revision, TxnRequest};
use bytes::Bytes;
use imbl::OrdSet;

/// A lease's id; 0 is "no lease".
pub type LeaseId = i64;

/// etcd's largest TTL, in seconds ("etcdserver: too large lease TTL" above it).
pub const MAX_LEASE_TTL: i64 = 9_000_000_000;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Lease {
    pub id: LeaseId,
    /// The TTL granted, in seconds.
    pub ttl: i64,
    /// The remaining TTL the leader last checkpointed (seconds; 0: none). A new leader
    /// counts from it instead of the full TTL, so a long lease is not renewed by every
    /// leader change.
    pub remaining: i64,
    /// Keys whose live version names this lease.
    pub keys: OrdSet<Bytes>,
}

/// What a lease request answers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LeaseResponse {
    Granted {
        id: LeaseId,
        ttl: i64,
    },
    /// The lease and its keys are gone; `deleted` keys were removed at one revision.
    Revoked {
        id: LeaseId,
        deleted: i64,
    },
    Checkpointed,
}

impl Store {
    pub fn lease(&self, id: LeaseId) -> Option<&Lease> {
        self.leases.get(&id)
    }

    /// Every lease, by id.
    pub fn leases(&self) -> impl Iterator<Item = &Lease> {
        self.leases.values()
    }

    pub fn lease_count(&self) -> usize {
        self.leases.len()
    }

    /// Create a lease. The TTL is taken as given: the server applies etcd's minimum before
    /// proposing, so applying depends on nothing but the log.
    pub(crate) fn grant(&mut self, id: LeaseId, ttl: i64) -> Result<LeaseResponse> {
        if id == 0 {
            return Err(Error::LeaseNotFound);
        }
        if ttl > MAX_LEASE_TTL {
            return Err(Error::LeaseTtlTooLarge);
        }
        if self.leases.contains_key(&id) {
            return Err(Error::LeaseExists);
        }
        let lease = Lease {
            id,
            ttl,
            remaining: 0,
            keys: OrdSet::new(),
        };
        self.leases.insert(id, lease);
        Ok(LeaseResponse::Granted { id, ttl })
    }

    /// End a lease: every key attached to it is deleted, all at one revision (so a watcher
    /// sees them go together), and its session's memory is freed.
    pub(crate) fn revoke(&mut self, id: LeaseId) -> Result<LeaseResponse> {
        let lease = self.leases.get(&id).ok_or(Error::LeaseNotFound)?;
        let deletes = lease
            .keys
            .iter()
            .map(|key| {
                RequestOp::DeleteRange(DeleteRangeRequest {
                    range: KeyRange {
                        key: key.clone(),
                        range_end: Bytes::new(),
                    },
                    prev_kv: false,
                })
            })
            .collect::<Vec<_>>();
        let deleted = deletes.len() as i64;
        if !deletes.is_empty() {
            // One transaction: one revision. It bypasses the client limit on operations.
            self.run_unchecked(&TxnRequest {
                compare: Vec::new(),
                success: deletes,
                failure: Vec::new(),
            })?;
        }
        self.leases.remove(&id);
        self.forget_session(id);
        Ok(LeaseResponse::Revoked { id, deleted })
    }

    /// Record the remaining TTLs the leader reports; leases gone since are skipped.
    pub(crate) fn checkpoint(&mut self, remaining: &[(LeaseId, i64)]) -> LeaseResponse {
        for (id, left) in remaining {
            if let Some(l) = self.leases.get_mut(id) {
                l.remaining = (*left).clamp(0, l.ttl);
            }
        }
        LeaseResponse::Checkpointed
    }

    /// A put naming a lease needs the lease to exist.
    pub(crate) fn check_lease(&self, id: LeaseId) -> Result<()> {
        if id != 0 && !self.leases.contains_key(&id) {
            return Err(Error::LeaseNotFound);
        }
        Ok(())
    }

    /// After a transaction at `rev` committed: move each key it wrote from the lease of its
    /// previous live version to the lease of its new one (none for a delete).
    pub(crate) fn reattach(&mut self, written: &[Bytes], rev: Revision) {
        // No lease, no attachment to move (every lease a live key names exists): the
        // common case costs nothing per key.
        if self.leases.is_empty() {
            return;
        }
        for key in written {
            let Some(history) = self.keys.get(key) else {
                continue;
            };
            let n = history.len();
            debug_assert_eq!(history[n - 1].rev, rev);
            let new = history[n - 1].kv.as_ref().map_or(0, |kv| kv.lease);
            let old = n
                .checked_sub(2)
                .and_then(|i| history[i].kv.as_ref())
                .map_or(0, |kv| kv.lease);
            if old == new {
                continue;
            }
            if let Some(l) = self.leases.get_mut(&old) {
                l.keys.remove(key);
            }
            if let Some(l) = self.leases.get_mut(&new) {
                l.keys.insert(key.clone());
            }
        }
    }

    /// Rebuild every lease's keys from the live versions (after a restore).
    pub(crate) fn rebuild_attachments(&mut self) -> Result<()> {
        let mut attached: Vec<(LeaseId, Bytes)> = Vec::new();
        for (key, history) in self.keys.iter() {
            if let Some(kv) = history.last().and_then(|v| v.kv.as_ref()) {
                if kv.lease != 0 {
                    attached.push((kv.lease, key.clone()));
                }
            }
        }
        for (id, key) in attached {
            // A live key naming a lease that does not exist cannot come from the log.
            let l = self
                .leases
                .get_mut(&id)
                .ok_or(Error::BadSnapshot("a key attached to a missing lease"))?;
            l.keys.insert(key);
        }
        Ok(())
    }
}
