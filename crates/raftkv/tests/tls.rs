//! TLS on real processes: three members with https client and peer URLs, both
//! `--client-cert-auth` and `--peer-client-cert-auth`, certificates made by the test (a CA of
//! its own, and another CA for the impostors).

mod common;

use bytes::Bytes;
use common::free_port;
use server::network::tls::{DevPki, Dialer, Files};
use server::pb::etcdserverpb::{
    cluster_client::ClusterClient, kv_client::KvClient, lease_client::LeaseClient,
    maintenance_client::MaintenanceClient, LeaseGrantRequest, LeaseKeepAliveRequest,
    MemberAddRequest, MemberListRequest, MemberRemoveRequest, PutRequest, RangeRequest,
    StatusRequest,
};
use server::pb::raftkvpb::{raft_client::RaftClient, Empty};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use tonic::transport::{Channel, Endpoint};

const WAIT: Duration = Duration::from_secs(30);

struct Member {
    client: String,
    peer: String,
    log: PathBuf,
    child: Child,
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

struct Cluster {
    members: Vec<Member>,
    pki: DevPki,
    dir: tempfile::TempDir,
}

fn names() -> Vec<String> {
    (0..3).map(|i| format!("n{i}")).collect()
}

/// The flags for member `name` to serve and dial with `pki`'s certificates, trusting
/// `trusted`'s CA.
fn tls_flags(pki: &DevPki, trusted: &DevPki, name: &str) -> Vec<String> {
    let p = |p: PathBuf| p.display().to_string();
    vec![
        format!("--cert-file={}", p(pki.server_cert(name))),
        format!("--key-file={}", p(pki.server_key(name))),
        format!("--trusted-ca-file={}", p(trusted.ca())),
        "--client-cert-auth".into(),
        format!("--peer-cert-file={}", p(pki.peer_cert(name))),
        format!("--peer-key-file={}", p(pki.peer_key(name))),
        format!("--peer-trusted-ca-file={}", p(trusted.ca())),
        "--peer-client-cert-auth".into(),
    ]
}

fn spawn(args: &[String], log: &Path) -> Child {
    Command::new(env!("CARGO_BIN_EXE_raftkv"))
        .args(args)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(log).unwrap())
        .spawn()
        .expect("start raftkv")
}

fn start() -> Cluster {
    let dir = tempfile::tempdir().unwrap();
    let pki = DevPki::ensure(&dir.path().join("pki"), &names()).unwrap();
    let ports: Vec<(u16, u16)> = (0..3).map(|_| (free_port(), free_port())).collect();
    let peer = |i: usize| format!("https://127.0.0.1:{}", ports[i].1);
    let cluster = (0..3)
        .map(|i| format!("n{i}={}", peer(i)))
        .collect::<Vec<_>>()
        .join(",");
    let members = (0..3)
        .map(|i| {
            let name = format!("n{i}");
            let client = format!("https://127.0.0.1:{}", ports[i].0);
            let mut args = vec![
                "serve".to_string(),
                format!("--name={name}"),
                format!("--data-dir={}", dir.path().join(&name).display()),
                format!("--listen-client-urls={client}"),
                format!("--advertise-client-urls={client}"),
                format!("--listen-peer-urls={}", peer(i)),
                format!("--initial-advertise-peer-urls={}", peer(i)),
                format!("--initial-cluster={cluster}"),
                "--initial-cluster-token=tls-test".into(),
                "--heartbeat-interval=50".into(),
                "--election-timeout=500".into(),
            ];
            args.extend(tls_flags(&pki, &pki, &name));
            let log = dir.path().join(format!("{name}.log"));
            Member {
                child: spawn(&args, &log),
                client,
                peer: peer(i),
                log,
            }
        })
        .collect();
    Cluster { members, pki, dir }
}

impl Cluster {
    fn logs(&self) -> String {
        let mut out = String::new();
        for (i, m) in self.members.iter().enumerate() {
            out.push_str(&format!("--- n{i}\n{}\n", m.log()));
        }
        out
    }

    /// A client with `pki`'s client certificate (or none), trusting this cluster's CA.
    fn dialer(&self, cert_from: Option<&DevPki>) -> Dialer {
        Dialer::from_files(&Files {
            cert: cert_from.map(|p| p.client_cert()),
            key: cert_from.map(|p| p.client_key()),
            trusted_ca: Some(self.pki.ca()),
            cert_auth: false,
        })
        .unwrap()
    }

    fn channel(&self, i: usize) -> Channel {
        channel(&self.dialer(Some(&self.pki)), &self.members[i].client)
    }

    /// The leader's index, once every member names the same one.
    async fn leader(&self) -> usize {
        let deadline = Instant::now() + WAIT;
        loop {
            let mut seen = Vec::new();
            for i in 0..self.members.len() {
                let s = MaintenanceClient::new(self.channel(i))
                    .status(StatusRequest {})
                    .await;
                if let Ok(s) = s {
                    let s = s.into_inner();
                    seen.push((s.header.map_or(0, |h| h.member_id), s.leader));
                }
            }
            if seen.len() == self.members.len() && seen[0].1 != 0 {
                let leader = seen[0].1;
                if seen.iter().all(|(_, l)| *l == leader) {
                    if let Some(i) = seen.iter().position(|(id, _)| *id == leader) {
                        return i;
                    }
                }
            }
            assert!(
                Instant::now() < deadline,
                "no leader over TLS:\n{}",
                self.logs()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

fn channel(dialer: &Dialer, url: &str) -> Channel {
    let endpoint = Endpoint::from_shared(url.to_string())
        .unwrap()
        .connect_timeout(Duration::from_secs(2))
        .timeout(Duration::from_secs(5));
    dialer.connect_lazy(endpoint)
}

fn put_req(key: &str, value: &str) -> PutRequest {
    PutRequest {
        key: Bytes::copy_from_slice(key.as_bytes()),
        value: Bytes::copy_from_slice(value.as_bytes()),
        ..Default::default()
    }
}

fn get_req(key: &str) -> RangeRequest {
    RangeRequest {
        key: Bytes::copy_from_slice(key.as_bytes()),
        ..Default::default()
    }
}

/// Retry `f` until it succeeds (a member may still be learning the leader's client URL).
async fn eventually<T, F, Fut>(what: &str, c: &Cluster, f: F) -> T
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = Result<T, tonic::Status>>,
{
    let deadline = Instant::now() + WAIT;
    loop {
        match f().await {
            Ok(v) => return v,
            Err(e) if Instant::now() < deadline => {
                let _ = e;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => panic!("{what}: {e:?}\n{}", c.logs()),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_cluster_elects_a_leader_and_serves_writes_and_linearizable_reads() {
    let c = start();
    let leader = c.leader().await;
    let (writer, reader) = ((leader + 1) % 3, (leader + 2) % 3);
    eventually("put on a follower", &c, || async {
        KvClient::new(c.channel(writer))
            .put(put_req("greeting", "hello over tls"))
            .await
    })
    .await;
    // Linearizable (the default): confirmed with the leader over the peer TLS streams.
    let got = KvClient::new(c.channel(reader))
        .range(get_req("greeting"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(&got.kvs[0].value[..], b"hello over tls");

    // The client commands, with etcdctl's flags: a bare host:port is dialed with TLS.
    let hostport = c.members[reader].client.trim_start_matches("https://");
    let out = Command::new(env!("CARGO_BIN_EXE_raftkv"))
        .args(["get", "greeting", &format!("--endpoints={hostport}")])
        .arg("--cacert")
        .arg(c.pki.ca())
        .arg("--cert")
        .arg(c.pki.client_cert())
        .arg("--key")
        .arg(c.pki.client_key())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "raftkv get: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "greeting\nhello over tls\n"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_refuses_plaintext_clients_and_clients_without_a_trusted_certificate() {
    let c = start();
    c.leader().await;
    let other = DevPki::ensure(&c.dir.path().join("other-ca"), &names()).unwrap();
    // Each refusal on a member of its own: a member logs refusals from one address at
    // most once per 10 s.
    let plain = KvClient::new(
        Endpoint::from_shared(c.members[0].client.replace("https://", "http://"))
            .unwrap()
            .timeout(Duration::from_secs(5))
            .connect_lazy(),
    )
    .range(get_req("k"))
    .await;
    assert!(plain.is_err(), "a plaintext client was served: {plain:?}");
    let no_cert = KvClient::new(channel(&c.dialer(None), &c.members[1].client))
        .range(get_req("k"))
        .await;
    assert!(
        no_cert.is_err(),
        "a client without a certificate was served"
    );
    let foreign = KvClient::new(channel(&c.dialer(Some(&other)), &c.members[2].client))
        .range(get_req("k"))
        .await;
    assert!(
        foreign.is_err(),
        "a client with another CA's certificate was served"
    );
    // The same member serves a client with a good certificate.
    KvClient::new(c.channel(1))
        .range(get_req("k"))
        .await
        .unwrap();
    let logged = |i: usize, what: &str| {
        let deadline = Instant::now() + Duration::from_secs(5);
        while !c.members[i].log().contains(what) {
            assert!(
                Instant::now() < deadline,
                "n{i} did not log {what:?}:\n{}",
                c.logs()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    };
    logged(0, "refused a client connection from 127.0.0.1:");
    logged(0, "does not speak TLS");
    logged(1, "presented no certificate");
    logged(2, "UnknownIssuer");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_with_another_cas_certificate_is_refused_and_cannot_join() {
    let c = start();
    c.leader().await;
    let evil = DevPki::ensure(&c.dir.path().join("evil-ca"), &["evil".to_string()]).unwrap();
    let evil_peer = Dialer::from_files(&Files {
        cert: Some(evil.peer_cert("evil")),
        key: Some(evil.peer_key("evil")),
        trusted_ca: Some(c.pki.ca()),
        cert_auth: false,
    })
    .unwrap();
    // Asked directly, a member's peer service does not answer it…
    let asked = RaftClient::new(channel(&evil_peer, &c.members[0].peer))
        .members(Empty {})
        .await;
    assert!(asked.is_err(), "a foreign peer was answered: {asked:?}");

    // …and a process started with that certificate cannot join, even with its URL added
    // as a member: every member refuses its connections.
    let port = free_port();
    let url = format!("https://127.0.0.1:{port}");
    let added = eventually("member add", &c, || async {
        ClusterClient::new(c.channel(0))
            .member_add(MemberAddRequest {
                peer_ur_ls: vec![url.clone()],
                is_learner: true,
            })
            .await
    })
    .await
    .into_inner();
    let cluster = c
        .members
        .iter()
        .enumerate()
        .map(|(i, m)| format!("n{i}={}", m.peer))
        .chain([format!("evil={url}")])
        .collect::<Vec<_>>()
        .join(",");
    let client_port = free_port();
    let mut args = vec![
        "serve".to_string(),
        "--name=evil".into(),
        format!("--data-dir={}", c.dir.path().join("evil").display()),
        format!("--listen-client-urls=https://127.0.0.1:{client_port}"),
        format!("--advertise-client-urls=https://127.0.0.1:{client_port}"),
        format!("--listen-peer-urls={url}"),
        format!("--initial-advertise-peer-urls={url}"),
        format!("--initial-cluster={cluster}"),
        "--initial-cluster-state=existing".into(),
        "--initial-cluster-token=tls-test".into(),
    ];
    // It trusts the cluster's CA (so it goes on to present its own certificate).
    args.extend(tls_flags(&evil, &c.pki, "evil"));
    let log = c.dir.path().join("evil.log");
    let mut impostor = spawn(&args, &log);
    let deadline = Instant::now() + WAIT;
    let status = loop {
        if let Some(s) = impostor.try_wait().unwrap() {
            break s;
        }
        assert!(
            Instant::now() < deadline,
            "the impostor is still running:\n{}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let said = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(!status.success(), "the impostor joined: {said}");
    assert!(said.contains("could not reach any member"), "{said}");

    // Each member said whom it refused and why, once (the impostor retried for seconds).
    for (i, m) in c.members.iter().enumerate() {
        let log = m.log();
        let refusals: Vec<&str> = log
            .lines()
            .filter(|l| l.contains("refused a peer connection from 127.0.0.1:"))
            .collect();
        assert!(
            refusals.iter().any(|l| l.contains("UnknownIssuer")),
            "n{i} did not log the refusal:\n{log}"
        );
        assert!(
            refusals.len() <= 2,
            "n{i} logged every refusal:\n{}",
            refusals.join("\n")
        );
    }
    // The cluster is as it was: it still writes, and the added member never started.
    eventually("put", &c, || async {
        KvClient::new(c.channel(1)).put(put_req("after", "1")).await
    })
    .await;
    let id = added.member.unwrap().id;
    let list = ClusterClient::new(c.channel(2))
        .member_list(MemberListRequest { linearizable: true })
        .await
        .unwrap()
        .into_inner();
    let m = list.members.iter().find(|m| m.id == id).unwrap();
    assert!(m.name.is_empty(), "the impostor published itself: {m:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_follower_forwards_membership_and_keep_alives_to_the_leader_over_tls() {
    let c = start();
    let leader = c.leader().await;
    let follower = (leader + 1) % 3;
    // MemberAdd and MemberRemove asked of a follower go to the leader's client URL,
    // dialed with the follower's own client certificate.
    let url = format!("https://127.0.0.1:{}", free_port());
    let added = eventually("member add via a follower", &c, || async {
        ClusterClient::new(c.channel(follower))
            .member_add(MemberAddRequest {
                peer_ur_ls: vec![url.clone()],
                is_learner: true,
            })
            .await
    })
    .await
    .into_inner();
    let id = added.member.as_ref().unwrap().id;
    assert!(added.members.iter().any(|m| m.id == id));
    let list = ClusterClient::new(c.channel(follower))
        .member_list(MemberListRequest { linearizable: true })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(list.members.len(), 4, "{list:?}");
    ClusterClient::new(c.channel(follower))
        .member_remove(MemberRemoveRequest { id })
        .await
        .unwrap();

    // A keep-alive sent to a follower is renewed by the leader (LeaseForward).
    let lease = eventually("lease grant", &c, || async {
        LeaseClient::new(c.channel(follower))
            .lease_grant(LeaseGrantRequest { ttl: 30, id: 0 })
            .await
    })
    .await
    .into_inner();
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    tx.send(LeaseKeepAliveRequest { id: lease.id })
        .await
        .unwrap();
    let mut replies = LeaseClient::new(c.channel(follower))
        .lease_keep_alive(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    let reply = tokio::time::timeout(Duration::from_secs(10), replies.message())
        .await
        .expect("a keep-alive answer")
        .unwrap()
        .unwrap();
    assert_eq!(reply.id, lease.id);
    assert!(reply.ttl > 0, "the keep-alive was not renewed: {reply:?}");
}
