//! A member's runtime on tokio: one task owns the [`driver::Driver`] (the raft core, the kv
//! store, the clients waiting on them) and feeds it ticks, peer messages, client requests
//! and storage completions. Everything the Ready contract asks — what to send before and
//! after the disk write, applying, answering, reads, snapshots — is the driver's, the same
//! code the simulator runs. This file adds only what is about tokio and the disk: channels,
//! the group-commit log, background snapshot files, and etcd's response headers and errors.

use crate::member::command::{self, Write};
use crate::member::machine::{Applied, KvMachine, Output, Rehome, Served};
use crate::member::members::{self, Registry};
use crate::member::reconfig::{self, MemberOp};
use crate::operations::insight::{self, Links, MemberState, SharedChronicle, SharedRequests};
use crate::operations::metrics::Metrics;
use crate::pb::etcdserverpb::alarm_request::AlarmAction;
use crate::pb::etcdserverpb::ResponseHeader;
use crate::services::api;
use crate::services::watch::Watchers;
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

mod driver_io;
mod event_loop;
mod recover;

use driver_io::{Added, Peers, Wal};
use event_loop::Loop;
use recover::recover;

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
    /// A snapshot written, and the move of the store's values into it.
    Snapshotted(Result<Snapshot, String>, Option<Box<Rehome>>),
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
            .contains(&(self.id, crate::member::machine::NOSPACE));
        if !raised {
            tracing::warn!(
                quota = self.quota,
                in_use = self.in_use.load(Ordering::Relaxed),
                "the store is over its quota (--quota-backend-bytes); raising NOSPACE"
            );
            let raise = crate::pb::etcdserverpb::AlarmRequest {
                action: AlarmAction::Activate as i32,
                member_id: self.id,
                alarm: crate::member::machine::NOSPACE,
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

#[cfg(test)]
mod tests {
    use super::recover::boot_nonce;
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
