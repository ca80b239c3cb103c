//! A cluster configuration (§6): who votes, who only learns, and — while a joint
//! configuration C_old,new is in force — the outgoing voters whose majority is needed too.
//!
//! Invariants (checked by [`Membership::from_parts`], kept by `confchange::apply`):
//! - no id is 0; the four sets are sorted without duplicates;
//! - a voter (incoming) is never a learner; an outgoing voter is never a learner either —
//!   one that is to become a learner when the joint configuration is left waits in
//!   `learners_next`, which holds only outgoing voters;
//! - outside a joint configuration `outgoing` and `learners_next` are empty and
//!   `auto_leave` is false.

use crate::error::{Error, Result};
use crate::quorum::{joint, VoteResult};
use crate::types::NodeId;
use std::collections::HashMap;
use std::sync::Arc;

/// A cluster configuration: the voters, the learners and, while a joint configuration is in
/// force, the outgoing voters. Every node takes the latest one in its log as its own, even
/// uncommitted (§6).
///
/// Shared and immutable once built (clones are a reference count: every configuration
/// entry, snapshot chunk and Ready carries one), and one word wide, so that messages and
/// snapshot metadata that hold one stay small.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct Membership(Arc<Parts>);

#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
struct Parts {
    voters: Vec<NodeId>,
    outgoing: Vec<NodeId>,
    learners: Vec<NodeId>,
    learners_next: Vec<NodeId>,
    auto_leave: bool,
}

fn sorted(mut ids: Vec<NodeId>) -> Vec<NodeId> {
    ids.sort_unstable();
    ids.dedup();
    ids
}

fn has(ids: &[NodeId], id: NodeId) -> bool {
    ids.binary_search(&id).is_ok()
}

impl Membership {
    /// A simple configuration of `voters` and no learners.
    pub fn new(voters: Vec<NodeId>) -> Self {
        Membership(Arc::new(Parts {
            voters: sorted(voters),
            ..Default::default()
        }))
    }

    /// A configuration from its parts, refused if it breaks an invariant (the wire and the
    /// disk use this, so a corrupt configuration never reaches the core).
    pub fn from_parts(
        voters: Vec<NodeId>,
        outgoing: Vec<NodeId>,
        learners: Vec<NodeId>,
        learners_next: Vec<NodeId>,
        auto_leave: bool,
    ) -> Result<Self> {
        let m = Membership(Arc::new(Parts {
            voters: sorted(voters),
            outgoing: sorted(outgoing),
            learners: sorted(learners),
            learners_next: sorted(learners_next),
            auto_leave,
        }));
        m.check()?;
        Ok(m)
    }

    pub(crate) fn check(&self) -> Result<()> {
        let bad = |why: &str| Err(Error::InvalidConfig(format!("membership: {why}")));
        if self.ids().any(|id| id == 0) {
            return bad("node id 0 is reserved");
        }
        if self.0.learners.iter().any(|&l| self.is_voter(l)) {
            return bad("a node is both a voter and a learner");
        }
        if self
            .0
            .learners_next
            .iter()
            .any(|&l| !has(&self.0.outgoing, l))
        {
            return bad("a node waits to become a learner but is not an outgoing voter");
        }
        if self
            .0
            .learners_next
            .iter()
            .any(|&l| has(&self.0.learners, l))
        {
            return bad("a node is a learner and waits to become one");
        }
        if !self.is_joint() && self.0.auto_leave {
            return bad("auto-leave is set outside a joint configuration");
        }
        Ok(())
    }

    /// The voters (C_new while joint).
    pub fn voters(&self) -> &[NodeId] {
        &self.0.voters
    }
    /// The outgoing voters (C_old), non-empty only while joint.
    pub fn outgoing(&self) -> &[NodeId] {
        &self.0.outgoing
    }
    /// The learners: members that receive the log but neither vote nor count toward any
    /// quorum, so that a new node can catch up before it is promoted.
    pub fn learners(&self) -> &[NodeId] {
        &self.0.learners
    }
    /// Outgoing voters that become learners when the joint configuration is left.
    pub fn learners_next(&self) -> &[NodeId] {
        &self.0.learners_next
    }
    /// The leader leaves this joint configuration on its own once it commits.
    pub fn auto_leave(&self) -> bool {
        self.0.auto_leave
    }
    /// C_old,new is in force: decisions need a majority of `outgoing` and of `voters`.
    pub fn is_joint(&self) -> bool {
        !self.0.outgoing.is_empty()
    }
    /// Votes in at least one of the configurations in force.
    pub fn is_voter(&self, id: NodeId) -> bool {
        has(&self.0.voters, id) || has(&self.0.outgoing, id)
    }
    /// Replicated to without voting, now or once the joint configuration is left (an
    /// outgoing voter in `learners_next` still votes in C_old until then).
    pub fn is_learner(&self, id: NodeId) -> bool {
        has(&self.0.learners, id) || has(&self.0.learners_next, id)
    }
    /// Any role at all: the leader replicates to every member.
    pub fn contains(&self, id: NodeId) -> bool {
        self.is_voter(id) || has(&self.0.learners, id)
    }
    /// Every member, each once, in ascending order.
    pub fn ids(&self) -> impl Iterator<Item = NodeId> + '_ {
        let mut all: Vec<NodeId> = self
            .0
            .voters
            .iter()
            .chain(&self.0.outgoing)
            .chain(&self.0.learners)
            .copied()
            .collect();
        all.sort_unstable();
        all.dedup();
        all.into_iter()
    }
    /// Every voter of either configuration in force, each once.
    pub(crate) fn all_voters(&self) -> Vec<NodeId> {
        sorted(
            self.0
                .voters
                .iter()
                .chain(&self.0.outgoing)
                .copied()
                .collect(),
        )
    }

    /// The largest value a quorum of every configuration in force has reached.
    pub(crate) fn committed(&self, value: impl Fn(NodeId) -> u64) -> u64 {
        joint::committed(&self.0.voters, &self.0.outgoing, value)
    }

    /// How an election stands: it needs a majority of every configuration in force, counted
    /// by this (the candidate's) configuration — answers from non-voters count for nothing.
    pub(crate) fn vote_result(&self, votes: &HashMap<NodeId, bool>) -> VoteResult {
        if self.0.voters.is_empty() {
            return VoteResult::Lost; // no configuration: nobody can be elected
        }
        joint::vote_result(&self.0.voters, &self.0.outgoing, votes)
    }

    pub(crate) fn parts_mut(
        &mut self,
    ) -> (
        &mut Vec<NodeId>,
        &mut Vec<NodeId>,
        &mut Vec<NodeId>,
        &mut Vec<NodeId>,
        &mut bool,
    ) {
        let p = Arc::make_mut(&mut self.0);
        (
            &mut p.voters,
            &mut p.outgoing,
            &mut p.learners,
            &mut p.learners_next,
            &mut p.auto_leave,
        )
    }
}

impl Membership {
    /// The binary form shared by configuration entries and snapshot metadata
    /// (little-endian): four id lists, each a count u32 and the ids u64 — voters, outgoing,
    /// learners, learners_next — then auto_leave u8.
    pub fn encode_into(&self, out: &mut Vec<u8>) {
        for ids in [
            self.voters(),
            self.outgoing(),
            self.learners(),
            self.learners_next(),
        ] {
            out.extend_from_slice(&(ids.len() as u32).to_le_bytes());
            for id in ids {
                out.extend_from_slice(&id.to_le_bytes());
            }
        }
        out.push(u8::from(self.auto_leave()));
    }

    /// The inverse of `encode_into` over all of `data`; refuses anything else — trailing
    /// bytes, unsorted lists, a configuration that breaks the invariants.
    pub fn decode(data: &[u8]) -> Result<Membership> {
        let bad = |why: &str| Err(Error::InvalidConfig(format!("configuration: {why}")));
        let mut r = Reader(data);
        let mut lists = Vec::with_capacity(4);
        for _ in 0..4 {
            let n = r.len(8)?;
            let ids = (0..n).map(|_| r.u64()).collect::<Result<Vec<_>>>()?;
            if !ids.windows(2).all(|w| w[0] < w[1]) {
                return bad("member lists are not sorted sets");
            }
            lists.push(ids);
        }
        let auto_leave = match r.u8()? {
            0 => false,
            1 => true,
            _ => return bad("auto-leave is not a boolean"),
        };
        if !r.rest().is_empty() {
            return bad("trailing bytes");
        }
        let [voters, outgoing, learners, next]: [Vec<NodeId>; 4] =
            lists.try_into().expect("four lists");
        Membership::from_parts(voters, outgoing, learners, next, auto_leave)
    }
}

/// A cursor over bytes that refuses to read past their end.
pub(crate) struct Reader<'a>(pub(crate) &'a [u8]);

impl<'a> Reader<'a> {
    pub(crate) fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        if self.0.len() < n {
            return Err(Error::InvalidConfig("configuration: truncated".into()));
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Ok(head)
    }
    pub(crate) fn rest(&self) -> &'a [u8] {
        self.0
    }
    pub(crate) fn u8(&mut self) -> Result<u8> {
        Ok(self.take(1)?[0])
    }
    pub(crate) fn u64(&mut self) -> Result<u64> {
        Ok(u64::from_le_bytes(self.take(8)?.try_into().unwrap()))
    }
    /// A count of items of `item` bytes each, no more than the bytes left can hold (so a
    /// forged count never makes us allocate).
    pub(crate) fn len(&mut self, item: usize) -> Result<usize> {
        let n = u32::from_le_bytes(self.take(4)?.try_into().unwrap()) as usize;
        if n > self.0.len() / item {
            return Err(Error::InvalidConfig(
                "configuration: a count beyond its bytes".into(),
            ));
        }
        Ok(n)
    }
}

impl std::fmt::Display for Membership {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "voters {:?}", self.0.voters)?;
        if self.is_joint() {
            write!(f, " & {:?}", self.0.outgoing)?;
        }
        if !self.0.learners.is_empty() {
            write!(f, " learners {:?}", self.0.learners)?;
        }
        if !self.0.learners_next.is_empty() {
            write!(f, " next learners {:?}", self.0.learners_next)?;
        }
        if self.0.auto_leave {
            write!(f, " (auto-leave)")?;
        }
        Ok(())
    }
}
