//! The simulated cluster: an event queue in virtual time, the nodes, the network and the
//! invariant checker. Everything random draws from one seeded generator, so a seed fixes a
//! whole run; any violation panics with the seed and a command that replays it.
//!
//! This file holds the configuration, the cluster's state, its event queue and what a test
//! asks of it (run, find the leader). The rest is split by job: `events` (one event at a
//! time, and what a node's driver asked of the world), `checks` (commits durable on disk,
//! applies in order and alike, no stale read, acknowledged commands kept), `clients`
//! (proposals and reads as a library user or a server's client makes them), `membership`
//! (nodes added, removed and destroyed; configuration changes), and `faults` (a node boots,
//! crashes and restarts; links are cut and healed; a test forces an election or a
//! hand-off).

use crate::checker::Checker;
use crate::network::{Micros, Network, MS};
use crate::node::{ReadResult, Register, SimNode};
use raft::{Index, Message, NodeId, ReadMode, Role};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};

mod checks;
mod clients;
mod events;
mod faults;
mod membership;

#[derive(Clone, Debug)]
pub struct SimConfig {
    pub nodes: usize,
    pub seed: u64,
    pub pre_vote: bool,
    pub check_quorum: bool,
    pub read_mode: ReadMode,
    /// Election timeout T in ticks (timeouts fall in [T, 2T)).
    pub election_tick: u64,
    pub heartbeat_tick: u64,
    /// Virtual length of one tick.
    pub tick: Micros,
    pub max_size_per_msg: u64,
    pub max_inflight_msgs: usize,
    /// Each disk write takes a time drawn from this range.
    pub disk_latency: (Micros, Micros),
    /// Take a snapshot and compact the log once this many entries were applied since the
    /// last snapshot (`None`: never compact).
    pub snapshot_threshold: Option<u64>,
    /// Taking a snapshot runs in the background for a time drawn from this range.
    pub snapshot_delay: (Micros, Micros),
    pub snapshot_chunk_bytes: u64,
    /// Print every event (for replaying a failing seed).
    pub trace: bool,
}

impl SimConfig {
    /// Defaults: 10 ms ticks, heartbeats every 100 ms, election timeout 300–600 ms.
    pub fn new(nodes: usize, seed: u64) -> Self {
        SimConfig {
            nodes,
            seed,
            pre_vote: true,
            check_quorum: true,
            read_mode: ReadMode::Safe,
            election_tick: 30,
            heartbeat_tick: 10,
            tick: 10 * MS,
            max_size_per_msg: 64 * 1024,
            max_inflight_msgs: 64,
            disk_latency: (100, 1_000),
            snapshot_threshold: None,
            snapshot_delay: (0, 20 * MS),
            snapshot_chunk_bytes: 1 << 20,
            trace: false,
        }
    }

    /// The election timeout `T` in virtual time.
    pub fn election_timeout(&self) -> Micros {
        self.election_tick * self.tick
    }
}

#[derive(Debug)]
enum Event {
    Tick(NodeId, u64),
    Deliver(Message),
    PersistDone(NodeId, u64),
    /// A background snapshot of the state machine is ready to hand to the core.
    SnapshotTaken(NodeId, u64, raft::Snapshot),
    /// A register built off the loop from a leader's snapshot.
    Restored(NodeId, u64, Register),
}

#[derive(Debug)]
struct Scheduled {
    at: Micros,
    seq: u64,
    event: Event,
}

impl PartialEq for Scheduled {
    fn eq(&self, other: &Self) -> bool {
        (self.at, self.seq) == (other.at, other.seq)
    }
}
impl Eq for Scheduled {}
impl PartialOrd for Scheduled {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Scheduled {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        (self.at, self.seq).cmp(&(other.at, other.seq))
    }
}

pub struct Cluster {
    pub cfg: SimConfig,
    pub now: Micros,
    rng: ChaCha8Rng,
    queue: BinaryHeap<Reverse<Scheduled>>,
    seq: u64,
    pub nodes: Vec<SimNode>,
    pub net: Network,
    pub checker: Checker,
    /// Reads served, in order.
    pub reads: Vec<ReadResult>,
    /// Commands some node applied (so a client could have been told "committed"): id → index.
    pub acked: HashMap<u64, Index>,
    /// The highest index among `acked`.
    pub max_acked: Index,
    /// Reads issued and not yet served: ctx → the highest acknowledged write index at the
    /// moment of issue. A linearizable read must reflect at least that write.
    pending_reads: HashMap<u64, Index>,
    next_ctx: u64,
    pub events: u64,
    /// The most log bytes any node ever had on disk (compaction keeps this bounded).
    pub max_log_bytes: u64,
    /// How to replay this run; printed with any failure.
    pub replay: String,
    /// The voters a new cluster starts with; nodes added later join with no configuration.
    bootstrap: Vec<NodeId>,
    /// Nodes whose disk is gone for good: never restarted (a voter with amnesia would break
    /// Raft; an operator replaces such a machine under a new id).
    destroyed: Vec<NodeId>,
    /// The highest commit index checked to be durable on a quorum of every configuration.
    durable_checked: Index,
}

impl Cluster {
    pub fn new(cfg: SimConfig) -> Self {
        let disks = vec![Default::default(); cfg.nodes];
        Self::with_disks(cfg, disks)
    }

    /// A cluster whose nodes boot from the given disks (node `i + 1` from `disks[i]`).
    pub fn with_disks(cfg: SimConfig, disks: Vec<crate::node::Disk>) -> Self {
        let test = std::thread::current()
            .name()
            .filter(|n| *n != "main")
            .map(str::to_string);
        let replay = match test {
            Some(name) => format!(
                "SIM_SEED={} cargo test -p sim --release -- --exact {name}",
                cfg.seed
            ),
            None => format!("cargo run -p sim --release -- replay --seed {}", cfg.seed),
        };
        let mut c = Cluster {
            rng: ChaCha8Rng::seed_from_u64(cfg.seed),
            now: 0,
            queue: BinaryHeap::new(),
            seq: 0,
            nodes: (1..=cfg.nodes as NodeId).map(SimNode::new).collect(),
            net: Network::new(),
            checker: Checker::default(),
            reads: Vec::new(),
            acked: HashMap::new(),
            max_acked: 0,
            pending_reads: HashMap::new(),
            next_ctx: 0,
            events: 0,
            max_log_bytes: 0,
            replay,
            bootstrap: (1..=cfg.nodes as NodeId).collect(),
            destroyed: Vec::new(),
            durable_checked: 0,
            cfg,
        };
        for (node, disk) in c.nodes.iter_mut().zip(disks) {
            node.disk = disk;
        }
        for id in c.ids() {
            c.start(id);
        }
        c
    }

    /// Every node ever created (the initial ones and those added since), up or down.
    pub fn ids(&self) -> Vec<NodeId> {
        (1..=self.nodes.len() as NodeId).collect()
    }

    pub fn node(&self, id: NodeId) -> &SimNode {
        &self.nodes[id as usize - 1]
    }

    fn node_mut(&mut self, id: NodeId) -> &mut SimNode {
        &mut self.nodes[id as usize - 1]
    }

    pub fn rng(&mut self) -> &mut ChaCha8Rng {
        &mut self.rng
    }

    /// Panic with the seed and the replay command.
    pub fn fail(&self, what: &str) -> ! {
        panic!(
            "{what}\n  at virtual time {} ms, seed {}\n{}  replay: {}",
            self.now / MS,
            self.cfg.seed,
            self.describe(),
            self.replay
        )
    }

    /// Print a trace line; a closed stdout (e.g. piped to `head`) ends the process quietly.
    fn trace(&self, what: std::fmt::Arguments) {
        use std::io::Write;
        let ms = self.now as f64 / MS as f64;
        if writeln!(std::io::stdout().lock(), "{ms:>10.3}ms {what}").is_err() {
            std::process::exit(0);
        }
    }

    /// One line per node: role, term, log and commit positions.
    pub fn describe(&self) -> String {
        let mut out = String::new();
        for n in &self.nodes {
            let line = match &n.driver {
                None => format!("  node {}: down\n", n.id),
                Some(d) => {
                    let r = d.raft();
                    format!(
                        "  node {}: {:?} term {} leader {:?} last {} commit {} applied {}; {} \
                         (at {})\n",
                        n.id,
                        r.role(),
                        r.term(),
                        r.leader(),
                        r.last_index(),
                        r.commit_index(),
                        n.applied_index(),
                        r.membership(),
                        r.conf_index()
                    )
                }
            };
            out.push_str(&line);
        }
        out
    }

    fn schedule(&mut self, at: Micros, event: Event) {
        self.seq += 1;
        self.queue.push(Reverse(Scheduled {
            at,
            seq: self.seq,
            event,
        }));
    }

    pub fn run_for(&mut self, d: Micros) {
        let end = self.now + d;
        while self.queue.peek().is_some_and(|s| s.0.at <= end) {
            self.step();
        }
        self.now = end;
    }

    /// Run until `pred` holds or `timeout` passes; returns whether it held.
    pub fn run_until(&mut self, timeout: Micros, mut pred: impl FnMut(&Cluster) -> bool) -> bool {
        let end = self.now + timeout;
        loop {
            if pred(self) {
                return true;
            }
            if self.queue.peek().is_none_or(|s| s.0.at > end) {
                self.now = end;
                return pred(self);
            }
            self.step();
        }
    }

    pub fn is_up(&self, id: NodeId) -> bool {
        self.node(id).is_up()
    }

    /// The leader of the highest term among live nodes, if any.
    pub fn leader(&self) -> Option<NodeId> {
        self.nodes
            .iter()
            .filter_map(|n| n.driver.as_ref().map(|d| d.raft()))
            .filter(|r| r.role() == Role::Leader)
            .max_by_key(|r| r.term())
            .map(|r| r.id())
    }

    /// A leader that a majority of every configuration in force at it (itself included if
    /// it votes) follows in its term and can exchange messages with.
    pub fn stable_leader(&self) -> Option<NodeId> {
        self.nodes
            .iter()
            .filter_map(|n| n.driver.as_ref().map(|d| d.raft()))
            .filter(|r| r.role() == Role::Leader)
            .find(|l| {
                let (id, term) = (l.id(), l.term());
                let follows = |v: NodeId| {
                    self.nodes
                        .get(v as usize - 1)
                        .and_then(|n| n.driver.as_ref())
                        .map(|d| d.raft())
                        .is_some_and(|r| {
                            r.term() == term
                                && r.leader() == Some(id)
                                && (v == id
                                    || (self.net.connected(id, v) && self.net.connected(v, id)))
                        })
                };
                let m = l.membership();
                [m.voters(), m.outgoing()].iter().all(|voters| {
                    voters.is_empty()
                        || voters.iter().filter(|&&v| follows(v)).count() > voters.len() / 2
                })
            })
            .map(|l| l.id())
    }

    /// Wait up to `timeout` for a stable leader; fail the run if none appears.
    pub fn wait_leader(&mut self, timeout: Micros) -> NodeId {
        if !self.run_until(timeout, |c| c.stable_leader().is_some()) {
            self.fail("no leader elected in time");
        }
        self.stable_leader().unwrap()
    }

    pub fn term_of(&self, id: NodeId) -> u64 {
        self.node(id).raft().term()
    }
}
