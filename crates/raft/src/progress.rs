//! The leader's view of each follower (Figure 2's nextIndex/matchIndex) and the flow control
//! built on it: probe one message at a time until the follower's log position is known, then
//! replicate optimistically with a bounded window of messages in flight.

use crate::types::Index;
use std::collections::VecDeque;

/// How the leader is replicating to one follower: the follower's position unknown, known,
/// or behind the leader's snapshot. A rejected append, an unreachable follower or appends
/// unacknowledged for a heartbeat interval fall back to `Probe`; an acknowledged append
/// moves to `Replicate`; a follower that needs compacted entries moves to `Snapshot`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProgressState {
    /// The follower's position is unknown: at most one `Append` in flight.
    Probe,
    /// The follower matches up to `match_index`: stream appends, bounded by `Inflights`.
    Replicate,
    /// The entries the follower needs were compacted: a snapshot is being sent in chunks.
    Snapshot,
}

/// A snapshot on its way to one follower. Chunks stream ahead of acknowledgements within a
/// window; a reported gap or a silent interval rewinds `sent` to what was acknowledged, so
/// only lost chunks are sent again.
#[derive(Clone, Debug)]
pub(crate) struct SnapshotTransfer {
    pub(crate) index: Index,
    pub(crate) total: u64,
    /// Bytes sent so far, and bytes the follower confirmed holding.
    pub(crate) sent: u64,
    pub(crate) acked: u64,
    /// The first (possibly empty) chunk went out; distinguishes an empty snapshot not yet
    /// sent from one fully sent.
    pub(crate) started: bool,
    /// Ticks since the follower last confirmed more bytes.
    pub(crate) idle_ticks: u64,
    pub(crate) last_rewind: Option<u64>,
}

impl SnapshotTransfer {
    /// Resend from byte `to` (which the follower holds everything before).
    pub(crate) fn rewind(&mut self, to: u64) {
        let to = to.min(self.total);
        self.acked = self.acked.max(to);
        if to < self.sent || self.total == 0 {
            self.sent = self.acked;
            self.started = self.sent > 0;
        }
        self.last_rewind = Some(to);
    }

    /// A reported gap: every chunk behind the lost one reports the same gap, so rewind only
    /// once per gap (the heartbeat retransmit covers a resent chunk that is lost again).
    pub(crate) fn rewind_once(&mut self, to: u64) {
        if self.last_rewind != Some(to) {
            self.rewind(to);
        }
    }
}

/// Appends sent but not yet acknowledged, oldest first: (last index in it, bytes).
/// Invariant: `len <= max_msgs` and `bytes <= max_bytes` (one oversized entry may exceed the
/// byte bound alone, so a huge entry can still be replicated).
#[derive(Clone, Debug)]
pub(crate) struct Inflights {
    queue: VecDeque<(Index, u64)>,
    bytes: u64,
    max_msgs: usize,
    max_bytes: u64,
}

impl Inflights {
    pub(crate) fn new(max_msgs: usize, max_bytes: u64) -> Self {
        Inflights {
            queue: VecDeque::new(),
            bytes: 0,
            max_msgs,
            max_bytes,
        }
    }

    pub(crate) fn full(&self) -> bool {
        self.queue.len() >= self.max_msgs || self.bytes >= self.max_bytes
    }

    /// Bytes that may still be sent before the window is full.
    pub(crate) fn room(&self) -> u64 {
        self.max_bytes.saturating_sub(self.bytes)
    }

    pub(crate) fn add(&mut self, last: Index, bytes: u64) {
        debug_assert!(!self.full());
        self.queue.push_back((last, bytes));
        self.bytes += bytes;
    }

    /// Release every message whose entries are all acknowledged (last index <= `index`).
    pub(crate) fn free_to(&mut self, index: Index) {
        while let Some(&(last, bytes)) = self.queue.front() {
            if last > index {
                break;
            }
            self.queue.pop_front();
            self.bytes -= bytes;
        }
    }

    pub(crate) fn reset(&mut self) {
        self.queue.clear();
        self.bytes = 0;
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.queue.is_empty()
    }
}

#[derive(Clone, Debug)]
pub(crate) struct Progress {
    pub(crate) match_index: Index,
    pub(crate) next_index: Index,
    pub(crate) state: ProgressState,
    /// In probe state: an append is outstanding; wait for a reply or the next heartbeat.
    pub(crate) probe_sent: bool,
    pub(crate) inflights: Inflights,
    /// Heard from since the last CheckQuorum round.
    pub(crate) recent_active: bool,
    /// An append was acknowledged since the last heartbeat; if not, and appends are in
    /// flight, the leader assumes they were lost and probes again.
    pub(crate) acked_since_heartbeat: bool,
    /// Highest heartbeat round this follower acknowledged (ReadIndex confirmation).
    pub(crate) read_ack: u64,
    /// In snapshot state: the transfer in progress.
    pub(crate) snapshot: Option<SnapshotTransfer>,
    /// The highest commit index sent to this follower (in an append, heartbeat or commit
    /// message), so that a commit advance reaches it once, not once per message.
    pub(crate) commit_sent: Index,
    /// Leader tick at which this node was found removed from the committed configuration
    /// (it is still told of its removal for a while; see `reconfigure.rs`).
    pub(crate) removed_at: Option<u64>,
}

impl Progress {
    pub(crate) fn new(next_index: Index, max_msgs: usize, max_bytes: u64) -> Self {
        Progress {
            match_index: 0,
            next_index,
            state: ProgressState::Probe,
            probe_sent: false,
            inflights: Inflights::new(max_msgs, max_bytes),
            recent_active: false,
            acked_since_heartbeat: true,
            read_ack: 0,
            snapshot: None,
            commit_sent: 0,
            removed_at: None,
        }
    }

    pub(crate) fn is_paused(&self) -> bool {
        match self.state {
            ProgressState::Probe => self.probe_sent,
            ProgressState::Replicate => self.inflights.full(),
            // Chunks are paced by `snapshot.rs`; appends wait for the transfer to end.
            ProgressState::Snapshot => true,
        }
    }

    pub(crate) fn become_probe(&mut self) {
        self.state = ProgressState::Probe;
        self.next_index = self.match_index + 1;
        self.probe_sent = false;
        self.inflights.reset();
        self.snapshot = None;
    }

    pub(crate) fn become_replicate(&mut self) {
        self.become_probe();
        self.state = ProgressState::Replicate;
    }

    pub(crate) fn become_snapshot(&mut self, index: Index, total: u64) {
        self.become_probe();
        self.state = ProgressState::Snapshot;
        self.snapshot = Some(SnapshotTransfer {
            index,
            total,
            sent: 0,
            acked: 0,
            started: false,
            idle_ticks: 0,
            last_rewind: None,
        });
    }

    /// Record that an append ending at `last` (carrying `bytes`) was sent.
    pub(crate) fn sent(&mut self, last: Index, bytes: u64) {
        match self.state {
            ProgressState::Probe => self.probe_sent = true,
            ProgressState::Replicate => {
                if last >= self.next_index {
                    self.next_index = last + 1;
                    self.inflights.add(last, bytes);
                }
            }
            ProgressState::Snapshot => {}
        }
    }

    /// A successful reply: the follower matches up to `index`. Returns whether it was news.
    pub(crate) fn maybe_update(&mut self, index: Index) -> bool {
        self.acked_since_heartbeat = true;
        let updated = index > self.match_index;
        if updated {
            self.match_index = index;
            self.probe_sent = false;
        }
        self.next_index = self.next_index.max(index + 1);
        updated
    }

    /// A rejection of the append whose `prev_index` was `rejected`. Returns false when the
    /// reply is stale (a duplicate or reordered answer that says nothing new).
    pub(crate) fn maybe_decrease_to(&mut self, rejected: Index, next: Index) -> bool {
        if rejected <= self.match_index {
            return false;
        }
        if self.state == ProgressState::Probe && rejected != self.next_index - 1 {
            return false;
        }
        if self.state == ProgressState::Snapshot {
            return false; // an answer to an append sent before the transfer began
        }
        self.become_probe();
        self.next_index = next.clamp(self.match_index + 1, rejected.max(self.match_index + 1));
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inflights_bound_count_and_bytes() {
        let mut w = Inflights::new(3, 100);
        w.add(1, 10);
        w.add(2, 10);
        assert!(!w.full());
        w.add(5, 90);
        assert!(w.full());
        w.free_to(2);
        assert!(!w.full());
        assert_eq!(w.room(), 10);
        w.free_to(5);
        assert!(w.is_empty());
    }

    #[test]
    fn stale_rejections_are_ignored() {
        let mut p = Progress::new(10, 4, 1000);
        p.match_index = 5;
        assert!(!p.maybe_decrease_to(5, 3), "already matched there");
        assert!(
            !p.maybe_decrease_to(7, 3),
            "probe only trusts the latest probe"
        );
        assert!(p.maybe_decrease_to(9, 3));
        assert_eq!(p.next_index, 6, "never below match + 1");
    }
}
