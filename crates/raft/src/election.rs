//! Leader election (§5.2) with PreVote (dissertation §9.6) and the up-to-date check (§5.4.1).

use crate::message::Body;
use crate::progress::Progress;
use crate::quorum::VoteResult;
use crate::raft::Raft;
use crate::types::{EntryKind, NodeId, Role, Term};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Campaign {
    /// Ask whether we could win before raising the term.
    PreElection,
    Election,
    /// Ordered by the leader (TimeoutNow): voters must answer even while they hear a leader.
    Transfer,
}

impl Raft {
    pub(crate) fn campaign_now(&mut self, kind: Campaign) {
        if !self.may_campaign() {
            return;
        }
        let term = if kind == Campaign::PreElection {
            self.become_pre_candidate();
            self.term + 1
        } else {
            self.become_candidate();
            self.term
        };
        let pre_vote = kind == Campaign::PreElection;
        if self.record_vote(self.id, true) == VoteResult::Won {
            self.on_election_won(pre_vote);
            return;
        }
        let (last_index, last_term) = (self.log.last_index(), self.log.last_term());
        let voters = self.membership().all_voters();
        let me = self.id;
        for to in voters.into_iter().filter(|&id| id != me) {
            let body = Body::Vote {
                pre_vote,
                transfer: kind == Campaign::Transfer,
                last_index,
                last_term,
            };
            self.send(to, term, body);
        }
    }

    /// A voter of the latest configuration campaigns. So does a node that the latest
    /// configuration removes while that change is not known to be committed, if it votes in
    /// the committed one (dissertation §4.2.2): until C_new commits it may be needed — e.g.
    /// it holds the only copy of C_new besides the voters C_new keeps — and it cannot count
    /// its own vote, since candidates count by their latest configuration. Learners, nodes
    /// whose removal is committed and nodes that have not yet learned a configuration never
    /// campaign.
    pub(crate) fn may_campaign(&self) -> bool {
        let (configs, committed) = (&self.log.configs, self.log.committed);
        configs.latest().is_voter(self.id)
            || (configs.latest_index() > committed && configs.at(committed).is_voter(self.id))
    }

    fn on_election_won(&mut self, pre_vote: bool) {
        if pre_vote {
            self.campaign_now(Campaign::Election);
        } else {
            self.become_leader();
        }
    }

    fn record_vote(&mut self, from: NodeId, granted: bool) -> VoteResult {
        self.votes.entry(from).or_insert(granted);
        self.membership().vote_result(&self.votes)
    }

    pub(crate) fn handle_vote_request(&mut self, m: crate::message::Message) {
        let Body::Vote {
            pre_vote,
            last_index,
            last_term,
            ..
        } = m.body
        else {
            return;
        };
        // One vote per term (§5.2): repeat a vote already given, or give one if we have
        // neither voted nor heard a leader this term. A PreVote for a later term is only a
        // question, so it may be granted whatever we did in ours.
        let can_vote = self.vote == Some(m.from)
            || (self.vote.is_none() && self.leader.is_none())
            || (pre_vote && m.term > self.term);
        let granted = can_vote && self.log.is_up_to_date(last_index, last_term);
        let reply_term = if granted { m.term } else { self.term };
        if granted && !pre_vote {
            self.vote = Some(m.from);
            self.election_elapsed = 0;
        }
        self.send(m.from, reply_term, Body::VoteResponse { pre_vote, granted });
    }

    pub(crate) fn handle_vote_response(
        &mut self,
        from: NodeId,
        term: Term,
        pre_vote: bool,
        granted: bool,
    ) {
        let expected = if self.role == Role::PreCandidate {
            // Granted pre-votes carry the term we would campaign in.
            pre_vote && (!granted || term == self.term + 1)
        } else {
            !pre_vote
        };
        if !expected {
            return;
        }
        match self.record_vote(from, granted) {
            VoteResult::Won => self.on_election_won(pre_vote),
            VoteResult::Lost => self.become_follower(self.term, None),
            VoteResult::Pending => {}
        }
    }

    fn become_pre_candidate(&mut self) {
        // The term and vote stay: a pre-election changes no durable state.
        let term = self.term;
        self.become_follower(term, None);
        self.role = Role::PreCandidate;
    }

    fn become_candidate(&mut self) {
        let term = self.term + 1;
        self.become_follower(term, None);
        self.role = Role::Candidate;
        self.vote = Some(self.id);
    }

    pub(crate) fn become_leader(&mut self) {
        let term = self.term;
        self.become_follower(term, Some(self.id));
        self.role = Role::Leader;
        let next = self.log.last_index() + 1;
        let (msgs, bytes) = (self.cfg.max_inflight_msgs, self.cfg.max_inflight_bytes);
        let members: Vec<NodeId> = self.membership().ids().collect();
        for id in members {
            let mut pr = Progress::new(next, msgs, bytes);
            // A fresh leader gives every follower one election timeout before CheckQuorum.
            pr.recent_active = true;
            if id == self.id {
                pr.match_index = self.log.persisted;
            }
            self.progress.insert(id, pr);
        }
        self.uncommitted_bytes = 0;
        // §8: an entry of the new term commits everything before it and tells the leader
        // its commit index, which reads depend on.
        self.propose_entry(EntryKind::Noop, Default::default())
            .expect("a new leader accepts its own no-op");
    }

    /// Leader: every other node it replicates to (voters and learners of the configurations
    /// in force, and removed nodes not yet told of their removal).
    pub(crate) fn peers(&self) -> impl Iterator<Item = NodeId> + '_ {
        let me = self.id;
        self.progress.keys().copied().filter(move |&id| id != me)
    }
}
