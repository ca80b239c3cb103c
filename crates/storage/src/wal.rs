//! The write-ahead log: append-only segment files of framed records.
//!
//! Segments are named `{seq:016x}-{first_index:016x}.wal`; each starts with a `Segment`
//! record, the current hard state and the latest snapshot mark, so deleting older segments
//! never loses either. Entries are written in log order; an entry whose index is at or below the
//! last one overwrites the log from there (a follower's conflicting suffix). Every entry in
//! a segment is below the next segment's `first_index`, which is what makes deleting whole
//! segments below a snapshot safe.
//!
//! Recovery reads every segment and checks every checksum. In the last segment, a record
//! cut short or damaged at the very end is a torn write from a crash: it is cut off, with a
//! log line saying how many bytes. Anything else that fails to decode stops start-up with
//! an error naming the file and offset: committed entries are never dropped silently.

use crate::error::{Error, Result};
use crate::record::{self, Decoded, Record, HEADER_LEN};
use raft::{Entry, HardState, Index, Term};
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

/// Pending bytes are written to the file (not synced) past this size.
const WRITE_BUFFER: usize = 1 << 20;

#[derive(Debug)]
struct Segment {
    seq: u64,
    first_index: Index,
    path: PathBuf,
}

pub struct Wal {
    dir: PathBuf,
    segments: Vec<Segment>,
    file: File,
    file_len: u64,
    pending: Vec<u8>,
    segment_bytes: u64,
    last_index: Index,
    hard_state: HardState,
    /// Terms of the entries after the last snapshot, first at `terms_from`: what a
    /// snapshot mark's decision is taken against.
    terms: Vec<Term>,
    terms_from: Index,
    /// The latest snapshot mark, repeated at the head of every new segment.
    last_mark: Option<(Index, Term)>,
}

/// What recovery found.
#[derive(Debug, Default)]
pub struct Replayed {
    pub hard_state: HardState,
    /// The entries after the snapshot point, contiguous.
    pub entries: Vec<Entry>,
    /// Bytes cut off a torn tail.
    pub torn_bytes: u64,
}

/// Replays records into a log, applying the overwrite and snapshot rules.
#[derive(Default)]
struct Replay {
    entries: Vec<Entry>,
    hard_state: HardState,
    mark: Option<(Index, Term)>,
}

impl Replay {
    fn entry(&mut self, e: Entry) -> std::result::Result<(), String> {
        match self.entries.last() {
            Some(last) if e.index <= last.index => {
                let first = self.entries[0].index;
                self.entries
                    .truncate(e.index.saturating_sub(first) as usize);
            }
            Some(last) if e.index != last.index + 1 => {
                return Err(format!("entry {} follows entry {}", e.index, last.index));
            }
            // Covered by the snapshot. (A first entry past the mark is fine: the entries
            // between were in segments deleted under a later snapshot, and `finish` checks
            // that the final snapshot covers them.)
            None if self.mark.is_some_and(|(m, _)| e.index <= m) => return Ok(()),
            _ => {}
        }
        self.entries.push(e);
        Ok(())
    }

    /// §7: keep the entries after the snapshot if the log held its last entry, else none.
    fn apply_mark(&mut self, index: Index, term: Term, holds: bool) {
        if holds {
            self.entries.retain(|e| e.index > index);
        } else {
            self.entries.clear();
        }
        self.mark = Some((index, term));
    }
}

fn segment_name(seq: u64, first_index: Index) -> String {
    format!("{seq:016x}-{first_index:016x}.wal")
}

fn parse_name(name: &str) -> Option<(u64, Index)> {
    let stem = name.strip_suffix(".wal")?;
    let (seq, first) = stem.split_once('-')?;
    Some((
        u64::from_str_radix(seq, 16).ok()?,
        u64::from_str_radix(first, 16).ok()?,
    ))
}

impl Wal {
    /// Open (or create) the WAL in `dir` and replay it on top of the snapshot at
    /// `snapshot` (index, term), if any.
    pub fn open(
        dir: &Path,
        snapshot: Option<(Index, Term)>,
        segment_bytes: u64,
    ) -> Result<(Wal, Replayed)> {
        fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        let segments = list_segments(dir)?;
        let mut replay = Replay::default();
        let mut torn_bytes = 0;
        for (i, seg) in segments.iter().enumerate() {
            let last = i + 1 == segments.len();
            torn_bytes += replay_segment(seg, last, &mut replay)?;
        }
        let (entries, unmarked) = finish(
            dir,
            replay.entries,
            replay.mark,
            snapshot,
            &mut replay.hard_state,
        )?;
        let last_index = entries
            .last()
            .map_or(snapshot.map_or(0, |s| s.0), |e| e.index);
        let hard_state = replay.hard_state;
        let mut wal = match segments.last() {
            Some(seg) => {
                let file = OpenOptions::new()
                    .append(true)
                    .open(&seg.path)
                    .map_err(|e| Error::io(&seg.path, e))?;
                let file_len = file.metadata().map_err(|e| Error::io(&seg.path, e))?.len();
                Wal {
                    dir: dir.to_path_buf(),
                    segments,
                    file,
                    file_len,
                    pending: Vec::new(),
                    segment_bytes,
                    last_index,
                    hard_state,
                    terms: Vec::new(),
                    terms_from: 0,
                    last_mark: None,
                }
            }
            None => Wal::create_first(dir, segment_bytes, last_index, hard_state)?,
        };
        wal.terms_from = entries.first().map_or(last_index + 1, |e| e.index);
        wal.terms = entries.iter().map(|e| e.term).collect();
        wal.last_mark = snapshot.or(replay.mark);
        if wal.file_len == 0 {
            wal.write_segment_header()?;
        }
        if let Some(keep_suffix) = unmarked {
            // The snapshot became durable but its mark did not: record the decision taken,
            // so the next recovery reaches the same log.
            let (index, term) = snapshot.unwrap();
            let mark = Record::SnapshotMark {
                index,
                term,
                keep_suffix,
            };
            record::encode(&mark, &mut wal.pending);
            wal.sync()?;
        }
        let replayed = Replayed {
            hard_state,
            entries,
            torn_bytes,
        };
        Ok((wal, replayed))
    }

    fn create_first(dir: &Path, segment_bytes: u64, last: Index, hs: HardState) -> Result<Wal> {
        let seg = Segment {
            seq: 1,
            first_index: last + 1,
            path: dir.join(segment_name(1, last + 1)),
        };
        let file = create_file(&seg.path)?;
        crate::sync_dir(dir)?;
        Ok(Wal {
            dir: dir.to_path_buf(),
            segments: vec![seg],
            file,
            file_len: 0,
            pending: Vec::new(),
            segment_bytes,
            last_index: last,
            hard_state: hs,
            terms: Vec::new(),
            terms_from: 0,
            last_mark: None,
        })
    }

    fn write_segment_header(&mut self) -> Result<()> {
        let seg = self.segments.last().unwrap();
        let header = Record::Segment {
            seq: seg.seq,
            first_index: seg.first_index,
        };
        record::encode(&header, &mut self.pending);
        record::encode(&Record::HardState(self.hard_state), &mut self.pending);
        if let Some((index, term)) = self.last_mark {
            // Already applied where it was first written; here it only has to survive.
            let mark = Record::SnapshotMark {
                index,
                term,
                keep_suffix: true,
            };
            record::encode(&mark, &mut self.pending);
        }
        self.sync()
    }

    /// Buffer a hard state and entries (entries overwrite the log from their first index).
    /// Nothing is durable until [`Wal::sync`].
    pub fn append(&mut self, hs: Option<HardState>, entries: &[Entry]) -> Result<()> {
        if let Some(first) = entries.first() {
            let end = self.terms_from + self.terms.len() as Index;
            if first.index < self.terms_from || first.index > end || self.terms.is_empty() {
                self.terms.clear();
                self.terms_from = first.index;
            }
            self.terms
                .truncate((first.index - self.terms_from) as usize);
        }
        for e in entries {
            record::encode(&Record::Entry(e.clone()), &mut self.pending);
            self.terms.push(e.term);
        }
        if let Some(last) = entries.last() {
            self.last_index = last.index;
        }
        if let Some(hs) = hs {
            record::encode(&Record::HardState(hs), &mut self.pending);
            self.hard_state = hs;
        }
        self.maybe_rotate_or_flush()
    }

    /// Record that a snapshot at (index, term) now covers the log.
    pub fn mark_snapshot(&mut self, index: Index, term: Term) -> Result<()> {
        let at = index.checked_sub(self.terms_from).map(|i| i as usize);
        let keep_suffix = match at.and_then(|i| self.terms.get(i)) {
            Some(&t) => t == term,
            // Marking the point already marked (a snapshot recorded at recovery, say): the
            // entries after it stay.
            None => self.last_mark == Some((index, term)),
        };
        match at {
            Some(i) if keep_suffix => drop(self.terms.drain(..=i)),
            _ if keep_suffix => {}
            _ => self.terms.clear(),
        }
        self.terms_from = index + 1;
        self.last_mark = Some((index, term));
        let mark = Record::SnapshotMark {
            index,
            term,
            keep_suffix,
        };
        record::encode(&mark, &mut self.pending);
        self.last_index = self.last_index.max(index);
        self.maybe_rotate_or_flush()
    }

    fn maybe_rotate_or_flush(&mut self) -> Result<()> {
        if self.file_len + self.pending.len() as u64 >= self.segment_bytes {
            return self.rotate();
        }
        if self.pending.len() >= WRITE_BUFFER {
            self.flush()?;
        }
        Ok(())
    }

    fn flush(&mut self) -> Result<()> {
        if self.pending.is_empty() {
            return Ok(());
        }
        let path = &self.segments.last().unwrap().path;
        self.file
            .write_all(&self.pending)
            .map_err(|e| Error::io(path, e))?;
        self.file_len += self.pending.len() as u64;
        self.pending.clear();
        Ok(())
    }

    /// Make everything appended so far durable: one `fdatasync` for all of it.
    pub fn sync(&mut self) -> Result<()> {
        self.flush()?;
        let path = &self.segments.last().unwrap().path;
        self.file.sync_data().map_err(|e| Error::io(path, e))
    }

    /// Seal the active segment (durably) and start the next one.
    fn rotate(&mut self) -> Result<()> {
        self.sync()?;
        let prev = self.segments.last().unwrap();
        let seg = Segment {
            seq: prev.seq + 1,
            first_index: self.last_index + 1,
            path: self
                .dir
                .join(segment_name(prev.seq + 1, self.last_index + 1)),
        };
        self.file = create_file(&seg.path)?;
        self.file_len = 0;
        self.segments.push(seg);
        crate::sync_dir(&self.dir)?;
        self.write_segment_header()
    }

    /// Delete the segments whose entries all lie at or below `snapshot_index`. Returns how
    /// many were deleted. The active segment is never deleted.
    pub fn compact(&mut self, snapshot_index: Index) -> Result<usize> {
        let mut removed = 0;
        while self.segments.len() > 1 && self.segments[1].first_index <= snapshot_index + 1 {
            let seg = self.segments.remove(0);
            fs::remove_file(&seg.path).map_err(|e| Error::io(&seg.path, e))?;
            removed += 1;
        }
        if removed > 0 {
            crate::sync_dir(&self.dir)?;
        }
        Ok(removed)
    }

    pub fn segment_count(&self) -> usize {
        self.segments.len()
    }
}

fn create_file(path: &Path) -> Result<File> {
    OpenOptions::new()
        .create_new(true)
        .append(true)
        .open(path)
        .map_err(|e| Error::io(path, e))
}

fn list_segments(dir: &Path) -> Result<Vec<Segment>> {
    let mut segments = Vec::new();
    for entry in fs::read_dir(dir).map_err(|e| Error::io(dir, e))? {
        let entry = entry.map_err(|e| Error::io(dir, e))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if !name.ends_with(".wal") {
            continue;
        }
        let (seq, first_index) = parse_name(&name)
            .ok_or_else(|| Error::corrupt(entry.path(), 0, "unrecognised segment file name"))?;
        segments.push(Segment {
            seq,
            first_index,
            path: entry.path(),
        });
    }
    segments.sort_by_key(|s| s.seq);
    for pair in segments.windows(2) {
        if pair[1].seq != pair[0].seq + 1 {
            return Err(Error::corrupt(
                &pair[1].path,
                0,
                format!("segment {} is missing before it", pair[0].seq + 1),
            ));
        }
    }
    Ok(segments)
}

/// Replay one segment; returns the bytes cut off a torn tail (last segment only).
fn replay_segment(seg: &Segment, last: bool, replay: &mut Replay) -> Result<u64> {
    let data = fs::read(&seg.path).map_err(|e| Error::io(&seg.path, e))?;
    let mut offset = 0usize;
    while offset < data.len() {
        let rest = &data[offset..];
        let failure = match record::decode(rest) {
            Decoded::Record(rec, len) => {
                apply(seg, offset, rec, replay)?;
                offset += len;
                continue;
            }
            Decoded::Incomplete => "record cut short",
            Decoded::Corrupt(what) => what,
            Decoded::BadHeader => "record header checksum mismatch",
        };
        if last && is_torn_tail(rest) {
            return cut_tail(&seg.path, offset as u64, data.len() as u64);
        }
        return Err(Error::corrupt(&seg.path, offset as u64, failure));
    }
    if offset == 0 && !last {
        return Err(Error::corrupt(&seg.path, 0, "empty sealed segment"));
    }
    Ok(0)
}

/// A record that fails to decode in the last segment is a write cut short by a crash if
/// its (checksummed) header says it is the file's final record, or if nothing but zeroes
/// follows (blocks the file system extended but never wrote). Anything else is damage.
fn is_torn_tail(rest: &[u8]) -> bool {
    if rest.len() < HEADER_LEN || rest.iter().all(|&b| b == 0) {
        return true;
    }
    record::claimed_len(rest).is_some_and(|len| HEADER_LEN + len >= rest.len())
}

fn cut_tail(path: &Path, offset: u64, file_len: u64) -> Result<u64> {
    let cut = file_len - offset;
    tracing::warn!(
        file = %path.display(),
        offset,
        bytes = cut,
        "cutting off a torn write at the end of the log"
    );
    let f = OpenOptions::new()
        .write(true)
        .open(path)
        .map_err(|e| Error::io(path, e))?;
    f.set_len(offset)
        .and_then(|_| f.sync_all())
        .map_err(|e| Error::io(path, e))?;
    Ok(cut)
}

fn apply(seg: &Segment, offset: usize, rec: Record, replay: &mut Replay) -> Result<()> {
    let bad = |what: String| Error::corrupt(&seg.path, offset as u64, what);
    match rec {
        Record::Segment { seq, .. } if offset == 0 && seq == seg.seq => Ok(()),
        Record::Segment { .. } => Err(bad("unexpected segment header".into())),
        _ if offset == 0 => Err(bad("segment does not start with its header".into())),
        Record::Entry(e) => replay.entry(e).map_err(bad),
        Record::HardState(hs) => {
            replay.hard_state = hs;
            Ok(())
        }
        Record::SnapshotMark {
            index,
            term,
            keep_suffix,
        } => {
            replay.apply_mark(index, term, keep_suffix);
            Ok(())
        }
    }
}

/// Reconcile the replayed log with the latest snapshot file.
/// Returns the log, and the §7 decision taken if the snapshot's mark was missing (it must
/// then be recorded).
fn finish(
    dir: &Path,
    mut entries: Vec<Entry>,
    mark: Option<(Index, Term)>,
    snapshot: Option<(Index, Term)>,
    hs: &mut HardState,
) -> Result<(Vec<Entry>, Option<bool>)> {
    let bad = |what: String| Error::corrupt(dir, 0, what);
    let (snap_index, snap_term) = snapshot.unwrap_or((0, 0));
    if let Some((m, _)) = mark {
        if m > snap_index {
            return Err(bad(format!(
                "the log refers to a snapshot at index {m}, but the newest snapshot file ends at \
                 {snap_index}"
            )));
        }
    }
    let mut unmarked = None;
    if snapshot.is_some() && mark.is_none_or(|(m, _)| m < snap_index) {
        // The snapshot became durable but its mark did not: apply the same rule now.
        let holds = entries
            .iter()
            .any(|e| e.index == snap_index && e.term == snap_term);
        let mut r = Replay {
            entries,
            ..Default::default()
        };
        r.apply_mark(snap_index, snap_term, holds);
        entries = r.entries;
        unmarked = Some(holds);
    }
    entries.retain(|e| e.index > snap_index);
    if let Some(first) = entries.first() {
        if first.index != snap_index + 1 {
            return Err(bad(format!(
                "the log starts at index {}, but entries {}..{} are in no snapshot",
                first.index,
                snap_index + 1,
                first.index
            )));
        }
    }
    let last = entries.last().map_or(snap_index, |e| e.index);
    hs.commit = hs.commit.min(last);
    Ok((entries, unmarked))
}
