//! Benchmark of the two candidate on-disk value engines for raftkv's state
//! machine: redb (copy-on-write B-tree) and fjall (LSM tree).
//!
//! `engine-bench all` runs every configuration twice, each run in its own
//! child process (so the memory high-water mark belongs to one engine), and
//! prints a table at the end. `engine-bench one <config> <run>` runs one.
//! See README.md for the workload.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

mod engines;

use engines::*;

const VALUE_LEN: usize = 4096;
const BATCH: u64 = 100;
const GETS: usize = 200_000;
const SCANS: usize = 2_000;
const SCAN_LEN: usize = 100;
const BASELINE_BATCHES: u64 = 200;
const DATA_ROOT: &str = "/work/engines-data";
const CONFIGS: [&str; 4] = ["redb", "redb-64m", "fjall", "fjall-kv"];

// ---------------------------------------------------------------- workload data

/// Number of keys loaded; `ENGINE_BENCH_KEYS` overrides it for a smoke test.
fn key_count() -> u64 {
    std::env::var("ENGINE_BENCH_KEYS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(250_000)
}

fn key(i: u64) -> [u8; 16] {
    let s = format!("{i:016}");
    let mut k = [0u8; 16];
    k.copy_from_slice(s.as_bytes());
    k
}

fn key_index(k: &[u8]) -> u64 {
    std::str::from_utf8(k).unwrap().parse().unwrap()
}

struct XorShift(u64);

impl XorShift {
    fn new(seed: u64) -> Self {
        XorShift(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// The first 8 bytes of value(i); lets the stream check values cheaply.
fn value_tag(i: u64) -> [u8; 8] {
    XorShift::new(i + 1).next().to_le_bytes()
}

/// A 4 KiB value derived from the key index: 64 chunks of 64 bytes, each
/// either fresh pseudo-random bytes or (one time in four) a copy of an earlier
/// chunk, so LZ4 can shrink it a little but not much.
fn fill_value(i: u64, out: &mut [u8]) {
    debug_assert_eq!(out.len(), VALUE_LEN);
    // The first output of this generator is value_tag(i), so it lands in bytes 0..8.
    let mut rng = XorShift::new(i + 1);
    for c in 0..VALUE_LEN / 64 {
        if c > 0 {
            let r = rng.next();
            if r.is_multiple_of(4) {
                let src = ((r >> 8) % c as u64) as usize * 64;
                out.copy_within(src..src + 64, c * 64);
                continue;
            }
        }
        for w in 0..8 {
            let at = c * 64 + w * 8;
            out[at..at + 8].copy_from_slice(&rng.next().to_le_bytes());
        }
    }
}

/// Keys and values of one batch, generated before the commit is timed.
struct BatchData {
    keys: Vec<[u8; 16]>,
    values: Vec<u8>,
}

impl BatchData {
    fn new(first: u64, n: u64) -> Self {
        let mut values = vec![0u8; n as usize * VALUE_LEN];
        let keys = (0..n)
            .map(|j| {
                fill_value(
                    first + j,
                    &mut values[j as usize * VALUE_LEN..][..VALUE_LEN],
                );
                key(first + j)
            })
            .collect();
        BatchData { keys, values }
    }
    fn iter(&self) -> impl Iterator<Item = (&[u8], &[u8])> {
        self.keys
            .iter()
            .zip(self.values.chunks_exact(VALUE_LEN))
            .map(|(k, v)| (&k[..], v))
    }
}

// ---------------------------------------------------------------- engines

fn pct(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

fn proc_status_kib(field: &str) -> u64 {
    let s = std::fs::read_to_string("/proc/self/status").unwrap();
    s.lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

fn mib(kib: u64) -> String {
    format!("{}", kib / 1024)
}

/// Allocated size of a directory tree in bytes (what `du` reports).
fn disk_usage(p: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let md = match std::fs::symlink_metadata(p) {
        Ok(m) => m,
        Err(_) => return 0,
    };
    let mut total = md.blocks() * 512;
    if md.is_dir() {
        for e in std::fs::read_dir(p).unwrap() {
            total += disk_usage(&e.unwrap().path());
        }
    }
    total
}

fn mb(bytes: u64) -> f64 {
    bytes as f64 / 1e6
}

/// Commit batches of new keys from `first` until `stop` is set (or `max`
/// batches are done); returns (puts committed, elapsed).
fn write_batches<E: Engine>(
    e: &E,
    first: u64,
    max: u64,
    stop: Option<&AtomicBool>,
    next_key: &AtomicU64,
) -> (u64, Duration) {
    let t0 = Instant::now();
    let mut done = 0;
    for b in 0..max {
        if stop.is_some_and(|s| s.load(Ordering::SeqCst)) {
            break;
        }
        let data = BatchData::new(first + b * BATCH, BATCH);
        e.put_batch(&data);
        done += BATCH;
        next_key.store(first + done, Ordering::SeqCst);
    }
    (done, t0.elapsed())
}

fn run_reads<E: Engine>(e: &E, n: u64, threads: usize) -> (f64, Duration, Duration) {
    let per = GETS / threads;
    let t0 = Instant::now();
    let mut lat: Vec<Duration> = std::thread::scope(|s| {
        let hs: Vec<_> = (0..threads)
            .map(|t| {
                s.spawn(move || {
                    let mut rng = XorShift::new(1000 + t as u64);
                    let mut lat = Vec::with_capacity(per);
                    for _ in 0..per {
                        let i = rng.below(n);
                        let t = Instant::now();
                        assert_eq!(e.get(i), VALUE_LEN);
                        lat.push(t.elapsed());
                    }
                    lat
                })
            })
            .collect();
        hs.into_iter().flat_map(|h| h.join().unwrap()).collect()
    });
    let el = t0.elapsed();
    lat.sort_unstable();
    (
        (per * threads) as f64 / el.as_secs_f64(),
        pct(&lat, 0.5),
        pct(&lat, 0.99),
    )
}

fn run_one(config: &str, run: u32) {
    let n = key_count();
    let dir = PathBuf::from(DATA_ROOT).join(format!("{config}-run{run}"));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let mut e: Box<dyn AnyEngine> = match config {
        "redb" => Box::new(Redb::open(&dir, None)),
        "redb-64m" => Box::new(Redb::open(&dir, Some(64 << 20))),
        "fjall" => Box::new(Fjall::open(&dir, false)),
        "fjall-kv" => Box::new(Fjall::open(&dir, true)),
        other => panic!("unknown config {other}"),
    };
    let r = e.run(&dir, n);
    let line: Vec<String> = r.iter().map(|(k, v)| format!("{k}={v}")).collect();
    println!("RESULT config={config} run={run} {}", line.join(" "));
    use std::io::Write;
    std::io::stdout().flush().unwrap();
    // Simulate a crash: exit without closing the database (no destructors,
    // background threads killed). `recover` then times the reopen.
    std::mem::forget(e);
    std::process::exit(0);
}

/// Reopen a database left behind by a crashed `one` run; time open + first get.
fn recover(config: &str, run: u32) {
    let dir = PathBuf::from(DATA_ROOT).join(format!("{config}-run{run}"));
    let t0 = Instant::now();
    let e: Box<dyn Engine> = match config {
        "redb" | "redb-64m" => {
            let cache = (config == "redb-64m").then_some(64 << 20);
            let path = dir.join("data.redb");
            let db = Redb::builder(cache).open(&path).unwrap();
            Box::new(Redb {
                db: Some(db),
                path,
                cache,
            })
        }
        "fjall" => Box::new(Fjall::open(&dir, false)),
        "fjall-kv" => Box::new(Fjall::open(&dir, true)),
        other => panic!("unknown config {other}"),
    };
    assert_eq!(e.get(0), VALUE_LEN);
    let el = t0.elapsed();
    assert_eq!(e.get(key_count() - 1), VALUE_LEN);
    drop(e);
    std::fs::remove_dir_all(&dir).unwrap();
    println!("RESULT crash_reopen_ms={:.1}", el.as_secs_f64() * 1e3);
}

/// Object-safe wrapper so `run_one` can pick an engine at run time.
trait AnyEngine {
    fn run(&mut self, dir: &Path, n: u64) -> BTreeMap<String, String>;
}

impl<E: Engine> AnyEngine for E {
    fn run(&mut self, dir: &Path, n: u64) -> BTreeMap<String, String> {
        bench(self, dir, n)
    }
}

fn bench<E: Engine>(e: &mut E, dir: &Path, n: u64) -> BTreeMap<String, String> {
    let mut r = BTreeMap::new();
    let mut put = |k: &str, v: String| {
        eprintln!("  {k:>22}: {v}");
        r.insert(k.to_string(), v);
    };

    // 1. Load.
    let mut commit_lat = Vec::with_capacity((n / BATCH) as usize);
    let t0 = Instant::now();
    for b in 0..n / BATCH {
        let data = BatchData::new(b * BATCH, BATCH);
        let t = Instant::now();
        e.put_batch(&data);
        commit_lat.push(t.elapsed());
    }
    let el = t0.elapsed();
    commit_lat.sort_unstable();
    put("load_s", format!("{:.1}", el.as_secs_f64()));
    put("load_puts_s", format!("{:.0}", n as f64 / el.as_secs_f64()));
    put(
        "load_MB_s",
        format!("{:.0}", mb(n * VALUE_LEN as u64) / el.as_secs_f64()),
    );
    put(
        "commit_p50_ms",
        format!("{:.2}", pct(&commit_lat, 0.5).as_secs_f64() * 1e3),
    );
    put(
        "commit_p99_ms",
        format!("{:.2}", pct(&commit_lat, 0.99).as_secs_f64() * 1e3),
    );
    put(
        "commit_max_ms",
        format!("{:.1}", commit_lat.last().unwrap().as_secs_f64() * 1e3),
    );
    put("rss_load_MiB", mib(proc_status_kib("VmRSS:")));
    put("hwm_load_MiB", mib(proc_status_kib("VmHWM:")));
    put("du_load_MB", format!("{:.0}", mb(disk_usage(dir))));

    // Background work (fjall flush/compaction).
    let t = Instant::now();
    let s = e.settle();
    put("settle", s.replace(' ', "_"));
    put("settle_s", format!("{:.1}", t.elapsed().as_secs_f64()));
    put("du_settled_MB", format!("{:.0}", mb(disk_usage(dir))));

    // 6. Restart.
    let (dropped, reopened) = e.reopen();
    put("close_ms", format!("{:.1}", dropped.as_secs_f64() * 1e3));
    put("reopen_ms", format!("{:.1}", reopened.as_secs_f64() * 1e3));

    // 2. Point reads.
    for threads in [1usize, 2] {
        let (ops, p50, p99) = run_reads(&*e, n, threads);
        put(&format!("get{threads}t_ops_s"), format!("{ops:.0}"));
        put(
            &format!("get{threads}t_p50_us"),
            format!("{:.1}", p50.as_secs_f64() * 1e6),
        );
        put(
            &format!("get{threads}t_p99_us"),
            format!("{:.1}", p99.as_secs_f64() * 1e6),
        );
    }

    put("rss_reads_MiB", mib(proc_status_kib("VmRSS:")));

    // 3. Range scans.
    let mut rng = XorShift::new(77);
    let t0 = Instant::now();
    for _ in 0..SCANS {
        let start = rng.below(n - SCAN_LEN as u64);
        let (c, bytes) = e.scan(start, SCAN_LEN);
        assert_eq!((c, bytes), (SCAN_LEN, (SCAN_LEN * VALUE_LEN) as u64));
    }
    put(
        "scan_per_s",
        format!("{:.0}", SCANS as f64 / t0.elapsed().as_secs_f64()),
    );

    // 4. Snapshot stream while a second thread writes new keys.
    let du_before_stream = disk_usage(dir);
    let opened = AtomicBool::new(false);
    let stop = AtomicBool::new(false);
    let next_key = AtomicU64::new(n);
    let eref: &E = e;
    let (stream_el, seen, bytes, writer) = std::thread::scope(|s| {
        let w = s.spawn(|| {
            while !opened.load(Ordering::SeqCst) {
                std::thread::yield_now();
            }
            write_batches(eref, n, u64::MAX, Some(&stop), &next_key)
        });
        let t0 = Instant::now();
        let mut seen = 0u64;
        let mut bytes = 0u64;
        eref.stream(&opened, &mut |k, v| {
            let i = key_index(k);
            assert_eq!(i, seen, "snapshot skipped or added a key");
            assert_eq!(v[..8], value_tag(i), "value does not match key {i}");
            seen += 1;
            bytes += v.len() as u64;
        });
        let el = t0.elapsed();
        stop.store(true, Ordering::SeqCst);
        (el, seen, bytes, w.join().unwrap())
    });
    let written = next_key.load(Ordering::SeqCst);
    assert_eq!(
        seen, n,
        "snapshot did not see exactly the keys present at open"
    );
    assert_eq!(bytes, n * VALUE_LEN as u64);
    // Writes made during the stream are visible outside the snapshot.
    if written > n {
        assert_eq!(e.get(written - 1), VALUE_LEN);
    }
    put("rss_stream_MiB", mib(proc_status_kib("VmRSS:")));
    put("stream_s", format!("{:.2}", stream_el.as_secs_f64()));
    put(
        "stream_MB_s",
        format!("{:.0}", mb(bytes) / stream_el.as_secs_f64()),
    );
    put("stream_keys_seen", format!("{seen}"));
    put("stream_consistent", "yes".into());
    put(
        "writer_during_puts_s",
        format!("{:.0}", writer.0 as f64 / writer.1.as_secs_f64()),
    );
    put("writer_during_puts", format!("{}", writer.0));
    put(
        "du_growth_stream_MB",
        format!(
            "{:.0}",
            mb(disk_usage(dir).saturating_sub(du_before_stream))
        ),
    );

    // Writer alone, for comparison, on the same (slightly larger) store.
    let (puts, el) = write_batches(&*e, written, BASELINE_BATCHES, None, &next_key);
    put(
        "writer_alone_puts_s",
        format!("{:.0}", puts as f64 / el.as_secs_f64()),
    );

    // 5. Resources at the end.
    put("rss_end_MiB", mib(proc_status_kib("VmRSS:")));
    put("hwm_end_MiB", mib(proc_status_kib("VmHWM:")));
    put("du_end_MB", format!("{:.0}", mb(disk_usage(dir))));
    let note = e.note();
    if !note.is_empty() {
        put("engine_end", note.replace(' ', "_"));
    }
    r
}

// ---------------------------------------------------------------- driver

fn run_all() {
    let exe = std::env::current_exe().unwrap();
    let mut results: Vec<(String, BTreeMap<String, String>)> = Vec::new();
    let t0 = Instant::now();
    for run in 1..=2 {
        for config in CONFIGS {
            eprintln!(
                "== {config} run {run} ({:.0}s elapsed)",
                t0.elapsed().as_secs_f64()
            );
            let mut m = BTreeMap::new();
            for mode in ["one", "recover"] {
                let out = Command::new(&exe)
                    .args([mode, config, &run.to_string()])
                    .stderr(std::process::Stdio::inherit())
                    .output()
                    .unwrap();
                assert!(out.status.success(), "{mode} {config} run {run} failed");
                let stdout = String::from_utf8(out.stdout).unwrap();
                let line = stdout.lines().find(|l| l.starts_with("RESULT ")).unwrap();
                m.extend(
                    line[7..]
                        .split(' ')
                        .filter_map(|kv| kv.split_once('='))
                        .map(|(k, v)| (k.to_string(), v.to_string())),
                );
            }
            let _ = std::fs::remove_dir_all(
                PathBuf::from(DATA_ROOT).join(format!("{config}-run{run}")),
            );
            results.push((format!("{config}#{run}"), m));
        }
    }
    let _ = std::fs::remove_dir(DATA_ROOT);
    results.sort_by_key(|(name, _)| {
        let (c, r) = name.split_once('#').unwrap();
        (CONFIGS.iter().position(|x| *x == c), r.to_string())
    });
    print_table(&results);
    eprintln!("total {:.0}s", t0.elapsed().as_secs_f64());
}

fn print_table(results: &[(String, BTreeMap<String, String>)]) {
    let rows = [
        "load_puts_s",
        "load_MB_s",
        "commit_p50_ms",
        "commit_p99_ms",
        "commit_max_ms",
        "get1t_ops_s",
        "get1t_p50_us",
        "get1t_p99_us",
        "get2t_ops_s",
        "get2t_p50_us",
        "get2t_p99_us",
        "scan_per_s",
        "stream_MB_s",
        "stream_keys_seen",
        "writer_during_puts",
        "writer_during_puts_s",
        "writer_alone_puts_s",
        "du_growth_stream_MB",
        "rss_load_MiB",
        "hwm_load_MiB",
        "rss_reads_MiB",
        "rss_stream_MiB",
        "rss_end_MiB",
        "hwm_end_MiB",
        "du_load_MB",
        "du_settled_MB",
        "du_end_MB",
        "settle_s",
        "close_ms",
        "reopen_ms",
        "crash_reopen_ms",
    ];
    let mut out = format!("| {:<22}", "metric");
    for (name, _) in results {
        out += &format!(" | {name:>10}");
    }
    out += " |\n|";
    out += &"-".repeat(24);
    for _ in results {
        out += "|------------";
    }
    out += "|\n";
    for row in rows {
        out += &format!("| {row:<22}");
        for (_, m) in results {
            out += &format!(" | {:>10}", m.get(row).map(String::as_str).unwrap_or("-"));
        }
        out += " |\n";
    }
    println!("{out}");
    for (name, m) in results {
        for k in ["settle", "engine_end"] {
            if let Some(v) = m.get(k) {
                println!("{name} {k}: {}", v.replace('_', " "));
            }
        }
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    match args.get(1).map(String::as_str) {
        Some("one") => run_one(&args[2], args[3].parse().unwrap()),
        Some("recover") => recover(&args[2], args[3].parse().unwrap()),
        Some("all") | None => run_all(),
        Some(other) => {
            eprintln!("usage: engine-bench [all | one|recover <redb|redb-64m|fjall|fjall-kv> <run>] ({other}?)");
            std::process::exit(2);
        }
    }
}
