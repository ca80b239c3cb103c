//! Randomized soak: one seed, one random schedule of crashes, restarts, partitions, loss and
//! reordering against a 3- or 5-node cluster under concurrent proposals and reads. Safety is
//! checked throughout; liveness at the end: once the faults stop, a leader is elected and
//! new proposals commit within a bounded virtual time.

use crate::cluster::{Cluster, SimConfig};
use crate::network::{Faults, Micros, MS};
use crate::node::command;
use rand::seq::SliceRandom;
use rand::Rng;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

/// After healing, a leader must be elected and every new proposal commit within this.
pub const LIVENESS_BOUND: Micros = 10_000 * MS;

#[derive(Clone, Debug, Default)]
pub struct Report {
    pub seed: u64,
    pub nodes: usize,
    pub virtual_ms: u64,
    pub events: u64,
    pub proposals: u64,
    pub committed: usize,
    pub reads_served: usize,
    pub terms_with_leader: usize,
    pub crashes: u64,
    pub restarts: u64,
    pub partitions: u64,
    pub heals: u64,
    /// Phases run with a lossy network, and those with long reordering too.
    pub lossy_phases: u64,
    pub reordering_phases: u64,
    pub messages: u64,
    pub bytes: u64,
    /// Virtual time from healing until the post-heal proposals all committed.
    pub recovery_ms: u64,
    pub checks: u64,
}

/// What to run; `None` lets the seed choose.
#[derive(Clone, Copy, Debug, Default)]
pub struct Options {
    pub nodes: Option<usize>,
    pub phases: Option<u64>,
    pub trace: bool,
}

/// Run one seed; panics (with the seed and replay command) on any violation.
pub fn run(seed: u64, trace: bool) -> Report {
    run_with(
        seed,
        Options {
            trace,
            ..Options::default()
        },
    )
}

pub fn run_with(seed: u64, opts: Options) -> Report {
    let trace = opts.trace;
    let mut plan = ChaCha8Rng::seed_from_u64(seed ^ 0x5eed);
    let random_nodes = if plan.gen_bool(0.5) { 3 } else { 5 };
    let nodes = opts.nodes.unwrap_or(random_nodes);
    let mut cfg = SimConfig::new(nodes, seed);
    cfg.trace = trace;
    cfg.max_size_per_msg = *[256, 4096, 64 * 1024].choose(&mut plan).unwrap();
    cfg.max_inflight_msgs = *[1, 4, 64].choose(&mut plan).unwrap();
    // Compaction at random points: often, rarely, or never; snapshots in small or big chunks.
    cfg.snapshot_threshold = *[None, Some(10), Some(50), Some(200)]
        .choose(&mut plan)
        .unwrap();
    cfg.snapshot_chunk_bytes = *[64, 1024, 1 << 20].choose(&mut plan).unwrap();
    let mut c = Cluster::new(cfg);
    if std::thread::current().name().is_none_or(|n| n == "main") {
        c.replay = format!("cargo run -p sim --release -- replay --seed {seed}");
    }
    let mut r = Report {
        seed,
        nodes,
        ..Default::default()
    };
    let mut cmd = 1u64;
    let random_phases = plan.gen_range(8..20);
    for _ in 0..opts.phases.unwrap_or(random_phases) {
        inject_fault(&mut c, &mut plan, &mut r);
        r.lossy_phases += u64::from(c.net.faults.unreliable);
        r.reordering_phases += u64::from(c.net.faults.long_reordering);
        let phase_end = c.now + plan.gen_range(50..1_500) * MS;
        while c.now < phase_end {
            client_step(&mut c, &mut plan, &mut cmd, &mut r);
            let slice = plan.gen_range(1..20) * MS;
            c.run_for(slice);
        }
    }
    heal_everything(&mut c);
    let healed = c.now;
    c.wait_leader(LIVENESS_BOUND);
    for _ in 0..5 {
        c.one(cmd, 16, nodes);
        cmd += 1;
        r.proposals += 1;
    }
    if c.now - healed > LIVENESS_BOUND {
        c.fail("liveness: the healed cluster took too long to commit new proposals");
    }
    r.recovery_ms = (c.now - healed) / MS;
    // A command forwarded before the heal may have arrived and committed just now; every
    // node must apply all that is committed within a heartbeat or so.
    let settled = |c: &Cluster| {
        let ids = c.ids();
        let commit = ids.iter().map(|&id| c.node(id).raft().commit_index()).max();
        ids.iter()
            .all(|&id| Some(c.node(id).raft().applied()) == commit)
    };
    if !c.run_until(LIVENESS_BOUND, settled) {
        c.fail("liveness: followers did not apply everything committed");
    }
    c.check_acked_durable();
    r.virtual_ms = c.now / MS;
    r.events = c.events;
    r.committed = c.acked.len();
    r.reads_served = c.reads.len();
    r.terms_with_leader = c.checker.terms_with_leader();
    r.checks = c.checker.violations_checked;
    // A run whose checker never looked proves nothing: every commit passes through it.
    if r.checks < r.committed as u64 {
        c.fail(&format!(
            "only {} safety checks ran for {} commits",
            r.checks, r.committed
        ));
    }
    let total = c.net.total();
    (r.messages, r.bytes) = (total.messages, total.bytes);
    r
}

fn inject_fault(c: &mut Cluster, plan: &mut ChaCha8Rng, r: &mut Report) {
    let ids = c.ids();
    let id = *ids.choose(plan).unwrap();
    match plan.gen_range(0..100) {
        0..=14 if c.is_up(id) => {
            c.crash(id);
            r.crashes += 1;
        }
        15..=34 => {
            let down: Vec<u64> = ids.iter().copied().filter(|&i| !c.is_up(i)).collect();
            if let Some(&d) = down.choose(plan) {
                c.restart(d);
                r.restarts += 1;
            }
        }
        35..=49 => {
            let mut shuffled = ids.clone();
            shuffled.shuffle(plan);
            let cut = plan.gen_range(1..ids.len());
            let (a, b) = shuffled.split_at(cut);
            c.partition(&[a, b]);
            r.partitions += 1;
        }
        50..=59 => {
            c.disconnect(id);
            r.partitions += 1;
        }
        60..=74 => {
            c.heal();
            r.heals += 1;
        }
        75..=84 => {
            let faults = *[
                Faults::RELIABLE,
                Faults::UNRELIABLE,
                Faults::UNRELIABLE_REORDERING,
            ]
            .choose(plan)
            .unwrap();
            c.set_faults(faults);
        }
        85..=89 => {
            // A directed cut: `id` can send but not receive from one peer.
            let other = *ids.iter().find(|&&o| o != id).unwrap();
            c.net.block(other, id);
        }
        _ => {}
    }
}

/// A few clients: propose at a random node (following a leader hint once), sometimes read.
fn client_step(c: &mut Cluster, plan: &mut ChaCha8Rng, cmd: &mut u64, r: &mut Report) {
    let ids = c.ids();
    for _ in 0..plan.gen_range(0..4) {
        let id = *ids.choose(plan).unwrap();
        if !c.is_up(id) {
            continue;
        }
        if plan.gen_ratio(1, 5) {
            let _ = c.read_index(id);
            continue;
        }
        let size = plan.gen_range(8..300);
        r.proposals += 1;
        if plan.gen_ratio(1, 2) {
            // The node forwards to its leader if it is a follower.
            let _ = c.propose_or_forward(id, command(*cmd, size));
        } else if let Err(raft::Error::NotLeader { leader: Some(l) }) =
            c.propose(id, command(*cmd, size))
        {
            if c.is_up(l) {
                let _ = c.propose(l, command(*cmd, size));
            }
        }
        *cmd += 1;
    }
}

fn heal_everything(c: &mut Cluster) {
    c.set_faults(Faults::RELIABLE);
    c.heal();
    for id in c.ids() {
        if !c.is_up(id) {
            c.restart(id);
        }
    }
}
