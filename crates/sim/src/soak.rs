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
    /// Configuration changes the membership nemesis got accepted, and nodes it added.
    pub conf_changes: u64,
    pub nodes_added: u64,
    /// Nodes destroyed (disk gone) after their removal committed.
    pub destroyed: u64,
    pub checks: u64,
}

/// What to run; `None` lets the seed choose.
#[derive(Clone, Copy, Debug, Default)]
pub struct Options {
    pub nodes: Option<usize>,
    pub phases: Option<u64>,
    pub trace: bool,
    /// Add the membership nemesis: nodes added, promoted, removed, swapped in joint changes.
    pub membership: bool,
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
    let flag = if opts.membership { " --membership" } else { "" };
    if std::thread::current().name().is_none_or(|n| n == "main") {
        c.replay = format!("cargo run -p sim --release -- replay --seed {seed}{flag}");
    }
    let mut r = Report {
        seed,
        nodes,
        ..Default::default()
    };
    let mut cmd = 1u64;
    let random_phases = plan.gen_range(8..20);
    for _ in 0..opts.phases.unwrap_or(random_phases) {
        if opts.membership && plan.gen_bool(0.5) {
            reconfigure(&mut c, &mut plan, &mut r);
        }
        inject_fault(&mut c, &mut plan, &mut r);
        r.lossy_phases += u64::from(c.net.faults.unreliable);
        r.reordering_phases += u64::from(c.net.faults.long_reordering);
        let phase_end = c.now + plan.gen_range(50..1_500) * MS;
        while c.now < phase_end {
            client_step(&mut c, &mut plan, &mut cmd, &mut r);
            // Changes at random moments, racing with elections, crashes and clients.
            if opts.membership && plan.gen_ratio(1, 25) {
                reconfigure(&mut c, &mut plan, &mut r);
            }
            let slice = plan.gen_range(1..20) * MS;
            c.run_for(slice);
        }
    }
    heal_everything(&mut c);
    let healed = c.now;
    c.wait_leader(LIVENESS_BOUND);
    // A joint configuration left in force (no auto-leave, or its leave was lost with a
    // leader) is ended, as an operator would.
    let joint = |c: &Cluster| c.membership().map(|m| (m.is_joint(), m.auto_leave()));
    match joint(&c) {
        // The leader leaves it by itself once it commits (a new leader too).
        Some((true, true)) if !c.run_until(LIVENESS_BOUND, |c| joint(c).is_some_and(|j| !j.0)) => {
            c.fail("liveness: an auto-leave joint configuration was never left");
        }
        Some((true, false)) => {
            c.change_membership(raft::ConfChange::leave_joint(), LIVENESS_BOUND);
        }
        _ => {}
    }
    c.wait_leader(LIVENESS_BOUND);
    if c.membership().is_none() {
        c.fail("liveness: no stable leader after the heal");
    }
    for _ in 0..5 {
        c.one(cmd, 16, 0);
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
        // The configuration may still grow: an entry pending at the heal commits later.
        let Some(m) = c.membership() else {
            return false;
        };
        let ids: Vec<u64> = m.ids().collect();
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

/// Most nodes a membership run creates (so a long run does not grow without bound).
const MAX_NODES: usize = 9;

/// The membership nemesis: one configuration change proposed at whichever node leads now
/// (stable or not, so changes race with elections and faults). Refusals are expected — a
/// change is pending, the leader has not committed in its term — and safety must hold
/// whatever is accepted.
fn reconfigure(c: &mut Cluster, plan: &mut ChaCha8Rng, r: &mut Report) {
    use raft::{Change, ConfChange};
    let Some(l) = c.leader() else {
        return;
    };
    let m = c.node(l).raft().membership().clone();
    // Destroy a node whose removal is committed: it can never count again, so losing its
    // disk is safe — an operator decommissioning the machine.
    let committed = c.node(l).raft().commit_index() >= c.node(l).raft().conf_index();
    if committed && plan.gen_ratio(1, 4) {
        let gone: Vec<u64> = c
            .ids()
            .into_iter()
            .filter(|&id| !c.is_destroyed(id) && !c.named_by_any_configuration(id))
            .filter(|&id| c.node(id).disk.snapshot.is_some() || !c.node(id).disk.entries.is_empty())
            .collect();
        if let Some(&id) = gone.choose(plan) {
            c.destroy(id);
            r.destroyed += 1;
        }
    }
    let new_node = |c: &mut Cluster, r: &mut Report| {
        (c.ids().len() < MAX_NODES).then(|| {
            r.nodes_added += 1;
            c.add_node()
        })
    };
    let voters = m.voters().to_vec();
    let learners = m.learners().to_vec();
    let cc = match plan.gen_range(0..7) {
        0 => new_node(c, r).map(|id| ConfChange::simple(Change::AddLearner(id))),
        1 => learners
            .choose(plan)
            .map(|&id| ConfChange::simple(Change::Promote(id))),
        2 => voters
            .choose(plan)
            .map(|&id| ConfChange::simple(Change::Remove(id))),
        3 => learners
            .choose(plan)
            .map(|&id| ConfChange::simple(Change::Remove(id))),
        4 => new_node(c, r).map(|id| ConfChange::simple(Change::AddVoter(id))),
        5 => {
            // Swap one or two voters for new nodes (or demote one) in one joint change.
            let mut changes = Vec::new();
            for _ in 0..plan.gen_range(1..=2) {
                if let Some(id) = new_node(c, r) {
                    changes.push(Change::AddVoter(id));
                }
            }
            let mut out = voters.clone();
            out.shuffle(plan);
            for &id in out.iter().take(plan.gen_range(1..=2)) {
                changes.push(if plan.gen_bool(0.3) {
                    Change::AddLearner(id)
                } else {
                    Change::Remove(id)
                });
            }
            Some(ConfChange::joint(changes, plan.gen_bool(0.5)))
        }
        _ => m.is_joint().then(ConfChange::leave_joint),
    };
    if let Some(cc) = cc {
        if c.propose_conf_change(l, cc).is_ok() {
            r.conf_changes += 1;
        }
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
