//! Majority arithmetic: which index a quorum has reached, and how an election stands.

use crate::types::NodeId;
use std::collections::HashMap;

/// A set of voters, any majority of which is a quorum.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Majority {
    voters: Vec<NodeId>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum VoteResult {
    Won,
    Lost,
    Pending,
}

impl Majority {
    pub(crate) fn new(mut voters: Vec<NodeId>) -> Self {
        voters.sort_unstable();
        voters.dedup();
        Majority { voters }
    }

    pub(crate) fn voters(&self) -> &[NodeId] {
        &self.voters
    }

    pub(crate) fn contains(&self, id: NodeId) -> bool {
        self.voters.binary_search(&id).is_ok()
    }

    pub(crate) fn quorum(&self) -> usize {
        self.voters.len() / 2 + 1
    }

    /// The largest value that a quorum of voters has reached: the commit index when the
    /// values are match indexes, the confirmed heartbeat round when they are read acks.
    /// Voters with no value count as 0.
    pub(crate) fn committed(&self, value: impl Fn(NodeId) -> u64) -> u64 {
        // Small clusters dominate; avoid allocating for them.
        let mut stack = [0u64; 7];
        let mut heap;
        let values: &mut [u64] = if self.voters.len() <= stack.len() {
            &mut stack[..self.voters.len()]
        } else {
            heap = vec![0; self.voters.len()];
            &mut heap
        };
        for (slot, &id) in values.iter_mut().zip(&self.voters) {
            *slot = value(id);
        }
        values.sort_unstable_by(|a, b| b.cmp(a));
        values[self.quorum() - 1]
    }

    pub(crate) fn vote_result(&self, votes: &HashMap<NodeId, bool>) -> VoteResult {
        let (mut granted, mut missing) = (0, 0);
        for id in &self.voters {
            match votes.get(id) {
                Some(true) => granted += 1,
                Some(false) => {}
                None => missing += 1,
            }
        }
        if granted >= self.quorum() {
            VoteResult::Won
        } else if granted + missing >= self.quorum() {
            VoteResult::Pending
        } else {
            VoteResult::Lost
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn committed_is_the_quorum_th_highest() {
        let m = Majority::new(vec![1, 2, 3, 4, 5]);
        let vals = [(1, 9), (2, 3), (3, 7), (4, 1), (5, 5)];
        let v = |id| vals.iter().find(|(i, _)| *i == id).unwrap().1;
        assert_eq!(m.committed(v), 5);
        let m = Majority::new(vec![1, 2, 3, 4]);
        assert_eq!(m.committed(v), 3);
        let big = Majority::new((1..=9).collect());
        assert_eq!(big.committed(|id| id * 10), 50);
    }

    #[test]
    fn vote_result_reports_pending_until_decided() {
        let m = Majority::new(vec![1, 2, 3]);
        let mut votes = HashMap::from([(1, true)]);
        assert_eq!(m.vote_result(&votes), VoteResult::Pending);
        votes.insert(2, false);
        assert_eq!(m.vote_result(&votes), VoteResult::Pending);
        votes.insert(3, false);
        assert_eq!(m.vote_result(&votes), VoteResult::Lost);
        votes.insert(3, true);
        assert_eq!(m.vote_result(&votes), VoteResult::Won);
    }
}
