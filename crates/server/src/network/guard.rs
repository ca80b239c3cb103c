//! What the client port (and a `--listen-metrics-urls` port) accepts, checked once, before
//! any route: a tower layer in front of the whole router.
//!
//! The client port speaks HTTP/1.1 as well as HTTP/2 so that `/metrics`, `/health`,
//! `/version` and the read-only dashboard work with curl and Prometheus, as etcd's do. tonic
//! does not look at the method, the HTTP version or the content type, so without this
//! layer a web page the operator visits could `fetch()` a length-prefixed protobuf as
//! `text/plain` (a CORS "simple" request, sent without asking) to `/etcdserverpb.KV/Put`
//! and write to the store. The rules:
//!
//! - **A request carrying an `Origin` other than the port's own is refused (403).** Browsers
//!   add `Origin` to cross-site requests and to every POST; gRPC clients never send it.
//! - **Over HTTP/1.x only `GET` and `HEAD` pass, and never to a gRPC service or with a gRPC
//!   content type.** Browsers speak HTTP/2 only inside TLS (never cleartext h2c), so
//!   requiring HTTP/2 for gRPC also defeats DNS rebinding on a plaintext port: a page
//!   rebound to the member's address is same-origin, sends no foreign `Origin`, and can
//!   still only speak HTTP/1.1. Over TLS a rebound name fails the certificate check.
//! - **A gRPC service over HTTP/2 needs a gRPC content type** (`application/grpc`,
//!   `application/grpc+proto`, `application/grpc;…`), as the gRPC spec asks (415 otherwise).
//!
//! The `Host` of an HTTP/1 `GET` is not checked: a member is reached under any name its
//! operator gives it (etcd checks none either), and those routes only show state that any
//! client able to reach the port can read. The fault controls live elsewhere (`raftkv
//! cluster`'s own port, `dashboard/guard.rs`), behind a token and a `Host` check.
//!
//! Cost on a gRPC call: a look at three headers and the path's service prefix.

use crate::operations::grpc_metrics::is_grpc_service;
use bytes::Bytes;
use http::{header, Method, Request, Response, StatusCode, Version};
use http_body_util::{Either, Full};
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

/// The layer: `https` when the port is served over TLS (its own origin is then `https://`).
#[derive(Clone, Copy, Debug)]
pub struct GuardLayer {
    pub https: bool,
}

impl<S> tower::Layer<S> for GuardLayer {
    type Service = Guard<S>;
    fn layer(&self, inner: S) -> Guard<S> {
        Guard {
            inner,
            https: self.https,
        }
    }
}

#[derive(Clone, Debug)]
pub struct Guard<S> {
    inner: S,
    https: bool,
}

/// Why a request is refused: its status and a line saying why.
#[derive(Debug, PartialEq, Eq)]
pub struct Refusal(pub StatusCode, pub &'static str);

/// Whether `value` is a gRPC content type: `application/grpc` alone or followed by `+codec`
/// or `;parameters`.
fn is_grpc_content_type(value: &[u8]) -> bool {
    match value.strip_prefix(b"application/grpc") {
        Some(rest) => rest.is_empty() || rest[0] == b'+' || rest[0] == b';',
        None => false,
    }
}

/// The host (with port) the request was sent to: `Host` over HTTP/1, `:authority` over h2.
fn host<B>(req: &Request<B>) -> Option<&str> {
    match req.headers().get(header::HOST) {
        Some(h) => h.to_str().ok(),
        None => req.uri().authority().map(|a| a.as_str()),
    }
}

/// Whether `origin` is this port's own (`scheme://host`, as the request names the host).
/// A page served from this port (`serve --dashboard`) may send its own origin.
fn own_origin<B>(req: &Request<B>, origin: &[u8], https: bool) -> bool {
    let scheme: &[u8] = if https { b"https://" } else { b"http://" };
    let (Some(rest), Some(host)) = (origin.strip_prefix(scheme), host(req)) else {
        return false;
    };
    rest.eq_ignore_ascii_case(host.as_bytes())
}

/// The rules above, for one request.
pub fn check<B>(req: &Request<B>, https: bool) -> Result<(), Refusal> {
    if let Some(origin) = req.headers().get(header::ORIGIN) {
        if !own_origin(req, origin.as_bytes(), https) {
            return Err(Refusal(
                StatusCode::FORBIDDEN,
                "cross-origin requests are refused",
            ));
        }
    }
    let grpc_type = req
        .headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| is_grpc_content_type(v.as_bytes()));
    let grpc_path = is_grpc_service(req.uri().path());
    if req.version() == Version::HTTP_2 {
        if grpc_path && !grpc_type {
            return Err(Refusal(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "gRPC needs content-type application/grpc",
            ));
        }
        return Ok(());
    }
    if grpc_path || grpc_type {
        return Err(Refusal(
            StatusCode::HTTP_VERSION_NOT_SUPPORTED,
            "gRPC is served over HTTP/2 only",
        ));
    }
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return Err(Refusal(
            StatusCode::METHOD_NOT_ALLOWED,
            "only GET and HEAD are served over HTTP/1",
        ));
    }
    Ok(())
}

fn refuse<B>(Refusal(status, why): Refusal) -> Response<Either<B, Full<Bytes>>> {
    let mut resp = Response::new(Either::Right(Full::new(Bytes::from(format!("{why}\n")))));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    if status == StatusCode::METHOD_NOT_ALLOWED {
        resp.headers_mut()
            .insert(header::ALLOW, header::HeaderValue::from_static("GET, HEAD"));
    }
    resp
}

impl<S, ReqBody, ResBody> tower::Service<Request<ReqBody>> for Guard<S>
where
    S: tower::Service<Request<ReqBody>, Response = Response<ResBody>>,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    ResBody: Send + 'static,
{
    type Response = Response<Either<ResBody, Full<Bytes>>>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<ReqBody>) -> Self::Future {
        if let Err(refusal) = check(&req, self.https) {
            tracing::debug!(
                method = %req.method(),
                path = req.uri().path(),
                version = ?req.version(),
                "refused: {}",
                refusal.1
            );
            return Box::pin(std::future::ready(Ok(refuse(refusal))));
        }
        let fut = self.inner.call(req);
        Box::pin(async move { Ok(fut.await?.map(Either::Left)) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(version: Version, method: &str, path: &str, headers: &[(&str, &str)]) -> Request<()> {
        let mut b = Request::builder().version(version).method(method).uri(path);
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        b.body(()).unwrap()
    }

    const H1: Version = Version::HTTP_11;
    const H2: Version = Version::HTTP_2;
    const PUT: &str = "/etcdserverpb.KV/Put";

    #[test]
    fn grpc_needs_http2_and_its_content_type() {
        let grpc = [("content-type", "application/grpc")];
        assert_eq!(check(&req(H2, "POST", PUT, &grpc), false), Ok(()));
        let proto = [("content-type", "application/grpc+proto")];
        assert_eq!(check(&req(H2, "POST", PUT, &proto), false), Ok(()));
        let text = [("content-type", "text/plain")];
        assert_eq!(
            check(&req(H2, "POST", PUT, &text), false).unwrap_err().0,
            StatusCode::UNSUPPORTED_MEDIA_TYPE
        );
        let lookalike = [("content-type", "application/grpcx")];
        assert!(check(&req(H2, "POST", PUT, &lookalike), false).is_err());
        // The repro: HTTP/1.1, text/plain.
        assert_eq!(
            check(&req(H1, "POST", PUT, &text), false).unwrap_err().0,
            StatusCode::HTTP_VERSION_NOT_SUPPORTED
        );
        assert!(check(&req(H1, "POST", PUT, &grpc), false).is_err());
        assert!(check(&req(H1, "GET", PUT, &[]), false).is_err());
        // An unknown service with a gRPC content type over HTTP/1.1.
        assert!(check(&req(H1, "POST", "/attacker.S/m", &grpc), false).is_err());
    }

    #[test]
    fn http1_serves_gets_only() {
        for path in ["/metrics", "/health", "/version", "/dashboard/state"] {
            assert_eq!(check(&req(H1, "GET", path, &[]), false), Ok(()));
            assert_eq!(check(&req(H1, "HEAD", path, &[]), false), Ok(()));
            assert_eq!(
                check(&req(H1, "POST", path, &[]), false).unwrap_err().0,
                StatusCode::METHOD_NOT_ALLOWED
            );
        }
    }

    #[test]
    fn a_foreign_origin_is_refused_and_the_own_one_passes() {
        let evil = [
            ("origin", "https://evil.example"),
            ("host", "127.0.0.1:2379"),
        ];
        for (v, m, p) in [(H1, "GET", "/metrics"), (H2, "POST", PUT)] {
            let mut r = req(v, m, p, &evil);
            r.headers_mut()
                .insert("content-type", "application/grpc".parse().unwrap());
            assert_eq!(check(&r, false).unwrap_err().0, StatusCode::FORBIDDEN);
        }
        let own = [
            ("origin", "http://127.0.0.1:2379"),
            ("host", "127.0.0.1:2379"),
        ];
        assert_eq!(
            check(&req(H1, "GET", "/dashboard/view", &own), false),
            Ok(())
        );
        // The same host under the other scheme is another origin.
        assert!(check(&req(H1, "GET", "/dashboard/view", &own), true).is_err());
        let null = [("origin", "null"), ("host", "127.0.0.1:2379")];
        assert!(check(&req(H1, "GET", "/metrics", &null), false).is_err());
    }
}
