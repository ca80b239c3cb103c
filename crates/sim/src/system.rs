//! The whole system in virtual time: every member runs the production [`driver::Driver`]
//! with the real kv store as its state machine; only the disk, the network and the clock
//! are simulated. Clients send puts, gets, deletes and compare-and-swaps through the same
//! driver calls the server makes for its gRPC clients, every invocation and response is
//! recorded, and the history is checked for linearizability — on top of the Raft
//! invariants the checker asserts after every event. Faults: crashes (with requests in
//! flight), restarts, partitions, loss, reordering, pauses (a member stops running for a
//! while, its clock does not), and disk writes that fail (the member must stop, never
//! half-apply).
//!
//! Every member also runs the production lease clock as the server's loop does
//! ([`System::keep_leases`]), on a clock of its own that drifts from true time (see
//! `leases.rs`), and lease clients hold, renew, let lapse and revoke leases, some of them
//! running exactly-once sessions; what they were promised is checked as it happens and at
//! the end ([`System::check_leases`]).

use crate::checker::Checker;
use crate::io::{Mailbox, ReadReply, SimDriver, SimIo, WriteReply};
use crate::leases::{self, Ask, Clock, Heard, LeaseClients, Send, MAX_TTL};
use crate::linearizability::{self, Input, Operation, Output, Verdict};
use crate::machine::{encode, key, number, Applied, Op, SimKv};
use crate::network::{Faults, Micros, Network, MS};
use crate::node::Disk;
use crate::watchers::{self, SimHub, WatchClients};
use driver::{DriverConfig, Ids, Outcome, Refusal, RequestId, StateMachine, Write};
use kv::lessor::{Lessor, LessorConfig, Millis, Renewal};
use kv::{LeaseId, LeaseResponse};
use raft::{Config, Message, NodeId, Raft, Role, Snapshot};
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap, HashMap, VecDeque};

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
    /// Each member's clock rate, in parts per million fast (+) or slow (−), within
    /// [`leases::DRIFT_PPM`]; empty: drawn from the seed.
    pub drift_ppm: Vec<i64>,
    /// How often the lease clock records long leases' remaining TTL (etcd's five minutes,
    /// in the simulation's scale so that 1–3 s leases get checkpoints).
    pub checkpoint_interval: Millis,
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
            drift_ppm: Vec::new(),
            checkpoint_interval: 700,
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
    /// Keep-alive `k` arrives at a member.
    KeepAlive(NodeId, usize),
    /// Keep-alive `k`'s leadership check passed at the member (of that incarnation): back on
    /// its loop, as the server's `Input::Confirmed`.
    Confirmed(NodeId, u64, usize),
    /// A client's request for a member that was paused when it was sent.
    Call(NodeId, usize, Call),
}

impl Event {
    /// The member that handles the event.
    fn member(&self) -> NodeId {
        match self {
            Event::Deliver(m) => m.to,
            Event::Tick(id, _)
            | Event::Persisted(id, _)
            | Event::Snapshotted(id, _, _)
            | Event::Restored(id, _, _)
            | Event::KeepAlive(id, _)
            | Event::Confirmed(id, _, _)
            | Event::Call(id, _, _) => *id,
        }
    }
}

/// What a client asks of a member's driver.
#[derive(Debug)]
enum Call {
    Read(u64),
    Propose(Op),
}

/// Who waits for a reply: the number a driver's reply handles carry.
#[derive(Clone, Copy, Debug)]
enum Ticket {
    /// An operation of the checked history.
    Checked(usize),
    /// A lease client's request (keep-alives aside), or a test's.
    Client(Send),
    /// Keep-alive `k`'s leadership check, or the write clearing its lease's checkpoint.
    KeepAlive(usize),
    /// A member's own write, from its lease clock: nobody waits.
    Own,
}

/// A keep-alive on its way through a member.
struct KeepAlive {
    send: Send,
    lease: LeaseId,
    /// When it arrived, on the member's clock.
    received: Millis,
    /// The lease clock's answer once confirmed.
    renewal: Option<Renewal>,
}

/// The client number of a test's requests ([`System::request`]).
const TEST: usize = usize::MAX;
/// Slack on top of TTL + extension for an expired lease's revoke to be proposed, committed
/// and applied once it is due (a tick to notice, a round trip, a disk write).
pub const LAPSE_SLACK: Micros = 200 * MS;

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
    /// The lease clock, new at every boot (as the server's loop makes one).
    lessor: Lessor,
    /// The clock the lease clock reads.
    clock: Clock,
    /// Until then the member runs nothing (its events wait); its clock runs on.
    paused_until: Micros,
    /// The (incarnation, applied index) whose store the watch history last recorded.
    recorded: Option<(u64, u64)>,
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
    /// Each history operation's ticket.
    history_ticket: Vec<usize>,
    /// Who waits on each reply number.
    tickets: Vec<Ticket>,
    /// Which ticket each proposed request id belongs to.
    proposed: HashMap<RequestId, usize>,
    /// When a write's entry was first applied by any member, and what it returned there (by
    /// ticket): the write took effect by then, whatever its client heard; every other
    /// member must return the same.
    first_applied: HashMap<usize, (Micros, Applied)>,
    /// Members that stopped on an injected failure (fail-stop), counted.
    pub fail_stops: u64,
    pub replay: String,
    /// Watch clients, and each member's watch hub (`None` while it is down).
    pub watch: WatchClients,
    hubs: Vec<Option<SimHub>>,
    watch_rng: ChaCha8Rng,
    /// Lease clients, and what they were promised.
    pub leases: LeaseClients,
    keep_alives: Vec<KeepAlive>,
    lease_rng: ChaCha8Rng,
    /// Answers to a test's requests, by number, and their tickets.
    test_answers: HashMap<u64, Heard>,
    test_tickets: HashMap<u64, usize>,
    test_numbers: u64,
    pub pauses: u64,
    /// Keep-alives that reached a member whose lease clock runs, and went to its
    /// leadership check.
    pub probes: u64,
    /// The first request of each session number to apply, and how many later ones did
    /// (retries answered from memory).
    session_first: HashMap<(LeaseId, u64), usize>,
    pub session_dedups: u64,
}

impl System {
    pub fn new(cfg: SystemConfig) -> Self {
        let replay = format!(
            "cargo run -p sim --release -- system --seed {} (or SIM_SEED={} for a test)",
            cfg.seed, cfg.seed
        );
        let mut clocks = ChaCha8Rng::seed_from_u64(cfg.seed ^ 0xc10c);
        let drift: Vec<i64> = (0..cfg.nodes)
            .map(|i| {
                cfg.drift_ppm
                    .get(i)
                    .copied()
                    .unwrap_or_else(|| leases::drift(&mut clocks))
            })
            .collect();
        let mut s = System {
            rng: ChaCha8Rng::seed_from_u64(cfg.seed ^ 0x5157),
            now: 0,
            queue: BinaryHeap::new(),
            events: Vec::new(),
            seq: 0,
            members: drift
                .iter()
                .map(|&ppm| Member {
                    driver: None,
                    fail_next_write: false,
                    fail_next_restore: false,
                    incarnation: 0,
                    disk: Disk::default(),
                    writes: VecDeque::new(),
                    disk_busy_until: 0,
                    io: Shared::default(),
                    lessor: Lessor::default(),
                    clock: Clock { boot: 0, ppm },
                    paused_until: 0,
                    recorded: None,
                })
                .collect(),
            net: Network::new(),
            checker: Checker::default(),
            history: Vec::new(),
            refused: Vec::new(),
            history_ticket: Vec::new(),
            tickets: Vec::new(),
            proposed: HashMap::new(),
            first_applied: HashMap::new(),
            fail_stops: 0,
            replay,
            watch: WatchClients::default(),
            hubs: (0..cfg.nodes).map(|_| None).collect(),
            watch_rng: ChaCha8Rng::seed_from_u64(cfg.seed ^ 0x3a7c),
            leases: LeaseClients::new(0, cfg.nodes),
            keep_alives: Vec::new(),
            lease_rng: ChaCha8Rng::seed_from_u64(cfg.seed ^ 0x1ea5),
            test_answers: HashMap::new(),
            test_tickets: HashMap::new(),
            test_numbers: 0,
            pauses: 0,
            probes: 0,
            session_first: HashMap::new(),
            session_dedups: 0,
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

    /// A line of the trace, when tracing (made only then).
    fn note(&self, what: impl FnOnce() -> String) {
        if self.cfg.trace {
            println!("{:>10.3}ms {}", self.now as f64 / MS as f64, what());
        }
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
        let lessor = Lessor::new(LessorConfig {
            extend: self.lease_extend(),
            checkpoint_interval: self.cfg.checkpoint_interval,
            ..LessorConfig::default()
        });
        let now = self.now;
        let m = self.member(id);
        m.driver = Some(d);
        m.lessor = lessor;
        m.clock.boot = now;
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

    /// `id`'s disk is busy for `d`: its next writes complete no earlier than that.
    pub fn stall_disk(&mut self, id: NodeId, d: Micros) {
        let until = self.now + d;
        let m = self.member(id);
        m.disk_busy_until = m.disk_busy_until.max(until);
    }

    /// `id` runs nothing for `d` (a SIGSTOP, a long GC pause, a starved VM): messages,
    /// ticks, disk completions and clients' requests wait; its clock runs on.
    pub fn pause(&mut self, id: NodeId, d: Micros) {
        let until = self.now + d;
        let m = self.member(id);
        m.paused_until = m.paused_until.max(until);
        self.pauses += 1;
    }

    /// `from`, which leads, hands leadership to `to` at once (etcd's move-leader): the
    /// tightest failover there is. Whether the transfer began.
    pub fn transfer(&mut self, from: NodeId, to: NodeId) -> bool {
        self.is_up(from)
            && self
                .with(from, |d| d.raft_mut().transfer_leader(to))
                .is_ok()
    }

    /// Whether `id`'s lease clock counts time (it leads, as far as it knows, and has applied
    /// an entry of its term).
    pub fn lease_clock_runs(&self, id: NodeId) -> bool {
        self.is_up(id) && self.members[id as usize - 1].lessor.is_primary()
    }

    /// The lease clock's extension for a new leader: an election timeout, the server's rule.
    pub fn lease_extend(&self) -> Millis {
        self.cfg.election_tick * self.cfg.tick / MS
    }

    /// The longest a lease of `ttl` seconds that nobody keeps alive may live once a leader
    /// leads stably from `t` on (or from the lease's last acknowledgement, if later): its
    /// TTL and the extension, on a clock up to [`leases::DRIFT_PPM`] slow, then
    /// [`LAPSE_SLACK`] to revoke it.
    pub fn lapse_bound(&self, ttl: i64) -> Micros {
        let local = (ttl as Micros * 1_000 + self.lease_extend()) * MS;
        local * 1_000_000 / (1_000_000 - leases::DRIFT_PPM as Micros) + LAPSE_SLACK
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
        m.paused_until = 0;
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
        // A paused member handles nothing until it runs again, in the order things came.
        let until = self.members[event.member() as usize - 1].paused_until;
        if at < until {
            self.schedule(until, event);
            return true;
        }
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
            Event::KeepAlive(id, k) => self.keep_alive_arrives(id, k),
            Event::Confirmed(id, inc, k) => self.confirmed(id, inc, k),
            Event::Call(id, ticket, call) => self.call(id, ticket, call),
        }
        true
    }

    /// Call into a member's driver, then run its lease clock (as the server's loop does
    /// after every round), then carry out what it asked for.
    fn with<T>(&mut self, id: NodeId, f: impl FnOnce(&mut KvDriver) -> T) -> T {
        let d = self.member(id).driver.as_mut().expect("member is up");
        let out = f(d);
        d.process_ready();
        self.keep_leases(id);
        self.drain(id);
        out
    }

    /// The server's `Loop::keep_leases`: tell the lease clock what applied, poll it (it
    /// counts time only while `leading`), and propose what it found as the member's own
    /// writes: revokes of expired leases, checkpoints of long ones.
    fn keep_leases(&mut self, id: NodeId) {
        let now = self.now;
        let m = &mut self.members[id as usize - 1];
        let Some(d) = m.driver.as_mut() else {
            return;
        };
        let local = m.clock.millis(now);
        for change in std::mem::take(&mut d.machine_mut().lease_changes) {
            m.lessor.changed(&change, local);
        }
        let work = m.lessor.poll(local, leading(d.raft()), &d.machine().store);
        let mut own: Vec<Op> = work.revoke.into_iter().map(Op::Revoke).collect();
        if !work.checkpoint.is_empty() {
            own.push(Op::Checkpoint(work.checkpoint));
        }
        if own.is_empty() {
            return;
        }
        for op in &own {
            self.note(|| format!("member {id} at local {local} ms proposes {op:?}"));
            self.submit(id, op, Ticket::Own);
        }
        if let Some(d) = self.member(id).driver.as_mut() {
            d.process_ready();
        }
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
            let Some(&ticket) = self.proposed.get(&rid) else {
                self.fail(&format!(
                    "member {id} applied a request nobody proposed: {rid:?}"
                ));
            };
            let now = self.now;
            if let Some((at, first)) = self.first_applied.get(&ticket) {
                if *first != output {
                    self.fail(&format!(
                        "request {ticket} returned {output:?} on member {id} but {first:?} at {at}"
                    ));
                }
            } else {
                self.first_applied.insert(ticket, (now, output.clone()));
                self.first_apply(ticket, &output);
            }
        }
        let broken = match self.member(id).driver.as_mut() {
            Some(d) => std::mem::take(&mut d.machine_mut().broken),
            None => Vec::new(),
        };
        if let Some(why) = broken.first() {
            self.fail(&format!("member {id}: {why}"));
        }
        for (ticket, r) in out.answers.drain(..) {
            self.write_answered(id, ticket, r);
        }
        for (ticket, r) in out.reads.drain(..) {
            self.read_answered(id, ticket, r);
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
        let m = &mut self.members[id as usize - 1];
        let Some(d) = m.driver.as_ref() else {
            return;
        };
        let store = &d.machine().store;
        // Each state a member reaches is recorded (and compared) once: most calls come
        // after events that applied nothing.
        let state = (m.incarnation, d.raft().applied());
        let mut recorded = Ok(());
        if m.recorded != Some(state) {
            m.recorded = Some(state);
            recorded = self.watch.history.record(store);
        }
        if let Some(hub) = self.hubs[id as usize - 1].as_mut() {
            hub.sync(store);
        }
        if let Err(e) = recorded {
            self.fail(&format!("member {id}: {e}"));
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
        let ticket = self.ticket(Ticket::Checked(op));
        self.history_ticket.push(ticket);
        let call = match input {
            Input::Get => Call::Read(key),
            Input::Put(v) => Call::Propose(Op::Put(key, v)),
            Input::Delete => Call::Propose(Op::Delete(key)),
            Input::Cas { expect, new } => Call::Propose(Op::Cas(key, expect, new)),
        };
        self.call(id, ticket, call);
        op
    }

    /// What operation `op` returned: `None` while unknown, or if it was refused.
    pub fn outcome(&self, op: usize) -> Option<&Output> {
        let o = &self.history[op];
        (o.ret.is_some() && !self.refused[op]).then_some(&o.output)
    }

    fn ticket(&mut self, t: Ticket) -> usize {
        self.tickets.push(t);
        self.tickets.len() - 1
    }

    /// Hand a client's request to member `id`'s driver: at once, or when it runs again if
    /// it is paused; refused if it is down.
    fn call(&mut self, id: NodeId, ticket: usize, call: Call) {
        if !self.is_up(id) {
            return self.unreachable(ticket);
        }
        let until = self.members[id as usize - 1].paused_until;
        if self.now < until {
            return self.schedule(until, Event::Call(id, ticket, call));
        }
        let io = self.members[id as usize - 1].io.clone();
        match call {
            Call::Read(key) => self.with(id, |d| d.read(key, true, ReadReply(ticket, io))),
            Call::Propose(op) => self.propose(id, &op, ticket),
        }
    }

    /// A request whose member is down: certainly not carried out.
    fn unreachable(&mut self, ticket: usize) {
        match self.tickets[ticket] {
            Ticket::Checked(op) => {
                self.history[op].ret = Some(self.now);
                self.refused[op] = true;
            }
            Ticket::Client(send) => self.client_heard(send, Heard::Refused(None)),
            Ticket::KeepAlive(k) => self.keep_alive_heard(k, Heard::Refused(None)),
            Ticket::Own => {}
        }
    }

    fn propose(&mut self, id: NodeId, op: &Op, ticket: usize) {
        self.submit_ticket(id, op, ticket);
        self.with(id, |_| ());
    }

    /// Propose `op` at `id` for a new ticket, without running the member's loop yet.
    fn submit(&mut self, id: NodeId, op: &Op, t: Ticket) {
        let ticket = self.ticket(t);
        self.submit_ticket(id, op, ticket);
    }

    fn submit_ticket(&mut self, id: NodeId, op: &Op, ticket: usize) {
        let io = self.members[id as usize - 1].io.clone();
        let mut assigned = None;
        let d = self.member(id).driver.as_mut().expect("member is up");
        d.propose(
            |rid| {
                assigned = Some(rid);
                encode(rid, op)
            },
            WriteReply(ticket, io),
        );
        if let Some(rid) = assigned {
            // Ids must be unique across members and lives: an entry carrying a reused id
            // would answer the wrong client when it applies (issue 9, defect 2).
            if let Some(earlier) = self.proposed.insert(rid, ticket) {
                self.fail(&format!(
                    "request id {rid:?} was given to request {earlier} and again to {ticket}"
                ));
            }
        }
    }

    /// A write's answer reached member `id`'s reply handle.
    fn write_answered(&mut self, id: NodeId, ticket: usize, r: Outcome<Applied>) {
        match self.tickets[ticket] {
            Ticket::Checked(op) => {
                let r = r.map(|a| match a.value {
                    Applied::Kv(out) => out,
                    other => self.fail(&format!("operation {op} answered {other:?}")),
                });
                self.answered(op, r);
            }
            Ticket::Client(send) => {
                let heard = match r {
                    Ok(a) => Heard::Applied(a.value),
                    Err(why) => self.refusal(id, &why),
                };
                self.client_heard(send, heard);
            }
            // The clear of a renewed lease's checkpoint: the keep-alive is answered now.
            Ticket::KeepAlive(k) => match r {
                Ok(a) if matches!(a.value, Applied::Lease(Ok(_))) => self.keep_alive_acked(k),
                Ok(_) => self.keep_alive_heard(k, Heard::Unknown),
                Err(why) => {
                    let heard = self.refusal(id, &why);
                    self.keep_alive_heard(k, heard);
                }
            },
            Ticket::Own => {}
        }
    }

    fn read_answered(&mut self, id: NodeId, ticket: usize, r: Outcome<Option<u64>>) {
        match self.tickets[ticket] {
            Ticket::Checked(op) => self.answered(op, r.map(|a| Output::Value(a.value))),
            // A keep-alive's leadership check passed: back to the member's loop.
            Ticket::KeepAlive(k) => match r {
                Ok(_) => {
                    let inc = self.members[id as usize - 1].incarnation;
                    self.schedule(self.now, Event::Confirmed(id, inc, k));
                }
                Err(why) => {
                    let heard = self.refusal(id, &why);
                    self.keep_alive_heard(k, heard);
                }
            },
            other => self.fail(&format!("a read answered {other:?}")),
        }
    }

    /// What a client makes of a refusal from member `id`.
    fn refusal(&self, id: NodeId, why: &Refusal) -> Heard {
        match why {
            Refusal::LeaderChanged | Refusal::Stopped => Heard::Unknown,
            _ => Heard::Refused(self.driver(id).and_then(|d| d.raft().leader())),
        }
    }

    /// The first apply anywhere of a ticket's entry: a revoke ends its lease then.
    fn first_apply(&mut self, ticket: usize, output: &Applied) {
        if let Applied::Lease(_) = output {
            let t = self.tickets[ticket];
            self.note(|| format!("first applied: {output:?} ({t:?})"));
        }
        if let (Ticket::Client(send), Applied::Session(Ok(_))) = (self.tickets[ticket], output) {
            if let Ask::Session(s) = send.ask {
                // A later request with the same number was answered from the session's
                // memory (that it did not run again, `check_sessions` checks).
                let first = *self.session_first.entry((s.lease, s.seq)).or_insert(ticket);
                self.session_dedups += u64::from(first != ticket);
            }
        }
        if let Applied::Lease(Ok(LeaseResponse::Revoked { id, .. })) = output {
            let expiry = matches!(self.tickets[ticket], Ticket::Own);
            if let Err(why) = self.leases.book.revoked(*id, self.now, expiry) {
                self.fail(&why);
            }
        }
    }

    // ---- lease clients ------------------------------------------------------------------

    /// Start `n` lease clients (they grant their first leases on the next turn).
    pub fn add_lease_clients(&mut self, n: usize) {
        self.leases = LeaseClients::new(n, self.cfg.nodes);
    }

    /// The lease clients send what is due.
    pub fn lease_turn(&mut self) {
        for send in self.leases.turn(self.now, &mut self.lease_rng) {
            self.dispatch(send);
        }
    }

    /// Run for `d`, the lease clients taking a turn every 10 ms.
    pub fn run_with_leases(&mut self, d: Micros) {
        let end = self.now + d;
        while self.now < end {
            self.lease_turn();
            self.run_for((10 * MS).min(end - self.now));
        }
    }

    /// Send `ask` to member `id` as a test's client. Returns the number its answer is
    /// kept under ([`System::heard`]).
    pub fn request(&mut self, id: NodeId, ask: Ask) -> u64 {
        self.test_numbers += 1;
        match ask {
            Ask::Grant(lease, ttl) => self.leases.book.asked_grant(lease, ttl),
            Ask::Revoke(lease) => self.leases.book.asked_revoke(lease),
            _ => {}
        }
        let send = Send {
            client: TEST,
            number: self.test_numbers,
            member: id,
            ask,
            sent: self.now,
        };
        self.dispatch(send);
        send.number
    }

    /// What a test's request heard (its first answer), if anything yet.
    pub fn heard(&self, number: u64) -> Option<&Heard> {
        self.test_answers.get(&number)
    }

    /// What a test's write returned where its entry first applied, if it applied.
    pub fn first_applied(&self, number: u64) -> Option<&Applied> {
        let ticket = self.test_tickets.get(&number)?;
        self.first_applied.get(ticket).map(|(_, a)| a)
    }

    fn dispatch(&mut self, send: Send) {
        let op = match send.ask {
            Ask::KeepAlive(lease) => {
                self.keep_alives.push(KeepAlive {
                    send,
                    lease,
                    received: 0,
                    renewal: None,
                });
                // A client's keep-alive takes a little while to reach its member; a test's
                // arrives at once (a test times it).
                let delay = match send.client {
                    TEST => 0,
                    _ => self.lease_rng.gen_range(0..=5 * MS),
                };
                let at = self.now + delay;
                let k = self.keep_alives.len() - 1;
                return self.schedule(at, Event::KeepAlive(send.member, k));
            }
            Ask::Grant(lease, ttl) => Op::Grant(lease, ttl),
            Ask::Attach(lease, k) => Op::PutLeased(k, k, lease),
            Ask::Revoke(lease) => Op::Revoke(lease),
            Ask::Session(s) => Op::InSession(s, leases::session_key(s.lease), s.seq),
            Ask::Put(k, v) => Op::Put(k, v),
        };
        let ticket = self.ticket(Ticket::Client(send));
        if send.client == TEST {
            self.test_tickets.insert(send.number, ticket);
        }
        self.call(send.member, ticket, Call::Propose(op));
    }

    fn client_heard(&mut self, send: Send, heard: Heard) {
        if let (Ask::Session(s), Heard::Applied(Applied::Session(Ok(rev)))) = (send.ask, &heard) {
            if let Err(why) = self.leases.book.session_answered(s.lease, s.seq, *rev) {
                self.fail(&why);
            }
        }
        if send.client != TEST {
            return self.leases.heard(send.client, send.number, heard, self.now);
        }
        if let (Ask::Grant(lease, _), Heard::Applied(Applied::Lease(Ok(_)))) = (send.ask, &heard) {
            self.leases.book.granted(lease, send.sent);
        }
        self.test_answers.entry(send.number).or_insert(heard);
    }

    /// The server's `Loop::renew`: only the lease clock of a member that leads takes a
    /// keep-alive, and it renews only once a ReadIndex round begun after the arrival has
    /// confirmed the leadership — dated from the arrival.
    fn keep_alive_arrives(&mut self, id: NodeId, k: usize) {
        let Some(d) = self.driver(id) else {
            return self.keep_alive_heard(k, Heard::Refused(None));
        };
        let m = &self.members[id as usize - 1];
        if !m.lessor.is_primary() {
            let leader = d.raft().leader();
            return self.keep_alive_heard(k, Heard::Refused(leader));
        }
        self.keep_alives[k].received = m.clock.millis(self.now);
        self.probes += 1;
        let io = m.io.clone();
        let ticket = self.ticket(Ticket::KeepAlive(k));
        self.with(id, |d| d.read(0, true, ReadReply(ticket, io)));
    }

    /// Keep-alive `k`'s leadership check passed at `id`: the lease clock answers, and a
    /// renewal of a checkpointed lease clears the checkpoint through the log before the
    /// client is told (as the server's lease service does).
    fn confirmed(&mut self, id: NodeId, inc: u64, k: usize) {
        let m = &mut self.members[id as usize - 1];
        let Some(d) = m.driver.as_ref().filter(|_| m.incarnation == inc) else {
            return self.keep_alive_heard(k, Heard::Unknown);
        };
        let (lease, received) = (self.keep_alives[k].lease, self.keep_alives[k].received);
        let renewal = m.lessor.renew(lease, received, &d.machine().store);
        let leader = d.raft().leader();
        let left = m.lessor.remaining(lease, m.clock.millis(self.now));
        let sent = self.keep_alives[k].send.sent / MS;
        self.note(|| {
            format!(
                "member {id}: keep-alive {k} of lease {lease} (sent at {sent} ms, arrived at \
                 local {received} ms): {renewal:?}, {left:?} ms left"
            )
        });
        self.keep_alives[k].renewal = Some(renewal);
        match renewal {
            Renewal::Renewed {
                clear_checkpoint: true,
                ..
            } => {
                let ticket = self.ticket(Ticket::KeepAlive(k));
                self.propose(id, &Op::Checkpoint(vec![(lease, 0)]), ticket);
            }
            Renewal::Renewed { .. } => self.keep_alive_acked(k),
            Renewal::NotLeader => self.keep_alive_heard(k, Heard::Refused(leader)),
            other => self.keep_alive_heard(k, Heard::Renewal(other)),
        }
    }

    /// Keep-alive `k` is acknowledged: its client may count on the lease from its send time.
    fn keep_alive_acked(&mut self, k: usize) {
        let ka = &self.keep_alives[k];
        let (send, lease, renewal) = (ka.send, ka.lease, ka.renewal);
        if let Err(why) = self.leases.book.renewed(lease, send.sent, self.now) {
            self.fail(&why);
        }
        let renewal = renewal.expect("an acknowledged keep-alive was renewed");
        self.client_heard(send, Heard::Renewal(renewal));
    }

    fn keep_alive_heard(&mut self, k: usize, heard: Heard) {
        let send = self.keep_alives[k].send;
        self.client_heard(send, heard);
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
            let first = self.first_applied.get(&self.history_ticket[i]);
            match (o.ret, first) {
                // Took effect no later than its first apply, however late the answer came.
                (Some(ret), Some((at, _))) => o.ret = Some(ret.min((*at).max(o.call))),
                (None, Some((at, Applied::Kv(output)))) => {
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

    /// After convergence, the lease invariants that need a stable cluster:
    /// - for the longest TTL and a second the lease clients keep every lease they hold
    ///   alive (and grant none): none that was acknowledged meanwhile may be revoked;
    /// - then nobody keeps anything alive: every lease that exists must be revoked within
    ///   [`System::lapse_bound`] of that moment, on every member, with no key attached to a
    ///   lease left (each revoke was checked to delete its keys at one revision as it
    ///   applied);
    /// - every session's numbered puts ran at most once ([`System::check_sessions`]).
    pub fn check_leases(&mut self) {
        let since = self.now;
        self.leases.close();
        self.run_with_leases((MAX_TTL as Micros + 1) * 1_000 * MS);
        let held: Vec<LeaseId> = (0..self.leases.clients.len())
            .filter_map(|c| self.leases.holding(c))
            .collect();
        if let Err(why) = self.leases.book.kept_since(since, &held) {
            self.fail(&why);
        }
        let stop = self.now;
        self.leases.stop();
        let alive: Vec<(LeaseId, i64)> = self
            .latest_store()
            .leases()
            .map(|l| (l.id, l.ttl))
            .collect();
        self.run_for(self.lapse_bound(MAX_TTL));
        for id in self.ids() {
            let store = &self.driver(id).expect("converged").machine().store;
            let leased = leased_keys(store);
            if store.lease_count() > 0 || leased > 0 {
                self.fail(&format!(
                    "member {id} still has {} leases and {leased} keys attached to leases, \
                     {} ms after every client stopped keeping leases alive",
                    store.lease_count(),
                    (self.now - stop) / MS
                ));
            }
        }
        for (lease, ttl) in alive {
            let revoked = self.leases.book.leases.get(&lease).and_then(|r| r.revoked);
            let due = stop + self.lapse_bound(ttl);
            if revoked.is_none_or(|(at, _)| at > due) {
                self.fail(&format!(
                    "lease {lease} (TTL {ttl} s), left to lapse at {} ms with a stable leader, \
                     was revoked at {revoked:?}, after {} ms",
                    stop / MS,
                    due / MS
                ));
            }
        }
        self.check_sessions();
    }

    /// The store that has applied the most (at the end, every member's is a prefix of it).
    fn latest_store(&self) -> &kv::Store {
        self.ids()
            .into_iter()
            .filter_map(|id| self.driver(id))
            .map(|d| &d.machine().store)
            .max_by_key(|s| s.revision())
            .expect("a member is up")
    }

    /// Exactly once: in the store's history, each session's counter key was put with each
    /// number at most once, and at the very revision every answer to that number carried.
    pub fn check_sessions(&self) {
        let runs = session_runs(self.latest_store());
        for ((lease, seq), revs) in &runs {
            if revs.len() > 1 {
                self.fail(&format!(
                    "session {lease} number {seq} ran {} times, at revisions {revs:?}",
                    revs.len()
                ));
            }
        }
        for ((lease, seq), rev) in &self.leases.book.sessions {
            let ran = runs.get(&(*lease, *seq)).map_or(&[][..], |r| &r[..]);
            if ran != [*rev] {
                self.fail(&format!(
                    "session {lease} number {seq} was answered with revision {rev} but ran \
                     at {ran:?}"
                ));
            }
        }
    }
}

/// The server's `Loop::leading`: a member's lease clock runs while it leads and has applied
/// an entry of its own term, so that its store holds every lease the cluster granted.
fn leading(r: &Raft) -> bool {
    r.role() == Role::Leader && r.term_at(r.applied()) == Some(r.term())
}

/// Live keys attached to leases (in the leased key space).
fn leased_keys(store: &kv::Store) -> i64 {
    let range = kv::KeyRange {
        key: key(leases::LEASED_KEYS).key,
        range_end: key(leases::SESSION_KEYS).key,
    };
    let req = kv::RangeRequest {
        range,
        count_only: true,
        ..Default::default()
    };
    store.range(&req, store.revision()).map_or(0, |r| r.count)
}

/// Every put of a session counter key in the store's history: (session, number) → the
/// revisions it was put at.
pub fn session_runs(store: &kv::Store) -> BTreeMap<(LeaseId, u64), Vec<kv::Revision>> {
    let range = kv::KeyRange {
        key: key(leases::SESSION_KEYS).key,
        range_end: key(2 * leases::SESSION_KEYS).key,
    };
    let mut runs: BTreeMap<(LeaseId, u64), Vec<kv::Revision>> = BTreeMap::new();
    for rev in store.first_event_revision()..=store.revision() {
        for e in store.events_at(rev, Some(&range)) {
            let (Some(k), Some(seq)) = (number_be(&e.kv.key), number(&e.kv.value)) else {
                continue;
            };
            let lease = (k - leases::SESSION_KEYS) as LeaseId;
            runs.entry((lease, seq)).or_default().push(rev);
        }
    }
    runs
}

fn number_be(b: &[u8]) -> Option<u64> {
    Some(u64::from_be_bytes(b.try_into().ok()?))
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
