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
    assert_eq!(c.transfer_leader(leader, 42), Err(Error::UnknownNode(42)));
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
                    voters: vec![1, 2, 3],
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

/// Thousands of random, mostly nonsensical messages into nodes in every role. Nothing may
/// panic (debug assertions included), and a node must still produce sane output.
#[test]
fn random_and_malformed_messages_never_panic() {
    let mut rng = ChaCha8Rng::seed_from_u64(sim::seed_or(72));
    for round in 0..300 {
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
                assert!(m.to != 1 && (1..=3).contains(&m.to), "sent to {}", m.to);
            }
            node.advance(&rd);
        }
        assert!(node.commit_index() <= node.last_index());
    }
}
