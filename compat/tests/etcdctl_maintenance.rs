//! Operations with Debian's `etcdctl` (3.4), against etcd 3.4 and raftkv:
//! - the NOSPACE flow, a differential: the same script on a one-member etcd and a one-member
//!   raftkv, both with `--quota-backend-bytes`: puts until the quota refuses one, then
//!   `alarm list`, writes refused (put, txn, lease grant) while reads and health checks
//!   go on, `/health` failing, etcd's recovery (delete, compact, defrag, disarm) and writes
//!   working again. Compared: stdout, etcdctl's messages and exit codes; normalized: member
//!   ids, ports, revisions and timings, and how many puts fit (etcd counts its database's
//!   pages, raftkv the bytes of keys and values);
//! - backups: `etcdctl snapshot save` from a raftkv member (the same message as etcd's),
//!   `raftkv snapshot restore` of that file into a new three-member cluster, which serves
//!   the same keys (`etcdctl get`) with the same `etcdctl endpoint hashkv`; every member of
//!   a cluster reports the same hash;
//! - `/metrics`, `/health` and `/version` over plain HTTP, as etcd serves them.
//!
//! `etcdctl endpoint … --cluster` does not work against raftkv yet: etcdctl 3.4 dials the
//! members' client URLs with the scheme left in the HTTP/2 `:authority` header, which
//! raftkv's HTTP/2 server refuses as malformed; listing every endpoint with `--endpoints`
//! does the same thing.

mod support;

use std::io::{Read, Write};
use std::process::Command;
use std::time::Duration;
use support::{Cluster, KillOnDrop, Kind, Timing};

const PORTS: (u16, u16) = (9_000, 10_000);

fn etcdctl(endpoints: &str, args: &[&str]) -> (i32, String, String) {
    let out = support::etcdctl_cmd(endpoints, 5)
        .args(args)
        .output()
        .expect("run etcdctl (see .ci/run)");
    let messages = String::from_utf8_lossy(&out.stderr)
        .lines()
        .filter(|l| !l.starts_with('{'))
        .collect::<Vec<_>>()
        .join("\n");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        messages,
    )
}

fn http_get(endpoint: &str, path: &str) -> (u16, String) {
    let mut s = std::net::TcpStream::connect(endpoint).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {endpoint}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    let code = out
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let (head, body) = out.split_once("\r\n\r\n").unwrap_or((&out, ""));
    let chunked = head
        .lines()
        .any(|l| l.eq_ignore_ascii_case("transfer-encoding: chunked"));
    (
        code,
        if chunked {
            dechunk(body)
        } else {
            body.to_string()
        },
    )
}

/// An HTTP/1.1 chunked body, put back together (Go's server sends big ones so).
fn dechunk(mut body: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = body.split_once("\r\n") {
        let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
        if n == 0 || rest.len() < n {
            break;
        }
        out.push_str(&rest[..n]);
        body = rest[n..].strip_prefix("\r\n").unwrap_or(&rest[n..]);
    }
    out
}

/// Take out what differs between any two servers: member ids, ports, revisions, timings.
fn normalize(s: &str, c: &Cluster, member_id: &str) -> String {
    let mut s = s.replace(member_id, "<member>");
    for (i, e) in c.endpoints.iter().enumerate() {
        s = s.replace(e, &format!("<endpoint{i}>"));
    }
    let took = regex_free_took(&s);
    took.lines()
        .map(|l| {
            if let Some(rest) = l.strip_prefix("compacted revision ") {
                let _ = rest;
                "compacted revision <rev>".to_string()
            } else {
                l.to_string()
            }
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// "took = 1.2ms" → "took = <t>".
fn regex_free_took(s: &str) -> String {
    s.lines()
        .map(|l| match l.find("took = ") {
            Some(i) => format!("{}took = <t>", &l[..i]),
            None => l.to_string(),
        })
        .collect::<Vec<_>>()
        .join("\n")
}

fn member_id(endpoint: &str) -> String {
    let (_, out, _) = etcdctl(endpoint, &["endpoint", "status", "-w", "fields"]);
    out.lines()
        .find_map(|l| l.strip_prefix("\"MemberID\" : "))
        .expect("a member id")
        .trim()
        .to_string()
}

/// The NOSPACE script on one server: every step's (exit code, stdout, messages), normalized.
async fn nospace_script(kind: Kind) -> Vec<(String, i32, String, String)> {
    let c = support::start_flags(
        kind,
        1,
        PORTS.0,
        PORTS.1,
        Timing::QUICK,
        &["--quota-backend-bytes=300000"],
    )
    .await;
    let e = c.endpoints[0].clone();
    let id = member_id(&e);
    let big = "x".repeat(50_000);
    let mut steps = Vec::new();
    let step = |name: &str, args: &[&str]| {
        let (code, out, err) = etcdctl(&e, args);
        (
            name.to_string(),
            code,
            normalize(&out, &c, &id),
            normalize(&err, &c, &id),
        )
    };
    // Fill until the quota refuses a put: the refusal itself is compared.
    let mut n = 0;
    loop {
        let (code, _, err) = etcdctl(&e, &["put", &format!("k{n}"), &big]);
        n += 1;
        if code != 0 {
            assert!(
                err.contains("database space exceeded"),
                "{}: {err}",
                kind.name()
            );
            break;
        }
        assert!(n < 100, "{} never refused a put", kind.name());
    }
    steps.push(step("alarm list", &["alarm", "list"]));
    steps.push(step("put refused", &["put", "small", "v"]));
    steps.push(step("lease grant refused", &["lease", "grant", "60"]));
    steps.push(step("get works", &["get", "k0", "--keys-only"]));
    steps.push(step("endpoint health", &["endpoint", "health"]));
    let (health_code, health) = http_get(&e, "/health");
    steps.push((
        "/health under NOSPACE".into(),
        i32::from(health_code),
        health,
        String::new(),
    ));
    let (code, out, _) = etcdctl(&e, &["endpoint", "status", "-w", "json"]);
    let errors = out
        .split("\"errors\":")
        .nth(1)
        .and_then(|r| r.split(']').next())
        .unwrap_or("")
        .replace(&id, "<member>");
    steps.push(("status errors".into(), code, errors, String::new()));
    // etcd's recovery procedure.
    let (code, _, _) = etcdctl(&e, &["del", "k", "--prefix"]);
    steps.push(("del works".into(), code, String::new(), String::new()));
    let (_, out, _) = etcdctl(&e, &["endpoint", "status", "-w", "fields"]);
    let rev = out
        .lines()
        .find_map(|l| l.strip_prefix("\"Revision\" : "))
        .expect("a revision")
        .trim()
        .to_string();
    steps.push(step("compact", &["compact", &rev]));
    steps.push(step("defrag", &["defrag"]));
    steps.push(step("put still refused", &["put", "small", "v"]));
    steps.push(step("alarm disarm", &["alarm", "disarm"]));
    steps.push(step("alarm list empty", &["alarm", "list"]));
    steps.push(step("put works", &["put", "small", "v"]));
    let (health_code, health) = http_get(&e, "/health");
    steps.push((
        "/health".into(),
        i32::from(health_code),
        health,
        String::new(),
    ));
    steps
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nospace_and_alarms_answer_as_etcds_do() {
    let etcd = nospace_script(Kind::Etcd).await;
    let raftkv = nospace_script(Kind::Raftkv).await;
    for (e, r) in etcd.iter().zip(&raftkv) {
        assert_eq!(e, r, "step {:?}: etcd then raftkv", e.0);
    }
    assert_eq!(etcd.len(), raftkv.len());
}

fn hashes(c: &Cluster) -> Vec<String> {
    let all = c.endpoints.join(",");
    let (code, out, err) = etcdctl(&all, &["endpoint", "hashkv"]);
    assert_eq!(code, 0, "{err}");
    let mut by_endpoint: Vec<String> = out
        .lines()
        .map(|l| l.rsplit(", ").next().unwrap().to_string())
        .collect();
    by_endpoint.sort();
    by_endpoint
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcdctl_snapshot_save_then_raftkv_restore_serves_the_same_data() {
    let c = support::start(Kind::Raftkv, 3, PORTS.0, PORTS.1).await;
    let e = c.endpoints[1].clone();
    for i in 0..30 {
        let (code, _, err) = etcdctl(&e, &["put", &format!("key{i:02}"), &format!("v{i}")]);
        assert_eq!(code, 0, "{err}");
    }
    etcdctl(&e, &["del", "key1", "--prefix"]);
    let original = hashes(&c);
    assert!(
        original.windows(2).all(|w| w[0] == w[1]),
        "every member reports the same hash: {original:?}"
    );
    let (_, keys, _) = etcdctl(&e, &["get", "", "--prefix", "-w", "json"]);
    let file = c.dir.path().join("backup.db");
    let file_s = file.display().to_string();
    let (code, out, err) = etcdctl(&e, &["snapshot", "save", &file_s]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(out.trim(), format!("Snapshot saved at {file_s}"));
    // etcd says the same of its own.
    let etcd = support::start(Kind::Etcd, 1, PORTS.0, PORTS.1).await;
    let etcd_file = etcd.dir.path().join("etcd.db").display().to_string();
    let (code, out, _) = etcdctl(&etcd.endpoints[0], &["snapshot", "save", &etcd_file]);
    assert_eq!(
        (code, out.trim()),
        (0, &*format!("Snapshot saved at {etcd_file}"))
    );
    drop(etcd);

    // A new cluster from the file (etcd's restore flow, with raftkv's tool).
    let base = support::port_block(PORTS.0, PORTS.1, 3);
    let peer = |i: u16| format!("http://127.0.0.1:{}", base + 10 * i + 1);
    let name = |i: u16| format!("r{i}");
    let initial = (0..3)
        .map(|i| format!("{}={}", name(i), peer(i)))
        .collect::<Vec<_>>()
        .join(",");
    let mut procs = Vec::new();
    let mut endpoints = Vec::new();
    for i in 0..3u16 {
        let dir = c.dir.path().join(format!("restored-{i}"));
        let out = Command::new(support::raftkv_bin())
            .args(["snapshot", "restore", &file_s])
            .arg(format!("--name={}", name(i)))
            .arg(format!("--initial-cluster={initial}"))
            .arg("--initial-cluster-token=restored")
            .arg(format!("--initial-advertise-peer-urls={}", peer(i)))
            .arg(format!("--data-dir={}", dir.display()))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let client = format!("127.0.0.1:{}", base + 10 * i);
        let child = Command::new(support::raftkv_bin())
            .arg("serve")
            .arg(format!("--name={}", name(i)))
            .arg(format!("--data-dir={}", dir.display()))
            .arg(format!("--listen-client-urls=http://{client}"))
            .arg(format!("--advertise-client-urls=http://{client}"))
            .arg(format!("--listen-peer-urls={}", peer(i)))
            .arg(format!("--initial-advertise-peer-urls={}", peer(i)))
            .arg(format!("--initial-cluster={initial}"))
            .arg("--initial-cluster-token=restored")
            .arg("--heartbeat-interval=50")
            .arg("--election-timeout=500")
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(dir.with_extension("log")).unwrap())
            .spawn()
            .unwrap();
        procs.push(KillOnDrop(child));
        endpoints.push(client);
    }
    let logs = c.dir.path().to_path_buf();
    let all = endpoints.join(",");
    let mut restored_keys = String::new();
    for _ in 0..100 {
        let (code, out, _) = etcdctl(&all, &["get", "", "--prefix", "-w", "json"]);
        if code == 0 {
            restored_keys = out;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let kvs = |json: &str| json.split("\"kvs\":").nth(1).unwrap_or("").to_string();
    assert!(!kvs(&keys).is_empty());
    assert_eq!(
        kvs(&restored_keys),
        kvs(&keys),
        "the same keys, values and revisions"
    );
    let (code, out, err) = etcdctl(&all, &["endpoint", "hashkv"]);
    let log = |i: u16| std::fs::read_to_string(logs.join(format!("restored-{i}.log")));
    assert_eq!(
        code,
        0,
        "{err}\nthe restored members' logs:\n{:?}\n{:?}\n{:?}",
        log(0),
        log(1),
        log(2)
    );
    drop(c);
    for line in out.lines() {
        assert!(
            line.ends_with(&format!(", {}", original[0])),
            "a restored member hashes as the original did: {line} (original {})",
            original[0]
        );
    }
    assert_eq!(out.lines().count(), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_health_and_version_are_served_as_etcd_serves_them() {
    for kind in [Kind::Etcd, Kind::Raftkv] {
        let c = support::start(kind, 1, PORTS.0, PORTS.1).await;
        let e = &c.endpoints[0];
        let (code, health) = http_get(e, "/health");
        assert_eq!(
            (code, health.as_str()),
            (200, r#"{"health":"true"}"#),
            "{kind:?}"
        );
        let (code, version) = http_get(e, "/version");
        assert_eq!(code, 200);
        assert!(
            version.starts_with(r#"{"etcdserver":"3.4."#)
                && version.ends_with(r#"","etcdcluster":"3.4.0"}"#),
            "{kind:?}: {version}"
        );
        etcdctl(e, &["put", "a", "b"]);
        let (code, metrics) = http_get(e, "/metrics");
        assert_eq!(code, 200);
        for name in [
            "etcd_server_has_leader 1",
            "etcd_server_is_leader 1",
            "etcd_server_leader_changes_seen_total 1",
            "# TYPE etcd_server_proposals_committed_total gauge",
            "# TYPE etcd_server_proposals_applied_total gauge",
            "# TYPE etcd_server_proposals_pending gauge",
            "# TYPE etcd_server_proposals_failed_total counter",
            "# TYPE etcd_disk_wal_fsync_duration_seconds histogram",
            "etcd_disk_wal_fsync_duration_seconds_bucket{le=\"0.001\"}",
            "# TYPE etcd_mvcc_db_total_size_in_bytes gauge",
            "grpc_server_handled_total{grpc_code=\"OK\",grpc_method=\"Put\",grpc_service=\"etcdserverpb.KV\",grpc_type=\"unary\"} 1",
        ] {
            assert!(
                metrics.lines().any(|l| l.starts_with(name)),
                "{kind:?}: no {name:?} in /metrics"
            );
        }
    }
}
