//! TLS with clients we did not write: `raftkv cluster --tls` (https client and peer URLs,
//! client certificates required on both, a throwaway CA under the data directory) driven by
//! Debian's etcdctl with `--cacert`/`--cert`/`--key` and by the etcd-client crate with its
//! `tls` feature. A client without a certificate is refused.
//!
//! Needs `etcdctl` (Debian package etcd-client); `RAFTKV_BIN` names the raftkv binary.

mod support;

use etcd_client::{Certificate, Client, ConnectOptions, Identity, TlsOptions};
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;
use support::{etcdctl_cmd, ports, run_to_end, wait_until, LocalCluster, Output};

/// `raftkv cluster --tls`: its throwaway CA and certificates are under `tls/` in the data
/// directory.
struct TlsCluster(LocalCluster);

impl TlsCluster {
    fn tls(&self, file: &str) -> PathBuf {
        self.0.dir.path().join("tls").join(file)
    }

    /// etcdctl against every member, trusting the cluster's CA, with the client
    /// certificate or without.
    fn etcdctl(&self, with_cert: bool) -> Command {
        self.etcdctl_to(&self.0.endpoints.join(","), with_cert)
    }

    /// `etcdctl`, against `endpoints` only.
    fn etcdctl_to(&self, endpoints: &str, with_cert: bool) -> Command {
        let mut c = etcdctl_cmd(endpoints, 5);
        c.arg("--cacert").arg(self.tls("ca.pem"));
        if with_cert {
            c.arg("--cert")
                .arg(self.tls("client.pem"))
                .arg("--key")
                .arg(self.tls("client-key.pem"));
        }
        c
    }
}

fn run(c: &mut Command) -> Output {
    run_to_end(c, "")
}

/// `raftkv cluster --tls` on a free block of ports, ready once etcdctl's put goes through.
fn start() -> TlsCluster {
    let c = TlsCluster(LocalCluster::start(ports::TLS, &["--tls"]));
    let ready = wait_until(Duration::from_secs(30), Duration::from_millis(200), || {
        c.tls("ca.pem").is_file() && run(c.etcdctl(true).args(["put", "ready", "yes"])).ok()
    });
    assert!(
        ready,
        "the TLS cluster did not become ready:\n{}",
        c.0.logs()
    );
    c
}

#[test]
fn etcdctl_with_client_certificates_puts_gets_and_reports_status() {
    let c = start();
    let put = run(c.etcdctl(true).args(["put", "greeting", "hello"]));
    assert!(put.ok(), "put: {}", put.stderr);
    assert_eq!(put.stdout, "OK\n");
    let get = run(c.etcdctl(true).args(["get", "greeting"]));
    assert!(get.ok(), "get: {}", get.stderr);
    assert_eq!(get.stdout, "greeting\nhello\n");
    let status = run(c.etcdctl(true).args(["endpoint", "status"]));
    assert!(status.ok(), "status: {}", status.stderr);
    let out = status.stdout;
    for e in &c.0.endpoints {
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
        assert!(put.ok(), "put: {}", put.stderr);
    }
    let hashes = run(c.etcdctl(true).args(["endpoint", "hashkv", "--cluster"]));
    assert!(hashes.ok(), "hashkv: {}", hashes.stderr);
    let out = hashes.stdout;
    let values = support::last_fields(&out);
    assert_eq!(values.len(), 3, "{out}");
    assert!(values.windows(2).all(|w| w[0] == w[1]), "{out}");
    let status = run(c.etcdctl(true).args(["endpoint", "status", "--cluster"]));
    assert!(status.ok(), "status: {}", status.stderr);
    assert_eq!(status.stdout.lines().count(), 3);
    let alarms = run(c.etcdctl(true).args(["alarm", "list"]));
    assert!(alarms.ok());
    assert_eq!(alarms.stdout, "");
    let file = c.0.dir.path().join("backup.db");
    let save = run(c
        .etcdctl_to(&c.0.endpoints[0], true)
        .args(["snapshot", "save"])
        .arg(&file));
    assert!(save.ok(), "save: {}", save.stderr);
    let check = run(Command::new(support::raftkv_bin())
        .args(["snapshot", "status"])
        .arg(&file));
    assert!(check.ok(), "{}", check.stderr);
    assert!(check
        .stdout
        .contains(&format!("hashkv:           {}", values[0])));
}

#[test]
fn etcdctl_without_a_client_certificate_is_refused() {
    let c = start();
    let get = run(c.etcdctl(false).args(["get", "ready"]));
    assert!(
        !get.ok(),
        "served without a client certificate: {}",
        get.stdout
    );
    assert!(!get.stdout.contains("yes"));
    // The members said so.
    let logged = wait_until(Duration::from_secs(5), Duration::from_millis(100), || {
        c.0.logs().contains("presented no certificate")
    });
    assert!(logged, "no refusal logged:\n{}", c.0.logs());
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
    let mut client = Client::connect(&c.0.endpoints, Some(ConnectOptions::new().with_tls(tls)))
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
    let refused = match Client::connect(&c.0.endpoints, Some(opts)).await {
        Ok(mut client) => client.get("crate", None).await.is_err(),
        Err(_) => true,
    };
    assert!(refused, "served without a client certificate");
}
