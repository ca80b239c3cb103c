//! Linearizable reads (§8): ReadIndex and lease reads never return stale data, even from a
//! deposed leader that does not yet know it was deposed. The cluster checks every read it
//! serves against the writes acknowledged before the read began.

use raft::ReadMode;
use sim::{Cluster, SimConfig, MS};

/// A leader cut off in a minority keeps believing it leads (no CheckQuorum, no PreVote), while
/// the majority elects a new leader and commits a newer write. Reads at the old leader and
/// its minority follower must not be served.
fn stale_leader_scenario(mode: ReadMode) -> (Cluster, u64, Vec<u64>) {
    let mut cfg = SimConfig::new(5, sim::seed_or(41));
    cfg.read_mode = mode;
    cfg.check_quorum = false;
    cfg.pre_vote = false;
    let mut c = Cluster::new(cfg);
    c.wait_leader(5_000 * MS);
    c.one(1, 8, 5);
    let old = c.stable_leader().unwrap();
    let mut rest: Vec<u64> = c.ids().into_iter().filter(|&i| i != old).collect();
    let buddy = rest.remove(0);
    c.partition(&[&[old, buddy], &rest]);
    let new = c.wait_leader(5_000 * MS);
    assert!(rest.contains(&new));
    c.one(2, 8, 3);
    (c, old, vec![old, buddy])
}

#[test]
fn read_index_never_returns_a_stale_value_across_a_partition() {
    let (mut c, old, minority) = stale_leader_scenario(ReadMode::Safe);
    assert!(
        c.node(old).raft().is_leader(),
        "the old leader still believes it leads"
    );
    let mut ctxs = Vec::new();
    for &id in &minority {
        ctxs.push(c.read_index(id).expect("the minority accepts the read"));
    }
    c.run_for(3_000 * MS);
    // The cluster already failed the run if a stale value was served; nothing may be served.
    assert!(
        c.reads.iter().all(|r| !ctxs.contains(&r.ctx)),
        "the minority served a read: {:?}",
        c.reads
    );
    // On the majority side reads are served and see the newest write.
    let new = c.stable_leader().unwrap();
    let ctx = c.read_index(new).unwrap();
    assert!(c.run_until(1_000 * MS, |c| c.reads.iter().any(|r| r.ctx == ctx)));
    let r = c.reads.iter().find(|r| r.ctx == ctx).unwrap();
    assert_eq!(r.value.map(|v| v.1), Some(2));
}

#[test]
fn follower_reads_are_forwarded_and_linearizable() {
    let mut c = Cluster::new(SimConfig::new(3, sim::seed_or(42)));
    let leader = c.wait_leader(5_000 * MS);
    let f = c.ids().into_iter().find(|&i| i != leader).unwrap();
    for cmd in 1..=10 {
        c.propose(leader, sim::command(cmd, 8)).unwrap();
        // Issue the follower read right after the leader applies, before the follower does.
        assert!(c.run_until(1_000 * MS, |c| c.acked.contains_key(&cmd)));
        let ctx = c.read_index(f).unwrap();
        assert!(c.run_until(1_000 * MS, |c| c.reads.iter().any(|r| r.ctx == ctx)));
        let r = c.reads.iter().find(|r| r.ctx == ctx).unwrap();
        assert_eq!(r.node, f);
        assert_eq!(
            r.value.map(|v| v.1),
            Some(cmd),
            "follower read missed write {cmd}"
        );
    }
}

#[test]
fn a_new_leader_serves_reads_only_after_its_noop_commits() {
    let mut c = Cluster::new(SimConfig::new(3, sim::seed_or(43)));
    c.wait_leader(5_000 * MS);
    c.one(7, 8, 3);
    let old = c.stable_leader().unwrap();
    c.crash(old);
    let new = c.wait_leader(5_000 * MS);
    // Ask at the first moment the new leader exists.
    let ctx = c.read_index(new).unwrap();
    assert!(c.run_until(1_000 * MS, |c| c.reads.iter().any(|r| r.ctx == ctx)));
    let r = *c.reads.iter().find(|r| r.ctx == ctx).unwrap();
    let noop_term = c.node(new).raft().term_at(r.index);
    assert_eq!(
        noop_term,
        Some(c.term_of(new)),
        "read index precedes the leader's no-op"
    );
    assert_eq!(r.value.map(|v| v.1), Some(7));
}

#[test]
fn lease_reads_are_served_without_a_round_trip_and_never_stale() {
    let mut served_after_partition = 0;
    // Sweep the moment of the partition across an election timeout, so some runs cut the
    // leader off just after its CheckQuorum check, when it keeps leading longest.
    for offset in 0..30 {
        let mut cfg = SimConfig::new(5, sim::seed_or(44) + offset);
        cfg.read_mode = ReadMode::LeaseBased;
        let mut c = Cluster::new(cfg);
        let leader = c.wait_leader(5_000 * MS);
        c.one(1, 8, 5);
        c.run_for(200 * MS + offset * 10 * MS); // heartbeats establish the lease
        let before = c.net.total().messages;
        let ctx = c.read_index(leader).unwrap();
        assert!(
            c.reads.iter().any(|r| r.ctx == ctx),
            "a lease read is served at once"
        );
        assert_eq!(c.net.total().messages, before, "a lease read sent messages");
        served_after_partition += lease_across_partition(&mut c, leader);
    }
    assert!(served_after_partition > 0);
}

/// Ask the cut-off leader every 5 ms while the majority elects a new leader and writes. The
/// cluster fails the run if any answer misses a write acknowledged before it was asked.
fn lease_across_partition(c: &mut Cluster, leader: u64) -> usize {
    let mut rest: Vec<u64> = c.ids().into_iter().filter(|&i| i != leader).collect();
    let buddy = rest.remove(0);
    c.partition(&[&[leader, buddy], &rest]);
    let mut served = 0;
    let mut writes = 100;
    for _ in 0..200 {
        if c.node(leader).raft().is_leader() {
            let ctx = c.read_index(leader).unwrap();
            served += c.reads.iter().filter(|r| r.ctx == ctx).count();
        }
        if let Some(new) = c.stable_leader().filter(|&l| l != leader) {
            let _ = c.propose(new, sim::command(writes, 8));
            writes += 1;
        }
        c.run_for(5 * MS);
    }
    assert!(c.acked.len() > 10, "the majority side committed nothing");
    served
}
