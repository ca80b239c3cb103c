//! What must hold once the system has healed: every member converges on one store; the
//! history to check for linearizability, with each unanswered write placed where its entry
//! first applied; leases kept alive stay, leases left alone lapse in time everywhere; and
//! every session's numbered puts ran exactly once.

use super::System;
use crate::leases::{self, MAX_TTL};
use crate::linearizability::{Input, Operation};
use crate::machine::{key, number, Applied};
use crate::network::{Micros, MS};
use kv::LeaseId;
use std::collections::BTreeMap;

impl System {
    /// After healing: every member up, one leader, all applied to the same index, and the
    /// same store everywhere.
    pub fn check_converged(&mut self) {
        let settled = |s: &System| {
            let ids = s.ids();
            let Some(first) = s.driver(ids[0]) else {
                return false;
            };
            let (commit, applied) = (first.raft().commit_index(), first.raft().applied());
            ids.iter().all(|&id| {
                s.driver(id).is_some_and(|d| {
                    d.raft().commit_index() == commit && d.raft().applied() == applied
                })
            }) && applied == commit
                && ids
                    .iter()
                    .any(|&id| s.driver(id).unwrap().raft().is_leader())
        };
        let deadline = self.now + 20_000 * MS;
        // Proposals keep the leader's heartbeats carrying commit news to everyone.
        while !settled(self) {
            if self.now > deadline {
                self.fail("liveness: the healed system did not converge");
            }
            // A member may have stopped on a failure injected just before the heal.
            for id in self.ids() {
                if !self.is_up(id) {
                    self.restart(id);
                }
            }
            self.run_for(10 * MS);
        }
        let ids = self.ids();
        let state = |id| self.driver(id).unwrap().machine().store.snapshot();
        let reference = state(ids[0]);
        for &id in &ids[1..] {
            if state(id) != reference {
                self.fail(&format!(
                    "member {id}'s store differs from member {}'s",
                    ids[0]
                ));
            }
        }
    }

    /// The history to check. Operations refused before they were proposed are left out. A
    /// write whose client never heard back took effect by the time its entry was first
    /// applied, with the result the state machine gave it there; one that no member ever
    /// applied did not happen (call this once the system has converged, when nothing more
    /// can commit).
    pub fn checked_history(&self) -> Vec<Operation> {
        let mut out = Vec::with_capacity(self.history.len());
        for (i, o) in self.history.iter().enumerate() {
            if self.refused[i] {
                continue;
            }
            let mut o = o.clone();
            let first = self.first_applied.get(&self.history_ticket[i]);
            match (o.ret, first) {
                // Took effect no later than its first apply, however late the answer came.
                (Some(ret), Some((at, _))) => o.ret = Some(ret.min((*at).max(o.call))),
                (None, Some((at, Applied::Kv(output)))) => {
                    o.ret = Some((*at).max(o.call));
                    o.output = output.clone();
                }
                (None, None) if o.input != Input::Get => continue,
                _ => {}
            }
            out.push(o);
        }
        out
    }

    /// After convergence, the lease invariants that need a stable cluster:
    /// - for the longest TTL and a second the lease clients keep every lease they hold
    ///   alive (and grant none): none that was acknowledged meanwhile may be revoked;
    /// - then nobody keeps anything alive: every lease that exists must be revoked within
    ///   [`System::lapse_bound`] of that moment, on every member, with no key attached to a
    ///   lease left (each revoke was checked to delete its keys at one revision as it
    ///   applied);
    /// - every session's numbered puts ran at most once ([`System::check_sessions`]).
    pub fn check_leases(&mut self) {
        let since = self.now;
        self.leases.close();
        self.run_with_leases((MAX_TTL as Micros + 1) * 1_000 * MS);
        let held: Vec<LeaseId> = (0..self.leases.clients.len())
            .filter_map(|c| self.leases.holding(c))
            .collect();
        if let Err(why) = self.leases.book.kept_since(since, &held) {
            self.fail(&why);
        }
        let stop = self.now;
        self.leases.stop();
        let alive: Vec<(LeaseId, i64)> = self
            .latest_store()
            .leases()
            .map(|l| (l.id, l.ttl))
            .collect();
        self.run_for(self.lapse_bound(MAX_TTL));
        for id in self.ids() {
            let store = &self.driver(id).expect("converged").machine().store;
            let leased = leased_keys(store);
            if store.lease_count() > 0 || leased > 0 {
                self.fail(&format!(
                    "member {id} still has {} leases and {leased} keys attached to leases, \
                     {} ms after every client stopped keeping leases alive",
                    store.lease_count(),
                    (self.now - stop) / MS
                ));
            }
        }
        for (lease, ttl) in alive {
            let revoked = self.leases.book.leases.get(&lease).and_then(|r| r.revoked);
            let due = stop + self.lapse_bound(ttl);
            if revoked.is_none_or(|(at, _)| at > due) {
                self.fail(&format!(
                    "lease {lease} (TTL {ttl} s), left to lapse at {} ms with a stable leader, \
                     was revoked at {revoked:?}, after {} ms",
                    stop / MS,
                    due / MS
                ));
            }
        }
        self.check_sessions();
    }

    /// The store that has applied the most (at the end, every member's is a prefix of it).
    fn latest_store(&self) -> &kv::Store {
        self.ids()
            .into_iter()
            .filter_map(|id| self.driver(id))
            .map(|d| &d.machine().store)
            .max_by_key(|s| s.revision())
            .expect("a member is up")
    }

    /// Exactly once: in the store's history, each session's counter key was put with each
    /// number at most once, and at the very revision every answer to that number carried.
    pub fn check_sessions(&self) {
        let runs = session_runs(self.latest_store());
        for ((lease, seq), revs) in &runs {
            if revs.len() > 1 {
                self.fail(&format!(
                    "session {lease} number {seq} ran {} times, at revisions {revs:?}",
                    revs.len()
                ));
            }
        }
        for ((lease, seq), rev) in &self.leases.book.sessions {
            let ran = runs.get(&(*lease, *seq)).map_or(&[][..], |r| &r[..]);
            if ran != [*rev] {
                self.fail(&format!(
                    "session {lease} number {seq} was answered with revision {rev} but ran \
                     at {ran:?}"
                ));
            }
        }
    }
}

/// Live keys attached to leases (in the leased key space).
fn leased_keys(store: &kv::Store) -> i64 {
    let range = kv::KeyRange {
        key: key(leases::LEASED_KEYS).key,
        range_end: key(leases::SESSION_KEYS).key,
    };
    let req = kv::RangeRequest {
        range,
        count_only: true,
        ..Default::default()
    };
    store.range(&req, store.revision()).map_or(0, |r| r.count)
}

/// Every put of a session counter key in the store's history: (session, number) → the
/// revisions it was put at.
pub fn session_runs(store: &kv::Store) -> BTreeMap<(LeaseId, u64), Vec<kv::Revision>> {
    let range = kv::KeyRange {
        key: key(leases::SESSION_KEYS).key,
        range_end: key(2 * leases::SESSION_KEYS).key,
    };
    let mut runs: BTreeMap<(LeaseId, u64), Vec<kv::Revision>> = BTreeMap::new();
    for rev in store.first_event_revision()..=store.revision() {
        for e in store.events_at(rev, Some(&range)) {
            let (Some(k), Some(seq)) = (number_be(&e.kv.key), number(&e.kv.value)) else {
                continue;
            };
            let lease = (k - leases::SESSION_KEYS) as LeaseId;
            runs.entry((lease, seq)).or_default().push(rev);
        }
    }
    runs
}

fn number_be(b: &[u8]) -> Option<u64> {
    Some(u64::from_be_bytes(b.try_into().ok()?))
}
