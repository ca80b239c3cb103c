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
    /// The sender's id.
    pub from: NodeId,
    /// The receiver's id; [`crate::Raft::step`] refuses a message addressed to another node.
    pub to: NodeId,
    /// The sender's term (see above). A receiver with a lower term adopts it (§5.1), unless
    /// PreVote or CheckQuorum tell it to ignore the message; one with a higher term ignores
    /// the message or answers with its own term, so that a stale sender learns it.
    pub term: Term,
    /// What the message says.
    pub body: Body,
}

/// The rejection hint of fast backtracking: the follower's term at the probed index and the
/// first index it holds with that term, or (`None`, its last index + 1) if its log is shorter.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConflictHint {
    /// The term of the follower's entry at the probed index, or `None` if its log ends before
    /// that index.
    pub term: Option<Term>,
    /// The first index of the follower's log holding an entry of `term`, or, when `term` is
    /// `None`, the follower's last index + 1. The leader skips back past the whole
    /// conflicting term in one round trip instead of one index per rejection.
    pub first_index: Index,
}

/// The kinds of message and what each carries. Requests come from a leader, a candidate or
/// a follower forwarding work; each reply kind answers one request kind.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Body {
    /// AppendEntries (§5.3).
    Append {
        /// The index of the entry just before `entries` in the leader's log; the follower
        /// accepts only if it holds an entry there with `prev_term` (the consistency check).
        prev_index: Index,
        /// The term of the leader's entry at `prev_index` (0 when `prev_index` is 0).
        prev_term: Term,
        /// Entries from `prev_index + 1` on, consecutive; empty for a pure probe. A follower
        /// drops its own entries from the first one whose term differs, then appends these.
        entries: Vec<Entry>,
        /// The leader's commit index. The follower commits no further than the last entry
        /// this message shows it holds: anything after may still differ from the leader's.
        commit: Index,
    },
    /// Reply to `Append`. On success `index` is the last index now known to match the
    /// leader; on rejection it echoes the rejected `prev_index`.
    AppendResponse {
        /// The follower did not hold `prev_term` at `prev_index` (or, sent with index 0 by a
        /// node in a higher term, tells a stale leader that term).
        reject: bool,
        /// See the variant: the matched index on success, the rejected `prev_index` otherwise.
        index: Index,
        /// On rejection, where the follower's log diverges, for fast backtracking.
        hint: Option<ConflictHint>,
    },
    /// Leader liveness, commit propagation and ReadIndex confirmation: `seq` numbers the
    /// heartbeat round so a reply acknowledges every read queued before it.
    Heartbeat {
        /// The leader's commit index, capped at the follower's match index so that it never
        /// covers entries the follower may not hold.
        commit: Index,
        /// The heartbeat round; each leadership numbers its rounds 1, 2, 3… in the order sent.
        seq: u64,
    },
    /// Reply to `Heartbeat`: the follower still recognises this leader in this term.
    HeartbeatResponse {
        /// The round acknowledged; it confirms every read queued at or before that round.
        seq: u64,
    },
    /// RequestVote (§5.2) or, with `pre_vote`, PreVote (§9.6). `transfer` marks a campaign
    /// started by leadership transfer, which voters honour even while they hear a leader.
    Vote {
        /// A PreVote: asks whether the voter would grant, changes neither side's term or vote.
        pre_vote: bool,
        /// The campaign follows a `TimeoutNow` from the leader (leadership transfer).
        transfer: bool,
        /// The index of the candidate's last entry.
        last_index: Index,
        /// The term of the candidate's last entry. With `last_index`, it decides whether the
        /// candidate's log is at least as up to date as the voter's (§5.4.1), which is what
        /// guarantees a new leader holds every committed entry.
        last_term: Term,
    },
    /// Reply to `Vote`. A granted reply carries the term the vote was for; a refusal carries
    /// the voter's own term.
    VoteResponse {
        /// Answers a PreVote rather than a real vote.
        pre_vote: bool,
        /// The vote was given.
        granted: bool,
    },
    /// Leadership transfer: the target starts an election at once (§3.10).
    TimeoutNow,
    /// InstallSnapshot (§7), one chunk: `data` holds bytes `[offset, offset + data.len())` of
    /// a snapshot of `total` bytes.
    InstallSnapshot {
        /// What the whole snapshot covers: last included index and term, and configuration.
        meta: SnapshotMeta,
        /// Byte offset of this chunk within the serialized snapshot.
        offset: u64,
        /// Size of the whole serialized snapshot, in bytes.
        total: u64,
        /// This chunk's bytes (at most `snapshot_chunk_bytes` of the leader's config).
        data: Bytes,
    },
    /// A chunk arrived. `received` is how many leading bytes of snapshot `index` the
    /// follower holds; `reject` means the chunk did not follow them (one was lost) and the
    /// leader should resend from `received`. The installed snapshot is acknowledged with
    /// an `AppendResponse` for its index.
    SnapshotResponse {
        /// The index of the snapshot being received (its `meta.index`).
        index: Index,
        /// How many leading bytes of that snapshot the follower now holds.
        received: u64,
        /// The chunk was not contiguous with what the follower held.
        reject: bool,
    },
    /// A follower forwards a linearizable read to the leader.
    ReadIndex {
        /// The follower's id for the read, echoed in the answer.
        ctx: ReadCtx,
    },
    /// The leader's answer: the read is safe once the follower has applied `index`.
    ReadIndexResponse {
        /// The context of the `ReadIndex` answered.
        ctx: ReadCtx,
        /// The leader's commit index when the read arrived, confirmed by a quorum since.
        index: Index,
    },
    /// A follower forwards commands proposed to it; the leader appends them as its own.
    /// A node that is not (or no longer) the leader drops them: the proposer's client
    /// times out, as with any lost request.
    Propose {
        /// The commands, in the order they were proposed at the follower.
        data: Vec<Bytes>,
    },
    /// The commit index advanced and no append carried it to this follower. `commit` is at
    /// most the follower's match index, so it never covers entries the follower lacks. No
    /// reply: it exists so that a follower applies (and answers its forwarded writes and
    /// reads) without waiting for the next heartbeat.
    Commit {
        /// The leader's commit index, capped at the follower's match index.
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
