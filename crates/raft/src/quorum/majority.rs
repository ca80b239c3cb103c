//! Majority arithmetic over one set of voters (sorted, without duplicates).

use super::VoteResult;
use crate::types::NodeId;
use std::collections::HashMap;

fn quorum(voters: &[NodeId]) -> usize {
    voters.len() / 2 + 1
}

/// The largest value that a quorum of `voters` has reached: the commit index when the
/// values are match indexes, the confirmed heartbeat round when they are read acks.
/// An empty set is reached by everything (it places no constraint in a joint quorum).
pub(crate) fn committed(voters: &[NodeId], value: impl Fn(NodeId) -> u64) -> u64 {
    if voters.is_empty() {
        return u64::MAX;
    }
    // Small clusters dominate; avoid allocating for them.
    let mut stack = [0u64; 7];
    let mut heap;
    let values: &mut [u64] = if voters.len() <= stack.len() {
        &mut stack[..voters.len()]
    } else {
        heap = vec![0; voters.len()];
        &mut heap
    };
    for (slot, &id) in values.iter_mut().zip(voters) {
        *slot = value(id);
    }
    values.sort_unstable_by(|a, b| b.cmp(a));
    values[quorum(voters) - 1]
}

/// How an election stands with these voters. An empty set is won (no constraint).
pub(crate) fn vote_result(voters: &[NodeId], votes: &HashMap<NodeId, bool>) -> VoteResult {
    if voters.is_empty() {
        return VoteResult::Won;
    }
    let (mut granted, mut missing) = (0, 0);
    for id in voters {
        match votes.get(id) {
            Some(true) => granted += 1,
            Some(false) => {}
            None => missing += 1,
        }
    }
    if granted >= quorum(voters) {
        VoteResult::Won
    } else if granted + missing >= quorum(voters) {
        VoteResult::Pending
    } else {
        VoteResult::Lost
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn committed_is_the_quorum_th_highest() {
        let vals = [(1, 9), (2, 3), (3, 7), (4, 1), (5, 5)];
        let v = |id| vals.iter().find(|(i, _)| *i == id).unwrap().1;
        assert_eq!(committed(&[1, 2, 3, 4, 5], v), 5);
        assert_eq!(committed(&[1, 2, 3, 4], v), 3);
        let big: Vec<NodeId> = (1..=9).collect();
        assert_eq!(committed(&big, |id| id * 10), 50);
        assert_eq!(committed(&[], v), u64::MAX);
    }

    #[test]
    fn vote_result_reports_pending_until_decided() {
        let voters = [1, 2, 3];
        let mut votes = HashMap::from([(1, true)]);
        assert_eq!(vote_result(&voters, &votes), VoteResult::Pending);
        votes.insert(2, false);
        assert_eq!(vote_result(&voters, &votes), VoteResult::Pending);
        votes.insert(3, false);
        assert_eq!(vote_result(&voters, &votes), VoteResult::Lost);
        votes.insert(3, true);
        assert_eq!(vote_result(&voters, &votes), VoteResult::Won);
    }
}
