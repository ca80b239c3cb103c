//! Persistence (§5, Figure 2's persistent state): crashes lose everything not yet durable,
//! and the cluster must still never lose or change a committed entry.

use rand::Rng;
use sim::{command, Cluster, Faults, SimConfig, MS};

fn cluster(nodes: usize, seed: u64) -> Cluster {
    Cluster::new(SimConfig::new(nodes, sim::seed_or(seed)))
}

#[test]
fn restart_all_then_the_leader() {
    let mut c = cluster(3, 31);
    c.wait_leader(5_000 * MS);
    c.one(11, 8, 3);
    for id in c.ids() {
        c.restart(id);
    }
    c.one(12, 8, 3);
    let l1 = c.stable_leader().unwrap();
    c.restart(l1);
    c.one(13, 8, 3);
    let l2 = c.stable_leader().unwrap();
    c.crash(l2);
    c.one(14, 8, 2);
    c.restart(l2);
    c.run_until(2_000 * MS, |c| c.applied_count(14) == 3);
    let l3 = c.stable_leader().unwrap();
    let f = c.ids().into_iter().find(|&i| i != l3).unwrap();
    c.crash(f);
    c.one(15, 8, 2);
    c.restart(f);
    c.one(16, 8, 3);
    c.check_acked_durable();
}

#[test]
fn crash_followers_in_rounds() {
    let mut c = cluster(5, 32);
    c.wait_leader(5_000 * MS);
    let mut cmd = 10;
    for _ in 0..5 {
        c.one(cmd, 8, 5);
        cmd += 1;
        let l = c.stable_leader().unwrap();
        let n = |k: u64| (l - 1 + k) % 5 + 1;
        c.crash(n(1));
        c.crash(n(2));
        c.one(cmd, 8, 3);
        cmd += 1;
        c.crash(l);
        c.crash(n(3));
        c.crash(n(4));
        c.restart(n(1));
        c.restart(n(2));
        c.run_for(c.cfg.election_timeout());
        c.restart(n(3));
        c.one(cmd, 8, 3);
        cmd += 1;
        c.restart(l);
        c.restart(n(4));
    }
    c.one(1_000, 8, 5);
    c.check_acked_durable();
}

#[test]
fn crash_while_partitioned() {
    let mut c = cluster(3, 33);
    c.wait_leader(5_000 * MS);
    c.one(101, 8, 3);
    let l = c.stable_leader().unwrap();
    let n = |k: u64| (l - 1 + k) % 3 + 1;
    c.disconnect(n(2));
    c.one(102, 8, 2);
    c.crash(l);
    c.crash(n(1));
    c.connect(n(2));
    c.restart(n(2));
    c.restart(l);
    c.one(103, 8, 2);
    c.restart(n(1));
    c.one(104, 8, 3);
    c.check_acked_durable();
}

/// Figure 8: crash the leader at random moments, so entries of old terms linger on some
/// nodes; a committed entry must never be overwritten.
fn figure_8(seed: u64, unreliable: bool) {
    let mut cfg = SimConfig::new(5, sim::seed_or(seed));
    if unreliable {
        cfg.disk_latency = (100, 2_000);
    }
    let mut c = Cluster::new(cfg);
    if unreliable {
        c.set_faults(Faults::UNRELIABLE);
    }
    c.wait_leader(10_000 * MS);
    c.one(1, 8, 1);
    let mut down: Vec<u64> = Vec::new();
    let mut cmd = 100;
    for iter in 0..1_000 {
        if unreliable && iter == 200 {
            // As in the paper's lab test: long reordering once the cluster is running.
            c.set_faults(Faults::UNRELIABLE_REORDERING);
        }
        let pause = if c.rng().gen_ratio(1, 10) {
            c.rng().gen_range(0..500 * MS)
        } else {
            c.rng().gen_range(0..13 * MS)
        };
        // Clients keep proposing to whoever leads, so leaders die with entries in flight.
        let end = c.now + pause;
        while c.now < end {
            for id in c.ids() {
                if c.is_up(id) && !down.contains(&id) && c.node(id).raft().is_leader() {
                    let _ = c.propose(id, command(cmd, 8));
                    cmd += 1;
                }
            }
            let slice = (end - c.now).min(4 * MS);
            c.run_for(slice);
        }
        let leader = c
            .ids()
            .into_iter()
            .find(|&id| c.is_up(id) && !down.contains(&id) && c.node(id).raft().is_leader());
        if let Some(l) = leader {
            if unreliable {
                c.disconnect(l);
            } else {
                c.crash(l);
            }
            down.push(l);
        }
        if down.len() >= 3 || (iter % 7 == 0 && !down.is_empty()) {
            let k = c.rng().gen_range(0..down.len());
            let id = down.swap_remove(k);
            if unreliable {
                c.connect(id);
            } else {
                c.restart(id);
            }
        }
    }
    c.set_faults(Faults::RELIABLE);
    for id in c.ids() {
        if unreliable {
            c.connect(id);
        } else if !c.is_up(id) {
            c.restart(id);
        }
    }
    c.one(1_000_000, 8, 5);
    c.check_acked_durable();
    let leaders = c.checker.terms_with_leader();
    let committed = c.acked.len();
    eprintln!("figure 8: {leaders} terms had a leader, {committed} commands committed");
    // Under long reordering most round trips outlast the election timeout, so elections
    // are rarer; the run is still full of stale messages, which is what it is for.
    let min_leaders = if unreliable { 5 } else { 20 };
    assert!(
        leaders >= min_leaders,
        "only {leaders} leaders: the run exercised too little"
    );
    assert!(committed >= 100, "only {committed} commands committed");
}

#[test]
fn figure_8_crashing_leaders() {
    figure_8(34, false);
}

#[test]
fn figure_8_unreliable_with_long_reordering() {
    figure_8(35, true);
}

/// Churn: clients propose all the time while nodes crash, restart, disconnect and rejoin.
/// Every value a client saw committed must be in the final log.
fn churn(seed: u64, unreliable: bool) {
    let mut c = cluster(5, seed);
    if unreliable {
        c.set_faults(Faults::UNRELIABLE);
    }
    let mut cmd = 1;
    for _ in 0..200 {
        // Three clients each try a random node, following a leader hint once.
        for _ in 0..3 {
            let id = c.rng().gen_range(1..=5);
            if !c.is_up(id) {
                continue;
            }
            if let Err(raft::Error::NotLeader { leader: Some(l) }) = c.propose(id, command(cmd, 8))
            {
                if c.is_up(l) {
                    let _ = c.propose(l, command(cmd, 8));
                }
            }
            cmd += 1;
        }
        let what = c.rng().gen_range(0..100);
        let id = c.rng().gen_range(1..=5);
        match what {
            0..=9 => c.disconnect(id),
            10..=29 => c.connect(id),
            30..=34 if c.is_up(id) => c.crash(id),
            35..=54 if !c.is_up(id) => c.restart(id),
            _ => {}
        }
        let pause = c.rng().gen_range(0..100 * MS);
        c.run_for(pause);
    }
    c.set_faults(Faults::RELIABLE);
    for id in c.ids() {
        c.connect(id);
        if !c.is_up(id) {
            c.restart(id);
        }
    }
    c.one(1_000_000, 8, 5);
    assert!(
        c.acked.len() > 20,
        "churn committed too little to mean anything"
    );
    c.check_acked_durable();
}

#[test]
fn churn_reliable() {
    churn(36, false);
}

#[test]
fn churn_unreliable() {
    churn(37, true);
}
