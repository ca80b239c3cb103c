//! The random sequences, seed by seed: KV and watch steps, then the same with lease steps
//! mixed in.

use crate::run::run_seed;
use std::time::Instant;

/// The seeds `var` names, else `default`.
fn seeds(var: &str, default: &[u64]) -> Vec<u64> {
    match std::env::var(var) {
        Ok(s) => s
            .split(',')
            .map(|x| {
                x.trim()
                    .parse()
                    .unwrap_or_else(|_| panic!("{var}: numbers"))
            })
            .collect(),
        Err(_) => default.to_vec(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_streams_answer_as_etcds_do() {
    let steps = std::env::var("WATCH_VS_ETCD_STEPS")
        .map(|s| s.parse().expect("WATCH_VS_ETCD_STEPS: a number"))
        .unwrap_or(400);
    for seed in seeds("WATCH_VS_ETCD_SEEDS", &[1, 2, 3, 4, 5, 6]) {
        let started = Instant::now();
        match run_seed(seed, steps, false).await {
            Ok(c) => println!(
                "seed {seed}: {} steps, {} watchers ({} refused, {} canceled for compaction, \
                 {} canceled), {} events ({} with prev_kv), {:.1?}",
                c.steps,
                c.watchers,
                c.refused,
                c.compacted,
                c.canceled,
                c.events,
                c.prev_kvs,
                started.elapsed()
            ),
            Err(e) => panic!("seed {seed} (WATCH_VS_ETCD_SEEDS={seed} to rerun): {e}"),
        }
    }
}

/// The sequence with lease steps: grants (client-chosen ids, duplicates, the largest TTL
/// and one too large), puts and transaction puts with leases (live, missing) and
/// ignore_lease, compares on a key's lease, revokes (live, revoked, never granted),
/// TimeToLive with and without keys, LeaseLeases, keep-alives, each on any member; and
/// expiries: a lease at or near etcd's minimum TTL with keys put on it, the sequence waiting
/// until both sides have deleted them, every watcher seeing the deletes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leases_answer_as_etcds_do() {
    let steps = std::env::var("LEASE_VS_ETCD_STEPS")
        .map(|s| s.parse().expect("LEASE_VS_ETCD_STEPS: a number"))
        .unwrap_or(300);
    for seed in seeds("LEASE_VS_ETCD_SEEDS", &[1, 2, 3, 4]) {
        let started = Instant::now();
        match run_seed(seed, steps, true).await {
            Ok(c) => println!(
                "seed {seed}: {} steps, {} lease requests, {} leases expired, {} watchers, {} \
                 events, {:.1?}",
                c.steps,
                c.lease_requests,
                c.expired,
                c.watchers,
                c.events,
                started.elapsed()
            ),
            Err(e) => panic!("seed {seed} (LEASE_VS_ETCD_SEEDS={seed} to rerun): {e}"),
        }
    }
}
