//! # storage — the durable raft log
//!
//! Keeps the promise Raft's safety rests on: what a node said it persisted survives a
//! crash. A data directory holds
//!
//! - `IDENTITY` — format version, cluster id and node id, checked at every start;
//! - `wal/` — the write-ahead log: segment files of CRC32C-framed records (`wal.rs`);
//! - `snap/` — the latest snapshot (`snap.rs`).
//!
//! [`Storage`] writes a [`raft::Ready`]'s snapshot, hard state and entries, makes them
//! durable with one `fdatasync` per [`Storage::sync`], and at start returns the
//! [`raft::RestoreState`] to build the core from. [`GroupCommit`] runs it on a thread of
//! its own so that many appends share each sync.

mod error;
mod group;
mod ident;
pub mod record;
mod snap;
mod wal;

pub use error::{Error, Result};
pub use group::{Batch, CommitRound, GroupCommit, GroupStats, Observer, OnDurable};
pub use ident::{read_small_file, write_small_file, Identity, FORMAT_VERSION};
pub use snap::{release_all_mapped, release_mapped};
pub use wal::Replayed;

use raft::{Entry, HardState, RestoreState, Snapshot};
use std::path::{Path, PathBuf};

#[derive(Clone, Copy, Debug)]
pub struct Options {
    /// A segment is sealed and a new one started past this size.
    pub segment_bytes: u64,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            segment_bytes: 64 << 20,
        }
    }
}

pub struct Storage {
    dir: PathBuf,
    wal: wal::Wal,
    snaps: snap::SnapStore,
}

impl Storage {
    /// Open the data directory (creating it for a new node) and recover its state.
    pub fn open(dir: &Path, id: Identity, opts: Options) -> Result<(Storage, RestoreState)> {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        let fresh = !dir.join("wal").exists() && !dir.join("snap").exists();
        ident::check_or_create(dir, id, fresh)?;
        let snaps = snap::SnapStore::open(&dir.join("snap"))?;
        let snapshot = snaps.latest()?;
        let point = snapshot.as_ref().map(|s| (s.meta.index, s.meta.term));
        let (wal, replayed) = wal::Wal::open(&dir.join("wal"), point, opts.segment_bytes)?;
        let state = RestoreState {
            hard_state: replayed.hard_state,
            snapshot,
            entries: replayed.entries,
        };
        let storage = Storage {
            dir: dir.to_path_buf(),
            wal,
            snaps,
        };
        Ok((storage, state))
    }

    /// Write what a `Ready` asks to persist (not yet durable; see [`Storage::sync`]). A
    /// snapshot is made durable first, on its own file.
    pub fn save(
        &mut self,
        snapshot: Option<&Snapshot>,
        hard_state: Option<HardState>,
        entries: &[Entry],
    ) -> Result<()> {
        if let Some(s) = snapshot {
            self.snaps.save(s)?;
            self.wal.mark_snapshot(s.meta.index, s.meta.term)?;
        }
        self.wal.append(hard_state, entries)
    }

    /// Make everything saved so far durable.
    pub fn sync(&mut self) -> Result<()> {
        self.wal.sync()
    }

    /// The application compacted the log with `snapshot`: store it and delete the WAL
    /// segments it makes unnecessary.
    pub fn compact(&mut self, snapshot: &Snapshot) -> Result<()> {
        self.snaps.save(snapshot)?;
        self.wal
            .mark_snapshot(snapshot.meta.index, snapshot.meta.term)?;
        self.wal.sync()?;
        self.wal.compact(snapshot.meta.index)?;
        Ok(())
    }

    /// A handle that writes snapshot files from another thread, so that a large snapshot
    /// does not hold up log appends; [`Storage::compact`] then only records it.
    pub fn snapshot_writer(&self) -> SnapshotWriter {
        SnapshotWriter(self.snaps.clone())
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn segment_count(&self) -> usize {
        self.wal.segment_count()
    }
}

#[derive(Clone, Debug)]
pub struct SnapshotWriter(snap::SnapStore);

impl SnapshotWriter {
    /// Write `s` durably. Older snapshots stay until [`Storage::compact`] records `s`.
    pub fn write(&self, s: &Snapshot) -> Result<()> {
        self.0.write(s)
    }

    /// Write a snapshot of `len` bytes from its chunks, answered with its data mapped from
    /// the file: the whole snapshot is never in memory, and it is flushed as it goes.
    pub fn write_stream(
        &self,
        meta: raft::SnapshotMeta,
        len: u64,
        chunks: impl IntoIterator<Item = bytes::Bytes>,
    ) -> Result<Snapshot> {
        self.0.write_stream(meta, len, chunks)
    }
}

/// Make a directory's entries (new, renamed or removed files) durable.
pub(crate) fn sync_dir(dir: &Path) -> Result<()> {
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| Error::io(dir, e))
}
