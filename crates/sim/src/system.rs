//! The whole system in virtual time: every member runs the production [`driver::Driver`]
//! with the real kv store as its state machine; only the disk, the network and the clock
//! are simulated. Clients send puts, gets, deletes and compare-and-swaps through the same
//! driver calls the server makes for its gRPC clients, every invocation and response is
//! recorded, and the history is checked for linearizability — on top of the Raft
//! invariants the checker asserts after every event. Faults: crashes (with requests in
//! flight), restarts, partitions, loss, reordering, and disk writes that fail (the member
//! must stop, never half-apply).

use crate::checker::Checker;
use crate::io::{Mailbox, ReadReply, SimDriver, SimIo, WriteReply};
use crate::linearizability::{self, Input, Operation, Output, Verdict};
use crate::network::{Faults, Micros, Network, MS};
use crate::node::Disk;
use crate::watchers::{self, SimHub, WatchClients};
use bytes::Bytes;
use driver::{DriverConfig, Ids, Refusal, RequestId, StateMachine, Write};
use raft::{Config, Entry, EntryKind, Message, NodeId, Raft, Snapshot};
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, VecDeque};

// ---- the state machine: the real kv store, driven by a compact command encoding ----------

/// A single-key operation as a command: the simulator's stand-in for an etcd request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Op {
    Put(u64, u64),
    Delete(u64),
    Cas(u64, Option<u64>, u64),
}

fn encode(id: RequestId, op: Op) -> Bytes {
    let mut v = Vec::with_capacity(56);
    for x in [id.member, id.boot, id.seq] {
        v.extend_from_slice(&x.to_le_bytes());
    }
    let (tag, a, b, c) = match op {
        Op::Put(k, val) => (0u8, k, val, 0),
        Op::Delete(k) => (1, k, 0, 0),
        Op::Cas(k, None, new) => (2, k, 0, new),
        Op::Cas(k, Some(old), new) => (3, k, old, new),
    };
    v.push(tag);
    for x in [a, b, c] {
        v.extend_from_slice(&x.to_le_bytes());
    }
    v.into()
}

fn decode(data: &[u8]) -> Option<(RequestId, Op)> {
    if data.len() != 49 {
        return None;
    }
    let word = |i: usize| u64::from_le_bytes(data[i..i + 8].try_into().unwrap());
    let id = RequestId {
        member: word(0),
        boot: word(8),
        seq: word(16),
    };
    let (a, b, c) = (word(25), word(33), word(41));
    let op = match data[24] {
        0 => Op::Put(a, b),
        1 => Op::Delete(a),
        2 => Op::Cas(a, None, c),
        3 => Op::Cas(a, Some(b), c),
        _ => return None,
    };
    Some((id, op))
}

fn key(k: u64) -> kv::KeyRange {
    kv::KeyRange {
        key: Bytes::copy_from_slice(&k.to_be_bytes()),
        range_end: Bytes::new(),
    }
}

fn value(v: u64) -> Bytes {
    Bytes::copy_from_slice(&v.to_le_bytes())
}

fn put(k: u64, v: u64) -> kv::PutRequest {
    kv::PutRequest {
        key: key(k).key,
        value: value(v),
        ..Default::default()
    }
}

/// The kv store as the simulated members' state machine.
#[derive(Default, Debug)]
pub struct SimKv {
    pub store: kv::Store,
    /// Requests applied since the simulator last looked, with what they returned.
    pub applied: Vec<(RequestId, Output)>,
}

impl StateMachine for SimKv {
    type Output = Output;
    type Query = u64;
    type Answer = Option<u64>;
    type Frozen = kv::Store;

    fn apply(&mut self, e: &Entry) -> Result<Option<(RequestId, Output)>, String> {
        if e.kind == EntryKind::Noop {
            return Ok(None);
        }
        let (id, op) = decode(&e.data).ok_or("undecodable command")?;
        let request = match op {
            Op::Put(k, v) => kv::Request::Put(put(k, v)),
            Op::Delete(k) => kv::Request::DeleteRange(kv::DeleteRangeRequest {
                range: key(k),
                prev_kv: false,
            }),
            Op::Cas(k, expect, new) => kv::Request::Txn(kv::TxnRequest {
                compare: vec![kv::Compare {
                    range: key(k),
                    result: kv::CompareResult::Equal,
                    target: match expect {
                        None => kv::CompareTarget::Create(0),
                        Some(old) => kv::CompareTarget::Value(value(old)),
                    },
                }],
                success: vec![kv::RequestOp::Put(put(k, new))],
                failure: vec![],
            }),
        };
        let out = match self.store.apply(&request).map_err(|e| e.to_string())? {
            kv::Response::Txn(t) => Output::Cas(t.succeeded),
            _ => Output::Ok,
        };
        self.applied.push((id, out.clone()));
        Ok(Some((id, out)))
    }

    fn query(&self, k: &u64) -> Option<u64> {
        let req = kv::RangeRequest {
            range: key(*k),
            ..Default::default()
        };
        let resp = self.store.range(&req, self.store.revision()).ok()?;
        let kv = resp.kvs.first()?;
        Some(u64::from_le_bytes(kv.value[..8].try_into().ok()?))
    }

    fn freeze(&self) -> kv::Store {
        self.store.clone()
    }

    fn restore(&mut self, s: &Snapshot) -> Result<(), String> {
        self.store = kv::Store::restore(&s.data).map_err(|e| e.to_string())?;
        Ok(())
    }
}

type Shared = Mailbox<SimKv>;
pub type KvDriver = SimDriver<SimKv>;

// ---- the system -----------------------------------------------------------------------------

#[derive(Clone, Debug)]
pub struct SystemConfig {
    pub nodes: usize,
    pub seed: u64,
    pub tick: Micros,
    pub election_tick: u64,
    pub heartbeat_tick: u64,
    pub disk_latency: (Micros, Micros),
    pub snapshot_count: u64,
    /// Chance that a disk write fails (the member must stop).
    pub disk_failure: f64,
    /// Chance that restoring a snapshot fails (the member must stop).
    pub restore_failure: f64,
    pub trace: bool,
}

impl SystemConfig {
    pub fn new(nodes: usize, seed: u64) -> Self {
        SystemConfig {
            nodes,
            seed,
            tick: 10 * MS,
            election_tick: 30,
            heartbeat_tick: 10,
            disk_latency: (100, 1_000),
            snapshot_count: 50,
            disk_failure: 0.0,
            restore_failure: 0.0,
            trace: false,
        }
    }
}

#[derive(Debug)]
enum Event {
    Tick(NodeId, u64),
    Deliver(Message),
    Persisted(NodeId, u64),
    Snapshotted(NodeId, u64, Snapshot),
    /// A state machine built off the loop from a leader's snapshot (or the failure to).
    Restored(NodeId, u64, Result<SimKv, String>),
}

struct Member {
    driver: Option<KvDriver>,
    /// The next disk write fails (a test's injection).
    fail_next_write: bool,
    /// The next snapshot restore fails (a test's injection).
    fail_next_restore: bool,
    incarnation: u64,
    disk: Disk,
    /// Writes in flight, oldest first; they complete in order.
    writes: VecDeque<Write>,
    disk_busy_until: Micros,
    io: Shared,
}

pub struct System {
    pub cfg: SystemConfig,
    pub now: Micros,
    rng: ChaCha8Rng,
    queue: BinaryHeap<Reverse<(Micros, u64, usize)>>,
    events: Vec<Option<Event>>,
    seq: u64,
    members: Vec<Member>,
    pub net: Network,
    pub checker: Checker,
    pub history: Vec<Operation>,
    /// Operations refused before they were proposed or read: they certainly did not
    /// happen, so the check leaves them out.
    refused: Vec<bool>,
    /// Which operation each proposed request id belongs to.
    proposed: HashMap<RequestId, usize>,
    /// When a write's entry was first applied by any member, and what it returned there: the
    /// write took effect by then, whatever its client heard.
    first_applied: HashMap<usize, (Micros, Output)>,
    /// Members that stopped on an injected failure (fail-stop), counted.
    pub fail_stops: u64,
    pub replay: String,
    /// Watch clients, and each member's watch hub (`None` while it is down).
    pub watch: WatchClients,
    hubs: Vec<Option<SimHub>>,
    watch_rng: ChaCha8Rng,
}

impl System {
    pub fn new(cfg: SystemConfig) -> Self {
        let replay = format!(
            "cargo run -p sim --release -- system --seed {} (or SIM_SEED={} for a test)",
            cfg.seed, cfg.seed
        );
        let mut s = System {
            rng: ChaCha8Rng::seed_from_u64(cfg.seed ^ 0x5157),
            now: 0,
            queue: BinaryHeap::new(),
            events: Vec::new(),
            seq: 0,
            members: (0..cfg.nodes)
                .map(|_| Member {
                    driver: None,
                    fail_next_write: false,
                    fail_next_restore: false,
                    incarnation: 0,
                    disk: Disk::default(),
                    writes: VecDeque::new(),
                    disk_busy_until: 0,
                    io: Shared::default(),
                })
                .collect(),
            net: Network::new(),
            checker: Checker::default(),
            history: Vec::new(),
            refused: Vec::new(),
            proposed: HashMap::new(),
            first_applied: HashMap::new(),
            fail_stops: 0,
            replay,
            watch: WatchClients::default(),
            hubs: (0..cfg.nodes).map(|_| None).collect(),
            watch_rng: ChaCha8Rng::seed_from_u64(cfg.seed ^ 0x3a7c),
            cfg,
        };
        for id in s.ids() {
            s.start(id);
        }
        s
    }

    pub fn ids(&self) -> Vec<NodeId> {
        (1..=self.cfg.nodes as NodeId).collect()
    }

    fn member(&mut self, id: NodeId) -> &mut Member {
        &mut self.members[id as usize - 1]
    }

    pub fn is_up(&self, id: NodeId) -> bool {
        self.members[id as usize - 1].driver.is_some()
    }

    pub fn driver(&self, id: NodeId) -> Option<&KvDriver> {
        self.members[id as usize - 1].driver.as_ref()
    }

    pub fn fail(&self, what: &str) -> ! {
        let mut state = String::new();
        for id in self.ids() {
            match self.driver(id) {
                None => state.push_str(&format!("  member {id}: down\n")),
                Some(d) => state.push_str(&format!("  member {id}: {:?}\n", d.status())),
            }
        }
        panic!(
            "{what}\n  at virtual time {} ms, seed {}\n{state}  replay: {}",
            self.now / MS,
            self.cfg.seed,
            self.replay
        )
    }

    fn schedule(&mut self, at: Micros, e: Event) {
        self.seq += 1;
        self.events.push(Some(e));
        self.queue
            .push(Reverse((at, self.seq, self.events.len() - 1)));
    }

    /// Boot `id` from its disk, with a fresh boot nonce as a restarted server would draw.
    fn start(&mut self, id: NodeId) {
        let (seed, boot) = (self.rng.gen::<u64>(), self.rng.gen::<u64>());
        let mut c = Config::new(id, self.ids());
        c.election_tick = self.cfg.election_tick;
        c.heartbeat_tick = self.cfg.heartbeat_tick;
        c.seed = seed;
        c.snapshot_timeout_tick = 3 * self.cfg.heartbeat_tick;
        let mut machine = SimKv::default();
        let m = self.member(id);
        let mut restored = Ok(());
        if let Some(s) = &m.disk.snapshot {
            match kv::Store::restore(&s.data) {
                Ok(store) => machine.store = store,
                Err(e) => restored = Err(format!("its snapshot does not decode: {e}")),
            }
            c.applied = s.meta.index;
        }
        let raft =
            restored.and_then(|()| Raft::new(c, m.disk.restore_state()).map_err(|e| e.to_string()));
        // A failure names the seed, as every other failure of the run does.
        let raft = match raft {
            Ok(raft) => raft,
            Err(e) => self.fail(&format!("member {id} cannot restart: {e}")),
        };
        let m = self.member(id);
        let io = Shared::default();
        m.io = io.clone();
        let dcfg = DriverConfig {
            snapshot_count: self.cfg.snapshot_count,
            max_pending_writes: 64,
            max_pending_reads: 64,
            ..DriverConfig::default()
        };
        let d = KvDriver::new(
            raft,
            machine,
            SimIo(io.clone()),
            SimIo(io),
            Ids::new(id, boot),
            dcfg,
        );
        let revision = d.machine().store.revision();
        self.hubs[id as usize - 1] = Some(watch::Hub::new(revision, watchers::limits()));
        let m = self.member(id);
        m.driver = Some(d);
        let inc = m.incarnation;
        let phase = self.rng.gen_range(1..=self.cfg.tick);
        self.schedule(self.now + phase, Event::Tick(id, inc));
        self.drain(id);
    }

    /// The next disk write of `id` fails.
    pub fn fail_next_write(&mut self, id: NodeId) {
        self.member(id).fail_next_write = true;
    }

    /// The next snapshot `id` is sent cannot be restored.
    pub fn fail_next_restore(&mut self, id: NodeId) {
        self.member(id).fail_next_restore = true;
    }

    /// The leader of the highest term among live members, if any.
    pub fn leader(&self) -> Option<NodeId> {
        self.ids()
            .into_iter()
            .filter_map(|id| self.driver(id))
            .filter(|d| d.raft().is_leader())
            .max_by_key(|d| d.raft().term())
            .map(|d| d.raft().id())
    }

    /// Run until a leader is known, or fail.
    pub fn wait_leader(&mut self) -> NodeId {
        for _ in 0..1_000 {
            if let Some(l) = self.leader() {
                return l;
            }
            self.run_for(10 * MS);
        }
        self.fail("no leader within 10 s")
    }

    pub fn disconnect(&mut self, id: NodeId) {
        for other in self.ids() {
            if other != id {
                self.net.block(id, other);
                self.net.block(other, id);
            }
        }
    }

    pub fn crash(&mut self, id: NodeId) {
        let m = self.member(id);
        // Dropping the driver drops its waiting clients unanswered: their outcome is unknown.
        m.driver = None;
        m.disk.unsynced = None;
        m.incarnation += 1;
        self.hubs[id as usize - 1] = None;
        self.watch.crashed(id);
        let m = self.member(id);
        m.writes.clear();
        m.io = Shared::default();
    }

    pub fn restart(&mut self, id: NodeId) {
        if self.is_up(id) {
            self.crash(id);
        }
        self.start(id);
    }

    /// Run one event.
    fn step(&mut self) -> bool {
        let Some(Reverse((at, _, slot))) = self.queue.pop() else {
            return false;
        };
        self.now = at;
        let event = self.events[slot].take().expect("each event runs once");
        if self.cfg.trace {
            println!("{:>10.3}ms {event:?}", at as f64 / MS as f64);
        }
        match event {
            Event::Tick(id, inc) => {
                if self.members[id as usize - 1].incarnation != inc || !self.is_up(id) {
                    return true;
                }
                self.with(id, |d| d.tick());
                let next = self.now + self.cfg.tick;
                self.schedule(next, Event::Tick(id, inc));
            }
            Event::Deliver(m) => {
                let (from, to) = (m.from, m.to);
                if !self.is_up(to) || !self.net.connected(from, to) {
                    return true;
                }
                if let Err(raft::Error::InvalidMessage(why)) = self.with(to, |d| d.step(m)) {
                    self.fail(&format!("member {to} refused a peer's message: {why}"));
                }
            }
            Event::Persisted(id, inc) => {
                if self.members[id as usize - 1].incarnation != inc {
                    return true;
                }
                let fails = self.rng.gen_bool(self.cfg.disk_failure)
                    || std::mem::take(&mut self.member(id).fail_next_write);
                let m = self.member(id);
                let w = m.writes.pop_front().expect("a write is in flight");
                if fails {
                    // The write did not reach the disk; the member must stop.
                    self.with(id, |d| d.on_persisted(Err("injected: fsync failed".into())));
                } else {
                    m.disk.write(w);
                    self.with(id, |d| d.on_persisted(Ok(())));
                }
            }
            Event::Snapshotted(id, inc, s) => {
                if self.members[id as usize - 1].incarnation != inc {
                    return true;
                }
                self.with(id, |d| d.on_snapshot(Ok(s)));
            }
            Event::Restored(id, inc, machine) => {
                if self.members[id as usize - 1].incarnation != inc {
                    return true;
                }
                self.with(id, |d| d.on_restored(machine));
            }
        }
        true
    }

    /// Call into a member's driver, then carry out what it asked for.
    fn with<T>(&mut self, id: NodeId, f: impl FnOnce(&mut KvDriver) -> T) -> T {
        let d = self.member(id).driver.as_mut().expect("member is up");
        let out = f(d);
        d.process_ready();
        self.drain(id);
        out
    }

    /// Move a member's outbox into the event queue, check invariants, and record answers.
    fn drain(&mut self, id: NodeId) {
        let io = self.members[id as usize - 1].io.clone();
        let mut out = std::mem::take(&mut *io.borrow_mut());
        let failed = self.driver(id).and_then(|d| d.failure()).is_some();
        if failed && !out.writes.is_empty() {
            self.fail(&format!("member {id} wrote to its log after it failed"));
        }
        for m in out.msgs.drain(..) {
            if let Some(at) = self.net.send(&m, self.now, &mut self.rng) {
                self.schedule(at, Event::Deliver(m));
            }
        }
        for w in out.writes.drain(..) {
            if !w.entries.is_empty() {
                if let Err(v) = self.checker.on_append(id, w.prev_term, &w.entries) {
                    self.fail(&v);
                }
            }
            let (lo, hi) = self.cfg.disk_latency;
            let latency = if w.is_empty() {
                0
            } else {
                self.rng.gen_range(lo..=hi)
            };
            let now = self.now;
            let m = self.member(id);
            let at = m.disk_busy_until.max(now) + latency;
            m.disk_busy_until = at;
            m.writes.push_back(w);
            let inc = m.incarnation;
            self.schedule(at, Event::Persisted(id, inc));
        }
        for (meta, store) in out.snapshots.drain(..) {
            let s = Snapshot {
                meta,
                data: store.snapshot(),
            };
            let delay = self.rng.gen_range(0..20 * MS);
            let inc = self.members[id as usize - 1].incarnation;
            self.schedule(self.now + delay, Event::Snapshotted(id, inc, s));
        }
        for snap in out.restores.drain(..) {
            // Decoding takes a while, off the loop: other events (ticks, messages, clients)
            // reach the member meanwhile. Sometimes the snapshot cannot be read back.
            let fails = self.rng.gen_bool(self.cfg.restore_failure)
                || std::mem::take(&mut self.member(id).fail_next_restore);
            let machine = if fails {
                Err("injected: the snapshot could not be read back".to_string())
            } else {
                let mut m = SimKv::default();
                m.restore(&snap).map(|_| m)
            };
            let delay = self.rng.gen_range(0..20 * MS);
            let inc = self.members[id as usize - 1].incarnation;
            self.schedule(self.now + delay, Event::Restored(id, inc, machine));
        }
        for s in out.compactions.drain(..) {
            // Written durably before the driver was told; entries it covers may go.
            self.member(id).disk.install(s);
        }
        let applied = match self.member(id).driver.as_mut() {
            Some(d) => std::mem::take(&mut d.machine_mut().applied),
            None => Vec::new(),
        };
        for (rid, output) in applied {
            let Some(&op) = self.proposed.get(&rid) else {
                self.fail(&format!(
                    "member {id} applied a request nobody proposed: {rid:?}"
                ));
            };
            let now = self.now;
            if let Some((at, first)) = self.first_applied.get(&op) {
                if *first != output {
                    self.fail(&format!(
                        "operation {op} returned {output:?} on member {id} but {first:?} at {at}"
                    ));
                }
            } else {
                self.first_applied.insert(op, (now, output));
            }
        }
        for (op, r) in out.answers.drain(..) {
            self.answered(op, r.map(|a| a.value));
        }
        for (op, r) in out.reads.drain(..) {
            self.answered(op, r.map(|a| Output::Value(a.value)));
        }
        if let Some(d) = self.members[id as usize - 1].driver.as_ref() {
            if let Some(why) = d.failure() {
                // Fail-stop: the process exits. What it had not made durable is lost.
                let why = why.to_string();
                if self.cfg.trace {
                    println!("member {id} stopped: {why}");
                }
                self.fail_stops += 1;
                self.crash(id);
                return;
            }
            if let Err(v) = self.checker.on_state(d.raft()) {
                self.fail(&v);
            }
            self.sync_watchers(id);
        }
    }

    /// Hand what `id` applied to its watch hub, and to the history the watchers are checked
    /// against (which also checks that every member applied the same revisions).
    fn sync_watchers(&mut self, id: NodeId) {
        let Some(d) = self.members[id as usize - 1].driver.as_ref() else {
            return;
        };
        let store = &d.machine().store;
        if let Err(e) = self.watch.history.record(store) {
            self.fail(&format!("member {id}: {e}"));
        }
        if let Some(hub) = self.hubs[id as usize - 1].as_mut() {
            hub.sync(store);
        }
    }

    /// Start `n` watch clients (they open their streams on the next turn).
    pub fn add_watchers(&mut self, n: usize) {
        self.watch = WatchClients::new(n, &mut self.watch_rng);
    }

    /// The watch clients read, and those without a stream open one.
    pub fn watch_turn(&mut self) {
        match self.watch.turn(&mut self.watch_rng, &mut self.hubs) {
            Ok(touched) => {
                for id in touched {
                    self.sync_watchers(id);
                }
            }
            Err(e) => self.fail(&format!("watch: {e}")),
        }
    }

    /// After convergence: let the watch clients read until each has every revision, then
    /// check what they got against the history.
    pub fn check_watchers(&mut self) {
        // Requests still in flight may apply meanwhile: compare with the history as it is.
        for _ in 0..2_000 {
            self.watch_turn();
            if self.watch.complete(self.watch.history.last()).is_ok() {
                break;
            }
            self.run_for(MS);
        }
        if let Err(e) = self.watch.complete(self.watch.history.last()) {
            self.fail(&format!("watch: {e}"));
        }
    }

    fn answered(&mut self, op: usize, r: Result<Output, Refusal>) {
        let now = self.now;
        let o = &mut self.history[op];
        if now > o.call + CLIENT_TIMEOUT {
            return; // the client gave up before the answer came: it never saw it
        }
        match r {
            Ok(out) => {
                o.ret = Some(now);
                o.output = out;
            }
            // Refused before it was proposed or read: it certainly did not happen.
            Err(
                Refusal::NoLeader
                | Refusal::TooManyRequests
                | Refusal::TooLarge
                | Refusal::ConfChange(_),
            ) => {
                o.ret = Some(now);
                self.refused[op] = true;
            }
            // It may still commit: the outcome stays unknown.
            Err(Refusal::LeaderChanged | Refusal::Stopped) => {}
        }
    }

    /// A client sends `input` to member `id`, through the driver as the server would.
    /// Returns the operation's number in `history`.
    pub fn invoke(&mut self, id: NodeId, client: u64, key: u64, input: Input) -> usize {
        let op = self.history.len();
        self.history.push(Operation {
            client,
            key,
            input: input.clone(),
            call: self.now,
            ret: None,
            output: Output::Ok,
        });
        self.refused.push(false);
        if !self.is_up(id) {
            self.history[op].ret = Some(self.now);
            self.refused[op] = true;
            return op;
        }
        let io = self.members[id as usize - 1].io.clone();
        match input {
            Input::Get => self.with(id, |d| d.read(key, true, ReadReply(op, io))),
            Input::Put(v) => self.propose(id, Op::Put(key, v), WriteReply(op, io)),
            Input::Delete => self.propose(id, Op::Delete(key), WriteReply(op, io)),
            Input::Cas { expect, new } => {
                self.propose(id, Op::Cas(key, expect, new), WriteReply(op, io))
            }
        }
        op
    }

    /// What operation `op` returned: `None` while unknown, or if it was refused.
    pub fn outcome(&self, op: usize) -> Option<&Output> {
        let o = &self.history[op];
        (o.ret.is_some() && !self.refused[op]).then_some(&o.output)
    }

    fn propose(&mut self, id: NodeId, op: Op, reply: WriteReply<SimKv>) {
        let number = reply.0;
        let mut assigned = None;
        self.with(id, |d| {
            d.propose(
                |rid| {
                    assigned = Some(rid);
                    encode(rid, op)
                },
                reply,
            )
        });
        if let Some(rid) = assigned {
            // Ids must be unique across members and lives: an entry carrying a reused id
            // would answer the wrong client when it applies (issue 9, defect 2).
            if let Some(earlier) = self.proposed.insert(rid, number) {
                self.fail(&format!(
                    "request id {rid:?} was given to operation {earlier} and again to {number}"
                ));
            }
        }
    }

    pub fn run_for(&mut self, d: Micros) {
        let end = self.now + d;
        while self
            .queue
            .peek()
            .is_some_and(|Reverse((at, _, _))| *at <= end)
        {
            self.step();
        }
        self.now = end;
    }

    /// End every fault: the network, failing disks and snapshots; restart every member.
    pub fn heal(&mut self) {
        self.net.heal();
        self.net.faults = Faults::RELIABLE;
        self.cfg.disk_failure = 0.0;
        self.cfg.restore_failure = 0.0;
        for id in self.ids() {
            if !self.is_up(id) {
                self.restart(id);
            }
        }
    }

    /// After healing: every member up, one leader, all applied to the same index, and the
    /// same store everywhere.
    pub fn check_converged(&mut self) {
        let settled = |s: &System| {
            let ids = s.ids();
            let Some(first) = s.driver(ids[0]) else {
                return false;
            };
            let (commit, applied) = (first.raft().commit_index(), first.raft().applied());
            ids.iter().all(|&id| {
                s.driver(id).is_some_and(|d| {
                    d.raft().commit_index() == commit && d.raft().applied() == applied
                })
            }) && applied == commit
                && ids
                    .iter()
                    .any(|&id| s.driver(id).unwrap().raft().is_leader())
        };
        let deadline = self.now + 20_000 * MS;
        // Proposals keep the leader's heartbeats carrying commit news to everyone.
        while !settled(self) {
            if self.now > deadline {
                self.fail("liveness: the healed system did not converge");
            }
            // A member may have stopped on a failure injected just before the heal.
            for id in self.ids() {
                if !self.is_up(id) {
                    self.restart(id);
                }
            }
            self.run_for(10 * MS);
        }
        let ids = self.ids();
        let state = |id| self.driver(id).unwrap().machine().store.snapshot();
        let reference = state(ids[0]);
        for &id in &ids[1..] {
            if state(id) != reference {
                self.fail(&format!(
                    "member {id}'s store differs from member {}'s",
                    ids[0]
                ));
            }
        }
    }

    pub fn rng(&mut self) -> &mut ChaCha8Rng {
        &mut self.rng
    }

    /// The history to check. Operations refused before they were proposed are left out. A
    /// write whose client never heard back took effect by the time its entry was first
    /// applied, with the result the state machine gave it there; one that no member ever
    /// applied did not happen (call this once the system has converged, when nothing more
    /// can commit).
    pub fn checked_history(&self) -> Vec<Operation> {
        let mut out = Vec::with_capacity(self.history.len());
        for (i, o) in self.history.iter().enumerate() {
            if self.refused[i] {
                continue;
            }
            let mut o = o.clone();
            match (o.ret, self.first_applied.get(&i)) {
                // Took effect no later than its first apply, however late the answer came.
                (Some(ret), Some((at, _))) => o.ret = Some(ret.min((*at).max(o.call))),
                (None, Some((at, output))) => {
                    o.ret = Some((*at).max(o.call));
                    o.output = output.clone();
                }
                (None, None) if o.input != Input::Get => continue,
                _ => {}
            }
            out.push(o);
        }
        out
    }
}

/// A client waits this long for an answer, then gives up: the operation's outcome is then
/// unknown to it (as with etcd clients' request timeouts).
pub const CLIENT_TIMEOUT: Micros = 1_000 * MS;
/// Clients of the soak, each with at most one request outstanding.
const CLIENTS: u64 = 8;

// ---- the soak --------------------------------------------------------------------------------

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
}

/// One seed: a random schedule of faults under clients doing single-key operations on a few
/// keys; then heal, converge, and check the history. Panics with the seed on any violation.
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
    let mut s = System::new(cfg);
    s.add_watchers(3);
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
        }
    }
    s.heal();
    s.check_converged();
    // Requests still waiting get a last chance to be answered.
    s.run_for(1_000 * MS);
    s.check_watchers();
    r.watch_resumes = s.watch.clients.iter().map(|c| c.resumes).sum();
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
