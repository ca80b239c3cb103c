//! The node: its persistent and volatile state (Figure 2), the single entry point `step`,
//! and the role transitions. Elections live in `election.rs`, log replication in
//! `replication.rs`, reads in `read_only.rs` and the output batch in `ready.rs`.

use crate::config::Config;
use crate::error::{Error, Result};
use crate::log::RaftLog;
use crate::membership::Membership;
use crate::message::{Body, Message};
use crate::progress::Progress;
use crate::read_only::{ReadOnly, ReadState};
use crate::rng::Rng;
use crate::snapshot::IncomingSnapshot;
use crate::types::{Entry, EntryKind, HardState, Index, NodeId, Role, Snapshot, SoftState, Term};
use bytes::Bytes;
use std::collections::{BTreeMap, HashMap};

/// Where [`Raft::propose_or_forward`] sent a command.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Proposal {
    /// Appended to this leader's log at this index.
    Appended(Index),
    /// Forwarded to this leader.
    Forwarded(NodeId),
}

/// What a node finds on its disk at start: the hard state, the latest snapshot if any, and
/// the log entries that follow it.
#[derive(Clone, Debug, Default)]
pub struct RestoreState {
    /// The last hard state persisted: term, vote and commit index. Restoring term and vote
    /// is what keeps a restarted node from voting twice in one term.
    pub hard_state: HardState,
    /// The latest durable snapshot; the application has already restored its state machine
    /// from it. Without one the log starts at index 1 and the configuration is
    /// [`Config::voters`].
    pub snapshot: Option<Snapshot>,
    /// The durable entries after the snapshot point, consecutive from its index + 1, with
    /// terms that never decrease and never exceed `hard_state.term`.
    pub entries: Vec<Entry>,
}

impl RestoreState {
    fn snapshot_point(&self) -> (Index, Term) {
        self.snapshot
            .as_ref()
            .map_or((0, 0), |s| (s.meta.index, s.meta.term))
    }
}

/// A Raft node, sans IO. Drive it with [`Raft::tick`], [`Raft::step`], [`Raft::propose`],
/// [`Raft::read_index`] and [`Raft::transfer_leader`]; collect its output with
/// [`Raft::ready`] and acknowledge it with [`Raft::advance`].
pub struct Raft {
    pub(crate) id: NodeId,
    pub(crate) cfg: Config,
    pub(crate) term: Term,
    pub(crate) vote: Option<NodeId>,
    pub(crate) role: Role,
    pub(crate) leader: Option<NodeId>,
    /// The log, and with it the configurations in force (`configs.rs`).
    pub(crate) log: RaftLog,
    /// Leader only: each member's progress (voters and learners of every configuration in
    /// force), this node's own included (its match is what is durable locally).
    pub(crate) progress: BTreeMap<NodeId, Progress>,
    /// Votes received in the current (pre-)election.
    pub(crate) votes: HashMap<NodeId, bool>,
    pub(crate) election_elapsed: u64,
    pub(crate) heartbeat_elapsed: u64,
    pub(crate) randomized_timeout: u64,
    /// Ticks since this core was created: the leader's clock for leases.
    pub(crate) ticks: u64,
    pub(crate) rng: Rng,
    pub(crate) lead_transferee: Option<NodeId>,
    pub(crate) read_only: ReadOnly,
    /// Leader: reads may be served without a round trip while `ticks < lease_until`.
    pub(crate) lease_until: u64,
    /// Leader: bytes appended in this term and not yet committed (bounded).
    pub(crate) uncommitted_bytes: u64,
    /// Leader: new entries await a broadcast, done once per `ready` so that proposals
    /// arriving together leave in one `Append` per follower.
    pub(crate) bcast_pending: bool,
    /// The latest snapshot (taken here or installed from a leader): what lagging followers
    /// are sent.
    pub(crate) snapshot: Option<Snapshot>,
    /// A snapshot installed from the leader, for the next Ready.
    pub(crate) pending_snapshot: Option<Snapshot>,
    /// Follower: a snapshot arriving in chunks.
    pub(crate) incoming: Option<IncomingSnapshot>,
    pub(crate) msgs: Vec<Message>,
    /// The `Propose` in `msgs` that forwarded commands still join: (position, bytes).
    /// Reset whenever `msgs` is handed out.
    pub(crate) open_propose: Option<(usize, u64)>,
    pub(crate) msgs_after_persist: Vec<Message>,
    pub(crate) read_states: Vec<ReadState>,
    /// What the last `Ready` reported, to report only changes.
    pub(crate) prev_hard_state: HardState,
    pub(crate) prev_soft_state: SoftState,
    /// Messages refused by the entry checks (`validate.rs`) since this core started.
    pub(crate) refused_messages: u64,
}

impl Raft {
    /// A node starting from `state` (use `RestoreState::default()` for a new node).
    pub fn new(cfg: Config, state: RestoreState) -> Result<Raft> {
        cfg.validate()?;
        check_restore(&state, &cfg)?;
        let hs = state.hard_state;
        let (snap_index, snap_term) = state.snapshot_point();
        // The application restored its state machine from the snapshot, if not further.
        let applied = cfg.applied.max(snap_index);
        // The configuration at the snapshot point: the snapshot's, or the bootstrap one.
        let base = state.snapshot.as_ref().map_or_else(
            || Membership::new(cfg.voters.clone()),
            |s| s.meta.membership.clone(),
        );
        let log = RaftLog::restore(
            snap_index,
            snap_term,
            base,
            state.entries,
            hs.commit,
            applied,
        );
        let mut raft = Raft {
            id: cfg.id,
            term: hs.term,
            vote: hs.vote,
            role: Role::Follower,
            leader: None,
            log,
            progress: BTreeMap::new(),
            votes: HashMap::new(),
            election_elapsed: 0,
            heartbeat_elapsed: 0,
            randomized_timeout: cfg.election_tick,
            ticks: 0,
            rng: Rng::new(cfg.seed),
            lead_transferee: None,
            read_only: ReadOnly::default(),
            lease_until: 0,
            uncommitted_bytes: 0,
            bcast_pending: false,
            snapshot: state.snapshot,
            pending_snapshot: None,
            incoming: None,
            msgs: Vec::new(),
            open_propose: None,
            msgs_after_persist: Vec::new(),
            read_states: Vec::new(),
            prev_hard_state: hs,
            prev_soft_state: SoftState {
                role: Role::Follower,
                leader: None,
                term: hs.term,
            },
            refused_messages: 0,
            cfg,
        };
        raft.prev_hard_state.commit = raft.log.committed;
        raft.become_follower(hs.term, None);
        Ok(raft)
    }

    /// This node's id ([`Config::id`]).
    pub fn id(&self) -> NodeId {
        self.id
    }
    /// The current term: the highest this node has seen. Only grows.
    pub fn term(&self) -> Term {
        self.term
    }
    /// The role this node plays in its current term.
    pub fn role(&self) -> Role {
        self.role
    }
    /// The leader this node knows of in its current term.
    pub fn leader(&self) -> Option<NodeId> {
        self.leader
    }
    /// The highest index this node knows to be committed: stored on a quorum and never
    /// to be overwritten. Only grows.
    pub fn commit_index(&self) -> Index {
        self.log.committed
    }
    /// The index of the last entry in this node's log, durable or not (the snapshot's index
    /// if the log is empty after it).
    pub fn last_index(&self) -> Index {
        self.log.last_index()
    }
    /// The highest index the application reported applied ([`Raft::advance_applied`]).
    pub fn applied(&self) -> Index {
        self.log.applied
    }
    /// The last index of this node's log known to be durable on its own disk.
    pub fn persisted_index(&self) -> Index {
        self.log.persisted
    }
    /// The term, vote and commit index as they stand now, durable or not yet.
    pub fn hard_state(&self) -> HardState {
        HardState {
            term: self.term,
            vote: self.vote,
            commit: self.log.committed,
        }
    }
    /// The role, known leader and term as they stand now.
    pub fn soft_state(&self) -> SoftState {
        SoftState {
            role: self.role,
            leader: self.leader,
            term: self.term,
        }
    }
    /// The configuration in force: the latest in this node's log, committed or not.
    pub fn membership(&self) -> &Membership {
        self.log.configs.latest()
    }
    /// The voters of the configuration in force (C_new while joint).
    pub fn voters(&self) -> &[NodeId] {
        self.membership().voters()
    }
    /// The index of the latest configuration entry (the snapshot point if none follows):
    /// while it is above the commit index, a change is pending and another is refused.
    pub fn conf_index(&self) -> Index {
        self.log.configs.latest_index()
    }
    /// The configuration in force at `index`, for the snapshot taken there; `None` if the
    /// log no longer (or not yet) reaches it.
    pub fn membership_at(&self, index: Index) -> Option<&Membership> {
        (index >= self.log.snapshot_index() && index <= self.log.last_index())
            .then(|| self.log.configs.at(index))
    }
    /// Leader only: how many entries member `id` lacks of this leader's log — ask before
    /// promoting a learner, to promote only one that has caught up.
    pub fn lag(&self, id: NodeId) -> Option<u64> {
        let pr = self.progress.get(&id)?;
        Some(self.log.last_index().saturating_sub(pr.match_index))
    }
    /// The term of the entry at `index`, if this node still holds it.
    pub fn term_at(&self, index: Index) -> Option<Term> {
        self.log.term(index)
    }
    /// Leader only: (match index, next index) per member, learners included.
    pub fn progress(&self) -> Vec<(NodeId, Index, Index)> {
        self.progress
            .iter()
            .map(|(&id, p)| (id, p.match_index, p.next_index))
            .collect()
    }

    /// Messages refused at the entry (strangers, broken rules) since this core started.
    pub fn refused_messages(&self) -> u64 {
        self.refused_messages
    }

    /// Advance logical time by one tick.
    pub fn tick(&mut self) {
        self.ticks += 1;
        match self.role {
            Role::Leader => self.tick_leader(),
            _ => self.tick_election(),
        }
    }

    /// Propose a command. Only the leader accepts; returns the index it will occupy.
    pub fn propose(&mut self, data: Bytes) -> Result<Index> {
        self.propose_entry(EntryKind::Normal, data)
    }

    /// Propose a command wherever this node stands: the leader appends it; a follower that
    /// knows its leader forwards it there (batched with other forwarded commands into one
    /// message per `ready`). A forwarded command has no index yet; the application learns
    /// of it when it commits, like any entry, and must recognise it by its content.
    pub fn propose_or_forward(&mut self, data: Bytes) -> Result<Proposal> {
        match (self.role, self.leader) {
            (Role::Leader, _) => self.propose(data).map(Proposal::Appended),
            (Role::Follower, Some(leader)) => {
                self.forward(leader, data);
                Ok(Proposal::Forwarded(leader))
            }
            _ => Err(Error::NoLeader),
        }
    }

    /// Add `data` to the `Propose` message for `leader` queued in this batch, or start one
    /// when there is none or it is full (`max_size_per_msg`). O(1) per command: the open
    /// message is remembered by position, not searched for.
    fn forward(&mut self, leader: NodeId, data: Bytes) {
        let (term, limit, len) = (self.term, self.cfg.max_size_per_msg, data.len() as u64);
        if let Some((at, bytes)) = self.open_propose {
            let m = self
                .msgs
                .get_mut(at)
                .expect("open_propose points into msgs");
            if let Body::Propose { data: batch } = &mut m.body {
                if m.to == leader && m.term == term && bytes + len <= limit {
                    batch.push(data);
                    self.open_propose = Some((at, bytes + len));
                    return;
                }
            }
        }
        self.open_propose = Some((self.msgs.len(), len));
        self.send(leader, term, Body::Propose { data: vec![data] });
    }

    pub(crate) fn propose_entry(&mut self, kind: EntryKind, data: Bytes) -> Result<Index> {
        if self.role != Role::Leader {
            return Err(Error::NotLeader {
                leader: self.leader,
            });
        }
        if let Some(to) = self.lead_transferee {
            return Err(Error::TransferInProgress { to });
        }
        let entry = Entry {
            term: self.term,
            index: self.log.last_index() + 1,
            kind,
            data,
        };
        let size = entry.size();
        // An empty tail always admits one entry, so a single huge command is not starved.
        if self.uncommitted_bytes > 0
            && self.uncommitted_bytes + size > self.cfg.max_uncommitted_bytes
        {
            return Err(Error::ProposalDropped {
                reason: "too many uncommitted bytes",
            });
        }
        self.uncommitted_bytes += size;
        let index = entry.index;
        self.log.append(&[entry]);
        self.bcast_pending = true;
        Ok(index)
    }

    /// Start an election now instead of waiting for the timeout (with PreVote, a
    /// pre-election first). A leader ignores it.
    pub fn campaign(&mut self) {
        if self.role == Role::Leader {
            return;
        }
        let kind = if self.cfg.pre_vote {
            crate::election::Campaign::PreElection
        } else {
            crate::election::Campaign::Election
        };
        self.campaign_now(kind);
    }

    /// Hand leadership to `to` (§3.10): once its log is caught up it is told to campaign at
    /// once. New proposals are refused until the transfer ends or an election timeout passes.
    pub fn transfer_leader(&mut self, to: NodeId) -> Result<()> {
        if self.role != Role::Leader {
            return Err(Error::NotLeader {
                leader: self.leader,
            });
        }
        if !self.membership().voters().contains(&to) {
            // A learner cannot lead: it may lack entries a quorum committed.
            return Err(Error::NotAVoter(to));
        }
        if to == self.id || self.lead_transferee == Some(to) {
            return Ok(());
        }
        self.lead_transferee = Some(to);
        self.election_elapsed = 0;
        let caught_up = self.progress[&to].match_index == self.log.last_index();
        if caught_up {
            self.send(to, self.term, Body::TimeoutNow);
        } else {
            self.maybe_send_append(to, true);
        }
        Ok(())
    }

    /// Tell the core that sending to `to` failed, so it stops streaming optimistically.
    pub fn report_unreachable(&mut self, to: NodeId) {
        if self.role == Role::Leader {
            if let Some(pr) = self.progress.get_mut(&to) {
                pr.become_probe();
            }
        }
    }

    /// The single entry point for messages from other nodes. Messages that are stale are
    /// dropped; those addressed elsewhere or breaking the protocol's rules are refused with
    /// an error and counted. None ever causes a panic.
    ///
    /// A message from a node outside this node's configuration is heard like any other: its
    /// sender may be the leader of a configuration this node has not yet received, or a
    /// candidate of one (it counts votes by its own configuration, not ours).
    pub fn step(&mut self, m: Message) -> Result<()> {
        if m.to != self.id {
            self.refused_messages += 1;
            return Err(Error::UnknownNode(m.to));
        }
        if let Err(e) = crate::validate::check(&m) {
            self.refused_messages += 1;
            return Err(e);
        }
        if m.term > self.term && !self.step_higher_term(&m) {
            return Ok(());
        }
        if m.term < self.term {
            self.step_lower_term(&m);
            return Ok(());
        }
        if let Body::Vote { .. } = m.body {
            self.handle_vote_request(m);
            return Ok(());
        }
        match self.role {
            Role::Leader => self.step_leader(m),
            Role::Candidate | Role::PreCandidate => self.step_candidate(m),
            Role::Follower => self.step_follower(m),
        }
        Ok(())
    }

    /// §5.1: a higher term means this node is out of date. Returns false if the message
    /// should be ignored instead.
    fn step_higher_term(&mut self, m: &Message) -> bool {
        match m.body {
            Body::Vote {
                pre_vote, transfer, ..
            } => {
                // CheckQuorum's lease: while we hear a leader, a vote request comes from a
                // node that lost touch, and must not disrupt the cluster.
                let in_lease = self.cfg.check_quorum
                    && self.leader.is_some()
                    && self.election_elapsed < self.cfg.election_tick;
                if in_lease && !transfer {
                    return false;
                }
                // A PreVote asks a hypothetical question and changes nothing.
                if !pre_vote {
                    self.become_follower(m.term, None);
                }
            }
            // A granted pre-vote carries the term we would campaign in, not a newer one.
            Body::VoteResponse {
                pre_vote: true,
                granted: true,
            } => {}
            Body::Append { .. }
            | Body::Heartbeat { .. }
            | Body::InstallSnapshot { .. }
            | Body::Commit { .. } => self.become_follower(m.term, Some(m.from)),
            _ => self.become_follower(m.term, None),
        }
        true
    }

    fn step_lower_term(&mut self, m: &Message) {
        match m.body {
            // A deposed leader that cannot reach us otherwise learns our term from this reply;
            // with PreVote or CheckQuorum it would never see a higher-term vote request.
            Body::Append { .. }
            | Body::Heartbeat { .. }
            | Body::InstallSnapshot { .. }
            | Body::Commit { .. }
                if self.cfg.check_quorum || self.cfg.pre_vote =>
            {
                let body = Body::AppendResponse {
                    reject: true,
                    index: 0,
                    hint: None,
                };
                self.send(m.from, self.term, body);
            }
            Body::Vote { pre_vote: true, .. } => {
                let body = Body::VoteResponse {
                    pre_vote: true,
                    granted: false,
                };
                self.send(m.from, self.term, body);
            }
            _ => {}
        }
    }

    fn step_follower(&mut self, m: Message) {
        match m.body {
            Body::Append { .. } | Body::Heartbeat { .. } | Body::InstallSnapshot { .. } => {
                self.election_elapsed = 0;
                self.leader = Some(m.from);
                self.handle_append_or_heartbeat(m);
            }
            // Only the leader of this term may hand leadership over.
            Body::TimeoutNow if self.leader == Some(m.from) => {
                self.campaign_now(crate::election::Campaign::Transfer)
            }
            Body::ReadIndexResponse { ctx, index } => {
                self.read_states.push(ReadState { ctx, index })
            }
            Body::Commit { commit } => {
                self.election_elapsed = 0;
                self.leader = Some(m.from);
                self.log.commit_to(commit.min(self.log.last_index()));
            }
            _ => {}
        }
    }

    fn step_candidate(&mut self, m: Message) {
        match m.body {
            // A leader exists in our term: it won (§5.2).
            Body::Append { .. }
            | Body::Heartbeat { .. }
            | Body::InstallSnapshot { .. }
            | Body::Commit { .. } => {
                self.become_follower(m.term, Some(m.from));
                self.step_follower(m);
            }
            Body::VoteResponse { pre_vote, granted } => {
                self.handle_vote_response(m.from, m.term, pre_vote, granted)
            }
            _ => {}
        }
    }

    fn step_leader(&mut self, m: Message) {
        match m.body {
            Body::AppendResponse {
                reject,
                index,
                hint,
            } => self.handle_append_response(m.from, reject, index, hint),
            Body::HeartbeatResponse { seq } => self.handle_heartbeat_response(m.from, seq),
            Body::SnapshotResponse {
                index,
                received,
                reject,
            } => self.handle_snapshot_response(m.from, index, received, reject),
            Body::ReadIndex { ctx } => {
                // A full queue drops the read; the follower's client times out and retries.
                let _ = self.leader_read(ctx, m.from);
            }
            Body::Propose { data } => {
                // A refused command (transfer in progress, too much uncommitted) is dropped
                // like a lost message; the follower's client times out.
                for d in data {
                    let _ = self.propose(d);
                }
            }
            _ => {}
        }
    }

    fn tick_election(&mut self) {
        self.election_elapsed += 1;
        if self.election_elapsed >= self.randomized_timeout {
            self.election_elapsed = 0;
            if self.may_campaign() {
                self.campaign();
            } else {
                // A learner (or a node outside the configuration) cannot campaign, but it
                // stops believing in a leader it no longer hears from: otherwise CheckQuorum's
                // lease would make it ignore the vote requests of whoever is to replace it.
                self.become_follower(self.term, None);
            }
        }
    }

    fn tick_leader(&mut self) {
        self.heartbeat_elapsed += 1;
        self.election_elapsed += 1;
        if self.election_elapsed >= self.cfg.election_tick {
            self.election_elapsed = 0;
            if self.cfg.check_quorum && !self.quorum_recently_active() {
                self.become_follower(self.term, None);
                return;
            }
            // A transfer that did not finish within an election timeout is abandoned.
            self.lead_transferee = None;
            // An auto-leave that could not be proposed at commit time (a transfer was in
            // progress, or too much was uncommitted) is tried again.
            self.maybe_auto_leave();
        }
        self.tick_snapshot_transfers();
        if self.heartbeat_elapsed >= self.cfg.heartbeat_tick {
            self.heartbeat_elapsed = 0;
            self.retransmit_stalled();
            self.bcast_heartbeat();
        }
    }

    /// CheckQuorum: did a quorum answer since the last check? Clears the marks.
    fn quorum_recently_active(&mut self) -> bool {
        let me = self.id;
        let active = self.membership().committed(|id| {
            let pr = self.progress.get(&id);
            u64::from(id == me || pr.is_some_and(|p| p.recent_active))
        });
        for pr in self.progress.values_mut() {
            pr.recent_active = false;
        }
        active == 1
    }

    pub(crate) fn become_follower(&mut self, term: Term, leader: Option<NodeId>) {
        if term > self.term {
            self.term = term;
            self.vote = None;
        }
        self.role = Role::Follower;
        self.leader = leader;
        self.reset_timers();
    }

    pub(crate) fn reset_timers(&mut self) {
        self.election_elapsed = 0;
        self.heartbeat_elapsed = 0;
        let t = self.cfg.election_tick;
        self.randomized_timeout = self.rng.range(t, 2 * t);
        self.votes.clear();
        self.lead_transferee = None;
        self.bcast_pending = false;
        self.progress.clear();
        self.reset_reads();
    }

    /// Queue a message; `term` is explicit because PreVote traffic uses a future term.
    pub(crate) fn send(&mut self, to: NodeId, term: Term, body: Body) {
        let needs_persist = match &body {
            // These promise something about durable state: a vote, matching entries, or our
            // term. They leave only once the Ready that produced them is persisted.
            Body::Vote { pre_vote, .. } | Body::VoteResponse { pre_vote, .. } => !pre_vote,
            Body::AppendResponse { .. } | Body::HeartbeatResponse { .. } => true,
            _ => false,
        };
        let m = Message {
            from: self.id,
            to,
            term,
            body,
        };
        if needs_persist {
            self.msgs_after_persist.push(m);
        } else {
            self.msgs.push(m);
        }
    }
}

/// Durable state must describe one contiguous log after the snapshot point.
fn check_restore(state: &RestoreState, cfg: &Config) -> Result<()> {
    let bad = |why: String| Err(Error::InvalidConfig(format!("durable state: {why}")));
    let (snapshot_index, snapshot_term) = state.snapshot_point();
    if let Some(s) = &state.snapshot {
        if let Err(e) = s.meta.membership.check() {
            return bad(format!("the snapshot's configuration: {e}"));
        }
    }
    let _ = cfg;
    for (i, e) in state.entries.iter().enumerate() {
        if e.kind == EntryKind::ConfChange {
            if let Err(err) = crate::confchange::ConfEntry::decode(&e.data) {
                return bad(format!("entry {}: {err}", e.index));
            }
        }
        let want = snapshot_index + 1 + i as Index;
        if e.index != want {
            return bad(format!(
                "entry at position {i} has index {}, expected {want}",
                e.index
            ));
        }
        let prev = if i == 0 {
            snapshot_term
        } else {
            state.entries[i - 1].term
        };
        if e.term < prev {
            return bad(format!(
                "entry {} has a lower term than its predecessor",
                e.index
            ));
        }
    }
    let last_term = state.entries.last().map_or(snapshot_term, |e| e.term);
    if last_term > state.hard_state.term {
        return bad(format!(
            "log holds term {last_term} beyond the hard state's term {}",
            state.hard_state.term
        ));
    }
    Ok(())
}
