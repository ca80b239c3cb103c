//! The node runtime. One task owns the raft core and the kv store and runs the loop: tick on
//! a timer; step messages from peers; send the leader's appends while its own disk write runs
//! (the core marks which messages may go early); persist through the storage thread with
//! group commit; send the messages that promise durable state only once it is durable; apply
//! committed entries; answer writers only when their entry is committed *and* applied; serve
//! linearizable reads through ReadIndex; compact every `snapshot_count` entries.

use crate::api;
use crate::command::{self, Write};
use crate::pb::etcdserverpb::ResponseHeader;
use raft::{EntryKind, Index, Message, NodeId, Raft, Role, Snapshot, SnapshotMeta, Term};
use std::collections::HashMap;
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

enum Input {
    Step(Message),
    Write(Write, oneshot::Sender<WriteResult>),
    Read(kv::RangeRequest, bool, oneshot::Sender<ReadResult>),
    Status(oneshot::Sender<NodeStatus>),
    Durable {
        result: Result<(), String>,
        persist_to: Option<(Index, Term)>,
        messages: Vec<Message>,
    },
    /// A background snapshot is written (or failed).
    Snapshotted(Result<Snapshot, String>),
    Stop,
}

/// A handle to a running node; cheap to clone.
#[derive(Clone)]
pub struct Node {
    tx: mpsc::UnboundedSender<Input>,
}

fn gone() -> Status {
    Status::unavailable("etcdserver: server stopped")
}

impl Node {
    /// Open the data directory, recover, and run the node on the current tokio runtime.
    pub fn start(
        cfg: NodeConfig,
        transport: Arc<dyn Transport>,
    ) -> Result<(Node, tokio::task::JoinHandle<()>), String> {
        let id = Identity {
            cluster_id: cfg.cluster_id,
            node_id: cfg.id,
        };
        let (storage, state) =
            Storage::open(&cfg.data_dir, id, Options::default()).map_err(|e| e.to_string())?;
        let (store, snapshot_index) = match &state.snapshot {
            Some(s) => (
                kv::Store::restore(&s.data).map_err(|e| e.to_string())?,
                s.meta.index,
            ),
            None => (kv::Store::new(), 0),
        };
        let mut rc = raft::Config::new(cfg.id, cfg.voters.clone());
        rc.heartbeat_tick = 1;
        rc.election_tick = cfg.election_ticks;
        rc.applied = snapshot_index;
        rc.seed = random_seed(cfg.id);
        let raft = Raft::new(rc, state).map_err(|e| e.to_string())?;
        let (tx, rx) = mpsc::unbounded_channel();
        let rt = Runtime {
            raft,
            store,
            snapshot_writer: storage.snapshot_writer(),
            snapshotting: false,
            storage: GroupCommit::start(storage),
            transport,
            tx: tx.clone(),
            waiters: HashMap::new(),
            next_request: 1,
            reads: HashMap::new(),
            confirmed_reads: Vec::new(),
            next_read: 1,
            in_flight: 0,
            last_snapshot: snapshot_index,
            was_leader: None,
            cfg,
        };
        let task = tokio::spawn(rt.run(rx));
        Ok((Node { tx }, task))
    }

    /// A message from a peer.
    pub fn step(&self, m: Message) {
        let _ = self.tx.send(Input::Step(m));
    }

    /// Propose a write; answers once it is committed and applied here.
    pub async fn write(&self, w: Write) -> WriteResult {
        let (reply, rx) = oneshot::channel();
        self.tx.send(Input::Write(w, reply)).map_err(|_| gone())?;
        rx.await
            .map_err(|_| Status::unavailable("etcdserver: leader changed"))?
    }

    /// A range read: linearizable (ReadIndex) or serializable (local state).
    pub async fn read(&self, req: kv::RangeRequest, linearizable: bool) -> ReadResult {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Input::Read(req, linearizable, reply))
            .map_err(|_| gone())?;
        rx.await
            .map_err(|_| Status::unavailable("etcdserver: leader changed"))?
    }

    pub async fn status(&self) -> Result<NodeStatus, Status> {
        let (reply, rx) = oneshot::channel();
        self.tx.send(Input::Status(reply)).map_err(|_| gone())?;
        rx.await.map_err(|_| gone())
    }

    pub fn stop(&self) {
        let _ = self.tx.send(Input::Stop);
    }
}

fn random_seed(id: NodeId) -> u64 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    nanos ^ id.rotate_left(32)
}

fn raft_status(e: raft::Error) -> Status {
    match e {
        raft::Error::NotLeader { .. } => Status::unavailable("etcdserver: not leader"),
        raft::Error::NoLeader => Status::unavailable("etcdserver: no leader"),
        raft::Error::TransferInProgress { .. } => Status::unavailable("etcdserver: leader changed"),
        raft::Error::ProposalDropped { .. } | raft::Error::ReadQueueFull => {
            Status::unavailable("etcdserver: too many requests")
        }
        other => Status::internal(other.to_string()),
    }
}

/// Inputs handled before the loop looks at the core's output again: batching bound.
const MAX_INPUTS_PER_ROUND: usize = 1024;

struct Runtime {
    cfg: NodeConfig,
    raft: Raft,
    store: kv::Store,
    storage: GroupCommit,
    /// Writes snapshot files off the raft loop and off the log's thread.
    snapshot_writer: storage::SnapshotWriter,
    /// A snapshot is being taken in the background (at most one at a time).
    snapshotting: bool,
    transport: Arc<dyn Transport>,
    tx: mpsc::UnboundedSender<Input>,
    /// Writes proposed here, by request id, waiting for their entry to apply.
    waiters: HashMap<u64, oneshot::Sender<WriteResult>>,
    next_request: u64,
    /// Linearizable reads waiting for leadership confirmation, by read ctx.
    reads: HashMap<u64, (kv::RangeRequest, oneshot::Sender<ReadResult>)>,
    /// Confirmed reads waiting for their index to be applied.
    confirmed_reads: Vec<(Index, kv::RangeRequest, oneshot::Sender<ReadResult>)>,
    next_read: u64,
    /// Disk batches submitted and not yet durable.
    in_flight: usize,
    last_snapshot: Index,
    was_leader: Option<NodeId>,
}

impl Runtime {
    async fn run(mut self, mut rx: mpsc::UnboundedReceiver<Input>) {
        let mut ticker = tokio::time::interval(self.cfg.tick);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = ticker.tick() => self.on_tick(),
                input = rx.recv() => {
                    let Some(input) = input else { break };
                    if !self.handle(input) {
                        break;
                    }
                    for _ in 0..MAX_INPUTS_PER_ROUND {
                        match rx.try_recv() {
                            Ok(input) => {
                                if !self.handle(input) {
                                    return;
                                }
                            }
                            Err(_) => break,
                        }
                    }
                }
            }
            self.process_ready();
        }
    }

    fn on_tick(&mut self) {
        self.raft.tick();
        // A forwarded command or read the leader dropped is never answered; its client has
        // given up (request timeout), so forget it.
        self.waiters.retain(|_, reply| !reply.is_closed());
        self.reads.retain(|_, (_, reply)| !reply.is_closed());
    }

    /// Returns false when the node must stop.
    fn handle(&mut self, input: Input) -> bool {
        match input {
            Input::Step(m) => {
                // Messages from strangers or for someone else are the core's to refuse.
                let _ = self.raft.step(m);
            }
            Input::Write(w, reply) => self.propose(w, reply),
            Input::Read(req, linearizable, reply) => self.read(req, linearizable, reply),
            Input::Status(reply) => {
                let _ = reply.send(self.status());
            }
            Input::Durable {
                result,
                persist_to,
                messages,
            } => {
                self.in_flight -= 1;
                if let Err(e) = result {
                    tracing::error!(error = %e, "the log could not be made durable; stopping");
                    return false;
                }
                if let Some((index, term)) = persist_to {
                    self.raft.advance_persisted(index, term);
                }
                self.transport.send(messages);
            }
            Input::Snapshotted(result) => self.on_snapshot(result),
            Input::Stop => return false,
        }
        true
    }

    fn header(&self) -> ResponseHeader {
        ResponseHeader {
            cluster_id: self.cfg.cluster_id,
            member_id: self.cfg.id,
            revision: self.store.revision(),
            raft_term: self.raft.term(),
        }
    }

    fn status(&self) -> NodeStatus {
        NodeStatus {
            id: self.cfg.id,
            role: self.raft.role(),
            leader: self.raft.leader(),
            term: self.raft.term(),
            commit: self.raft.commit_index(),
            applied: self.raft.applied(),
            revision: self.store.revision(),
            snapshot_index: self.raft.snapshot_index(),
            db_size: self.store.size_bytes(),
        }
    }

    fn propose(&mut self, w: Write, reply: oneshot::Sender<WriteResult>) {
        // Request ids are unique per node; the node id keeps them apart across nodes.
        let id = (self.cfg.id << 40) | self.next_request;
        self.next_request += 1;
        let data = command::encode(id, w);
        if data.len() > api::MAX_REQUEST_BYTES {
            let _ = reply.send(Err(api::request_too_large()));
            return;
        }
        // A follower forwards the command to its leader through the peer stream (batched
        // with the others of this round) and answers once it has applied the entry itself.
        match self.raft.propose_or_forward(data) {
            Ok(_) => {
                self.waiters.insert(id, reply);
            }
            Err(e) => {
                let _ = reply.send(Err(raft_status(e)));
            }
        }
    }

    fn read(
        &mut self,
        req: kv::RangeRequest,
        linearizable: bool,
        reply: oneshot::Sender<ReadResult>,
    ) {
        if !linearizable {
            let _ = reply.send(self.range(&req));
            return;
        }
        let ctx = self.next_read;
        self.next_read += 1;
        match self.raft.read_index(ctx) {
            Ok(()) => {
                self.reads.insert(ctx, (req, reply));
            }
            Err(e) => {
                let _ = reply.send(Err(raft_status(e)));
            }
        }
    }

    fn range(&self, req: &kv::RangeRequest) -> ReadResult {
        self.store
            .range(req, self.store.revision())
            .map(|r| (r, self.header()))
            .map_err(|e| api::status(&e))
    }

    fn process_ready(&mut self) {
        while self.raft.has_ready() {
            let mut rd = self.raft.ready();
            // 1. What may leave before the disk write: the leader's appends among them.
            self.transport.send(std::mem::take(&mut rd.messages));
            // 2. A snapshot from the leader replaces the state machine.
            if let Some(s) = &rd.snapshot {
                match kv::Store::restore(&s.data) {
                    Ok(store) => self.store = store,
                    Err(e) => {
                        tracing::error!(error = %e, "leader sent an unreadable snapshot");
                        return;
                    }
                }
                self.last_snapshot = s.meta.index;
            }
            // 3. Persist; votes and acknowledgements go out once durable. The batch takes
            // the entries and snapshot: nothing below needs them.
            let snapshot_index = rd.snapshot.as_ref().map(|s| s.meta.index);
            if rd.must_persist() || (!rd.persisted_messages.is_empty() && self.in_flight > 0) {
                let (lazy, persist_to) = (!rd.must_sync(), rd.persist_to());
                self.submit(
                    Batch {
                        snapshot: rd.snapshot.take(),
                        hard_state: rd.hard_state,
                        entries: std::mem::take(&mut rd.entries),
                        lazy,
                        ..Default::default()
                    },
                    persist_to,
                    std::mem::take(&mut rd.persisted_messages),
                );
            } else {
                // Everything before is durable and this batch writes nothing.
                self.transport
                    .send(std::mem::take(&mut rd.persisted_messages));
            }
            // 4. Apply.
            if let Some(index) = snapshot_index {
                self.raft.advance_applied(index);
            }
            for e in &rd.committed_entries {
                self.apply(e);
            }
            if let Some(last) = rd.committed_entries.last() {
                self.raft.advance_applied(last.index);
            }
            // 5. Reads.
            for rs in rd.read_states {
                if let Some((req, reply)) = self.reads.remove(&rs.ctx) {
                    self.confirmed_reads.push((rs.index, req, reply));
                }
            }
            self.serve_reads();
            if rd.soft_state.is_some() {
                self.on_leader_change();
            }
            self.maybe_compact();
        }
    }

    fn submit(
        &mut self,
        mut batch: Batch,
        persist_to: Option<(Index, Term)>,
        messages: Vec<Message>,
    ) {
        let tx = self.tx.clone();
        batch.on_durable = Some(Box::new(move |result| {
            let _ = tx.send(Input::Durable {
                result,
                persist_to,
                messages,
            });
        }));
        self.in_flight += 1;
        self.storage.submit(batch);
    }

    fn apply(&mut self, e: &raft::Entry) {
        if e.kind == EntryKind::Noop || e.data.is_empty() {
            return;
        }
        let (id, request) = match command::decode(&e.data) {
            Ok(decoded) => decoded,
            Err(err) => {
                // Every node sees the same bytes and skips them the same way.
                tracing::error!(index = e.index, error = %err, "undecodable log entry skipped");
                return;
            }
        };
        let result = request.and_then(|r| self.store.apply(&r).map_err(|e| api::status(&e)));
        if let Some(reply) = self.waiters.remove(&id) {
            let _ = reply.send(result.map(|resp| (resp, self.header())));
        }
    }

    fn serve_reads(&mut self) {
        let applied = self.raft.applied();
        let (ready, waiting): (Vec<_>, Vec<_>) = std::mem::take(&mut self.confirmed_reads)
            .into_iter()
            .partition(|(index, _, _)| *index <= applied);
        self.confirmed_reads = waiting;
        for (_, req, reply) in ready {
            let _ = reply.send(self.range(&req));
        }
    }

    /// A new leader (or none): requests this node was waiting on may never be answered.
    /// Dropping their replies tells each client "leader changed"; a write may still commit,
    /// the ambiguity every client of a replicated store must handle.
    fn on_leader_change(&mut self) {
        let leader = self.raft.leader();
        if leader != self.was_leader {
            if self.was_leader.is_some() {
                self.waiters.clear();
                self.reads.clear();
            }
            self.was_leader = leader;
        }
    }

    /// Every `snapshot_count` applied entries, snapshot the store and compact the log. The
    /// store is cloned here (values are shared, not copied) and serialized and written on a
    /// blocking thread, so neither the raft loop nor the log's appends wait for a large
    /// snapshot; the log is compacted once the file is durable.
    fn maybe_compact(&mut self) {
        let applied = self.raft.applied();
        if self.snapshotting || applied < self.last_snapshot + self.cfg.snapshot_count {
            return;
        }
        let Some(term) = self.raft.term_at(applied) else {
            return;
        };
        let meta = SnapshotMeta {
            index: applied,
            term,
            voters: self.cfg.voters.clone(),
        };
        let (store, writer, tx) = (
            self.store.clone(),
            self.snapshot_writer.clone(),
            self.tx.clone(),
        );
        self.snapshotting = true;
        tokio::task::spawn_blocking(move || {
            let snapshot = Snapshot {
                meta,
                data: store.snapshot(),
            };
            let result = writer.write(&snapshot).map(|_| snapshot);
            let _ = tx.send(Input::Snapshotted(result.map_err(|e| e.to_string())));
        });
    }

    fn on_snapshot(&mut self, result: Result<Snapshot, String>) {
        self.snapshotting = false;
        let snapshot = match result {
            Ok(s) => s,
            Err(e) => {
                // Try again after another `snapshot_count` entries; the log keeps growing
                // meanwhile, which is safe.
                tracing::error!(error = %e, "writing a snapshot failed");
                self.last_snapshot = self.raft.applied();
                return;
            }
        };
        let index = snapshot.meta.index;
        // Refused if a newer snapshot arrived from the leader meanwhile.
        if let Err(e) = self.raft.compact(snapshot.clone()) {
            tracing::warn!(error = %e, "compaction refused");
            return;
        }
        self.last_snapshot = self.last_snapshot.max(index);
        self.storage.submit(Batch {
            compact: Some(snapshot),
            ..Default::default()
        });
    }
}
