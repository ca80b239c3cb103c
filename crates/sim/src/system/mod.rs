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
//!
//! This file holds the system's configuration, its state and its event queue. The rest is
//! split by job: `faults` (a member boots, crashes, restarts, pauses; disks fail; links are
//! cut), `events` (one event at a time, and what a member's driver asked of the world),
//! `requests` (clients' requests into the drivers, and the answers routed back by ticket),
//! `leasing` (each member's lease clock and the lease clients), `watching` (the watch hubs
//! and clients), `checks` (what must hold once the system has healed and converged) and
//! `workload` (the soak: a seeded schedule of faults under all those clients).

use crate::checker::Checker;
use crate::io::{Mailbox, SimDriver};
use crate::leases::{self, Clock, Heard, LeaseClients, Send};
use crate::linearizability::Operation;
use crate::machine::{Applied, Op, SimKv};
use crate::network::{Micros, Network, MS};
use crate::node::Disk;
use crate::watchers::{SimHub, WatchClients};
use driver::{RequestId, Write};
use kv::lessor::{Lessor, Millis};
use kv::LeaseId;
use raft::{Message, NodeId, Snapshot};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, VecDeque};

mod checks;
mod events;
mod faults;
mod leasing;
mod requests;
mod watching;
mod workload;

pub use checks::session_runs;
pub use leasing::LAPSE_SLACK;
pub use requests::CLIENT_TIMEOUT;
pub use workload::{soak, soak_history, Report};

use leasing::KeepAlive;

type Shared = Mailbox<SimKv>;
pub type KvDriver = SimDriver<SimKv>;

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

    pub fn rng(&mut self) -> &mut ChaCha8Rng {
        &mut self.rng
    }
}
