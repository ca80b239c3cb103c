//! Node configuration. Every queue and buffer the core keeps is bounded by a field here.

use crate::error::{Error, Result};
use crate::types::{Index, NodeId};

/// How linearizable reads are confirmed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReadMode {
    /// ReadIndex: one heartbeat round to a quorum confirms leadership for each batch of reads.
    Safe,
    /// Lease reads: while a quorum acknowledged a heartbeat sent less than an election timeout
    /// ago, the leader answers from its commit index without a round trip. Correct only if
    /// clocks advance at the same rate on every node; requires `check_quorum`.
    LeaseBased,
}

/// Everything a node is told when it starts: who it is, the bootstrap voters, its timing in
/// ticks, which protocol extensions it runs and the bounds on its queues. Start from
/// [`Config::new`] and change fields as needed; [`crate::Raft::new`] checks the result
/// with [`Config::validate`].
#[derive(Clone, Debug)]
pub struct Config {
    /// This node's id.
    pub id: NodeId,
    /// The bootstrap configuration: the voters of a new cluster, in force until the first
    /// configuration entry. Used only when the node's storage holds no snapshot (a snapshot
    /// carries the configuration at its index). Empty for a node joining a running cluster:
    /// it learns its configuration from the leader's first entries or snapshot, and neither
    /// campaigns nor votes usefully until then.
    pub voters: Vec<NodeId>,
    /// Election timeout `T` in ticks; a follower's actual timeout is drawn from `[T, 2T)`.
    pub election_tick: u64,
    /// Heartbeat interval in ticks; must be well below `election_tick`.
    pub heartbeat_tick: u64,
    /// Seed for the timeout generator. Give each node a different seed.
    pub seed: u64,
    /// PreVote (§9.6): a node must learn it could win before it raises its term.
    pub pre_vote: bool,
    /// CheckQuorum: a leader that has not heard from a quorum within an election timeout
    /// steps down, and followers that hear a leader ignore vote requests for that long.
    pub check_quorum: bool,
    /// How [`crate::Raft::read_index`] confirms that this node still leads.
    pub read_mode: ReadMode,
    /// Lease reads end this many ticks before the lease nominally does, for clock drift.
    pub lease_margin_tick: u64,
    /// Largest `Append` the leader builds, in bytes (always at least one entry).
    pub max_size_per_msg: u64,
    /// Most `Append`s in flight to one follower in replicate state (pipelining window).
    pub max_inflight_msgs: usize,
    /// Most entry bytes in flight to one follower.
    pub max_inflight_bytes: u64,
    /// Bound on bytes the leader has appended but not yet committed; proposals beyond it
    /// are refused so a slow quorum cannot make the leader's memory grow without limit.
    pub max_uncommitted_bytes: u64,
    /// Bound on reads waiting for leadership confirmation.
    pub max_pending_reads: usize,
    /// Most bytes of committed entries handed out in one [`crate::Ready`].
    pub max_apply_bytes: u64,
    /// Size of one InstallSnapshot chunk.
    pub snapshot_chunk_bytes: u64,
    /// A snapshot transfer with no answer for this many ticks is abandoned; the leader
    /// probes again (and starts a fresh transfer if one is still needed).
    pub snapshot_timeout_tick: u64,
    /// Highest index the application has already applied (restart).
    pub applied: Index,
}

impl Config {
    /// A configuration with production defaults for node `id` of `voters`.
    pub fn new(id: NodeId, voters: Vec<NodeId>) -> Self {
        Config {
            id,
            voters,
            election_tick: 10,
            heartbeat_tick: 1,
            seed: id,
            pre_vote: true,
            check_quorum: true,
            read_mode: ReadMode::Safe,
            lease_margin_tick: 1,
            max_size_per_msg: 1 << 20,
            max_inflight_msgs: 256,
            max_inflight_bytes: 32 << 20,
            max_uncommitted_bytes: 64 << 20,
            max_pending_reads: 65_536,
            max_apply_bytes: 16 << 20,
            snapshot_chunk_bytes: 1 << 20,
            snapshot_timeout_tick: 30,
            applied: 0,
        }
    }

    /// Refuses a configuration that the protocol cannot run safely or at all: id 0,
    /// duplicate voters, a node missing from its own bootstrap voters, an election timeout
    /// not above the heartbeat interval, lease reads without CheckQuorum, a zero bound, and
    /// the like; the error says which.
    pub fn validate(&self) -> Result<()> {
        let bad = |why: &str| Err(Error::InvalidConfig(why.to_string()));
        if self.id == 0 {
            return bad("node id 0 is reserved");
        }
        if self.voters.contains(&0) {
            return bad("voter id 0 is reserved");
        }
        if !self.voters.is_empty() && !self.voters.contains(&self.id) {
            return bad("this node is not among the bootstrap voters (leave them empty to join)");
        }
        let mut sorted = self.voters.clone();
        sorted.sort_unstable();
        sorted.dedup();
        if sorted.len() != self.voters.len() {
            return bad("duplicate voter ids");
        }
        if self.heartbeat_tick == 0 {
            return bad("heartbeat_tick must be at least 1");
        }
        if self.election_tick <= self.heartbeat_tick {
            return bad("election_tick must be greater than heartbeat_tick");
        }
        if self.read_mode == ReadMode::LeaseBased && !self.check_quorum {
            return bad("lease-based reads require check_quorum");
        }
        if self.lease_margin_tick >= self.election_tick {
            return bad("lease_margin_tick must be below election_tick");
        }
        if self.max_inflight_msgs == 0 || self.max_inflight_bytes == 0 {
            return bad("the inflight window must allow at least one message");
        }
        if self.max_size_per_msg == 0 || self.max_apply_bytes == 0 {
            return bad("message and apply batch sizes must be positive");
        }
        if self.snapshot_chunk_bytes == 0 {
            return bad("snapshot_chunk_bytes must be positive");
        }
        if self.snapshot_timeout_tick <= self.heartbeat_tick {
            // A stalled transfer is resent every heartbeat interval before being abandoned.
            return bad("snapshot_timeout_tick must be greater than heartbeat_tick");
        }
        if self.max_uncommitted_bytes == 0 || self.max_pending_reads == 0 {
            return bad("bounds on uncommitted bytes and pending reads must be positive");
        }
        Ok(())
    }
}
