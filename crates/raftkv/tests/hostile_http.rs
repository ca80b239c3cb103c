//! What a hostile web page (or any client) can do over HTTP to real `raftkv` processes:
//! the requests are written by hand, as a browser or curl would send them, and every
//! refusal is checked to have changed nothing (a real gRPC Range reads the store after).
//!
//! - the client port and a metrics URL: cross-site writes (issue 25, defect 2), HTTP/1.1
//!   kept to the GET routes, gRPC to HTTP/2 with its content type;
//! - invented gRPC method paths add no metric series (defect 6);
//! - `raftkv cluster`'s dashboard controls: token, Host and Origin (defect 3);
//! - TLS: an HTTP/1.1-only client reaches /health, and still cannot call gRPC (defect 8);
//! - `--client-cert-auth` on an http:// URL: served as etcd serves it, with its warning
//!   (defect 10).

mod common;

use bytes::Bytes;
use common::free_port;
use server::network::tls::DevPki;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

/// The repro body: a gRPC-framed PutRequest{key: "csrf", value: "x"}.
const PUT_CSRF: &[u8] = b"\x00\x00\x00\x00\x09\x0a\x04csrf\x12\x01x";
const EVIL: &str = "https://evil.example";

/// One `raftkv serve` member (a cluster of one), its log in a file.
struct Member {
    child: Child,
    client: u16,
    metrics: u16,
    log: PathBuf,
}

impl Drop for Member {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Member {
    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

/// A member serving clients on http(s)://127.0.0.1:client and metrics on a plain metrics URL.
fn member(dir: &Path, scheme: &str, extra: &[String]) -> Member {
    let (client, peer, metrics) = (free_port(), free_port(), free_port());
    let c = format!("{scheme}://127.0.0.1:{client}");
    let p = format!("{scheme}://127.0.0.1:{peer}");
    let log = dir.join("n0.log");
    let child = Command::new(env!("CARGO_BIN_EXE_raftkv"))
        .arg("serve")
        .args([
            "--name=n0".to_string(),
            format!("--data-dir={}", dir.join("n0").display()),
            format!("--listen-client-urls={c}"),
            format!("--advertise-client-urls={c}"),
            format!("--listen-peer-urls={p}"),
            format!("--initial-advertise-peer-urls={p}"),
            format!("--initial-cluster=n0={p}"),
            format!("--listen-metrics-urls=http://127.0.0.1:{metrics}"),
            "--heartbeat-interval=20".into(),
            "--election-timeout=200".into(),
        ])
        .args(extra)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .expect("start raftkv");
    Member {
        child,
        client,
        metrics,
        log,
    }
}

/// Send `request` as is and read the whole answer (the request asks to close): status, body.
async fn exchange<S: AsyncRead + AsyncWrite + Unpin>(mut s: S, request: &[u8]) -> (u16, String) {
    s.write_all(request).await.unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut answer))
        .await
        .expect("an answer within 10 s")
        .unwrap();
    let text = String::from_utf8_lossy(&answer).into_owned();
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no HTTP status in {text:?}"));
    let body = text
        .split_once("\r\n\r\n")
        .map_or("", |(_, b)| b)
        .to_string();
    (status, body)
}

/// An HTTP/1.1 request as curl sends it: `headers` are "Name: value" lines.
fn http1(method: &str, path: &str, host: &str, headers: &[&str], body: &[u8]) -> Vec<u8> {
    let mut r = format!("{method} {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n");
    for h in headers {
        r.push_str(h);
        r.push_str("\r\n");
    }
    if !body.is_empty() || method == "POST" {
        r.push_str(&format!("Content-Length: {}\r\n", body.len()));
    }
    r.push_str("\r\n");
    let mut bytes = r.into_bytes();
    bytes.extend_from_slice(body);
    bytes
}

/// An HTTP/1.1 request over plain TCP to 127.0.0.1:`port`.
async fn h1(port: u16, method: &str, path: &str, headers: &[&str], body: &[u8]) -> (u16, String) {
    let tcp = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    let host = format!("127.0.0.1:{port}");
    exchange(tcp, &http1(method, path, &host, headers, body)).await
}

/// A POST over HTTP/2 (prior knowledge, as gRPC clients speak on plaintext): the HTTP
/// status and the grpc-status, if any.
async fn h2_post(
    port: u16,
    path: &str,
    content_type: &str,
    origin: Option<&str>,
    body: &'static [u8],
) -> (u16, Option<String>) {
    let tcp = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    let (client, conn) = h2::client::handshake(tcp).await.unwrap();
    tokio::spawn(async move {
        let _ = conn.await;
    });
    let mut client = client.ready().await.unwrap();
    let mut req = http::Request::builder()
        .method("POST")
        .uri(format!("http://127.0.0.1:{port}{path}"))
        .header("content-type", content_type)
        .header("te", "trailers");
    if let Some(o) = origin {
        req = req.header("origin", o);
    }
    let (resp, mut send) = client.send_request(req.body(()).unwrap(), false).unwrap();
    send.send_data(Bytes::from_static(body), true).unwrap();
    let resp = resp.await.unwrap();
    let status = resp.status().as_u16();
    let mut grpc = resp
        .headers()
        .get("grpc-status")
        .map(|v| v.to_str().unwrap().to_string());
    let mut body = resp.into_body();
    while let Some(chunk) = body.data().await {
        let chunk = chunk.unwrap();
        let _ = body.flow_control().release_capacity(chunk.len());
    }
    if let Ok(Some(t)) = body.trailers().await {
        if let Some(v) = t.get("grpc-status") {
            grpc = Some(v.to_str().unwrap().to_string());
        }
    }
    (status, grpc)
}

/// Wait until the member answers a real gRPC Range.
async fn ready(url: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while common::get(url, "ready?").await.is_err() {
        assert!(Instant::now() < deadline, "{url} never served");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn cross_site_and_http1_grpc_requests_are_refused_and_store_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let m = member(dir.path(), "http", &[]);
    let url = format!("http://127.0.0.1:{}", m.client);
    ready(&url).await;
    let put = "/etcdserverpb.KV/Put";

    // The curl repro: HTTP/1.1, text/plain, a foreign Origin.
    let repro = ["Origin: https://evil.example", "Content-Type: text/plain"];
    let (status, body) = h1(m.client, "POST", put, &repro, PUT_CSRF).await;
    assert_eq!(status, 403, "{body}");
    // Without the Origin (curl, or a page whose browser sends none).
    let (status, body) = h1(
        m.client,
        "POST",
        put,
        &["Content-Type: text/plain"],
        PUT_CSRF,
    )
    .await;
    assert_eq!(status, 505, "{body}");
    // Every "simple" content type a form or no-cors fetch can use, and gRPC's own.
    for ct in [
        "application/x-www-form-urlencoded",
        "multipart/form-data; boundary=x",
        "application/grpc",
        "application/grpc+proto",
    ] {
        let (status, body) = h1(
            m.client,
            "POST",
            put,
            &[&format!("Content-Type: {ct}")],
            PUT_CSRF,
        )
        .await;
        assert_eq!(status, 505, "{ct}: {body}");
    }
    // A GET to a gRPC method over HTTP/1.1 (an <img>, a rebound page).
    let (status, _) = h1(m.client, "GET", "/etcdserverpb.KV/Range", &[], b"").await;
    assert_eq!(status, 505);
    // Over HTTP/2 without gRPC's content type (a browser inside TLS would send this).
    let (status, _) = h2_post(m.client, put, "text/plain", None, PUT_CSRF).await;
    assert_eq!(status, 415);
    // HTTP/2 with gRPC's content type but a foreign Origin.
    let (status, _) = h2_post(m.client, put, "application/grpc", Some(EVIL), PUT_CSRF).await;
    assert_eq!(status, 403);
    // The metrics URL serves the same routes under the same rule.
    let (status, _) = h1(
        m.metrics,
        "POST",
        put,
        &["Content-Type: text/plain"],
        PUT_CSRF,
    )
    .await;
    assert_eq!(status, 505);
    let (status, _) = h1(
        m.metrics,
        "GET",
        "/metrics",
        &["Origin: https://evil.example"],
        b"",
    )
    .await;
    assert_eq!(status, 403);

    assert_eq!(
        common::get(&url, "csrf").await.unwrap(),
        None,
        "a refused request wrote to the store"
    );

    // What must keep working: gRPC over HTTP/2 (a real client, and a raw h2 call)...
    let (status, grpc) = h2_post(m.client, put, "application/grpc", None, PUT_CSRF).await;
    assert_eq!((status, grpc.as_deref()), (200, Some("0")));
    assert_eq!(
        common::get(&url, "csrf").await.unwrap().as_deref(),
        Some(&b"x"[..])
    );
    common::kv(&url)
        .await
        .put(server::pb::etcdserverpb::PutRequest {
            key: Bytes::from_static(b"k"),
            value: Bytes::from_static(b"v"),
            ..Default::default()
        })
        .await
        .unwrap();
    // ...and GET /health, /metrics, /version over HTTP/1.1, on both ports, with or without
    // the port's own Origin.
    for port in [m.client, m.metrics] {
        for path in ["/health", "/metrics", "/version"] {
            let (status, body) = h1(port, "GET", path, &[], b"").await;
            assert_eq!(status, 200, "GET {path} on {port}: {body}");
        }
        let own = format!("Origin: http://127.0.0.1:{port}");
        let (status, _) = h1(port, "GET", "/health", &[&own], b"").await;
        assert_eq!(status, 200);
        let (status, _) = h1(port, "POST", "/health", &[], b"").await;
        assert_eq!(status, 405);
    }
    let (_, metrics) = h1(m.client, "GET", "/metrics", &[], b"").await;
    assert!(metrics.contains("etcd_server_has_leader"), "{metrics}");
}

#[tokio::test]
async fn invented_method_paths_add_no_metric_series() {
    let dir = tempfile::tempdir().unwrap();
    let m = member(dir.path(), "http", &[]);
    let url = format!("http://127.0.0.1:{}", m.client);
    ready(&url).await;
    let nonce = std::process::id();
    for i in 0..20 {
        let path = format!("/attacker.S{nonce}x{i}/m{i}");
        let (status, grpc) = h2_post(m.client, &path, "application/grpc", None, b"").await;
        // Unimplemented, as any gRPC server answers an unknown method.
        assert_eq!((status, grpc.as_deref()), (200, Some("12")), "{path}");
    }
    let (_, metrics) = h1(m.client, "GET", "/metrics", &[], b"").await;
    assert!(
        !metrics.contains("attacker"),
        "invented paths became labels:\n{}",
        metrics
            .lines()
            .filter(|l| l.contains("attacker"))
            .take(5)
            .collect::<Vec<_>>()
            .join("\n")
    );
    let unknown = metrics
        .lines()
        .find(|l| {
            l.starts_with("grpc_server_started_total")
                && l.contains("grpc_service=\"unknown\"")
                && l.contains("grpc_method=\"unknown\"")
        })
        .unwrap_or_else(|| panic!("no unknown series in:\n{metrics}"));
    assert!(unknown.ends_with(" 20"), "{unknown}");
    // Known methods keep their own labels.
    assert!(metrics.contains("grpc_method=\"Range\""), "{metrics}");
}

/// `raftkv cluster` (3 members) with its stderr in `log`: the dashboard's base URL and token.
struct ClusterRun {
    child: Child,
    base: String,
    port: u16,
    token: String,
    log: PathBuf,
}

impl Drop for ClusterRun {
    fn drop(&mut self) {
        // SIGINT: `raftkv cluster` stops its members before it exits.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGINT) };
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_cluster(dir: &Path) -> ClusterRun {
    let base = loop {
        let b = free_port();
        if b < 31_000
            && (0..3).all(|i| {
                (0..2).all(|p| std::net::TcpListener::bind(("127.0.0.1", b + 10 * i + p)).is_ok())
            })
        {
            break b;
        }
    };
    let dash = free_port();
    let log = dir.join("cluster.log");
    let mut child = Command::new(env!("CARGO_BIN_EXE_raftkv"))
        .args(["cluster", "--base-port", &base.to_string()])
        .args(["--dashboard-port", &dash.to_string(), "--data-dir"])
        .arg(dir.join("data"))
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let url = lines
        .by_ref()
        .map_while(Result::ok)
        .find_map(|l| {
            let rest = l.strip_prefix("Dashboard")?;
            Some(rest[rest.find("http://")?..].trim().to_string())
        })
        .expect("raftkv cluster prints its dashboard's URL");
    std::thread::spawn(move || lines.for_each(drop));
    let (base_url, token) = url
        .split_once("/dashboard/#token=")
        .unwrap_or_else(|| panic!("no token in the dashboard URL {url}"));
    assert!(token.len() >= 32, "a short token: {token}");
    ClusterRun {
        child,
        base: base_url.to_string(),
        port: dash,
        token: token.to_string(),
        log,
    }
}

impl ClusterRun {
    async fn process(&self, name: &str) -> Option<String> {
        let view = server::operations::dashboard::http::get(&self.base, "/dashboard/view")
            .await
            .ok()?;
        let v: serde_json::Value = serde_json::from_slice(&view).ok()?;
        v["members"]
            .as_array()?
            .iter()
            .find(|m| m["name"] == name)
            .and_then(|m| m["process"].as_str().map(str::to_string))
    }

    async fn wait_process(&self, name: &str, want: &str) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let got = self.process(name).await;
            if got.as_deref() == Some(want) {
                return;
            }
            assert!(Instant::now() < deadline, "{name} is {got:?}, not {want}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn raw(&self, method: &str, path: &str, host: &str, headers: &[&str]) -> (u16, String) {
        let tcp = TcpStream::connect(("127.0.0.1", self.port)).await.unwrap();
        exchange(tcp, &http1(method, path, host, headers, b"")).await
    }
}

#[tokio::test]
async fn dashboard_controls_need_the_token_a_loopback_host_and_their_own_origin() {
    let dir = tempfile::tempdir().unwrap();
    let c = start_cluster(dir.path());
    c.wait_process("n2", "running").await;
    let pause = "/dashboard/api/member/n2/pause";
    let host = format!("127.0.0.1:{}", c.port);
    let token = format!("X-Raftkv-Token: {}", c.token);
    let own = format!("Origin: http://{host}");

    // The repro: a foreign Origin, no token.
    let (status, body) = c
        .raw("POST", pause, &host, &["Origin: https://evil.example"])
        .await;
    assert_eq!(status, 403, "{body}");
    // No Origin (a form post from some browsers, curl), no token.
    let (status, body) = c.raw("POST", pause, &host, &[]).await;
    assert_eq!((status, body.contains("token")), (403, true), "{body}");
    // A wrong token.
    let wrong = format!("X-Raftkv-Token: {}0", c.token);
    let (status, _) = c.raw("POST", pause, &host, &[&wrong]).await;
    assert_eq!(status, 403);
    // The right token from a foreign page (it could not read it, but say it guessed).
    let (status, _) = c
        .raw(
            "POST",
            pause,
            &host,
            &[&token, "Origin: https://evil.example"],
        )
        .await;
    assert_eq!(status, 403);
    // DNS rebinding: the page's own name in Host, same-origin, with the token even.
    let rebound = format!("evil.example:{}", c.port);
    let rebound_origin = format!("Origin: http://{rebound}");
    let (status, _) = c
        .raw("POST", pause, &rebound, &[&token, &rebound_origin])
        .await;
    assert_eq!(status, 403);
    let (status, _) = c.raw("GET", "/dashboard/view", &rebound, &[]).await;
    assert_eq!(status, 403, "a rebound page read the view");

    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        c.process("n2").await.as_deref(),
        Some("running"),
        "a refused request paused n2"
    );
    let log = std::fs::read_to_string(&c.log).unwrap();
    assert!(log.contains("dashboard: refused POST"), "{log}");

    // Read-only pages stay open; the page itself, with its token and own origin, controls.
    let (status, _) = c.raw("GET", "/dashboard/view", &host, &[]).await;
    assert_eq!(status, 200);
    let (status, body) = c.raw("POST", pause, &host, &[&token, &own]).await;
    assert_eq!((status, body.as_str()), (200, "ok"));
    c.wait_process("n2", "paused").await;
    let localhost = format!("localhost:{}", c.port);
    let (status, body) = c
        .raw(
            "POST",
            "/dashboard/api/member/n2/resume",
            &localhost,
            &[&token],
        )
        .await;
    assert_eq!((status, body.as_str()), (200, "ok"));
    c.wait_process("n2", "running").await;
}

/// A TLS client speaking only HTTP/1.1 (ALPN `http/1.1`, as curl --http1.1 and urllib3
/// offer), presenting `pki`'s client certificate.
async fn tls_http1(pki: &DevPki, port: u16, request: &[u8]) -> (u16, String) {
    use tokio_rustls::rustls::{
        self,
        pki_types::{pem::PemObject, CertificateDer, PrivateKeyDer, ServerName},
    };
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(pki.ca()).unwrap() {
        roots.add(c.unwrap()).unwrap();
    }
    let chain = CertificateDer::pem_file_iter(pki.client_cert())
        .unwrap()
        .collect::<Result<Vec<_>, _>>()
        .unwrap();
    let key = PrivateKeyDer::from_pem_file(pki.client_key()).unwrap();
    let mut config = rustls::ClientConfig::builder_with_provider(
        rustls::crypto::ring::default_provider().into(),
    )
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_client_auth_cert(chain, key)
    .unwrap();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    let tcp = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    let tls = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config))
        .connect(ServerName::try_from("127.0.0.1").unwrap(), tcp)
        .await
        .expect("a TLS handshake offering only http/1.1");
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"http/1.1"[..]));
    exchange(tls, request).await
}

#[tokio::test]
async fn over_tls_an_http1_client_reaches_health_and_still_cannot_call_grpc() {
    let dir = tempfile::tempdir().unwrap();
    let pki = DevPki::ensure(&dir.path().join("pki"), &["n0".to_string()]).unwrap();
    let p = |p: PathBuf| p.display().to_string();
    let flags = vec![
        format!("--cert-file={}", p(pki.server_cert("n0"))),
        format!("--key-file={}", p(pki.server_key("n0"))),
        format!("--trusted-ca-file={}", p(pki.ca())),
        "--client-cert-auth".into(),
        format!("--peer-cert-file={}", p(pki.peer_cert("n0"))),
        format!("--peer-key-file={}", p(pki.peer_key("n0"))),
        format!("--peer-trusted-ca-file={}", p(pki.ca())),
        "--peer-client-cert-auth".into(),
    ];
    let m = member(dir.path(), "https", &flags);
    let url = format!("https://127.0.0.1:{}", m.client);
    let dialer = server::network::tls::Dialer::from_files(&server::network::tls::Files {
        cert: Some(pki.client_cert()),
        key: Some(pki.client_key()),
        trusted_ca: Some(pki.ca()),
        cert_auth: false,
    })
    .unwrap();
    let kv = || {
        server::pb::etcdserverpb::kv_client::KvClient::new(
            dialer.connect_lazy(tonic::transport::Endpoint::from_shared(url.clone()).unwrap()),
        )
    };
    let range = |key: &'static [u8]| server::pb::etcdserverpb::RangeRequest {
        key: Bytes::from_static(key),
        ..Default::default()
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    while kv().range(range(b"x")).await.is_err() {
        assert!(Instant::now() < deadline, "never served: {}", m.log());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let host = format!("127.0.0.1:{}", m.client);
    for path in ["/health", "/metrics", "/version"] {
        let (status, body) = tls_http1(&pki, m.client, &http1("GET", path, &host, &[], b"")).await;
        assert_eq!(status, 200, "GET {path} over TLS HTTP/1.1: {body}");
    }
    let repro = http1(
        "POST",
        "/etcdserverpb.KV/Put",
        &host,
        &["Content-Type: text/plain"],
        PUT_CSRF,
    );
    let (status, _) = tls_http1(&pki, m.client, &repro).await;
    assert_eq!(status, 505);
    let got = kv().range(range(b"csrf")).await.unwrap().into_inner();
    assert!(got.kvs.is_empty(), "the TLS repro wrote: {got:?}");
}

#[tokio::test]
async fn client_cert_auth_on_an_http_url_serves_as_etcd_does_and_says_it_is_ignored() {
    let dir = tempfile::tempdir().unwrap();
    let pki = DevPki::ensure(&dir.path().join("pki"), &["n0".to_string()]).unwrap();
    let flags = vec![
        "--client-cert-auth".to_string(),
        format!("--trusted-ca-file={}", pki.ca().display()),
    ];
    let m = member(dir.path(), "http", &flags);
    // etcd 3.4 serves the http:// URL (no certificate can be asked for there)...
    ready(&format!("http://127.0.0.1:{}", m.client)).await;
    // ...and warns that client cert auth is ignored for it: so does raftkv.
    let log = m.log();
    let warning = log
        .lines()
        .find(|l| l.contains("(--client-cert-auth) is enabled"))
        .unwrap_or_else(|| panic!("no warning in:\n{log}"));
    assert!(
        warning.contains("WARN") && warning.contains("ignored"),
        "{warning}"
    );
}
