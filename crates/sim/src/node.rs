//! A simulated node: the core, its disk, its in-flight disk writes, and a tiny state machine.

use raft::{
    Entry, EntryKind, HardState, Index, Message, NodeId, Raft, ReadState, RestoreState, Snapshot,
    Term,
};
use std::collections::VecDeque;

/// What survives a crash.
#[derive(Clone, Debug, Default)]
pub struct Disk {
    pub hard_state: HardState,
    pub snapshot: Option<Snapshot>,
    /// The entries after the snapshot point.
    pub entries: Vec<Entry>,
}

impl Disk {
    pub fn snapshot_index(&self) -> Index {
        self.snapshot.as_ref().map_or(0, |s| s.meta.index)
    }

    /// Write a batch in the order the Ready contract gives: snapshot, hard state, entries
    /// (which overwrite the stored log from their first index on).
    fn write(&mut self, snapshot: Option<Snapshot>, hs: Option<HardState>, entries: &[Entry]) {
        if let Some(s) = snapshot {
            self.install(s);
        }
        if let Some(hs) = hs {
            self.hard_state = hs;
        }
        if let Some(first) = entries.first() {
            let keep = first.index.saturating_sub(self.snapshot_index() + 1) as usize;
            self.entries.truncate(keep);
            self.entries.extend_from_slice(entries);
        }
    }

    /// Store a snapshot and drop the entries it covers — all of them if the stored entry at
    /// its index has another term.
    pub fn install(&mut self, s: Snapshot) {
        let offset = self.snapshot_index();
        let (index, term) = (s.meta.index, s.meta.term);
        if index <= offset {
            return;
        }
        let at = (index - offset) as usize;
        if self.entries.get(at - 1).is_some_and(|e| e.term == term) {
            self.entries.drain(..at);
        } else {
            self.entries.clear();
        }
        self.snapshot = Some(s);
    }

    pub fn restore_state(&self) -> RestoreState {
        RestoreState {
            hard_state: self.hard_state,
            snapshot: self.snapshot.clone(),
            entries: self.entries.clone(),
        }
    }

    /// Bytes of log entries stored.
    pub fn log_bytes(&self) -> u64 {
        self.entries.iter().map(Entry::size).sum()
    }
}

/// A disk write in progress; writes complete in order.
#[derive(Debug)]
pub struct PersistJob {
    pub snapshot: Option<Snapshot>,
    pub hard_state: Option<HardState>,
    pub entries: Vec<Entry>,
    pub persist_to: Option<(Index, Term)>,
    /// Messages that may leave only once this write and all before it are durable.
    pub messages: Vec<Message>,
}

/// A read answered by a node: the register's value when the read was served.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ReadResult {
    pub node: NodeId,
    pub ctx: u64,
    pub index: Index,
    /// The register's value: (index, command id) of the last command applied.
    pub value: Option<(Index, u64)>,
}

pub struct SimNode {
    pub id: NodeId,
    /// `None` while crashed.
    pub raft: Option<Raft>,
    /// Bumped at every crash, so events meant for an earlier life are ignored.
    pub incarnation: u64,
    pub disk: Disk,
    pub jobs: VecDeque<PersistJob>,
    /// When the disk finishes its queued writes.
    pub disk_busy_until: u64,
    /// The state machine: every command applied, in order.
    pub applied: Vec<(Index, u64)>,
    pub applied_index: Index,
    /// Reads confirmed by the core, waiting for their index to be applied.
    pub waiting_reads: Vec<ReadState>,
    /// Not cut off by `Cluster::disconnect` (partitions and one-way cuts are separate).
    pub connected: bool,
    /// A background snapshot is being taken.
    pub snapshot_in_progress: bool,
}

impl SimNode {
    pub fn new(id: NodeId) -> Self {
        SimNode {
            id,
            raft: None,
            incarnation: 0,
            disk: Disk::default(),
            jobs: VecDeque::new(),
            disk_busy_until: 0,
            applied: Vec::new(),
            applied_index: 0,
            waiting_reads: Vec::new(),
            connected: true,
            snapshot_in_progress: false,
        }
    }

    pub fn is_up(&self) -> bool {
        self.raft.is_some()
    }

    pub fn raft(&self) -> &Raft {
        self.raft.as_ref().expect("node is up")
    }

    /// The register the state machine implements: the last command applied.
    pub fn value(&self) -> Option<(Index, u64)> {
        self.applied.last().copied()
    }

    /// Lose everything not yet durable.
    pub fn crash(&mut self) {
        self.raft = None;
        self.incarnation += 1;
        self.jobs.clear();
        self.applied.clear();
        self.applied_index = 0;
        self.waiting_reads.clear();
        self.snapshot_in_progress = false;
    }

    pub fn complete_job(&mut self) -> Option<PersistJob> {
        let mut job = self.jobs.pop_front()?;
        self.disk
            .write(job.snapshot.take(), job.hard_state, &job.entries);
        Some(job)
    }

    /// The state machine as snapshot bytes: every applied command as (index, id).
    pub fn snapshot_data(&self) -> bytes::Bytes {
        let mut out = Vec::with_capacity(self.applied.len() * 16);
        for &(index, id) in &self.applied {
            out.extend_from_slice(&index.to_le_bytes());
            out.extend_from_slice(&id.to_le_bytes());
        }
        out.into()
    }

    /// Replace the state machine with a snapshot's.
    pub fn restore(&mut self, s: &Snapshot) {
        self.applied = decode_snapshot(&s.data);
        self.applied_index = s.meta.index;
    }

    /// Apply a committed entry to the register.
    pub fn apply(&mut self, e: &Entry) {
        self.applied_index = e.index;
        if e.kind == EntryKind::Normal {
            self.applied.push((e.index, command_id(&e.data)));
        }
    }
}

/// Commands carry their id in the first 8 bytes (the rest is padding, if any).
pub fn command_id(data: &[u8]) -> u64 {
    let mut id = [0u8; 8];
    let n = data.len().min(8);
    id[..n].copy_from_slice(&data[..n]);
    u64::from_le_bytes(id)
}

pub fn command(id: u64, size: usize) -> bytes::Bytes {
    let mut v = id.to_le_bytes().to_vec();
    v.resize(size.max(8), 0xab);
    v.into()
}

/// The commands a snapshot holds, as (index, id).
pub fn decode_snapshot(data: &[u8]) -> Vec<(Index, u64)> {
    data.chunks_exact(16)
        .map(|c| {
            let index = u64::from_le_bytes(c[..8].try_into().unwrap());
            let id = u64::from_le_bytes(c[8..].try_into().unwrap());
            (index, id)
        })
        .collect()
}
