//! Linearizable reads without writing to the log (§8, dissertation §6.4).
//!
//! ReadIndex: the leader notes its commit index for each read, then numbers its next
//! heartbeat round; once a quorum acknowledges that round (or a later one) no other leader
//! can have been elected before the read arrived, so the read may be served as soon as the
//! application has applied the noted index. Reads queued before one round all share it.
//!
//! A new leader does not know the true commit index until an entry of its own term commits,
//! so reads that arrive earlier wait for its no-op to commit.

use crate::config::ReadMode;
use crate::error::{Error, Result};
use crate::message::{Body, ReadCtx};
use crate::raft::Raft;
use crate::types::{Index, NodeId, Role};
use std::collections::VecDeque;

/// A read that may now be served: once `index` is applied, read the state machine.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ReadState {
    /// The context the application passed to [`Raft::read_index`].
    pub ctx: ReadCtx,
    /// The read index: the leader's commit index when the read arrived. Serving the read
    /// from a state that has applied at least this far makes it linearizable.
    pub index: Index,
}

#[derive(Clone, Copy, Debug)]
struct PendingRead {
    ctx: ReadCtx,
    /// Who asked: this node, or a follower that forwarded the read.
    from: NodeId,
    index: Index,
    /// The heartbeat round whose acknowledgement by a quorum confirms this read.
    round: u64,
}

/// How many sent rounds to remember for the lease; older acknowledgements extend nothing.
const SENT_ROUNDS_KEPT: usize = 64;

#[derive(Debug, Default)]
pub(crate) struct ReadOnly {
    /// Reads waiting for the leader's first commit in its term; index not yet known.
    waiting_commit: VecDeque<(ReadCtx, NodeId)>,
    /// Reads waiting for a quorum to acknowledge their round; rounds are non-decreasing.
    pending: VecDeque<PendingRead>,
    /// The last heartbeat round sent.
    pub(crate) round: u64,
    /// A queued read needs a round newer than `round`.
    pub(crate) need_round: bool,
    /// (round, tick it was sent), for the lease.
    sent_at: VecDeque<(u64, u64)>,
    /// The highest round a quorum acknowledged.
    confirmed: u64,
}

impl ReadOnly {
    fn len(&self) -> usize {
        self.waiting_commit.len() + self.pending.len()
    }

    /// Start a new heartbeat round at `tick`; returns its number.
    pub(crate) fn start_round(&mut self, tick: u64) -> u64 {
        self.round += 1;
        self.need_round = false;
        if self.sent_at.len() == SENT_ROUNDS_KEPT {
            self.sent_at.pop_front();
        }
        self.sent_at.push_back((self.round, tick));
        self.round
    }

    fn add(&mut self, ctx: ReadCtx, from: NodeId, index: Index) {
        self.pending.push_back(PendingRead {
            ctx,
            from,
            index,
            round: self.round + 1,
        });
        self.need_round = true;
    }
}

impl Raft {
    /// Ask for a linearizable read. When it is safe, a [`ReadState`] with `ctx` appears in a
    /// later [`crate::Ready`]; serve it once the application has applied its index. On a
    /// follower the request is forwarded to the leader.
    pub fn read_index(&mut self, ctx: ReadCtx) -> Result<()> {
        if self.role == Role::Leader {
            return self.leader_read(ctx, self.id);
        }
        match self.leader {
            Some(leader) => {
                self.send(leader, self.term, Body::ReadIndex { ctx });
                Ok(())
            }
            None => Err(Error::NoLeader),
        }
    }

    pub(crate) fn leader_read(&mut self, ctx: ReadCtx, from: NodeId) -> Result<()> {
        if self.read_only.len() >= self.cfg.max_pending_reads {
            return Err(Error::ReadQueueFull);
        }
        if !self.committed_in_term() {
            self.read_only.waiting_commit.push_back((ctx, from));
            return Ok(());
        }
        let index = self.log.committed;
        if self.cfg.read_mode == ReadMode::LeaseBased && self.ticks < self.lease_until {
            self.release_read(ctx, from, index);
            return Ok(());
        }
        self.read_only.add(ctx, from, index);
        Ok(())
    }

    pub(crate) fn committed_in_term(&self) -> bool {
        self.log.term(self.log.committed) == Some(self.term)
    }

    /// The leader's first commit in its term fixes the index of reads that waited for it.
    pub(crate) fn release_waiting_reads(&mut self) {
        if !self.committed_in_term() {
            return;
        }
        let index = self.log.committed;
        while let Some((ctx, from)) = self.read_only.waiting_commit.pop_front() {
            self.read_only.add(ctx, from, index);
        }
    }

    /// Release every read whose round a quorum has acknowledged, and extend the lease.
    pub(crate) fn confirm_reads(&mut self) {
        let (me, round) = (self.id, self.read_only.round);
        let confirmed = self.membership().committed(|id| {
            if id == me {
                round
            } else {
                self.progress.get(&id).map_or(0, |p| p.read_ack)
            }
        });
        if confirmed <= self.read_only.confirmed {
            return;
        }
        self.read_only.confirmed = confirmed;
        self.extend_lease(confirmed);
        while let Some(read) = self.read_only.pending.front().copied() {
            if read.round > confirmed {
                break;
            }
            self.read_only.pending.pop_front();
            self.release_read(read.ctx, read.from, read.index);
        }
    }

    /// A quorum acknowledged round `confirmed`, sent at tick `s`: each of them ignores vote
    /// requests for an election timeout after hearing it, so no other leader can exist before
    /// `s + election_tick` (less a margin for clock drift).
    fn extend_lease(&mut self, confirmed: u64) {
        let sent = &mut self.read_only.sent_at;
        while sent.front().is_some_and(|&(r, _)| r < confirmed) {
            sent.pop_front();
        }
        if let Some(&(r, tick)) = sent.front() {
            if r == confirmed {
                let until = tick + self.cfg.election_tick - self.cfg.lease_margin_tick;
                self.lease_until = self.lease_until.max(until);
            }
        }
    }

    fn release_read(&mut self, ctx: ReadCtx, from: NodeId, index: Index) {
        if from == self.id {
            self.read_states.push(ReadState { ctx, index });
        } else {
            self.send(from, self.term, Body::ReadIndexResponse { ctx, index });
        }
    }

    /// Leadership is lost: pending reads can no longer be confirmed by this node.
    pub(crate) fn reset_reads(&mut self) {
        self.read_only = ReadOnly::default();
        self.lease_until = 0;
    }
}
