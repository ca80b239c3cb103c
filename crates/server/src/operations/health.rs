//! The HTTP side of the client port, as etcd serves it beside gRPC: `/metrics`
//! (Prometheus), `/health` and `/version`.
//!
//! `/health` is etcd's: `{"health":"true"}` with 200 when the member knows a leader, no
//! alarm is raised, and a linearizable read goes through (so the member can reach a
//! quorum now); otherwise `{"health":"false"}` with 503 (checked against etcd 3.4 in
//! `compat/tests/etcdctl_maintenance.rs`).

use crate::member::node::Node;
use crate::services::API_VERSION;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use std::time::Duration;

/// How long /health waits for its read to go through the quorum.
const HEALTH_READ_TIMEOUT: Duration = Duration::from_secs(1);

/// The routes, for the client port (and a `--listen-metrics-urls` port).
pub fn router(node: Node) -> axum::Router {
    let (m, h) = (node.clone(), node);
    axum::Router::new()
        .route("/metrics", get(move || metrics(m.clone())))
        .route("/health", get(move || health(h.clone())))
        .route("/version", get(version))
}

async fn version() -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "application/json")],
        format!(r#"{{"etcdserver":"{API_VERSION}","etcdcluster":"3.4.0"}}"#),
    )
}

async fn health(node: Node) -> impl IntoResponse {
    let healthy = is_healthy(&node).await;
    if !healthy {
        tracing::warn!("/health: unhealthy");
    }
    // etcd's bodies, byte for byte: the failing one goes through Go's `http.Error`, which
    // ends it with a newline.
    let (code, body) = if healthy {
        (StatusCode::OK, "{\"health\":\"true\"}")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "{\"health\":\"false\"}\n")
    };
    (
        code,
        [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
        body,
    )
}

async fn is_healthy(node: &Node) -> bool {
    if !node.has_leader() {
        return false;
    }
    match node.status().await {
        Ok(s) if s.alarms.is_empty() => {}
        _ => return false,
    }
    let probe = kv::RangeRequest::default();
    matches!(
        tokio::time::timeout(HEALTH_READ_TIMEOUT, node.read(probe, true)).await,
        Ok(Ok(_))
    )
}

/// Everything that is a state rather than a count is read from the member now.
async fn metrics(node: Node) -> impl IntoResponse {
    let m = node.metrics().clone();
    if let Ok(s) = node.status().await {
        m.has_leader.set(i64::from(s.leader.is_some()));
        m.is_leader.set(i64::from(s.leader == Some(node.id())));
        m.proposals_committed.set(s.commit as i64);
        m.proposals_applied.set(s.applied as i64);
        m.proposals_pending.set(s.pending as i64);
        m.db_in_use.set(s.db_size as i64);
        m.term.set(s.term as i64);
    }
    let dir = node.data_dir().to_path_buf();
    if let Ok(bytes) =
        tokio::task::spawn_blocking(move || crate::services::maintenance::disk_usage(&dir)).await
    {
        m.db_total_size.set(bytes as i64);
    }
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        m.render(),
    )
}
