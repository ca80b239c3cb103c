//! The soak: one seed draws a cluster, a schedule of faults (crashes, restarts, partitions,
//! lossy links, pauses, leader hand-offs) and a workload of clients doing single-key
//! operations, each with one request outstanding, alongside watch and lease clients; then
//! everything heals and every check runs. Faults and operations are drawn from one plan and
//! the lease settings from another, so that a seed replays its run exactly and the lease
//! draws did not change the fault schedules of earlier seeds.

use super::{System, SystemConfig, CLIENT_TIMEOUT};
use crate::linearizability::{self, Input, Operation, Verdict};
use crate::network::{Faults, MS};
use raft::NodeId;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::collections::HashMap;

/// Clients of the soak, each with at most one request outstanding.
const CLIENTS: u64 = 8;

#[derive(Clone, Debug, Default)]
pub struct Report {
    pub seed: u64,
    pub nodes: usize,
    pub operations: usize,
    pub acknowledged: usize,
    pub unknown: usize,
    pub crashes: u64,
    pub fail_stops: u64,
    pub inconclusive: bool,
    pub checks: u64,
    pub virtual_ms: u64,
    /// Watch streams resumed on another member after theirs crashed.
    pub watch_resumes: u64,
    pub pauses: u64,
    /// Leases granted (acknowledged), keep-alives acknowledged, leases the lease clock
    /// expired.
    pub leases: u64,
    pub keep_alives: u64,
    pub expiries: u64,
    /// Session numbers answered, and retries of a number that had run, answered from the
    /// session's memory.
    pub session_answers: u64,
    pub session_retries: u64,
}

/// One seed: a random schedule of faults under clients doing single-key operations on a few
/// keys, watch clients, and lease clients (some in sessions); then heal, converge, and
/// check the history, the watches and the leases. Panics with the seed on any violation.
pub fn soak(seed: u64, trace: bool) -> Report {
    soak_inner(seed, trace).0
}

/// The checked history of one soak seed (for investigating a seed).
pub fn soak_history(seed: u64) -> Vec<Operation> {
    soak_inner(seed, false).1
}

fn soak_inner(seed: u64, trace: bool) -> (Report, Vec<Operation>) {
    let mut plan = ChaCha8Rng::seed_from_u64(seed ^ 0x0a11);
    let nodes = if plan.gen_bool(0.5) { 3 } else { 5 };
    let mut cfg = SystemConfig::new(nodes, seed);
    cfg.trace = trace;
    cfg.snapshot_count = *[0, 10, 50].choose(&mut plan).unwrap();
    cfg.disk_failure = *[0.0, 0.0, 0.002].choose(&mut plan).unwrap();
    cfg.restore_failure = *[0.0, 0.3].choose(&mut plan).unwrap();
    // Leases drawn apart from the plan, so that the fault schedules stay as they were.
    let mut lease_plan = ChaCha8Rng::seed_from_u64(seed ^ 0x1ea5e);
    cfg.checkpoint_interval = *[400, 700, 1_100, 600_000].choose(&mut lease_plan).unwrap();
    let mut s = System::new(cfg);
    s.add_watchers(3);
    s.add_lease_clients(4);
    if std::thread::current().name().is_some_and(|n| n != "main") {
        s.replay = format!("SIM_SEED={seed} cargo test -p sim --release --test system");
    }
    let mut r = Report {
        seed,
        nodes,
        ..Default::default()
    };
    let keys = plan.gen_range(1..4u64);
    let mut next_value = 1u64;
    let mut outstanding: HashMap<u64, usize> = HashMap::new();
    for _ in 0..plan.gen_range(6..14) {
        fault(&mut s, &mut plan, &mut r);
        let end = s.now + plan.gen_range(100..1_000) * MS;
        while s.now < end {
            for _ in 0..plan.gen_range(0..4) {
                let id = plan.gen_range(1..=nodes as NodeId);
                let client = plan.gen_range(0..CLIENTS);
                // A client has one request outstanding at a time, until it is answered or
                // the client gives up on it.
                if let Some(&last) = outstanding.get(&client) {
                    let o: &Operation = &s.history[last];
                    if o.ret.is_none() && s.now <= o.call + CLIENT_TIMEOUT {
                        continue;
                    }
                }
                let k = plan.gen_range(0..keys);
                let input = match plan.gen_range(0..10) {
                    0..=3 => Input::Get,
                    4..=6 => Input::Put(next_value),
                    7 => Input::Delete,
                    _ => Input::Cas {
                        expect: (next_value > 1 && plan.gen_bool(0.7))
                            .then(|| plan.gen_range(1..next_value)),
                        new: next_value,
                    },
                };
                next_value += 1;
                let op = s.invoke(id, client, k, input);
                outstanding.insert(client, op);
            }
            let slice = plan.gen_range(1..30) * MS;
            s.run_for(slice);
            s.watch_turn();
            s.lease_turn();
        }
    }
    s.heal();
    s.check_converged();
    // Requests still waiting get a last chance to be answered.
    s.run_with_leases(1_000 * MS);
    s.check_leases();
    s.check_watchers();
    r.watch_resumes = s.watch.clients.iter().map(|c| c.resumes).sum();
    r.pauses = s.pauses;
    let book = &s.leases.book;
    r.leases = s
        .leases
        .clients
        .iter()
        .map(|c| c.granted.len() as u64)
        .sum();
    r.keep_alives = book.acks;
    r.expiries = book.expiries;
    r.session_answers = book.sessions.len() as u64;
    r.session_retries = s.session_dedups;
    let history = s.checked_history();
    r.operations = history.len();
    r.acknowledged = history.iter().filter(|o| o.ret.is_some()).count();
    r.unknown = r.operations - r.acknowledged;
    r.fail_stops = s.fail_stops;
    r.checks = s.checker.violations_checked;
    r.virtual_ms = s.now / MS;
    match linearizability::check(&history, 2_000_000) {
        Verdict::Linearizable => {}
        Verdict::Inconclusive => r.inconclusive = true,
        Verdict::Violation(why) => s.fail(&format!("not linearizable:\n{why}")),
    }
    if r.checks == 0 {
        s.fail("no safety check ran");
    }
    (r, history)
}

fn fault(s: &mut System, plan: &mut ChaCha8Rng, r: &mut Report) {
    let ids = s.ids();
    let id = *ids.choose(plan).unwrap();
    match plan.gen_range(0..100) {
        // A crash with requests in flight: their clients never learn the outcome.
        0..=19 if s.is_up(id) => {
            s.crash(id);
            r.crashes += 1;
        }
        20..=44 => {
            let down: Vec<NodeId> = ids.iter().copied().filter(|&i| !s.is_up(i)).collect();
            if let Some(&d) = down.choose(plan) {
                s.restart(d);
            }
        }
        45..=59 => {
            let mut shuffled = ids.clone();
            shuffled.shuffle(plan);
            let cut = plan.gen_range(1..ids.len());
            let (a, b) = shuffled.split_at(cut);
            s.net.heal();
            for &x in a {
                for &y in b {
                    s.net.block(x, y);
                    s.net.block(y, x);
                }
            }
        }
        60..=74 => s.net.heal(),
        // A pause, the leader's more often than not: its clock runs on.
        90..=95 => {
            let who = if plan.gen_bool(0.6) {
                s.leader().unwrap_or(id)
            } else {
                id
            };
            s.pause(who, plan.gen_range(100..1_500) * MS);
        }
        // The leader hands over at once: the tightest failover.
        96..=99 => {
            if let Some(l) = s.leader() {
                s.transfer(l, id);
            }
        }
        75..=89 => {
            s.net.faults = *[
                Faults::RELIABLE,
                Faults::UNRELIABLE,
                Faults::UNRELIABLE_REORDERING,
            ]
            .choose(plan)
            .unwrap();
        }
        _ => {}
    }
}
