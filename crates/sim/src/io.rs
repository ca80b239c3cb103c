//! The simulated world as the production driver sees it: storage, transport and client
//! reply handles that only record what the driver asked for. After every call into a
//! driver the simulator drains this outbox — messages onto the simulated network, writes
//! onto the simulated disk with a latency, snapshots into background jobs, answers into
//! the client history — and checks its invariants.

use driver::{Answered, Refusal, Reply, Write};
use raft::{Message, Snapshot, SnapshotMeta};
use std::cell::RefCell;
use std::rc::Rc;

/// What one member's driver asked of the world since the last drain. `F` is its state
/// machine's frozen copy, `A` and `B` the answers to writes and reads; clients are known by
/// a number the simulator chose.
pub struct Outbox<F, A, B> {
    pub msgs: Vec<Message>,
    pub writes: Vec<Write>,
    pub snapshots: Vec<(SnapshotMeta, F)>,
    pub compactions: Vec<Snapshot>,
    pub answers: Vec<(usize, Result<Answered<A>, Refusal>)>,
    pub reads: Vec<(usize, Result<Answered<B>, Refusal>)>,
}

impl<F, A, B> Default for Outbox<F, A, B> {
    fn default() -> Self {
        Outbox {
            msgs: Vec::new(),
            writes: Vec::new(),
            snapshots: Vec::new(),
            compactions: Vec::new(),
            answers: Vec::new(),
            reads: Vec::new(),
        }
    }
}

pub type Shared<F, A, B> = Rc<RefCell<Outbox<F, A, B>>>;

/// The driver's storage and transport: both record into the outbox.
pub struct SimIo<F, A, B>(pub Shared<F, A, B>);

impl<F, A, B> driver::Storage<F> for SimIo<F, A, B> {
    fn persist(&mut self, w: Write) {
        self.0.borrow_mut().writes.push(w);
    }
    fn snapshot(&mut self, meta: SnapshotMeta, frozen: F) {
        self.0.borrow_mut().snapshots.push((meta, frozen));
    }
    fn compact(&mut self, s: Snapshot) {
        self.0.borrow_mut().compactions.push(s);
    }
}

impl<F, A, B> driver::Transport for SimIo<F, A, B> {
    fn send(&mut self, mut msgs: Vec<Message>) {
        self.0.borrow_mut().msgs.append(&mut msgs);
    }
}

/// A client waiting on a write; `.0` is its number.
pub struct WriteReply<F, A, B>(pub usize, pub Shared<F, A, B>);
/// A client waiting on a read.
pub struct ReadReply<F, A, B>(pub usize, pub Shared<F, A, B>);

impl<F, A, B> Reply<A> for WriteReply<F, A, B> {
    fn send(self, r: Result<Answered<A>, Refusal>) {
        self.1.borrow_mut().answers.push((self.0, r));
    }
}

impl<F, A, B> Reply<B> for ReadReply<F, A, B> {
    fn send(self, r: Result<Answered<B>, Refusal>) {
        self.1.borrow_mut().reads.push((self.0, r));
    }
}

/// A driver wired to the simulated world.
pub type SimDriver<M> = driver::Driver<
    M,
    SimIo<Frozen<M>, Output<M>, Answer<M>>,
    SimIo<Frozen<M>, Output<M>, Answer<M>>,
    WriteReply<Frozen<M>, Output<M>, Answer<M>>,
    ReadReply<Frozen<M>, Output<M>, Answer<M>>,
>;

pub type Frozen<M> = <M as driver::StateMachine>::Frozen;
pub type Output<M> = <M as driver::StateMachine>::Output;
pub type Answer<M> = <M as driver::StateMachine>::Answer;
/// The outbox of a driver of `M`.
pub type Mailbox<M> = Shared<Frozen<M>, Output<M>, Answer<M>>;
