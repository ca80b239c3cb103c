//! `grpc_server_started_total` and `grpc_server_handled_total` by service, method and code,
//! as etcd's gRPC middleware counts them: a tower layer around the client port's services.
//!
//! A gRPC status travels in the response headers when the call fails before answering
//! ("trailers only") and otherwise in the trailers after the last message, so the layer
//! looks at the headers and, failing that, wraps the body to read its trailers. A body
//! dropped before its trailers (the client went away) counts as `Canceled`, as a Go server
//! would report the cancelled context. Requests that are not gRPC (`/metrics`, `/health`)
//! pass through uncounted.
//!
//! Labels name only the methods the client port serves ([`SERVICES`]); any other path is
//! counted under one `unknown` service and method. Labels taken from the path as sent
//! would let any client mint a new, permanent series per request (memory and `/metrics`
//! without bound).

use crate::operations::metrics::Metrics;
use http::{Request, Response};
use http_body::{Body, Frame};
use prometheus::IntCounter;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

#[derive(Clone)]
pub struct GrpcMetricsLayer(pub Arc<Metrics>);

impl<S> tower::Layer<S> for GrpcMetricsLayer {
    type Service = GrpcMetrics<S>;
    fn layer(&self, inner: S) -> GrpcMetrics<S> {
        GrpcMetrics {
            inner,
            metrics: self.0.clone(),
        }
    }
}

#[derive(Clone)]
pub struct GrpcMetrics<S> {
    inner: S,
    metrics: Arc<Metrics>,
}

/// The gRPC services the client port serves, with their methods (as in `proto/`; a test
/// checks the two agree).
pub const SERVICES: &[(&str, &[&str])] = &[
    (
        "etcdserverpb.KV",
        &["Range", "Put", "DeleteRange", "Txn", "Compact"],
    ),
    ("etcdserverpb.Watch", &["Watch"]),
    (
        "etcdserverpb.Lease",
        &[
            "LeaseGrant",
            "LeaseRevoke",
            "LeaseKeepAlive",
            "LeaseTimeToLive",
            "LeaseLeases",
        ],
    ),
    (
        "etcdserverpb.Maintenance",
        &[
            "Alarm",
            "Status",
            "Defragment",
            "Hash",
            "HashKV",
            "Snapshot",
            "MoveLeader",
        ],
    ),
    (
        "etcdserverpb.Cluster",
        &[
            "MemberAdd",
            "MemberRemove",
            "MemberUpdate",
            "MemberList",
            "MemberPromote",
        ],
    ),
    ("raftkvpb.LeaseForward", &["Renew", "TimeToLive"]),
    ("v3lockpb.Lock", &["Lock", "Unlock"]),
    (
        "v3electionpb.Election",
        &["Campaign", "Proclaim", "Leader", "Observe", "Resign"],
    ),
];

/// The label for every service or method the client port does not serve.
pub const UNKNOWN: &str = "unknown";

/// Whether `path` names one of [`SERVICES`] (whatever the method): a gRPC route, as
/// opposed to the HTTP ones (`/metrics`, `/health`, …).
pub fn is_grpc_service(path: &str) -> bool {
    let service = path
        .strip_prefix('/')
        .and_then(|p| p.split_once('/'))
        .map_or("", |(s, _)| s);
    SERVICES.iter().any(|(s, _)| *s == service)
}

/// The service and method `path` names, if the client port serves them: `'static` labels,
/// so counting a call allocates nothing.
pub fn known_method(path: &str) -> Option<(&'static str, &'static str)> {
    let (service, method) = path.strip_prefix('/')?.split_once('/')?;
    let (s, methods) = SERVICES.iter().find(|(s, _)| *s == service)?;
    let m = methods.iter().find(|m| **m == method)?;
    Some((s, m))
}

/// The labels of one call: type, service, method.
#[derive(Clone)]
struct Call {
    labels: [&'static str; 3],
}

/// etcd's streaming methods; every other is unary.
fn call_type(service: &str, method: &str) -> &'static str {
    match (service, method) {
        ("etcdserverpb.Watch", "Watch") | ("etcdserverpb.Lease", "LeaseKeepAlive") => "bidi_stream",
        ("etcdserverpb.Maintenance", "Snapshot") | ("v3electionpb.Election", "Observe") => {
            "server_stream"
        }
        _ => "unary",
    }
}

impl Call {
    fn of<B>(req: &Request<B>) -> Option<Call> {
        let grpc = req
            .headers()
            .get(http::header::CONTENT_TYPE)
            .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"));
        if !grpc {
            return None;
        }
        let labels = match known_method(req.uri().path()) {
            Some((service, method)) => [call_type(service, method), service, method],
            None => ["unary", UNKNOWN, UNKNOWN],
        };
        Some(Call { labels })
    }

    fn handled(&self, m: &Metrics, code: &str) -> IntCounter {
        let [t, s, me] = self.labels;
        m.grpc_handled.with_label_values(&[t, s, me, code])
    }
}

/// Go's names for gRPC status codes, as the metrics label them.
fn code_name(code: &[u8]) -> &'static str {
    match code {
        b"0" => "OK",
        b"1" => "Canceled",
        b"2" => "Unknown",
        b"3" => "InvalidArgument",
        b"4" => "DeadlineExceeded",
        b"5" => "NotFound",
        b"6" => "AlreadyExists",
        b"7" => "PermissionDenied",
        b"8" => "ResourceExhausted",
        b"9" => "FailedPrecondition",
        b"10" => "Aborted",
        b"11" => "OutOfRange",
        b"12" => "Unimplemented",
        b"13" => "Internal",
        b"14" => "Unavailable",
        b"15" => "DataLoss",
        b"16" => "Unauthenticated",
        _ => "Unknown",
    }
}

impl<S, ReqBody, ResBody> tower::Service<Request<ReqBody>> for GrpcMetrics<S>
where
    S: tower::Service<Request<ReqBody>, Response = Response<ResBody>>,
    S::Future: Send + 'static,
    ResBody: Body + Unpin,
{
    type Response = Response<Counted<ResBody>>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<ReqBody>) -> Self::Future {
        let call = Call::of(&req);
        let metrics = self.metrics.clone();
        if let Some(c) = &call {
            metrics.grpc_started.with_label_values(&c.labels).inc();
        }
        let fut = self.inner.call(req);
        Box::pin(async move {
            let resp = fut.await?;
            let mut pending = None;
            if let Some(c) = call {
                match resp.headers().get("grpc-status") {
                    Some(code) => c.handled(&metrics, code_name(code.as_bytes())).inc(),
                    None => pending = Some((c, metrics)),
                }
            }
            Ok(resp.map(|inner| Counted { inner, pending }))
        })
    }
}

/// A response body that counts its call when its trailers pass (or it is dropped first).
pub struct Counted<B> {
    inner: B,
    pending: Option<(Call, Arc<Metrics>)>,
}

impl<B> Drop for Counted<B> {
    fn drop(&mut self) {
        if let Some((c, m)) = self.pending.take() {
            c.handled(&m, "Canceled").inc();
        }
    }
}

impl<B: Body + Unpin> Body for Counted<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<B::Data>, B::Error>>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        if let Poll::Ready(Some(Ok(frame))) = &polled {
            if let Some(trailers) = frame.trailers_ref() {
                if let Some((c, m)) = this.pending.take() {
                    let code = trailers
                        .get("grpc-status")
                        .map_or("OK", |v| code_name(v.as_bytes()));
                    c.handled(&m, code).inc();
                }
            }
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every rpc of the services the client port serves, as the .proto files declare them.
    fn declared() -> Vec<(String, String)> {
        let files = [
            ("etcdserverpb", include_str!("../../proto/rpc.proto")),
            ("raftkvpb", include_str!("../../proto/raftkv.proto")),
            ("v3lockpb", include_str!("../../proto/v3lock.proto")),
            ("v3electionpb", include_str!("../../proto/v3election.proto")),
        ];
        let mut out = Vec::new();
        for (package, text) in files {
            let mut service = None;
            for line in text.lines().map(str::trim) {
                if let Some(rest) = line.strip_prefix("service ") {
                    service = rest.split_whitespace().next().map(str::to_string);
                } else if let (Some(rest), Some(s)) = (line.strip_prefix("rpc "), &service) {
                    let method = rest.split('(').next().unwrap_or("").trim();
                    out.push((format!("{package}.{s}"), method.to_string()));
                }
            }
        }
        // The peer port's service is not the client port's.
        out.retain(|(s, _)| s != "raftkvpb.Raft");
        out
    }

    #[test]
    fn the_known_methods_are_exactly_the_served_ones() {
        let declared = declared();
        assert!(declared.len() > 30, "{declared:?}");
        for (s, m) in &declared {
            assert_eq!(
                known_method(&format!("/{s}/{m}")),
                Some((s.as_str(), m.as_str()))
            );
        }
        let listed: usize = SERVICES.iter().map(|(_, ms)| ms.len()).sum();
        assert_eq!(
            listed,
            declared.len(),
            "SERVICES lists a method no .proto has"
        );
    }

    #[test]
    fn invented_paths_get_the_unknown_labels() {
        let req = |path: &str| {
            Request::builder()
                .uri(path)
                .header(http::header::CONTENT_TYPE, "application/grpc")
                .body(())
                .unwrap()
        };
        let labels = |path: &str| Call::of(&req(path)).unwrap().labels;
        assert_eq!(
            labels("/etcdserverpb.KV/Put"),
            ["unary", "etcdserverpb.KV", "Put"]
        );
        assert_eq!(
            labels("/etcdserverpb.Watch/Watch"),
            ["bidi_stream", "etcdserverpb.Watch", "Watch"]
        );
        for bad in [
            "/attacker.S123/m456",
            "/etcdserverpb.KV/Nope",
            "/etcdserverpb.KV",
            "/",
            "/raftkvpb.Raft/Stream",
        ] {
            assert_eq!(labels(bad), ["unary", UNKNOWN, UNKNOWN], "{bad}");
        }
        assert!(is_grpc_service("/etcdserverpb.KV/Anything"));
        assert!(!is_grpc_service("/metrics"));
        assert!(!is_grpc_service("/dashboard/state"));
    }
}
