//! The dashboard's write load: a few clients putting keys (and one reading them back
//! linearizably) through the members, so that replication, rates and latencies move on the
//! page. A client whose member fails moves on to the next one, as etcd's clients do.

use server::operations::dashboard::collect::{LoadView, Rate};
use server::operations::insight::{quantile_ms, Latency, BUCKETS};
use server::pb::etcdserverpb::{kv_client::KvClient, PutRequest, RangeRequest};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tonic::transport::{Channel, Endpoint};

/// Concurrent writers: enough to keep every link busy, few enough to leave the page smooth.
const WRITERS: usize = 4;
/// Keys the load cycles over (their versions grow; the store stays small).
const KEYS: u64 = 1000;
/// How long one request may take before the client gives up on its member.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(2);

#[derive(Default)]
pub struct Load {
    running: AtomicBool,
    /// Bumped at each start: clients of an earlier run stop.
    generation: AtomicU64,
    ok: AtomicU64,
    errors: AtomicU64,
    latency: Latency,
    rate: Mutex<Rate>,
}

impl Load {
    pub fn running(&self) -> bool {
        self.running.load(Ordering::Relaxed)
    }

    /// Start the clients against `urls` (members' client URLs). False if already running.
    pub fn start(self: &Arc<Self>, urls: Vec<String>) -> bool {
        if self.running.swap(true, Ordering::SeqCst) {
            return false;
        }
        let generation = self.generation.fetch_add(1, Ordering::SeqCst) + 1;
        let channels: Vec<Channel> = urls
            .iter()
            .filter_map(|u| Endpoint::from_shared(u.clone()).ok())
            .map(|e| server::network::tls::client_dialer().connect_lazy(e.timeout(REQUEST_TIMEOUT)))
            .collect();
        for w in 0..=WRITERS {
            let me = self.clone();
            let channels = channels.clone();
            // The last client reads what the others write.
            tokio::spawn(async move { me.client(w, w == WRITERS, channels, generation).await });
        }
        true
    }

    pub fn stop(&self) {
        self.running.store(false, Ordering::SeqCst);
    }

    async fn client(&self, id: usize, reader: bool, channels: Vec<Channel>, generation: u64) {
        if channels.is_empty() {
            return;
        }
        let mut member = id % channels.len();
        let mut n = id as u64;
        while self.running() && self.generation.load(Ordering::SeqCst) == generation {
            let mut kv = KvClient::new(channels[member].clone());
            let key = format!("load/{:04}", n % KEYS).into_bytes();
            n += WRITERS as u64 + 1;
            let started = Instant::now();
            let result = if reader {
                kv.range(RangeRequest {
                    key: key.into(),
                    ..Default::default()
                })
                .await
                .map(|_| ())
            } else {
                kv.put(PutRequest {
                    key: key.into(),
                    value: format!("value {n}").into_bytes().into(),
                    ..Default::default()
                })
                .await
                .map(|_| ())
            };
            match result {
                Ok(()) => {
                    self.latency.record(started.elapsed());
                    self.ok.fetch_add(1, Ordering::Relaxed);
                }
                Err(_) => {
                    self.errors.fetch_add(1, Ordering::Relaxed);
                    member = (member + 1) % channels.len();
                    // A cluster without a leader answers at once: do not spin.
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    }

    /// Rates and latencies over the last second.
    pub fn view(&self) -> LoadView {
        let mut counters = self.latency.counts();
        counters.push(self.ok.load(Ordering::Relaxed));
        counters.push(self.errors.load(Ordering::Relaxed));
        let (rates, diff) = self.rate.lock().unwrap().sample(Instant::now(), counters);
        LoadView {
            running: self.running(),
            ok_per_s: rates[BUCKETS],
            errors_per_s: rates[BUCKETS + 1],
            p50_ms: quantile_ms(&diff[..BUCKETS], 0.5),
            p99_ms: quantile_ms(&diff[..BUCKETS], 0.99),
        }
    }
}
