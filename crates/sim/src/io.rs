//! The simulated world as the production driver sees it: storage, transport and client
//! reply handles that only record what the driver asked for. After every call into a
//! driver the simulator drains this outbox — messages onto the simulated network, writes
//! onto the simulated disk with a latency, snapshots and restores into background jobs,
//! answers into the client history — and checks its invariants.

use driver::{Outcome, Reply, StateMachine, Write};
use raft::{Message, Snapshot, SnapshotMeta};
use std::cell::RefCell;
use std::rc::Rc;

/// What one member's driver (around a state machine `M`) asked of the world since the last
/// drain. Clients are known by a number the simulator chose.
pub struct Outbox<M: StateMachine> {
    pub msgs: Vec<Message>,
    pub writes: Vec<Write>,
    pub snapshots: Vec<(SnapshotMeta, M::Frozen)>,
    pub compactions: Vec<Snapshot>,
    /// Leader snapshots to build a state machine from, off the loop.
    pub restores: Vec<Snapshot>,
    pub answers: Vec<(usize, Outcome<M::Output>)>,
    pub reads: Vec<(usize, Outcome<M::Answer>)>,
}

impl<M: StateMachine> Default for Outbox<M> {
    fn default() -> Self {
        Outbox {
            msgs: Vec::new(),
            writes: Vec::new(),
            snapshots: Vec::new(),
            compactions: Vec::new(),
            restores: Vec::new(),
            answers: Vec::new(),
            reads: Vec::new(),
        }
    }
}

/// The outbox of a driver of `M`, shared with its storage, transport and reply handles.
pub type Mailbox<M> = Rc<RefCell<Outbox<M>>>;

/// The driver's storage and transport: both record into the outbox.
pub struct SimIo<M: StateMachine>(pub Mailbox<M>);

impl<M: StateMachine> driver::Storage<M> for SimIo<M> {
    fn persist(&mut self, w: Write) {
        self.0.borrow_mut().writes.push(w);
    }
    fn snapshot(&mut self, meta: SnapshotMeta, frozen: M::Frozen) {
        self.0.borrow_mut().snapshots.push((meta, frozen));
    }
    fn compact(&mut self, s: Snapshot) {
        self.0.borrow_mut().compactions.push(s);
    }
    fn restore(&mut self, s: Snapshot) {
        self.0.borrow_mut().restores.push(s);
    }
}

impl<M: StateMachine> driver::Transport for SimIo<M> {
    fn send(&mut self, mut msgs: Vec<Message>) {
        self.0.borrow_mut().msgs.append(&mut msgs);
    }
}

/// A client waiting on a write; `.0` is its number.
pub struct WriteReply<M: StateMachine>(pub usize, pub Mailbox<M>);
/// A client waiting on a read.
pub struct ReadReply<M: StateMachine>(pub usize, pub Mailbox<M>);

impl<M: StateMachine> Reply<M::Output> for WriteReply<M> {
    fn send(self, r: Outcome<M::Output>) {
        self.1.borrow_mut().answers.push((self.0, r));
    }
}

impl<M: StateMachine> Reply<M::Answer> for ReadReply<M> {
    fn send(self, r: Outcome<M::Answer>) {
        self.1.borrow_mut().reads.push((self.0, r));
    }
}

/// A driver wired to the simulated world.
pub type SimDriver<M> = driver::Driver<M, SimIo<M>, SimIo<M>, WriteReply<M>, ReadReply<M>>;
