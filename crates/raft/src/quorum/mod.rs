//! Quorum arithmetic, the two questions every decision of the core reduces to: which index
//! has a quorum reached (commit, read confirmation, CheckQuorum), and how does an election
//! stand. `majority` answers them for one set of voters; `joint` for the two sets in force
//! while a joint configuration (§6, C_old,new) is: a decision needs both majorities.

pub(crate) mod joint;
pub(crate) mod majority;

/// How an election stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum VoteResult {
    Won,
    Lost,
    Pending,
}
