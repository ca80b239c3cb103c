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

/// One log entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    pub term: Term,
    pub index: Index,
    pub kind: EntryKind,
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
    pub term: Term,
    /// Candidate voted for in `term`, if any.
    pub vote: Option<NodeId>,
    pub commit: Index,
}

/// The role a node plays (Figure 4), plus PreVote's pre-candidate (dissertation §9.6).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Role {
    Follower,
    PreCandidate,
    Candidate,
    Leader,
}

/// Volatile facts an embedding application may want to display or react to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SoftState {
    pub role: Role,
    pub leader: Option<NodeId>,
    pub term: Term,
}

/// What a snapshot covers: every entry up to `index` (whose term was `term`), and the
/// configuration in force at that point (a node restarting from it, or joining with an
/// empty disk, learns its configuration here).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SnapshotMeta {
    pub index: Index,
    pub term: Term,
    pub membership: Membership,
}

/// A snapshot of the application's state machine (§7). `data` is opaque to the core; it is
/// reference-counted, so the application may back it with a memory map instead of the heap.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Snapshot {
    pub meta: SnapshotMeta,
    pub data: Bytes,
}
