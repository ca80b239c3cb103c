//! A simulated node: the core, its disk, its in-flight disk writes, and a tiny state machine.

use raft::{
    Entry, EntryKind, HardState, Index, Message, NodeId, Raft, ReadState, RestoreState, Term,
};
use std::collections::VecDeque;

/// What survives a crash.
#[derive(Clone, Debug, Default)]
pub struct Disk {
    pub hard_state: HardState,
    pub entries: Vec<Entry>,
}

impl Disk {
    /// Write a batch: entries overwrite the stored log from their first index on.
    fn write(&mut self, hs: Option<HardState>, entries: &[Entry]) {
        if let Some(hs) = hs {
            self.hard_state = hs;
        }
        if let Some(first) = entries.first() {
            self.entries.truncate((first.index - 1) as usize);
            self.entries.extend_from_slice(entries);
        }
    }

    pub fn restore_state(&self) -> RestoreState {
        RestoreState {
            hard_state: self.hard_state,
            snapshot_index: 0,
            snapshot_term: 0,
            entries: self.entries.clone(),
        }
    }
}

/// A disk write in progress; writes complete in order.
#[derive(Debug)]
pub struct PersistJob {
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
    }

    pub fn complete_job(&mut self) -> Option<PersistJob> {
        let job = self.jobs.pop_front()?;
        self.disk.write(job.hard_state, &job.entries);
        Some(job)
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
