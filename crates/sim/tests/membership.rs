//! Membership change (§6) in the simulator: joint consensus, single-server changes,
//! learners, removed nodes, and leaders that crash in the middle of a change. The cluster's
//! invariant checker is configuration-aware: every commit is checked to be on the disks of
//! a majority of each configuration in force at the leader, and every new leader to hold
//! everything committed before its term. Each test runs from a fixed seed (`SIM_SEED`
//! replays another).

use raft::{Change, ConfChange, Error, Membership};
use sim::{Cluster, SimConfig, MS};

const WAIT: u64 = 10_000 * MS;

fn cluster(nodes: usize, seed: u64) -> Cluster {
    cluster_with(nodes, seed, |_| {})
}

/// A cluster whose configuration `tune` adjusts first (compaction, PreVote).
fn cluster_with(nodes: usize, seed: u64, tune: impl FnOnce(&mut SimConfig)) -> Cluster {
    let mut cfg = SimConfig::new(nodes, sim::seed_or(seed));
    tune(&mut cfg);
    Cluster::new(cfg)
}

fn simple(c: Change) -> ConfChange {
    ConfChange::simple(c)
}

fn voters(m: &Membership) -> Vec<u64> {
    m.voters().to_vec()
}

/// Commit `n` commands (numbered from `*cmd`) on `expected` nodes.
fn commit(c: &mut Cluster, cmd: &mut u64, n: usize, expected: usize) {
    for _ in 0..n {
        c.one(*cmd, 16, expected);
        *cmd += 1;
    }
}

/// A new node (empty disk) added as a learner, once its log has caught up with the leader's.
fn add_caught_up_learner(c: &mut Cluster) -> u64 {
    let new = c.add_node();
    c.change_membership(simple(Change::AddLearner(new)), WAIT);
    let caught_up = c.run_until(WAIT, |c| {
        c.stable_leader()
            .is_some_and(|l| c.node(l).raft().lag(new) == Some(0))
    });
    assert!(caught_up, "the learner never caught up");
    new
}

fn removed(c: &Cluster, id: u64) -> bool {
    c.node(id).driver.as_ref().is_some_and(|d| d.removed())
}

#[test]
fn grow_from_three_to_five_and_shrink_back_to_three() {
    let mut c = cluster(3, 1);
    c.wait_leader(WAIT);
    let mut cmd = 1;
    commit(&mut c, &mut cmd, 5, 3);
    for _ in 0..2 {
        let id = c.add_node();
        c.change_membership(simple(Change::AddVoter(id)), WAIT);
        let all = c.ids().len();
        commit(&mut c, &mut cmd, 3, all);
    }
    assert_eq!(voters(&c.membership().unwrap()), vec![1, 2, 3, 4, 5]);
    // Five voters tolerate two failures.
    c.crash(1);
    c.crash(2);
    c.wait_leader(WAIT);
    commit(&mut c, &mut cmd, 3, 3);
    c.restart(1);
    c.restart(2);
    // Shrink by the two newest; each is told it was removed.
    for id in [5, 4] {
        c.change_membership(simple(Change::Remove(id)), WAIT);
        assert!(
            c.run_until(WAIT, |c| removed(c, id)),
            "node {id} never learned that it was removed: {:?} commit {} last {} applied {}\n{}",
            c.node(id).driver.as_ref().unwrap().membership(),
            c.node(id).raft().commit_index(),
            c.node(id).raft().last_index(),
            c.node(id).raft().applied(),
            c.describe()
        );
    }
    assert_eq!(voters(&c.membership().unwrap()), vec![1, 2, 3]);
    commit(&mut c, &mut cmd, 3, 3);
    c.check_acked_durable();
}

#[test]
fn removing_the_leader_hands_over_and_the_rest_go_on() {
    let mut c = cluster(3, 2);
    let leader = c.wait_leader(WAIT);
    let mut cmd = 1;
    commit(&mut c, &mut cmd, 3, 3);
    let m = c.change_membership(simple(Change::Remove(leader)), WAIT);
    assert!(!m.contains(leader));
    let next = c.wait_leader(WAIT);
    assert_ne!(next, leader, "a removed leader steps down");
    assert!(!c.node(leader).raft().is_leader());
    assert!(c.run_until(WAIT, |c| removed(c, leader)));
    commit(&mut c, &mut cmd, 3, 2);
    // It keeps running, outside the cluster, and never leads again.
    c.run_for(20 * c.cfg.election_timeout());
    assert!(!c.node(leader).raft().is_leader());
    c.check_acked_durable();
}

#[test]
fn a_crashed_voter_whose_disk_is_gone_is_replaced() {
    let mut c = cluster_with(3, 3, |cfg| cfg.snapshot_threshold = Some(20));
    let leader = c.wait_leader(WAIT);
    let mut cmd = 1;
    commit(&mut c, &mut cmd, 60, 3);
    let dead = c.ids().into_iter().find(|&id| id != leader).unwrap();
    c.destroy(dead);
    // The operator's flow: a new machine under a new id joins as a learner, catches up by
    // snapshot, is promoted once it has caught up, and the dead one is removed.
    let new = add_caught_up_learner(&mut c);
    assert!(
        c.node(new).disk.snapshot.is_some(),
        "the log was compacted: the learner must have started from a snapshot"
    );
    c.change_membership(simple(Change::Promote(new)), WAIT);
    let m = c.change_membership(simple(Change::Remove(dead)), WAIT);
    let mut want = vec![1, 2, 3, new];
    want.retain(|&id| id != dead);
    assert_eq!(voters(&m), want);
    // The replacement counts: with another voter down, it makes the majority.
    let other = want.iter().copied().find(|&id| id != new).unwrap();
    c.crash(other);
    c.wait_leader(WAIT);
    commit(&mut c, &mut cmd, 3, 2);
    c.check_acked_durable();
}

#[test]
fn two_of_three_voters_swapped_in_one_joint_change() {
    let mut c = cluster(3, 4);
    c.wait_leader(WAIT);
    let mut cmd = 1;
    commit(&mut c, &mut cmd, 5, 3);
    let (a, b) = (c.add_node(), c.add_node());
    let swap = ConfChange::joint(
        vec![
            Change::AddVoter(a),
            Change::AddVoter(b),
            Change::Remove(2),
            Change::Remove(3),
        ],
        true,
    );
    let m = c.change_membership(swap, WAIT);
    assert_eq!(voters(&m), vec![1, a, b]);
    assert!(!m.is_joint(), "auto-leave ends the joint configuration");
    // The old voters are gone for good; the new configuration alone decides.
    c.destroy(2);
    c.destroy(3);
    c.wait_leader(WAIT);
    commit(&mut c, &mut cmd, 5, 3);
    c.check_acked_durable();
}

/// Where in a joint change the leader crashes.
#[derive(Clone, Copy, Debug)]
enum CrashPoint {
    /// C_old,new appended, not committed.
    JointAppended,
    /// C_old,new committed, C_new not yet proposed.
    JointCommitted,
    /// C_new appended, not committed.
    NewAppended,
}

fn leader_crashes_during_a_joint_change(seed: u64, point: CrashPoint) {
    let mut c = cluster(3, seed);
    c.wait_leader(WAIT);
    let mut cmd = 1;
    commit(&mut c, &mut cmd, 3, 3);
    let (a, b) = (c.add_node(), c.add_node());
    let swap = vec![Change::AddVoter(a), Change::AddVoter(b), Change::Remove(1)];
    let leader = c.wait_leader(WAIT);
    // Keep writing while the change runs.
    let _ = c.propose(leader, sim::command(1_000_000 + seed, 8));
    match point {
        CrashPoint::JointAppended => {
            c.propose_conf_change(leader, ConfChange::joint(swap, false))
                .unwrap();
            c.run_for(sim::MS); // some followers may have it, none acknowledged yet
        }
        CrashPoint::JointCommitted | CrashPoint::NewAppended => {
            let joint = c.change_membership(ConfChange::joint(swap, false), WAIT);
            assert!(joint.is_joint());
            if let CrashPoint::NewAppended = point {
                let l = c.wait_leader(WAIT);
                c.propose_conf_change(l, ConfChange::leave_joint()).unwrap();
                c.run_for(sim::MS);
            }
        }
    }
    let crashed = c.leader().unwrap();
    c.crash(crashed);
    c.run_for(c.cfg.election_timeout());
    c.restart(crashed);
    c.wait_leader(WAIT);
    // Whatever survived, the cluster can be brought to one configuration.
    let m = c.membership().unwrap();
    let m = if m.is_joint() {
        c.change_membership(ConfChange::leave_joint(), WAIT)
    } else {
        m
    };
    assert!(!m.is_joint());
    let before = vec![1, 2, 3];
    let after = vec![2, 3, a, b];
    assert!(
        voters(&m) == before || voters(&m) == after,
        "{point:?}: ended in {m}"
    );
    let members = m.ids().count();
    commit(&mut c, &mut cmd, 3, members);
    c.check_acked_durable();
}

#[test]
fn the_leader_crashes_at_every_step_of_a_joint_change() {
    let first = sim::seed_or(100);
    for seed in first..first + 20 {
        for point in [
            CrashPoint::JointAppended,
            CrashPoint::JointCommitted,
            CrashPoint::NewAppended,
        ] {
            leader_crashes_during_a_joint_change(seed, point);
        }
    }
}

/// Ongaro's 2015 single-server bug. Four voters; leader A adds E, but only E receives the
/// entry before A crashes. B is elected by B, C, D in the old configuration and, had it
/// been allowed, would add F and commit that with B, C, F — while D, cut off right after
/// voting, never sees an entry of B's term. A then returns and, counting by its own
/// configuration (A..E), wins with A, D, E and overwrites what B committed. The rule that a
/// leader commits an entry of its own term before changing the configuration stops B.
#[test]
fn concurrent_single_server_changes_across_a_leader_change_stay_safe() {
    let mut c = cluster(4, 5);
    let a = c.wait_leader(WAIT);
    let mut cmd = 1;
    commit(&mut c, &mut cmd, 3, 4);
    let others: Vec<u64> = c.ids().into_iter().filter(|&id| id != a).collect();
    let e = c.add_node();
    c.partition(&[&[a, e], &others]);
    c.propose_conf_change(a, simple(Change::AddVoter(e)))
        .unwrap();
    c.run_for(200 * MS);
    c.crash(a);
    let f = c.add_node();
    let mut group = others.clone();
    group.push(f);
    c.partition(&[&group, &[e], &[a]]);
    // The first moment one of the others leads (it needed all three votes).
    let is_leader = |c: &Cluster, id: u64| c.node(id).raft().is_leader();
    assert!(c.run_until(WAIT, |c| others.iter().any(|&id| is_leader(c, id))));
    let b = others
        .iter()
        .copied()
        .find(|&id| is_leader(&c, id))
        .unwrap();
    let rest: Vec<u64> = others.iter().copied().filter(|&id| id != b).collect();
    let (cc, d) = (rest[0], rest[1]);
    // Cut D off before B's first entry reaches it.
    c.partition(&[&[b, cc, f], &[d], &[e], &[a]]);
    let refused = c.propose_conf_change(b, simple(Change::AddVoter(f)));
    c.run_for(500 * MS);
    // A comes back with D and E.
    c.restart(a);
    c.partition(&[&[a, d, e], &[b, cc, f]]);
    c.run_for(5 * c.cfg.election_timeout());
    c.heal();
    c.wait_leader(WAIT);
    let members = c.membership().unwrap().ids().count();
    commit(&mut c, &mut cmd, 3, members);
    c.check_acked_durable();
    // Checked last, so that without the rule the run shows what goes wrong instead.
    assert!(
        matches!(&refused, Err(Error::ConfChangeRefused(why)) if why.contains("of its term")),
        "{refused:?}"
    );
}

fn removed_node_keeps_campaigning(pre_vote: bool, seed: u64) {
    let mut c = cluster_with(3, seed, |cfg| cfg.pre_vote = pre_vote);
    let leader = c.wait_leader(WAIT);
    let mut cmd = 1;
    commit(&mut c, &mut cmd, 3, 3);
    let gone = c.ids().into_iter().find(|&id| id != leader).unwrap();
    // Removed while cut off: it never hears of it and believes it is still a voter.
    c.disconnect(gone);
    c.change_membership(simple(Change::Remove(gone)), WAIT);
    c.run_for(5 * c.cfg.election_timeout());
    let leader = c.wait_leader(WAIT);
    let term = c.term_of(leader);
    c.connect(gone);
    c.run_for(20 * c.cfg.election_timeout());
    assert!(c.counters(gone).messages > 0 || c.term_of(gone) > 0);
    assert_eq!(
        c.stable_leader(),
        Some(leader),
        "the removed node disturbed the leader"
    );
    for id in c.ids().into_iter().filter(|&id| id != gone) {
        assert_eq!(
            c.term_of(id),
            term,
            "node {id} changed term because of a removed node"
        );
    }
    commit(&mut c, &mut cmd, 3, 2);
}

#[test]
fn a_removed_node_keeps_campaigning_and_the_cluster_does_not_notice() {
    removed_node_keeps_campaigning(true, 6); // PreVote
    removed_node_keeps_campaigning(false, 7); // CheckQuorum alone
}

#[test]
fn learners_never_decide_a_vote_or_a_commit() {
    let mut c = cluster(3, 8);
    let leader = c.wait_leader(WAIT);
    let mut cmd = 1;
    commit(&mut c, &mut cmd, 3, 3);
    let (l1, l2) = (c.add_node(), c.add_node());
    c.change_membership(simple(Change::AddLearner(l1)), WAIT);
    c.change_membership(simple(Change::AddLearner(l2)), WAIT);
    commit(&mut c, &mut cmd, 3, 5); // learners receive the log
    assert_eq!(c.transfer_leader(leader, l1), Err(Error::NotAVoter(l1)));
    // Two voters down: one voter and two learners acknowledge, which is three of five
    // nodes but one of three voters — nothing commits.
    let down: Vec<u64> = [1, 2, 3].into_iter().filter(|&id| id != leader).collect();
    for &id in &down {
        c.crash(id);
    }
    let before = c.node(leader).raft().commit_index();
    let index = c.propose(leader, sim::command(cmd, 8)).unwrap();
    c.run_for(c.cfg.election_timeout() / 2);
    assert_eq!(
        c.node(l1).raft().last_index(),
        index,
        "the learner has the entry"
    );
    assert_eq!(
        c.node(leader).raft().commit_index(),
        before,
        "learners made a commit"
    );
    // The leader steps down (CheckQuorum) and no one can be elected with learners' votes.
    c.run_for(20 * c.cfg.election_timeout());
    assert_eq!(
        c.leader(),
        None,
        "a leader was elected without a majority of voters"
    );
    c.restart(down[0]);
    c.wait_leader(WAIT);
    commit(&mut c, &mut cmd, 3, 4);
    c.check_acked_durable();
}

#[test]
fn restarted_nodes_recover_the_joint_configuration_from_log_and_snapshot() {
    let mut c = cluster_with(3, 9, |cfg| cfg.snapshot_threshold = Some(5));
    c.wait_leader(WAIT);
    let mut cmd = 1;
    let new = c.add_node();
    let joint = c.change_membership(
        ConfChange::joint(vec![Change::AddVoter(new), Change::Remove(3)], false),
        WAIT,
    );
    commit(&mut c, &mut cmd, 12, 4); // past the snapshot threshold: snapshots carry it
    for id in c.ids() {
        c.crash(id);
    }
    for id in c.ids() {
        c.restart(id);
    }
    c.wait_leader(WAIT);
    for id in c.ids() {
        assert_eq!(
            c.node(id).raft().membership(),
            &joint,
            "node {id} after restart"
        );
        let snap = c
            .node(id)
            .disk
            .snapshot
            .as_ref()
            .expect("snapshots were taken");
        assert_eq!(snap.meta.membership, joint, "node {id}'s snapshot");
    }
    let m = c.change_membership(ConfChange::leave_joint(), WAIT);
    assert_eq!(voters(&m), vec![1, 2, new]);
    commit(&mut c, &mut cmd, 3, 3);
    c.check_acked_durable();
}

#[test]
fn a_follower_that_missed_a_change_takes_the_configuration_from_the_leaders_snapshot() {
    let mut c = cluster_with(3, 12, |cfg| cfg.snapshot_threshold = Some(10));
    let leader = c.wait_leader(WAIT);
    let mut cmd = 1;
    commit(&mut c, &mut cmd, 3, 3);
    let away = c.ids().into_iter().find(|&id| id != leader).unwrap();
    c.disconnect(away);
    // While it is away, a newcomer joins and becomes a voter, and the log is compacted past
    // both changes: only the snapshot can tell the follower who votes now.
    let new = add_caught_up_learner(&mut c);
    let m = c.change_membership(simple(Change::Promote(new)), WAIT);
    commit(&mut c, &mut cmd, 30, 3);
    let compacted = c.run_until(WAIT, |c| {
        c.node(leader).raft().snapshot_index() > c.node(away).raft().last_index() + 20
    });
    assert!(compacted, "the leader never compacted past the changes");
    c.connect(away);
    let installed = c.run_until(WAIT, |c| c.node(away).disk.snapshot.is_some());
    assert!(installed, "the follower must catch up by snapshot");
    let learned = c.run_until(WAIT, |c| c.node(away).raft().membership() == &m);
    assert!(
        learned,
        "node {away} holds {:?}, the cluster {m:?}",
        c.node(away).raft().membership()
    );
    commit(&mut c, &mut cmd, 3, 4);
    c.check_acked_durable();
}
