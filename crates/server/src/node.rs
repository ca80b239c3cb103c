//! A member's runtime on tokio: one task owns the [`driver::Driver`] (the raft core, the kv
//! store, the clients waiting on them) and feeds it ticks, peer messages, client requests
//! and storage completions. Everything the Ready contract asks — what to send before and
//! after the disk write, applying, answering, reads, snapshots — is the driver's, the same
//! code the simulator runs. This file adds only what is about tokio and the disk: channels,
//! the group-commit log, background snapshot files, and etcd's response headers and errors.

use crate::api;
use crate::command::{self, Write};
use crate::insight::{self, Links, MemberState, SharedChronicle, SharedRequests};
use crate::machine::{Applied, KvMachine, Output, Served};
use crate::members::{self, Registry};
use crate::metrics::Metrics;
use crate::pb::etcdserverpb::alarm_request::AlarmAction;
use crate::pb::etcdserverpb::ResponseHeader;
use crate::reconfig::{self, MemberOp};
use crate::watch::Watchers;
use driver::{Answered, DriverConfig, Ids, Refusal, Reply};
use kv::lessor::{Lessor, LessorConfig, Renewal};
use raft::{
    ConfChange, ConfEntry, EntryKind, Index, Membership, Message, NodeId, Raft, Role, Snapshot,
    SnapshotMeta, Term,
};
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;
use storage::{Batch, GroupCommit, Identity, Options, Storage};
use tokio::sync::{mpsc, oneshot};
use tonic::Status;

#[derive(Clone, Debug)]
pub struct NodeConfig {
    pub id: NodeId,
    /// The voters the cluster was bootstrapped with; empty for a member that joined later.
    pub voters: Vec<NodeId>,
    /// The member registry the cluster was bootstrapped with (see `members.rs`).
    pub bootstrap: Registry,
    /// For a member that joined an existing cluster: the members the cluster named when it
    /// joined. They are admitted as peers until this member has applied a configuration
    /// that includes itself (from then on its registry and log say who the members are).
    pub introduced: BTreeSet<NodeId>,
    pub cluster_id: u64,
    pub data_dir: PathBuf,
    /// The heartbeat interval; one raft tick.
    pub tick: Duration,
    /// Election timeout in ticks (timeouts fall in [T, 2T)).
    pub election_ticks: u64,
    /// Compact the log every this many applied entries.
    pub snapshot_count: u64,
    /// How often watchers that asked for progress notifications get one (etcd's
    /// `--experimental-watch-progress-notify-interval`, ten minutes by default).
    pub watch_progress_interval: Duration,
    /// Past this many bytes in the store, writes that add data raise NOSPACE and are
    /// refused (etcd's `--quota-backend-bytes`).
    pub quota_bytes: u64,
    pub metrics: Arc<Metrics>,
}

/// etcd's default `--quota-backend-bytes`: 2 GiB.
pub const DEFAULT_QUOTA_BYTES: u64 = 2 << 30;

/// etcd's default interval between progress notifications.
pub const WATCH_PROGRESS_INTERVAL: Duration = Duration::from_secs(600);
/// How soon the loop comes back to watchers it could not finish catching up (their
/// clients' queues were full, or the pass hit its bound).
const CATCH_UP_PAUSE: Duration = Duration::from_millis(2);

/// How raft messages leave the node. Sending never blocks the raft loop; a transport that
/// cannot deliver drops (raft retransmits).
pub trait Transport: Send + Sync + 'static {
    fn send(&self, msgs: Vec<Message>);
    /// The replicated member registry changed: reach members at their current URLs, stop
    /// reaching removed ones.
    fn set_members(&self, _me: NodeId, _registry: &Registry) {}
    /// A configuration entry entering the log adds `id` at `url`: its messages may have to
    /// leave before the registry (which changes only when the entry applies) knows it.
    fn learn_peer(&self, _id: NodeId, _url: &str) {}
    /// Whether a peer was heard from lately (etcd's health checks before a membership
    /// change).
    fn active(&self, _id: NodeId) -> bool {
        true
    }
}

/// What a removed member says when it stops, and when asked to start again.
pub const REMOVED: &str = "the member has been permanently removed from the cluster";
/// The file that marks a removed member's data directory.
const REMOVED_MARKER: &str = "REMOVED";

/// The member's view of its cluster, shared with the services (read without a trip through
/// the loop); the loop updates it when something in it changes.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct View {
    pub registry: Registry,
    /// The configuration this member has applied (None until it knows one).
    pub applied: Option<Membership>,
    /// The latest configuration in the log, committed or not.
    pub latest: Option<Membership>,
    /// Members the latest configuration adds that the registry does not hold yet (their
    /// entry has not applied here), with the peer URLs the entry gives.
    pub pending: BTreeMap<NodeId, Vec<String>>,
    pub leader: Option<NodeId>,
    pub term: Term,
    /// The members a newcomer was introduced to by the cluster, until it has applied a
    /// configuration holding itself (see [`NodeConfig::introduced`]); then empty.
    pub introduced: BTreeSet<NodeId>,
}

impl View {
    /// A member this one should talk to: in the registry, in a configuration on its way, or
    /// (for a newcomer still catching up) one the cluster introduced it to.
    pub fn knows(&self, id: NodeId) -> bool {
        self.registry.members.contains_key(&id)
            || self.latest.as_ref().is_some_and(|m| m.contains(id))
            || self.introduced.contains(&id)
    }

    /// The registry with the members still on their way (unnamed, as etcd lists a member
    /// added but not started).
    pub fn members(&self) -> Registry {
        let mut r = self.registry.clone();
        for (id, urls) in &self.pending {
            r.members
                .entry(*id)
                .or_insert_with(|| members::MemberRecord {
                    id: *id,
                    peer_urls: urls.clone(),
                    ..Default::default()
                });
        }
        r
    }
    pub fn is_learner(&self, id: NodeId) -> bool {
        match (&self.applied, &self.latest) {
            (Some(m), _) if m.contains(id) => m.is_learner(id),
            (_, Some(m)) => m.is_learner(id),
            _ => false,
        }
    }
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
    /// Proposals made here and not yet applied.
    pub pending: usize,
    /// Raised alarms: (member, etcd's alarm type).
    pub alarms: Vec<(NodeId, i32)>,
}

/// The store as of one moment, for hashing and for backups (a clone: O(1), shares values).
pub struct Frozen {
    pub store: kv::Store,
    pub registry: Registry,
    pub applied: Index,
    pub term: Term,
}

/// A lease as LeaseTimeToLive reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LeaseInfo {
    /// Milliseconds left on the leader's clock.
    pub remaining: u64,
    pub granted_ttl: i64,
    pub keys: Vec<bytes::Bytes>,
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
    /// A membership change, checked as etcd checks it (see `reconfig.rs`).
    Member(MemberOp, Waiter<Applied>),
    /// Hand leadership to a voter.
    Transfer(NodeId, oneshot::Sender<Result<(), Status>>),
    /// A keep-alive: only the leader's lease clock renews, once its leadership is confirmed.
    Renew(i64, oneshot::Sender<Renewal>),
    /// A keep-alive received at this time on the loop's clock, whose leadership check
    /// (a ReadIndex round) has passed.
    Confirmed(i64, kv::lessor::Millis, oneshot::Sender<Renewal>),
    /// A lease's time left (on the leader), granted TTL and keys.
    TimeToLive(i64, oneshot::Sender<Result<Option<LeaseInfo>, Status>>),
    /// Every lease's id.
    Leases(oneshot::Sender<Vec<i64>>),
    /// A copy of the store as of now.
    Freeze(oneshot::Sender<Frozen>),
    /// Whether the store remembers this session number as its session's last command (so
    /// that a write with it is a retry, answered from memory without adding anything).
    IsRetry(kv::Session, oneshot::Sender<bool>),
    /// Snapshot and compact the log now; answers the index the snapshot will cover.
    SnapshotNow(oneshot::Sender<Index>),
    /// A peer says this member was removed from the cluster.
    Removed,
    /// The dashboard asks for this member's state, with the events numbered from this on.
    Inspect(u64, oneshot::Sender<MemberState>),
    /// A supervisor cuts these links, healing all others.
    Cut(insight::Cut),
    Stop,
}

/// Completions from the node's own storage, on a queue of their own: they are bounded by
/// the writes in flight and must never be dropped.
enum Done {
    Persisted(Result<(), String>),
    Snapshotted(Result<Snapshot, String>),
    Restored(Result<Box<KvMachine>, String>),
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
    view: Arc<RwLock<View>>,
    watchers: Watchers,
    election_timeout: Duration,
    min_lease_ttl: i64,
    /// The store's revision as of the loop's last round (for headers of answers that are
    /// not reads of the store, e.g. leases').
    revision: Arc<std::sync::atomic::AtomicI64>,
    /// The store's size as of the loop's last round (the quota is checked against it).
    in_use: Arc<AtomicU64>,
    quota: u64,
    metrics: Arc<Metrics>,
    data_dir: PathBuf,
    /// Writes and reads served here, with their latencies (for the dashboard).
    requests: SharedRequests,
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
        Refusal::ConfChange(why) => Status::unavailable(format!(
            "etcdserver: the membership change must wait: {why}"
        )),
    }
}

/// A client waiting on the loop.
pub struct Waiter<T>(oneshot::Sender<Result<Answered<T>, Refusal>>);

impl<T> Waiter<T> {
    /// For the member's own proposals (lease revokes and checkpoints): nobody waits.
    fn detached() -> Self {
        Waiter(oneshot::channel().0)
    }
}

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
        let added = Added::default();
        let chronicle = SharedChronicle::default();
        let observer: storage::Observer = {
            let m = cfg.metrics.clone();
            Arc::new(move |round: &storage::CommitRound| m.observe_commit(round))
        };
        let wal = Wal {
            writer: storage.snapshot_writer(),
            group: GroupCommit::start_observed(storage, Some(observer)),
            done: done_tx,
            transport: transport.clone(),
            bootstrap: cfg.bootstrap.clone(),
            added: added.clone(),
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
            Peers {
                out: transport.clone(),
                metrics: cfg.metrics.clone(),
                heartbeats: HashMap::new(),
                links: Links::default(),
                chronicle: chronicle.clone(),
            },
            Ids::new(cfg.id, boot),
            dcfg,
        );
        let view = Arc::new(RwLock::new(View::default()));
        let revision = Arc::new(std::sync::atomic::AtomicI64::new(
            d.machine().store.revision(),
        ));
        let in_use = Arc::new(AtomicU64::new(d.machine().store.size_bytes()));
        let watchers = Watchers::new(d.machine().store.revision());
        let progress_ticks =
            (cfg.watch_progress_interval.as_micros() / cfg.tick.as_micros().max(1)).max(1) as u64;
        let election_timeout = cfg.tick * cfg.election_ticks as u32;
        let lessor = Lessor::new(LessorConfig {
            // etcd's rule: a new leader adds an election timeout to every lease. Renewals
            // count only once a quorum confirmed the renewing leader (see `Loop::renew`),
            // so a successor always starts after the last renewal its predecessor granted;
            // the extension covers the difference in the two members' clock rates (up to
            // its ratio to the TTL) and the time a keep-alive's answer spends in flight.
            extend: election_timeout.as_millis() as u64,
            ..LessorConfig::default()
        });
        let mut lp = Loop {
            d,
            view: view.clone(),
            transport,
            data_dir: cfg.data_dir.clone(),
            added,
            early: Vec::new(),
            watchers: watchers.clone(),
            progress_ticks,
            ticks: 0,
            lessor,
            clock: std::time::Instant::now(),
            inputs: tx.downgrade(),
            revision: revision.clone(),
            in_use: in_use.clone(),
            metrics: cfg.metrics.clone(),
            leader: None,
            role: Role::Follower,
            chronicle,
            cluster_id: cfg.cluster_id,
            introduced: cfg.introduced.clone(),
        };
        {
            let r = lp.d.raft();
            let text = format!("started: term {}, last index {}", r.term(), r.last_index());
            lp.chronicle.lock().unwrap().push("start", text);
        }
        lp.refresh_view();
        let task = tokio::spawn(lp.run(cfg.tick, rx, done_rx));
        let node = Node {
            tx,
            id: cfg.id,
            cluster_id: cfg.cluster_id,
            view,
            watchers,
            election_timeout,
            min_lease_ttl: min_lease_ttl(cfg.tick, cfg.election_ticks),
            revision,
            in_use,
            quota: cfg.quota_bytes,
            metrics: cfg.metrics.clone(),
            data_dir: cfg.data_dir.clone(),
            requests: SharedRequests::default(),
        };
        Ok((node, task))
    }

    pub fn id(&self) -> NodeId {
        self.id
    }

    pub fn cluster_id(&self) -> u64 {
        self.cluster_id
    }

    /// The member's current view of its cluster.
    pub fn view(&self) -> View {
        self.view.read().unwrap().clone()
    }

    /// Whether the member knows a leader (read without copying the view).
    pub fn has_leader(&self) -> bool {
        self.view.read().unwrap().leader.is_some()
    }

    /// The leader this member knows of (read without copying the view).
    pub fn leader(&self) -> Option<NodeId> {
        self.view.read().unwrap().leader
    }

    /// The member's watchers (the Watch service adds and removes them).
    pub fn watchers(&self) -> Watchers {
        self.watchers.clone()
    }

    pub fn election_timeout(&self) -> Duration {
        self.election_timeout
    }

    /// The shortest TTL a lease gets (etcd's rule: one and a half election timeouts, in
    /// whole seconds rounded up).
    pub fn min_lease_ttl(&self) -> i64 {
        self.min_lease_ttl
    }

    /// A response header at the store's latest revision (as of the loop's last round).
    pub fn current_header(&self) -> ResponseHeader {
        let revision = self.revision.load(std::sync::atomic::Ordering::Relaxed);
        self.header(revision, self.view.read().unwrap().term)
    }

    /// Renew a lease on this member's lease clock (`NotLeader` unless it leads).
    pub async fn renew(&self, id: i64) -> Result<Renewal, Status> {
        let (reply, rx) = oneshot::channel();
        self.submit(Input::Renew(id, reply))?;
        rx.await.map_err(|_| gone())
    }

    /// A lease's time left, on the leader (`Ok(None)`: no such lease); fails elsewhere with
    /// "not leader".
    pub async fn time_to_live(&self, id: i64) -> Result<Option<LeaseInfo>, Status> {
        let (reply, rx) = oneshot::channel();
        self.submit(Input::TimeToLive(id, reply))?;
        rx.await.map_err(|_| gone())?
    }

    /// Every lease this member's store holds.
    pub async fn leases(&self) -> Result<Vec<i64>, Status> {
        let (reply, rx) = oneshot::channel();
        self.submit(Input::Leases(reply))?;
        rx.await.map_err(|_| gone())
    }

    /// Whether `id` was removed from the cluster.
    pub fn is_removed(&self, id: NodeId) -> bool {
        self.view.read().unwrap().registry.removed.contains(&id)
    }

    /// Whether `id` may open a peer stream to this member, or why not.
    pub fn admits(&self, id: NodeId) -> Result<(), Status> {
        let v = self.view.read().unwrap();
        if v.registry.removed.contains(&id) {
            return Err(Status::failed_precondition(REMOVED));
        }
        if !v.knows(id) {
            return Err(Status::failed_precondition(format!(
                "{id:x} is not a member of cluster {:x}",
                self.cluster_id
            )));
        }
        Ok(())
    }

    /// Propose a membership change (this member must lead); answers once it is applied here.
    pub async fn change_membership(&self, op: MemberOp) -> Result<ResponseHeader, Status> {
        let (reply, rx) = oneshot::channel();
        self.submit(Input::Member(op, Waiter(reply)))?;
        let answered = rx.await.map_err(|_| gone())?.map_err(refused)?;
        let (_, revision) = answered.value?;
        Ok(self.header(revision, answered.term))
    }

    /// A member's own announcement of its name and client URLs, through the log.
    pub async fn publish(&self, name: &str, client_urls: Vec<String>) -> Result<(), Status> {
        let a = crate::pb::raftkvpb::MemberAttributes {
            id: self.id,
            name: name.to_string(),
            client_urls,
        };
        self.write_any(Write::Publish(a)).await.map(|_| ())
    }

    /// New peer URLs for a member (Cluster.MemberUpdate).
    pub async fn update_peer_urls(
        &self,
        id: NodeId,
        peer_urls: Vec<String>,
    ) -> Result<ResponseHeader, Status> {
        let u = crate::pb::raftkvpb::MemberPeerUrls { id, peer_urls };
        self.write_any(Write::UpdatePeerUrls(u)).await
    }

    async fn write_any(&self, w: Write) -> Result<ResponseHeader, Status> {
        self.propose(w).await.map(|(_, header)| header)
    }

    /// Propose a write and wait for it to apply here: what it answered, and the header.
    async fn propose(&self, w: Write) -> Result<(Option<Output>, ResponseHeader), Status> {
        let (reply, rx) = oneshot::channel();
        self.submit(Input::Write(w, Waiter(reply)))?;
        let answered = rx.await.map_err(|_| gone())?.map_err(refused)?;
        let (out, revision) = answered.value?;
        Ok((out, self.header(revision, answered.term)))
    }

    /// Start handing leadership to `to` (this member must lead).
    pub async fn transfer_leader(&self, to: NodeId) -> Result<(), Status> {
        let (reply, rx) = oneshot::channel();
        self.submit(Input::Transfer(to, reply))?;
        rx.await.map_err(|_| gone())?
    }

    /// A peer told us we were removed: stop for good.
    pub fn removed_by_peer(&self) {
        let tx = self.tx.clone();
        tokio::spawn(async move {
            let _ = tx.send(Input::Removed).await;
        });
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

    pub fn header(&self, revision: i64, raft_term: Term) -> ResponseHeader {
        ResponseHeader {
            cluster_id: self.cluster_id,
            member_id: self.id,
            revision,
            raft_term,
        }
    }

    /// Propose a write; answers once it is committed and applied here.
    pub async fn write(&self, w: Write) -> WriteResult {
        let started = std::time::Instant::now();
        let r = self.write_timed(w).await;
        self.requests.writes.record(started.elapsed());
        r
    }

    async fn write_timed(&self, w: Write) -> WriteResult {
        if self.over_quota(&w) {
            // A retry of a session's applied command adds nothing and must get its first
            // answer: whether it is one is the store's to say, on the loop. A new command
            // (or a session number the store does not remember) is refused as any write over
            // the quota. Between this answer and the apply, a remembered number can only stop
            // being one if its lease ends (and then the write is refused at apply, the lease
            // being gone) — or, with a new lease of the same id, runs as a new command: no
            // worse than the race every write has with others proposed at the same time,
            // which etcd's quota check has too (the NOSPACE alarm, once raised, refuses
            // them all at apply).
            let retry = match &w {
                Write::InSession(s, _) => {
                    let (reply, rx) = oneshot::channel();
                    self.submit(Input::IsRetry(*s, reply))?;
                    rx.await.map_err(|_| gone())?
                }
                _ => false,
            };
            if !retry {
                return Err(self.refuse_over_quota());
            }
        }
        if self.leader().is_some_and(|l| l != self.id) {
            self.metrics.proposals_forwarded.inc();
        }
        let (reply, rx) = oneshot::channel();
        self.submit(Input::Write(w, Waiter(reply)))?;
        let answered = rx.await.map_err(|_| gone())?.map_err(|r| {
            self.metrics.proposals_failed.inc();
            refused(r)
        })?;
        let (resp, revision) = answered.value?;
        let Some(Output::Kv(resp)) = resp else {
            return Err(Status::internal("the store answered a different request"));
        };
        Ok((resp, self.header(revision, answered.term)))
    }

    /// Maintenance.Alarm, through the log: the alarms it raised, cleared or listed.
    pub async fn alarm(
        &self,
        req: crate::pb::etcdserverpb::AlarmRequest,
    ) -> Result<(Vec<(NodeId, i32)>, ResponseHeader), Status> {
        match self.propose(Write::Alarm(req)).await? {
            (Some(Output::Alarms(alarms)), header) => Ok((alarms, header)),
            _ => Err(Status::internal("the store answered a different request")),
        }
    }

    /// A range read: linearizable (ReadIndex) or serializable (local state).
    pub async fn read(&self, req: kv::RangeRequest, linearizable: bool) -> ReadResult {
        let started = linearizable.then(std::time::Instant::now);
        let (reply, rx) = oneshot::channel();
        self.submit(Input::Read(req, linearizable, Waiter(reply)))?;
        let answered = rx.await.map_err(|_| gone())?.map_err(refused)?;
        if let Some(t) = started {
            self.metrics.read_index.observe(t.elapsed().as_secs_f64());
            self.requests.reads.record(t.elapsed());
        }
        let (resp, revision) = answered.value?;
        Ok((resp, self.header(revision, answered.term)))
    }

    /// etcd's quota check before proposing: does this write add data and would it take
    /// the store past the quota? (Then [`Node::refuse_over_quota`].)
    fn over_quota(&self, w: &Write) -> bool {
        let cost = command::cost(w);
        cost != 0 && self.in_use.load(Ordering::Relaxed) + cost > self.quota
    }

    /// A write over the quota raises NOSPACE (once: not if it is raised already) and is
    /// refused. The alarm then refuses such writes on every member as they apply.
    fn refuse_over_quota(&self) -> Status {
        let raised = self
            .view
            .read()
            .unwrap()
            .registry
            .alarms
            .contains(&(self.id, crate::machine::NOSPACE));
        if !raised {
            tracing::warn!(
                quota = self.quota,
                in_use = self.in_use.load(Ordering::Relaxed),
                "the store is over its quota (--quota-backend-bytes); raising NOSPACE"
            );
            let raise = crate::pb::etcdserverpb::AlarmRequest {
                action: AlarmAction::Activate as i32,
                member_id: self.id,
                alarm: crate::machine::NOSPACE,
            };
            let _ = self.submit(Input::Write(Write::Alarm(raise), Waiter::detached()));
        }
        api::no_space()
    }

    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    pub fn data_dir(&self) -> &std::path::Path {
        &self.data_dir
    }

    /// A copy of the store as of now (O(1): it shares the store's values).
    pub async fn freeze(&self) -> Result<Frozen, Status> {
        let (reply, rx) = oneshot::channel();
        self.submit(Input::Freeze(reply))?;
        rx.await.map_err(|_| gone())
    }

    /// Snapshot everything applied and compact the log to it (what Defragment means here);
    /// answers once the snapshot is durable and the log compacted.
    pub async fn compact_log(&self) -> Result<(), Status> {
        let (reply, rx) = oneshot::channel();
        self.submit(Input::SnapshotNow(reply))?;
        let target = rx.await.map_err(|_| gone())?;
        loop {
            if self.status().await?.snapshot_index >= target {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// This member's state for the dashboard, with its events numbered `since` and on.
    pub async fn inspect(&self, since: u64) -> Result<MemberState, Status> {
        let (reply, rx) = oneshot::channel();
        self.submit(Input::Inspect(since, reply))?;
        let mut s = rx.await.map_err(|_| gone())?;
        s.writes = self.requests.writes.counts();
        s.reads = self.requests.reads.counts();
        Ok(s)
    }

    /// Cut these peer links and heal every other: the supervisor's switch.
    pub async fn cut(&self, peers: insight::Cut) -> Result<(), Status> {
        self.tx.send(Input::Cut(peers)).await.map_err(|_| gone())
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

fn min_lease_ttl(tick: Duration, election_ticks: u64) -> i64 {
    let min = tick * ((3 * election_ticks) / 2) as u32;
    min.as_millis().div_ceil(1000).max(1) as i64
}

/// The error a lease request gets from a member whose lease clock does not run.
pub fn not_leader() -> Status {
    Status::unavailable("etcdserver: not leader")
}

/// What a member finds on its disk: the log, the core restored from it, and the store
/// restored from the latest snapshot.
fn recover(cfg: &NodeConfig) -> Result<(Storage, Raft, KvMachine, u64), String> {
    let id = Identity {
        cluster_id: cfg.cluster_id,
        node_id: cfg.id,
    };
    if cfg.data_dir.join(REMOVED_MARKER).exists() {
        return Err(format!(
            "{REMOVED}: the data directory {} belongs to a removed member and cannot serve \
             again (start a new member with an empty data directory)",
            cfg.data_dir.display()
        ));
    }
    let (storage, state) =
        Storage::open(&cfg.data_dir, id, Options::default()).map_err(|e| e.to_string())?;
    let mut machine = KvMachine::new(cfg.bootstrap.clone());
    machine.corrupt_for_tests = std::env::var_os(crate::machine::TEST_CORRUPT_ENV).is_some();
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

/// The loop's state: the driver, and what the rest of the member sees of it.
struct Loop {
    d: KvDriver,
    view: Arc<RwLock<View>>,
    transport: Arc<dyn Transport>,
    data_dir: PathBuf,
    added: Added,
    /// Membership changes answered once their entry is durable here rather than applied
    /// (index, term of the entry; the client).
    early: Vec<(Index, Term, Waiter<Applied>)>,
    watchers: Watchers,
    /// Ticks between periodic progress notifications, and ticks since the last one.
    progress_ticks: u64,
    ticks: u64,
    /// The lease clock: it counts only while this member leads.
    lessor: Lessor,
    clock: std::time::Instant,
    /// The loop's own queue, for keep-alives coming back from their leadership check (weak:
    /// the loop must still end when every handle is gone).
    inputs: mpsc::WeakSender<Input>,
    revision: Arc<std::sync::atomic::AtomicI64>,
    in_use: Arc<AtomicU64>,
    metrics: Arc<Metrics>,
    /// The leader and role as of the last round (leader changes are counted and logged).
    leader: Option<NodeId>,
    role: Role,
    /// What the dashboard shows of this member's history (shared with the transport,
    /// which sees the votes and snapshots leave).
    chronicle: SharedChronicle,
    cluster_id: u64,
    /// See [`NodeConfig::introduced`]; emptied once the applied configuration holds this
    /// member.
    introduced: BTreeSet<NodeId>,
}

impl Loop {
    /// The loop. Returns the reason if the member had to stop.
    async fn run(
        mut self,
        tick: Duration,
        mut rx: mpsc::Receiver<Input>,
        mut done: mpsc::UnboundedReceiver<Done>,
    ) -> Result<(), String> {
        let mut ticker = tokio::time::interval(tick);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut backlog = false;
        loop {
            if let Some(why) = self.removed() {
                return Err(why);
            }
            tokio::select! {
                _ = ticker.tick() => self.on_tick(),
                _ = self.watchers.wake.notified() => {}
                _ = tokio::time::sleep(CATCH_UP_PAUSE), if backlog => {}
                Some(first) = done.recv() => {
                    self.on_done(first);
                    while let Ok(next) = done.try_recv() {
                        self.on_done(next);
                    }
                }
                input = rx.recv() => {
                    let Some(input) = input else { break };
                    let mut stop = !self.handle(input);
                    for _ in 0..MAX_INPUTS_PER_ROUND {
                        if stop {
                            break;
                        }
                        match rx.try_recv() {
                            Ok(input) => stop = !self.handle(input),
                            Err(_) => break,
                        }
                    }
                    if stop {
                        self.d.shutdown("the member is stopping");
                        return Ok(());
                    }
                }
            }
            self.d.process_ready();
            if let Some(why) = self.d.failure() {
                return Err(why.to_string());
            }
            self.refresh_view();
            self.keep_leases();
            backlog = self.sync_watchers();
        }
        self.d.shutdown("the member is stopping");
        Ok(())
    }

    fn on_tick(&mut self) {
        self.d.tick();
        self.ticks += 1;
        if self.ticks >= self.progress_ticks {
            self.ticks = 0;
            self.watchers.hub.lock().unwrap().progress_tick();
        }
    }

    /// Hand the revisions applied this round to the watchers, and replay a bounded slice
    /// of history to those behind. Returns whether some are still behind (the loop comes
    /// back soon). Without watchers this is a few comparisons under an uncontended lock.
    fn sync_watchers(&mut self) -> bool {
        let store = &self.d.machine().store;
        self.watchers.hub.lock().unwrap().sync(store)
    }

    fn now(&self) -> kv::lessor::Millis {
        self.clock.elapsed().as_millis() as u64
    }

    /// Whether this member's lease clock runs: it leads and has applied its own term's
    /// first entry, so its store holds every lease the cluster granted.
    fn leading(&self) -> bool {
        let r = self.d.raft();
        r.role() == Role::Leader && r.term_at(r.applied()) == Some(r.term())
    }

    /// Tell the lease clock what applied, and propose what it found: revokes of expired
    /// leases, and checkpoints of long ones. Without leases this is a few comparisons.
    fn keep_leases(&mut self) {
        let revision = self.d.machine().store.revision();
        self.revision
            .store(revision, std::sync::atomic::Ordering::Relaxed);
        self.in_use
            .store(self.d.machine().store.size_bytes(), Ordering::Relaxed);
        let now = self.now();
        for change in std::mem::take(&mut self.d.machine_mut().lease_changes) {
            self.lessor.changed(&change, now);
        }
        let leading = self.leading();
        let work = self.lessor.poll(now, leading, &self.d.machine().store);
        for id in work.revoke {
            tracing::debug!(lease = id, "lease expired; revoking");
            self.propose_own(Write::LeaseRevoke(id));
        }
        if !work.checkpoint.is_empty() {
            self.propose_own(Write::LeaseCheckpoint(work.checkpoint));
        }
    }

    fn propose_own(&mut self, w: Write) {
        self.d
            .propose(|id| command::encode(id, w), Waiter::detached());
    }

    /// Publish what changed of the member's view of its cluster, and reconnect peers if the
    /// registry changed. Cheap when nothing did: a few comparisons of small values.
    fn refresh_view(&mut self) {
        self.answer_early();
        self.note_role();
        let r = self.d.raft();
        let (leader, term) = (r.leader(), r.term());
        self.watchers
            .term
            .store(term, std::sync::atomic::Ordering::Relaxed);
        let registry = &self.d.machine().registry;
        let applied = self.d.membership();
        let latest = r.membership();
        if applied.is_some_and(|m| m.contains(r.id())) {
            self.introduced.clear();
        }
        let mut added = self.added.lock().unwrap();
        // Forget what applied, or what the log no longer holds.
        added.retain(|id, _| latest.contains(*id) && !registry.members.contains_key(id));
        let changed = {
            let v = self.view.read().unwrap();
            v.leader != leader
                || v.term != term
                || v.registry != *registry
                || v.applied.as_ref() != applied
                || v.latest.as_ref() != Some(latest)
                || v.pending != *added
                || v.introduced != self.introduced
        };
        if !changed {
            return;
        }
        // Copied only when something changed: this runs after every round of the loop.
        let pending = added.clone();
        drop(added);
        let next = View {
            registry: registry.clone(),
            applied: applied.cloned(),
            latest: Some(latest.clone()),
            pending,
            leader,
            term,
            introduced: self.introduced.clone(),
        };
        let mut v = self.view.write().unwrap();
        if v.registry != next.registry {
            self.transport.set_members(r.id(), &next.registry);
        }
        chronicle_changes(&self.chronicle, &v, &next);
        *v = next;
    }

    /// Count and log leader changes and this member's elections (one line each: what an
    /// operator greps for when a cluster misbehaves).
    fn note_role(&mut self) {
        let r = self.d.raft();
        let (leader, role, term) = (r.leader(), r.role(), r.term());
        let mut events: Vec<(&'static str, String)> = Vec::new();
        if role != self.role {
            match role {
                Role::Leader => {
                    tracing::info!(term, "elected leader");
                    events.push(("election", format!("won the election for term {term}")));
                }
                Role::Candidate => {
                    tracing::info!(term, "campaigning for leadership");
                    events.push(("election", format!("campaigning for term {term}")));
                }
                Role::PreCandidate => {
                    tracing::info!(term, "starting a pre-vote");
                    let next = term + 1;
                    events.push(("election", format!("asking for pre-votes for term {next}")));
                }
                _ if matches!(self.role, Role::Candidate | Role::PreCandidate) => {
                    tracing::info!(term, leader = ?leader.map(|l| format!("{l:x}")), "lost the election");
                    events.push(("election", format!("did not win (term {term})")));
                }
                Role::Follower if self.role == Role::Leader => {
                    tracing::warn!(term, "stepped down from leadership");
                    events.push(("step-down", format!("stepped down in term {term}")));
                }
                _ => {}
            }
            self.role = role;
        }
        if leader != self.leader {
            if let Some(l) = leader {
                self.metrics.leader_changes.inc();
                tracing::info!(term, leader = %format!("{l:x}"), "leader changed");
                let text = format!("the leader is {} (term {term})", insight::hex(l));
                events.push(("leader", text));
            } else {
                tracing::info!(term, "lost the leader");
                events.push(("leader", format!("no leader known (term {term})")));
            }
            self.leader = leader;
        }
        if !events.is_empty() {
            let mut c = self.chronicle.lock().unwrap();
            for (kind, text) in events {
                c.push(kind, text);
            }
        }
    }

    /// This member's state as the dashboard shows it (the request counts are the handle's).
    fn inspect(&self, since: u64) -> MemberState {
        let r = self.d.raft();
        let me = r.id();
        let registry = &self.d.machine().registry;
        let name = |id: NodeId| registry.members.get(&id).map(|m| m.name.clone());
        let last = r.last_index();
        let first = last.saturating_sub(insight::LOG_STRIP - 1).max(1);
        let log = (first..=last)
            .filter_map(|i| r.term_at(i).map(|t| (i, t)))
            .collect();
        let membership = r.membership();
        let members = registry
            .members
            .values()
            .map(|m| insight::MemberInfo {
                id: insight::hex(m.id),
                name: m.name.clone(),
                client_urls: m.client_urls.clone(),
                learner: membership.is_learner(m.id),
            })
            .collect();
        let links = &self.d.transport().links;
        let (events, next_event) = self.chronicle.lock().unwrap().since(since);
        let alarms: Vec<String> = registry
            .alarms
            .iter()
            .map(|(id, kind)| format!("{} on {}", insight::alarm_name(*kind), insight::hex(*id)))
            .collect();
        MemberState {
            id: insight::hex(me),
            name: name(me).unwrap_or_default(),
            cluster_id: insight::hex(self.cluster_id),
            role: insight::role_name(r.role()).to_string(),
            learner: membership.is_learner(me),
            term: r.term(),
            leader: r.leader().map(insight::hex),
            last_index: last,
            commit: r.commit_index(),
            applied: r.applied(),
            snapshot_index: r.snapshot_index(),
            revision: self.d.machine().store.revision(),
            wal_bytes: 0,
            healthy: r.leader().is_some() && alarms.is_empty(),
            alarms,
            members,
            log,
            links: links
                .traffic
                .iter()
                .map(|(id, t)| (insight::hex(*id), *t))
                .collect(),
            cut_from: links.cut.from.iter().map(|id| insight::hex(*id)).collect(),
            cut_to: links.cut.to.iter().map(|id| insight::hex(*id)).collect(),
            writes: Vec::new(),
            reads: Vec::new(),
            events,
            next_event,
        }
    }

    /// Answer the membership changes waiting for their entry to be durable here; one whose
    /// entry the log no longer holds was lost to a leader change.
    fn answer_early(&mut self) {
        if self.early.is_empty() {
            return;
        }
        let r = self.d.raft();
        let (persisted, now, applied) = (r.persisted_index(), r.term(), r.applied());
        let revision = self.d.machine().store.revision();
        let mut waiting = Vec::new();
        for (index, term, reply) in std::mem::take(&mut self.early) {
            // Lost: the log holds another entry there, or none and no snapshot covers it.
            let held = r.term_at(index);
            let lost = match held {
                Some(t) => t != term,
                None => index > r.snapshot_index(),
            };
            if lost {
                reply.send(Err(Refusal::LeaderChanged));
            } else if held.is_none() || index <= persisted {
                // Durable here (compacted entries are committed, so durable too).
                reply.send(Ok(Answered {
                    value: Ok((None, revision)),
                    term: now,
                    applied,
                }));
            } else {
                waiting.push((index, term, reply));
            }
        }
        self.early = waiting;
    }

    /// If this member was removed from the cluster: mark its data directory so that it never
    /// serves again, and say why it stops.
    fn removed(&mut self) -> Option<String> {
        let id = self.d.raft().id();
        if !self.d.machine().registry.removed.contains(&id) {
            return None;
        }
        Some(self.stop_removed())
    }

    fn stop_removed(&mut self) -> String {
        let marker = self.data_dir.join(REMOVED_MARKER);
        if let Err(e) = std::fs::write(&marker, format!("{REMOVED}\n")) {
            tracing::error!("cannot write {}: {e}", marker.display());
        }
        self.d.shutdown(REMOVED);
        REMOVED.to_string()
    }

    fn on_done(&mut self, done: Done) {
        match done {
            Done::Persisted(result) => self.d.on_persisted(result),
            Done::Snapshotted(result) => self.d.on_snapshot(result),
            Done::Restored(result) => {
                self.d.on_restored(result.map(|m| *m));
                let index = self.d.raft().snapshot_index();
                let text = format!("installed the leader's snapshot (up to index {index})");
                self.chronicle.lock().unwrap().push("snapshot", text);
            }
        }
    }

    /// Returns false when the node must stop.
    fn handle(&mut self, input: Input) -> bool {
        let d = &mut self.d;
        match input {
            // Messages from strangers, or that break the protocol's rules, are the core's to
            // refuse (and count).
            Input::Step(m) => {
                if d.transport_mut().heard(&m) {
                    let _ = d.step(m);
                }
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
                    pending: s.pending_writes,
                    alarms: d.machine().registry.alarms.iter().copied().collect(),
                });
            }
            Input::Freeze(reply) => {
                let m = d.machine();
                let _ = reply.send(Frozen {
                    store: m.store.clone(),
                    registry: m.registry.clone(),
                    applied: d.raft().applied(),
                    term: d.raft().term(),
                });
            }
            Input::IsRetry(session, reply) => {
                let store = &d.machine().store;
                let last = store.session(session.lease).map(|m| m.seq);
                let _ = reply.send(last == Some(session.seq));
            }
            Input::SnapshotNow(reply) => {
                let _ = reply.send(d.snapshot_now());
            }
            Input::Member(op, reply) => self.change_membership(op, reply),
            Input::Transfer(to, reply) => {
                let _ = reply.send(self.transfer(to));
            }
            Input::Renew(id, reply) => self.renew(id, reply),
            Input::Confirmed(id, received, reply) => {
                let store = &self.d.machine().store;
                let _ = reply.send(self.lessor.renew(id, received, store));
            }
            Input::TimeToLive(id, reply) => {
                let _ = reply.send(self.time_to_live(id));
            }
            Input::Leases(reply) => {
                let store = &self.d.machine().store;
                let _ = reply.send(store.leases().map(|l| l.id).collect());
            }
            Input::Inspect(since, reply) => {
                let _ = reply.send(self.inspect(since));
            }
            Input::Cut(peers) => {
                let ids = |s: &HashSet<NodeId>| {
                    let v: Vec<String> = s.iter().map(|p| insight::hex(*p)).collect();
                    v.join(", ")
                };
                let text = match peers.is_empty() {
                    true => "peer links healed".to_string(),
                    false => format!(
                        "peer links cut: hears nothing from [{}], reaches nothing of [{}]",
                        ids(&peers.from),
                        ids(&peers.to)
                    ),
                };
                tracing::warn!("{text} (by the supervisor)");
                self.chronicle.lock().unwrap().push("fault", text);
                d.transport_mut().links.cut = peers;
            }
            Input::Removed => {
                let why = self.stop_removed();
                tracing::error!("{why}");
                return false;
            }
            Input::Stop => return false,
        }
        true
    }

    /// Check a membership change as etcd does, then propose it as one configuration change
    /// whose context carries the request id (and a new member's peer URLs).
    fn change_membership(&mut self, op: MemberOp, reply: Waiter<Applied>) {
        let r = self.d.raft();
        if r.role() != Role::Leader {
            return reply.send(Err(Refusal::NoLeader));
        }
        let progress = r.progress();
        let matched = |id| progress.iter().find(|p| p.0 == id).map(|p| p.1);
        let transport = self.transport.clone();
        let active = move |id| transport.active(id);
        let facts = reconfig::Facts {
            me: r.id(),
            registry: &self.d.machine().registry,
            membership: r.membership(),
            leader_index: r.last_index(),
            matched: &matched,
            active: &active,
        };
        let change = match reconfig::check(&op, &facts) {
            Ok(c) => c,
            Err(status) => {
                let (term, applied) = (r.term(), r.applied());
                return reply.send(Ok(Answered {
                    value: Err(status),
                    term,
                    applied,
                }));
            }
        };
        let peer_urls = match op {
            MemberOp::Add { peer_urls, .. } => peer_urls,
            _ => Vec::new(),
        };
        let build =
            |id| ConfChange::simple(change).with_context(members::conf_context(id, peer_urls));
        // A lone voter taking a second one cannot commit the change without the newcomer's
        // acknowledgement (a configuration counts from the moment it enters the log), and the
        // newcomer is started only once `member add` has answered. So that answer comes once
        // the entry is durable here, the one log that counts until the newcomer runs — as
        // etcd, whose lone member commits such a change alone, answers at once.
        let lone =
            matches!(change, raft::Change::AddVoter(_)) && r.membership().voters().len() == 1;
        if lone {
            let term = r.term();
            match self.d.propose_conf_change_at(build) {
                Ok(index) => self.early.push((index, term, reply)),
                Err(why) => reply.send(Err(why)),
            }
            return;
        }
        self.d.propose_conf_change(build, reply);
    }

    /// A keep-alive counts only once a quorum has confirmed this member still leads (a
    /// ReadIndex round begun after it arrived). A leader paused (SIGSTOP, a long GC, a
    /// starved VM) while another was elected would otherwise renew on its own stale word,
    /// and the client would count on a lease the real leader is about to expire. The
    /// renewal is then dated from the keep-alive's arrival, never later.
    fn renew(&mut self, id: i64, reply: oneshot::Sender<Renewal>) {
        if !self.lessor.is_primary() {
            let _ = reply.send(Renewal::NotLeader);
            return;
        }
        let received = self.now();
        let (tx, rx) = oneshot::channel();
        let probe = kv::RangeRequest::default();
        self.d.read(probe, true, Waiter(tx));
        let back = self.inputs.clone();
        tokio::spawn(async move {
            let confirmed = matches!(rx.await, Ok(Ok(_)));
            match back.upgrade() {
                Some(back) if confirmed => {
                    if let Err(e) = back.send(Input::Confirmed(id, received, reply)).await {
                        if let Input::Confirmed(_, _, reply) = e.0 {
                            let _ = reply.send(Renewal::NotLeader);
                        }
                    }
                }
                _ => {
                    let _ = reply.send(Renewal::NotLeader);
                }
            }
        });
    }

    fn time_to_live(&self, id: i64) -> Result<Option<LeaseInfo>, Status> {
        if !self.lessor.is_primary() {
            return Err(not_leader());
        }
        let Some(lease) = self.d.machine().store.lease(id) else {
            return Ok(None);
        };
        Ok(Some(LeaseInfo {
            remaining: self.lessor.remaining(id, self.now()).unwrap_or(0),
            granted_ttl: lease.ttl,
            keys: lease.keys.iter().cloned().collect(),
        }))
    }

    fn transfer(&mut self, to: NodeId) -> Result<(), Status> {
        let r = self.d.raft_mut();
        if r.role() != Role::Leader {
            return Err(Status::failed_precondition("etcdserver: not leader"));
        }
        if !r.membership().is_voter(to) {
            return Err(Status::failed_precondition(
                "etcdserver: bad leader transferee",
            ));
        }
        if to == r.id() {
            return Ok(());
        }
        r.transfer_leader(to)
            .map_err(|e| Status::unavailable(format!("etcdserver: leader transfer failed: {e}")))
    }
}

/// Note in the chronicle what changed between two views: the configuration, alarms.
fn chronicle_changes(c: &SharedChronicle, old: &View, new: &View) {
    let mut c = c.lock().unwrap();
    if old.latest != new.latest {
        if let Some(m) = &new.latest {
            let ids = |ids: &[NodeId]| {
                ids.iter()
                    .map(|id| insight::hex(*id))
                    .collect::<Vec<_>>()
                    .join(", ")
            };
            let mut text = format!("configuration: voters {}", ids(m.voters()));
            if !m.learners().is_empty() {
                text += &format!("; learners {}", ids(m.learners()));
            }
            if old.latest.is_some() {
                c.push("membership", text);
            }
        }
    }
    let (was, is) = (&old.registry.alarms, &new.registry.alarms);
    for (id, kind) in is.difference(was) {
        let text = format!(
            "alarm {} raised on {}",
            insight::alarm_name(*kind),
            insight::hex(*id)
        );
        c.push("alarm", text);
    }
    for (id, kind) in was.difference(is) {
        let text = format!(
            "alarm {} cleared on {}",
            insight::alarm_name(*kind),
            insight::hex(*id)
        );
        c.push("alarm", text);
    }
}

/// The peer transport, as the driver sees it. It also times heartbeats: the round trip
/// of a heartbeat and its answer is the peer round-trip time etcd reports.
struct Peers {
    out: Arc<dyn Transport>,
    metrics: Arc<Metrics>,
    /// The last heartbeat sent to each peer: its round number and when it left. One entry
    /// per peer, so bounded by the membership.
    heartbeats: HashMap<NodeId, (u64, std::time::Instant)>,
    /// Traffic per peer and the supervisor's cut switch (for the dashboard).
    links: Links,
    chronicle: SharedChronicle,
}

impl Peers {
    /// A message arrived: false if its link is cut (it is dropped, as a network would).
    /// If it answers the last heartbeat sent to its sender, time it.
    fn heard(&mut self, m: &Message) -> bool {
        if self.links.cut.from.contains(&m.from) {
            return false;
        }
        self.links.received(m);
        if let raft::Body::HeartbeatResponse { seq } = m.body {
            if let Some((sent_seq, at)) = self.heartbeats.get(&m.from) {
                if *sent_seq == seq {
                    let rtt = at.elapsed();
                    let to = format!("{:x}", m.from);
                    self.metrics
                        .peer_rtt
                        .with_label_values(&[&to])
                        .observe(rtt.as_secs_f64());
                    self.links.rtt(m.from, rtt);
                    self.heartbeats.remove(&m.from);
                }
            }
        }
        true
    }

    /// Note what the dashboard's timeline shows of a message leaving: a vote granted,
    /// the first chunk of a snapshot.
    fn chronicle(&self, m: &Message) {
        let (kind, text) = match &m.body {
            raft::Body::VoteResponse { pre_vote, granted } if *granted => {
                let what = if *pre_vote { "pre-vote" } else { "vote" };
                (
                    "vote",
                    format!(
                        "granted its {what} to {} for term {}",
                        insight::hex(m.to),
                        m.term
                    ),
                )
            }
            raft::Body::InstallSnapshot { meta, offset, .. } if *offset == 0 => (
                "snapshot",
                format!(
                    "sending a snapshot (up to index {}) to {}",
                    meta.index,
                    insight::hex(m.to)
                ),
            ),
            _ => return,
        };
        self.chronicle.lock().unwrap().push(kind, text);
    }
}

impl driver::Transport for Peers {
    fn send(&mut self, mut msgs: Vec<Message>) {
        if !self.links.cut.to.is_empty() {
            msgs.retain(|m| !self.links.cut.to.contains(&m.to));
        }
        if msgs.is_empty() {
            return;
        }
        for m in &msgs {
            self.links.sent(m);
            if matches!(
                m.body,
                raft::Body::VoteResponse { granted: true, .. }
                    | raft::Body::InstallSnapshot { offset: 0, .. }
            ) {
                self.chronicle(m);
            }
            if let raft::Body::Heartbeat { seq, .. } = m.body {
                // Keep the oldest unanswered round (a slow peer shows a long round trip,
                // not none), unless its answer looks lost.
                let now = std::time::Instant::now();
                let e = self.heartbeats.entry(m.to).or_insert((seq, now));
                if now.duration_since(e.1) > Duration::from_secs(1) {
                    *e = (seq, now);
                }
            }
        }
        self.out.send(msgs);
    }
}

/// The write-ahead log behind group commit, and snapshot files written off the loop.
struct Wal {
    group: GroupCommit,
    /// Writes snapshot files off the raft loop and off the log's thread.
    writer: storage::SnapshotWriter,
    done: mpsc::UnboundedSender<Done>,
    /// Told of members that configuration entries add, as those entries enter the log.
    transport: Arc<dyn Transport>,
    /// A leader's snapshot written before the registry existed restores onto this.
    bootstrap: Registry,
    /// Peer URLs of members added by entries that entered the log (see `View::pending`).
    added: Added,
}

/// Members added by configuration entries in the log, with their peer URLs.
type Added = Arc<Mutex<BTreeMap<NodeId, Vec<String>>>>;

impl Wal {
    /// A member added by an entry now entering the log must be reachable before the entry
    /// applies: a leader of one voter adding a second needs the newcomer's vote to commit
    /// the very entry that adds it.
    fn learn_added_members(&self, entries: &[raft::Entry]) {
        for e in entries.iter().filter(|e| e.kind == EntryKind::ConfChange) {
            let Ok(conf) = ConfEntry::decode(&e.data) else {
                continue;
            };
            let Ok(ctx) = <crate::pb::raftkvpb::ConfContext as prost::Message>::decode(
                &conf.change.context[..],
            ) else {
                continue;
            };
            let Some(url) = ctx.peer_urls.first() else {
                continue;
            };
            for c in &conf.change.changes {
                if let raft::Change::AddVoter(id) | raft::Change::AddLearner(id) = c {
                    self.transport.learn_peer(*id, url);
                    let mut added = self.added.lock().unwrap();
                    added.insert(*id, ctx.peer_urls.clone());
                }
            }
        }
    }
}

impl driver::Storage<KvMachine> for Wal {
    fn persist(&mut self, w: driver::Write) {
        self.learn_added_members(&w.entries);
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
    fn snapshot(&mut self, meta: SnapshotMeta, (store, registry): (kv::Store, Registry)) {
        let (writer, done) = (self.writer.clone(), self.done.clone());
        tokio::task::spawn_blocking(move || {
            let snapshot = Snapshot {
                meta,
                data: members::encode_snapshot(&registry, &store.snapshot()),
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
        let (done, bootstrap) = (self.done.clone(), self.bootstrap.clone());
        tokio::task::spawn_blocking(move || {
            let mut machine = KvMachine::new(bootstrap);
            let result =
                driver::StateMachine::restore(&mut machine, &snapshot).map(|_| Box::new(machine));
            let _ = done.send(Done::Restored(result));
        });
    }
}

#[cfg(test)]
mod tests {
    use super::boot_nonce;
    use std::collections::HashSet;

    /// Two lives of one member never share a nonce (a shared one would let an entry of the
    /// earlier life answer a request of the later), even when they start in the same
    /// nanosecond of the same process.
    #[test]
    fn boot_nonces_differ_between_lives() {
        let nonces: HashSet<u64> = (0..10_000).map(|_| boot_nonce(7)).collect();
        assert_eq!(nonces.len(), 10_000);
    }
}
