//! The driver's two doors to the outside, as a member implements them: the peer transport
//! (with heartbeat timing and the supervisor's cut switch) and the write-ahead log behind
//! group commit (with snapshot files written off the loop).

use super::*;
/// The peer transport, as the driver sees it. It also times heartbeats: the round trip
/// of a heartbeat and its answer is the peer round-trip time etcd reports.
pub(super) struct Peers {
    pub(super) out: Arc<dyn Transport>,
    pub(super) metrics: Arc<Metrics>,
    /// The last heartbeat sent to each peer: its round number and when it left. One entry
    /// per peer, so bounded by the membership.
    pub(super) heartbeats: HashMap<NodeId, (u64, std::time::Instant)>,
    /// Traffic per peer and the supervisor's cut switch (for the dashboard).
    pub(super) links: Links,
    pub(super) chronicle: SharedChronicle,
}

impl Peers {
    /// A message arrived: false if its link is cut (it is dropped, as a network would).
    /// If it answers the last heartbeat sent to its sender, time it.
    pub(super) fn heard(&mut self, m: &Message) -> bool {
        if self.links.cut.from.contains(&m.from) {
            return false;
        }
        self.links.received(m);
        if let raft::Body::HeartbeatResponse { seq } = m.body {
            if let Some((sent_seq, at)) = self.heartbeats.get(&m.from) {
                if *sent_seq == seq {
                    let rtt = at.elapsed();
                    let to = format!("{:x}", m.from);
                    self.metrics
                        .peer_rtt
                        .with_label_values(&[&to])
                        .observe(rtt.as_secs_f64());
                    self.links.rtt(m.from, rtt);
                    self.heartbeats.remove(&m.from);
                }
            }
        }
        true
    }

    /// Note what the dashboard's timeline shows of a message leaving: a vote granted,
    /// the first chunk of a snapshot.
    fn chronicle(&self, m: &Message) {
        let (kind, text) = match &m.body {
            raft::Body::VoteResponse { pre_vote, granted } if *granted => {
                let what = if *pre_vote { "pre-vote" } else { "vote" };
                (
                    "vote",
                    format!(
                        "granted its {what} to {} for term {}",
                        insight::hex(m.to),
                        m.term
                    ),
                )
            }
            raft::Body::InstallSnapshot { meta, offset, .. } if *offset == 0 => (
                "snapshot",
                format!(
                    "sending a snapshot (up to index {}) to {}",
                    meta.index,
                    insight::hex(m.to)
                ),
            ),
            _ => return,
        };
        self.chronicle.lock().unwrap().push(kind, text);
    }
}

impl driver::Transport for Peers {
    fn send(&mut self, mut msgs: Vec<Message>) {
        if !self.links.cut.to.is_empty() {
            msgs.retain(|m| !self.links.cut.to.contains(&m.to));
        }
        if msgs.is_empty() {
            return;
        }
        for m in &msgs {
            self.links.sent(m);
            if matches!(
                m.body,
                raft::Body::VoteResponse { granted: true, .. }
                    | raft::Body::InstallSnapshot { offset: 0, .. }
            ) {
                self.chronicle(m);
            }
            if let raft::Body::Heartbeat { seq, .. } = m.body {
                // Keep the oldest unanswered round (a slow peer shows a long round trip,
                // not none), unless its answer looks lost.
                let now = std::time::Instant::now();
                let e = self.heartbeats.entry(m.to).or_insert((seq, now));
                if now.duration_since(e.1) > Duration::from_secs(1) {
                    *e = (seq, now);
                }
            }
        }
        self.out.send(msgs);
    }
}

/// The size of the pieces a snapshot is serialized in on its way to the file.
const SNAPSHOT_CHUNK: usize = 1 << 20;

/// The write-ahead log behind group commit, and snapshot files written off the loop.
pub(super) struct Wal {
    pub(super) group: GroupCommit,
    /// Writes snapshot files off the raft loop and off the log's thread.
    pub(super) writer: storage::SnapshotWriter,
    pub(super) done: mpsc::UnboundedSender<Done>,
    /// Told of members that configuration entries add, as those entries enter the log.
    pub(super) transport: Arc<dyn Transport>,
    /// A leader's snapshot written before the registry existed restores onto this.
    pub(super) bootstrap: Registry,
    /// Peer URLs of members added by entries that entered the log (see `View::pending`).
    pub(super) added: Added,
}

/// Members added by configuration entries in the log, with their peer URLs.
pub(super) type Added = Arc<Mutex<BTreeMap<NodeId, Vec<String>>>>;

impl Wal {
    /// A member added by an entry now entering the log must be reachable before the entry
    /// applies: a leader of one voter adding a second needs the newcomer's vote to commit
    /// the very entry that adds it.
    fn learn_added_members(&self, entries: &[raft::Entry]) {
        for e in entries.iter().filter(|e| e.kind == EntryKind::ConfChange) {
            let Ok(conf) = ConfEntry::decode(&e.data) else {
                continue;
            };
            let Ok(ctx) = <crate::pb::raftkvpb::ConfContext as prost::Message>::decode(
                &conf.change.context[..],
            ) else {
                continue;
            };
            let Some(url) = ctx.peer_urls.first() else {
                continue;
            };
            for c in &conf.change.changes {
                if let raft::Change::AddVoter(id) | raft::Change::AddLearner(id) = c {
                    self.transport.learn_peer(*id, url);
                    let mut added = self.added.lock().unwrap();
                    added.insert(*id, ctx.peer_urls.clone());
                }
            }
        }
    }
}

/// How much of a snapshot is written between releases of the pages it read.
const RELEASE_EVERY: usize = 16 << 20;

impl driver::Storage<KvMachine> for Wal {
    fn persist(&mut self, w: driver::Write) {
        self.learn_added_members(&w.entries);
        let done = self.done.clone();
        self.group.submit(Batch {
            snapshot: w.snapshot,
            hard_state: w.hard_state,
            entries: w.entries,
            lazy: w.lazy,
            on_durable: Some(Box::new(move |result| {
                let _ = done.send(Done::Persisted(result));
            })),
            ..Default::default()
        });
    }

    /// Serialized and written on a blocking thread, so neither the loop nor the log's
    /// appends wait for a large snapshot; serialized in chunks straight into the file, so
    /// the store is never in memory twice. What the core keeps to send followers is the
    /// file mapped into memory, not a copy on the heap.
    fn snapshot(&mut self, meta: SnapshotMeta, (store, registry): (kv::Store, Registry)) {
        let (writer, done) = (self.writer.clone(), self.done.clone());
        tokio::task::spawn_blocking(move || {
            let frozen = store.clone();
            let (len, chunks) = members::snapshot_chunks(&registry, store, SNAPSHOT_CHUNK);
            // Most values live in the last snapshot's file: reading them maps its pages in,
            // which are released as the new file grows rather than piling up.
            let mut read = 0;
            let chunks = chunks.inspect(|c| {
                read += c.len();
                if read >= RELEASE_EVERY {
                    read = 0;
                    storage::release_all_mapped();
                }
            });
            let result = writer.write_stream(meta, len, chunks);
            // The file now holds every value: the store's values move there (see `Rehome`).
            let rehome = result
                .as_ref()
                .ok()
                .and_then(|s| Rehome::new(frozen, &s.data));
            let result = result.map_err(|e| e.to_string());
            let _ = done.send(Done::Snapshotted(result, rehome.map(Box::new)));
        });
    }

    fn compact(&mut self, snapshot: Snapshot) {
        self.group.submit(Batch {
            compact: Some(snapshot),
            ..Default::default()
        });
    }

    /// Decoding a leader's snapshot into a store runs on a blocking thread; the loop keeps
    /// ticking and taking messages meanwhile.
    fn restore(&mut self, snapshot: Snapshot) {
        let (done, bootstrap) = (self.done.clone(), self.bootstrap.clone());
        tokio::task::spawn_blocking(move || {
            let mut machine = KvMachine::new(bootstrap);
            let result =
                driver::StateMachine::restore(&mut machine, &snapshot).map(|_| Box::new(machine));
            let _ = done.send(Done::Restored(result));
        });
    }
}
