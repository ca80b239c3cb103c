//! The live dashboard: one page that draws a real cluster as it runs — each member's role,
//! term, indexes and log, the traffic on each link, request rates and latencies, and a
//! timeline of elections, votes, snapshots and membership changes.
//!
//! - Every member answers `GET /dashboard/state` (its own state, `insight.rs`) on its
//!   client port and metrics ports, like `/metrics`.
//! - The page (`assets/`, embedded in the binary) gets one snapshot of the whole cluster
//!   about four times a second over server-sent events, built by a `Collector` that polls
//!   every member: no polling storm from browsers, however many are open. The same
//!   snapshot, once, is `GET /dashboard/view` (for scripts and tests).
//! - `raftkv cluster` serves it with controls (the `raftkv` crate's `cluster/`): it owns
//!   the members' processes, so it can kill, pause and restart them, cut their links, run
//!   a write load and walk through scenarios, for whoever holds the run's token. A member
//!   started with `--dashboard` serves it read-only.

pub mod collect;
pub mod http;

use crate::member::node::Node;
use axum::http::{header, StatusCode, Uri};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::IntoResponse;
use axum::routing::get;
use collect::{Collector, Extras, Source, Target};
use std::convert::Infallible;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio_stream::StreamExt;

const INDEX_HTML: &str = include_str!("assets/index.html");
const APP_JS: &str = include_str!("assets/app.js");
const STYLE_CSS: &str = include_str!("assets/style.css");

/// `GET /dashboard/state?since=N`: this member's state, with its events from N on.
pub fn state_routes(node: Node) -> axum::Router {
    let disk = Arc::new(DiskUsage::new(node.data_dir().to_path_buf()));
    axum::Router::new().route(
        "/dashboard/state",
        get(move |uri: Uri| member_state(node.clone(), disk.clone(), uri)),
    )
}

/// How long a measured data directory size is shown before it is walked again.
const DISK_USAGE_FRESH: Duration = Duration::from_secs(1);

/// The data directory's size, walked at most once a second: every open page has each
/// member asked for its state four times a second, and a walk costs a syscall per file
/// on the machine serving the cluster's writes.
struct DiskUsage {
    dir: PathBuf,
    last: Mutex<Option<(Instant, u64)>>,
}

impl DiskUsage {
    fn new(dir: PathBuf) -> Self {
        DiskUsage {
            dir,
            last: Mutex::new(None),
        }
    }

    async fn bytes(&self) -> u64 {
        if let Some((at, bytes)) = *self.last.lock().unwrap() {
            if at.elapsed() < DISK_USAGE_FRESH {
                return bytes;
            }
        }
        let dir = self.dir.clone();
        let bytes =
            tokio::task::spawn_blocking(move || crate::services::maintenance::disk_usage(&dir))
                .await
                .unwrap_or(0);
        *self.last.lock().unwrap() = Some((Instant::now(), bytes));
        bytes
    }
}

async fn member_state(node: Node, disk: Arc<DiskUsage>, uri: Uri) -> axum::response::Response {
    let since = uri
        .query()
        .and_then(|q| q.split('&').find_map(|kv| kv.strip_prefix("since=")))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let mut state = match node.inspect(since).await {
        Ok(s) => s,
        Err(e) => {
            return (StatusCode::SERVICE_UNAVAILABLE, e.message().to_string()).into_response()
        }
    };
    state.wal_bytes = disk.bytes().await;
    json(&state)
}

fn json<T: serde::Serialize>(v: &T) -> axum::response::Response {
    match serde_json::to_string(v) {
        Ok(body) => ([(header::CONTENT_TYPE, "application/json")], body).into_response(),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response(),
    }
}

/// The page, its assets and its live feed, drawn from `collector`.
pub fn page_routes(collector: Arc<Collector>) -> axum::Router {
    let asset = |body: &'static str, kind: &'static str| {
        get(move || async move { ([(header::CONTENT_TYPE, kind)], body) })
    };
    axum::Router::new()
        .route(
            "/dashboard",
            get(|| async { axum::response::Redirect::permanent("/dashboard/") }),
        )
        .route("/dashboard/", asset(INDEX_HTML, "text/html; charset=utf-8"))
        .route(
            "/dashboard/app.js",
            asset(APP_JS, "text/javascript; charset=utf-8"),
        )
        .route(
            "/dashboard/style.css",
            asset(STYLE_CSS, "text/css; charset=utf-8"),
        )
        .route("/dashboard/view", {
            let collector = collector.clone();
            get(move || async move { json(&*collector.latest()) })
        })
        .route("/dashboard/events", get(move || events(collector.clone())))
}

/// Server-sent events: the latest snapshot at once, then each new one.
async fn events(collector: Arc<Collector>) -> impl IntoResponse {
    let stream = tokio_stream::wrappers::WatchStream::new(collector.subscribe()).map(|view| {
        let data = serde_json::to_string(&*view).unwrap_or_default();
        Ok::<_, Infallible>(Event::default().event("state").data(data))
    });
    Sse::new(stream).keep_alive(KeepAlive::default())
}

/// A member's read-only dashboard: the members its registry lists, at their client URLs.
pub struct MemberSource(pub Node);

impl Source for MemberSource {
    fn targets(&self) -> Vec<Target> {
        self.0
            .view()
            .registry
            .members
            .values()
            .filter_map(|m| {
                let url = m.client_urls.first()?;
                let name = match m.name.is_empty() {
                    true => crate::operations::insight::hex(m.id),
                    false => m.name.clone(),
                };
                Some(Target {
                    name,
                    url: url.clone(),
                })
            })
            .collect()
    }

    fn extras(&self, _since: u64) -> Extras {
        Extras::default()
    }
}
