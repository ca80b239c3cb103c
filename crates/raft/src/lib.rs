#![warn(missing_docs)]

//! # raft — a sans-IO Raft consensus core
//!
//! This crate implements Raft as the extended paper (Ongaro & Ousterhout) describes it,
//! plus PreVote, CheckQuorum, ReadIndex and lease reads, leadership transfer, pipelining
//! with flow control and batching. It does no IO: it has no threads, sockets, files or clock.
//! Time advances only through [`Raft::tick`] and randomness comes from [`Config::seed`], so
//! the same inputs always produce the same outputs — which is what lets `crates/sim` test
//! whole clusters deterministically.
//!
//! ```
//! use raft::{Config, Raft, RestoreState};
//!
//! // A single-node cluster elects itself and commits a proposal.
//! let mut node = Raft::new(Config::new(1, vec![1]), RestoreState::default()).unwrap();
//! let mut applied = Vec::new();
//! for _ in 0..30 {
//!     node.tick();
//!     if node.is_leader() {
//!         let _ = node.propose(b"x=1".to_vec().into());
//!     }
//!     while node.has_ready() {
//!         let rd = node.ready();
//!         // 1. send rd.messages; 2. persist rd.hard_state and rd.entries durably;
//!         // 3. send rd.persisted_messages; 4. apply rd.committed_entries.
//!         applied.extend(rd.committed_entries.iter().map(|e| e.data.clone()));
//!         node.advance(&rd);
//!     }
//! }
//! assert!(applied.iter().any(|d| &d[..] == b"x=1"));
//! ```

mod confchange;
mod config;
mod configs;
mod election;
mod error;
mod log;
mod membership;
mod message;
mod progress;
mod quorum;
mod raft;
mod read_only;
mod ready;
mod reconfigure;
mod replication;
mod rng;
mod snapshot;
mod types;
mod validate;

pub use confchange::{apply as apply_conf_change, Change, ConfChange, ConfEntry, Transition};
pub use config::{Config, ReadMode};
pub use error::{Error, Result};
pub use membership::Membership;
pub use message::{Body, ConflictHint, Message, ReadCtx, MESSAGE_HEADER_BYTES};
pub use progress::ProgressState;
pub use raft::{Proposal, Raft, RestoreState};
pub use read_only::ReadState;
pub use ready::Ready;
pub use types::{
    Entry, EntryKind, HardState, Index, NodeId, Role, Snapshot, SnapshotMeta, SoftState, Term,
    ENTRY_HEADER_BYTES,
};

impl Raft {
    /// Whether this node leads in its current term: the only node that accepts
    /// [`Raft::propose`] and confirms reads. Another node may already lead in a higher
    /// term that this one has not heard of yet.
    pub fn is_leader(&self) -> bool {
        self.role() == Role::Leader
    }
}
