//! The driver loop's body: everything between the raft core and the outside world.

use crate::ids::{Ids, RequestId};
use crate::{Answered, Refusal, Reply, StateMachine, Storage, Transport, Write};
use bytes::Bytes;
use raft::{
    Entry, Index, Message, NodeId, Raft, ReadCtx, Ready, Role, Snapshot, SnapshotMeta, Term,
};
use std::collections::{HashMap, VecDeque};

/// Bounds and policies of one driver. Every queue it keeps has a bound here.
#[derive(Clone, Debug)]
pub struct DriverConfig {
    /// Snapshot and compact the log every this many applied entries (0: never).
    pub snapshot_count: u64,
    /// Most writes waiting for their entry to apply; more are refused (`TooManyRequests`).
    pub max_pending_writes: usize,
    /// Most linearizable reads waiting for confirmation or for their index to apply.
    pub max_pending_reads: usize,
    /// Largest encoded command accepted.
    pub max_command_bytes: usize,
}

impl Default for DriverConfig {
    fn default() -> Self {
        DriverConfig {
            snapshot_count: 100_000,
            max_pending_writes: 32_768,
            max_pending_reads: 32_768,
            max_command_bytes: 1536 * 1024,
        }
    }
}

/// A write whose completion the driver awaits: writes complete in submission order.
struct InFlight {
    persist_to: Option<(Index, Term)>,
    /// Messages that promise what this write makes durable (votes, acknowledgements).
    messages: Vec<Message>,
}

/// What a member reports about itself: a consistent picture taken between two events.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Status {
    /// The member's id.
    pub id: NodeId,
    /// Its role in its current term.
    pub role: Role,
    /// The leader it knows of in that term, if any.
    pub leader: Option<NodeId>,
    /// Its current term.
    pub term: Term,
    /// The highest index it knows committed.
    pub commit: Index,
    /// The highest index its state machine has applied (`applied <= commit`).
    pub applied: Index,
    /// The last index in its log, durable or not; `last_index - commit` entries are not
    /// yet known to be committed.
    pub last_index: Index,
    /// The index its latest snapshot covers; the log holds entries only after it.
    pub snapshot_index: Index,
    /// Writes proposed here whose clients still wait for their entry to apply.
    pub pending_writes: usize,
    /// Linearizable reads waiting for confirmation or for their index to apply.
    pub pending_reads: usize,
    /// Peers' messages the core refused (strangers, broken rules) since it started.
    pub refused_messages: u64,
}

/// A raft core with its state machine, storage and transport, and the clients waiting on it.
pub struct Driver<M, S, T, W, R>
where
    M: StateMachine,
    S: Storage<M>,
    T: Transport,
    W: Reply<M::Output>,
    R: Reply<M::Answer>,
{
    raft: Raft,
    machine: M,
    storage: S,
    transport: T,
    cfg: DriverConfig,
    ids: Ids,
    /// Writes proposed here, waiting for their entry to apply (bounded).
    waiters: HashMap<RequestId, W>,
    /// Linearizable reads waiting for leadership confirmation (bounded, with `confirmed`).
    reads: HashMap<ReadCtx, (M::Query, R)>,
    /// Confirmed reads waiting for their index to apply.
    confirmed: Vec<(Index, M::Query, R)>,
    /// Writes submitted and not yet durable, oldest first.
    in_flight: VecDeque<InFlight>,
    last_snapshot: Index,
    /// A snapshot is being taken in the background (at most one at a time).
    snapshotting: bool,
    /// The owner asked for a snapshot now (an operator reclaiming log space), whatever
    /// `snapshot_count` says.
    snapshot_asked: bool,
    leader: Option<NodeId>,
    /// Set once the member must stop; nothing is done after.
    failure: Option<String>,
    /// A Ready whose snapshot storage is restoring off the loop; the rest of it, and every
    /// later Ready, waits for `on_restored`.
    paused: Option<Ready>,
}

impl<M, S, T, W, R> Driver<M, S, T, W, R>
where
    M: StateMachine,
    S: Storage<M>,
    T: Transport,
    W: Reply<M::Output>,
    R: Reply<M::Answer>,
{
    /// `machine` holds the state of `raft`'s snapshot (if any): the owner restored it.
    pub fn new(
        raft: Raft,
        machine: M,
        storage: S,
        transport: T,
        ids: Ids,
        cfg: DriverConfig,
    ) -> Self {
        let last_snapshot = raft.snapshot_index();
        let mut d = Driver {
            raft,
            machine,
            storage,
            transport,
            cfg,
            ids,
            waiters: HashMap::new(),
            reads: HashMap::new(),
            confirmed: Vec::new(),
            in_flight: VecDeque::new(),
            last_snapshot,
            snapshotting: false,
            snapshot_asked: false,
            leader: None,
            failure: None,
            paused: None,
        };
        d.process_ready();
        d
    }

    /// The raft core, to inspect (role, indexes, membership).
    pub fn raft(&self) -> &Raft {
        &self.raft
    }
    /// For tests and tools that drive the core directly (campaign, transfer).
    pub fn raft_mut(&mut self) -> &mut Raft {
        &mut self.raft
    }
    /// The state machine as applied so far (up to `raft().applied()`).
    pub fn machine(&self) -> &M {
        &self.machine
    }
    /// For tests and tools that prepare the state machine (e.g. inject a fault).
    pub fn machine_mut(&mut self) -> &mut M {
        &mut self.machine
    }
    /// The storage the driver submits writes to.
    pub fn storage(&self) -> &S {
        &self.storage
    }
    /// The storage, for the owner to collect finished work (completed writes, snapshots,
    /// restored state machines) that it then reports with [`Driver::on_persisted`],
    /// [`Driver::on_snapshot`] or [`Driver::on_restored`].
    pub fn storage_mut(&mut self) -> &mut S {
        &mut self.storage
    }
    /// The transport messages leave through.
    pub fn transport(&self) -> &T {
        &self.transport
    }
    /// The transport, for the owner to update it (its links to peers, what it has heard).
    pub fn transport_mut(&mut self) -> &mut T {
        &mut self.transport
    }
    /// Why the member stopped, if it did.
    pub fn failure(&self) -> Option<&str> {
        self.failure.as_deref()
    }
    /// Writes submitted to storage and not yet reported durable.
    pub fn writes_in_flight(&self) -> usize {
        self.in_flight.len()
    }

    /// This member's role, term, indexes and queue lengths, for monitoring and tests.
    pub fn status(&self) -> Status {
        let r = &self.raft;
        Status {
            id: r.id(),
            role: r.role(),
            leader: r.leader(),
            term: r.term(),
            commit: r.commit_index(),
            applied: r.applied(),
            last_index: r.last_index(),
            snapshot_index: r.snapshot_index(),
            pending_writes: self.waiters.len(),
            pending_reads: self.reads.len() + self.confirmed.len(),
            refused_messages: r.refused_messages(),
        }
    }

    /// One tick of logical time. Clients that gave up are forgotten here.
    pub fn tick(&mut self) {
        if self.failure.is_some() {
            return;
        }
        self.raft.tick();
        self.waiters.retain(|_, w| !w.is_closed());
        self.reads.retain(|_, (_, r)| !r.is_closed());
        self.confirmed.retain(|(_, _, r)| !r.is_closed());
    }

    /// A message from a peer. Refused messages (strangers, broken rules) are counted by the
    /// core and reported here; they change nothing.
    pub fn step(&mut self, m: Message) -> Result<(), raft::Error> {
        if self.failure.is_some() {
            return Ok(());
        }
        self.raft.step(m)
    }

    /// Propose a write. `encode` turns the request id the driver assigns into the command's
    /// bytes; `reply` is answered once the entry is applied here, or refused.
    pub fn propose(&mut self, encode: impl FnOnce(RequestId) -> Bytes, reply: W) {
        if self.failure.is_some() {
            return reply.send(Err(Refusal::Stopped));
        }
        if self.waiters.len() >= self.cfg.max_pending_writes {
            return reply.send(Err(Refusal::TooManyRequests));
        }
        let id = self.ids.next_request();
        let data = encode(id);
        if data.len() > self.cfg.max_command_bytes {
            return reply.send(Err(Refusal::TooLarge));
        }
        // A follower forwards the command to its leader (batched with the others of this
        // round) and answers once it has applied the entry itself.
        match self.raft.propose_or_forward(data) {
            Ok(_) => {
                self.waiters.insert(id, reply);
            }
            Err(e) => reply.send(Err(refusal(e))),
        }
    }

    /// Propose a configuration change (leader only). `build` makes the change from the
    /// request id the driver assigns (the application carries it in the change's context and
    /// returns it from `StateMachine::apply` for the entry); `reply` is answered once the
    /// entry is applied here, or refused.
    pub fn propose_conf_change(
        &mut self,
        build: impl FnOnce(RequestId) -> raft::ConfChange,
        reply: W,
    ) {
        if self.failure.is_some() {
            return reply.send(Err(Refusal::Stopped));
        }
        if self.waiters.len() >= self.cfg.max_pending_writes {
            return reply.send(Err(Refusal::TooManyRequests));
        }
        match self.conf_change(build) {
            Ok((id, _)) => {
                self.waiters.insert(id, reply);
            }
            Err(why) => reply.send(Err(why)),
        }
    }

    /// Propose a configuration change whose client the owner answers itself (see the
    /// server's one-voter growth): returns the index of its entry.
    pub fn propose_conf_change_at(
        &mut self,
        build: impl FnOnce(RequestId) -> raft::ConfChange,
    ) -> Result<Index, Refusal> {
        self.conf_change(build).map(|(_, index)| index)
    }

    /// A configuration change under a fresh request id: the id and the entry's index.
    fn conf_change(
        &mut self,
        build: impl FnOnce(RequestId) -> raft::ConfChange,
    ) -> Result<(RequestId, Index), Refusal> {
        if self.failure.is_some() {
            return Err(Refusal::Stopped);
        }
        let id = self.ids.next_request();
        match self.raft.propose_conf_change(build(id)) {
            Ok(index) => Ok((id, index)),
            Err(raft::Error::ConfChangeRefused(why)) => Err(Refusal::ConfChange(why)),
            Err(e) => Err(refusal(e)),
        }
    }

    /// A read: linearizable (confirmed by ReadIndex, then served once applied that far) or
    /// serializable (served from local state at once).
    pub fn read(&mut self, query: M::Query, linearizable: bool, reply: R) {
        if self.failure.is_some() {
            return reply.send(Err(Refusal::Stopped));
        }
        if !linearizable {
            return reply.send(Ok(self.answer(&query)));
        }
        if self.reads.len() + self.confirmed.len() >= self.cfg.max_pending_reads {
            return reply.send(Err(Refusal::TooManyRequests));
        }
        let ctx = self.ids.next_read();
        match self.raft.read_index(ctx) {
            Ok(()) => {
                self.reads.insert(ctx, (query, reply));
            }
            Err(e) => reply.send(Err(refusal(e))),
        }
    }

    /// The oldest write in flight completed. A failed write stops the member: what it
    /// promised can no longer be kept, and nothing that depends on it may be sent.
    pub fn on_persisted(&mut self, result: Result<(), String>) {
        if self.failure.is_some() {
            return;
        }
        let Some(done) = self.in_flight.pop_front() else {
            return self.fail("storage reported a write that was never submitted".into());
        };
        if let Err(e) = result {
            return self.fail(format!("the log could not be made durable: {e}"));
        }
        if let Some((index, term)) = done.persist_to {
            self.raft.advance_persisted(index, term);
        }
        self.transport.send(done.messages);
    }

    /// A background snapshot is durable (or failed: the log just keeps growing until the
    /// next attempt, which is safe).
    pub fn on_snapshot(&mut self, result: Result<Snapshot, String>) {
        self.snapshotting = false;
        if self.failure.is_some() {
            return;
        }
        let snapshot = match result {
            Ok(s) => s,
            Err(e) => {
                tracing::error!(error = %e, "writing a snapshot failed");
                self.last_snapshot = self.raft.applied();
                return;
            }
        };
        let index = snapshot.meta.index;
        // Refused, or moot, if a newer snapshot arrived from the leader meanwhile.
        if let Err(e) = self.raft.compact(snapshot.clone()) {
            tracing::warn!(error = %e, "compaction refused");
            return;
        }
        self.last_snapshot = self.last_snapshot.max(index);
        if self.raft.snapshot_index() == index {
            tracing::info!(index, "snapshot taken; compacting the log up to it");
            self.storage.compact(snapshot);
        }
    }

    /// Storage built the state machine from the leader's snapshot (or could not: the member
    /// stops, since its state machine no longer matches its log). The Ready that carried the
    /// snapshot is then carried out.
    pub fn on_restored(&mut self, result: Result<M, String>) {
        if self.failure.is_some() {
            return;
        }
        let Some(rd) = self.paused.take() else {
            return self.fail("storage restored a snapshot nobody asked for".into());
        };
        let index = rd.snapshot.as_ref().map_or(0, |s| s.meta.index);
        match result {
            Ok(machine) => self.machine = machine,
            Err(e) => return self.fail(format!("cannot restore the snapshot at {index}: {e}")),
        }
        tracing::info!(index, "restored the leader's snapshot");
        self.last_snapshot = index;
        if self.finish(rd) {
            self.process_ready();
        }
    }

    /// A leader's snapshot is being restored off the loop.
    pub fn restoring(&self) -> bool {
        self.paused.is_some()
    }

    /// Stop: every waiting client is told, and the driver does nothing more.
    pub fn shutdown(&mut self, why: &str) {
        if self.failure.is_none() {
            self.failure = Some(why.to_string());
            self.refuse_everyone(Refusal::Stopped);
        }
    }

    /// The configuration in force as far as this member has applied.
    pub fn membership(&self) -> Option<&raft::Membership> {
        self.raft.membership_at(self.raft.applied())
    }

    /// This member applied a configuration that no longer holds it: it was removed from
    /// the cluster, and may shut down. (A member that joined empty and has not yet learned
    /// any configuration was not removed.)
    pub fn removed(&self) -> bool {
        let id = self.raft.id();
        self.membership()
            .is_some_and(|m| !m.voters().is_empty() && !m.contains(id))
    }

    /// Carry out everything the core decided, in the order the Ready contract requires.
    pub fn process_ready(&mut self) {
        while self.failure.is_none() && self.paused.is_none() && self.raft.has_ready() {
            let mut rd = self.raft.ready();
            // 1. What may leave before the disk write: the leader's appends among them.
            self.transport.send(std::mem::take(&mut rd.messages));
            // 2. A snapshot from the leader replaces the state machine: storage builds the
            // new one off the loop, and the rest of this Ready waits for it (`on_restored`).
            if let Some(s) = &rd.snapshot {
                self.storage.restore(s.clone());
                self.paused = Some(rd);
                return;
            }
            if !self.finish(rd) {
                return;
            }
        }
    }

    /// Steps 3 to 6 of a Ready. Returns false if the member had to stop.
    fn finish(&mut self, mut rd: Ready) -> bool {
        let snapshot_index = rd.snapshot.as_ref().map(|s| s.meta.index);
        // 3. Persist; votes and acknowledgements leave once durable. A batch that writes
        // nothing still waits for the writes before it, if any are in flight.
        let persisted_messages = std::mem::take(&mut rd.persisted_messages);
        if rd.must_persist() || (!persisted_messages.is_empty() && !self.in_flight.is_empty()) {
            let prev_term = rd
                .entries
                .first()
                .and_then(|e| self.raft.term_at(e.index - 1))
                .unwrap_or(0);
            self.in_flight.push_back(InFlight {
                persist_to: rd.persist_to(),
                messages: persisted_messages,
            });
            let write = Write {
                lazy: !rd.must_sync(),
                snapshot: rd.snapshot.take(),
                hard_state: rd.hard_state,
                entries: std::mem::take(&mut rd.entries),
                prev_term,
            };
            self.storage.persist(write);
        } else {
            self.transport.send(persisted_messages);
        }
        // 4. Apply, answering the clients whose entries these are.
        if let Some(index) = snapshot_index {
            self.raft.advance_applied(index);
        }
        for e in &rd.committed_entries {
            if !self.apply(e) {
                return false;
            }
        }
        if let Some(last) = rd.committed_entries.last() {
            self.raft.advance_applied(last.index);
        }
        // 5. Reads.
        for rs in rd.read_states {
            if let Some((query, reply)) = self.reads.remove(&rs.ctx) {
                self.confirmed.push((rs.index, query, reply));
            }
        }
        self.serve_reads();
        if rd.soft_state.is_some() {
            self.on_leader_change();
        }
        // 6. Snapshot now and then.
        self.maybe_snapshot();
        true
    }

    fn apply(&mut self, e: &Entry) -> bool {
        match self.machine.apply(e) {
            Ok(Some((id, value))) => {
                if let Some(reply) = self.waiters.remove(&id) {
                    let term = self.raft.term();
                    reply.send(Ok(Answered {
                        value,
                        term,
                        applied: e.index,
                    }));
                }
                true
            }
            Ok(None) => true,
            Err(why) => {
                self.fail(format!("cannot apply entry {}: {why}", e.index));
                false
            }
        }
    }

    fn answer(&self, query: &M::Query) -> Answered<M::Answer> {
        Answered {
            value: self.machine.query(query),
            term: self.raft.term(),
            applied: self.raft.applied(),
        }
    }

    fn serve_reads(&mut self) {
        if self.confirmed.is_empty() {
            return;
        }
        let applied = self.raft.applied();
        let (ready, waiting): (Vec<_>, Vec<_>) = std::mem::take(&mut self.confirmed)
            .into_iter()
            .partition(|(index, _, _)| *index <= applied);
        self.confirmed = waiting;
        for (_, query, reply) in ready {
            reply.send(Ok(self.answer(&query)));
        }
    }

    /// A new leader (or none): requests this member was waiting on may never be answered.
    /// Their clients are told "leader changed"; a write may still commit — the ambiguity
    /// every client of a replicated store must handle.
    fn on_leader_change(&mut self) {
        let leader = self.raft.leader();
        if leader != self.leader {
            if self.leader.is_some() {
                for (_, w) in self.waiters.drain() {
                    w.send(Err(Refusal::LeaderChanged));
                }
                for (_, (_, r)) in self.reads.drain() {
                    r.send(Err(Refusal::LeaderChanged));
                }
            }
            self.leader = leader;
        }
    }

    /// Take a snapshot of everything applied as soon as possible and compact the log to it
    /// (once it is durable), whatever `snapshot_count` says. Returns the index it will
    /// cover: done once `status().snapshot_index` reaches it. Nothing new applied since the
    /// last snapshot: nothing to do, and that snapshot's index.
    pub fn snapshot_now(&mut self) -> Index {
        let applied = self.raft.applied();
        if applied > self.last_snapshot {
            self.snapshot_asked = true;
            // Now, not at the next Ready: an idle member may not have one for a long time.
            self.maybe_snapshot();
        }
        applied
    }

    /// Every `snapshot_count` applied entries, freeze the state machine and let storage
    /// serialize and write it in the background; the log is compacted once it is durable.
    fn maybe_snapshot(&mut self) {
        let applied = self.raft.applied();
        let due = (self.cfg.snapshot_count > 0
            && applied >= self.last_snapshot + self.cfg.snapshot_count)
            || (self.snapshot_asked && applied > self.last_snapshot);
        if self.snapshotting || !due {
            return;
        }
        let (Some(term), Some(membership)) =
            (self.raft.term_at(applied), self.raft.membership_at(applied))
        else {
            return;
        };
        if membership.voters().is_empty() {
            // A member that joined with an empty disk does not know the configuration before
            // the entry that added it; it snapshots once it has applied that entry.
            return;
        }
        let meta = SnapshotMeta {
            index: applied,
            term,
            membership: membership.clone(),
        };
        self.snapshotting = true;
        self.snapshot_asked = false;
        let frozen = self.machine.freeze();
        self.storage.snapshot(meta, frozen);
    }

    fn fail(&mut self, why: String) {
        tracing::error!("{why}; stopping");
        self.failure = Some(why);
        self.refuse_everyone(Refusal::Stopped);
    }

    fn refuse_everyone(&mut self, why: Refusal) {
        for (_, w) in self.waiters.drain() {
            w.send(Err(why.clone()));
        }
        for (_, (_, r)) in self.reads.drain() {
            r.send(Err(why.clone()));
        }
        for (_, _, r) in self.confirmed.drain(..) {
            r.send(Err(why.clone()));
        }
    }
}

fn refusal(e: raft::Error) -> Refusal {
    match e {
        raft::Error::TransferInProgress { .. } => Refusal::LeaderChanged,
        raft::Error::ProposalDropped { .. } | raft::Error::ReadQueueFull => {
            Refusal::TooManyRequests
        }
        _ => Refusal::NoLeader,
    }
}
