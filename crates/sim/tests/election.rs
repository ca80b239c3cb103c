//! Leader election (§5.2) and the production extensions around it: PreVote, CheckQuorum and
//! leadership transfer. Every test runs in virtual time from a fixed seed (`SIM_SEED`
//! overrides it to replay a failure).

use sim::{Cluster, SimConfig, MS};

fn cluster(nodes: usize, seed: u64) -> Cluster {
    Cluster::new(SimConfig::new(nodes, sim::seed_or(seed)))
}

fn leaders(c: &Cluster) -> Vec<u64> {
    c.ids()
        .into_iter()
        .filter(|&id| c.is_up(id) && c.node(id).raft().is_leader())
        .collect()
}

#[test]
fn initial_election_elects_one_leader_and_keeps_it() {
    let mut c = cluster(3, 1);
    let leader = c.wait_leader(5_000 * MS);
    let term = c.term_of(leader);
    assert!(term >= 1);
    // With no failures, the leader and term stay put.
    c.run_for(10 * c.cfg.election_timeout());
    assert_eq!(leaders(&c), vec![leader]);
    assert_eq!(c.term_of(leader), term, "term changed without failures");
    for id in c.ids() {
        assert_eq!(c.node(id).raft().leader(), Some(leader));
    }
}

#[test]
fn reelection_after_leader_loss_and_rejoin() {
    let mut c = cluster(3, 2);
    let l1 = c.wait_leader(5_000 * MS);
    c.disconnect(l1);
    let l2 = c.wait_leader(5_000 * MS);
    assert_ne!(l1, l2);
    // The old leader rejoins: it must not disturb the new one.
    c.connect(l1);
    c.run_for(2 * c.cfg.election_timeout());
    assert_eq!(c.stable_leader(), Some(l2));
    // No quorum: no leader.
    let other = c.ids().into_iter().find(|&i| i != l2 && i != l1).unwrap();
    c.disconnect(l2);
    c.disconnect(other);
    c.run_for(4 * c.cfg.election_timeout());
    assert!(
        !c.node(l1).raft().is_leader(),
        "a lone node must not become leader"
    );
    // A quorum again: a leader.
    c.connect(other);
    c.wait_leader(5_000 * MS);
    c.connect(l2);
    c.run_for(2 * c.cfg.election_timeout());
    assert!(c.stable_leader().is_some());
}

#[test]
fn many_elections_with_three_of_seven_disconnected() {
    let mut c = cluster(7, 3);
    c.wait_leader(5_000 * MS);
    for round in 0..10u64 {
        let mut ids = c.ids();
        // Deterministic but varied choice of three nodes to cut off.
        let cut: Vec<u64> = (0..3)
            .map(|k| ids.remove(((round * 5 + k * 3) % ids.len() as u64) as usize))
            .collect();
        for &id in &cut {
            c.disconnect(id);
        }
        let leader = c.wait_leader(5_000 * MS);
        assert!(
            !cut.contains(&leader),
            "round {round}: a cut-off node leads"
        );
        for &id in &cut {
            c.connect(id);
        }
    }
    c.wait_leader(5_000 * MS);
}

#[test]
fn prevote_stops_a_rejoining_node_from_raising_the_term() {
    let mut c = cluster(3, 4);
    let leader = c.wait_leader(5_000 * MS);
    let term = c.term_of(leader);
    let f = c.ids().into_iter().find(|&i| i != leader).unwrap();
    c.disconnect(f);
    // Many election timeouts alone: PreVote never succeeds, so the term never moves.
    c.run_for(20 * c.cfg.election_timeout());
    assert_eq!(c.term_of(f), term, "an isolated node raised its term");
    c.connect(f);
    c.run_for(4 * c.cfg.election_timeout());
    assert_eq!(
        c.stable_leader(),
        Some(leader),
        "the rejoining node disrupted the leader"
    );
    assert_eq!(c.term_of(leader), term);
}

#[test]
fn without_prevote_a_rejoining_node_disrupts_the_leader() {
    // The counterpart of the test above: shows what PreVote prevents.
    let mut cfg = SimConfig::new(3, sim::seed_or(4));
    cfg.pre_vote = false;
    cfg.check_quorum = false;
    let mut c = Cluster::new(cfg);
    let leader = c.wait_leader(5_000 * MS);
    let term = c.term_of(leader);
    let f = c.ids().into_iter().find(|&i| i != leader).unwrap();
    c.disconnect(f);
    c.run_for(20 * c.cfg.election_timeout());
    assert!(c.term_of(f) > term);
    c.connect(f);
    c.run_for(4 * c.cfg.election_timeout());
    assert!(
        c.term_of(leader) > term,
        "the higher term deposed the leader"
    );
}

#[test]
fn check_quorum_deposes_an_isolated_leader() {
    let mut c = cluster(3, 5);
    let leader = c.wait_leader(5_000 * MS);
    c.disconnect(leader);
    // Nothing reaches the old leader; it must step down on its own.
    let stepped_down = c.run_until(2 * c.cfg.election_timeout(), |c| {
        !c.node(leader).raft().is_leader()
    });
    assert!(stepped_down, "an isolated leader kept leading");
}

#[test]
fn leadership_transfer_moves_the_leader_within_two_election_timeouts() {
    let mut c = cluster(3, 6);
    let leader = c.wait_leader(5_000 * MS);
    for i in 0..5 {
        c.one(i, 8, 3);
    }
    let target = c.ids().into_iter().find(|&i| i != leader).unwrap();
    let start = c.now;
    c.transfer_leader(leader, target).unwrap();
    let moved = c.run_until(2 * c.cfg.election_timeout(), |c| {
        c.stable_leader() == Some(target)
    });
    assert!(moved, "transfer did not complete");
    assert!(c.now - start <= 2 * c.cfg.election_timeout());
    // Proposals work under the new leader.
    c.one(100, 8, 3);
}

#[test]
fn leadership_transfer_to_a_lagging_follower_catches_it_up_first() {
    let mut c = cluster(3, 7);
    let leader = c.wait_leader(5_000 * MS);
    let target = c.ids().into_iter().find(|&i| i != leader).unwrap();
    c.disconnect(target);
    for i in 0..20 {
        c.one(i, 64, 2);
    }
    c.connect(target);
    let start = c.now;
    c.transfer_leader(leader, target).unwrap();
    // Proposals are refused while the transfer runs.
    assert!(c.propose(leader, sim::command(999, 8)).is_err());
    let moved = c.run_until(2 * c.cfg.election_timeout(), |c| {
        c.stable_leader() == Some(target)
    });
    assert!(moved, "transfer to a lagging node did not complete");
    assert!(c.now - start <= 2 * c.cfg.election_timeout());
    for i in 0..20 {
        assert_eq!(
            c.node(target).applied().iter().filter(|a| a.1 == i).count(),
            1
        );
    }
}

#[test]
fn election_timeouts_spread_over_t_to_2t() {
    use raft::{Body, Config, Raft, RestoreState};
    let t = 30;
    let mut seen = std::collections::BTreeSet::new();
    for seed in 0..2_000 {
        let mut cfg = Config::new(1, vec![1, 2, 3]);
        cfg.election_tick = t;
        cfg.heartbeat_tick = 3;
        cfg.seed = seed;
        let mut r = Raft::new(cfg, RestoreState::default()).unwrap();
        let mut ticks = 0;
        loop {
            r.tick();
            ticks += 1;
            let rd = r.ready();
            if rd
                .messages
                .iter()
                .any(|m| matches!(m.body, Body::Vote { .. }))
            {
                break;
            }
            assert!(ticks < 10 * t, "no campaign");
        }
        seen.insert(ticks);
    }
    assert!(*seen.first().unwrap() >= t, "timeout below T: {seen:?}");
    assert!(
        *seen.last().unwrap() < 2 * t,
        "timeout at or above 2T: {seen:?}"
    );
    assert_eq!(
        seen.len() as u64,
        t,
        "every tick in [T, 2T) should occur: {seen:?}"
    );
}

#[test]
fn simultaneous_timeouts_are_rare() {
    // 1,000 fresh 5-node clusters: how often does more than one node start campaigning
    // before the first leader is elected (a possible split vote)?
    let mut simultaneous = 0;
    for round in 0..1_000u64 {
        let mut c = Cluster::new(SimConfig::new(5, sim::seed_or(10_000 + round)));
        c.wait_leader(5_000 * MS);
        let campaigners = c
            .ids()
            .into_iter()
            .filter(|&id| c.counters(id).kind("pre_vote") + c.counters(id).kind("vote") > 0)
            .count();
        if campaigners > 1 {
            simultaneous += 1;
        }
    }
    assert!(
        simultaneous <= 300,
        "{simultaneous} of 1000 first elections had competing campaigns"
    );
    eprintln!("simultaneous first campaigns: {simultaneous}/1000");
}

#[test]
fn first_election_uses_few_messages() {
    let mut c = cluster(3, 8);
    c.wait_leader(5_000 * MS);
    let total = c.net.total().messages;
    assert!(total <= 30, "first election took {total} messages");
}

/// With CheckQuorum off nothing shields followers but PreVote itself. A follower that lost
/// only the leader (a partial partition) falls behind and keeps asking the other follower,
/// which must refuse without moving its own term.
#[test]
fn prevote_requests_do_not_raise_the_receivers_term() {
    let mut cfg = SimConfig::new(3, sim::seed_or(9));
    cfg.check_quorum = false;
    let mut c = Cluster::new(cfg);
    let leader = c.wait_leader(5_000 * MS);
    let term = c.term_of(leader);
    let others: Vec<u64> = c.ids().into_iter().filter(|&i| i != leader).collect();
    let (f, a) = (others[0], others[1]);
    c.net.block(leader, f);
    c.net.block(f, leader);
    for cmd in 1..=5 {
        c.one(cmd, 8, 2);
    }
    let asked = c.counters(f).kind("pre_vote");
    c.run_for(20 * c.cfg.election_timeout());
    assert!(
        c.counters(f).kind("pre_vote") > asked + 10,
        "the cut-off node never asked"
    );
    assert_eq!(
        c.term_of(a),
        term,
        "a refused pre-vote moved the receiver's term"
    );
    assert_eq!(c.term_of(leader), term);
    assert!(c.node(leader).raft().is_leader());
}

/// Persistence before answering (§5.2): a vote leaves only after it is durable. Otherwise
/// a node that crashes right after voting could vote again in the same term after restart,
/// and two leaders could be elected.
#[test]
fn a_vote_is_not_sent_before_it_is_durable() {
    use raft::{Body, Config, Message, Raft, RestoreState};
    let mut voter = Raft::new(Config::new(3, vec![1, 2, 3]), RestoreState::default()).unwrap();
    let request = |from| Message {
        from,
        to: 3,
        term: 2,
        body: Body::Vote {
            pre_vote: false,
            transfer: false,
            last_index: 0,
            last_term: 0,
        },
    };
    voter.step(request(1)).unwrap();
    let rd = voter.ready();
    let granted = |msgs: &[Message]| {
        msgs.iter().any(|m| {
            matches!(
                m.body,
                Body::VoteResponse {
                    granted: true,
                    pre_vote: false
                }
            )
        })
    };
    assert!(!granted(&rd.messages), "vote sent before it was persisted");
    assert!(granted(&rd.persisted_messages));
    assert_eq!(rd.hard_state.map(|h| (h.term, h.vote)), Some((2, Some(1))));
    // Had it been persisted, a second candidate in the same term is refused.
    voter.advance(&rd);
    voter.step(request(2)).unwrap();
    let rd = voter.ready();
    assert!(!granted(&rd.persisted_messages) && !granted(&rd.messages));
}
