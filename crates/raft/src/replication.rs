//! Log replication (§5.3): the leader's sending side with flow control and fast
//! backtracking, and the follower's consistency check.

use crate::log::AppendOutcome;
use crate::message::{Body, ConflictHint, Message};
use crate::progress::ProgressState;
use crate::raft::Raft;
use crate::types::{Index, NodeId};

impl Raft {
    /// Send `to` the entries it lacks, if its flow control allows. Returns whether a
    /// message was sent.
    pub(crate) fn maybe_send_append(&mut self, to: NodeId, send_if_empty: bool) -> bool {
        let max_msg = self.cfg.max_size_per_msg;
        let Some(pr) = self.progress.get(&to) else {
            return false;
        };
        if pr.state == ProgressState::Snapshot {
            return self.send_snapshot_chunks(to);
        }
        if pr.is_paused() {
            return false;
        }
        let prev_index = pr.next_index - 1;
        let Some(prev_term) = self.log.term(prev_index) else {
            // The entries it needs were compacted away: only the snapshot can help.
            return self.start_snapshot(to);
        };
        let max = match pr.state {
            ProgressState::Replicate => max_msg.min(pr.inflights.room()),
            ProgressState::Probe | ProgressState::Snapshot => max_msg,
        };
        let entries = self.log.entries_from(pr.next_index, max);
        if entries.is_empty() && !send_if_empty {
            return false;
        }
        let bytes = entries.iter().map(|e| e.size()).sum();
        let last = prev_index + entries.len() as Index;
        let pr = self.progress.get_mut(&to).unwrap();
        pr.sent(last, bytes);
        // The follower commits no further than what this append shows it.
        pr.commit_sent = pr.commit_sent.max(self.log.committed.min(last));
        let body = Body::Append {
            prev_index,
            prev_term,
            entries,
            commit: self.log.committed,
        };
        self.send(to, self.term, body);
        true
    }

    /// Send every follower what it lacks, filling each one's window.
    pub(crate) fn bcast_append(&mut self) {
        let peers: Vec<NodeId> = self.peers().collect();
        for to in peers {
            while self.maybe_send_append(to, false) {}
        }
    }

    /// Followers that have not heard the current commit index, as far as they hold the
    /// entries: (follower, the commit index to tell it).
    fn commit_news(&self) -> impl Iterator<Item = (NodeId, Index)> + '_ {
        let committed = self.log.committed;
        self.progress.iter().filter_map(move |(&id, pr)| {
            let commit = pr.match_index.min(committed);
            (id != self.id && commit > pr.commit_sent).then_some((id, commit))
        })
    }

    pub(crate) fn commit_unsent(&self) -> bool {
        self.commit_news().next().is_some()
    }

    /// Tell every follower that has not heard it the current commit index. Called once per
    /// `ready`, after that batch's appends went out, so it sends only where no append
    /// carried the news.
    pub(crate) fn bcast_commit(&mut self) {
        let news: Vec<(NodeId, Index)> = self.commit_news().collect();
        for (to, commit) in news {
            self.progress.get_mut(&to).unwrap().commit_sent = commit;
            self.send(to, self.term, Body::Commit { commit });
        }
    }

    /// One heartbeat round: liveness, commit propagation, and ReadIndex confirmation.
    pub(crate) fn bcast_heartbeat(&mut self) {
        let seq = self.read_only.start_round(self.ticks);
        let peers: Vec<NodeId> = self.peers().collect();
        for to in peers {
            // A follower may not hold entries past its match index yet.
            let pr = self.progress.get_mut(&to).unwrap();
            let commit = pr.match_index.min(self.log.committed);
            pr.commit_sent = pr.commit_sent.max(commit);
            self.send(to, self.term, Body::Heartbeat { commit, seq });
        }
        // A single-voter cluster confirms its reads alone.
        self.confirm_reads();
    }

    /// Appends in flight for a whole heartbeat interval with no acknowledgement were probably
    /// lost: fall back to probing so they are sent again.
    pub(crate) fn retransmit_stalled(&mut self) {
        for pr in self.progress.values_mut() {
            let stalled = pr.state == ProgressState::Replicate
                && !pr.inflights.is_empty()
                && !pr.acked_since_heartbeat;
            if stalled {
                pr.become_probe();
            }
            pr.acked_since_heartbeat = false;
        }
    }

    pub(crate) fn handle_append_response(
        &mut self,
        from: NodeId,
        reject: bool,
        index: Index,
        hint: Option<ConflictHint>,
    ) {
        let Some(pr) = self.progress.get_mut(&from) else {
            return;
        };
        pr.recent_active = true;
        if reject {
            let next = self.next_after_rejection(index, hint);
            let pr = self.progress.get_mut(&from).unwrap();
            if pr.maybe_decrease_to(index, next) {
                self.maybe_send_append(from, true);
            }
            return;
        }
        if index > self.log.last_index() {
            return; // claims entries we never sent: malformed
        }
        if pr.maybe_update(index) {
            match pr.state {
                ProgressState::Probe => pr.become_replicate(),
                ProgressState::Replicate => pr.inflights.free_to(index),
                // The snapshot is installed (or the follower turned out not to need it).
                ProgressState::Snapshot => {
                    if pr.snapshot.as_ref().is_none_or(|t| index >= t.index) {
                        pr.become_replicate();
                    }
                }
            }
            self.maybe_commit();
            if self.lead_transferee == Some(from) && index == self.log.last_index() {
                self.send(from, self.term, Body::TimeoutNow);
            }
        } else if pr.state == ProgressState::Replicate {
            pr.inflights.free_to(index);
        }
        while self.maybe_send_append(from, false) {}
    }

    /// Fast backtracking: skip a whole conflicting term per round trip.
    fn next_after_rejection(&self, rejected: Index, hint: Option<ConflictHint>) -> Index {
        let Some(hint) = hint else {
            return rejected;
        };
        let next = match hint.term {
            // If we hold the follower's conflicting term, our entries of that term agree
            // with its up to our last one of that term (log matching).
            Some(t) => self
                .log
                .last_index_of_term(t)
                .map_or(hint.first_index, |last| last + 1),
            None => hint.first_index,
        };
        next.min(rejected)
    }

    pub(crate) fn handle_heartbeat_response(&mut self, from: NodeId, seq: u64) {
        let last = self.log.last_index();
        let Some(pr) = self.progress.get_mut(&from) else {
            return;
        };
        pr.recent_active = true;
        pr.probe_sent = false;
        pr.read_ack = pr.read_ack.max(seq.min(self.read_only.round));
        match pr.state {
            // The follower is alive: probe again if it lacks entries.
            ProgressState::Probe if pr.match_index < last => {
                self.maybe_send_append(from, true);
            }
            // Entries already in flight need no resend; only unsent ones go.
            ProgressState::Replicate => while self.maybe_send_append(from, false) {},
            ProgressState::Probe | ProgressState::Snapshot => {}
        }
        self.confirm_reads();
    }

    /// Commit the highest index a quorum holds, if it is from this term (§5.4.2).
    pub(crate) fn maybe_commit(&mut self) -> bool {
        let old = self.log.committed;
        // A majority of every configuration in force (both while joint); learners and
        // nodes outside the configuration count for nothing.
        let candidate = self
            .membership()
            .committed(|id| self.progress.get(&id).map_or(0, |p| p.match_index));
        if !self.log.maybe_commit(candidate, self.term) {
            return false;
        }
        let freed = self.log.bytes_between(old, self.log.committed);
        self.uncommitted_bytes = self.uncommitted_bytes.saturating_sub(freed);
        self.release_waiting_reads();
        self.after_commit_reconfigure();
        true
    }

    /// Follower side of `Append` and `Heartbeat` from the current leader.
    pub(crate) fn handle_append_or_heartbeat(&mut self, m: Message) {
        match m.body {
            Body::Append {
                prev_index,
                prev_term,
                entries,
                commit,
            } => self.handle_append(m.from, prev_index, prev_term, &entries, commit),
            Body::Heartbeat { commit, seq } => {
                self.log.commit_to(commit.min(self.log.last_index()));
                self.send(m.from, self.term, Body::HeartbeatResponse { seq });
            }
            Body::InstallSnapshot {
                meta,
                offset,
                total,
                data,
            } => self.handle_install_snapshot(m.from, meta, offset, total, data),
            _ => {}
        }
    }

    fn handle_append(
        &mut self,
        from: NodeId,
        prev_index: Index,
        prev_term: u64,
        entries: &[crate::types::Entry],
        commit: Index,
    ) {
        let reply = |reject, index, hint| Body::AppendResponse {
            reject,
            index,
            hint,
        };
        if prev_index < self.log.committed {
            // Everything up to our commit index matches any leader's log; say so, and the
            // leader resumes from there.
            let committed = self.log.committed;
            self.send(from, self.term, reply(false, committed, None));
            return;
        }
        match self.log.try_append(prev_index, prev_term, entries) {
            AppendOutcome::Matched(last_new) => {
                // Only what the leader just showed us matches; anything after may not.
                self.log.commit_to(commit.min(last_new));
                self.send(from, self.term, reply(false, last_new, None));
            }
            AppendOutcome::Rejected(hint) => {
                self.send(from, self.term, reply(true, prev_index, Some(hint)));
            }
            AppendOutcome::Refused => {}
        }
    }
}
