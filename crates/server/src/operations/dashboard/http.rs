//! A minimal HTTP/1.1 client over hyper's client connection, for polling members'
//! `/dashboard/state` (and for scripts and tests driving the dashboard's API): one
//! connection per request (a few a second, on loopback), TLS when the URL is `https://`
//! (with the process's client identity, as other member-to-member calls use).

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

/// The header that carries the run's token to `raftkv cluster`'s dashboard controls
/// (the page sends it; so do scripts and tests through [`post_with_token`]).
pub const TOKEN_HEADER: &str = "x-raftkv-token";

/// Most bytes of an answer read (a member's state is a few kilobytes).
const MAX_BODY: usize = 1 << 20;

/// GET `path` from `base` (`http://host:port` or `https://host:port`): the body of a 200.
pub async fn get(base: &str, path: &str) -> Result<Vec<u8>, String> {
    call(http::Method::GET, base, path, None).await
}

/// POST an empty body to `path`: the body of a 200, or the status and body of anything else.
pub async fn post(base: &str, path: &str) -> Result<Vec<u8>, String> {
    call(http::Method::POST, base, path, None).await
}

/// POST to a dashboard control with the run's `token` (see `guard.rs`).
pub async fn post_with_token(base: &str, path: &str, token: &str) -> Result<Vec<u8>, String> {
    call(http::Method::POST, base, path, Some(token)).await
}

async fn call(
    method: http::Method,
    base: &str,
    path: &str,
    token: Option<&str>,
) -> Result<Vec<u8>, String> {
    let uri: http::Uri = base
        .parse()
        .map_err(|e| format!("{base:?} is not a URL: {e}"))?;
    let host = uri.host().ok_or_else(|| format!("{base:?} has no host"))?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let https = uri.scheme_str() == Some("https");
    let port = uri.port_u16().unwrap_or(if https { 443 } else { 80 });
    let tcp = TcpStream::connect((host, port))
        .await
        .map_err(|e| format!("{base}: {e}"))?;
    let _ = tcp.set_nodelay(true);
    let authority = uri
        .authority()
        .map_or_else(|| host.to_string(), |a| a.to_string());
    if https {
        let tls = crate::network::tls::client_dialer()
            .connect_http1(host, tcp)
            .await
            .map_err(|e| format!("{base}: {e}"))?;
        request(TokioIo::new(tls), method, &authority, path, token).await
    } else {
        request(TokioIo::new(tcp), method, &authority, path, token).await
    }
}

async fn request<I>(
    io: I,
    method: http::Method,
    authority: &str,
    path: &str,
    token: Option<&str>,
) -> Result<Vec<u8>, String>
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let (mut sender, conn) = hyper::client::conn::http1::handshake(io)
        .await
        .map_err(|e| e.to_string())?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    let mut req = http::Request::builder()
        .method(method)
        .uri(path)
        .header(http::header::HOST, authority);
    if let Some(t) = token {
        req = req.header(TOKEN_HEADER, t);
    }
    let req = req.body(Empty::<Bytes>::new()).map_err(|e| e.to_string())?;
    let resp = sender.send_request(req).await.map_err(|e| e.to_string())?;
    let status = resp.status();
    let limited = http_body_util::Limited::new(resp.into_body(), MAX_BODY);
    let body = limited.collect().await.map_err(|e| e.to_string())?;
    let body = body.to_bytes().to_vec();
    match status {
        http::StatusCode::OK => Ok(body),
        _ => Err(format!(
            "{path}: {status}: {}",
            String::from_utf8_lossy(&body).trim()
        )),
    }
}
