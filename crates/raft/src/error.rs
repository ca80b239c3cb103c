//! Errors: misuse of the API is reported, never a panic.

use crate::types::NodeId;
use std::fmt;

/// Why the core refused a call or a peer's message. A refusal is an answer, not a fault:
/// the node goes on, and the caller may retry (on another node, or later) or give up.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Error {
    /// Only the leader accepts proposals and transfers; `leader` is the hint, if known.
    NotLeader {
        /// The leader of this node's current term, if it knows one: where to retry.
        leader: Option<NodeId>,
    },
    /// No leader is known, so a forwarded request has nowhere to go.
    NoLeader,
    /// The leader is handing over leadership and refuses new proposals meanwhile.
    TransferInProgress {
        /// The voter that is to become leader.
        to: NodeId,
    },
    /// Accepting the proposal would exceed the bound on uncommitted bytes.
    ProposalDropped {
        /// Which bound was hit, for logs.
        reason: &'static str,
    },
    /// Too many reads are waiting for confirmation.
    ReadQueueFull,
    /// The node named is not a member of the cluster.
    UnknownNode(NodeId),
    /// A snapshot handed to `compact` does not fit the log; the string says why.
    InvalidSnapshot(String),
    /// The configuration is unusable; the string says why.
    InvalidConfig(String),
    /// A peer's message breaks the protocol's rules (see `validate.rs`); it was refused.
    InvalidMessage(&'static str),
    /// A configuration change was refused; the string says why (unsafe, or not now).
    ConfChangeRefused(String),
    /// The node named is not a voter (leadership cannot go to a learner).
    NotAVoter(NodeId),
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::NotLeader { leader: Some(id) } => write!(f, "not the leader (leader is {id})"),
            Error::NotLeader { leader: None } => write!(f, "not the leader (no leader known)"),
            Error::NoLeader => write!(f, "no leader"),
            Error::TransferInProgress { to } => {
                write!(f, "leadership transfer to {to} in progress")
            }
            Error::ProposalDropped { reason } => write!(f, "proposal dropped: {reason}"),
            Error::ReadQueueFull => write!(f, "too many pending reads"),
            Error::UnknownNode(id) => write!(f, "node {id} is not a member"),
            Error::InvalidSnapshot(why) => write!(f, "invalid snapshot: {why}"),
            Error::InvalidConfig(why) => write!(f, "invalid configuration: {why}"),
            Error::InvalidMessage(why) => write!(f, "invalid message refused: {why}"),
            Error::ConfChangeRefused(why) => write!(f, "configuration change refused: {why}"),
            Error::NotAVoter(id) => write!(f, "node {id} is not a voter"),
        }
    }
}

impl std::error::Error for Error {}

/// The result of a fallible call into the core.
pub type Result<T> = std::result::Result<T, Error>;
