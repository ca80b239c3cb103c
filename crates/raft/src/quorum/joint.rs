//! Joint quorums (§6): while C_old,new is in force, an index is committed only once a
//! majority of C_old *and* a majority of C_new hold it, and an election is won only with a
//! majority of each. An empty outgoing set (the configuration is not joint) agrees with
//! everything, so the same code serves simple configurations.

use super::majority;
use super::VoteResult;
use crate::types::NodeId;
use std::collections::HashMap;

/// The largest value both majorities have reached.
pub(crate) fn committed(
    incoming: &[NodeId],
    outgoing: &[NodeId],
    value: impl Fn(NodeId) -> u64,
) -> u64 {
    majority::committed(incoming, &value).min(majority::committed(outgoing, &value))
}

/// Won only if both majorities are won; lost as soon as either is lost.
pub(crate) fn vote_result(
    incoming: &[NodeId],
    outgoing: &[NodeId],
    votes: &HashMap<NodeId, bool>,
) -> VoteResult {
    match (
        majority::vote_result(incoming, votes),
        majority::vote_result(outgoing, votes),
    ) {
        (VoteResult::Won, VoteResult::Won) => VoteResult::Won,
        (VoteResult::Lost, _) | (_, VoteResult::Lost) => VoteResult::Lost,
        _ => VoteResult::Pending,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_joint_commit_needs_both_majorities() {
        // C_old = {1,2,3}, C_new = {3,4,5}: 1,2 and 3 at 9; 4 and 5 behind.
        let vals = HashMap::from([(1, 9), (2, 9), (3, 9), (4, 2), (5, 5)]);
        let v = |id| vals[&id];
        assert_eq!(majority::committed(&[1, 2, 3], v), 9);
        assert_eq!(committed(&[3, 4, 5], &[1, 2, 3], v), 5);
        assert_eq!(committed(&[1, 2, 3], &[], v), 9, "not joint: one majority");
        // C_new = {3,4,5} all at 9, C_old's majority only at 1: the old majority holds back.
        let vals = HashMap::from([(1, 1), (2, 1), (3, 9), (4, 9), (5, 9)]);
        let v = |id| vals[&id];
        assert_eq!(committed(&[3, 4, 5], &[1, 2, 3], v), 1);
    }

    #[test]
    fn a_joint_election_needs_both_majorities() {
        let (new, old) = ([3, 4, 5], [1, 2, 3]);
        // C_new won alone is not enough.
        let only_new = HashMap::from([(3, true), (4, true), (5, true)]);
        assert_eq!(vote_result(&new, &old, &only_new), VoteResult::Pending);
        let mut votes = HashMap::from([(1, true), (2, true)]);
        assert_eq!(vote_result(&new, &old, &votes), VoteResult::Pending);
        votes.insert(4, true);
        assert_eq!(vote_result(&new, &old, &votes), VoteResult::Pending);
        votes.insert(5, false);
        votes.insert(3, false);
        assert_eq!(vote_result(&new, &old, &votes), VoteResult::Lost);
        votes.insert(3, true); // entry() keeps the first answer in the core; here we overwrite
        assert_eq!(vote_result(&new, &old, &votes), VoteResult::Won);
        assert_eq!(vote_result(&[1, 2, 3], &[], &votes), VoteResult::Won);
    }
}
