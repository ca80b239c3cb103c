#![warn(missing_docs)]

//! # driver — the Ready contract, implemented once
//!
//! The raft core (`crates/raft`) decides; it does no IO. Something must carry out its
//! decisions in the right order: send what may leave before the disk write, persist, send
//! what promises durable state only once it is durable, apply what is committed and durable,
//! answer the clients waiting on those entries, serve confirmed reads, take snapshots and
//! compact. That is this crate's [`Driver`], and it is the only implementation: the server
//! runs it on tokio with the real write-ahead log and gRPC peers, and the simulator runs the
//! very same code with a simulated disk, network and clock. What the simulator proves about
//! the driver holds for production.
//!
//! The driver knows nothing of etcd, tokio or files. It is generic over:
//! - a [`StateMachine`] (the kv store in production; a register or the kv store in tests),
//! - [`Storage`] (asynchronous writes that complete in submission order, and the slow work
//!   kept off the loop: serializing and restoring snapshots),
//! - a [`Transport`] (fire and forget; raft retransmits),
//! - [`Reply`] handles for the clients waiting on writes and reads,
//!
//! and time moves only when its owner calls [`Driver::tick`]. A transport that moves bytes
//! can encode raft's messages with [`wire`].
//!
//! Failures are fail-stop: a write the disk refused, a snapshot that cannot be restored or
//! an entry that cannot be applied stops the driver at once ([`Driver::failure`]); every
//! waiting client is told, and nothing is acknowledged afterwards.

mod driver;
mod ids;
pub mod wire;

pub use driver::{Driver, DriverConfig, Status};
pub use ids::{Ids, RequestId};

use bytes::Bytes;
use raft::{Entry, HardState, Index, Message, Snapshot, SnapshotMeta, Term};

/// The replicated state machine. Every member applies the same entries in the same order and
/// must reach the same state: `apply` is deterministic.
pub trait StateMachine {
    /// What a write's client is told once its entry is applied.
    type Output;
    /// A read request: what the application wants to look up.
    type Query;
    /// What a read's client is told: the query's result against the state applied so far.
    type Answer;
    /// A frozen copy of the state for a background snapshot; serialized off the loop.
    type Frozen: Send + 'static;

    /// Apply one committed entry (no-ops included). Returns the id of the request the entry
    /// carries, if any, with the output for its client. An error means this member cannot
    /// go on (its state would diverge): the driver stops.
    fn apply(&mut self, entry: &Entry) -> Result<Option<(RequestId, Self::Output)>, String>;
    /// Answer a read from the current state.
    fn query(&self, query: &Self::Query) -> Self::Answer;
    /// Freeze the current state, cheaply, for a snapshot taken in the background.
    fn freeze(&self) -> Self::Frozen;
    /// Replace the whole state with a snapshot's (storage calls this, off the loop, on a
    /// fresh machine). An error stops the driver.
    fn restore(&mut self, snapshot: &Snapshot) -> Result<(), String>;
}

/// One write for the log, in the order the Ready contract gives: snapshot, hard state, then
/// entries, which replace any stored entries from their first index on.
#[derive(Debug, Default)]
pub struct Write {
    /// A snapshot from the leader, written first: stored entries it covers are dropped (all
    /// of them if the stored entry at its index has another term).
    pub snapshot: Option<Snapshot>,
    /// The new term, vote and commit index, if any changed; the term and vote are what keep
    /// a restarted member from voting twice in one term.
    pub hard_state: Option<HardState>,
    /// Log entries, consecutive; they replace any stored entries from `entries[0].index` on
    /// (a follower overwriting an uncommitted suffix it got from a deposed leader).
    pub entries: Vec<Entry>,
    /// The term of the entry just before `entries` (for checkers; 0 if none).
    pub prev_term: Term,
    /// Nothing here needs an fsync of its own (only a commit index moved): the write may
    /// ride on the next synced one.
    pub lazy: bool,
}

impl Write {
    /// A write with nothing in it: it completes when every write before it has.
    pub fn is_empty(&self) -> bool {
        self.snapshot.is_none() && self.hard_state.is_none() && self.entries.is_empty()
    }
}

/// Durable storage, driven asynchronously, and the work that must not run on the loop.
/// Writes complete in the order they were submitted; the owner reports each completion with
/// [`Driver::on_persisted`].
pub trait Storage<M: StateMachine> {
    /// Submit `write`. It must be durable (fsynced, unless `write.lazy`) before the owner
    /// reports it complete with [`Driver::on_persisted`], and writes complete in the order
    /// submitted. Should not block the loop.
    fn persist(&mut self, write: Write);
    /// Serialize `frozen` into a snapshot for `meta` and make it durable, off the loop; the
    /// owner reports it with [`Driver::on_snapshot`].
    fn snapshot(&mut self, meta: SnapshotMeta, frozen: M::Frozen);
    /// The log may now drop what `snapshot` (already durable) covers.
    fn compact(&mut self, snapshot: Snapshot);
    /// Build a state machine from a leader's snapshot, off the loop (decoding a large store
    /// takes a while); the owner reports it with [`Driver::on_restored`]. Until then the
    /// driver handles nothing more of the core's output.
    fn restore(&mut self, snapshot: Snapshot);
}

/// How raft messages leave. Never blocks; a transport that cannot deliver drops.
pub trait Transport {
    /// Hand `msgs` to the network, each to its `to`. The driver never waits for delivery:
    /// a message lost, duplicated or reordered costs time (raft resends), never safety.
    fn send(&mut self, msgs: Vec<Message>);
}

/// Why a request was not carried out (or may not have been).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// No leader is known, so nothing can be proposed or confirmed.
    NoLeader,
    /// The leader changed while the request waited: a write may or may not have committed.
    LeaderChanged,
    /// A bound was reached (pending writes or reads, uncommitted bytes): try again later.
    TooManyRequests,
    /// The encoded command is larger than the configured limit.
    TooLarge,
    /// The member stopped (shut down or failed) before answering.
    Stopped,
    /// The core refused a configuration change (one is still pending, the leader has not
    /// committed an entry of its term yet, or the change is not a valid one): why.
    ConfChange(String),
}

/// A client waiting for an answer. Implemented by a oneshot sender in the server and by a
/// history recorder in the simulator.
pub trait Reply<T> {
    /// Deliver the outcome. Called at most once per request: a reply whose client gave up
    /// ([`Reply::is_closed`]) may be dropped without it.
    fn send(self, result: Outcome<T>);
    /// The client gave up (its request timed out); the driver may forget it.
    fn is_closed(&self) -> bool {
        false
    }
}

/// What a waiting client finally learns.
pub type Outcome<T> = Result<Answered<T>, Refusal>;

/// An answer with the facts a response header needs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Answered<T> {
    /// The write's output or the read's answer.
    pub value: T,
    /// The member's term when it answered.
    pub term: Term,
    /// The applied index the answer reflects.
    pub applied: Index,
}

/// Encoded command bytes, as proposed.
pub type Command = Bytes;
