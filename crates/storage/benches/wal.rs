//! WAL throughput with group commit, beside this disk's raw `fdatasync` rate.
//!
//! Run: `cargo bench -p storage --bench wal`. Files go under `target/bench-wal` (on the same
//! disk as the project; `/tmp` may be a RAM disk, which would make fsync meaningless), or
//! under `$BENCH_DIR`. Each figure is the median of 3 runs of 1.5 s.

use raft::{Entry, EntryKind};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use storage::{Batch, GroupCommit, Identity, Options, Storage};

const RUN: Duration = Duration::from_millis(1500);

fn bench_dir() -> PathBuf {
    std::env::var_os("BENCH_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../target/bench-wal"))
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

/// 4 KiB appended and fdatasync'd in a loop: the disk's own limit on durable writes.
fn raw_fdatasync(dir: &Path) -> f64 {
    let path = dir.join("raw");
    let _ = std::fs::remove_file(&path);
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .unwrap();
    let block = vec![0xa5u8; 4096];
    let (start, mut n) = (Instant::now(), 0u64);
    while start.elapsed() < RUN {
        f.write_all(&block).unwrap();
        f.sync_data().unwrap();
        n += 1;
    }
    n as f64 / start.elapsed().as_secs_f64()
}

struct Result {
    entries_per_s: f64,
    syncs_per_s: f64,
}

/// `producers` threads each append one entry of `size` bytes and wait until it is durable,
/// over and over — the shape of many clients writing through one raft log.
fn group_commit(dir: &Path, producers: usize, size: usize) -> Result {
    let _ = std::fs::remove_dir_all(dir);
    let id = Identity {
        cluster_id: 1,
        node_id: 1,
    };
    let (s, _) = Storage::open(dir, id, Options::default()).unwrap();
    let gc = Arc::new(GroupCommit::start(s));
    let next = Arc::new(Mutex::new(0u64));
    let payload = bytes::Bytes::from(vec![0x5au8; size]);
    let start = Instant::now();
    let threads: Vec<_> = (0..producers)
        .map(|_| {
            let (gc, next, payload) = (gc.clone(), next.clone(), payload.clone());
            std::thread::spawn(move || {
                let mut done = 0u64;
                while start.elapsed() < RUN {
                    let ticket = {
                        let mut n = next.lock().unwrap();
                        *n += 1;
                        let entry = Entry {
                            term: 1,
                            index: *n,
                            kind: EntryKind::Normal,
                            data: payload.clone(),
                        };
                        gc.submit(Batch {
                            entries: vec![entry],
                            ..Default::default()
                        })
                    };
                    gc.wait(ticket).unwrap();
                    done += 1;
                }
                done
            })
        })
        .collect();
    let total: u64 = threads.into_iter().map(|t| t.join().unwrap()).sum();
    let secs = start.elapsed().as_secs_f64();
    let syncs = gc.stats().syncs;
    Result {
        entries_per_s: total as f64 / secs,
        syncs_per_s: syncs as f64 / secs,
    }
}

fn main() {
    let dir = bench_dir();
    std::fs::create_dir_all(&dir).unwrap();
    let raw = median((0..3).map(|_| raw_fdatasync(&dir)).collect());
    println!("disk: {}", dir.display());
    println!("raw fdatasync (4 KiB appends): {raw:.0} syncs/s (median of 3)");
    println!();
    println!(
        "{:>6} {:>9} {:>12} {:>9} {:>10} {:>13}",
        "entry", "producers", "appends/s", "MB/s", "syncs/s", "syncs/raw"
    );
    for size in [100usize, 4096] {
        for producers in [1usize, 16, 64] {
            let runs: Vec<Result> = (0..3)
                .map(|_| group_commit(&dir.join("wal-bench"), producers, size))
                .collect();
            let rate = median(runs.iter().map(|r| r.entries_per_s).collect());
            let syncs = median(runs.iter().map(|r| r.syncs_per_s).collect());
            println!(
                "{:>6} {:>9} {:>12.0} {:>9.2} {:>10.0} {:>12.2}x",
                size,
                producers,
                rate,
                rate * size as f64 / 1e6,
                syncs,
                syncs / raw
            );
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
}
