//! Recovery: what was reported durable survives; a torn tail is cut; damage anywhere else
//! stops start-up with the file and offset; another cluster's data is refused.

use raft::{Entry, EntryKind, HardState, Snapshot, SnapshotMeta};
use std::fs;
use std::path::{Path, PathBuf};
use storage::{Error, Identity, Options, Storage};

const ID: Identity = Identity {
    cluster_id: 0xc105,
    node_id: 1,
};

fn ent(index: u64, term: u64, size: usize) -> Entry {
    let mut data = index.to_le_bytes().to_vec();
    data.resize(size.max(8), term as u8);
    Entry {
        term,
        index,
        kind: EntryKind::Normal,
        data: data.into(),
    }
}

fn ents(range: std::ops::RangeInclusive<u64>, term: u64) -> Vec<Entry> {
    range.map(|i| ent(i, term, 40)).collect()
}

fn hs(term: u64, commit: u64) -> HardState {
    HardState {
        term,
        vote: Some(1),
        commit,
    }
}

fn open(dir: &Path) -> storage::Result<(Storage, raft::RestoreState)> {
    Storage::open(dir, ID, Options::default())
}

fn small_segments(dir: &Path) -> (Storage, raft::RestoreState) {
    Storage::open(
        dir,
        ID,
        Options {
            segment_bytes: 2048,
        },
    )
    .unwrap()
}

fn copy_dir(from: &Path, to: &Path) {
    fs::create_dir_all(to).unwrap();
    for e in fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let target = to.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            copy_dir(&e.path(), &target);
        } else {
            fs::copy(e.path(), target).unwrap();
        }
    }
}

fn segments(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = fs::read_dir(dir.join("wal"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    v.sort();
    v
}

#[test]
fn what_was_synced_comes_back() {
    let dir = tempfile::tempdir().unwrap();
    {
        let (mut s, state) = open(dir.path()).unwrap();
        assert!(state.entries.is_empty() && state.snapshot.is_none());
        s.save(None, Some(hs(2, 3)), &ents(1..=10, 2)).unwrap();
        s.sync().unwrap();
    }
    let (_, state) = open(dir.path()).unwrap();
    assert_eq!(state.entries, ents(1..=10, 2));
    assert_eq!(state.hard_state, hs(2, 3));
}

#[test]
fn an_overwritten_suffix_stays_overwritten() {
    let dir = tempfile::tempdir().unwrap();
    {
        let (mut s, _) = open(dir.path()).unwrap();
        s.save(None, Some(hs(1, 2)), &ents(1..=10, 1)).unwrap();
        s.save(None, Some(hs(2, 2)), &ents(6..=8, 2)).unwrap();
        s.sync().unwrap();
    }
    let (_, state) = open(dir.path()).unwrap();
    let mut want = ents(1..=5, 1);
    want.extend(ents(6..=8, 2));
    assert_eq!(state.entries, want);
}

#[test]
fn segments_rotate_and_compaction_deletes_those_below_the_snapshot() {
    let dir = tempfile::tempdir().unwrap();
    let snap = Snapshot {
        meta: SnapshotMeta {
            index: 900,
            term: 3,
            membership: raft::Membership::new(vec![1, 2, 3]),
        },
        data: vec![42; 10_000].into(),
    };
    {
        let (mut s, _) = small_segments(dir.path());
        for chunk in 0..100 {
            let lo = chunk * 10 + 1;
            s.save(None, Some(hs(3, lo + 9)), &ents(lo..=lo + 9, 3))
                .unwrap();
            s.sync().unwrap();
        }
        let before = s.segment_count();
        assert!(before > 20, "only {before} segments");
        s.compact(&snap).unwrap();
        assert!(
            s.segment_count() < before / 5,
            "compaction kept {}",
            s.segment_count()
        );
    }
    let (_, state) = small_segments(dir.path());
    assert_eq!(state.snapshot.as_ref().unwrap().meta, snap.meta);
    assert_eq!(state.snapshot.unwrap().data, snap.data);
    assert_eq!(state.entries, ents(901..=1000, 3));
    assert_eq!(
        state.hard_state,
        hs(3, 1000),
        "the latest hard state survives compaction"
    );
}

#[test]
fn a_snapshot_that_conflicts_with_the_log_replaces_it() {
    let dir = tempfile::tempdir().unwrap();
    let snap = Snapshot {
        meta: SnapshotMeta {
            index: 8,
            term: 5,
            membership: raft::Membership::new(vec![1, 2, 3]),
        },
        data: b"state".to_vec().into(),
    };
    {
        let (mut s, _) = open(dir.path()).unwrap();
        s.save(None, Some(hs(2, 3)), &ents(1..=12, 2)).unwrap();
        // A follower installs a snapshot whose last entry (8, term 5) it does not hold,
        // then appends what the new leader sends after it.
        s.save(Some(&snap), Some(hs(5, 8)), &ents(9..=10, 5))
            .unwrap();
        s.sync().unwrap();
    }
    let (_, state) = open(dir.path()).unwrap();
    assert_eq!(state.snapshot.unwrap().meta.index, 8);
    assert_eq!(
        state.entries,
        ents(9..=10, 5),
        "stale entries 9..12 of term 2 must be gone"
    );
}

#[test]
fn another_clusters_data_and_newer_formats_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    {
        let (mut s, _) = open(dir.path()).unwrap();
        s.save(None, Some(hs(1, 0)), &ents(1..=3, 1)).unwrap();
        s.sync().unwrap();
    }
    let other = Identity {
        cluster_id: 0xbeef,
        node_id: 1,
    };
    let err = Storage::open(dir.path(), other, Options::default())
        .err()
        .unwrap();
    assert!(matches!(err, Error::Identity(_)));
    assert!(err.to_string().contains("another cluster"), "{err}");
    let wrong_node = Identity { node_id: 2, ..ID };
    let err = Storage::open(dir.path(), wrong_node, Options::default())
        .err()
        .unwrap();
    assert!(err.to_string().contains("node 1"), "{err}");
    // A directory written by a newer format.
    let id_path = dir.path().join("IDENTITY");
    let text = fs::read_to_string(&id_path).unwrap();
    let body = text
        .split("crc ")
        .next()
        .unwrap()
        .replace("format 1", "format 9");
    let newer = format!("{body}crc {:08x}\n", crc32c::crc32c(body.as_bytes()));
    fs::write(&id_path, newer).unwrap();
    let err = open(dir.path()).err().unwrap();
    assert!(err.to_string().contains("newer"), "{err}");
    // Data but no identity at all.
    fs::remove_file(&id_path).unwrap();
    let err = open(dir.path()).err().unwrap();
    assert!(err.to_string().contains("IDENTITY"), "{err}");
}

/// Write `durable` entries and sync; then `more` entries and sync. Returns the WAL bytes of
/// the last segment at the first sync point and at the end.
fn write_log(dir: &Path, durable: u64, more: u64) -> (u64, u64) {
    let (mut s, _) = open(dir).unwrap();
    s.save(None, Some(hs(1, 0)), &ents(1..=durable, 1)).unwrap();
    s.sync().unwrap();
    let seg = segments(dir).pop().unwrap();
    let durable_len = fs::metadata(&seg).unwrap().len();
    for i in durable + 1..=durable + more {
        s.save(None, None, &[ent(i, 1, 40 + i as usize)]).unwrap();
    }
    s.sync().unwrap();
    (durable_len, fs::metadata(&seg).unwrap().len())
}

#[test]
fn a_torn_tail_is_cut_at_every_byte_offset_and_nothing_durable_is_lost() {
    let dir = tempfile::tempdir().unwrap();
    let (durable_len, full_len) = write_log(dir.path(), 20, 5);
    let written: Vec<Entry> = (1..=25)
        .map(|i| {
            if i <= 20 {
                ent(i, 1, 40)
            } else {
                ent(i, 1, 40 + i as usize)
            }
        })
        .collect();
    for cut in durable_len..=full_len {
        let copy = tempfile::tempdir().unwrap();
        copy_dir(dir.path(), copy.path());
        let seg = segments(copy.path()).pop().unwrap();
        fs::OpenOptions::new()
            .write(true)
            .open(&seg)
            .unwrap()
            .set_len(cut)
            .unwrap();
        let (mut s, state) = open(copy.path()).unwrap_or_else(|e| panic!("cut at {cut}: {e}"));
        let n = state.entries.len();
        assert!(n >= 20, "cut at {cut}: lost durable entries ({n} left)");
        assert_eq!(
            state.entries[..],
            written[..n],
            "cut at {cut}: not a prefix"
        );
        // The log is writable again, and what is written next survives.
        let next = ent(n as u64 + 1, 2, 10);
        s.save(None, Some(hs(2, 0)), std::slice::from_ref(&next))
            .unwrap();
        s.sync().unwrap();
        drop(s);
        let (_, again) = open(copy.path()).unwrap();
        assert_eq!(again.entries.last(), Some(&next), "cut at {cut}");
    }
}

#[test]
fn a_flipped_bit_anywhere_but_the_tail_stops_start_up_with_file_and_offset() {
    let dir = tempfile::tempdir().unwrap();
    write_log(dir.path(), 12, 0);
    let seg = segments(dir.path()).pop().unwrap();
    let bytes = fs::read(&seg).unwrap();
    let last_record_start = {
        // Find where the final record begins by walking the framing.
        let mut at = 0;
        let mut last = 0;
        while at < bytes.len() {
            last = at;
            at += storage::record::HEADER_LEN + storage::record::claimed_len(&bytes[at..]).unwrap();
        }
        last
    };
    let mut refused = 0;
    for pos in 0..bytes.len() {
        let copy = tempfile::tempdir().unwrap();
        copy_dir(dir.path(), copy.path());
        let seg_copy = segments(copy.path()).pop().unwrap();
        let mut b = bytes.clone();
        b[pos] ^= 0x10;
        fs::write(&seg_copy, &b).unwrap();
        match open(copy.path()) {
            Err(Error::Corrupt { path, offset, .. }) => {
                assert_eq!(path, seg_copy);
                assert!(
                    offset as usize <= pos,
                    "offset {offset} past the flip at {pos}"
                );
                refused += 1;
            }
            Err(e) => panic!("flip at {pos}: unexpected error {e}"),
            Ok((_, state)) => {
                // Only damage to the final record may pass as a torn write.
                assert!(pos >= last_record_start, "flip at {pos} went unnoticed");
                assert_eq!(state.entries, ents(1..=state.entries.len() as u64, 1));
            }
        }
    }
    assert!(refused >= last_record_start, "only {refused} flips refused");
}

#[test]
fn a_damaged_snapshot_is_refused_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let snap = Snapshot {
        meta: SnapshotMeta {
            index: 3,
            term: 1,
            membership: raft::Membership::new(vec![1]),
        },
        data: vec![7; 5000].into(),
    };
    {
        let (mut s, _) = open(dir.path()).unwrap();
        s.save(None, Some(hs(1, 3)), &ents(1..=3, 1)).unwrap();
        s.compact(&snap).unwrap();
    }
    let file = fs::read_dir(dir.path().join("snap"))
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    let mut b = fs::read(&file).unwrap();
    b[2000] ^= 1;
    fs::write(&file, b).unwrap();
    match open(dir.path()) {
        Err(Error::Corrupt { path, .. }) => assert_eq!(path, file),
        other => panic!("expected corruption, got {:?}", other.err()),
    }
}

#[test]
fn group_commit_shares_syncs_and_reports_durability() {
    let dir = tempfile::tempdir().unwrap();
    let (s, _) = open(dir.path()).unwrap();
    let gc = std::sync::Arc::new(storage::GroupCommit::start(s));
    let next = std::sync::Arc::new(std::sync::Mutex::new(0u64));
    let threads: Vec<_> = (0..8)
        .map(|_| {
            let (gc, next) = (gc.clone(), next.clone());
            std::thread::spawn(move || {
                for _ in 0..50 {
                    // Indexes are taken and submitted under one lock, so the log stays in order.
                    let ticket = {
                        let mut n = next.lock().unwrap();
                        *n += 1;
                        gc.submit(storage::Batch {
                            entries: vec![ent(*n, 1, 100)],
                            ..Default::default()
                        })
                    };
                    gc.wait(ticket).unwrap();
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    let stats = gc.stats();
    assert_eq!(stats.batches, 400);
    assert!(stats.syncs < stats.batches, "no batching: {stats:?}");
    assert_eq!(gc.durable_entry(), Some((400, 1)));
    drop(std::sync::Arc::try_unwrap(gc).ok().unwrap().stop());
    let (_, state) = open(dir.path()).unwrap();
    assert_eq!(state.entries.len(), 400);
}

/// A crash after a snapshot file became durable but before its mark reached the log:
/// recovery applies §7's rule itself, records the decision, and the next recovery agrees.
#[test]
fn a_crash_between_snapshot_file_and_mark_recovers_consistently() {
    for conflict in [false, true] {
        let dir = tempfile::tempdir().unwrap();
        let term = if conflict { 9 } else { 1 };
        let snap = Snapshot {
            meta: SnapshotMeta {
                index: 5,
                term,
                membership: raft::Membership::new(vec![1]),
            },
            data: b"s".to_vec().into(),
        };
        {
            let (mut s, _) = open(dir.path()).unwrap();
            s.save(None, Some(hs(1, 4)), &ents(1..=8, 1)).unwrap();
            s.sync().unwrap();
            // The snapshot file is made durable inside `save`; the mark is only buffered,
            // and the process dies before the next sync.
            s.save(Some(&snap), None, &[]).unwrap();
        }
        let want = if conflict { vec![] } else { ents(6..=8, 1) };
        let (mut s, state) = open(dir.path()).unwrap();
        assert_eq!(state.snapshot.unwrap().meta.index, 5);
        assert_eq!(state.entries, want, "conflict={conflict}");
        // New entries after recovery survive the next restart unchanged.
        let next = if conflict {
            ents(6..=6, 9)
        } else {
            ents(9..=9, 1)
        };
        s.save(None, Some(hs(term, 5)), &next).unwrap();
        s.sync().unwrap();
        drop(s);
        let (_, again) = open(dir.path()).unwrap();
        let mut want = want;
        want.extend(next);
        assert_eq!(again.entries, want, "conflict={conflict}");
    }
}

#[test]
fn a_snapshot_written_off_thread_counts_once_recorded_and_its_predecessor_goes_then() {
    let dir = tempfile::tempdir().unwrap();
    let snap = |index: u64| Snapshot {
        meta: SnapshotMeta {
            index,
            term: 1,
            membership: raft::Membership::new(vec![1]),
        },
        data: vec![index as u8; 100].into(),
    };
    let snap_files = |d: &Path| std::fs::read_dir(d.join("snap")).unwrap().count();
    let (mut s, _) = open(dir.path()).unwrap();
    s.save(None, Some(hs(1, 12)), &ents(1..=12, 1)).unwrap();
    s.sync().unwrap();
    s.compact(&snap(4)).unwrap();
    // Written by another thread while the log keeps going; the process dies before the
    // log records it. Recovery uses the newest complete snapshot and the entries after it.
    let writer = s.snapshot_writer();
    std::thread::spawn(move || writer.write(&snap(8)).unwrap())
        .join()
        .unwrap();
    assert_eq!(
        snap_files(dir.path()),
        2,
        "the older snapshot stays until recorded"
    );
    drop(s);
    let (mut s, state) = open(dir.path()).unwrap();
    assert_eq!(state.snapshot.as_ref().unwrap().data, snap(8).data);
    assert_eq!(state.entries, ents(9..=12, 1));
    // Recording it does not write it again, and removes the predecessor.
    s.compact(&snap(8)).unwrap();
    assert_eq!(snap_files(dir.path()), 1);
    drop(s);
    let (_, state) = open(dir.path()).unwrap();
    assert_eq!(state.snapshot.unwrap().meta.index, 8);
    assert_eq!(state.entries, ents(9..=12, 1));
}

/// A snapshot written from chunks reads back whole, is answered with exactly its bytes (the
/// file mapped, for the core to send followers), and chunks that fall short of or overrun
/// the announced length are refused without leaving a file that recovery could pick up.
#[test]
fn a_snapshot_streamed_in_chunks_reads_back_whole_and_a_wrong_length_leaves_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let meta = |index: u64| SnapshotMeta {
        index,
        term: 1,
        membership: raft::Membership::new(vec![1]),
    };
    let chunks: Vec<bytes::Bytes> = (0..5u8)
        .map(|i| vec![i; 1000 + i as usize].into())
        .collect();
    let whole: Vec<u8> = chunks.iter().flat_map(|c| c.iter().copied()).collect();
    let (mut s, _) = open(dir.path()).unwrap();
    s.save(None, Some(hs(1, 12)), &ents(1..=12, 1)).unwrap();
    s.sync().unwrap();
    let writer = s.snapshot_writer();
    let written = writer
        .write_stream(meta(6), whole.len() as u64, chunks.clone())
        .unwrap();
    assert_eq!(&written.data[..], &whole[..]);
    assert_eq!(written.meta, meta(6));
    s.compact(&written).unwrap();
    // Short by a byte, and one byte over: refused, and nothing of them stays on disk.
    for len in [whole.len() as u64 + 1, whole.len() as u64 - 1] {
        let e = writer
            .write_stream(meta(10), len, chunks.clone())
            .unwrap_err();
        assert!(e.to_string().contains("bytes, not the"), "{e}");
    }
    let names: Vec<_> = fs::read_dir(dir.path().join("snap"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert_eq!(names, vec![format!("{:016x}-{:016x}.snap", 6, 1)]);
    drop(s);
    let (_, state) = open(dir.path()).unwrap();
    let snap = state.snapshot.unwrap();
    assert_eq!((snap.meta.index, &snap.data[..]), (6, &whole[..]));
    assert_eq!(state.entries, ents(7..=12, 1));
}

/// A snapshot of many megabytes goes to disk piece by piece as it is written (with
/// `sync_file_range` on Linux); every byte still arrives where it belongs.
#[test]
fn a_snapshot_larger_than_the_write_behind_pieces_reads_back_whole() {
    let dir = tempfile::tempdir().unwrap();
    let meta = SnapshotMeta {
        index: 6,
        term: 1,
        membership: raft::Membership::new(vec![1]),
    };
    // 20 MiB plus a little in uneven chunks, each byte telling where it lies.
    let whole: Vec<u8> = (0..(20u32 << 20) + 12345)
        .map(|i| (i % 251) as u8)
        .collect();
    let chunks: Vec<bytes::Bytes> = whole
        .chunks(777_777)
        .map(bytes::Bytes::copy_from_slice)
        .collect();
    let (mut s, _) = open(dir.path()).unwrap();
    s.save(None, Some(hs(1, 6)), &ents(1..=6, 1)).unwrap();
    s.sync().unwrap();
    let written = s
        .snapshot_writer()
        .write_stream(meta, whole.len() as u64, chunks)
        .unwrap();
    assert!(written.data[..] == whole[..]);
    s.compact(&written).unwrap();
    drop(s);
    let (_, state) = open(dir.path()).unwrap();
    assert!(state.snapshot.unwrap().data[..] == whole[..]);
}
