//! `grpc_server_started_total` and `grpc_server_handled_total` by service, method and code,
//! as etcd's gRPC middleware counts them: a tower layer around the client port's services.
//!
//! A gRPC status travels in the response headers when the call fails before answering
//! ("trailers only") and otherwise in the trailers after the last message, so the layer
//! looks at the headers and, failing that, wraps the body to read its trailers. A body
//! dropped before its trailers (the client went away) counts as `Canceled`, as a Go server
//! would report the cancelled context. Requests that are not gRPC (`/metrics`, `/health`)
//! pass through uncounted.

use crate::metrics::Metrics;
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

/// The labels of one call: type, service, method.
#[derive(Clone)]
struct Call {
    labels: [String; 3],
}

/// etcd's streaming methods; every other is unary.
fn call_type(path: &str) -> &'static str {
    match path {
        "/etcdserverpb.Watch/Watch" | "/etcdserverpb.Lease/LeaseKeepAlive" => "bidi_stream",
        "/etcdserverpb.Maintenance/Snapshot" | "/v3electionpb.Election/Observe" => "server_stream",
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
        let path = req.uri().path();
        let (service, method) = path.trim_start_matches('/').split_once('/')?;
        Some(Call {
            labels: [
                call_type(path).to_string(),
                service.to_string(),
                method.to_string(),
            ],
        })
    }

    fn handled(&self, m: &Metrics, code: &str) -> IntCounter {
        let [t, s, me] = &self.labels;
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
            let [t, s, m] = &c.labels;
            metrics.grpc_started.with_label_values(&[t, s, m]).inc();
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
