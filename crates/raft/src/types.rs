//! The vocabulary of the paper: node ids, terms, log indexes, entries and hard state.

use crate::membership::Membership;
use bytes::Bytes;

/// A node's identity within one cluster. `0` is never a valid id ("nobody").
pub type NodeId = u64;
/// A term (§5.1). Terms only grow; term 0 is the state before any election.
pub type Term = u64;
/// A log index (§5.3). The first real entry has index 1; index 0 is the empty prefix.
pub type Index = u64;

/// What an entry carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum EntryKind {
    /// Application command: `data` is opaque to the core.
    Normal,
    /// Appended by every new leader when it takes office (§8): committing it commits every
    /// entry before it, and lets the leader learn the commit index before serving reads.
    Noop,
    /// A configuration change (§6): `data` is a [`crate::ConfEntry`], written by the core.
    /// It takes effect on each node as soon as it is in that node's log.
    ConfChange,
}

/// One log entry. Two entries with the same `index` and `term` hold the same command, and
/// the logs that contain them agree on every entry before (the Log Matching property, §5.3).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    /// The term of the leader that created the entry; never above the term of any later entry.
    pub term: Term,
    /// Position in the log, from 1, without gaps: entry `i + 1` follows entry `i`.
    pub index: Index,
    /// Whether the entry is an application command, a leader's no-op or a configuration change.
    pub kind: EntryKind,
    /// The payload: the application's command for [`EntryKind::Normal`], empty for a no-op,
    /// an encoded [`crate::ConfEntry`] for a configuration change.
    pub data: Bytes,
}

impl Entry {
    /// Bytes this entry contributes to a message: payload plus a fixed header, the figure
    /// flow control and batching limits are expressed in.
    pub fn size(&self) -> u64 {
        ENTRY_HEADER_BYTES + self.data.len() as u64
    }
}

/// Approximate wire cost of an entry's header (term, index, kind, length).
pub const ENTRY_HEADER_BYTES: u64 = 24;

/// State that must be durable before the node answers anyone (Figure 2, "persistent state").
///
/// `commit` is not required by the paper; keeping it lets a restarted node apply what it
/// knows was committed without waiting for a leader.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HardState {
    /// The latest term this node has seen (currentTerm). Persisting it keeps a restarted node
    /// from voting, or accepting a leader, in a term it has already left.
    pub term: Term,
    /// The candidate this node voted for in `term` (votedFor), if any. Persisted so a node
    /// never grants two votes in one term, which could elect two leaders.
    pub vote: Option<NodeId>,
    /// The highest index this node knows to be committed. Never decreases.
    pub commit: Index,
}

/// The role a node plays (Figure 4), plus PreVote's pre-candidate (dissertation §9.6).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Role {
    /// Passive: answers leaders and candidates, and campaigns when it has heard no leader
    /// for a randomized election timeout.
    Follower,
    /// Asks the voters whether they would vote for it in the next term, without raising its
    /// own term; becomes a candidate only if a quorum says yes.
    PreCandidate,
    /// Has raised its term, voted for itself and asks for votes; leads once a quorum grants.
    Candidate,
    /// Accepts proposals, replicates its log and decides the commit index. At most one node
    /// leads in a given term.
    Leader,
}

/// Volatile facts an embedding application may want to display or react to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SoftState {
    /// The role this node plays now.
    pub role: Role,
    /// The leader this node knows of in `term`, if any (itself when it leads).
    pub leader: Option<NodeId>,
    /// The node's current term.
    pub term: Term,
}

/// What a snapshot covers: every entry up to `index` (whose term was `term`), and the
/// configuration in force at that point (a node restarting from it, or joining with an
/// empty disk, learns its configuration here).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SnapshotMeta {
    /// The last log index the snapshot includes; the log resumes at `index + 1`.
    pub index: Index,
    /// The term of the entry at `index`, so the entry after the snapshot can still pass the
    /// consistency check of AppendEntries.
    pub term: Term,
    /// The configuration in force at `index`.
    pub membership: Membership,
}

/// A snapshot of the application's state machine (§7). `data` is opaque to the core; it is
/// reference-counted, so the application may back it with a memory map instead of the heap.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Snapshot {
    /// Which prefix of the log the snapshot replaces.
    pub meta: SnapshotMeta,
    /// The state machine's serialized state after applying every entry up to `meta.index`.
    pub data: Bytes,
}
