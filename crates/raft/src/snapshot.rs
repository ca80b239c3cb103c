//! Log compaction (§7). The application snapshots its state machine at an applied index and
//! hands the snapshot in with [`Raft::compact`]; the core then forgets the entries it
//! covers. A follower that needs forgotten entries receives the snapshot instead, in
//! chunks: a window of chunks streams ahead of acknowledgements, a gap the follower reports
//! or a transfer that stops moving is resent from the last acknowledged byte, and a
//! transfer that gets no answer for `snapshot_timeout_tick` ticks is abandoned for a probe.

use crate::error::{Error, Result};
use crate::message::Body;
use crate::raft::Raft;
use crate::types::{Index, NodeId, Snapshot, SnapshotMeta};
use bytes::Bytes;
use std::collections::BTreeMap;

/// A snapshot arriving chunk by chunk on a follower. Chunks that arrive ahead of a gap are
/// kept (up to `max_inflight_bytes`), so a reordering network costs no resends.
#[derive(Debug)]
pub(crate) struct IncomingSnapshot {
    meta: SnapshotMeta,
    total: u64,
    buf: Vec<u8>,
    ahead: BTreeMap<u64, Bytes>,
    ahead_bytes: u64,
}

impl IncomingSnapshot {
    fn received(&self) -> u64 {
        self.buf.len() as u64
    }

    /// Take a chunk. Returns false if it lies beyond a gap and there is no room to keep it.
    fn accept(&mut self, offset: u64, data: Bytes, room: u64) -> bool {
        if offset > self.received() {
            if self.ahead_bytes + data.len() as u64 > room {
                return false;
            }
            if !self.ahead.contains_key(&offset) {
                self.ahead_bytes += data.len() as u64;
                self.ahead.insert(offset, data);
            }
            return true;
        }
        self.append_from(offset, &data);
        // Drain kept chunks that now connect.
        while let Some((&at, _)) = self.ahead.first_key_value() {
            if at > self.received() {
                break;
            }
            let chunk = self.ahead.remove(&at).unwrap();
            self.ahead_bytes -= chunk.len() as u64;
            self.append_from(at, &chunk);
        }
        true
    }

    /// Append the part of `data` (which starts at `offset`) that is new.
    fn append_from(&mut self, offset: u64, data: &[u8]) {
        let skip = (self.received() - offset) as usize;
        if skip < data.len() {
            self.buf.extend_from_slice(&data[skip..]);
        }
    }
}

impl Raft {
    /// The application took `snapshot` of its state machine at `snapshot.meta.index`, which
    /// it has applied. Entries up to that index are dropped from the log; the snapshot is
    /// what followers that lack them receive. Snapshot creation can run in the background:
    /// hand it in whenever it is ready. A snapshot older than the current one is ignored.
    pub fn compact(&mut self, snapshot: Snapshot) -> Result<()> {
        let SnapshotMeta { index, term, .. } = snapshot.meta;
        if index <= self.log.snapshot_index() {
            return Ok(());
        }
        if index > self.log.applied {
            return Err(Error::InvalidSnapshot(format!(
                "snapshot at index {index} is ahead of the applied index {}",
                self.log.applied
            )));
        }
        if self.log.term(index) != Some(term) {
            return Err(Error::InvalidSnapshot(format!(
                "snapshot says index {index} has term {term}, the log says {:?}",
                self.log.term(index)
            )));
        }
        let in_force = self.log.configs.at(index);
        if in_force.voters().is_empty() {
            // A node that joined with an empty disk learns the configuration from the entry
            // that added it; before that entry it does not know it, and a snapshot without
            // one would teach other nodes an empty configuration.
            return Err(Error::InvalidSnapshot(format!(
                "the configuration at index {index} is not known to this node"
            )));
        }
        if snapshot.meta.membership != *in_force {
            // A snapshot is how restarted and new nodes learn their configuration: a wrong
            // one would make them count quorums over the wrong nodes.
            return Err(Error::InvalidSnapshot(format!(
                "snapshot at index {index} carries configuration {}, the log says {in_force}",
                snapshot.meta.membership
            )));
        }
        self.log.compact_to(index);
        self.snapshot = Some(snapshot);
        Ok(())
    }

    /// The most recent snapshot, taken here or received from a leader.
    pub fn snapshot(&self) -> Option<&Snapshot> {
        self.snapshot.as_ref()
    }

    /// The index the log starts after (the latest snapshot's index, or 0).
    pub fn snapshot_index(&self) -> Index {
        self.log.snapshot_index()
    }

    /// The follower needs entries that were compacted: start sending the snapshot.
    pub(crate) fn start_snapshot(&mut self, to: NodeId) -> bool {
        let Some(snap) = &self.snapshot else {
            return false;
        };
        let (index, total) = (snap.meta.index, snap.data.len() as u64);
        self.progress
            .get_mut(&to)
            .unwrap()
            .become_snapshot(index, total);
        self.send_snapshot_chunks(to)
    }

    /// Send as many chunks as the window allows. Returns whether any was sent.
    pub(crate) fn send_snapshot_chunks(&mut self, to: NodeId) -> bool {
        let Some(snap) = self.snapshot.clone() else {
            return false;
        };
        let chunk = self.cfg.snapshot_chunk_bytes;
        // The same window as appends: at most `max_inflight_msgs` chunks and
        // `max_inflight_bytes` bytes ahead of what the follower confirmed.
        let window = self
            .cfg
            .max_inflight_bytes
            .min(chunk.saturating_mul(self.cfg.max_inflight_msgs as u64));
        let mut sent_any = false;
        loop {
            let Some(t) = self.progress.get_mut(&to).and_then(|p| p.snapshot.as_mut()) else {
                return sent_any;
            };
            if t.index != snap.meta.index {
                // A newer snapshot replaced the one in flight: send that one instead.
                return self.start_snapshot(to) || sent_any;
            }
            let done = t.started && (t.sent >= t.total || t.acked >= t.total);
            if done || (t.started && t.sent.saturating_sub(t.acked) >= window) {
                return sent_any;
            }
            let (offset, end) = (t.sent, (t.sent + chunk).min(t.total));
            t.sent = end;
            t.started = true;
            let body = Body::InstallSnapshot {
                meta: snap.meta.clone(),
                offset,
                total: t.total,
                data: snap.data.slice(offset as usize..end as usize),
            };
            self.send(to, self.term, body);
            sent_any = true;
        }
    }

    pub(crate) fn handle_snapshot_response(
        &mut self,
        from: NodeId,
        index: Index,
        received: u64,
        reject: bool,
    ) {
        let Some(pr) = self.progress.get_mut(&from) else {
            return;
        };
        pr.recent_active = true;
        let Some(t) = pr.snapshot.as_mut().filter(|t| t.index == index) else {
            return;
        };
        if received.min(t.total) > t.acked {
            // Only progress keeps a transfer alive: a follower that restarted and lost its
            // partial copy answers, but never past what it has, and the transfer times out
            // and starts over from what it really holds.
            t.idle_ticks = 0;
        }
        if reject {
            t.rewind_once(received);
        } else {
            t.acked = t.acked.max(received.min(t.total));
            // The follower may hold more than this transfer sent (kept from an earlier one).
            t.sent = t.sent.max(t.acked);
        }
        self.send_snapshot_chunks(from);
    }

    /// Leader tick. A transfer that made no progress for a heartbeat interval resends from
    /// the last acknowledged byte (chunks were lost); one that made none for
    /// `snapshot_timeout_tick` is abandoned for a probe (the follower may have restarted).
    pub(crate) fn tick_snapshot_transfers(&mut self) {
        let (timeout, interval) = (self.cfg.snapshot_timeout_tick, self.cfg.heartbeat_tick);
        let mut resend = Vec::new();
        for (&id, pr) in self.progress.iter_mut() {
            let Some(t) = pr.snapshot.as_mut() else {
                continue;
            };
            t.idle_ticks += 1;
            if t.idle_ticks >= timeout {
                pr.become_probe();
            } else if t.idle_ticks % interval == 0 && t.sent > t.acked {
                t.rewind(t.acked);
                resend.push(id);
            }
        }
        for id in resend {
            self.send_snapshot_chunks(id);
        }
    }

    /// Follower side of one chunk from the current leader.
    pub(crate) fn handle_install_snapshot(
        &mut self,
        from: NodeId,
        meta: SnapshotMeta,
        offset: u64,
        total: u64,
        data: Bytes,
    ) {
        let index = meta.index;
        let chunk_reply = |received, reject| Body::SnapshotResponse {
            index,
            received,
            reject,
        };
        if index <= self.log.committed {
            // Stale: we already hold everything it covers (§7: "discard it"). Saying where
            // our log stands ends the transfer on the leader.
            self.incoming = None;
            let body = Body::AppendResponse {
                reject: false,
                index: self.log.committed,
                hint: None,
            };
            self.send(from, self.term, body);
            return;
        }
        if offset + data.len() as u64 > total {
            return; // malformed: claims more bytes than the snapshot has
        }
        let fresh = self
            .incoming
            .as_ref()
            .is_none_or(|i| i.meta != meta || i.total != total);
        if fresh {
            self.incoming = Some(IncomingSnapshot {
                meta,
                total,
                buf: Vec::new(),
                ahead: BTreeMap::new(),
                ahead_bytes: 0,
            });
        }
        let room = self.cfg.max_inflight_bytes;
        let inc = self.incoming.as_mut().unwrap();
        let kept = inc.accept(offset, data, room);
        let received = inc.received();
        if received < total {
            // `reject` asks the leader to resend from `received` at once.
            self.send(from, self.term, chunk_reply(received, !kept));
            return;
        }
        let inc = self.incoming.take().unwrap();
        self.install_snapshot(Snapshot {
            meta: inc.meta,
            data: inc.buf.into(),
        });
        let body = Body::AppendResponse {
            reject: false,
            index,
            hint: None,
        };
        self.send(from, self.term, body);
    }

    /// Replace (or trim) the log with a snapshot from the leader and hand it to the
    /// application with the next Ready, ahead of any entry after it.
    fn install_snapshot(&mut self, snapshot: Snapshot) {
        let meta = &snapshot.meta;
        self.log
            .install_snapshot(meta.index, meta.term, meta.membership.clone());
        self.pending_snapshot = Some(snapshot.clone());
        self.snapshot = Some(snapshot);
    }
}

#[cfg(test)]
mod tests {
    use crate::message::{Body, Message};
    use crate::types::{Entry, EntryKind, HardState, Snapshot, SnapshotMeta};
    use crate::{Config, Raft, RestoreState};

    fn follower(terms: &[u64], commit: u64) -> Raft {
        let entries = terms
            .iter()
            .enumerate()
            .map(|(i, &term)| Entry {
                term,
                index: i as u64 + 1,
                kind: EntryKind::Normal,
                data: Default::default(),
            })
            .collect();
        let state = RestoreState {
            hard_state: HardState {
                term: 3,
                vote: None,
                commit,
            },
            entries,
            snapshot: None,
        };
        let mut cfg = Config::new(2, vec![1, 2, 3]);
        cfg.snapshot_chunk_bytes = 4;
        Raft::new(cfg, state).unwrap()
    }

    fn chunk(index: u64, term: u64, offset: u64, data: &'static [u8], total: u64) -> Message {
        Message {
            from: 1,
            to: 2,
            term: 3,
            body: Body::InstallSnapshot {
                meta: SnapshotMeta {
                    index,
                    term,
                    membership: crate::Membership::new(vec![1, 2, 3]),
                },
                offset,
                total,
                data: data.into(),
            },
        }
    }

    #[test]
    fn a_snapshot_of_a_log_prefix_keeps_the_suffix() {
        let mut f = follower(&[1, 1, 2, 2, 3], 1);
        f.step(chunk(3, 2, 0, b"abcd", 4)).unwrap();
        assert_eq!(f.snapshot_index(), 3);
        assert_eq!(
            f.last_index(),
            5,
            "the entries after the snapshot must stay"
        );
        assert_eq!(f.term_at(5), Some(3));
        let rd = f.ready();
        assert_eq!(rd.snapshot.map(|s| s.data), Some(b"abcd"[..].into()));
    }

    #[test]
    fn a_snapshot_that_conflicts_replaces_the_log() {
        let mut f = follower(&[1, 1, 2, 2, 3], 1);
        f.step(chunk(4, 3, 0, b"abcd", 4)).unwrap(); // our entry 4 has term 2
        assert_eq!((f.snapshot_index(), f.last_index()), (4, 4));
        assert_eq!(f.term_at(4), Some(3));
    }

    #[test]
    fn a_stale_snapshot_is_ignored() {
        let mut f = follower(&[1, 1, 2, 2, 3], 4);
        f.step(chunk(3, 2, 0, b"abcd", 4)).unwrap();
        assert_eq!(f.snapshot_index(), 0);
        assert_eq!(f.last_index(), 5);
        assert!(f.ready().snapshot.is_none());
    }

    #[test]
    fn chunks_out_of_order_are_kept_and_assembled() {
        let mut f = follower(&[1], 1);
        f.step(chunk(9, 3, 8, b"ij", 10)).unwrap();
        f.step(chunk(9, 3, 4, b"efgh", 10)).unwrap();
        assert_eq!(f.snapshot_index(), 0, "incomplete");
        f.step(chunk(9, 3, 0, b"abcd", 10)).unwrap();
        let snap: Snapshot = f.ready().snapshot.expect("installed");
        assert_eq!(&snap.data[..], b"abcdefghij");
        assert_eq!(f.commit_index(), 9);
    }

    #[test]
    fn compaction_refuses_what_is_not_applied_or_does_not_match() {
        let mut r = Raft::new(Config::new(1, vec![1]), RestoreState::default()).unwrap();
        r.campaign();
        for _ in 0..3 {
            let rd = r.ready();
            r.advance(&rd);
        }
        r.propose(b"x"[..].into()).unwrap();
        let rd = r.ready();
        r.advance(&rd);
        let rd = r.ready();
        r.advance(&rd);
        assert_eq!(r.applied(), 2);
        let snap = |index, term| Snapshot {
            meta: SnapshotMeta {
                index,
                term,
                membership: crate::Membership::new(vec![1]),
            },
            data: Default::default(),
        };
        assert!(r.compact(snap(3, 1)).is_err(), "not applied yet");
        assert!(r.compact(snap(2, 7)).is_err(), "wrong term");
        r.compact(snap(2, 1)).unwrap();
        assert_eq!(r.snapshot_index(), 2);
        assert_eq!(r.term_at(2), Some(1), "the snapshot point keeps its term");
    }
}
