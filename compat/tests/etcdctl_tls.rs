//! TLS with clients we did not write: `raftkv cluster --tls` (https client and peer URLs,
//! client certificates required on both, a throwaway CA under the data directory) driven by
//! Debian's etcdctl with `--cacert`/`--cert`/`--key` and by the etcd-client crate with its
//! `tls` feature. A client without a certificate is refused.
//!
//! Needs `etcdctl` (Debian package etcd-client); `RAFTKV_BIN` names the raftkv binary.

mod support;

use etcd_client::{Certificate, Client, ConnectOptions, Identity, TlsOptions};
use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// This file's ports (the other compat tests use 12000 and up).
const PORTS: (u16, u16) = (10_000, 12_000);

struct TlsCluster {
    parent: Child,
    /// https://127.0.0.1:port of each member.
    endpoints: Vec<String>,
    dir: tempfile::TempDir,
}

impl Drop for TlsCluster {
    fn drop(&mut self) {
        // SAFETY: signalling our own child; it stops its members and exits.
        unsafe { libc::kill(self.parent.id() as libc::pid_t, libc::SIGINT) };
        let _ = self.parent.wait();
    }
}

impl TlsCluster {
    fn tls(&self, file: &str) -> PathBuf {
        self.dir.path().join("tls").join(file)
    }

    fn etcdctl(&self, with_cert: bool) -> Command {
        let mut c = support::etcdctl_cmd(&self.endpoints.join(","), 5);
        c.arg("--cacert").arg(self.tls("ca.pem"));
        if with_cert {
            c.arg("--cert")
                .arg(self.tls("client.pem"))
                .arg("--key")
                .arg(self.tls("client-key.pem"));
        }
        c
    }

    fn logs(&self) -> String {
        (0..3)
            .map(|i| {
                let log = std::fs::read_to_string(self.dir.path().join(format!("n{i}.log")));
                format!("--- n{i}\n{}\n", log.unwrap_or_default())
            })
            .collect()
    }
}

fn run(c: &mut Command) -> Output {
    c.stdin(Stdio::null()).output().expect("run etcdctl")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// `raftkv cluster --tls` on a free block of ports, ready once etcdctl's put goes through.
fn start() -> TlsCluster {
    let base = support::port_block(PORTS.0, PORTS.1, 3);
    let dir = tempfile::tempdir().unwrap();
    let parent = Command::new(support::raftkv_bin())
        .args([
            "cluster",
            "--tls",
            "--dashboard-port",
            "0",
            "--base-port",
            &base.to_string(),
        ])
        .arg("--data-dir")
        .arg(dir.path())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start raftkv cluster --tls");
    let c = TlsCluster {
        parent,
        endpoints: (0..3)
            .map(|i| format!("https://127.0.0.1:{}", base + 10 * i))
            .collect(),
        dir,
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if c.tls("ca.pem").is_file() {
            let out = run(c.etcdctl(true).args(["put", "ready", "yes"]));
            if out.status.success() {
                return c;
            }
        }
        assert!(
            Instant::now() < deadline,
            "the TLS cluster did not become ready:\n{}",
            c.logs()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn etcdctl_with_client_certificates_puts_gets_and_reports_status() {
    let c = start();
    let put = run(c.etcdctl(true).args(["put", "greeting", "hello"]));
    assert!(put.status.success(), "put: {}", text(&put.stderr));
    assert_eq!(text(&put.stdout), "OK\n");
    let get = run(c.etcdctl(true).args(["get", "greeting"]));
    assert!(get.status.success(), "get: {}", text(&get.stderr));
    assert_eq!(text(&get.stdout), "greeting\nhello\n");
    let status = run(c.etcdctl(true).args(["endpoint", "status"]));
    assert!(status.status.success(), "status: {}", text(&status.stderr));
    let out = text(&status.stdout);
    for e in &c.endpoints {
        assert!(
            out.lines().any(|l| l.starts_with(&format!("{e}, "))),
            "{e} missing from:\n{out}"
        );
    }
    // One leader among the three.
    assert_eq!(
        out.lines().filter(|l| l.contains(", true, ")).count(),
        1,
        "{out}"
    );
}

/// Over https, etcdctl's `--cluster` (which dials every member's advertised client URL)
/// reaches each member: every member hashes alike, reports its status, and a snapshot
/// is saved over TLS.
#[test]
fn etcdctl_endpoint_commands_reach_every_member_with_cluster() {
    let c = start();
    for i in 0..20 {
        let put = run(c.etcdctl(true).args(["put", &format!("k{i}"), "v"]));
        assert!(put.status.success(), "put: {}", text(&put.stderr));
    }
    let hashes = run(c.etcdctl(true).args(["endpoint", "hashkv", "--cluster"]));
    assert!(hashes.status.success(), "hashkv: {}", text(&hashes.stderr));
    let out = text(&hashes.stdout);
    let values: Vec<&str> = out.lines().filter_map(|l| l.rsplit(", ").next()).collect();
    assert_eq!(values.len(), 3, "{out}");
    assert!(values.windows(2).all(|w| w[0] == w[1]), "{out}");
    let status = run(c.etcdctl(true).args(["endpoint", "status", "--cluster"]));
    assert!(status.status.success(), "status: {}", text(&status.stderr));
    assert_eq!(text(&status.stdout).lines().count(), 3);
    let alarms = run(c.etcdctl(true).args(["alarm", "list"]));
    assert!(alarms.status.success());
    assert_eq!(text(&alarms.stdout), "");
    let file = c.dir.path().join("backup.db");
    let save = run(support::etcdctl_cmd(&c.endpoints[0], 5)
        .arg("--cacert")
        .arg(c.tls("ca.pem"))
        .arg("--cert")
        .arg(c.tls("client.pem"))
        .arg("--key")
        .arg(c.tls("client-key.pem"))
        .args(["snapshot", "save"])
        .arg(&file));
    assert!(save.status.success(), "save: {}", text(&save.stderr));
    let check = run(Command::new(support::raftkv_bin())
        .args(["snapshot", "status"])
        .arg(&file));
    assert!(check.status.success(), "{}", text(&check.stderr));
    assert!(text(&check.stdout).contains(&format!("hashkv:           {}", values[0])));
}

#[test]
fn etcdctl_without_a_client_certificate_is_refused() {
    let c = start();
    let get = run(c.etcdctl(false).args(["get", "ready"]));
    assert!(
        !get.status.success(),
        "served without a client certificate: {}",
        text(&get.stdout)
    );
    assert!(!text(&get.stdout).contains("yes"));
    // The members said so.
    let deadline = Instant::now() + Duration::from_secs(5);
    while !c.logs().contains("presented no certificate") {
        assert!(
            Instant::now() < deadline,
            "no refusal logged:\n{}",
            c.logs()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_etcd_client_crate_works_over_tls() {
    let c = start();
    let read = |f: &str| std::fs::read(c.tls(f)).unwrap();
    let tls = TlsOptions::new()
        .ca_certificate(Certificate::from_pem(read("ca.pem")))
        .identity(Identity::from_pem(
            read("client.pem"),
            read("client-key.pem"),
        ));
    let mut client = Client::connect(&c.endpoints, Some(ConnectOptions::new().with_tls(tls)))
        .await
        .unwrap();
    client.put("crate", "over tls", None).await.unwrap();
    let got = client.get("crate", None).await.unwrap();
    assert_eq!(got.kvs()[0].value_str().unwrap(), "over tls");
    let members = client.member_list().await.unwrap();
    assert_eq!(members.members().len(), 3);
    assert!(members
        .members()
        .iter()
        .all(|m| m.client_urls().iter().all(|u| u.starts_with("https://"))));

    // Without a client certificate, the same crate is refused.
    let tls = TlsOptions::new().ca_certificate(Certificate::from_pem(read("ca.pem")));
    let opts = ConnectOptions::new()
        .with_tls(tls)
        .with_timeout(Duration::from_secs(3));
    let refused = match Client::connect(&c.endpoints, Some(opts)).await {
        Ok(mut client) => client.get("crate", None).await.is_err(),
        Err(_) => true,
    };
    assert!(refused, "served without a client certificate");
}
