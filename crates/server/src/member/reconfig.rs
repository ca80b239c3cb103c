//! etcd's safety checks on a membership change, as a pure function of what the leader knows:
//! the registry, the configuration, its followers' progress and which peers it has heard from
//! lately. A change that passes becomes one raft configuration change (a simple one: at most
//! one voter moves at a time, as etcd does).
//!
//! The checks, as etcd makes them with `--strict-reconfig-check` (its default):
//! - adding a voter needs a quorum of the enlarged voter set to be started (a member is
//!   started once it has published its name), and every voter to be connected;
//! - removing a voter needs a quorum of the remaining voters to be started, and — unless the
//!   member removed is down — the connected voters other than it to still form a quorum;
//! - promoting needs the learner to be in sync (its match index at least 90% of the
//!   leader's) and a quorum of the enlarged voter set started;
//! - at most one learner at a time.

use crate::member::members::Registry;
use raft::{Change, Index, Membership, NodeId};
use tonic::Status;

/// A membership change as the Cluster service asks for it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MemberOp {
    Add {
        id: NodeId,
        peer_urls: Vec<String>,
        learner: bool,
    },
    Remove(NodeId),
    Promote(NodeId),
}

/// What the leader knows when it decides.
pub struct Facts<'a> {
    pub me: NodeId,
    pub registry: &'a Registry,
    /// The latest configuration (no change is pending when this is asked).
    pub membership: &'a Membership,
    /// The leader's own last index.
    pub leader_index: Index,
    /// Match index per member (leader's progress).
    pub matched: &'a dyn Fn(NodeId) -> Option<Index>,
    /// Whether the leader has heard from a peer lately (etcd: within its health interval).
    pub active: &'a dyn Fn(NodeId) -> bool,
}

/// The most learners a cluster may have at once (etcd's limit).
pub const MAX_LEARNERS: usize = 1;

pub fn member_not_found() -> Status {
    Status::not_found("etcdserver: member not found")
}
pub fn peer_urls_exist() -> Status {
    Status::failed_precondition("etcdserver: Peer URLs already exists")
}
pub fn member_exists() -> Status {
    Status::failed_precondition("etcdserver: member ID already exist")
}
pub fn not_enough_started() -> Status {
    Status::failed_precondition(
        "etcdserver: re-configuration failed due to not enough started members",
    )
}
pub fn unhealthy() -> Status {
    Status::unavailable("etcdserver: unhealthy cluster")
}
pub fn not_learner() -> Status {
    Status::failed_precondition("etcdserver: can only promote a learner member")
}
pub fn learner_not_ready() -> Status {
    Status::failed_precondition(
        "etcdserver: can only promote a learner member which is in sync with leader",
    )
}
pub fn too_many_learners() -> Status {
    Status::failed_precondition("etcdserver: too many learner members in cluster")
}

fn quorum(n: usize) -> usize {
    n / 2 + 1
}

impl Facts<'_> {
    fn started(&self, id: NodeId) -> bool {
        self.registry
            .members
            .get(&id)
            .is_some_and(|m| !m.name.is_empty())
    }

    fn voters(&self) -> &[NodeId] {
        self.membership.voters()
    }

    /// Voters started, counting `extra` (a member about to become a voter) as one more
    /// voter, started or not as given.
    fn ready_to_grow(&self, extra_started: bool) -> bool {
        let members = self.voters().len() + 1;
        let started =
            self.voters().iter().filter(|&&v| self.started(v)).count() + usize::from(extra_started);
        // A lone member may always take a second one (it cannot be started yet).
        if started == 1 && members == 2 {
            return true;
        }
        started >= quorum(members)
    }

    fn all_voters_connected(&self) -> bool {
        self.voters()
            .iter()
            .all(|&v| v == self.me || (self.active)(v))
    }
}

/// The raft change `op` makes, or etcd's reason to refuse it.
pub fn check(op: &MemberOp, f: &Facts) -> Result<Change, Status> {
    match op {
        MemberOp::Add {
            id,
            peer_urls,
            learner,
        } => {
            if f.membership.contains(*id)
                || f.registry.members.contains_key(id)
                || f.registry.removed.contains(id)
            {
                return Err(member_exists());
            }
            if f.registry.peer_url_owner(peer_urls, 0).is_some() {
                return Err(peer_urls_exist());
            }
            if *learner {
                if f.membership.learners().len() >= MAX_LEARNERS {
                    return Err(too_many_learners());
                }
                return Ok(Change::AddLearner(*id));
            }
            if !f.ready_to_grow(false) {
                return Err(not_enough_started());
            }
            if !f.all_voters_connected() {
                return Err(unhealthy());
            }
            Ok(Change::AddVoter(*id))
        }
        MemberOp::Remove(id) => {
            if !f.membership.contains(*id) {
                return Err(member_not_found());
            }
            if f.membership.is_learner(*id) {
                return Ok(Change::Remove(*id));
            }
            let rest: Vec<NodeId> = f.voters().iter().copied().filter(|v| v != id).collect();
            let started = rest.iter().filter(|&&v| f.started(v)).count();
            if started < quorum(rest.len()) {
                return Err(not_enough_started());
            }
            // A member that is down may go: it is not part of the quorum that is serving.
            if *id != f.me && !(f.active)(*id) {
                return Ok(Change::Remove(*id));
            }
            let active = f
                .voters()
                .iter()
                .filter(|&&v| v == f.me || (f.active)(v))
                .count();
            if active.saturating_sub(1) < quorum(f.voters().len() - 1) {
                return Err(unhealthy());
            }
            Ok(Change::Remove(*id))
        }
        MemberOp::Promote(id) => {
            if !f.membership.contains(*id) {
                return Err(member_not_found());
            }
            if !f.membership.is_learner(*id) {
                return Err(not_learner());
            }
            let matched = (f.matched)(*id).unwrap_or(0);
            // In sync: at least 90% of the leader's log (etcd's rule), in integer arithmetic.
            if u128::from(matched) * 10 < u128::from(f.leader_index) * 9 {
                return Err(learner_not_ready());
            }
            if !f.ready_to_grow(true) {
                return Err(not_enough_started());
            }
            Ok(Change::Promote(*id))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn registry(started: &[NodeId], added: &[NodeId]) -> Registry {
        let mut r = Registry::bootstrap(
            started
                .iter()
                .map(|&id| (id, format!("n{id}"), vec![format!("http://h{id}:2380")])),
        );
        for &id in added {
            r.members.insert(
                id,
                crate::member::members::MemberRecord {
                    id,
                    peer_urls: vec![format!("http://h{id}:2380")],
                    ..Default::default()
                },
            );
        }
        r
    }

    fn facts<'a>(
        r: &'a Registry,
        m: &'a Membership,
        matched: &'a dyn Fn(NodeId) -> Option<Index>,
        active: &'a dyn Fn(NodeId) -> bool,
    ) -> Facts<'a> {
        Facts {
            me: 1,
            registry: r,
            membership: m,
            leader_index: 100,
            matched,
            active,
        }
    }

    fn add(id: NodeId, learner: bool) -> MemberOp {
        MemberOp::Add {
            id,
            peer_urls: vec![format!("http://h{id}:2380")],
            learner,
        }
    }

    #[test]
    fn etcds_checks_refuse_unsafe_changes_with_etcds_errors() {
        let all = |_| true;
        let none = |_| false;
        let caught_up = |_| Some(95);
        let behind = |_| Some(10);
        let three = Membership::new(vec![1, 2, 3]);
        let r = registry(&[1, 2, 3], &[]);
        let f = facts(&r, &three, &caught_up, &all);
        assert_eq!(check(&add(4, false), &f).unwrap(), Change::AddVoter(4));
        assert_eq!(check(&add(4, true), &f).unwrap(), Change::AddLearner(4));
        assert_eq!(
            check(&add(2, false), &f).unwrap_err().message(),
            member_exists().message()
        );
        let dup = MemberOp::Add {
            id: 9,
            peer_urls: vec!["http://h2:2380".into()],
            learner: true,
        };
        assert_eq!(
            check(&dup, &f).unwrap_err().message(),
            peer_urls_exist().message()
        );
        assert_eq!(
            check(&MemberOp::Remove(7), &f).unwrap_err().code(),
            tonic::Code::NotFound
        );
        assert_eq!(
            check(&MemberOp::Promote(2), &f).unwrap_err().message(),
            not_learner().message()
        );
        // A voter cannot join while a voter is unreachable.
        let f_down = facts(&r, &three, &caught_up, &none);
        assert_eq!(
            check(&add(4, false), &f_down).unwrap_err().message(),
            unhealthy().message()
        );
        // Two of three voters never started: no room for a fourth, and none can go.
        let r_cold = registry(&[1], &[2, 3]);
        let f_cold = facts(&r_cold, &three, &caught_up, &all);
        assert_eq!(
            check(&add(4, false), &f_cold).unwrap_err().message(),
            not_enough_started().message()
        );
        assert_eq!(
            check(&MemberOp::Remove(2), &f_cold).unwrap_err().message(),
            not_enough_started().message()
        );
        // Removing a live voter when another is down would leave no quorum connected.
        let two_up = |id| id != 3;
        let f_one_down = facts(&r, &three, &caught_up, &two_up);
        assert_eq!(
            check(&MemberOp::Remove(2), &f_one_down)
                .unwrap_err()
                .message(),
            unhealthy().message()
        );
        // …but the member that is down may be removed.
        assert_eq!(
            check(&MemberOp::Remove(3), &f_one_down).unwrap(),
            Change::Remove(3)
        );
        // The last voter cannot be removed.
        let one = Membership::new(vec![1]);
        let r1 = registry(&[1], &[]);
        let f1 = facts(&r1, &one, &caught_up, &all);
        assert_eq!(
            check(&MemberOp::Remove(1), &f1).unwrap_err().message(),
            not_enough_started().message()
        );
        // A lone member may take a second voter.
        assert_eq!(check(&add(2, false), &f1).unwrap(), Change::AddVoter(2));
        // Learners: one at a time; promoted only once in sync.
        let with_learner =
            Membership::from_parts(vec![1, 2, 3], vec![], vec![4], vec![], false).unwrap();
        let r4 = registry(&[1, 2, 3], &[4]);
        let f4 = facts(&r4, &with_learner, &caught_up, &all);
        assert_eq!(
            check(&add(5, true), &f4).unwrap_err().message(),
            too_many_learners().message()
        );
        assert_eq!(
            check(&MemberOp::Promote(4), &f4).unwrap(),
            Change::Promote(4)
        );
        let f4_behind = facts(&r4, &with_learner, &behind, &all);
        assert_eq!(
            check(&MemberOp::Promote(4), &f4_behind)
                .unwrap_err()
                .message(),
            learner_not_ready().message()
        );
        assert_eq!(
            check(&MemberOp::Remove(4), &f4_behind).unwrap(),
            Change::Remove(4)
        );
    }
}
