//! Snapshot files: `{index:016x}-{term:016x}.snap` in `snap/`.
//!
//! ```text
//! | magic "RKVSNAP1" | meta_len: u32 | meta | meta_crc: u32 | data_len: u64 | data | data_crc: u32 |
//! meta = index: u64, term: u64, voter count: u32, voters: u64 each
//! ```
//!
//! A snapshot is written to a temporary file, fsynced, renamed into place and the directory
//! fsynced; only then are older snapshots removed. Loading maps the file into memory and
//! hands out the data as `Bytes` over the map, so even a large snapshot is never held in
//! memory twice (nor read into the heap at all).

use crate::error::{Error, Result};
use bytes::Bytes;
use raft::{Membership, Snapshot, SnapshotMeta};
use std::fs::{self, File};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

const MAGIC: &[u8; 8] = b"RKVSNAP1";

#[derive(Clone, Debug)]
pub struct SnapStore {
    dir: PathBuf,
}

fn file_name(meta: &SnapshotMeta) -> String {
    format!("{:016x}-{:016x}.snap", meta.index, meta.term)
}

/// index u64, term u64, then the configuration (`Membership::encode_into`). A meta that
/// ends after the voters list (written before membership change: voters only) reads as a
/// simple configuration of those voters.
fn encode_meta(meta: &SnapshotMeta) -> Vec<u8> {
    let mut m = Vec::with_capacity(64);
    m.extend_from_slice(&meta.index.to_le_bytes());
    m.extend_from_slice(&meta.term.to_le_bytes());
    meta.membership.encode_into(&mut m);
    m
}

fn decode_meta(m: &[u8]) -> Option<SnapshotMeta> {
    let u64_at = |at: usize| Some(u64::from_le_bytes(m.get(at..at + 8)?.try_into().ok()?));
    let voters = u32::from_le_bytes(m.get(16..20)?.try_into().ok()?) as usize;
    let membership = if voters.checked_mul(8)?.checked_add(20)? == m.len() {
        let ids = (0..voters)
            .map(|i| u64_at(20 + 8 * i))
            .collect::<Option<_>>()?;
        Membership::from_parts(ids, vec![], vec![], vec![], false).ok()?
    } else {
        Membership::decode(&m[16..]).ok()?
    };
    Some(SnapshotMeta {
        index: u64_at(0)?,
        term: u64_at(8)?,
        membership,
    })
}

impl SnapStore {
    pub fn open(dir: &Path) -> Result<SnapStore> {
        fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        // A temporary file is a snapshot whose write never completed.
        for entry in fs::read_dir(dir).map_err(|e| Error::io(dir, e))? {
            let path = entry.map_err(|e| Error::io(dir, e))?.path();
            if path.extension().is_some_and(|x| x == "tmp") {
                fs::remove_file(&path).map_err(|e| Error::io(&path, e))?;
            }
        }
        Ok(SnapStore {
            dir: dir.to_path_buf(),
        })
    }

    fn snapshot_files(&self) -> Result<Vec<PathBuf>> {
        let mut files: Vec<PathBuf> = fs::read_dir(&self.dir)
            .map_err(|e| Error::io(&self.dir, e))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "snap"))
            .collect();
        // Names are fixed-width hex, so name order is (index, term) order.
        files.sort();
        Ok(files)
    }

    /// Write `s` durably, then remove older snapshots.
    pub fn save(&self, s: &Snapshot) -> Result<()> {
        let path = self.path_of(&s.meta);
        if !path.exists() {
            self.write(s)?;
        }
        for old in self.snapshot_files()? {
            if old != path && old < path {
                fs::remove_file(&old).map_err(|e| Error::io(&old, e))?;
            }
        }
        Ok(())
    }

    fn path_of(&self, meta: &SnapshotMeta) -> PathBuf {
        self.dir.join(file_name(meta))
    }

    /// Write `s` durably under its final name, keeping older snapshots. Safe from any
    /// thread: recovery ignores a snapshot newer than the log's last snapshot mark (a crash
    /// before the mark), and `save` later finds the file already there.
    pub fn write(&self, s: &Snapshot) -> Result<()> {
        // In pieces, so that a leader's snapshot received whole goes to disk as it is
        // written too (see `WriteBehind`).
        let (data, piece) = (&s.data, 1 << 20);
        let chunks = (0..data.len())
            .step_by(piece)
            .map(|at| data.slice(at..data.len().min(at + piece)));
        self.write_stream(s.meta.clone(), data.len() as u64, chunks)
            .map(drop)
    }

    /// Write a snapshot of `len` bytes given in chunks, durably under its final name, and
    /// answer it with its data mapped from the file: the caller never holds the whole
    /// snapshot in memory, and what it keeps (to send to followers) is the page cache's,
    /// which the kernel can reclaim, not the heap's. The file goes to disk as it is written
    /// ([`WriteBehind`]), so its final fsync finds little left to do. Chunks that do not add
    /// up to `len` are an error (and leave no file).
    pub fn write_stream(
        &self,
        meta: SnapshotMeta,
        len: u64,
        chunks: impl IntoIterator<Item = Bytes>,
    ) -> Result<Snapshot> {
        let path = self.path_of(&meta);
        let tmp = path.with_extension("tmp");
        let encoded = encode_meta(&meta);
        let header = 8 + 4 + encoded.len() + 4 + 8;
        let write = || -> std::io::Result<()> {
            let mut w = BufWriter::with_capacity(1 << 20, File::create(&tmp)?);
            w.write_all(MAGIC)?;
            w.write_all(&(encoded.len() as u32).to_le_bytes())?;
            w.write_all(&encoded)?;
            w.write_all(&crc32c::crc32c(&encoded).to_le_bytes())?;
            w.write_all(&len.to_le_bytes())?;
            let (mut crc, mut written) = (0, 0u64);
            let mut behind = WriteBehind::default();
            for chunk in chunks {
                crc = crc32c::crc32c_append(crc, &chunk);
                w.write_all(&chunk)?;
                written += chunk.len() as u64;
                behind.wrote(&mut w, header as u64 + written)?;
            }
            if written != len {
                return Err(std::io::Error::other(format!(
                    "the snapshot's chunks hold {written} bytes, not the {len} announced"
                )));
            }
            w.write_all(&crc.to_le_bytes())?;
            w.into_inner()?.sync_all()
        };
        if let Err(e) = write() {
            let _ = fs::remove_file(&tmp);
            return Err(Error::io(&tmp, e));
        }
        fs::rename(&tmp, &path).map_err(|e| Error::io(&path, e))?;
        crate::sync_dir(&self.dir)?;
        let file = File::open(&path).map_err(|e| Error::io(&path, e))?;
        // SAFETY: as in `load`. Not verified again: its checksum was just computed from the
        // very bytes written, and reading them back would only fill memory.
        let map = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| Error::io(&path, e))?;
        let end = header + len as usize;
        if map.len() != end + 4 {
            // Not what was just written and synced: something else changed the file.
            let what = format!("{} bytes just after writing {}", map.len(), end + 4);
            return Err(Error::corrupt(&path, 0, what));
        }
        let data = mapped(map).slice(header..end);
        Ok(Snapshot { meta, data })
    }

    /// The newest snapshot, verified. A damaged newest snapshot is an error, not a reason
    /// to fall back silently to an older state.
    pub fn latest(&self) -> Result<Option<Snapshot>> {
        match self.snapshot_files()?.pop() {
            Some(path) => load(&path).map(Some),
            None => Ok(None),
        }
    }
}

fn load(path: &Path) -> Result<Snapshot> {
    let file = File::open(path).map_err(|e| Error::io(path, e))?;
    // SAFETY: the file is private to this process's data directory and never modified
    // after it is renamed into place; a snapshot file is replaced only by a new name.
    let map = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
    let bytes = mapped(map);
    let bad = |offset: usize, what: &str| Error::corrupt(path, offset as u64, what.to_string());
    if bytes.get(..8) != Some(&MAGIC[..]) {
        return Err(bad(0, "not a snapshot file"));
    }
    let meta_len = u32_at(&bytes, 8).ok_or_else(|| bad(8, "truncated header"))? as usize;
    let meta_end = 12 + meta_len;
    let meta_bytes = bytes
        .get(12..meta_end)
        .ok_or_else(|| bad(12, "truncated metadata"))?;
    let meta_crc = u32_at(&bytes, meta_end).ok_or_else(|| bad(meta_end, "truncated header"))?;
    if crc32c::crc32c(meta_bytes) != meta_crc {
        return Err(bad(12, "metadata checksum mismatch"));
    }
    let meta = decode_meta(meta_bytes).ok_or_else(|| bad(12, "malformed metadata"))?;
    let len_at = meta_end + 4;
    let data_len = bytes
        .get(len_at..len_at + 8)
        .map(|b| u64::from_le_bytes(b.try_into().unwrap()) as usize)
        .ok_or_else(|| bad(len_at, "truncated header"))?;
    let data_start = len_at + 8;
    let data_end = data_start
        .checked_add(data_len)
        .filter(|&end| end + 4 == bytes.len())
        .ok_or_else(|| bad(len_at, "data length does not match the file size"))?;
    let data = bytes.slice(data_start..data_end);
    if crc32c::crc32c(&data) != u32_at(&bytes, data_end).unwrap() {
        return Err(bad(data_start, "data checksum mismatch"));
    }
    Ok(Snapshot { meta, data })
}

/// Sends a large file being written to the disk piece by piece, without fsync: each
/// [`WRITE_BEHIND`] bytes it starts the disk writing the piece just written and waits for
/// the piece before it (Linux's `sync_file_range`, which touches neither metadata nor the
/// file system's journal). So at most two pieces wait for the disk ahead of the log's
/// fsyncs, each of which is a client's write waiting. Left to itself, the kernel kept the
/// whole snapshot dirty until the final fsync and the log's fsyncs queued behind that
/// flush: with 64 clients writing 4 KiB values, puts' 99.9th percentile over a round that
/// wrote a 400 MB snapshot was 270–380 ms; with 8 MiB pieces 58 ms (but p99 24–27 ms, not
/// 13), with these 2 MiB pieces 40–62 ms and p99 14 ms; starting the writes without
/// waiting for any did not help (~300 ms). Elsewhere than Linux it does nothing.
#[derive(Default)]
struct WriteBehind {
    /// Where the piece being written starts, and the one before it.
    started: u64,
    previous: Option<u64>,
}

/// The size of the pieces [`WriteBehind`] sends to the disk.
const WRITE_BEHIND: u64 = 2 << 20;

impl WriteBehind {
    /// `w` now holds `end` bytes of the file (some perhaps still in its buffer).
    fn wrote(&mut self, w: &mut BufWriter<File>, end: u64) -> std::io::Result<()> {
        if end - self.started < WRITE_BEHIND {
            return Ok(());
        }
        w.flush()?;
        #[cfg(target_os = "linux")]
        {
            use std::os::fd::AsRawFd;
            let fd = w.get_ref().as_raw_fd();
            let range = |from: u64, to: u64, flags| {
                // SAFETY: a plain system call on a file descriptor `w` owns and keeps open.
                let rc =
                    unsafe { libc::sync_file_range(fd, from as i64, (to - from) as i64, flags) };
                match rc {
                    0 => Ok(()),
                    _ => Err(std::io::Error::last_os_error()),
                }
            };
            range(self.started, end, libc::SYNC_FILE_RANGE_WRITE)?;
            if let Some(previous) = self.previous {
                let wait = libc::SYNC_FILE_RANGE_WAIT_BEFORE
                    | libc::SYNC_FILE_RANGE_WRITE
                    | libc::SYNC_FILE_RANGE_WAIT_AFTER;
                range(previous, self.started, wait)?;
            }
        }
        self.previous = Some(self.started);
        self.started = end;
        Ok(())
    }
}

fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

/// The snapshot files mapped by this process, weakly: what [`release_mapped`] may act on.
/// Dead entries are pruned as mappings are added; a process maps a handful of snapshots.
static MAPPINGS: std::sync::Mutex<Vec<std::sync::Weak<memmap2::Mmap>>> =
    std::sync::Mutex::new(Vec::new());

/// The owner of a snapshot's bytes: a mapping [`release_mapped`] knows of.
struct Mapping(std::sync::Arc<memmap2::Mmap>);

impl AsRef<[u8]> for Mapping {
    fn as_ref(&self) -> &[u8] {
        &self.0
    }
}

fn mapped(map: memmap2::Mmap) -> Bytes {
    let map = std::sync::Arc::new(map);
    let mut all = MAPPINGS.lock().unwrap_or_else(|e| e.into_inner());
    all.retain(|m| m.strong_count() > 0);
    all.push(std::sync::Arc::downgrade(&map));
    drop(all);
    Bytes::from_owner(Mapping(map))
}

/// Drop the pages under `data` from this process's resident set, leaving them in the page
/// cache: a later read maps them back without going to disk. For a snapshot's data that a
/// member has just read through (decoding it, or pairing its values): the file stays the
/// store of those values, and need not be counted against the member while no client reads
/// them. Acts only where `data` lies within a snapshot file this module mapped (as
/// [`crate::SnapshotWriter::write_stream`] and [`crate::Storage::open`] answer them); on
/// anything else — a snapshot received into the heap, say — it does nothing, since there it
/// would zero the memory.
pub fn release_mapped(data: &[u8]) {
    let (from, to) = (data.as_ptr() as usize, data.as_ptr() as usize + data.len());
    let within = live_mappings().into_iter().find(|m| {
        let base = m.as_ptr() as usize;
        base <= from && to <= base + m.len()
    });
    // Held until the call is done: the mapping cannot go away under it.
    if let Some(_map) = within {
        dont_need(from, to);
    }
}

/// [`release_mapped`] for every snapshot file this process has mapped: for a thread that
/// reads values living in them (one writing a new snapshot), so that what it read does not
/// pile up in the resident set.
pub fn release_all_mapped() {
    for m in live_mappings() {
        let base = m.as_ptr() as usize;
        dont_need(base, base + m.len());
    }
}

fn live_mappings() -> Vec<std::sync::Arc<memmap2::Mmap>> {
    let all = MAPPINGS.lock().unwrap_or_else(|e| e.into_inner());
    all.iter().filter_map(std::sync::Weak::upgrade).collect()
}

/// Unmap the whole pages between `from` and `to`. The caller holds the live file mapping
/// they lie in.
fn dont_need(from: usize, to: usize) {
    #[cfg(target_os = "linux")]
    {
        let page = 4096;
        let start = from.div_ceil(page) * page;
        let end = to / page * page;
        if end > start {
            // SAFETY: the range lies within a live shared mapping of a file (the caller's
            // promise), for which DONTNEED only unmaps: clean pages are read back from the
            // page cache, and a read-only mapping has no dirty ones.
            unsafe {
                libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_DONTNEED);
            }
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = (from, to);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn snapshot_metas_keep_the_whole_configuration_and_old_ones_still_read() {
        let joint =
            Membership::from_parts(vec![1, 4, 5], vec![1, 2, 3], vec![9], vec![3], true).unwrap();
        let meta = SnapshotMeta {
            index: 7,
            term: 3,
            membership: joint,
        };
        assert_eq!(decode_meta(&encode_meta(&meta)), Some(meta.clone()));
        // Written before membership change: index, term, voters and nothing after.
        let mut old = Vec::new();
        for v in [7u64, 3] {
            old.extend_from_slice(&v.to_le_bytes());
        }
        old.extend_from_slice(&3u32.to_le_bytes());
        for v in [1u64, 2, 3] {
            old.extend_from_slice(&v.to_le_bytes());
        }
        let read = decode_meta(&old).unwrap();
        assert_eq!(read.membership, Membership::new(vec![1, 2, 3]));
        // A cut meta is refused, except exactly after the voters, where it is an old one
        // (the file's checksum is what catches truncation).
        let bytes = encode_meta(&meta);
        for cut in 0..bytes.len() {
            let m = decode_meta(&bytes[..cut]);
            assert!(m.is_none() || cut == 16 + 4 + 24, "cut {cut}");
        }
    }

    /// Released pages of a written snapshot read back as written: from the page cache, and
    /// from the disk once the cache has let them go too.
    #[test]
    fn released_pages_of_a_snapshot_read_back_unchanged() {
        let dir = tempfile::tempdir().unwrap();
        let store = SnapStore::open(dir.path()).unwrap();
        let meta = SnapshotMeta {
            index: 9,
            term: 2,
            membership: Membership::new(vec![1]),
        };
        let piece =
            |i: usize| Bytes::from((0..1 << 20).map(|j| (i * 7 + j) as u8).collect::<Vec<u8>>());
        let written: Vec<Bytes> = (0..8).map(piece).collect();
        let s = store.write_stream(meta, 8 << 20, written.clone()).unwrap();
        release_mapped(&s.data);
        assert_eq!(s.data, written.concat());
        // And again after asking the kernel to reclaim the file's pages (from its cache too).
        #[cfg(target_os = "linux")]
        // SAFETY: a hint over a mapping the test holds; contents never change.
        unsafe {
            let (p, len) = (s.data.as_ptr() as usize, s.data.len());
            let start = p.div_ceil(4096) * 4096;
            libc::madvise(
                start as *mut _,
                (p + len - start) / 4096 * 4096,
                libc::MADV_PAGEOUT,
            );
        }
        // A range that starts and ends inside pages.
        release_mapped(&s.data[12345..s.data.len() - 777]);
        assert_eq!(s.data, written.concat());
        // Memory that is not a snapshot file's is left alone (there, DONTNEED would zero it).
        let heap = written.concat();
        release_mapped(&heap);
        assert_eq!(heap, written.concat());
        let straddling = &s.data[s.data.len() - 10..];
        release_mapped(straddling);
        assert_eq!(s.data, written.concat());
        release_all_mapped();
        assert_eq!(s.data, written.concat());
    }
}
