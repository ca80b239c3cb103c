//! The simulated cluster: an event queue in virtual time, the nodes, the network and the
//! invariant checker. Everything random draws from one seeded generator, so a seed fixes a
//! whole run; any violation panics with the seed and a command that replays it.

use crate::checker::Checker;
use crate::io::{Mailbox, ReadReply, SimIo};
use crate::network::{Counters, Faults, Micros, Network, MS};
use crate::node::{command_id, ReadResult, Register, RegisterDriver, RegisterEvent, SimNode};
use driver::{Answered, DriverConfig, Ids, Refusal, Write};
use raft::{Config, Error, Index, Message, NodeId, Raft, ReadMode, Role, Snapshot};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};

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

    fn raft_config(&self, id: NodeId, incarnation: u64) -> Config {
        // Nodes added later start with no configuration and learn it from the leader.
        let voters = if self.bootstrap.contains(&id) {
            self.bootstrap.clone()
        } else {
            Vec::new()
        };
        let mut c = Config::new(id, voters);
        c.election_tick = self.cfg.election_tick;
        c.heartbeat_tick = self.cfg.heartbeat_tick;
        c.seed = self.cfg.seed ^ (id << 32) ^ incarnation.wrapping_mul(0x9e37_79b9);
        c.pre_vote = self.cfg.pre_vote;
        c.check_quorum = self.cfg.check_quorum;
        c.read_mode = self.cfg.read_mode;
        c.max_size_per_msg = self.cfg.max_size_per_msg;
        c.max_inflight_msgs = self.cfg.max_inflight_msgs;
        c.snapshot_chunk_bytes = self.cfg.snapshot_chunk_bytes;
        c.snapshot_timeout_tick = 3 * self.cfg.heartbeat_tick;
        c
    }

    /// Boot `id` from its disk: the production driver around a fresh core and register.
    fn start(&mut self, id: NodeId) {
        let inc = self.node(id).incarnation;
        let mut cfg = self.raft_config(id, inc);
        // The state machine comes back from the snapshot; the log replays the rest.
        let mut register = Register::default();
        if let Some(s) = &self.node(id).disk.snapshot {
            driver::StateMachine::restore(&mut register, s).expect("registers restore");
            cfg.applied = s.meta.index;
        }
        let boot = cfg.seed.rotate_left(17) ^ 0x6a09_e667_f3bc_c909;
        let state = self.node(id).disk.restore_state();
        let raft = Raft::new(cfg, state)
            .unwrap_or_else(|e| self.fail(&format!("node {id} cannot restart: {e}")));
        let dcfg = DriverConfig {
            snapshot_count: self.cfg.snapshot_threshold.unwrap_or(0),
            ..DriverConfig::default()
        };
        // A fresh boot nonce per life, as a restarted server draws one (derived, not drawn
        // from the run's generator, so the schedule of a seed does not depend on it).
        let ids = Ids::new(id, boot);
        let io: Mailbox<Register> = Default::default();
        let node = self.node_mut(id);
        node.io = io.clone();
        let d = RegisterDriver::new(raft, register, SimIo(io.clone()), SimIo(io), ids, dcfg);
        node.driver = Some(d);
        let phase = self.rng.gen_range(0..self.cfg.tick);
        self.schedule(self.now + phase + 1, Event::Tick(id, inc));
        self.drain(id);
    }

    fn schedule(&mut self, at: Micros, event: Event) {
        self.seq += 1;
        self.queue.push(Reverse(Scheduled {
            at,
            seq: self.seq,
            event,
        }));
    }

    /// Run one event. The queue never empties: every live node always has a tick pending.
    pub fn step(&mut self) {
        let Some(Reverse(s)) = self.queue.pop() else {
            self.fail("event queue empty")
        };
        debug_assert!(s.at >= self.now);
        self.now = s.at;
        self.events += 1;
        if self.cfg.trace {
            self.trace(format_args!("{:?}", s.event));
        }
        match s.event {
            Event::Tick(id, inc) => {
                let node = self.node(id);
                if node.incarnation != inc || !node.is_up() {
                    return;
                }
                let next = self.now + self.cfg.tick;
                self.schedule(next, Event::Tick(id, inc));
                self.with(id, |d| d.tick());
            }
            Event::Deliver(m) => {
                let to = m.to;
                if !self.node(to).is_up() || !self.net.connected(m.from, to) {
                    return;
                }
                // Stale messages are the core's to ignore. One it refuses as malformed was
                // sent by a correct core over the simulated network: a bug in one of them.
                let shown = self.cfg.trace.then(|| format!("{m:?}"));
                if let Err(Error::InvalidMessage(why)) = self.with(to, |d| d.step(m)) {
                    self.fail(&format!(
                        "node {to} refused a peer's message: {why} {shown:?}"
                    ));
                }
            }
            Event::PersistDone(id, inc) => {
                let node = self.node_mut(id);
                if node.incarnation != inc {
                    return;
                }
                let Some(w) = node.writes.pop_front() else {
                    return;
                };
                node.disk.write(w);
                self.note_log_size(id);
                self.with(id, |d| d.on_persisted(Ok(())));
            }
            Event::SnapshotTaken(id, inc, snapshot) => {
                if self.node(id).incarnation != inc {
                    return;
                }
                self.with(id, |d| d.on_snapshot(Ok(snapshot)));
                self.note_log_size(id);
            }
            Event::Restored(id, inc, register) => {
                if self.node(id).incarnation != inc {
                    return;
                }
                self.with(id, |d| d.on_restored(Ok(register)));
            }
        }
    }

    /// Hand `m` straight to its addressee, as if it had just arrived over the network (for
    /// tests that forge messages); returns what the core said of it.
    pub fn inject(&mut self, m: Message) -> Result<(), Error> {
        let to = m.to;
        let up = (1..=self.nodes.len() as NodeId).contains(&to) && self.node(to).is_up();
        if !up {
            return Err(Error::UnknownNode(to));
        }
        self.with(to, |d| d.step(m))
    }

    fn send(&mut self, m: Message) {
        if let Some(at) = self.net.send(&m, self.now, &mut self.rng) {
            self.schedule(at, Event::Deliver(m));
        }
    }

    /// Call into `id`'s driver, let it carry out what the core decided, then drain what it
    /// asked of the world and check everything.
    fn with<T>(&mut self, id: NodeId, f: impl FnOnce(&mut RegisterDriver) -> T) -> T {
        let d = self.node_mut(id).driver.as_mut().expect("node is up");
        let out = f(d);
        d.process_ready();
        self.drain(id);
        out
    }

    /// Move the node's outbox into the world: messages onto the network, writes onto the
    /// disk queue, snapshots into background jobs; check what the register applied and the
    /// reads it served; check the core's invariants.
    fn drain(&mut self, id: NodeId) {
        let io = self.node(id).io.clone();
        let mut out = std::mem::take(&mut *io.borrow_mut());
        for m in out.msgs.drain(..) {
            self.send(m);
        }
        for w in out.writes.drain(..) {
            if !w.entries.is_empty() {
                if let Err(v) = self.checker.on_append(id, w.prev_term, &w.entries) {
                    self.fail(&v);
                }
            }
            self.queue_write(id, w);
        }
        for (meta, data) in out.snapshots.drain(..) {
            let (lo, hi) = self.cfg.snapshot_delay;
            let at = self.now + self.rng.gen_range(lo..=hi);
            let inc = self.node(id).incarnation;
            self.schedule(at, Event::SnapshotTaken(id, inc, Snapshot { meta, data }));
        }
        for snap in out.restores.drain(..) {
            // A snapshot from the leader only moves the state machine forward, and holds
            // exactly the committed history up to its index.
            let before = self.node(id).applied_index();
            let index = snap.meta.index;
            if index <= before {
                self.fail(&format!(
                    "node {id} was handed a snapshot at {index} after applying {before}"
                ));
            }
            let mut register = Register::default();
            driver::StateMachine::restore(&mut register, &snap).expect("registers restore");
            if let Err(v) = self.checker.on_snapshot(id, index, &register.applied) {
                self.fail(&v);
            }
            // Built off the loop: other events reach the node meanwhile.
            let (lo, hi) = self.cfg.snapshot_delay;
            let at = self.now + self.rng.gen_range(lo..=hi);
            let inc = self.node(id).incarnation;
            self.schedule(at, Event::Restored(id, inc, register));
        }
        for s in out.compactions.drain(..) {
            // The snapshot is durable and covers only applied (hence durable) entries.
            let disk = &mut self.node_mut(id).disk;
            if s.meta.index > disk.snapshot_index() {
                disk.install(s);
            }
        }
        let events = match self.node_mut(id).driver.as_mut() {
            Some(d) => std::mem::take(&mut d.machine_mut().events),
            None => Vec::new(),
        };
        for e in events {
            self.check_register(id, e);
        }
        for (ctx, r) in out.reads.drain(..) {
            self.served(id, ctx as u64, r);
        }
        let Some(d) = self.nodes[id as usize - 1].driver.as_ref() else {
            return;
        };
        if let Some(why) = d.failure() {
            self.fail(&format!("node {id} stopped: {why}"));
        }
        if let Err(v) = self.checker.on_state(d.raft()) {
            self.fail(&v);
        }
        self.check_commit_durable(id);
    }

    /// A leader's commit index is durable on a majority of every configuration in force at
    /// the leader (both, while joint): that is what lets any future leader hold it. Checked
    /// against the simulated disks, not the leader's beliefs. By log matching it is enough
    /// to check the highest index.
    fn check_commit_durable(&mut self, id: NodeId) {
        let r = self.node(id).raft();
        let commit = r.commit_index();
        if !r.is_leader() || commit <= self.durable_checked {
            return;
        }
        let Some(term) = r.term_at(commit) else {
            return;
        };
        let m = r.membership().clone();
        let holds = |n: NodeId| {
            let Some(node) = self.nodes.get(n as usize - 1) else {
                return false;
            };
            let disk = &node.disk;
            let snap = disk.snapshot_index();
            commit <= snap
                || disk
                    .entries
                    .get((commit - snap - 1) as usize)
                    .is_some_and(|e| e.term == term && e.index == commit)
        };
        for voters in [m.voters(), m.outgoing()] {
            let have = voters.iter().filter(|&&v| holds(v)).count();
            if !voters.is_empty() && have <= voters.len() / 2 {
                self.fail(&format!(
                    "commit durability: leader {id} committed {commit} (term {term}) but only \
                     {have} of voters {voters:?} hold it on disk ({m})"
                ));
            }
        }
        self.checker.violations_checked += 1;
        self.durable_checked = commit;
    }

    fn queue_write(&mut self, id: NodeId, w: Write) {
        let (lo, hi) = self.cfg.disk_latency;
        // A batch with nothing to write only waits for the writes before it.
        let latency = if w.is_empty() {
            0
        } else {
            self.rng.gen_range(lo..=hi)
        };
        let now = self.now;
        let node = self.node_mut(id);
        let done = node.disk_busy_until.max(now) + latency;
        node.disk_busy_until = done;
        node.writes.push_back(w);
        let inc = node.incarnation;
        self.schedule(done, Event::PersistDone(id, inc));
    }

    /// Entries apply in order, one by one, and agree with every other node's; a snapshot
    /// from the leader only ever moves the state machine forward.
    fn check_register(&mut self, id: NodeId, e: RegisterEvent) {
        match e {
            RegisterEvent::Applied { expected, entry } => {
                if entry.index != expected {
                    self.fail(&format!(
                        "node {id} was handed entry {} to apply, expected {expected}",
                        entry.index
                    ));
                }
                if let Err(v) = self.checker.on_apply(id, &entry) {
                    self.fail(&v);
                }
                if entry.kind == raft::EntryKind::Normal {
                    self.acked
                        .entry(command_id(&entry.data))
                        .or_insert(entry.index);
                    self.max_acked = self.max_acked.max(entry.index);
                }
            }
        }
    }

    fn note_log_size(&mut self, id: NodeId) {
        self.max_log_bytes = self.max_log_bytes.max(self.node(id).disk.log_bytes());
    }

    /// A linearizable read was answered: its value must reflect every write acknowledged
    /// before the read was issued.
    fn served(&mut self, id: NodeId, ctx: u64, r: Result<Answered<Option<(Index, u64)>>, Refusal>) {
        let min = self.pending_reads.remove(&ctx);
        let Ok(answer) = r else {
            return; // refused or dropped (leader change): the client retries
        };
        let value = answer.value;
        if let Some(min) = min {
            let seen = value.map_or(0, |v| v.0);
            if seen < min {
                self.fail(&format!(
                    "stale read: node {id} served read {ctx} with the write at index {seen}, \
                     but the write at index {min} was acknowledged before the read began"
                ));
            }
        }
        self.reads.push(ReadResult {
            node: id,
            ctx,
            index: answer.applied,
            value,
        });
    }

    // ---- driving the cluster -------------------------------------------------------------

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

    /// Propose at `id` straight to the core (as a library user would), then let the driver
    /// carry out the result.
    pub fn propose(&mut self, id: NodeId, data: bytes::Bytes) -> Result<Index, Error> {
        if !self.is_up(id) {
            return Err(Error::NotLeader { leader: None });
        }
        self.with(id, |d| d.raft_mut().propose(data))
    }

    /// Propose at `id` wherever it stands: a follower forwards to its leader.
    pub fn propose_or_forward(
        &mut self,
        id: NodeId,
        data: bytes::Bytes,
    ) -> Result<raft::Proposal, Error> {
        let mut results = self.propose_all_or_forward(id, vec![data]);
        results.pop().expect("one result per command")
    }

    /// Several commands arriving at `id` together (one `ready` for all of them).
    pub fn propose_all_or_forward(
        &mut self,
        id: NodeId,
        data: Vec<bytes::Bytes>,
    ) -> Vec<Result<raft::Proposal, Error>> {
        if !self.is_up(id) {
            return vec![Err(Error::NoLeader); data.len()];
        }
        self.with(id, |d| {
            data.into_iter()
                .map(|x| d.raft_mut().propose_or_forward(x))
                .collect()
        })
    }

    /// Issue a linearizable read at `id` through the driver, as a server's client would;
    /// returns a number naming it in `reads`. The read is checked when served.
    pub fn read_index(&mut self, id: NodeId) -> Result<u64, Error> {
        self.next_ctx += 1;
        let ctx = self.next_ctx;
        if !self.is_up(id) {
            return Err(Error::NoLeader);
        }
        self.pending_reads.insert(ctx, self.max_acked);
        let io = self.node(id).io.clone();
        let d = self.node_mut(id).driver.as_mut().unwrap();
        d.read((), true, ReadReply(ctx as usize, io.clone()));
        // Refused at once (no leader, too many reads): say so, as the core's API did.
        let refused = {
            let mut out = io.borrow_mut();
            let at = out
                .reads
                .iter()
                .position(|(c, r)| *c == ctx as usize && r.is_err());
            at.map(|i| out.reads.remove(i).1)
        };
        if let Some(Err(why)) = refused {
            self.pending_reads.remove(&ctx);
            self.with(id, |_| ());
            return Err(match why {
                Refusal::TooManyRequests => Error::ReadQueueFull,
                _ => Error::NoLeader,
            });
        }
        self.with(id, |_| ());
        Ok(ctx)
    }

    /// Make `id` start an election now.
    pub fn campaign(&mut self, id: NodeId) {
        self.with(id, |d| d.raft_mut().campaign());
    }

    pub fn transfer_leader(&mut self, from: NodeId, to: NodeId) -> Result<(), Error> {
        self.with(from, |d| d.raft_mut().transfer_leader(to))
    }

    /// How many live nodes have applied command `cmd`.
    pub fn applied_count(&self, cmd: u64) -> usize {
        self.nodes
            .iter()
            .filter(|n| {
                n.register()
                    .is_some_and(|r| r.applied.iter().rev().any(|&(_, c)| c == cmd))
            })
            .count()
    }

    /// Submit `cmd` to whichever node leads and wait until `expected` nodes applied it (0:
    /// every member of the stable leader's configuration), retrying on other leaders for up
    /// to 10 virtual seconds (the paper's client loop).
    pub fn one(&mut self, cmd: u64, size: usize, expected: usize) -> Index {
        let deadline = self.now + 10_000 * MS;
        while self.now < deadline {
            let leaders: Vec<NodeId> = self
                .ids()
                .into_iter()
                .filter(|&id| self.is_up(id) && self.node(id).raft().is_leader())
                .collect();
            for id in leaders {
                if self.propose(id, crate::node::command(cmd, size)).is_ok() {
                    // 0: every member of the stable leader's configuration, as it is then.
                    let want = |c: &Cluster| match expected {
                        0 => c.membership().map_or(usize::MAX, |m| m.ids().count()),
                        n => n,
                    };
                    let ok = self.run_until(2_000 * MS, |c| c.applied_count(cmd) >= want(c));
                    if ok {
                        return self.acked[&cmd];
                    }
                }
            }
            self.run_for(50 * MS);
        }
        self.fail(&format!(
            "command {cmd} was not applied by {expected} nodes in time"
        ))
    }

    // ---- membership ------------------------------------------------------------------------

    /// Start a new node with an empty disk and no configuration, under the next unused id;
    /// it waits for a leader to add it and send it the log or a snapshot.
    pub fn add_node(&mut self) -> NodeId {
        let id = self.nodes.len() as NodeId + 1;
        self.nodes.push(SimNode::new(id));
        if self.cfg.trace {
            self.trace(format_args!("add node {id}"));
        }
        // Cut off like the rest if the network is split; reachable otherwise.
        self.start(id);
        id
    }

    /// `id`'s machine is gone with its disk: it crashes and never comes back.
    pub fn destroy(&mut self, id: NodeId) {
        if self.is_up(id) {
            self.crash(id);
        }
        self.node_mut(id).disk = Default::default();
        if !self.destroyed.contains(&id) {
            self.destroyed.push(id);
        }
    }

    /// Whether the latest configuration of any node — in its live core, or on its disk (a
    /// down node comes back with it) — names `id`. Once none does and its removal is
    /// committed, `id` can never count again (every future leader holds the removal), and
    /// its machine may be destroyed.
    pub fn named_by_any_configuration(&self, id: NodeId) -> bool {
        let names = |m: &raft::Membership| m.contains(id) || m.is_learner(id);
        self.nodes.iter().any(|n| {
            let live = n
                .driver
                .as_ref()
                .is_some_and(|d| names(d.raft().membership()));
            let last_entry = n.disk.entries.iter().rev().find_map(|e| {
                (e.kind == raft::EntryKind::ConfChange)
                    .then(|| raft::ConfEntry::decode(&e.data).ok())
                    .flatten()
                    .map(|c| c.membership)
            });
            let on_disk = match (last_entry, &n.disk.snapshot) {
                (Some(m), _) => names(&m),
                (None, Some(s)) => names(&s.meta.membership),
                (None, None) => self.bootstrap.contains(&n.id) && self.bootstrap.contains(&id),
            };
            live || on_disk
        })
    }

    pub fn is_destroyed(&self, id: NodeId) -> bool {
        self.destroyed.contains(&id)
    }

    /// Propose `cc` at `id` straight to the core.
    pub fn propose_conf_change(
        &mut self,
        id: NodeId,
        cc: raft::ConfChange,
    ) -> Result<Index, Error> {
        if !self.is_up(id) {
            return Err(Error::NotLeader { leader: None });
        }
        if self.cfg.trace {
            self.trace(format_args!("propose at {id}: {cc:?}"));
        }
        self.with(id, |d| d.raft_mut().propose_conf_change(cc))
    }

    /// Make `cc` happen: propose it to whichever node leads (retrying across leader changes
    /// and while an earlier change is pending) and wait until the configuration it
    /// establishes — for an auto-leave joint change, the one after it — is committed at a
    /// stable leader. Returns that configuration; fails the run after `timeout`.
    pub fn change_membership(&mut self, cc: raft::ConfChange, timeout: Micros) -> raft::Membership {
        let deadline = self.now + timeout;
        let mut target: Option<raft::Membership> = None;
        let settled = |c: &Cluster, want: &raft::Membership| {
            c.stable_leader().is_some_and(|l| {
                let r = c.node(l).raft();
                r.membership() == want && r.commit_index() >= r.conf_index()
            })
        };
        while self.now < deadline {
            if let Some(want) = target.clone() {
                if settled(self, &want) {
                    return want;
                }
            }
            let Some(l) = self.stable_leader() else {
                self.run_for(50 * MS);
                continue;
            };
            let before = self.node(l).raft().membership().clone();
            let reached = target.as_ref() == Some(&before);
            let pending = self.node(l).raft().conf_index() > self.node(l).raft().commit_index();
            if !reached && !pending {
                match raft::apply_conf_change(&before, &cc) {
                    Ok(next) if target.is_none() || target.as_ref() == Some(&next) => {
                        if self.propose_conf_change(l, cc.clone()).is_ok() {
                            let auto = next.is_joint() && next.auto_leave();
                            target = Some(if auto {
                                raft::apply_conf_change(&next, &raft::ConfChange::leave_joint())
                                    .expect("a joint configuration can be left")
                            } else {
                                next
                            });
                        }
                    }
                    // Proposed already and a different configuration is in force: ours was
                    // lost with a leader and another change won; not expected in tests.
                    Ok(_) => self.fail(&format!("configuration change {cc:?} was overtaken")),
                    // Asked to leave a joint configuration that another leader's log never
                    // held (or already left): the cluster is where the caller wants it.
                    Err(_) if cc.transition == raft::Transition::Leave && !before.is_joint() => {
                        return before;
                    }
                    Err(e) if target.is_none() => {
                        self.fail(&format!("configuration change {cc:?} refused: {e}"))
                    }
                    Err(_) => {} // our joint change is in force, its leave not yet
                }
            }
            self.run_for(10 * MS);
        }
        self.fail(&format!(
            "configuration change {cc:?} did not complete in time"
        ))
    }

    /// The configuration in force at the current stable leader.
    pub fn membership(&self) -> Option<raft::Membership> {
        let l = self.stable_leader()?;
        Some(self.node(l).raft().membership().clone())
    }

    // ---- faults ----------------------------------------------------------------------------

    pub fn crash(&mut self, id: NodeId) {
        if self.cfg.trace {
            self.trace(format_args!("crash {id}"));
        }
        self.node_mut(id).crash();
    }

    pub fn restart(&mut self, id: NodeId) {
        if self.destroyed.contains(&id) {
            return;
        }
        if self.is_up(id) {
            self.crash(id);
        }
        if self.cfg.trace {
            self.trace(format_args!("restart {id}"));
        }
        self.start(id);
    }

    /// Cut `id` off from everyone, both directions.
    pub fn disconnect(&mut self, id: NodeId) {
        self.node_mut(id).connected = false;
        for other in self.ids() {
            if other != id {
                self.net.block(id, other);
                self.net.block(other, id);
            }
        }
    }

    /// Reconnect `id` to every node that is itself connected (not to disconnected ones).
    pub fn connect(&mut self, id: NodeId) {
        self.node_mut(id).connected = true;
        for other in self.ids() {
            if other != id && self.node(other).connected {
                self.net.unblock(id, other);
                self.net.unblock(other, id);
            }
        }
    }

    /// Split the cluster: nodes talk only within their own group.
    pub fn partition(&mut self, groups: &[&[NodeId]]) {
        self.heal();
        for a in self.ids() {
            for b in self.ids() {
                let same = groups.iter().any(|g| g.contains(&a) && g.contains(&b));
                if !same {
                    self.net.block(a, b);
                }
            }
        }
    }

    pub fn heal(&mut self) {
        self.net.heal();
        for n in &mut self.nodes {
            n.connected = true;
        }
    }

    pub fn set_faults(&mut self, faults: Faults) {
        self.net.faults = faults;
    }

    pub fn counters(&self, id: NodeId) -> Counters {
        self.net.counters.get(&id).cloned().unwrap_or_default()
    }

    /// Check that every command ever acknowledged is in the state machine of every live
    /// node, at the index it was first applied at.
    pub fn check_acked_durable(&self) {
        // Nodes removed from the cluster stop receiving the log; they are not checked.
        let members = self.membership();
        let member = |id| members.as_ref().is_none_or(|m| m.contains(id));
        for n in self.nodes.iter().filter(|n| n.is_up() && member(n.id)) {
            // A retried command may commit twice; what was acknowledged is its first copy.
            let mut have: HashMap<u64, Index> = HashMap::new();
            for (i, c) in n.applied() {
                have.entry(c).or_insert(i);
            }
            for (cmd, index) in &self.acked {
                if have.get(cmd) != Some(index) {
                    self.fail(&format!(
                        "acknowledged command {cmd} (index {index}) missing from node {}",
                        n.id
                    ));
                }
            }
        }
    }
}
