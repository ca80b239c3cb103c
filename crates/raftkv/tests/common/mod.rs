//! Helpers for tests that start real `raftkv` processes on free loopback ports.
#![allow(dead_code)] // each test file uses its own subset

use bytes::Bytes;
use server::pb::etcdserverpb::{kv_client::KvClient, PutRequest, RangeRequest};
use std::io::{Read, Write};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use tonic::transport::Channel;

/// A port for a test member. Drawn below the kernel's ephemeral range (32768 and up) so that
/// no outgoing connection can hold it, from a counter that starts at a point derived from the
/// process id, skipping ports something already listens on. (Binding port 0 and releasing it
/// would hand out ports from the range outgoing connections use, and tests would collide.)
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    const LOW: u32 = 20_000;
    const SPAN: u32 = 12_000;
    let start = std::process::id().wrapping_mul(97) % SPAN;
    loop {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let port = (LOW + (start + n) % SPAN) as u16;
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
}

pub struct Proc {
    pub name: String,
    pub client: String,
    pub child: Option<Child>,
    pub args: Vec<String>,
}

impl Proc {
    pub fn spawn(&mut self) {
        let child = Command::new(env!("CARGO_BIN_EXE_raftkv"))
            .args(&self.args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start raftkv");
        self.child = Some(child);
    }

    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill(); // SIGKILL: nothing gets flushed
            let _ = c.wait();
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

pub fn start(dir: &std::path::Path) -> Vec<Proc> {
    start_with(dir, |_, _, url| url.to_string())
}

/// Start three members with extra flags (`--flag=value`; one named like a default replaces
/// it).
pub fn start_flags(dir: &std::path::Path, extra: &[&str]) -> Vec<Proc> {
    start_members(dir, |_, _, url| url.to_string(), extra)
}

/// Start three members; `peer_url(viewer, member, real_url)` is the URL member `viewer` is
/// told to reach `member` at (a test may put a proxy in between).
pub fn start_with(
    dir: &std::path::Path,
    peer_url: impl Fn(usize, usize, &str) -> String,
) -> Vec<Proc> {
    start_members(dir, peer_url, &[])
}

fn start_members(
    dir: &std::path::Path,
    peer_url: impl Fn(usize, usize, &str) -> String,
    extra: &[&str],
) -> Vec<Proc> {
    let ports: Vec<(u16, u16)> = (0..3).map(|_| (free_port(), free_port())).collect();
    let peer = |i: usize| format!("http://127.0.0.1:{}", ports[i].1);
    (0..3)
        .map(|i| {
            let client = format!("http://127.0.0.1:{}", ports[i].0);
            let cluster = (0..3)
                .map(|j| {
                    let url = if i == j {
                        peer(j)
                    } else {
                        peer_url(i, j, &peer(j))
                    };
                    format!("n{j}={url}")
                })
                .collect::<Vec<_>>()
                .join(",");
            let mut args: Vec<String> = vec![
                "serve".into(),
                format!("--name=n{i}"),
                format!("--data-dir={}", dir.join(format!("n{i}")).display()),
                format!("--listen-client-urls={client}"),
                format!("--advertise-client-urls={client}"),
                format!("--listen-peer-urls={}", peer(i)),
                format!("--initial-advertise-peer-urls={}", peer(i)),
                format!("--initial-cluster={cluster}"),
                "--initial-cluster-token=test".into(),
                "--heartbeat-interval=20".into(),
                "--election-timeout=200".into(),
                "--snapshot-count=50".into(),
            ];
            // An extra flag replaces the default of the same name.
            args.retain(|a| {
                !extra
                    .iter()
                    .any(|e| e.split('=').next() == a.split('=').next())
            });
            args.extend(extra.iter().map(|s| s.to_string()));
            let mut p = Proc {
                name: format!("n{i}"),
                client,
                child: None,
                args,
            };
            p.spawn();
            p
        })
        .collect()
}

/// A one-member cluster serving on its own, with extra flags.
pub fn one_member(dir: &std::path::Path, extra: &[&str]) -> Proc {
    let client = format!("http://127.0.0.1:{}", free_port());
    let peer = format!("http://127.0.0.1:{}", free_port());
    let mut args: Vec<String> = vec![
        "serve".into(),
        "--name=n0".into(),
        format!("--data-dir={}", dir.join("n0").display()),
        format!("--listen-client-urls={client}"),
        format!("--advertise-client-urls={client}"),
        format!("--listen-peer-urls={peer}"),
        format!("--initial-advertise-peer-urls={peer}"),
        format!("--initial-cluster=n0={peer}"),
        "--initial-cluster-token=test".into(),
        "--heartbeat-interval=20".into(),
        "--election-timeout=200".into(),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    let mut p = Proc {
        name: "n0".into(),
        client,
        child: None,
        args,
    };
    p.spawn();
    p
}

/// A channel to `url`, connected on first use.
pub fn channel(url: &str) -> Channel {
    tonic::transport::Endpoint::from_shared(url.to_string())
        .unwrap()
        .connect_lazy()
}

pub async fn kv(url: &str) -> KvClient<Channel> {
    KvClient::new(
        tonic::transport::Endpoint::from_shared(url.to_string())
            .unwrap()
            .connect_lazy(),
    )
}

/// Put with retries (a client with every endpoint just retries elsewhere); returns the
/// member that acknowledged it.
pub async fn put_any(procs: &[Proc], key: &str, value: &str) -> usize {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        for (i, p) in procs.iter().enumerate().filter(|(_, p)| p.child.is_some()) {
            let req = PutRequest {
                key: Bytes::copy_from_slice(key.as_bytes()),
                value: Bytes::copy_from_slice(value.as_bytes()),
                ..Default::default()
            };
            if kv(&p.client).await.put(req).await.is_ok() {
                return i;
            }
        }
        assert!(Instant::now() < deadline, "no member accepted the write");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

pub async fn get(url: &str, key: &str) -> Result<Option<Bytes>, tonic::Status> {
    let req = RangeRequest {
        key: Bytes::copy_from_slice(key.as_bytes()),
        ..Default::default()
    };
    let r = kv(url).await.range(req).await?.into_inner();
    Ok(r.kvs.into_iter().next().map(|kv| kv.value))
}

pub fn run(args: &[&str]) -> (i32, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_raftkv"))
        .args(args)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A plain HTTP/1.1 GET on a member's client port: (status, body).
pub fn http_get(client_url: &str, path: &str) -> (u16, String) {
    let addr = client_url.trim_start_matches("http://");
    let mut s = std::net::TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    let status = out
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = out.split_once("\r\n\r\n").map_or("", |b| b.1).to_string();
    (status, body)
}

/// The sum of a metric's samples (every label set) in a scrape, if it has any.
pub fn metric(text: &str, name: &str) -> Option<f64> {
    let mut found = None;
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let (series, value) = line.rsplit_once(' ')?;
        let metric_name = series.split('{').next().unwrap_or(series);
        if metric_name == name {
            *found.get_or_insert(0.0) += value.parse::<f64>().unwrap_or(0.0);
        }
    }
    found
}

/// A metric of a member, which must be there.
pub fn scrape(url: &str, name: &str) -> f64 {
    let (code, body) = http_get(url, "/metrics");
    assert_eq!(code, 200, "/metrics answered {code}");
    metric(&body, name).unwrap_or_else(|| panic!("{name} missing from /metrics"))
}
