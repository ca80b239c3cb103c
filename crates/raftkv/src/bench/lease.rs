//! `raftkv bench-lease`: leases at scale. Grants many leases, keeps them all alive as fast
//! as the cluster answers, then lets a second set lapse and measures how late after its
//! TTL each is revoked — plus, given the members' pids, the memory a lease costs. Speaks
//! only the etcd API, so it measures etcd and raftkv alike.
//!
//! - **Grant:** `--leases` leases from 64 concurrent callers; grants per second.
//! - **Keep-alive:** for `--seconds`, every lease is renewed in turn over `--streams`
//!   keep-alive streams (one connection, as an etcd client's are), each with at most
//!   `--window` renewals unanswered; renewals answered per second. A renewal answered with
//!   TTL 0 says the lease was lost: the run fails.
//! - **Expiry:** `--expire` leases of `--expire-ttl` seconds, each with a key attached and
//!   renewed once (the renewal's send time starts its TTL); a watch on the keys records
//!   when each delete arrives. Lateness = arrival − (renewal sent + TTL).

use crate::bench::h2call::Conn;
use hdrhistogram::Histogram;
use prost::Message;
use server::pb::etcdserverpb::{
    lease_client::LeaseClient, watch_client::WatchClient, watch_request::RequestUnion,
    LeaseGrantRequest, LeaseGrantResponse, LeaseKeepAliveRequest, LeaseRevokeRequest, PutRequest,
    WatchCreateRequest, WatchRequest,
};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, Semaphore};

const GRANT: &str = "/etcdserverpb.Lease/LeaseGrant";
const REVOKE: &str = "/etcdserverpb.Lease/LeaseRevoke";
const PUT: &str = "/etcdserverpb.KV/Put";
/// Concurrent callers for grants, puts and revokes.
const CALLERS: usize = 64;

#[derive(clap::Args, Debug)]
pub struct LeaseArgs {
    /// Comma-separated host:port endpoints; the first takes the keep-alives and the watch.
    #[arg(long, default_value = "127.0.0.1:2379")]
    endpoints: String,
    /// Leases granted and kept alive.
    #[arg(long, default_value_t = 100_000)]
    leases: usize,
    /// Their TTL, seconds (long enough that the keep-alive pass comes round in time).
    #[arg(long, default_value_t = 60)]
    ttl: i64,
    /// How long the keep-alives go on.
    #[arg(long, default_value_t = 20)]
    seconds: u64,
    #[arg(long, default_value_t = 8)]
    streams: usize,
    /// Renewals unanswered per stream.
    #[arg(long, default_value_t = 256)]
    window: usize,
    /// Leases left to expire.
    #[arg(long, default_value_t = 10_000)]
    expire: usize,
    #[arg(long, default_value_t = 5)]
    expire_ttl: i64,
    /// The members' process ids, comma separated: report the memory a lease takes (Linux).
    #[arg(long, value_delimiter = ',')]
    member_pids: Vec<u32>,
}

fn rss_bytes(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// The members' resident memory, summed (None without pids or /proc).
fn rss(pids: &[u32]) -> Option<u64> {
    if pids.is_empty() {
        return None;
    }
    pids.iter().map(|p| rss_bytes(*p)).sum()
}

/// Run `n` calls of `f(i)` from [`CALLERS`] concurrent tasks; their results in order.
async fn fan_out<T, F, Fut>(conns: &[Conn], n: usize, f: F) -> Result<Vec<T>, String>
where
    T: Send + 'static,
    F: Fn(Conn, usize) -> Fut + Clone + Send + 'static,
    Fut: std::future::Future<Output = Result<T, String>> + Send,
{
    let next = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for c in 0..CALLERS {
        let (conn, next, f) = (conns[c % conns.len()].clone(), next.clone(), f.clone());
        tasks.push(tokio::spawn(async move {
            let mut out = Vec::new();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= n {
                    return Ok::<_, String>(out);
                }
                out.push((i, f(conn.clone(), i).await?));
            }
        }));
    }
    let mut all = Vec::with_capacity(n);
    for t in tasks {
        all.extend(t.await.map_err(|e| e.to_string())??);
    }
    all.sort_by_key(|(i, _)| *i);
    Ok(all.into_iter().map(|(_, v)| v).collect())
}

async fn grant(mut c: Conn, ttl: i64) -> Result<i64, String> {
    let resp = c.unary(GRANT, &LeaseGrantRequest { ttl, id: 0 }).await?;
    Ok(LeaseGrantResponse::decode(resp)
        .map_err(|e| e.to_string())?
        .id)
}

async fn grant_all(conns: &[Conn], n: usize, ttl: i64) -> Result<Vec<i64>, String> {
    fan_out(conns, n, move |c, _| grant(c, ttl)).await
}

async fn revoke_all(conns: &[Conn], ids: Vec<i64>) -> Result<(), String> {
    let ids = Arc::new(ids);
    let n = ids.len();
    fan_out(conns, n, move |mut c, i| {
        let id = ids[i];
        async move {
            // Already gone is fine: cleaning up.
            let _ = c.unary(REVOKE, &LeaseRevokeRequest { id }).await;
            Ok(())
        }
    })
    .await
    .map(|_| ())
}

pub async fn run(a: LeaseArgs) -> Result<(), String> {
    let urls = crate::client::urls(&a.endpoints);
    if urls.is_empty() || a.leases == 0 || a.streams == 0 || a.window == 0 {
        return Err("--endpoints, --leases, --streams and --window must not be empty".into());
    }
    let mut conns = Vec::new();
    for i in 0..16 {
        conns.push(Conn::connect(&urls[i % urls.len()]).await?);
    }
    let before = rss(&a.member_pids);
    let t = Instant::now();
    let ids = grant_all(&conns, a.leases, a.ttl).await?;
    let grant_secs = t.elapsed().as_secs_f64();
    println!(
        "grant: {} leases in {grant_secs:.2} s, {:.0}/s",
        a.leases,
        a.leases as f64 / grant_secs
    );
    // Let the members settle (a snapshot, allocations returned) before reading memory.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let per_lease = match (before, rss(&a.member_pids)) {
        (Some(b), Some(after)) => {
            let per = after.saturating_sub(b) as f64 / a.leases as f64 / a.member_pids.len() as f64;
            println!("memory: {per:.0} bytes per lease per member");
            per
        }
        _ => 0.0,
    };

    // No request timeout: the keep-alive and watch streams live as long as the run.
    let ch = tonic::transport::Endpoint::from_shared(urls[0].clone())
        .map_err(|e| e.to_string())?
        .connect()
        .await
        .map_err(|e| format!("{}: {e}", urls[0]))?;
    let (renewed, lost) = keep_alive(ch.clone(), &ids, &a).await?;
    let rate = renewed as f64 / a.seconds as f64;
    println!(
        "keep-alive: {renewed} renewals in {} s, {rate:.0}/s, lost {lost}",
        a.seconds
    );
    if lost > 0 {
        return Err(format!("{lost} kept-alive leases were reported gone"));
    }

    let late = expiry(ch, &conns, &a).await?;
    let ms = |q: f64| late.value_at_quantile(q) as f64 / 1000.0;
    println!(
        "expiry: {} leases of {} s, revoked late by p50 {:.0} ms, p99 {:.0} ms, max {:.0} ms",
        a.expire,
        a.expire_ttl,
        ms(0.5),
        ms(0.99),
        late.max() as f64 / 1000.0
    );
    revoke_all(&conns, ids).await?;
    println!(
        "RESULT grants_per_sec={:.0} keepalives_per_sec={rate:.0} bytes_per_lease={per_lease:.0} \
         expiry_late_p50_ms={:.0} expiry_late_p99_ms={:.0}",
        a.leases as f64 / grant_secs,
        ms(0.5),
        ms(0.99)
    );
    Ok(())
}

/// Renew every lease in turn for `a.seconds`; returns (renewals answered, leases lost).
async fn keep_alive(
    ch: tonic::transport::Channel,
    ids: &[i64],
    a: &LeaseArgs,
) -> Result<(u64, u64), String> {
    let answered = Arc::new(AtomicU64::new(0));
    let lost = Arc::new(AtomicU64::new(0));
    let stop = Instant::now() + Duration::from_secs(a.seconds);
    let mut tasks = Vec::new();
    for s in 0..a.streams {
        let mine: Vec<i64> = ids.iter().skip(s).step_by(a.streams).copied().collect();
        let (ch, answered, lost, window) = (ch.clone(), answered.clone(), lost.clone(), a.window);
        tasks.push(tokio::spawn(async move {
            let permits = Arc::new(Semaphore::new(window));
            let (tx, rx) = mpsc::channel(window);
            // The sender runs before the call returns: etcd sends the response headers
            // only with the first answer, which needs a request.
            let sender = {
                let permits = permits.clone();
                tokio::spawn(async move {
                    for id in mine.iter().cycle() {
                        if Instant::now() >= stop {
                            break;
                        }
                        let Ok(p) = permits.acquire().await else {
                            break;
                        };
                        p.forget();
                        if tx.send(LeaseKeepAliveRequest { id: *id }).await.is_err() {
                            break;
                        }
                    }
                    // Keep the request stream open until the answers are in.
                    tokio::time::sleep(Duration::from_secs(3600)).await;
                    drop(tx);
                })
            };
            let mut responses = LeaseClient::new(ch)
                .lease_keep_alive(tokio_stream::wrappers::ReceiverStream::new(rx))
                .await
                .map_err(|e| e.to_string())?
                .into_inner();
            while Instant::now() < stop {
                match tokio::time::timeout(Duration::from_secs(5), responses.message()).await {
                    Ok(Ok(Some(r))) => {
                        if r.ttl <= 0 {
                            lost.fetch_add(1, Ordering::Relaxed);
                        }
                        answered.fetch_add(1, Ordering::Relaxed);
                        permits.add_permits(1);
                    }
                    Ok(Ok(None)) => break,
                    Ok(Err(e)) => return Err(format!("keep-alive answers: {e}")),
                    Err(_) => return Err("no keep-alive answered for 5 s".into()),
                }
            }
            sender.abort();
            Ok::<_, String>(())
        }));
    }
    for t in tasks {
        t.await.map_err(|e| e.to_string())??;
    }
    Ok((
        answered.load(Ordering::Relaxed),
        lost.load(Ordering::Relaxed),
    ))
}

/// Leases with a key each, renewed once, then left to lapse: how late each delete arrives.
async fn expiry(
    ch: tonic::transport::Channel,
    conns: &[Conn],
    a: &LeaseArgs,
) -> Result<Histogram<u64>, String> {
    let ids = grant_all(conns, a.expire, a.expire_ttl).await?;
    let key = |i: usize| format!("bench-lease/{i:08}");
    let attach = Arc::new(ids.clone());
    fan_out(conns, a.expire, move |mut c, i| {
        let req = PutRequest {
            key: key(i).into(),
            lease: attach[i],
            ..Default::default()
        };
        async move { c.unary(PUT, &req).await.map(|_| ()) }
    })
    .await?;
    // The watch first, so no delete can go unseen.
    let (wtx, wrx) = mpsc::channel(1);
    let create = WatchCreateRequest {
        key: "bench-lease/".into(),
        range_end: kv::prefix_end(b"bench-lease/"),
        ..Default::default()
    };
    wtx.send(WatchRequest {
        request_union: Some(RequestUnion::CreateRequest(create)),
    })
    .await
    .map_err(|e| e.to_string())?;
    let mut events = WatchClient::new(ch.clone())
        .watch(tokio_stream::wrappers::ReceiverStream::new(wrx))
        .await
        .map_err(|e| e.to_string())?
        .into_inner();
    events.message().await.map_err(|e| e.to_string())?; // created
                                                        // One renewal each, over one stream: its send time starts the TTL. The renewals go
                                                        // out from a task started before the call, which (against etcd) returns only once an
                                                        // answer has come.
    let (tx, rx) = mpsc::channel(1024);
    let sends = {
        let ids = ids.clone();
        tokio::spawn(async move {
            let mut sent = Vec::with_capacity(ids.len());
            for id in ids {
                sent.push(Instant::now());
                if tx.send(LeaseKeepAliveRequest { id }).await.is_err() {
                    break;
                }
            }
            (sent, tx)
        })
    };
    let mut answers = LeaseClient::new(ch)
        .lease_keep_alive(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .map_err(|e| e.to_string())?
        .into_inner();
    // Read the answers as they come, so the stream never stalls on them; a renewal counts
    // only if it found its lease alive (a lease that lapsed before its renewal arrived
    // proves nothing about expiry).
    let n = ids.len();
    let drain = tokio::spawn(async move {
        let mut alive = std::collections::HashSet::new();
        for _ in 0..n {
            match answers.message().await {
                Ok(Some(r)) if r.ttl > 0 => {
                    alive.insert(r.id);
                }
                Ok(Some(_)) => {}
                _ => break,
            }
        }
        alive
    });
    let (sent, tx) = sends.await.map_err(|e| e.to_string())?;
    if sent.len() < ids.len() {
        return Err("the keep-alive stream broke".into());
    }
    let alive = drain.await.map_err(|e| e.to_string())?;
    drop(tx);
    let lapsed = ids.len() - alive.len();
    if lapsed > 0 {
        println!("expiry: {lapsed} leases lapsed before their renewal arrived; not counted");
    }
    let ttl = Duration::from_secs(a.expire_ttl as u64);
    let mut deadline: HashMap<Vec<u8>, Instant> = sent
        .iter()
        .enumerate()
        .filter(|(i, _)| alive.contains(&ids[*i]))
        .map(|(i, t)| (key(i).into_bytes(), *t + ttl))
        .collect();
    let want = deadline.len();
    let mut late = Histogram::<u64>::new_with_bounds(1, 600_000_000, 3).unwrap();
    let give_up = Instant::now() + ttl + Duration::from_secs(120);
    let (mut seen, mut early) = (0, 0);
    while seen < want && Instant::now() < give_up {
        let r = tokio::time::timeout(Duration::from_secs(10), events.message()).await;
        let Ok(Ok(Some(r))) = r else {
            continue;
        };
        let now = Instant::now();
        for e in r.events.iter().filter(|e| e.r#type == 1) {
            if let Some(d) = e.kv.as_ref().and_then(|kv| deadline.remove(&kv.key[..])) {
                seen += 1;
                if now < d {
                    early += 1;
                }
                let _ = late.record(now.saturating_duration_since(d).as_micros().max(1) as u64);
            }
        }
    }
    if early > 0 {
        return Err(format!(
            "{early} leases were revoked before their TTL had passed since their renewal"
        ));
    }
    if seen < want {
        return Err(format!(
            "only {seen} of {want} leases were revoked within 120 s of their TTL"
        ));
    }
    Ok(late)
}
