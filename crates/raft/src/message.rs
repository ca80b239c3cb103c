//! Messages exchanged between nodes. The core never sends them itself: they leave through
//! [`crate::Ready`] and arrive through [`crate::Raft::step`].

use crate::types::{Entry, Index, NodeId, SnapshotMeta, Term, ENTRY_HEADER_BYTES};
use bytes::Bytes;

/// An opaque id the application attaches to a read so it can match the answer to a waiter.
pub type ReadCtx = u64;

/// A message between two nodes. `term` is the sender's current term, except for PreVote
/// traffic, where it is the term the pre-candidate would campaign in.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Message {
    pub from: NodeId,
    pub to: NodeId,
    pub term: Term,
    pub body: Body,
}

/// The rejection hint of fast backtracking: the follower's term at the probed index and the
/// first index it holds with that term, or (`None`, its last index + 1) if its log is shorter.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConflictHint {
    pub term: Option<Term>,
    pub first_index: Index,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Body {
    /// AppendEntries (§5.3).
    Append {
        prev_index: Index,
        prev_term: Term,
        entries: Vec<Entry>,
        commit: Index,
    },
    /// Reply to `Append`. On success `index` is the last index now known to match the
    /// leader; on rejection it echoes the rejected `prev_index`.
    AppendResponse {
        reject: bool,
        index: Index,
        hint: Option<ConflictHint>,
    },
    /// Leader liveness, commit propagation and ReadIndex confirmation: `seq` numbers the
    /// heartbeat round so a reply acknowledges every read queued before it.
    Heartbeat {
        commit: Index,
        seq: u64,
    },
    HeartbeatResponse {
        seq: u64,
    },
    /// RequestVote (§5.2) or, with `pre_vote`, PreVote (§9.6). `transfer` marks a campaign
    /// started by leadership transfer, which voters honour even while they hear a leader.
    Vote {
        pre_vote: bool,
        transfer: bool,
        last_index: Index,
        last_term: Term,
    },
    VoteResponse {
        pre_vote: bool,
        granted: bool,
    },
    /// Leadership transfer: the target starts an election at once (§3.10).
    TimeoutNow,
    /// InstallSnapshot (§7), one chunk: `data` holds bytes `[offset, offset + data.len())` of
    /// a snapshot of `total` bytes.
    InstallSnapshot {
        meta: SnapshotMeta,
        offset: u64,
        total: u64,
        data: Bytes,
    },
    /// A chunk arrived. `received` is how many leading bytes of snapshot `index` the
    /// follower holds; `reject` means the chunk did not follow them (one was lost) and the
    /// leader should resend from `received`. The installed snapshot is acknowledged with
    /// an `AppendResponse` for its index.
    SnapshotResponse {
        index: Index,
        received: u64,
        reject: bool,
    },
    /// A follower forwards a linearizable read to the leader.
    ReadIndex {
        ctx: ReadCtx,
    },
    /// The leader's answer: the read is safe once the follower has applied `index`.
    ReadIndexResponse {
        ctx: ReadCtx,
        index: Index,
    },
    /// A follower forwards commands proposed to it; the leader appends them as its own.
    /// A node that is not (or no longer) the leader drops them: the proposer's client
    /// times out, as with any lost request.
    Propose {
        data: Vec<Bytes>,
    },
    /// The commit index advanced and no append carried it to this follower. `commit` is at
    /// most the follower's match index, so it never covers entries the follower lacks. No
    /// reply: it exists so that a follower applies (and answers its forwarded writes and
    /// reads) without waiting for the next heartbeat.
    Commit {
        commit: Index,
    },
}

/// Approximate wire cost of a message's fixed part.
pub const MESSAGE_HEADER_BYTES: u64 = 48;

impl Message {
    /// Approximate encoded size; what the simulator's byte counters and tests measure.
    pub fn size(&self) -> u64 {
        let payload: u64 = match &self.body {
            Body::Append { entries, .. } => entries.iter().map(|e| e.size()).sum(),
            Body::InstallSnapshot { meta, data, .. } => {
                data.len() as u64 + 8 * meta.membership.ids().count() as u64
            }
            Body::Propose { data } => data.iter().map(|d| d.len() as u64 + 8).sum(),
            _ => 0,
        };
        MESSAGE_HEADER_BYTES + payload
    }

    /// True for messages that ask something of the receiver (not replies).
    pub fn is_request(&self) -> bool {
        matches!(
            self.body,
            Body::Append { .. }
                | Body::Heartbeat { .. }
                | Body::Vote { .. }
                | Body::TimeoutNow
                | Body::InstallSnapshot { .. }
                | Body::ReadIndex { .. }
                | Body::Propose { .. }
                | Body::Commit { .. }
        )
    }
}

const _: () = assert!(ENTRY_HEADER_BYTES < MESSAGE_HEADER_BYTES);
