//! Log replication (§5.3) and commitment (§5.4): agreement under follower and leader
//! failures, the cost in messages and bytes, and the repair of divergent logs.

use raft::{Body, Config, Entry, EntryKind, HardState, Raft, RestoreState};
use sim::node::Disk;
use sim::{command, Cluster, SimConfig, MS};

fn cluster(nodes: usize, seed: u64) -> Cluster {
    Cluster::new(SimConfig::new(nodes, sim::seed_or(seed)))
}

fn other_than(c: &Cluster, not: &[u64]) -> Vec<u64> {
    c.ids().into_iter().filter(|i| !not.contains(i)).collect()
}

#[test]
fn basic_agreement_applies_nothing_before_it_is_proposed() {
    let mut c = cluster(3, 11);
    c.wait_leader(5_000 * MS);
    let mut last = 0;
    for cmd in 1..=5 {
        assert_eq!(
            c.applied_count(cmd),
            0,
            "command {cmd} applied before proposed"
        );
        let index = c.one(cmd, 8, 3);
        assert!(index > last, "indexes must grow");
        last = index;
    }
}

#[test]
fn bytes_sent_stay_near_the_payload() {
    let mut c = cluster(3, 12);
    c.wait_leader(5_000 * MS);
    c.one(99, 8, 3);
    let before = c.net.total().bytes;
    let mut payload = 0;
    for cmd in 100..110 {
        c.one(cmd, 5_000, 3);
        payload += 5_000;
    }
    let sent = c.net.total().bytes - before;
    assert!(
        sent <= 3 * payload + 50_000,
        "sent {sent} bytes for {payload} bytes of commands"
    );
}

#[test]
fn agreement_survives_follower_failure() {
    let mut c = cluster(3, 13);
    c.wait_leader(5_000 * MS);
    c.one(101, 8, 3);
    let leader = c.stable_leader().unwrap();
    c.disconnect(other_than(&c, &[leader])[0]);
    c.one(102, 8, 2);
    c.run_for(c.cfg.election_timeout());
    c.one(103, 8, 2);
    // The other follower goes too: nothing can commit.
    let leader = c.stable_leader().unwrap();
    let rest = other_than(&c, &[leader]);
    for id in rest {
        c.disconnect(id);
    }
    c.propose(leader, command(104, 8))
        .expect("still the leader for now");
    c.run_for(2 * c.cfg.election_timeout());
    assert_eq!(c.applied_count(104), 0, "committed without a majority");
}

#[test]
fn agreement_survives_leader_failure() {
    let mut c = cluster(3, 14);
    let l1 = c.wait_leader(5_000 * MS);
    c.one(101, 8, 3);
    c.disconnect(l1);
    c.one(102, 8, 2);
    let l2 = c.stable_leader().unwrap();
    c.disconnect(l2);
    for id in c.ids() {
        let _ = c.propose(id, command(103, 8));
    }
    c.run_for(2 * c.cfg.election_timeout());
    assert_eq!(c.applied_count(103), 0, "committed without a majority");
}

#[test]
fn agreement_despite_a_disconnected_follower_and_its_catch_up() {
    let mut c = cluster(3, 15);
    let leader = c.wait_leader(5_000 * MS);
    c.one(101, 8, 3);
    let f = other_than(&c, &[leader])[0];
    c.disconnect(f);
    for cmd in 102..=105 {
        c.one(cmd, 8, 2);
    }
    c.connect(f);
    c.one(106, 8, 3);
    for cmd in 101..=106 {
        assert_eq!(c.applied_count(cmd), 3, "node {f} missing command {cmd}");
    }
}

#[test]
fn no_agreement_without_a_majority() {
    let mut c = cluster(5, 16);
    c.wait_leader(5_000 * MS);
    c.one(10, 8, 5);
    let leader = c.stable_leader().unwrap();
    let followers = other_than(&c, &[leader]);
    for &f in &followers[..3] {
        c.disconnect(f);
    }
    let index = c.propose(leader, command(20, 8)).unwrap();
    c.run_for(2 * c.cfg.election_timeout());
    assert_eq!(c.applied_count(20), 0, "committed with 2 of 5");
    for &f in &followers[..3] {
        c.connect(f);
    }
    // The cut-off majority may have elected a leader; either way agreement resumes.
    let index2 = c.one(30, 8, 5);
    assert!(index2 >= index);
}

#[test]
fn concurrent_proposals_all_commit_in_one_term() {
    let mut c = cluster(3, 17);
    let leader = c.wait_leader(5_000 * MS);
    let term = c.term_of(leader);
    let mut indexes: Vec<u64> = (0..5)
        .map(|i| c.propose(leader, command(200 + i, 8)).unwrap())
        .collect();
    let all = c.run_until(2_000 * MS, |c| (200..205).all(|i| c.applied_count(i) == 3));
    assert!(all, "concurrent proposals did not all commit");
    assert_eq!(c.term_of(leader), term);
    indexes.dedup();
    assert_eq!(indexes.len(), 5, "each proposal gets its own index");
}

#[test]
fn partitioned_old_leader_rejoins_and_is_repaired() {
    let mut c = cluster(3, 18);
    let l1 = c.wait_leader(5_000 * MS);
    c.one(101, 8, 3);
    c.disconnect(l1);
    // The old leader takes proposals it can never commit.
    for cmd in 102..=104 {
        let _ = c.propose(l1, command(cmd, 8));
    }
    c.one(103, 8, 2);
    let l2 = c.stable_leader().unwrap();
    c.disconnect(l2);
    c.connect(l1);
    c.one(104, 8, 2);
    c.connect(l2);
    c.one(105, 8, 3);
    assert_eq!(
        c.applied_count(102),
        0,
        "an uncommitted entry of the old leader survived"
    );
    c.check_acked_durable();
}

/// Fast backtracking: 5 nodes, 50 uncommittable entries on each side of two partitions.
#[test]
fn fast_backup_repairs_divergent_logs_in_few_round_trips() {
    let mut c = cluster(5, 19);
    c.wait_leader(5_000 * MS);
    c.one(1, 8, 5);
    let l1 = c.stable_leader().unwrap();
    let rest = other_than(&c, &[l1]);
    let (f1, others) = (rest[0], &rest[1..]);
    // Leader and one follower are cut off with 50 entries they cannot commit.
    for &o in others {
        c.disconnect(o);
    }
    for cmd in 0..50 {
        let _ = c.propose(l1, command(1_000 + cmd, 8));
    }
    c.run_for(c.cfg.election_timeout() / 2);
    c.disconnect(l1);
    c.disconnect(f1);
    for &o in others {
        c.connect(o);
    }
    for cmd in 0..50 {
        c.one(2_000 + cmd, 8, 3);
    }
    // Now the new leader and one more are cut off with 50 uncommitted entries of their own.
    let l2 = c.stable_leader().unwrap();
    let other = *others.iter().find(|&&o| o != l2).unwrap();
    c.disconnect(other);
    for cmd in 0..50 {
        let _ = c.propose(l2, command(3_000 + cmd, 8));
    }
    c.run_for(c.cfg.election_timeout() / 2);
    for id in c.ids() {
        c.disconnect(id);
    }
    // The first group returns with `other`: they must agree on 50 new entries.
    c.connect(l1);
    c.connect(f1);
    c.connect(other);
    for cmd in 0..50 {
        c.one(4_000 + cmd, 8, 3);
    }
    // Everyone returns; the divergent node l2 (50+ entries of a stale term) and the node
    // that missed the last 50 are repaired.
    let start = c.now;
    for id in c.ids() {
        c.connect(id);
    }
    c.one(5_000, 8, 5);
    let repair = c.now - start;
    let rejects = c.net.total().kind("append_reject");
    eprintln!(
        "final repair: {} ms; {rejects} rejected appends in all",
        repair / MS
    );
    assert!(repair < 300 * MS, "repair took {} ms", repair / MS);
    // Two nodes held 50 stale entries each when the third group formed; walking back one
    // entry per round trip would take 100+ rejections, the hint a couple per node.
    assert!(rejects <= 12, "repairs needed {rejects} rejected appends");
    c.check_acked_durable();
}

#[test]
fn message_counts_stay_low() {
    let mut c = cluster(3, 20);
    let leader = c.wait_leader(5_000 * MS);
    let election = c.net.total().messages;
    assert!(election <= 30, "first election: {election} messages");
    c.run_for(20 * MS);
    let before = c.net.total().kind("append");
    let term = c.term_of(leader);
    for cmd in 1..=12 {
        c.propose(leader, command(cmd, 8)).unwrap();
        let ok = c.run_until(1_000 * MS, |c| {
            c.node(leader).applied().iter().any(|a| a.1 == cmd)
        });
        assert!(ok);
    }
    assert_eq!(c.term_of(leader), term);
    let appends = c.net.total().kind("append") - before;
    assert!(appends <= 42, "12 commands took {appends} append messages");
    let idle_before = c.net.total().messages;
    c.run_for(1_000 * MS);
    let idle = c.net.total().messages - idle_before;
    assert!(idle <= 60, "one idle second took {idle} messages");
}

fn entries(terms: &[u64]) -> Vec<Entry> {
    terms
        .iter()
        .enumerate()
        .map(|(i, &term)| Entry {
            term,
            index: i as u64 + 1,
            kind: EntryKind::Normal,
            // Same (index, term) means the same command on every node, as in a real history.
            data: command(term * 1_000 + i as u64 + 1, 8),
        })
        .collect()
}

/// Figure 7: a leader of term 8 and six followers with missing, extra and conflicting entries.
#[test]
fn figure_7_divergent_follower_logs_are_repaired() {
    let logs: [&[u64]; 7] = [
        &[1, 1, 1, 4, 4, 5, 5, 6, 6, 6],       // the leader
        &[1, 1, 1, 4, 4, 5, 5, 6, 6],          // (a) missing one
        &[1, 1, 1, 4],                         // (b) missing many
        &[1, 1, 1, 4, 4, 5, 5, 6, 6, 6, 6],    // (c) one extra
        &[1, 1, 1, 4, 4, 5, 5, 6, 6, 6, 7, 7], // (d) extra entries of term 7
        &[1, 1, 1, 4, 4, 4, 4],                // (e) conflicting term 4 entries
        &[1, 1, 1, 2, 2, 2, 3, 3, 3, 3, 3],    // (f) conflicting terms 2 and 3
    ];
    let disks = logs
        .iter()
        .map(|l| Disk {
            hard_state: HardState {
                term: 7,
                vote: None,
                commit: 3,
            },
            entries: entries(l),
            snapshot: None,
            unsynced: None,
        })
        .collect();
    let mut c = Cluster::with_disks(SimConfig::new(7, sim::seed_or(21)), disks);
    c.campaign(1);
    let leader = c.wait_leader(1_000 * MS);
    assert_eq!(leader, 1, "(a), (b), (e), (f) vote for the leader's log");
    c.one(9_999, 8, 7);
    let want: Vec<Option<u64>> = (1..=12).map(|i| c.node(1).raft().term_at(i)).collect();
    for id in 2..=7 {
        let got: Vec<Option<u64>> = (1..=12).map(|i| c.node(id).raft().term_at(i)).collect();
        assert_eq!(
            got, want,
            "follower {id} was not repaired to the leader's log"
        );
    }
    assert_eq!(
        &want[..10],
        &entries(logs[0])
            .iter()
            .map(|e| Some(e.term))
            .collect::<Vec<_>>()[..]
    );
}

/// §5.4.2 / Figure 8: a leader must not commit an entry of a previous term by counting
/// replicas, only as a side effect of committing an entry of its own term.
#[test]
fn leader_does_not_commit_previous_term_entries_by_counting() {
    // Node 1 holds an entry of term 2 at index 2 that nobody else has, and wins term 4.
    let restore = |entries: Vec<Entry>| RestoreState {
        hard_state: HardState {
            term: 3,
            vote: None,
            commit: 1,
        },
        entries,
        ..Default::default()
    };
    let mut cfg = Config::new(1, vec![1, 2, 3]);
    cfg.pre_vote = false;
    let mut leader = Raft::new(cfg, restore(entries(&[1, 2]))).unwrap();
    leader.campaign();
    let rd = leader.ready();
    leader.advance(&rd);
    let vote = |from| raft::Message {
        from,
        to: 1,
        term: 4,
        body: Body::VoteResponse {
            pre_vote: false,
            granted: true,
        },
    };
    leader.step(vote(2)).unwrap();
    assert!(leader.is_leader());
    assert_eq!(leader.term(), 4);
    let rd = leader.ready(); // persists the no-op at index 3
    leader.advance(&rd);
    let ack = |from, index| raft::Message {
        from,
        to: 1,
        term: 4,
        body: Body::AppendResponse {
            reject: false,
            index,
            hint: None,
        },
    };
    // Node 2 now holds index 2 (term 2): a majority has it, yet it must not commit.
    leader.step(ack(2, 2)).unwrap();
    assert_eq!(
        leader.commit_index(),
        1,
        "committed a term-2 entry by counting"
    );
    // Once the term-4 no-op is on a majority, both commit.
    leader.step(ack(2, 3)).unwrap();
    assert_eq!(leader.commit_index(), 3);
}

/// Figure 2, AppendEntries rule 5: commit up to min(leaderCommit, index of the last *new*
/// entry). Entries past what the leader just showed may be stale and must not commit.
#[test]
fn follower_commits_only_entries_the_leader_verified() {
    let state = RestoreState {
        hard_state: HardState {
            term: 2,
            vote: None,
            commit: 3,
        },
        // Indexes 4 and 5 are from a term-2 leader that never committed them.
        entries: entries(&[1, 1, 1, 2, 2]),
        ..Default::default()
    };
    let mut f = Raft::new(Config::new(2, vec![1, 2, 3]), state).unwrap();
    // The term-3 leader's log is [1, 1, 1, 3, 3, 3] with commit 6; it probes at index 3.
    let probe = raft::Message {
        from: 1,
        to: 2,
        term: 3,
        body: Body::Append {
            prev_index: 3,
            prev_term: 1,
            entries: vec![],
            commit: 6,
        },
    };
    f.step(probe).unwrap();
    assert_eq!(
        f.commit_index(),
        3,
        "committed stale entries past the verified prefix"
    );
}

#[test]
fn a_command_proposed_at_a_follower_is_forwarded_and_applied_everywhere_before_a_heartbeat() {
    let mut c = cluster(3, 21);
    let leader = c.wait_leader(5_000 * MS);
    c.one(1, 8, 3);
    // Let the last heartbeat round settle so the next one is a whole interval away.
    c.run_for(c.cfg.tick * c.cfg.heartbeat_tick / 2);
    let follower = other_than(&c, &[leader])[0];
    let before = c.net.total().by_kind.get("propose").copied().unwrap_or(0);
    let commands = (10..15).map(|cmd| command(cmd, 8)).collect();
    for p in c.propose_all_or_forward(follower, commands) {
        assert_eq!(p, Ok(raft::Proposal::Forwarded(leader)));
    }
    let forwarded = c.net.total().by_kind.get("propose").copied().unwrap_or(0) - before;
    assert_eq!(
        forwarded, 1,
        "five commands proposed together travel in one message"
    );
    let start = c.now;
    let everywhere = |c: &Cluster| (10..15).all(|cmd| c.applied_count(cmd) == 3);
    assert!(c.run_until(c.cfg.tick * c.cfg.heartbeat_tick, everywhere));
    // Loopback delivery and disk writes take a few ms here; a heartbeat interval is 100 ms.
    let took = c.now - start;
    assert!(
        took < c.cfg.tick * c.cfg.heartbeat_tick / 4,
        "followers learned the commit only after {took} µs"
    );
}

#[test]
fn a_follower_without_a_leader_refuses_to_forward() {
    let mut c = cluster(3, 22);
    let leader = c.wait_leader(5_000 * MS);
    let follower = other_than(&c, &[leader])[0];
    c.disconnect(follower);
    // Its election timer fires; as a (pre-)candidate it knows no leader.
    c.run_for(3 * c.cfg.election_timeout());
    assert_eq!(
        c.propose_or_forward(follower, command(7, 8)),
        Err(raft::Error::NoLeader)
    );
}
