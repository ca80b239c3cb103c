//! Bad input never panics the core: misuse gets an error, malformed or hostile messages are
//! dropped, and the node keeps working.

use bytes::Bytes;
use raft::{
    Body, Config, ConflictHint, Entry, EntryKind, Error, Message, Raft, RestoreState, SnapshotMeta,
};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use sim::{Cluster, SimConfig, MS};

#[test]
fn a_proposal_on_a_follower_names_the_leader() {
    let mut c = Cluster::new(SimConfig::new(3, sim::seed_or(71)));
    let leader = c.wait_leader(5_000 * MS);
    c.run_for(200 * MS); // heartbeats tell every follower who leads
    let f = c.ids().into_iter().find(|&i| i != leader).unwrap();
    assert_eq!(
        c.propose(f, sim::command(1, 8)),
        Err(Error::NotLeader {
            leader: Some(leader)
        })
    );
    assert_eq!(
        c.transfer_leader(f, leader),
        Err(Error::NotLeader {
            leader: Some(leader)
        })
    );
    assert_eq!(c.transfer_leader(leader, 42), Err(Error::NotAVoter(42)));
}

#[test]
fn invalid_configurations_are_refused_with_a_reason() {
    let bad = [
        Config::new(0, vec![0, 1]),
        Config::new(4, vec![1, 2, 3]),
        Config::new(1, vec![1, 1, 2]),
        {
            let mut c = Config::new(1, vec![1]);
            c.election_tick = 1;
            c
        },
        {
            let mut c = Config::new(1, vec![1]);
            c.read_mode = raft::ReadMode::LeaseBased;
            c.check_quorum = false;
            c
        },
    ];
    for cfg in bad {
        match Raft::new(cfg, RestoreState::default()) {
            Err(Error::InvalidConfig(why)) => assert!(!why.is_empty()),
            other => panic!("accepted a bad configuration: {:?}", other.err()),
        }
    }
    // Durable state that is not one contiguous log is refused too.
    let gap = RestoreState {
        entries: vec![entry(1, 1), entry(3, 1)],
        hard_state: raft::HardState {
            term: 1,
            ..Default::default()
        },
        ..Default::default()
    };
    assert!(Raft::new(Config::new(1, vec![1, 2, 3]), gap).is_err());
}

fn entry(index: u64, term: u64) -> Entry {
    Entry {
        term,
        index,
        kind: EntryKind::Normal,
        data: Bytes::from_static(b"x"),
    }
}

fn random_message(rng: &mut ChaCha8Rng) -> Message {
    let small = |rng: &mut ChaCha8Rng| rng.gen_range(0..20u64);
    let body = match rng.gen_range(0..13) {
        0 => Body::Append {
            prev_index: small(rng),
            prev_term: small(rng),
            entries: (0..rng.gen_range(0..4))
                .map(|_| entry(small(rng), small(rng)))
                .collect(),
            commit: small(rng),
        },
        1 => Body::AppendResponse {
            reject: rng.gen(),
            index: small(rng),
            hint: rng.gen::<bool>().then(|| ConflictHint {
                term: rng.gen::<bool>().then(|| small(rng)),
                first_index: small(rng),
            }),
        },
        2 => Body::Heartbeat {
            commit: small(rng),
            seq: small(rng),
        },
        3 => Body::HeartbeatResponse { seq: small(rng) },
        4 => Body::Vote {
            pre_vote: rng.gen(),
            transfer: rng.gen(),
            last_index: small(rng),
            last_term: small(rng),
        },
        5 => Body::VoteResponse {
            pre_vote: rng.gen(),
            granted: rng.gen(),
        },
        6 => Body::TimeoutNow,
        7 => Body::ReadIndex { ctx: small(rng) },
        8 => Body::ReadIndexResponse {
            ctx: small(rng),
            index: small(rng),
        },
        9 => {
            let total = small(rng);
            Body::InstallSnapshot {
                meta: SnapshotMeta {
                    index: small(rng),
                    term: small(rng),
                    membership: raft::Membership::new(vec![1, 2, 3]),
                },
                offset: small(rng),
                total,
                data: vec![7; rng.gen_range(0..25)].into(),
            }
        }
        10 => Body::Propose {
            data: (0..rng.gen_range(0..3))
                .map(|_| vec![7; rng.gen_range(0..9)].into())
                .collect(),
        },
        11 => Body::Commit { commit: small(rng) },
        _ => Body::SnapshotResponse {
            index: small(rng),
            received: small(rng),
            reject: rng.gen(),
        },
    };
    Message {
        from: rng.gen_range(0..5),
        to: rng.gen_range(0..4),
        term: small(rng),
        body,
    }
}

/// A barrage of random, mostly nonsensical messages into one node that starts as a follower
/// or a candidate. Nothing may panic (debug assertions included), and the node's output must
/// stay sane: it only ever addresses its peers, and never commits past its log.
fn barrage(seed: u64, rounds: usize) {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    for round in 0..rounds {
        let mut node = Raft::new(Config::new(1, vec![1, 2, 3]), RestoreState::default()).unwrap();
        if round % 2 == 0 {
            node.campaign(); // some start as candidates
        }
        for _ in 0..200 {
            let _ = node.step(random_message(&mut rng));
            if rng.gen_ratio(1, 10) {
                node.tick();
            }
            if rng.gen_ratio(1, 10) {
                let _ = node.propose(Bytes::from_static(b"p"));
                let _ = node.read_index(rng.gen());
            }
            let rd = node.ready();
            for m in rd.messages.iter().chain(&rd.persisted_messages) {
                assert_eq!(m.from, 1);
                // Strangers (4) are answered too: one may lead a configuration this node
                // has not heard of yet.
                assert!(m.to != 1 && (1..=4).contains(&m.to), "sent to {}", m.to);
            }
            node.advance(&rd);
        }
        assert!(node.commit_index() <= node.last_index());
    }
}

/// Run `f` for each seed of `seeds` (or only `SIM_SEED`), naming the seed of any failure.
fn for_seeds(seeds: std::ops::Range<u64>, f: impl Fn(u64) + std::panic::RefUnwindSafe) {
    let seeds: Vec<u64> = match std::env::var("SIM_SEED").ok().and_then(|s| s.parse().ok()) {
        Some(one) => vec![one],
        None => seeds.collect(),
    };
    for seed in seeds {
        if std::panic::catch_unwind(|| f(seed)).is_err() {
            panic!("failed at seed {seed}; replay with SIM_SEED={seed}");
        }
    }
}

#[test]
fn random_and_malformed_messages_never_panic() {
    for_seeds(0..1_000, |seed| barrage(seed, 10));
}

/// Seeds 1 and 11 crashed a follower before entries were checked at the core's entry: an
/// `Append` whose entries skipped indexes reached the log's slicing (issue 9, defect 1).
#[test]
fn seeds_that_crashed_a_follower_with_a_gapped_append() {
    barrage(1, 300);
    barrage(11, 300);
}

/// The defect's own example: a follower holding (1,1),(2,1) is sent entries (2,1),(5,1) after
/// (1,1). It refuses the message, keeps its log, and still accepts a well-formed append.
#[test]
fn an_append_with_a_gap_is_refused_and_changes_nothing() {
    let mut node = Raft::new(
        Config::new(1, vec![1, 2, 3]),
        RestoreState {
            entries: vec![entry(1, 1), entry(2, 1)],
            hard_state: raft::HardState {
                term: 1,
                ..Default::default()
            },
            ..Default::default()
        },
    )
    .unwrap();
    let append = |entries: Vec<Entry>| Message {
        from: 2,
        to: 1,
        term: 1,
        body: Body::Append {
            prev_index: 1,
            prev_term: 1,
            entries,
            commit: 0,
        },
    };
    let gapped = append(vec![entry(2, 1), entry(5, 1)]);
    assert!(matches!(node.step(gapped), Err(Error::InvalidMessage(_))));
    assert_eq!((node.last_index(), node.refused_messages()), (2, 1));
    assert_eq!(node.step(append(vec![entry(2, 1), entry(3, 1)])), Ok(()));
    assert_eq!(node.last_index(), 3);
}

/// A message that breaks the protocol's rules in one of the ways a buggy or hostile peer
/// could, addressed to `to` and claiming to come from a member (or not).
fn malformed(rng: &mut ChaCha8Rng, to: u64, term: u64) -> Message {
    let from = if to == 1 { 2 } else { 1 };
    let high = term + rng.gen_range(0..3);
    let (from, to, body) = match rng.gen_range(0..7) {
        0 => {
            // Entries that skip an index, at a term that would win the follower over.
            let at = rng.gen_range(1..50);
            let entries = vec![entry(at + 1, high), entry(at + rng.gen_range(3..6), high)];
            (from, to, append_body(at, 0, entries))
        }
        1 => {
            // Entry terms that fall.
            let entries = vec![entry(1, high), entry(2, high - 1)];
            (from, to, append_body(0, 0, entries))
        }
        2 => {
            let offset = rng.gen_range(0..u64::MAX / 2);
            let body = Body::InstallSnapshot {
                meta: SnapshotMeta {
                    index: 1_000,
                    term: high,
                    membership: raft::Membership::new(vec![1, 2, 3]),
                },
                offset,
                total: offset.saturating_add(rng.gen_range(0..4)),
                data: vec![1; 8].into(),
            };
            (from, to, body)
        }
        3 => {
            let body = Body::InstallSnapshot {
                meta: SnapshotMeta {
                    index: 1_000,
                    term: high,
                    membership: raft::Membership::new(vec![]),
                },
                offset: 0,
                total: 8,
                data: vec![1; 8].into(),
            };
            (from, to, body)
        }
        4 => {
            let body = Body::AppendResponse {
                reject: true,
                index: rng.gen_range(0..50),
                hint: Some(ConflictHint {
                    term: None,
                    first_index: 0,
                }),
            };
            (from, to, body)
        }
        5 => {
            // A configuration entry whose bytes are no configuration.
            let mut e = entry(1, high);
            e.kind = raft::EntryKind::ConfChange;
            e.data = vec![1, 9, 9, 9].into();
            (from, to, append_body(0, 0, vec![e]))
        }
        _ => {
            let body = Body::Vote {
                pre_vote: rng.gen(),
                transfer: true,
                last_index: 1_000,
                last_term: high + 1,
            };
            (from, to, body)
        }
    };
    Message {
        from,
        to,
        term: high,
        body,
    }
}

fn append_body(prev_index: u64, prev_term: u64, entries: Vec<Entry>) -> Body {
    Body::Append {
        prev_index,
        prev_term,
        entries,
        commit: 1_000,
    }
}

/// More than "no panic": a member that was fed malformed messages, each of which would have
/// disrupted it had it been acted on, is refused every one, keeps its place, and the cluster
/// goes on electing and committing with it.
#[test]
fn a_member_fed_malformed_messages_still_serves_in_its_cluster() {
    for_seeds(0..1_000, |seed| {
        let mut cfg = SimConfig::new(3, seed);
        cfg.snapshot_threshold = Some(20);
        let mut c = Cluster::new(cfg);
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        c.wait_leader(5_000 * MS);
        let mut cmd = 1;
        for _ in 0..rng.gen_range(1..30) {
            c.one(cmd, 16, 3);
            cmd += 1;
        }
        let victim = rng.gen_range(1..=3);
        let before = c.node(victim).raft().refused_messages();
        let sent = rng.gen_range(10..60);
        for _ in 0..sent {
            let term = c.term_of(victim);
            let m = malformed(&mut rng, victim, term);
            let shown = format!("{m:?}");
            assert!(c.inject(m).is_err(), "accepted: {shown}");
            c.run_for(rng.gen_range(0..5) * MS);
        }
        let refused = c.node(victim).raft().refused_messages() - before;
        assert_eq!(refused, sent, "every malformed message is counted");
        // The cluster, the victim included, elects and commits as before.
        c.wait_leader(5_000 * MS);
        for _ in 0..3 {
            c.one(cmd, 16, 3);
            cmd += 1;
        }
        c.check_acked_durable();
    });
}
