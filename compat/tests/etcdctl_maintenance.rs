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

use std::process::Command;
use std::time::Duration;
use support::{hide_took, ports, retry_async, Cluster, Kind, Output, Timing, Transcript};

const PORTS: (u16, u16) = ports::MAINTENANCE;

fn etcdctl(endpoints: &str, args: &[&str]) -> Output {
    support::etcdctl_run(endpoints, 5, args, "")
}

fn http_get(endpoint: &str, path: &str) -> (u16, String) {
    support::http_get(endpoint, path, Duration::from_secs(5)).unwrap()
}

/// Take out what differs between any two servers: member ids, ports, revisions, timings.
fn normalize(s: &str, c: &Cluster, member_id: &str) -> String {
    let mut s = s.replace(member_id, "<member>");
    for (i, e) in c.endpoints.iter().enumerate() {
        s = s.replace(e, &format!("<endpoint{i}>"));
    }
    hide_took(&s)
        .lines()
        .map(|l| {
            if l.starts_with("compacted revision ") {
                "compacted revision <rev>".to_string()
            } else {
                l.to_string()
            }
        })
        .collect::<Vec<_>>()
        .join("\n")
}

fn member_id(endpoint: &str) -> String {
    let r = etcdctl(endpoint, &["endpoint", "status", "-w", "fields"]);
    r.stdout
        .lines()
        .find_map(|l| l.strip_prefix("\"MemberID\" : "))
        .expect("a member id")
        .trim()
        .to_string()
}

/// The NOSPACE script on one server: every step's exit code, stdout and messages (or HTTP
/// status and body), normalized.
async fn nospace_script(kind: Kind) -> Transcript {
    let c = support::start_flags(
        kind,
        1,
        PORTS,
        Timing::QUICK,
        &["--quota-backend-bytes=300000"],
    )
    .await;
    let e = c.endpoints[0].clone();
    let id = member_id(&e);
    let big = "x".repeat(50_000);
    let mut steps = Transcript::new();
    let shown = |code: Option<i32>, out: &str, err: &str| {
        format!(
            "exit {code:?}\n{}\n--- messages:\n{}",
            normalize(out, &c, &id),
            normalize(err, &c, &id)
        )
    };
    let step = |name: &str, args: &[&str]| {
        let r = etcdctl(&e, args);
        (name.to_string(), shown(r.code, &r.stdout, &r.messages()))
    };
    let http = |name: &str, path: &str| {
        let (code, body) = http_get(&e, path);
        (name.to_string(), format!("HTTP {code}\n{body}"))
    };
    // Fill until the quota refuses a put: the refusal itself is compared.
    let mut n = 0;
    loop {
        let r = etcdctl(&e, &["put", &format!("k{n}"), &big]);
        n += 1;
        if !r.ok() {
            assert!(
                r.stderr.contains("database space exceeded"),
                "{}: {}",
                kind.name(),
                r.stderr
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
    steps.push(http("/health under NOSPACE", "/health"));
    let r = etcdctl(&e, &["endpoint", "status", "-w", "json"]);
    let errors = r
        .stdout
        .split("\"errors\":")
        .nth(1)
        .and_then(|r| r.split(']').next())
        .unwrap_or("")
        .replace(&id, "<member>");
    steps.push(("status errors".into(), shown(r.code, &errors, "")));
    // etcd's recovery procedure.
    let r = etcdctl(&e, &["del", "k", "--prefix"]);
    steps.push(("del works".into(), shown(r.code, "", "")));
    let r = etcdctl(&e, &["endpoint", "status", "-w", "fields"]);
    let rev = r
        .stdout
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
    steps.push(http("/health", "/health"));
    steps
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nospace_and_alarms_answer_as_etcds_do() {
    let etcd = nospace_script(Kind::Etcd).await;
    let raftkv = nospace_script(Kind::Raftkv).await;
    support::show_transcript("SHOW_NOSPACE_TRANSCRIPT", &etcd);
    support::assert_same(&etcd, &raftkv);
}

/// Every member's `endpoint hashkv`, sorted.
fn hashes(c: &Cluster) -> Vec<String> {
    let all = c.endpoints.join(",");
    let r = etcdctl(&all, &["endpoint", "hashkv"]);
    assert!(r.ok(), "{}", r.stderr);
    let mut by_endpoint = support::last_fields(&r.stdout);
    by_endpoint.sort();
    by_endpoint
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcdctl_snapshot_save_then_raftkv_restore_serves_the_same_data() {
    let c = support::start(Kind::Raftkv, 3, PORTS).await;
    let e = c.endpoints[1].clone();
    for i in 0..30 {
        let r = etcdctl(&e, &["put", &format!("key{i:02}"), &format!("v{i}")]);
        assert!(r.ok(), "{}", r.stderr);
    }
    etcdctl(&e, &["del", "key1", "--prefix"]);
    let original = hashes(&c);
    assert!(
        original.windows(2).all(|w| w[0] == w[1]),
        "every member reports the same hash: {original:?}"
    );
    let keys = etcdctl(&e, &["get", "", "--prefix", "-w", "json"]).stdout;
    let file = c.dir.path().join("backup.db");
    let file_s = file.display().to_string();
    let r = etcdctl(&e, &["snapshot", "save", &file_s]);
    assert!(r.ok(), "{}", r.stderr);
    assert_eq!(r.stdout.trim(), format!("Snapshot saved at {file_s}"));
    // etcd says the same of its own.
    let etcd = support::start(Kind::Etcd, 1, PORTS).await;
    let etcd_file = etcd.dir.path().join("etcd.db").display().to_string();
    let r = etcdctl(&etcd.endpoints[0], &["snapshot", "save", &etcd_file]);
    assert_eq!(
        (r.code, r.stdout.trim()),
        (Some(0), &*format!("Snapshot saved at {etcd_file}"))
    );
    drop(etcd);

    // A new cluster from the file (etcd's restore flow, with raftkv's tool).
    let base = support::port_block(PORTS, 3);
    let peer = |i: u16| format!("http://127.0.0.1:{}", base + 10 * i + 1);
    let name = |i: u16| format!("r{i}");
    let (names, peers): (Vec<String>, Vec<String>) = (0..3).map(|i| (name(i), peer(i))).unzip();
    let initial = support::initial_cluster(
        names
            .iter()
            .map(String::as_str)
            .zip(peers.iter().map(String::as_str)),
    );
    let mut procs = Vec::new();
    let mut endpoints = Vec::new();
    for i in 0..3u16 {
        let dir = c.dir.path().join(format!("restored-{i}"));
        let restore = support::run_to_end(
            Command::new(support::raftkv_bin())
                .args(["snapshot", "restore", &file_s])
                .arg(format!("--name={}", name(i)))
                .arg(format!("--initial-cluster={initial}"))
                .arg("--initial-cluster-token=restored")
                .arg(format!("--initial-advertise-peer-urls={}", peer(i)))
                .arg(format!("--data-dir={}", dir.display())),
            "",
        );
        assert!(restore.ok(), "{}", restore.stderr);
        let client = format!("127.0.0.1:{}", base + 10 * i);
        // The founding flags, but no cluster state: the restored data directory has one.
        let flags = support::member_flags(
            &name(i),
            &dir,
            &format!("http://{client}"),
            &peer(i),
            &initial,
            "restored",
            Timing::QUICK,
        );
        let mut serve = Command::new(support::raftkv_bin());
        serve.arg("serve").args(flags);
        procs.push(support::spawn_logged(
            &mut serve,
            &dir.with_extension("log"),
        ));
        endpoints.push(client);
    }
    let logs = c.dir.path().to_path_buf();
    let all = endpoints.join(",");
    let restored_keys = retry_async(
        Duration::from_secs(10),
        Duration::from_millis(100),
        async || {
            let r = etcdctl(&all, &["get", "", "--prefix", "-w", "json"]);
            if r.ok() {
                Ok(r.stdout)
            } else {
                Err(())
            }
        },
    )
    .await
    .unwrap_or_default();
    let kvs = |json: &str| json.split("\"kvs\":").nth(1).unwrap_or("").to_string();
    assert!(!kvs(&keys).is_empty());
    assert_eq!(
        kvs(&restored_keys),
        kvs(&keys),
        "the same keys, values and revisions"
    );
    let r = etcdctl(&all, &["endpoint", "hashkv"]);
    let log = |i: u16| std::fs::read_to_string(logs.join(format!("restored-{i}.log")));
    assert!(
        r.ok(),
        "{}\nthe restored members' logs:\n{:?}\n{:?}\n{:?}",
        r.stderr,
        log(0),
        log(1),
        log(2)
    );
    let out = r.stdout;
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
        let c = support::start(kind, 1, PORTS).await;
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
