//! `raftkv bench watch`: many watchers on one member, a steady put rate, and how long each
//! event takes from the put leaving the client to the event reaching its watcher — plus,
//! given the member's pid, the memory its idle watchers cost. Speaks only the etcd API, so
//! it measures etcd and raftkv alike.
//!
//! Every watcher watches a key of its own (`w/<n>`); each put writes one of those keys,
//! chosen at random, with the time it was sent as its value. Watchers are spread over the
//! streams, and the streams share one connection (as an etcd client's do); the streams and
//! the puts all go to one member.

use hdrhistogram::Histogram;
use server::pb::etcdserverpb::{
    kv_client::KvClient, watch_client::WatchClient, watch_request::RequestUnion, PutRequest,
    WatchCreateRequest, WatchRequest,
};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::mpsc;

#[derive(clap::Args, Debug)]
pub struct WatchArgs {
    /// The member the watchers and the puts go to (host:port).
    #[arg(long, default_value = "127.0.0.1:2379")]
    endpoint: String,
    #[arg(long, default_value_t = 10_000)]
    watchers: usize,
    /// Watch streams the watchers are spread over.
    #[arg(long, default_value_t = 100)]
    streams: usize,
    /// Puts per second.
    #[arg(long, default_value_t = 1_000)]
    rate: u64,
    /// How long the puts go on.
    #[arg(long, default_value_t = 20)]
    seconds: u64,
    /// The member's process id: report the memory its idle watchers take (Linux).
    #[arg(long)]
    member_pid: Option<u32>,
}

/// The member's resident memory, from /proc.
fn rss_bytes(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

type Hist = Arc<Mutex<Histogram<u64>>>;

/// One stream: create its watchers, say when they are all created, then record every
/// event's delivery latency (the value holds the send time, in µs since `epoch`).
async fn stream(
    ch: tonic::transport::Channel,
    keys: Vec<usize>,
    epoch: Instant,
    created: mpsc::Sender<()>,
    hist: Hist,
) -> Result<(), String> {
    let (tx, rx) = mpsc::channel(keys.len().max(1));
    for k in &keys {
        let create = WatchCreateRequest {
            key: format!("w/{k}").into(),
            ..Default::default()
        };
        let req = WatchRequest {
            request_union: Some(RequestUnion::CreateRequest(create)),
        };
        tx.send(req).await.map_err(|e| e.to_string())?;
    }
    let mut s = WatchClient::new(ch)
        .watch(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .map_err(|e| e.to_string())?
        .into_inner();
    let mut pending = keys.len();
    while let Some(r) = s.message().await.map_err(|e| e.to_string())? {
        if r.created {
            pending -= 1;
            if pending == 0 {
                let _ = created.send(()).await;
            }
        }
        let now = epoch.elapsed().as_micros() as u64;
        let mut h = hist.lock().unwrap();
        for e in r.events {
            let sent: Option<u64> =
                e.kv.and_then(|kv| std::str::from_utf8(&kv.value).ok()?.parse().ok());
            if let Some(sent) = sent {
                let _ = h.record(now.saturating_sub(sent).max(1));
            }
        }
    }
    drop(tx);
    Ok(())
}

pub async fn run(a: WatchArgs) -> Result<(), String> {
    if a.watchers == 0 || a.streams == 0 || a.rate == 0 {
        return Err("--watchers, --streams and --rate must be positive".into());
    }
    let url = crate::client::urls(&a.endpoint)
        .into_iter()
        .next()
        .ok_or("--endpoint is empty")?;
    let epoch = Instant::now();
    let hist: Hist = Arc::new(Mutex::new(
        Histogram::new_with_bounds(1, 60_000_000, 3).map_err(|e| e.to_string())?,
    ));
    let before = a.member_pid.and_then(rss_bytes);
    let (created_tx, mut created) = mpsc::channel(a.streams);
    let mut tasks = Vec::new();
    // One connection for all the streams, as an etcd client multiplexes its watches.
    let ch = crate::client::channel(&url).await?;
    for s in 0..a.streams {
        let keys: Vec<usize> = (s..a.watchers).step_by(a.streams).collect();
        let t = stream(ch.clone(), keys, epoch, created_tx.clone(), hist.clone());
        tasks.push(tokio::spawn(t));
    }
    let setup = Instant::now();
    for _ in 0..a.streams {
        tokio::time::timeout(Duration::from_secs(120), created.recv())
            .await
            .map_err(|_| "the watchers were not all created within 120 s")?;
    }
    let setup = setup.elapsed();
    // Let the member settle before reading its memory.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let after = a.member_pid.and_then(rss_bytes);
    let kv = KvClient::new(crate::client::channel(&url).await?);
    let mut tick = tokio::time::interval(Duration::from_micros(1_000_000 / a.rate));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let total = a.rate * a.seconds;
    let mut rng = 0x9e37_79b9_7f4a_7c15u64;
    let mut puts = Vec::new();
    for _ in 0..total {
        tick.tick().await;
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        let k = rng % a.watchers as u64;
        let mut kv = kv.clone();
        puts.push(tokio::spawn(async move {
            let req = PutRequest {
                key: format!("w/{k}").into(),
                value: epoch.elapsed().as_micros().to_string().into(),
                ..Default::default()
            };
            kv.put(req).await.is_ok()
        }));
    }
    let mut failed = 0;
    for p in puts {
        if !p.await.unwrap_or(false) {
            failed += 1;
        }
    }
    // The last events on their way.
    let deadline = Instant::now() + Duration::from_secs(10);
    while hist.lock().unwrap().len() < total - failed && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for t in &tasks {
        t.abort();
    }
    let h = hist.lock().unwrap();
    let ms = |q: f64| h.value_at_quantile(q) as f64 / 1000.0;
    println!(
        "watch: {} watchers on {} streams (created in {:.2} s), {} puts at {}/s, {} events \
         delivered, {failed} puts failed",
        a.watchers,
        a.streams,
        setup.as_secs_f64(),
        total,
        a.rate,
        h.len()
    );
    println!(
        "  delivery p50 {:.2} ms   p99 {:.2} ms   p99.9 {:.2} ms",
        ms(0.5),
        ms(0.99),
        ms(0.999)
    );
    let per_watcher = match (before, after) {
        (Some(b), Some(a2)) => {
            let per = a2.saturating_sub(b) as f64 / a.watchers as f64;
            println!("  member memory {b} -> {a2} bytes: {per:.0} bytes per idle watcher");
            format!("{per:.0}")
        }
        _ => "-".to_string(),
    };
    println!(
        "RESULT events={} p50_ms={:.3} p99_ms={:.3} p999_ms={:.3} bytes_per_watcher={per_watcher} \
         failed={failed}",
        h.len(),
        ms(0.5),
        ms(0.99),
        ms(0.999)
    );
    Ok(())
}
