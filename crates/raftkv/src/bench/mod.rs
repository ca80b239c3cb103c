//! `raftkv bench`: N clients over C connections issue puts or range reads as fast as they
//! are answered, then report throughput and latency percentiles. It speaks only the etcd v3
//! API, so the same command measures etcd and raftkv alike. Its siblings load watch
//! (`watch.rs`) and leases (`lease.rs`); `h2call.rs` is the bare HTTP/2 caller they use.

pub mod h2call;
pub mod lease;
pub mod watch;

use bytes::Bytes;
use clap::{Parser, ValueEnum};
use h2call::Conn;
use hdrhistogram::Histogram;
use prost::Message;
use server::pb::etcdserverpb::{
    LeaseGrantRequest, LeaseGrantResponse, LeaseRevokeRequest, PutRequest, RangeRequest,
};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

const PUT: &str = "/etcdserverpb.KV/Put";
const RANGE: &str = "/etcdserverpb.KV/Range";
const GRANT: &str = "/etcdserverpb.Lease/LeaseGrant";
const REVOKE: &str = "/etcdserverpb.Lease/LeaseRevoke";

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum Op {
    Put,
    Get,
}

#[derive(Parser, Debug)]
pub struct BenchArgs {
    #[arg(value_enum, default_value = "put")]
    op: Op,
    /// Comma-separated host:port client endpoints; connections are spread over them.
    #[arg(long, default_value = "127.0.0.1:2379,127.0.0.1:2389,127.0.0.1:2399")]
    endpoints: String,
    /// Concurrent clients (each has one request outstanding at a time).
    #[arg(long, default_value_t = 256)]
    clients: usize,
    /// gRPC connections the clients share.
    #[arg(long, default_value_t = 16)]
    conns: usize,
    /// Requests in all.
    #[arg(long, default_value_t = 100_000)]
    total: u64,
    #[arg(long, default_value_t = 8)]
    key_size: usize,
    #[arg(long, default_value_t = 256)]
    val_size: usize,
    /// Distinct keys written or read.
    #[arg(long, default_value_t = 100_000)]
    key_space: u64,
    /// The number of the first key written: a load in rounds writes new keys each round
    /// with `--first-key` advanced by `--key-space`.
    #[arg(long, default_value_t = 0)]
    first_key: u64,
    /// Gets are linearizable unless this is set.
    #[arg(long)]
    serializable: bool,
    /// Make every put exactly-once: each client holds a session (a lease) and numbers its
    /// puts (raftkv's `raftkv-session` / `raftkv-seq` metadata; etcd ignores them).
    #[arg(long)]
    session: bool,
    /// Hide the progress bar.
    #[arg(long)]
    quiet: bool,
}

/// A client's session: its lease and the number of its next put.
struct Session {
    lease: i64,
    seq: u64,
}

impl Session {
    async fn open(c: &mut Conn) -> Result<Session, String> {
        let req = LeaseGrantRequest { ttl: 600, id: 0 };
        let resp = c.unary(GRANT, &req).await?;
        let lease = LeaseGrantResponse::decode(resp)
            .map_err(|e| e.to_string())?
            .id;
        Ok(Session { lease, seq: 0 })
    }

    fn next(&mut self) -> [(&'static str, String); 2] {
        self.seq += 1;
        [
            ("raftkv-session", self.lease.to_string()),
            ("raftkv-seq", self.seq.to_string()),
        ]
    }
}

fn key(i: u64, size: usize) -> Bytes {
    let mut k = format!("{i:0width$}", width = size).into_bytes();
    k.truncate(size.max(1));
    k.into()
}

pub async fn run(a: BenchArgs) -> Result<(), String> {
    if a.clients == 0 || a.conns == 0 || a.total == 0 {
        return Err("--clients, --conns and --total must be positive".into());
    }
    let urls = crate::client::urls(&a.endpoints);
    if urls.is_empty() {
        return Err("--endpoints is empty".into());
    }
    let mut channels = Vec::new();
    for i in 0..a.conns {
        let url = &urls[i % urls.len()];
        channels.push(Conn::connect(url).await?);
    }
    if let Op::Get = a.op {
        // Reads need something to read.
        let mut c = channels[0].clone();
        for i in 0..a.key_space.min(1_000) {
            let req = PutRequest {
                key: key(i, a.key_size),
                value: vec![b'v'; a.val_size].into(),
                ..Default::default()
            };
            c.unary(PUT, &req).await?;
        }
    }
    let issued = Arc::new(AtomicU64::new(0));
    let bar = if a.quiet {
        indicatif::ProgressBar::hidden()
    } else {
        indicatif::ProgressBar::new(a.total)
    };
    bar.set_style(
        indicatif::ProgressStyle::with_template("{bar:40} {pos}/{len} {per_sec} {eta}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    let value: Bytes = vec![b'v'; a.val_size].into();
    // Sessions are opened before the clock starts.
    let mut sessions = Vec::new();
    for c in 0..a.clients {
        sessions.push(match a.session {
            true => Some(Session::open(&mut channels[c % channels.len()].clone()).await?),
            false => None,
        });
    }
    let start = Instant::now();
    let mut tasks = Vec::new();
    for c in 0..a.clients {
        let mut client = channels[c % channels.len()].clone();
        let (issued, bar, value) = (issued.clone(), bar.clone(), value.clone());
        let (op, total, key_size, key_space, first_key, serializable) = (
            a.op,
            a.total,
            a.key_size,
            a.key_space,
            a.first_key,
            a.serializable,
        );
        let get_space = key_space.min(1_000);
        let mut session = sessions.pop().flatten();
        tasks.push(tokio::spawn(async move {
            let mut hist = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).unwrap();
            let mut errors = 0u64;
            loop {
                let n = issued.fetch_add(1, Ordering::Relaxed);
                if n >= total {
                    break;
                }
                let t = Instant::now();
                let ok = match op {
                    Op::Put => {
                        let req = PutRequest {
                            key: key(first_key + n % key_space, key_size),
                            value: value.clone(),
                            ..Default::default()
                        };
                        let tag = session.as_mut().map(|s| s.next());
                        let md = tag.as_ref().map_or(&[][..], |t| &t[..]);
                        client.unary_with(PUT, &req, md).await.is_ok()
                    }
                    Op::Get => {
                        let req = RangeRequest {
                            key: key(n % get_space, key_size),
                            serializable,
                            ..Default::default()
                        };
                        client.unary(RANGE, &req).await.is_ok()
                    }
                };
                if ok {
                    let _ = hist.record(t.elapsed().as_micros().max(1) as u64);
                } else {
                    errors += 1;
                }
                bar.inc(1);
            }
            if let Some(s) = session {
                let _ = client
                    .unary(REVOKE, &LeaseRevokeRequest { id: s.lease })
                    .await;
            }
            (hist, errors)
        }));
    }
    let mut hist = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).unwrap();
    let mut errors = 0;
    for t in tasks {
        let (h, e) = t.await.map_err(|e| e.to_string())?;
        hist.add(h).map_err(|e| e.to_string())?;
        errors += e;
    }
    let secs = start.elapsed().as_secs_f64();
    bar.finish_and_clear();
    let ms = |q: f64| hist.value_at_quantile(q) as f64 / 1000.0;
    println!(
        "{:?}: {} requests, {} clients, {} connections, {} s",
        a.op,
        a.total,
        a.clients,
        a.conns,
        format_args!("{secs:.2}")
    );
    println!(
        "  {:.0} ops/s   p50 {:.2} ms   p99 {:.2} ms   p99.9 {:.2} ms   errors {errors}",
        hist.len() as f64 / secs,
        ms(0.50),
        ms(0.99),
        ms(0.999)
    );
    // One line for scripts.
    println!(
        "RESULT ops_per_sec={:.0} p50_ms={:.3} p99_ms={:.3} p999_ms={:.3} errors={errors}",
        hist.len() as f64 / secs,
        ms(0.50),
        ms(0.99),
        ms(0.999)
    );
    Ok(())
}
