//! A simulated node: the production driver around the core and a tiny state machine (a
//! register), its disk, and its in-flight disk writes.

use driver::Write;
use raft::{Entry, EntryKind, HardState, Index, NodeId, Raft, RestoreState, Snapshot};
use std::collections::VecDeque;

/// What survives a crash.
#[derive(Clone, Debug, Default)]
pub struct Disk {
    /// The hard state as of the last synced write.
    pub hard_state: HardState,
    /// A hard state written without an fsync of its own (only the commit index moved): it
    /// becomes durable with the next synced write, and a crash before that loses it.
    pub unsynced: Option<HardState>,
    pub snapshot: Option<Snapshot>,
    /// The entries after the snapshot point.
    pub entries: Vec<Entry>,
}

impl Disk {
    pub fn snapshot_index(&self) -> Index {
        self.snapshot.as_ref().map_or(0, |s| s.meta.index)
    }

    /// Write a batch in the order the Ready contract gives: snapshot, hard state, entries
    /// (which overwrite the stored log from their first index on). A lazy batch carries
    /// only a hard state, and is not synced: see `unsynced`.
    pub fn write(&mut self, w: Write) {
        if w.lazy {
            self.unsynced = w.hard_state.or(self.unsynced);
            return;
        }
        // This write's fsync covers the lazy writes before it.
        if let Some(hs) = self.unsynced.take() {
            self.hard_state = hs;
        }
        let (snapshot, hs, entries) = (w.snapshot, w.hard_state, &w.entries);
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

/// A read answered by a node: the register's value when the read was served.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ReadResult {
    pub node: NodeId,
    pub ctx: u64,
    /// The applied index the read was served at (at least its read index).
    pub index: Index,
    /// The register's value: (index, command id) of the last command applied.
    pub value: Option<(Index, u64)>,
}

/// What the register saw, for the simulator to check after each call into the driver.
#[derive(Debug)]
pub enum RegisterEvent {
    /// `entry` was applied when `expected` was the next index due.
    Applied { expected: Index, entry: Entry },
}

/// The state machine of the core-level tests: a register holding the last command applied,
/// with the whole sequence kept so tests can compare nodes.
#[derive(Default, Debug)]
pub struct Register {
    /// Every command applied, in order: (index, command id).
    pub applied: Vec<(Index, u64)>,
    pub applied_index: Index,
    pub events: Vec<RegisterEvent>,
}

impl Register {
    /// The register's value: the last command applied.
    pub fn value(&self) -> Option<(Index, u64)> {
        self.applied.last().copied()
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

    fn restore_from(&mut self, s: &Snapshot) {
        self.applied = decode_snapshot(&s.data);
        self.applied_index = s.meta.index;
    }
}

impl driver::StateMachine for Register {
    type Output = ();
    type Query = ();
    type Answer = Option<(Index, u64)>;
    type Frozen = bytes::Bytes;

    fn apply(&mut self, e: &Entry) -> Result<Option<(driver::RequestId, ())>, String> {
        self.events.push(RegisterEvent::Applied {
            expected: self.applied_index + 1,
            entry: e.clone(),
        });
        self.applied_index = e.index;
        if e.kind == EntryKind::Normal {
            self.applied.push((e.index, command_id(&e.data)));
        }
        // Core-level tests propose raw commands, with no client waiting through the driver.
        Ok(None)
    }

    fn query(&self, _: &()) -> Option<(Index, u64)> {
        self.value()
    }

    fn freeze(&self) -> bytes::Bytes {
        self.snapshot_data()
    }

    fn restore(&mut self, s: &Snapshot) -> Result<(), String> {
        self.restore_from(s);
        Ok(())
    }
}

/// The production driver around a register, wired to the simulated world.
pub type RegisterDriver = crate::io::SimDriver<Register>;

pub struct SimNode {
    pub id: NodeId,
    /// `None` while crashed.
    pub driver: Option<RegisterDriver>,
    /// Bumped at every crash, so events meant for an earlier life are ignored.
    pub incarnation: u64,
    pub disk: Disk,
    /// Disk writes in flight, oldest first; they complete in order.
    pub writes: VecDeque<Write>,
    /// When the disk finishes its queued writes.
    pub disk_busy_until: u64,
    /// What the driver asked of the world since the simulator last looked.
    pub io: crate::io::Mailbox<Register>,
    /// Not cut off by `Cluster::disconnect` (partitions and one-way cuts are separate).
    pub connected: bool,
}

impl SimNode {
    pub fn new(id: NodeId) -> Self {
        SimNode {
            id,
            driver: None,
            incarnation: 0,
            disk: Disk::default(),
            writes: VecDeque::new(),
            disk_busy_until: 0,
            io: Default::default(),
            connected: true,
        }
    }

    pub fn is_up(&self) -> bool {
        self.driver.is_some()
    }

    pub fn raft(&self) -> &Raft {
        self.driver.as_ref().expect("node is up").raft()
    }

    /// The register (empty while the node is down).
    pub fn register(&self) -> Option<&Register> {
        self.driver.as_ref().map(|d| d.machine())
    }

    /// Every command applied, in order (empty while down).
    pub fn applied(&self) -> Vec<(Index, u64)> {
        self.register()
            .map(|r| r.applied.clone())
            .unwrap_or_default()
    }

    pub fn applied_index(&self) -> Index {
        self.register().map_or(0, |r| r.applied_index)
    }

    /// The register's value: the last command applied.
    pub fn value(&self) -> Option<(Index, u64)> {
        self.register().and_then(Register::value)
    }

    /// Lose everything not yet durable.
    pub fn crash(&mut self) {
        self.disk.unsynced = None;
        self.driver = None;
        self.incarnation += 1;
        self.writes.clear();
        self.io = Default::default();
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
