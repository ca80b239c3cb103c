//! Log compaction and InstallSnapshot (§7): nodes snapshot their state machine in the
//! background and compact; followers that need compacted entries get the snapshot in
//! chunks; restarts come back from snapshot plus log suffix.

use rand::Rng;
use sim::{Cluster, Faults, SimConfig, MS};

const THRESHOLD: u64 = 10;

fn config(nodes: usize, seed: u64) -> SimConfig {
    let mut cfg = SimConfig::new(nodes, sim::seed_or(seed));
    cfg.snapshot_threshold = Some(THRESHOLD);
    // Small chunks and a small window, so every snapshot takes many chunks and round trips.
    cfg.snapshot_chunk_bytes = 128;
    cfg.max_inflight_msgs = 4;
    cfg
}

/// Every live node compacted: its log starts after a snapshot.
fn assert_compacted(c: &Cluster) {
    for id in c.ids().into_iter().filter(|&id| c.is_up(id)) {
        let r = c.node(id).raft();
        assert!(r.snapshot_index() > 0, "node {id} never compacted");
        let kept = r.last_index() - r.snapshot_index();
        assert!(
            kept <= 3 * THRESHOLD,
            "node {id} keeps {kept} entries after compaction"
        );
    }
}

#[test]
fn snapshot_basic() {
    let mut c = Cluster::new(config(3, 51));
    c.wait_leader(5_000 * MS);
    for cmd in 0..100 {
        c.one(cmd, 16, 3);
    }
    assert_compacted(&c);
    c.check_acked_durable();
    assert_eq!(
        c.net.total().kind("snapshot_chunk"),
        0,
        "nobody needed a snapshot"
    );
}

/// Shared shape of the paper's snapshot tests: each round, a victim misses more than a
/// snapshot's worth of entries (disconnected or crashed), then must catch up.
fn install_rounds(seed: u64, crash: bool, unreliable: bool, leader_every_third: bool) -> Cluster {
    let mut c = Cluster::new(config(3, seed));
    if unreliable {
        c.set_faults(Faults::UNRELIABLE);
    }
    c.wait_leader(10_000 * MS);
    let mut cmd = 0;
    c.one(cmd, 16, 3);
    for round in 0..12 {
        let leader = c
            .stable_leader()
            .unwrap_or_else(|| c.wait_leader(10_000 * MS));
        let victim = if leader_every_third && round % 3 == 1 {
            leader
        } else {
            let followers: Vec<u64> = c.ids().into_iter().filter(|&i| i != leader).collect();
            followers[c.rng().gen_range(0..followers.len())]
        };
        if crash {
            c.crash(victim);
        } else {
            c.disconnect(victim);
        }
        for _ in 0..(THRESHOLD * 3 + 1) {
            cmd += 1;
            c.one(cmd, 16, 2);
        }
        if crash {
            c.restart(victim);
        } else {
            c.connect(victim);
        }
        cmd += 1;
        c.one(cmd, 16, 3);
    }
    c.check_acked_durable();
    assert_compacted(&c);
    c
}

#[test]
fn install_snapshot_on_a_disconnected_follower() {
    let c = install_rounds(52, false, false, false);
    let chunks = c.net.total().kind("snapshot_chunk");
    assert!(
        chunks > 12,
        "only {chunks} snapshot chunks: followers caught up without snapshots"
    );
}

#[test]
fn install_snapshot_on_an_unreliable_network() {
    let c = install_rounds(53, false, true, false);
    assert!(c.net.total().kind("snapshot_chunk") > 0);
}

#[test]
fn install_snapshot_with_crashes() {
    install_rounds(54, true, false, false);
}

#[test]
fn install_snapshot_with_crashes_on_an_unreliable_network() {
    install_rounds(55, true, true, true);
}

/// All nodes crash and restart from their snapshots, again and again: nothing committed is
/// lost and the next index never goes backwards.
#[test]
fn all_nodes_crash_and_the_next_index_never_decreases() {
    let mut c = Cluster::new(config(5, 56));
    c.wait_leader(5_000 * MS);
    let mut cmd = 0;
    let mut last_index = 0;
    for _ in 0..5 {
        for _ in 0..(THRESHOLD + 3) {
            cmd += 1;
            c.one(cmd, 16, 5);
        }
        cmd += 1;
        let before = c.one(cmd, 16, 5);
        assert!(before > last_index);
        for id in c.ids() {
            c.crash(id);
        }
        for id in c.ids() {
            c.restart(id);
        }
        cmd += 1;
        let after = c.one(cmd, 16, 5);
        assert!(after > before, "index went from {before} back to {after}");
        last_index = after;
    }
    assert_compacted(&c);
    c.check_acked_durable();
}

/// Restart twice in a row from a snapshot (the second restart must not need anything the
/// first one dropped).
#[test]
fn restart_twice_in_a_row_from_a_snapshot() {
    let mut c = Cluster::new(config(3, 57));
    c.wait_leader(5_000 * MS);
    for cmd in 0..(THRESHOLD * 3) {
        c.one(cmd, 16, 3);
    }
    c.run_for(200 * MS); // let background snapshots finish and commits reach everyone
    for _ in 0..2 {
        let before: Vec<_> = c.nodes.iter().map(|n| n.applied()).collect();
        for id in c.ids() {
            c.crash(id);
        }
        for id in c.ids() {
            c.restart(id);
            let node = c.node(id);
            assert!(
                node.disk.snapshot.is_some(),
                "node {id} restarted without a snapshot"
            );
            // The state machine came back from the snapshot, not from replaying index 1.
            assert!(node.applied_index() >= node.disk.snapshot_index());
        }
        // Snapshot plus log suffix gives exactly the state before the crash. (A commit
        // index written lazily may be lost in the crash; the next leader's no-op commits
        // the rest again, so allow an election's worth of time.)
        let same = |c: &Cluster| c.nodes.iter().map(|n| n.applied()).collect::<Vec<_>>() == before;
        let ok = c.run_until(5_000 * MS, same);
        let after: Vec<_> = c.nodes.iter().map(|n| n.applied()).collect();
        assert!(
            ok,
            "restart changed a state machine: {before:?} -> {after:?}"
        );
    }
    c.one(1_000, 16, 3);
    c.check_acked_durable();
}

/// A brand-new node — one that never ran until the log was compacted many times over —
/// starts empty, far behind, and catches up through the snapshot.
#[test]
fn a_brand_new_follower_far_behind_catches_up_by_snapshot() {
    let mut c = Cluster::new(config(3, 58));
    let newcomer = 3;
    c.crash(newcomer); // before it did anything: its disk is empty
    assert!(c.node(newcomer).disk.entries.is_empty());
    c.wait_leader(5_000 * MS);
    for cmd in 0..(THRESHOLD * 10) {
        c.one(cmd, 16, 2);
    }
    c.restart(newcomer);
    c.one(10_000, 16, 3);
    assert!(c.net.total().kind("snapshot_chunk") > 0);
    assert!(c.node(newcomer).raft().snapshot_index() > 0);
    c.check_acked_durable();
}

/// Persisted state stays bounded: with snapshots every THRESHOLD entries, no disk ever holds
/// more than 3 × THRESHOLD entries' worth of log bytes (the rest is in the snapshot; the
/// slack covers entries applied while a background snapshot is being taken).
#[test]
fn persisted_log_stays_bounded_by_compaction() {
    let mut c = Cluster::new(config(3, 59));
    c.wait_leader(5_000 * MS);
    let size = 16;
    for cmd in 0..1_000 {
        c.one(cmd, size, 3);
    }
    let entry_bytes = raft::ENTRY_HEADER_BYTES + size as u64;
    let bound = 3 * THRESHOLD * entry_bytes;
    assert!(
        c.max_log_bytes <= bound,
        "a disk held {} log bytes, bound {bound}",
        c.max_log_bytes
    );
    assert_compacted(&c);
}

/// A snapshot in flight to one follower never stalls replication to the others.
#[test]
fn a_snapshot_in_flight_does_not_stall_the_others() {
    let mut cfg = config(5, 60);
    cfg.snapshot_chunk_bytes = 16;
    cfg.max_inflight_msgs = 1; // a slow transfer: one 16-byte chunk per round trip
    let mut c = Cluster::new(cfg);
    let leader = c.wait_leader(5_000 * MS);
    let victim = c.ids().into_iter().find(|&i| i != leader).unwrap();
    c.disconnect(victim);
    for cmd in 0..(THRESHOLD * 10) {
        c.one(cmd, 16, 4);
    }
    c.connect(victim);
    let started = c.run_until(1_000 * MS, |c| c.net.total().kind("snapshot_chunk") > 0);
    assert!(started, "the transfer did not start");
    // While the transfer crawls, the other four keep committing at full speed.
    let start = c.now;
    for cmd in 1_000..1_020 {
        c.one(cmd, 16, 4);
    }
    assert!(c.node(victim).applied_index() < c.node(leader).applied_index());
    assert!(
        c.now - start < 3_000 * MS,
        "commits slowed to a crawl during the transfer"
    );
    c.one(2_000, 16, 5);
    c.check_acked_durable();
}

/// A lost chunk is resent, not the whole snapshot: drop one chunk and count what goes again.
#[test]
fn a_lost_chunk_is_resent_not_the_whole_snapshot() {
    let mut cfg = config(3, 61);
    cfg.trace = std::env::var("TRACE").is_ok();
    cfg.snapshot_chunk_bytes = 64;
    cfg.max_inflight_msgs = 4;
    let mut c = Cluster::new(cfg);
    let leader = c.wait_leader(5_000 * MS);
    let victim = c.ids().into_iter().find(|&i| i != leader).unwrap();
    c.disconnect(victim);
    for cmd in 0..(THRESHOLD * 10) {
        c.one(cmd, 16, 2);
    }
    c.run_for(100 * MS);
    let size = c.node(leader).raft().snapshot().unwrap().data.len() as u64;
    let chunks_needed = size.div_ceil(64);
    assert!(chunks_needed > 8, "the snapshot must span many windows");
    c.connect(victim);
    // Lose the link for a moment once the transfer is under way: chunks in flight vanish.
    c.run_until(1_000 * MS, |c| {
        c.counters(leader).kind("snapshot_chunk") >= 6
    });
    c.net.block(leader, victim);
    c.run_for(3 * MS);
    c.net.unblock(leader, victim);
    c.one(10_000, 16, 3);
    let sent = c.counters(leader).kind("snapshot_chunk");
    eprintln!("{sent} chunks sent for a {chunks_needed}-chunk snapshot");
    assert!(
        sent <= chunks_needed + 4,
        "{sent} chunks sent for a {chunks_needed}-chunk snapshot: more than the lost window was resent"
    );
    c.check_acked_durable();
}

/// A follower that crashes in the middle of a transfer loses its partial copy; the leader
/// sees no progress, abandons the transfer for a probe after the timeout, and the next
/// transfer completes.
#[test]
fn a_stalled_transfer_falls_back_to_probing_and_completes() {
    let mut cfg = config(3, 62);
    cfg.snapshot_chunk_bytes = 32;
    cfg.max_inflight_msgs = 1; // slow enough to interrupt
    let mut c = Cluster::new(cfg);
    let leader = c.wait_leader(5_000 * MS);
    let victim = c.ids().into_iter().find(|&i| i != leader).unwrap();
    c.disconnect(victim);
    for cmd in 0..(THRESHOLD * 10) {
        c.one(cmd, 16, 2);
    }
    c.connect(victim);
    let midway = c.run_until(2_000 * MS, |c| {
        c.counters(leader).kind("snapshot_chunk") >= 10
    });
    assert!(midway);
    c.crash(victim);
    c.run_for(10 * MS);
    c.restart(victim);
    c.one(10_000, 16, 3);
    assert!(c.node(victim).raft().snapshot_index() > 0);
    c.check_acked_durable();
}
