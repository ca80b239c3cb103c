//! Membership change on the leader (§6): proposing a configuration change under the rules
//! that make it safe, tracking the progress of every member of the configurations in force,
//! leaving a joint configuration once it commits, and stepping down when the committed
//! configuration no longer counts this node as a voter.
//!
//! The rules (each guarded here, each tested by name in `crates/sim/tests/membership.rs`):
//! 1. A configuration takes effect when its entry is appended (`configs.rs`), so the leader
//!    uses C_old,new (or C_new) for every later decision, including the commit of that
//!    very entry.
//! 2. One change at a time: a new change is refused until the latest configuration entry is
//!    committed. With rule 1 this means at most two configurations can decide anything at
//!    once, and a joint configuration is always left before another change begins.
//! 3. A new leader proposes no change before an entry of its own term is committed (its
//!    no-op). Without this, a leader elected by a configuration whose change a previous
//!    leader had not committed could add a second change on top of a different history —
//!    the single-server bug Ongaro reported in 2015.
//! 4. A leader that is not a voter of the committed configuration steps down, handing over
//!    to the most caught-up voter; until then it leads without counting itself.

use crate::confchange::{self, ConfChange, ConfEntry};
use crate::error::{Error, Result};
use crate::membership::Membership;
use crate::message::Body;
use crate::progress::Progress;
use crate::raft::Raft;
use crate::types::{EntryKind, Index, NodeId, Role};

impl Raft {
    /// Propose a configuration change; only the leader accepts. Returns the index of its
    /// entry. The change takes effect as soon as it is appended; the leader then refuses
    /// further changes until it commits (a joint change with `auto_leave` is followed by the
    /// leader's own `Leave` entry).
    pub fn propose_conf_change(&mut self, cc: ConfChange) -> Result<Index> {
        if self.role != Role::Leader {
            return Err(Error::NotLeader {
                leader: self.leader,
            });
        }
        let committed = self.log.committed;
        if self.log.term(committed) != Some(self.term) {
            return Err(Error::ConfChangeRefused(
                "this leader has not yet committed an entry of its term".into(),
            ));
        }
        let pending = self.log.configs.latest_index();
        if pending > committed {
            return Err(Error::ConfChangeRefused(format!(
                "the configuration change at index {pending} is not committed yet"
            )));
        }
        let next = confchange::apply(self.membership(), &cc)?;
        self.append_conf_entry(cc, next)
    }

    fn append_conf_entry(&mut self, change: ConfChange, membership: Membership) -> Result<Index> {
        let data = ConfEntry { change, membership }.encode();
        let index = self.propose_entry(EntryKind::ConfChange, data.into())?;
        self.track_new_members();
        Ok(index)
    }

    /// Start tracking the progress of members the latest configuration added.
    pub(crate) fn track_new_members(&mut self) {
        let next = self.log.last_index() + 1;
        let (msgs, bytes) = (self.cfg.max_inflight_msgs, self.cfg.max_inflight_bytes);
        let ids: Vec<NodeId> = self.membership().ids().collect();
        for id in ids {
            self.progress.entry(id).or_insert_with(|| {
                let mut pr = Progress::new(next, msgs, bytes);
                // A new member gets one election timeout before CheckQuorum counts it.
                pr.recent_active = true;
                pr
            });
        }
    }

    /// Stop replicating to nodes that neither the latest nor the committed configuration
    /// holds once they were told the commit index that covers their removal — so that a
    /// removed node learns of it and can shut down — or, if they cannot be told (down, cut
    /// off), an election timeout after their removal committed.
    pub(crate) fn forget_removed_members(&mut self) {
        let (committed, ticks) = (self.log.committed, self.ticks);
        let conf_index = self.log.configs.latest_index();
        let latest = self.log.configs.latest();
        let at_commit = self.log.configs.at(committed);
        let timeout = self.cfg.election_tick;
        let mut gone = Vec::new();
        for (&id, pr) in self.progress.iter_mut() {
            if id == self.id || latest.contains(id) || at_commit.contains(id) {
                continue;
            }
            let since = *pr.removed_at.get_or_insert(ticks);
            if pr.commit_sent >= conf_index || ticks - since >= timeout {
                gone.push(id);
            }
        }
        for id in gone {
            self.progress.remove(&id);
        }
    }

    /// After the commit index moved: leave a committed auto-leave joint configuration, and
    /// step down if the committed configuration does not count this node as a voter.
    pub(crate) fn after_commit_reconfigure(&mut self) {
        if self.role != Role::Leader || self.log.configs.latest_index() > self.log.committed {
            return;
        }
        if !self.membership().is_voter(self.id) {
            self.hand_over_and_step_down();
            return;
        }
        self.maybe_auto_leave();
    }

    /// A committed joint configuration with auto-leave is left at once.
    pub(crate) fn maybe_auto_leave(&mut self) {
        let m = self.membership();
        let committed = self.log.configs.latest_index() <= self.log.committed;
        if self.role != Role::Leader || !m.is_joint() || !m.auto_leave() || !committed {
            return;
        }
        let cc = ConfChange::leave_joint();
        let next = confchange::apply(m, &cc).expect("a joint configuration can be left");
        // Refused only by the bound on uncommitted bytes or a transfer; the heartbeat tick
        // tries again.
        let _ = self.append_conf_entry(cc, next);
    }

    /// Rule 4: hand leadership to the most caught-up voter (it campaigns at once), then
    /// step down.
    fn hand_over_and_step_down(&mut self) {
        let last = self.log.last_index();
        let best = self
            .membership()
            .voters()
            .iter()
            .filter_map(|id| self.progress.get(id).map(|p| (p.match_index, *id)))
            .max();
        if let Some((matched, to)) = best {
            if matched == last {
                self.send(to, self.term, Body::TimeoutNow);
            }
        }
        self.become_follower(self.term, None);
    }
}

#[cfg(test)]
mod tests {
    use crate::{Change, ConfChange, Config, Error, Raft, RestoreState};

    fn refusal(r: crate::Result<u64>) -> String {
        match r {
            Err(Error::ConfChangeRefused(why)) => why,
            other => panic!("expected a refusal, got {other:?}"),
        }
    }

    /// A one-node leader whose every Ready is persisted and applied at once.
    fn settle(r: &mut Raft) {
        while r.has_ready() {
            let rd = r.ready();
            r.advance(&rd);
        }
    }

    #[test]
    fn a_new_leader_changes_nothing_before_its_own_term_commits() {
        let mut r = Raft::new(Config::new(1, vec![1]), RestoreState::default()).unwrap();
        r.campaign();
        assert!(r.is_leader());
        let add = ConfChange::simple(Change::AddLearner(2));
        assert!(refusal(r.propose_conf_change(add.clone())).contains("of its term"));
        settle(&mut r); // the no-op commits
        let index = r.propose_conf_change(add).unwrap();
        assert_eq!(r.membership().learners(), &[2], "in force once appended");
        assert_eq!(r.conf_index(), index);
    }

    #[test]
    fn a_second_change_waits_until_the_first_commits() {
        let mut r = Raft::new(Config::new(1, vec![1]), RestoreState::default()).unwrap();
        r.campaign();
        settle(&mut r);
        r.propose_conf_change(ConfChange::simple(Change::AddLearner(2)))
            .unwrap();
        let second = ConfChange::simple(Change::AddLearner(3));
        assert!(refusal(r.propose_conf_change(second.clone())).contains("not committed yet"));
        settle(&mut r);
        r.propose_conf_change(second).unwrap();
        assert_eq!(r.membership().learners(), &[2, 3]);
    }

    #[test]
    fn a_committed_auto_leave_joint_configuration_is_left_by_the_leader() {
        let mut r = Raft::new(Config::new(1, vec![1]), RestoreState::default()).unwrap();
        r.campaign();
        settle(&mut r);
        // Node 1 is the only voter of both halves, so the leader commits alone.
        let cc = ConfChange::joint(vec![Change::AddLearner(2)], true);
        r.propose_conf_change(cc).unwrap();
        assert!(r.membership().is_joint());
        settle(&mut r);
        assert!(!r.membership().is_joint(), "left once C_old,new committed");
        assert_eq!(r.membership().learners(), &[2]);
        assert_eq!(r.commit_index(), r.conf_index(), "and C_new committed too");
    }
}
