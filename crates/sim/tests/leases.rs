//! Leases and exactly-once sessions in the whole system: every member runs the production
//! lease clock on a clock that drifts (up to ±2%), under crashes, pauses, partitions and
//! leader hand-offs. The promises checked (see `sim::leases`): a lease is never expired
//! before TTL·(1 − 2%) from the send time of its grant or of any acknowledged keep-alive;
//! one nobody keeps alive goes within `System::lapse_bound` of a stable leader; a revoke
//! deletes every attached key at one revision; a session's numbered command runs once.

use sim::leases::{leased_key, promised, session_key, Ask, Heard, Role};
use sim::machine::Applied;
use sim::system::{System, SystemConfig};
use sim::{Micros, MS};

use kv::lessor::Renewal;
use kv::{LeaseResponse, Session};
use raft::NodeId;

/// The leader, running the lease clients meanwhile (so that a wait for an election does
/// not starve their keep-alives).
fn leader(s: &mut System) -> NodeId {
    for _ in 0..1_000 {
        if let Some(l) = s.leader() {
            return l;
        }
        s.run_with_leases(10 * MS);
    }
    s.fail("no leader within 10 s")
}

/// Run until `id`'s lease clock counts time; returns when it began to.
fn until_lease_clock_runs(s: &mut System, id: NodeId) -> Micros {
    for _ in 0..10_000 {
        if s.lease_clock_runs(id) {
            return s.now;
        }
        s.run_for(MS);
    }
    s.fail(&format!("member {id}'s lease clock never ran"))
}

/// Run until request `n` is answered; returns when.
fn until_heard(s: &mut System, n: u64) -> Micros {
    for _ in 0..2_000 {
        if s.heard(n).is_some() {
            return s.now;
        }
        s.run_for(MS);
    }
    s.fail(&format!("request {n} was never answered"))
}

fn store(s: &System, id: NodeId) -> &kv::Store {
    &s.driver(id).expect("up").machine().store
}

/// Faults at the leader, one after another, each shorter than the kept lease's TTL: a
/// crash, a pause (its clock runs on), a cut from the others, a hand-off to another
/// member. The lease kept alive throughout survives all of them, on clocks drifting 2%
/// apart in both directions; the one left to lapse goes; the session goes on.
#[test]
fn a_lease_kept_alive_is_never_revoked_through_crashes_pauses_cuts_and_hand_offs() {
    let mut cfg = SystemConfig::new(3, sim::seed_or(11));
    cfg.drift_ppm = vec![20_000, -20_000, 20_000];
    let mut s = System::new(cfg);
    leader(&mut s);
    let keeper = s.leases.add(Role::Keeper, Some((2, 3_600_000 * MS)));
    let lapser = s.leases.add(Role::Lapser, Some((1, 0)));
    let sessions = s.leases.add(Role::Sessions, Some((3, 3_600_000 * MS)));
    s.run_with_leases(1_000 * MS);
    let kept = s.leases.holding(keeper).expect("the keeper holds a lease");
    for round in 0..16 {
        let l = leader(&mut s);
        match round % 4 {
            0 => {
                s.crash(l);
                s.run_with_leases(800 * MS);
                s.restart(l);
            }
            1 => s.pause(l, 700 * MS),
            2 => {
                s.disconnect(l);
                s.run_with_leases(700 * MS);
                s.net.heal();
            }
            _ => {
                let to = l % 3 + 1;
                assert!(s.transfer(l, to), "round {round}: the hand-off began");
            }
        }
        s.run_with_leases(1_500 * MS);
    }
    assert_eq!(
        s.leases.holding(keeper),
        Some(kept),
        "the keeper still holds it"
    );
    let book = &s.leases.book;
    assert_eq!(
        book.leases[&kept].revoked, None,
        "the kept lease was never revoked"
    );
    assert!(
        book.acks > 40,
        "only {} keep-alives acknowledged",
        book.acks
    );
    let lapsed = s.leases.clients[lapser].granted[0];
    assert!(
        matches!(book.leases[&lapsed].revoked, Some((_, true))),
        "the lease left to lapse expired"
    );
    let session = s.leases.clients[sessions].granted[0];
    let answered = book.sessions.keys().filter(|k| k.0 == session).count();
    assert!(answered > 50, "only {answered} session commands answered");
    s.heal();
    s.check_converged();
    s.check_sessions();
}

/// A lease nobody keeps alive goes no earlier than its promise and no later than its bound
/// (TTL and the new-leader extension on a clock 2% slow, plus the time to revoke): with a
/// stable leader, counted from its grant's acknowledgement; after a leader change, from
/// when the new leader's lease clock began to run. Its keys go with it, all at one
/// revision.
#[test]
fn a_lease_nobody_keeps_alive_is_revoked_within_its_bound_with_its_keys_at_one_revision() {
    let mut cfg = SystemConfig::new(3, sim::seed_or(12));
    // Slow clocks: the latest the bound allows.
    cfg.drift_ppm = vec![-20_000; 3];
    let mut s = System::new(cfg);
    let l = s.wait_leader();
    until_lease_clock_runs(&mut s, l);
    let sent = s.now;
    let g = s.request(l, Ask::Grant(7, 1));
    let acked = until_heard(&mut s, g);
    let granted = Heard::Applied(Applied::Lease(Ok(LeaseResponse::Granted { id: 7, ttl: 1 })));
    assert_eq!(s.heard(g), Some(&granted));
    for j in 0..3 {
        s.request(l, Ask::Attach(7, leased_key(7, j)));
    }
    s.run_for(100 * MS);
    assert_eq!(store(&s, l).lease(7).unwrap().keys.len(), 3);
    let before = store(&s, l).revision();
    s.run_for(s.lapse_bound(1));
    let (at, expiry) = s.leases.book.leases[&7].revoked.expect("revoked");
    assert!(expiry, "the lease clock revoked it");
    assert!(at >= sent + promised(1), "not before its promise");
    assert!(at <= acked + s.lapse_bound(1), "within its bound");
    for id in s.ids() {
        let st = store(&s, id);
        assert!(st.lease(7).is_none());
        assert_eq!(st.revision(), before + 1, "member {id}: one revision");
        let deleted: Vec<_> = st
            .events_at(before + 1, None)
            .into_iter()
            .map(|e| (e.kind, e.kv.key))
            .collect();
        let keys: Vec<_> = (0..3)
            .map(|j| {
                (
                    kv::EventKind::Delete,
                    sim::machine::key(leased_key(7, j)).key,
                )
            })
            .collect();
        assert_eq!(deleted, keys, "member {id}: every key, at that revision");
    }
    // The leader goes; its successor's clock counts the lease from its own start.
    let g = s.request(l, Ask::Grant(8, 2));
    until_heard(&mut s, g);
    s.request(l, Ask::Attach(8, leased_key(8, 0)));
    s.run_for(20 * MS);
    s.crash(l);
    let next = s.wait_leader();
    let runs = until_lease_clock_runs(&mut s, next);
    s.run_for(s.lapse_bound(2));
    let (at, expiry) = s.leases.book.leases[&8].revoked.expect("revoked");
    assert!(expiry && at <= runs + s.lapse_bound(2), "within its bound");
    assert!(store(&s, next).lease(8).is_none());
}

/// A leader paused, and cut off from the others meanwhile, still leads in its own eyes
/// when it runs again — until it notices that no quorum answers. Keep-alives reaching it
/// then go to a ReadIndex round, which no quorum confirms: it renews nothing, and the new
/// leader expires the lease on time. (Renewing on its own word would promise a lease the
/// real leader is about to expire.)
#[test]
fn a_paused_leader_cut_off_from_the_cluster_renews_no_lease() {
    let mut s = System::new(SystemConfig::new(3, sim::seed_or(13)));
    let l1 = s.wait_leader();
    until_lease_clock_runs(&mut s, l1);
    let g = s.request(l1, Ask::Grant(5, 2));
    until_heard(&mut s, g);
    s.disconnect(l1);
    s.pause(l1, 1_000 * MS);
    s.run_for(1_000 * MS);
    let l2 = s.leader().expect("the others elected a leader");
    assert_ne!(l2, l1);
    assert!(
        s.lease_clock_runs(l1),
        "the paused leader still counts time"
    );
    let probes = s.probes;
    let mut sent = Vec::new();
    // CheckQuorum ends its reign within two election timeouts.
    for _ in 0..60 {
        if !s.lease_clock_runs(l1) {
            break;
        }
        sent.push(s.request(l1, Ask::KeepAlive(5)));
        s.run_for(20 * MS);
    }
    assert!(!s.lease_clock_runs(l1), "it noticed it no longer leads");
    s.run_for(500 * MS);
    assert!(
        s.probes > probes,
        "keep-alives reached its running lease clock"
    );
    for n in sent {
        assert!(
            !matches!(s.heard(n), Some(Heard::Renewal(Renewal::Renewed { .. }))),
            "keep-alive {n} was renewed by a leader no quorum confirmed"
        );
    }
    s.run_for(s.lapse_bound(2));
    let (_, expiry) = s.leases.book.leases[&5].revoked.expect("revoked");
    assert!(expiry, "the new leader expired it");
    s.net.heal();
    s.check_converged();
}

/// A new leader counts a checkpointed lease from the remaining TTL the old one recorded:
/// that record must never be shorter than what was left, or a lease is cut short by every
/// leader change after a checkpoint. The leader records a lease with 1.9 s left and hands
/// over at once; the lease must still live TTL·(1 − 2%) from its grant.
#[test]
fn a_checkpoint_never_shortens_a_lease_across_a_leader_change() {
    let mut cfg = SystemConfig::new(3, sim::seed_or(14));
    cfg.drift_ppm = vec![0; 3];
    cfg.checkpoint_interval = 1_100;
    let mut s = System::new(cfg);
    let l = s.wait_leader();
    until_lease_clock_runs(&mut s, l);
    let g = s.request(l, Ask::Grant(3, 3));
    until_heard(&mut s, g);
    // Until the checkpoint applies on every member.
    for _ in 0..2_000 {
        if s.ids()
            .iter()
            .all(|&id| store(&s, id).lease(3).unwrap().remaining > 0)
        {
            break;
        }
        s.run_for(MS);
    }
    let to = l % 3 + 1;
    assert!(s.transfer(l, to));
    s.run_for(s.lapse_bound(3));
    // The book fails the run if the revoke came before its promise; it must have come.
    let (_, expiry) = s.leases.book.leases[&3].revoked.expect("revoked");
    assert!(expiry);
}

/// A renewal of a checkpointed lease is acknowledged only once the checkpoint is cleared
/// through the log: else a leader taking over right after would count the lease from the
/// older, shorter record, and expire it before the renewal's promise.
#[test]
fn a_renewal_clears_the_leases_checkpoint_before_it_is_acknowledged() {
    let mut cfg = SystemConfig::new(3, sim::seed_or(16));
    cfg.drift_ppm = vec![0; 3];
    cfg.checkpoint_interval = 1_100;
    let mut s = System::new(cfg);
    let l = s.wait_leader();
    until_lease_clock_runs(&mut s, l);
    let g = s.request(l, Ask::Grant(4, 3));
    until_heard(&mut s, g);
    for _ in 0..2_000 {
        if store(&s, l).lease(4).unwrap().remaining > 0 {
            break;
        }
        s.run_for(MS);
    }
    assert!(store(&s, l).lease(4).unwrap().remaining > 0, "checkpointed");
    let k = s.request(l, Ask::KeepAlive(4));
    until_heard(&mut s, k);
    assert!(matches!(
        s.heard(k),
        Some(Heard::Renewal(Renewal::Renewed { .. }))
    ));
    assert_eq!(
        store(&s, l).lease(4).unwrap().remaining,
        0,
        "the checkpoint was cleared before the renewal was acknowledged"
    );
    let to = l % 3 + 1;
    assert!(s.transfer(l, to));
    s.run_for(s.lapse_bound(3));
    // The book fails the run if the revoke came before the renewal's promise.
    let (_, expiry) = s.leases.book.leases[&4].revoked.expect("revoked");
    assert!(expiry);
}

/// A keep-alive that arrives while the leader's checkpoint of its lease is in the log but
/// not yet applied there (its disk is slow) is renewed — and must still clear that
/// checkpoint before it is acknowledged: once the checkpoint applies, it records the
/// remaining TTL from before the renewal, and a leader taking over counts from that.
#[test]
fn a_renewal_racing_a_checkpoint_in_flight_still_clears_it() {
    let mut cfg = SystemConfig::new(3, sim::seed_or(17));
    cfg.drift_ppm = vec![0; 3];
    cfg.checkpoint_interval = 1_100;
    let mut s = System::new(cfg);
    let l = s.wait_leader();
    until_lease_clock_runs(&mut s, l);
    let g = s.request(l, Ask::Grant(4, 3));
    until_heard(&mut s, g);
    // Just before the checkpoint is due, the leader's disk slows down; the checkpoint
    // commits on the others' acknowledgements, and applies at the leader much later.
    s.run_for(1_050 * MS);
    s.stall_disk(l, 400 * MS);
    let last = s.driver(l).unwrap().raft().last_index();
    for _ in 0..3_000 {
        if s.driver(l).unwrap().raft().last_index() > last {
            break;
        }
        s.run_for(100);
    }
    assert!(
        s.driver(l).unwrap().raft().last_index() > last,
        "checkpoint proposed"
    );
    let k = s.request(l, Ask::KeepAlive(4));
    let renewed = until_heard(&mut s, k);
    assert!(matches!(
        s.heard(k),
        Some(Heard::Renewal(Renewal::Renewed { .. }))
    ));
    // A hand-off right after the renewal, once the others applied the checkpoint.
    s.run_for(20 * MS);
    let to = l % 3 + 1;
    assert!(s.transfer(l, to));
    s.run_for(s.lapse_bound(3));
    // The book fails the run if the lease expires before the renewal's promise.
    let (at, expiry) = s.leases.book.leases[&4].revoked.expect("revoked");
    assert!(expiry && at >= renewed, "expired after the renewal");
}

/// Exactly once: the leader crashes after its session command committed (on the others)
/// and before it applied it and answered — its disk is stalled. The client retries with the
/// same session and number at the new leader, and is answered from the session's memory:
/// the counter key's version shows one run, and the answer carries the revision of that
/// run. The same retry without the session runs again (the behaviour without a tag).
#[test]
fn a_retry_after_the_leader_crashed_runs_once_and_gets_the_first_answer() {
    let mut s = System::new(SystemConfig::new(3, sim::seed_or(15)));
    let l = s.wait_leader();
    until_lease_clock_runs(&mut s, l);
    let g = s.request(l, Ask::Grant(9, 30));
    until_heard(&mut s, g);
    let once = Session { lease: 9, seq: 1 };
    s.stall_disk(l, 2_000 * MS);
    let first = s.request(l, Ask::Session(once));
    let index = s.driver(l).unwrap().raft().last_index();
    s.run_for(150 * MS);
    let d = s.driver(l).unwrap().raft();
    assert!(d.commit_index() >= index, "committed");
    assert!(d.applied() < index, "not applied at the leader");
    assert_eq!(s.heard(first), None, "not answered");
    let ran = s
        .first_applied(first)
        .cloned()
        .expect("applied on a follower");
    s.crash(l);
    let next = s.wait_leader();
    let retry = s.request(next, Ask::Session(once));
    until_heard(&mut s, retry);
    assert_eq!(s.heard(retry), Some(&Heard::Applied(ran.clone())));
    let Applied::Session(Ok(rev)) = ran else {
        panic!("the first run answered {ran:?}");
    };
    let counter = |s: &System| {
        let req = kv::RangeRequest {
            range: sim::machine::key(session_key(9)),
            ..Default::default()
        };
        let st = store(s, next);
        st.range(&req, st.revision()).unwrap().kvs[0].clone()
    };
    assert_eq!(counter(&s).version, 1, "it ran once");
    assert_eq!(counter(&s).mod_revision, rev, "the answer is the run's");
    // (Another value, so the session check below does not count it as the session's.)
    let plain = s.request(next, Ask::Put(session_key(9), 1_000));
    until_heard(&mut s, plain);
    assert_eq!(
        counter(&s).version,
        2,
        "a retry without a session runs again"
    );
    s.restart(l);
    s.check_converged();
    s.check_sessions();
}
