//! The Ready contract, checked on the driver alone with recording fakes: what leaves before
//! the disk write and what only after, fail-stop, and the bounds on waiting clients.

use bytes::Bytes;
use driver::{
    Answered, Driver, DriverConfig, Ids, Refusal, Reply, RequestId, StateMachine, Storage,
    Transport, Write,
};
use raft::{Body, Config, Entry, Message, Raft, RestoreState, Snapshot, SnapshotMeta};
use std::cell::RefCell;
use std::rc::Rc;

#[derive(Default)]
struct World {
    sent: Vec<Message>,
    writes: Vec<Write>,
    answers: Vec<Result<Answered<u64>, Refusal>>,
}

type Shared = Rc<RefCell<World>>;

/// Counts applied commands; a command is its request id's sequence number.
#[derive(Default)]
struct Counter(u64);

impl StateMachine for Counter {
    type Output = u64;
    type Query = ();
    type Answer = u64;
    type Frozen = u64;
    fn apply(&mut self, e: &Entry) -> Result<Option<(RequestId, u64)>, String> {
        if e.data.len() != 24 {
            return Ok(None);
        }
        self.0 += 1;
        let word = |i: usize| u64::from_le_bytes(e.data[i..i + 8].try_into().unwrap());
        let id = RequestId {
            member: word(0),
            boot: word(8),
            seq: word(16),
        };
        Ok(Some((id, self.0)))
    }
    fn query(&self, _: &()) -> u64 {
        self.0
    }
    fn freeze(&self) -> u64 {
        self.0
    }
    fn restore(&mut self, _: &Snapshot) -> Result<(), String> {
        Err("this machine cannot restore".into())
    }
}

struct Io(Shared);
impl Storage<Counter> for Io {
    fn persist(&mut self, w: Write) {
        self.0.borrow_mut().writes.push(w);
    }
    fn snapshot(&mut self, _: SnapshotMeta, _: u64) {}
    fn compact(&mut self, _: Snapshot) {}
    fn restore(&mut self, _: Snapshot) {}
}
impl Transport for Io {
    fn send(&mut self, mut msgs: Vec<Message>) {
        self.0.borrow_mut().sent.append(&mut msgs);
    }
}

struct Client(Shared);
impl Reply<u64> for Client {
    fn send(self, r: Result<Answered<u64>, Refusal>) {
        self.0.borrow_mut().answers.push(r);
    }
}

type D = Driver<Counter, Io, Io, Client, Client>;

fn driver(voters: Vec<u64>, cfg: DriverConfig) -> (D, Shared) {
    let world = Shared::default();
    let mut c = Config::new(1, voters);
    c.pre_vote = false;
    let raft = Raft::new(c, RestoreState::default()).unwrap();
    let d = Driver::new(
        raft,
        Counter::default(),
        Io(world.clone()),
        Io(world.clone()),
        Ids::new(1, 42),
        cfg,
    );
    (d, world)
}

fn encode(id: RequestId) -> Bytes {
    let mut v = Vec::new();
    for x in [id.member, id.boot, id.seq] {
        v.extend_from_slice(&x.to_le_bytes());
    }
    v.into()
}

#[test]
fn a_vote_request_leaves_only_once_the_vote_is_durable() {
    let (mut d, world) = driver(vec![1, 2, 3], DriverConfig::default());
    d.raft_mut().campaign();
    d.process_ready();
    let votes = |w: &World| {
        w.sent
            .iter()
            .filter(|m| matches!(m.body, Body::Vote { .. }))
            .count()
    };
    assert_eq!(
        world.borrow().writes.len(),
        1,
        "the term and vote are written"
    );
    assert_eq!(
        votes(&world.borrow()),
        0,
        "no vote request before the write is durable"
    );
    d.on_persisted(Ok(()));
    assert_eq!(votes(&world.borrow()), 2);
}

#[test]
fn a_failed_write_stops_the_member_and_nothing_that_depended_on_it_leaves() {
    let (mut d, world) = driver(vec![1, 2, 3], DriverConfig::default());
    d.raft_mut().campaign();
    d.process_ready();
    d.on_persisted(Err("disk full".into()));
    assert!(d.failure().unwrap().contains("disk full"));
    assert!(world.borrow().sent.is_empty(), "{:?}", world.borrow().sent);
    // Afterwards nothing is accepted, and the client is told.
    d.propose(encode, Client(world.clone()));
    d.tick();
    d.process_ready();
    assert_eq!(world.borrow().answers, vec![Err(Refusal::Stopped)]);
    assert!(world.borrow().sent.is_empty() && world.borrow().writes.len() == 1);
}

#[test]
fn a_single_member_answers_its_client_after_the_entry_is_durable_and_applied() {
    let (mut d, world) = driver(vec![1], DriverConfig::default());
    d.raft_mut().campaign();
    d.process_ready();
    d.on_persisted(Ok(())); // term, vote and the no-op
    d.process_ready();
    while d.writes_in_flight() > 0 {
        d.on_persisted(Ok(()));
        d.process_ready();
    }
    d.propose(encode, Client(world.clone()));
    d.process_ready();
    assert!(
        world.borrow().answers.is_empty(),
        "not before it is durable"
    );
    while d.writes_in_flight() > 0 {
        d.on_persisted(Ok(()));
        d.process_ready();
    }
    let answers = &world.borrow().answers;
    assert_eq!(answers.len(), 1);
    assert_eq!(answers[0].as_ref().unwrap().value, 1);
}

#[test]
fn writes_beyond_the_bound_are_refused_not_queued() {
    let cfg = DriverConfig {
        max_pending_writes: 3,
        ..DriverConfig::default()
    };
    let (mut d, world) = driver(vec![1], cfg);
    d.raft_mut().campaign();
    d.process_ready();
    for _ in 0..5 {
        d.propose(encode, Client(world.clone()));
    }
    assert_eq!(d.status().pending_writes, 3);
    let refused = world
        .borrow()
        .answers
        .iter()
        .filter(|a| **a == Err(Refusal::TooManyRequests))
        .count();
    assert_eq!(refused, 2);
}
