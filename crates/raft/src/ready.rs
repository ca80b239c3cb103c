//! The output side of the core: everything a step produced, handed to the application in
//! one batch, and the acknowledgements that close the loop.

use crate::membership::Membership;
use crate::message::Message;
use crate::raft::Raft;
use crate::read_only::ReadState;
use crate::types::{Entry, EntryKind, HardState, Index, Role, Snapshot, SoftState, Term};

/// Work for the application. Handle it in this order:
/// 1. send `messages` (they do not depend on this batch's durability, so the leader's
///    appends go out while its own disk write runs);
/// 2. persist `snapshot` if any — then discard stored entries up to its index, or all of
///    them if the stored entry at its index has another term (or is missing) — then
///    `hard_state` and `entries` (entries overwrite any stored entries at or after
///    `entries[0].index`), then call [`Raft::advance_persisted`] with [`Ready::persist_to`];
/// 3. only then send `persisted_messages`: votes and acknowledgements that promise durable
///    state. If batches are persisted asynchronously, persist them in order and release a
///    batch's `persisted_messages` only after it *and every earlier batch* is durable, even
///    when it has nothing of its own to write;
/// 4. restore the state machine from `snapshot` if any, apply `committed_entries` in order
///    (all of them follow the snapshot), and call [`Raft::advance_applied`] with
///    [`Ready::applied_to`];
/// 5. serve each of `read_states` once its index is applied.
#[derive(Debug, Default)]
pub struct Ready {
    /// The role, leader or term changed since the last `Ready`: the new values. Nothing to
    /// persist; for the application to notice leader changes.
    pub soft_state: Option<SoftState>,
    /// A snapshot received from the leader; it replaces the state machine.
    pub snapshot: Option<Snapshot>,
    /// The term, vote or commit index changed since the last `Ready`: persist the new value
    /// before sending `persisted_messages`.
    pub hard_state: Option<HardState>,
    /// New log entries to make durable, consecutive; the first may replace stored entries
    /// from its index on (a follower overwriting a deposed leader's uncommitted suffix).
    pub entries: Vec<Entry>,
    /// Messages that may leave at once, before this batch is durable, since they promise
    /// nothing about this node's disk: a leader's appends, heartbeats and snapshot chunks,
    /// PreVote traffic, forwarded proposals and reads, and the like.
    pub messages: Vec<Message>,
    /// Messages that may leave only once this batch (and every earlier one) is durable:
    /// vote requests and votes, which promise a persisted term and vote, and replies to
    /// appends and heartbeats, which promise persisted entries and term.
    pub persisted_messages: Vec<Message>,
    /// Entries now known committed and durable locally, in index order, for the
    /// application to apply; at most [`crate::Config::max_apply_bytes`] of them per batch
    /// (an entry larger than that comes alone); the rest come in later batches.
    pub committed_entries: Vec<Entry>,
    /// The configuration in force once `snapshot` and `committed_entries` are applied, if
    /// they change it. A node that finds itself outside it (`!contains(id)`) was removed
    /// from the cluster and may shut down.
    pub membership: Option<Membership>,
    /// Linearizable reads now confirmed: each may be served once the state machine has
    /// applied its index.
    pub read_states: Vec<ReadState>,
    /// The hard state's term or vote changed (not only its commit index).
    term_or_vote_changed: bool,
}

impl Ready {
    /// Whether anything must be written before `persisted_messages` may leave.
    pub fn must_persist(&self) -> bool {
        self.hard_state.is_some() || !self.entries.is_empty() || self.snapshot.is_some()
    }

    /// Whether the write must reach stable storage (fsync) before `persisted_messages`
    /// leave: entries, a snapshot, or a new term or vote. A hard state whose only change is
    /// the commit index may be written lazily — a restarted node learns the commit index
    /// again from the leader — which saves a second fsync per committed batch.
    pub fn must_sync(&self) -> bool {
        !self.entries.is_empty() || self.snapshot.is_some() || self.term_or_vote_changed
    }

    /// The (index, term) to pass to [`Raft::advance_persisted`] once `entries` are durable.
    pub fn persist_to(&self) -> Option<(Index, Term)> {
        self.entries.last().map(|e| (e.index, e.term))
    }

    /// Where the application stands once `committed_entries` are applied.
    pub fn applied_to(&self) -> Option<Index> {
        let entry = self.committed_entries.last().map(|e| e.index);
        entry.or(self.snapshot.as_ref().map(|s| s.meta.index))
    }

    /// Nothing to do at all: no state change, nothing to persist, send, apply or serve.
    pub fn is_empty(&self) -> bool {
        self.soft_state.is_none()
            && !self.must_persist()
            && self.messages.is_empty()
            && self.persisted_messages.is_empty()
            && self.committed_entries.is_empty()
            && self.read_states.is_empty()
    }
}

impl Raft {
    /// Whether [`Raft::ready`] would return anything.
    pub fn has_ready(&self) -> bool {
        self.soft_state() != self.prev_soft_state
            || self.hard_state() != self.prev_hard_state
            || self.log.has_unstable()
            || self.pending_snapshot.is_some()
            || !self.msgs.is_empty()
            || !self.msgs_after_persist.is_empty()
            || self.log.has_committed_to_apply()
            || !self.read_states.is_empty()
            || (self.role == Role::Leader
                && (self.bcast_pending || self.read_only.need_round || self.commit_unsent()))
    }

    /// Collect the work produced since the last call.
    pub fn ready(&mut self) -> Ready {
        self.flush_broadcasts();
        let soft = self.soft_state();
        let hard = self.hard_state();
        self.open_propose = None; // `msgs` is handed out below
        let snapshot = self.pending_snapshot.take();
        let committed_entries = self.log.take_committed(self.cfg.max_apply_bytes);
        let membership = self.applied_membership(snapshot.as_ref(), &committed_entries);
        let rd = Ready {
            soft_state: (soft != self.prev_soft_state).then_some(soft),
            snapshot,
            hard_state: (hard != self.prev_hard_state).then_some(hard),
            entries: self.log.take_unstable(),
            messages: std::mem::take(&mut self.msgs),
            persisted_messages: std::mem::take(&mut self.msgs_after_persist),
            committed_entries,
            membership,
            read_states: std::mem::take(&mut self.read_states),
            term_or_vote_changed: (hard.term, hard.vote)
                != (self.prev_hard_state.term, self.prev_hard_state.vote),
        };
        self.prev_soft_state = soft;
        self.prev_hard_state = hard;
        self.log.debug_assert_invariants();
        rd
    }

    /// The configuration a Ready's snapshot and committed entries leave in force, if they
    /// hold a configuration at all.
    fn applied_membership(&self, snap: Option<&Snapshot>, entries: &[Entry]) -> Option<Membership> {
        let conf = entries
            .iter()
            .rev()
            .find(|e| e.kind == EntryKind::ConfChange);
        let index = conf.map(|e| e.index).or(snap.map(|s| s.meta.index))?;
        Some(self.log.configs.at(index).clone())
    }

    /// Batched work for the leader: one append per follower for all proposals since the
    /// last `ready`, and one heartbeat round for all reads queued since then.
    fn flush_broadcasts(&mut self) {
        if self.role != Role::Leader {
            return;
        }
        if std::mem::take(&mut self.bcast_pending) {
            self.bcast_append();
        }
        self.bcast_commit();
        if self.read_only.need_round {
            self.bcast_heartbeat();
        }
        self.forget_removed_members();
    }

    /// Entries up to `index` (with `term`) are durable. An acknowledgement for entries that
    /// were overwritten meanwhile is ignored.
    pub fn advance_persisted(&mut self, index: Index, term: Term) {
        if !self.log.persisted_to(index, term) {
            return;
        }
        if self.role == Role::Leader {
            let persisted = self.log.persisted;
            if let Some(pr) = self.progress.get_mut(&self.id) {
                pr.match_index = pr.match_index.max(persisted);
            }
            self.maybe_commit();
        }
    }

    /// The application has applied entries up to `index`.
    pub fn advance_applied(&mut self, index: Index) {
        self.log.applied_to(index);
    }

    /// Acknowledge a whole `Ready` at once, for applications that persist and apply
    /// synchronously (the caller has already sent `persisted_messages` after persisting).
    pub fn advance(&mut self, rd: &Ready) {
        if let Some((index, term)) = rd.persist_to() {
            self.advance_persisted(index, term);
        }
        if let Some(index) = rd.applied_to() {
            self.advance_applied(index);
        }
    }
}

#[cfg(test)]
mod tests {
    use crate::{Config, Raft, RestoreState};

    #[test]
    fn only_entries_snapshots_terms_and_votes_need_an_fsync() {
        let mut r = Raft::new(Config::new(1, vec![1]), RestoreState::default()).unwrap();
        r.campaign();
        let rd = r.ready(); // new term, own vote, the no-op entry
        assert!(rd.must_sync());
        r.advance(&rd);
        // The no-op committed: the only change is the commit index.
        let rd = r.ready();
        assert!(rd.hard_state.is_some() && rd.entries.is_empty());
        assert!(rd.must_persist() && !rd.must_sync());
        r.advance(&rd);
        r.propose(b"x"[..].into()).unwrap();
        assert!(r.ready().must_sync(), "new entries must be synced");
    }
}
