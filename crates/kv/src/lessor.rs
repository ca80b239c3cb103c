//! The leader's lease clock. Leases live in the store, the same on every member; *when* one
//! expires is decided by one member only, the leader, by its own clock, and carried out
//! through the log (a `LeaseRevoke` entry). A follower never expires anything: its lessor is
//! idle ("secondary") and answers no keep-alive.
//!
//! The rules that keep a lease that was kept alive from being revoked:
//! - **Only a leader that has applied its own term's first entry counts time.** Before that
//!   its store may lack leases granted (or renewals cleared) in entries it has not applied.
//! - **A renewal counts only once a quorum confirmed the renewing leader** after the
//!   keep-alive arrived (the owner's job: a ReadIndex round), and is dated from the
//!   arrival. A successor is elected by a quorum that includes a confirming member, so it
//!   takes office after every renewal its predecessor granted.
//! - **A new leader extends every lease** by `extend` (an election timeout, etcd's rule) on
//!   top of its full TTL — or of its checkpointed remaining TTL — before it may expire
//!   any. The extension absorbs what the previous rule cannot see: the two leaders' clocks
//!   running at different rates, and the keep-alive's answer still in flight.
//! - **Checkpoints** (etcd's): for leases with more than `checkpoint_interval` left, the
//!   leader records the remaining TTL in the log every interval, so a long lease is not
//!   reset to its full TTL by every leader change. A renewal of a lease with a recorded
//!   remaining TTL must clear it through the log before it is acknowledged
//!   ([`Renewal::Renewed::clear_checkpoint`]), or a leader change could bring back the
//!   shorter, older figure.
//!
//! Time is whatever monotonic milliseconds the caller passes: the server's clock, or the
//! simulator's drifting virtual one. Nothing here reads a clock or does I/O.

use crate::lease::{LeaseId, LeaseResponse};
use crate::store::Store;
use std::collections::{BTreeSet, HashMap, HashSet};

/// Monotonic milliseconds on the local clock.
pub type Millis = u64;

#[derive(Clone, Debug)]
pub struct LessorConfig {
    /// How much a new leader adds to every lease before it may expire one (at least the
    /// election timeout).
    pub extend: Millis,
    /// How often a long lease's remaining TTL is recorded (etcd: five minutes).
    pub checkpoint_interval: Millis,
    /// Most revokes proposed and not yet applied: expiry keeps the log's pace instead of
    /// flooding it when many leases expire at once.
    pub max_revoking: usize,
    /// When a proposed revoke has not applied after this long (its proposal was refused or
    /// lost), it is proposed again.
    pub retry: Millis,
    /// Most checkpoints in one batch.
    pub max_checkpoints: usize,
}

impl Default for LessorConfig {
    fn default() -> Self {
        LessorConfig {
            extend: 1000,
            checkpoint_interval: 5 * 60 * 1000,
            max_revoking: 1000,
            retry: 3000,
            max_checkpoints: 1000,
        }
    }
}

/// The answer to a keep-alive.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Renewal {
    /// Renewed for `ttl` seconds. If `clear_checkpoint`, the caller must commit
    /// `LeaseCheckpoint([(id, 0)])` before telling the client.
    Renewed { ttl: i64, clear_checkpoint: bool },
    /// No such lease.
    NotFound,
    /// It expired and its revoke is on its way, but has not applied: ask again. (If this
    /// member lost office without knowing it, the revoke never commits and the real leader
    /// renews; if not, the next answer is `NotFound`.)
    Expiring,
    /// This member does not count time (not the leader, or not caught up yet).
    NotLeader,
}

/// What the leader must propose.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Work {
    /// Expired leases to revoke, one `LeaseRevoke` each.
    pub revoke: Vec<LeaseId>,
    /// Remaining TTLs (seconds) to record in one `LeaseCheckpoint`.
    pub checkpoint: Vec<(LeaseId, i64)>,
}

#[derive(Debug, Default)]
pub struct Lessor {
    cfg: LessorConfig,
    primary: bool,
    /// Each lease's deadline. Invariant: `queue` holds exactly `(deadline, id)` for each.
    expiry: HashMap<LeaseId, Millis>,
    queue: BTreeSet<(Millis, LeaseId)>,
    /// Expired leases whose revoke was proposed, with when.
    revoking: HashMap<LeaseId, Millis>,
    /// When each long lease is next checkpointed. Invariant: `checkpoints` holds exactly
    /// `(at, id)` for each.
    checkpoint_at: HashMap<LeaseId, Millis>,
    checkpoints: BTreeSet<(Millis, LeaseId)>,
    /// Leases this leader proposed a checkpoint for since it last cleared one: such a
    /// checkpoint may still be on its way through the log, unseen by the store, and a
    /// renewal must clear it all the same (the clear, proposed later, applies later).
    checkpointed: HashSet<LeaseId>,
}

const SECOND: Millis = 1000;

fn ms(secs: i64) -> Millis {
    (secs.max(0) as Millis).saturating_mul(SECOND)
}

impl Lessor {
    pub fn new(cfg: LessorConfig) -> Lessor {
        Lessor {
            cfg,
            ..Lessor::default()
        }
    }

    /// Whether this member counts time for the leases.
    pub fn is_primary(&self) -> bool {
        self.primary
    }

    /// Leases this member is timing.
    pub fn timed(&self) -> usize {
        self.expiry.len()
    }

    /// Tell the lessor what a lease request applied. A secondary ignores it: it reads the
    /// whole store when it is promoted.
    pub fn changed(&mut self, change: &LeaseResponse, now: Millis) {
        if !self.primary {
            return;
        }
        match *change {
            LeaseResponse::Granted { id, ttl } => {
                self.set_deadline(id, now.saturating_add(ms(ttl)));
                self.schedule_checkpoint(id, ttl, now);
            }
            LeaseResponse::Revoked { id, .. } => self.forget(id),
            LeaseResponse::Checkpointed => {}
        }
    }

    /// Once per round of the owner's loop: promote or demote as `leading` says (leader, and
    /// its term's first entry applied), and say what expired and what to checkpoint.
    pub fn poll(&mut self, now: Millis, leading: bool, store: &Store) -> Work {
        if !leading {
            if self.primary {
                self.demote();
            }
            return Work::default();
        }
        if !self.primary {
            self.promote(now, store);
        }
        Work {
            revoke: self.expired(now),
            checkpoint: self.due_checkpoints(now, store),
        }
    }

    /// A keep-alive. Only the primary renews; the store says whether the lease exists.
    pub fn renew(&mut self, id: LeaseId, now: Millis, store: &Store) -> Renewal {
        if !self.primary {
            return Renewal::NotLeader;
        }
        let Some(lease) = store.lease(id) else {
            return Renewal::NotFound;
        };
        if self.revoking.contains_key(&id) || self.expiry.get(&id).is_some_and(|d| *d <= now) {
            return Renewal::Expiring;
        }
        // Renewals may be dated a little in the past (from their arrival): never shorten.
        let deadline = now.saturating_add(ms(lease.ttl));
        if self.expiry.get(&id).is_none_or(|d| *d < deadline) {
            self.set_deadline(id, deadline);
            self.schedule_checkpoint(id, lease.ttl, now);
        }
        let in_flight = self.checkpointed.remove(&id);
        Renewal::Renewed {
            ttl: lease.ttl,
            clear_checkpoint: lease.remaining > 0 || in_flight,
        }
    }

    /// Milliseconds left before the lease expires, on the primary (None elsewhere, or for a
    /// lease it does not time).
    pub fn remaining(&self, id: LeaseId, now: Millis) -> Option<Millis> {
        if !self.primary {
            return None;
        }
        self.expiry.get(&id).map(|d| d.saturating_sub(now))
    }

    fn promote(&mut self, now: Millis, store: &Store) {
        self.primary = true;
        let start = now.saturating_add(self.cfg.extend);
        for lease in store.leases() {
            let left = if lease.remaining > 0 {
                lease.remaining
            } else {
                lease.ttl
            };
            self.set_deadline(lease.id, start.saturating_add(ms(left)));
            self.schedule_checkpoint(lease.id, left, now);
        }
    }

    fn demote(&mut self) {
        let cfg = self.cfg.clone();
        *self = Lessor::new(cfg);
    }

    fn set_deadline(&mut self, id: LeaseId, deadline: Millis) {
        if let Some(old) = self.expiry.insert(id, deadline) {
            self.queue.remove(&(old, id));
        }
        self.queue.insert((deadline, id));
    }

    fn forget(&mut self, id: LeaseId) {
        if let Some(d) = self.expiry.remove(&id) {
            self.queue.remove(&(d, id));
        }
        if let Some(at) = self.checkpoint_at.remove(&id) {
            self.checkpoints.remove(&(at, id));
        }
        self.revoking.remove(&id);
        self.checkpointed.remove(&id);
    }

    /// Leases past their deadline whose revoke is not on its way (or was proposed long
    /// enough ago to try again), oldest deadline first, within the bound on revokes in
    /// flight.
    fn expired(&mut self, now: Millis) -> Vec<LeaseId> {
        let retry = self.cfg.retry;
        self.revoking
            .retain(|_, at| now.saturating_sub(*at) < retry);
        let room = self.cfg.max_revoking.saturating_sub(self.revoking.len());
        let mut out = Vec::new();
        for &(deadline, id) in &self.queue {
            if deadline > now || out.len() >= room {
                break;
            }
            if !self.revoking.contains_key(&id) {
                out.push(id);
            }
        }
        for id in &out {
            self.revoking.insert(*id, now);
        }
        out
    }

    /// A lease with more left than a checkpoint interval gets its remaining TTL recorded one
    /// interval from now.
    fn schedule_checkpoint(&mut self, id: LeaseId, left_secs: i64, now: Millis) {
        if let Some(at) = self.checkpoint_at.remove(&id) {
            self.checkpoints.remove(&(at, id));
        }
        if ms(left_secs) > self.cfg.checkpoint_interval {
            let at = now.saturating_add(self.cfg.checkpoint_interval);
            self.checkpoint_at.insert(id, at);
            self.checkpoints.insert((at, id));
        }
    }

    fn due_checkpoints(&mut self, now: Millis, store: &Store) -> Vec<(LeaseId, i64)> {
        let mut out = Vec::new();
        while let Some(&(at, id)) = self.checkpoints.first() {
            if at > now || out.len() >= self.cfg.max_checkpoints {
                break;
            }
            self.checkpoints.pop_first();
            self.checkpoint_at.remove(&id);
            // A lease renewed since was rescheduled; a lease gone needs nothing.
            let (Some(deadline), Some(lease)) = (self.expiry.get(&id), store.lease(id)) else {
                continue;
            };
            // Rounded up: a successor counting from it must never come short of the
            // deadline (rounded down, it could be up to a second early).
            let left = deadline.saturating_sub(now).div_ceil(SECOND) as i64;
            if left < lease.ttl {
                out.push((id, left.max(1)));
                self.checkpointed.insert(id);
            }
            self.schedule_checkpoint(id, left, now);
        }
        out
    }
}
