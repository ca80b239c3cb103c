//! A member's metrics in Prometheus' text format, under etcd's names where raftkv has the
//! same thing (so etcd's dashboards and alerts work unchanged), plus a few of raftkv's own.
//!
//! Cost on the hot path is a handful of atomic adds per request: counters and histograms are
//! updated where things happen (a sync, a refused proposal, a request answered); everything
//! that is a state rather than an event (leader, indexes, sizes) is read from the member
//! when a scrape asks, not maintained on every write.

use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, Opts,
    Registry,
};
use std::sync::Arc;

/// Every metric of one member (several members in one process each have their own).
pub struct Metrics {
    registry: Registry,
    pub has_leader: IntGauge,
    pub is_leader: IntGauge,
    pub leader_changes: IntCounter,
    pub proposals_committed: IntGauge,
    pub proposals_applied: IntGauge,
    pub proposals_pending: IntGauge,
    pub proposals_failed: IntCounter,
    pub wal_fsync: Histogram,
    pub peer_rtt: HistogramVec,
    pub db_total_size: IntGauge,
    pub db_in_use: IntGauge,
    pub grpc_handled: IntCounterVec,
    pub grpc_started: IntCounterVec,
    pub commit_batches: Histogram,
    pub commit_entries: Histogram,
    pub proposals_forwarded: IntCounter,
    pub read_index: Histogram,
    pub term: IntGauge,
}

fn gauge(r: &Registry, name: &str, help: &str) -> IntGauge {
    let g = IntGauge::new(name, help).expect("a valid metric");
    r.register(Box::new(g.clone())).expect("registered once");
    g
}

fn counter(r: &Registry, name: &str, help: &str) -> IntCounter {
    let c = IntCounter::new(name, help).expect("a valid metric");
    r.register(Box::new(c.clone())).expect("registered once");
    c
}

fn histogram(r: &Registry, name: &str, help: &str, buckets: Vec<f64>) -> Histogram {
    let h = Histogram::with_opts(HistogramOpts::new(name, help).buckets(buckets))
        .expect("a valid metric");
    r.register(Box::new(h.clone())).expect("registered once");
    h
}

/// Powers of two from `start`, `count` of them (etcd's buckets are such).
fn exponential(start: f64, count: usize) -> Vec<f64> {
    prometheus::exponential_buckets(start, 2.0, count).expect("valid buckets")
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

impl Metrics {
    pub fn new() -> Arc<Metrics> {
        let r = Registry::new();
        let grpc_labels = ["grpc_type", "grpc_service", "grpc_method", "grpc_code"];
        let grpc_handled = IntCounterVec::new(
            Opts::new(
                "grpc_server_handled_total",
                "Total number of RPCs completed on the server, regardless of success or failure.",
            ),
            &grpc_labels,
        )
        .expect("a valid metric");
        r.register(Box::new(grpc_handled.clone()))
            .expect("registered once");
        let grpc_started = IntCounterVec::new(
            Opts::new(
                "grpc_server_started_total",
                "Total number of RPCs started on the server.",
            ),
            &grpc_labels[..3],
        )
        .expect("a valid metric");
        r.register(Box::new(grpc_started.clone()))
            .expect("registered once");
        let peer_rtt = HistogramVec::new(
            HistogramOpts::new(
                "etcd_network_peer_round_trip_time_seconds",
                "Round-Trip-Time histogram between peers (a heartbeat and its answer).",
            )
            .buckets(exponential(0.0001, 16)),
            &["To"],
        )
        .expect("a valid metric");
        r.register(Box::new(peer_rtt.clone()))
            .expect("registered once");
        Arc::new(Metrics {
            has_leader: gauge(
                &r,
                "etcd_server_has_leader",
                "Whether or not a leader exists. 1 is existence, 0 is not.",
            ),
            is_leader: gauge(
                &r,
                "etcd_server_is_leader",
                "Whether or not this member is a leader. 1 if is, 0 otherwise.",
            ),
            leader_changes: counter(
                &r,
                "etcd_server_leader_changes_seen_total",
                "The number of leader changes seen.",
            ),
            proposals_committed: gauge(
                &r,
                "etcd_server_proposals_committed_total",
                "The total number of consensus proposals committed.",
            ),
            proposals_applied: gauge(
                &r,
                "etcd_server_proposals_applied_total",
                "The total number of consensus proposals applied.",
            ),
            proposals_pending: gauge(
                &r,
                "etcd_server_proposals_pending",
                "The current number of pending proposals to commit.",
            ),
            proposals_failed: counter(
                &r,
                "etcd_server_proposals_failed_total",
                "The total number of failed proposals seen.",
            ),
            wal_fsync: histogram(
                &r,
                "etcd_disk_wal_fsync_duration_seconds",
                "The latency distributions of fsync called by WAL.",
                exponential(0.001, 14),
            ),
            peer_rtt,
            db_total_size: gauge(
                &r,
                "etcd_mvcc_db_total_size_in_bytes",
                "Total size of the underlying database physically allocated in bytes.",
            ),
            db_in_use: gauge(
                &r,
                "etcd_mvcc_db_total_size_in_use_in_bytes",
                "Total size of the underlying database logically in use in bytes.",
            ),
            grpc_handled,
            grpc_started,
            commit_batches: histogram(
                &r,
                "raftkv_wal_group_commit_batches",
                "Batches (one per raft Ready) made durable by one fsync of group commit.",
                exponential(1.0, 12),
            ),
            commit_entries: histogram(
                &r,
                "raftkv_wal_group_commit_entries",
                "Log entries made durable by one fsync of group commit.",
                exponential(1.0, 14),
            ),
            proposals_forwarded: counter(
                &r,
                "raftkv_server_proposals_forwarded_total",
                "Writes proposed on a follower and forwarded to the leader.",
            ),
            read_index: histogram(
                &r,
                "raftkv_server_read_index_duration_seconds",
                "Time from a linearizable read's arrival to its answer (ReadIndex round and \
                 wait for the apply).",
                exponential(0.0001, 16),
            ),
            term: gauge(&r, "raftkv_server_term", "The member's current raft term."),
            registry: r,
        })
    }

    /// Told by group commit after each round (on the storage thread).
    pub fn observe_commit(&self, round: &storage::CommitRound) {
        if let Some(took) = round.sync {
            self.wal_fsync.observe(took.as_secs_f64());
            self.commit_batches.observe(round.batches as f64);
            self.commit_entries.observe(round.entries as f64);
        }
    }

    /// The text exposition of every metric.
    pub fn render(&self) -> String {
        let mut out = Vec::new();
        let families = self.registry.gather();
        // Encoding into a Vec cannot fail for well-formed families.
        let _ = prometheus::TextEncoder::new().encode(&families, &mut out);
        String::from_utf8(out).unwrap_or_default()
    }
}
