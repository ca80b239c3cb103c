//! Who may use the fault controls of `raftkv cluster`'s dashboard.
//!
//! The controls kill, pause and cut real processes, and under `--tls` the write load runs
//! with the supervisor's own client certificate. Any page open in the operator's browser
//! can send a POST to `127.0.0.1` (a form, or a `no-cors` fetch, needs no permission), and
//! a page whose name is rebound to `127.0.0.1` (DNS rebinding) is even same-origin. So:
//!
//! - every request must name a loopback host (`localhost`, `127.x.y.z`, `[::1]`) or the
//!   bound address in `Host`: a rebound page sends its own name there;
//! - a control (any method but GET and HEAD) must also carry the run's secret in
//!   [`TOKEN_HEADER`] — random per run, printed only in the URL `raftkv cluster` shows
//!   (`…/dashboard/#token=…`; a fragment is never sent to a server or in a `Referer`), kept
//!   by the page in its tab's session storage — and an `Origin`, if any, that is the
//!   dashboard's own. A cross-site page cannot read the token, and a custom header cannot
//!   be sent cross-site without a CORS preflight that nothing here answers.
//!
//! Refusals are 403 with the reason, and logged (at most once a second, with a count, so a
//! hostile page cannot flood the log). The read-only pages need no token.

use axum::extract::Request;
use axum::http::{header, HeaderMap, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use server::operations::dashboard::http::TOKEN_HEADER;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

/// The dashboard's secret and the address it is bound to.
pub struct Controls {
    token: String,
    bound: SocketAddr,
    refused: AtomicU64,
    last_log: Mutex<Option<Instant>>,
}

impl Controls {
    /// A fresh secret for the dashboard bound at `bound`.
    pub fn new(bound: SocketAddr) -> Controls {
        Controls::with_token(bound, random_token())
    }

    pub fn with_token(bound: SocketAddr, token: String) -> Controls {
        Controls {
            token,
            bound,
            refused: AtomicU64::new(0),
            last_log: Mutex::new(None),
        }
    }

    /// The URL to print: the page, with the token in its fragment.
    pub fn url(&self) -> String {
        format!("http://{}/dashboard/#token={}", self.bound, self.token)
    }

    /// Whether `host` (a `Host` header: name or IP, with or without a port) is loopback or
    /// the bound address.
    fn host_ok(&self, host: &str) -> bool {
        let name = match host.strip_prefix('[') {
            // [v6]:port or [v6]
            Some(rest) => match rest.split_once(']') {
                Some((ip, _)) => ip,
                None => return false,
            },
            None => host.rsplit_once(':').map_or(host, |(h, _)| h),
        };
        if name.eq_ignore_ascii_case("localhost") {
            return true;
        }
        match name.parse::<IpAddr>() {
            Ok(ip) => ip.is_loopback() || ip == self.bound.ip(),
            Err(_) => false,
        }
    }

    /// The checks above, for one request.
    pub fn check(&self, method: &Method, headers: &HeaderMap) -> Result<(), &'static str> {
        let host = headers
            .get(header::HOST)
            .and_then(|h| h.to_str().ok())
            .ok_or("no Host header")?;
        if !self.host_ok(host) {
            return Err("the Host is not this machine's loopback address (DNS rebinding?)");
        }
        if method == Method::GET || method == Method::HEAD {
            return Ok(());
        }
        if let Some(origin) = headers.get(header::ORIGIN) {
            let own = origin
                .as_bytes()
                .strip_prefix(b"http://")
                .is_some_and(|o| o.eq_ignore_ascii_case(host.as_bytes()));
            if !own {
                return Err("cross-origin requests to the controls are refused");
            }
        }
        let sent = headers.get(TOKEN_HEADER).map_or(&[][..], |v| v.as_bytes());
        if !same(sent, self.token.as_bytes()) {
            return Err(
                "the controls need the token in the dashboard URL raftkv cluster printed \
                        (…/dashboard/#token=…)",
            );
        }
        Ok(())
    }

    fn log_refusal(&self, method: &Method, path: &str, why: &str) {
        let n = self.refused.fetch_add(1, Ordering::Relaxed) + 1;
        let mut last = self.last_log.lock().unwrap_or_else(|e| e.into_inner());
        if last.is_some_and(|at| at.elapsed().as_secs() < 1) {
            return;
        }
        *last = Some(Instant::now());
        tracing::warn!("dashboard: refused {method} {path}: {why} ({n} refused in all)");
    }
}

/// Compare without stopping at the first difference, so timing tells nothing of the token.
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// 128 bits from the OS, as hex. Should /dev/urandom be unreadable, std's per-process
/// random hash keys (also from the OS) mixed with the clock stand in.
fn random_token() -> String {
    use std::io::Read;
    let mut bytes = [0u8; 16];
    let read = std::fs::File::open("/dev/urandom").and_then(|mut f| f.read_exact(&mut bytes));
    if read.is_err() {
        use std::hash::{BuildHasher, Hasher};
        for (i, chunk) in bytes.chunks_mut(8).enumerate() {
            let mut h = std::collections::hash_map::RandomState::new().build_hasher();
            h.write_usize(i);
            h.write_u128(
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_nanos()),
            );
            chunk.copy_from_slice(&h.finish().to_le_bytes());
        }
    }
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The middleware: every route of the supervisor's dashboard goes through it.
pub async fn enforce(
    axum::extract::State(controls): axum::extract::State<Arc<Controls>>,
    req: Request,
    next: Next,
) -> Response {
    match controls.check(req.method(), req.headers()) {
        Ok(()) => next.run(req).await,
        Err(why) => {
            controls.log_refusal(req.method(), req.uri().path(), why);
            (StatusCode::FORBIDDEN, format!("{why}\n")).into_response()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn controls() -> Controls {
        Controls::with_token("127.0.0.1:2479".parse().unwrap(), "s3cret".into())
    }

    fn headers(list: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in list {
            h.insert(*k, v.parse().unwrap());
        }
        h
    }

    #[test]
    fn a_control_needs_the_token_a_loopback_host_and_its_own_origin() {
        let c = controls();
        let post = Method::POST;
        let good = [("host", "127.0.0.1:2479"), (TOKEN_HEADER, "s3cret")];
        assert_eq!(c.check(&post, &headers(&good)), Ok(()));
        let with_origin = [
            ("host", "localhost:2479"),
            ("origin", "http://localhost:2479"),
            (TOKEN_HEADER, "s3cret"),
        ];
        assert_eq!(c.check(&post, &headers(&with_origin)), Ok(()));
        let v6 = [("host", "[::1]:2479"), (TOKEN_HEADER, "s3cret")];
        assert_eq!(c.check(&post, &headers(&v6)), Ok(()));

        for bad in [
            vec![("host", "127.0.0.1:2479")],
            vec![("host", "127.0.0.1:2479"), (TOKEN_HEADER, "s3cre")],
            vec![("host", "127.0.0.1:2479"), (TOKEN_HEADER, "s3creT")],
            vec![("host", "evil.example:2479"), (TOKEN_HEADER, "s3cret")],
            vec![("host", "127.0.0.1.evil.example"), (TOKEN_HEADER, "s3cret")],
            vec![(TOKEN_HEADER, "s3cret")],
            vec![
                ("host", "127.0.0.1:2479"),
                ("origin", "https://evil.example"),
                (TOKEN_HEADER, "s3cret"),
            ],
            vec![
                ("host", "127.0.0.1:2479"),
                ("origin", "null"),
                (TOKEN_HEADER, "s3cret"),
            ],
        ] {
            assert!(c.check(&post, &headers(&bad)).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn read_only_pages_need_a_loopback_host_only() {
        let c = controls();
        assert_eq!(
            c.check(&Method::GET, &headers(&[("host", "127.0.0.1:2479")])),
            Ok(())
        );
        assert!(c
            .check(&Method::GET, &headers(&[("host", "rebound.example:2479")]))
            .is_err());
    }

    #[test]
    fn tokens_are_long_and_fresh() {
        let (a, b) = (random_token(), random_token());
        assert_eq!(a.len(), 32);
        assert_ne!(a, b);
    }
}
