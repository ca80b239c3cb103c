//! A member's runtime on tokio: one task owns the [`driver::Driver`] (the raft core, the kv
//! store, the clients waiting on them) and feeds it ticks, peer messages, client requests
//! and storage completions. Everything the Ready contract asks — what to send before and
//! after the disk write, applying, answering, reads, snapshots — is the driver's, the same
//! code the simulator runs. This file adds only what is about tokio and the disk: channels,
//! the group-commit log, background snapshot files, and etcd's response headers and errors.

use crate::api;
use crate::command::{self, Write};
use crate::machine::{Applied, KvMachine, Served};
use crate::pb::etcdserverpb::ResponseHeader;
use driver::{Answered, DriverConfig, Ids, Refusal, Reply};
use raft::{Index, Message, NodeId, Raft, Role, Snapshot, SnapshotMeta, Term};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use storage::{Batch, GroupCommit, Identity, Options, Storage};
use tokio::sync::{mpsc, oneshot};
use tonic::Status;

#[derive(Clone, Debug)]
pub struct NodeConfig {
    pub id: NodeId,
    pub voters: Vec<NodeId>,
    pub cluster_id: u64,
    pub data_dir: PathBuf,
    /// The heartbeat interval; one raft tick.
    pub tick: Duration,
    /// Election timeout in ticks (timeouts fall in [T, 2T)).
    pub election_ticks: u64,
    /// Compact the log every this many applied entries.
    pub snapshot_count: u64,
}

/// How raft messages leave the node. Sending never blocks the raft loop; a transport that
/// cannot deliver drops (raft retransmits).
pub trait Transport: Send + Sync + 'static {
    fn send(&self, msgs: Vec<Message>);
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeStatus {
    pub id: NodeId,
    pub role: Role,
    pub leader: Option<NodeId>,
    pub term: Term,
    pub commit: Index,
    pub applied: Index,
    pub revision: i64,
    pub snapshot_index: Index,
    pub db_size: u64,
}

pub type WriteResult = Result<(kv::Response, ResponseHeader), Status>;
pub type ReadResult = Result<(kv::RangeResponse, ResponseHeader), Status>;

/// Requests from clients and peers. The queue is bounded: when the loop falls behind,
/// clients are told "too many requests" and peers' messages are dropped (raft resends),
/// instead of memory growing without limit.
enum Input {
    Step(Message),
    Write(Write, Waiter<Applied>),
    Read(kv::RangeRequest, bool, Waiter<Served>),
    Status(oneshot::Sender<NodeStatus>),
    Stop,
}

/// Completions from the node's own storage, on a queue of their own: they are bounded by
/// the writes in flight and must never be dropped.
enum Done {
    Persisted(Result<(), String>),
    Snapshotted(Result<Snapshot, String>),
    Restored(Result<KvMachine, String>),
}

/// Most requests queued for the loop; beyond it clients get "too many requests".
pub const INPUT_QUEUE: usize = 16_384;
/// Inputs handled before the loop looks at the core's output again: batching bound.
const MAX_INPUTS_PER_ROUND: usize = 1024;

/// A handle to a running node; cheap to clone.
#[derive(Clone)]
pub struct Node {
    tx: mpsc::Sender<Input>,
    id: NodeId,
    cluster_id: u64,
}

fn gone() -> Status {
    Status::unavailable("etcdserver: server stopped")
}

fn too_many_requests() -> Status {
    Status::resource_exhausted("etcdserver: too many requests")
}

fn refused(r: Refusal) -> Status {
    match r {
        Refusal::NoLeader => Status::unavailable("etcdserver: no leader"),
        Refusal::LeaderChanged => Status::unavailable("etcdserver: leader changed"),
        Refusal::TooManyRequests => too_many_requests(),
        Refusal::TooLarge => api::request_too_large(),
        Refusal::Stopped => gone(),
    }
}

/// A client waiting on the loop.
pub struct Waiter<T>(oneshot::Sender<Result<Answered<T>, Refusal>>);

impl<T> Reply<T> for Waiter<T> {
    fn send(self, result: Result<Answered<T>, Refusal>) {
        let _ = self.0.send(result);
    }
    fn is_closed(&self) -> bool {
        self.0.is_closed()
    }
}

type KvDriver = driver::Driver<KvMachine, Wal, Peers, Waiter<Applied>, Waiter<Served>>;

impl Node {
    /// Open the data directory, recover, and run the node on the current tokio runtime. The
    /// task ends with the reason if the member had to stop (a failed disk, say). Reading the
    /// log and decoding the snapshot happen on a blocking thread, not on the runtime's loop.
    pub async fn start(
        cfg: NodeConfig,
        transport: Arc<dyn Transport>,
    ) -> Result<(Node, tokio::task::JoinHandle<Result<(), String>>), String> {
        let recover = {
            let cfg = cfg.clone();
            tokio::task::spawn_blocking(move || recover(&cfg))
        };
        let (storage, raft, machine, boot) = recover
            .await
            .map_err(|e| format!("recovery stopped: {e}"))??;
        let (tx, rx) = mpsc::channel(INPUT_QUEUE);
        let (done_tx, done_rx) = mpsc::unbounded_channel();
        let wal = Wal {
            writer: storage.snapshot_writer(),
            group: GroupCommit::start(storage),
            done: done_tx,
        };
        let dcfg = DriverConfig {
            snapshot_count: cfg.snapshot_count,
            max_command_bytes: api::MAX_REQUEST_BYTES,
            ..DriverConfig::default()
        };
        let d = KvDriver::new(
            raft,
            machine,
            wal,
            Peers(transport),
            Ids::new(cfg.id, boot),
            dcfg,
        );
        let task = tokio::spawn(run(d, cfg.tick, rx, done_rx));
        let node = Node {
            tx,
            id: cfg.id,
            cluster_id: cfg.cluster_id,
        };
        Ok((node, task))
    }

    /// A message from a peer. Dropped if the loop is that far behind; raft resends.
    pub fn step(&self, m: Message) {
        let _ = self.tx.try_send(Input::Step(m));
    }

    fn submit(&self, input: Input) -> Result<(), Status> {
        self.tx.try_send(input).map_err(|e| match e {
            mpsc::error::TrySendError::Full(_) => too_many_requests(),
            mpsc::error::TrySendError::Closed(_) => gone(),
        })
    }

    fn header(&self, revision: i64, raft_term: Term) -> ResponseHeader {
        ResponseHeader {
            cluster_id: self.cluster_id,
            member_id: self.id,
            revision,
            raft_term,
        }
    }

    /// Propose a write; answers once it is committed and applied here.
    pub async fn write(&self, w: Write) -> WriteResult {
        let (reply, rx) = oneshot::channel();
        self.submit(Input::Write(w, Waiter(reply)))?;
        let answered = rx.await.map_err(|_| gone())?.map_err(refused)?;
        let (resp, revision) = answered.value?;
        Ok((resp, self.header(revision, answered.term)))
    }

    /// A range read: linearizable (ReadIndex) or serializable (local state).
    pub async fn read(&self, req: kv::RangeRequest, linearizable: bool) -> ReadResult {
        let (reply, rx) = oneshot::channel();
        self.submit(Input::Read(req, linearizable, Waiter(reply)))?;
        let answered = rx.await.map_err(|_| gone())?.map_err(refused)?;
        let (resp, revision) = answered.value?;
        Ok((resp, self.header(revision, answered.term)))
    }

    pub async fn status(&self) -> Result<NodeStatus, Status> {
        let (reply, rx) = oneshot::channel();
        self.submit(Input::Status(reply))?;
        rx.await.map_err(|_| gone())
    }

    pub fn stop(&self) {
        // A full queue must not keep a member from stopping.
        let tx = self.tx.clone();
        tokio::spawn(async move {
            let _ = tx.send(Input::Stop).await;
        });
    }
}

/// What a member finds on its disk: the log, the core restored from it, and the store
/// restored from the latest snapshot.
fn recover(cfg: &NodeConfig) -> Result<(Storage, Raft, KvMachine, u64), String> {
    let id = Identity {
        cluster_id: cfg.cluster_id,
        node_id: cfg.id,
    };
    let (storage, state) =
        Storage::open(&cfg.data_dir, id, Options::default()).map_err(|e| e.to_string())?;
    let mut machine = KvMachine::default();
    let mut rc = raft::Config::new(cfg.id, cfg.voters.clone());
    if let Some(s) = &state.snapshot {
        machine.restore_at_start(s)?;
        rc.applied = s.meta.index;
    }
    rc.heartbeat_tick = 1;
    rc.election_tick = cfg.election_ticks;
    let boot = boot_nonce(cfg.id);
    rc.seed = boot;
    let raft = Raft::new(rc, state).map_err(|e| e.to_string())?;
    Ok((storage, raft, machine, boot))
}

impl KvMachine {
    fn restore_at_start(&mut self, s: &Snapshot) -> Result<(), String> {
        driver::StateMachine::restore(self, s)
            .map_err(|e| format!("the snapshot at index {} is unreadable: {e}", s.meta.index))
    }
}

/// A nonce for this life of the member: request ids and read contexts carry it, so answers
/// meant for an earlier life never match a request of this one. From the OS's randomness
/// (through std's hasher keys), mixed with the clock and process id.
fn boot_nonce(id: NodeId) -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    h.write_u128(nanos);
    h.write_u32(std::process::id());
    h.write_u64(id);
    h.finish()
}

/// The loop. Returns the reason if the member had to stop.
async fn run(
    mut d: KvDriver,
    tick: Duration,
    mut rx: mpsc::Receiver<Input>,
    mut done: mpsc::UnboundedReceiver<Done>,
) -> Result<(), String> {
    let mut ticker = tokio::time::interval(tick);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = ticker.tick() => d.tick(),
            Some(first) = done.recv() => {
                on_done(&mut d, first);
                while let Ok(next) = done.try_recv() {
                    on_done(&mut d, next);
                }
            }
            input = rx.recv() => {
                let Some(input) = input else { break };
                let mut stop = !handle(&mut d, input);
                for _ in 0..MAX_INPUTS_PER_ROUND {
                    if stop {
                        break;
                    }
                    match rx.try_recv() {
                        Ok(input) => stop = !handle(&mut d, input),
                        Err(_) => break,
                    }
                }
                if stop {
                    d.shutdown("the member is stopping");
                    return Ok(());
                }
            }
        }
        d.process_ready();
        if let Some(why) = d.failure() {
            return Err(why.to_string());
        }
    }
    d.shutdown("the member is stopping");
    Ok(())
}

fn on_done(d: &mut KvDriver, done: Done) {
    match done {
        Done::Persisted(result) => d.on_persisted(result),
        Done::Snapshotted(result) => d.on_snapshot(result),
        Done::Restored(result) => d.on_restored(result),
    }
}

/// Returns false when the node must stop.
fn handle(d: &mut KvDriver, input: Input) -> bool {
    match input {
        // Messages from strangers, or that break the protocol's rules, are the core's to
        // refuse (and count).
        Input::Step(m) => {
            let _ = d.step(m);
        }
        Input::Write(w, reply) => d.propose(|id| command::encode(id, w), reply),
        Input::Read(req, linearizable, reply) => d.read(req, linearizable, reply),
        Input::Status(reply) => {
            let s = d.status();
            let store = &d.machine().store;
            let _ = reply.send(NodeStatus {
                id: s.id,
                role: s.role,
                leader: s.leader,
                term: s.term,
                commit: s.commit,
                applied: s.applied,
                revision: store.revision(),
                snapshot_index: s.snapshot_index,
                db_size: store.size_bytes(),
            });
        }
        Input::Stop => return false,
    }
    true
}

/// The peer transport, as the driver sees it.
struct Peers(Arc<dyn Transport>);

impl driver::Transport for Peers {
    fn send(&mut self, msgs: Vec<Message>) {
        if !msgs.is_empty() {
            self.0.send(msgs);
        }
    }
}

/// The write-ahead log behind group commit, and snapshot files written off the loop.
struct Wal {
    group: GroupCommit,
    /// Writes snapshot files off the raft loop and off the log's thread.
    writer: storage::SnapshotWriter,
    done: mpsc::UnboundedSender<Done>,
}

impl driver::Storage<KvMachine> for Wal {
    fn persist(&mut self, w: driver::Write) {
        let done = self.done.clone();
        self.group.submit(Batch {
            snapshot: w.snapshot,
            hard_state: w.hard_state,
            entries: w.entries,
            lazy: w.lazy,
            on_durable: Some(Box::new(move |result| {
                let _ = done.send(Done::Persisted(result));
            })),
            ..Default::default()
        });
    }

    /// Serialized and written on a blocking thread, so neither the loop nor the log's
    /// appends wait for a large snapshot.
    fn snapshot(&mut self, meta: SnapshotMeta, store: kv::Store) {
        let (writer, done) = (self.writer.clone(), self.done.clone());
        tokio::task::spawn_blocking(move || {
            let snapshot = Snapshot {
                meta,
                data: store.snapshot(),
            };
            let result = writer.write(&snapshot).map(|_| snapshot);
            let _ = done.send(Done::Snapshotted(result.map_err(|e| e.to_string())));
        });
    }

    fn compact(&mut self, snapshot: Snapshot) {
        self.group.submit(Batch {
            compact: Some(snapshot),
            ..Default::default()
        });
    }

    /// Decoding a leader's snapshot into a store runs on a blocking thread; the loop keeps
    /// ticking and taking messages meanwhile.
    fn restore(&mut self, snapshot: Snapshot) {
        let done = self.done.clone();
        tokio::task::spawn_blocking(move || {
            let mut machine = KvMachine::default();
            let result = driver::StateMachine::restore(&mut machine, &snapshot).map(|_| machine);
            let _ = done.send(Done::Restored(result));
        });
    }
}
