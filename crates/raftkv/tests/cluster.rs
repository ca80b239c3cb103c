//! Three real `raftkv serve` processes on free loopback ports, driven through the etcd v3
//! gRPC API: writes through any member (followers forward), linearizable reads from every
//! member, Maintenance.Status and Cluster.MemberList, and a kill -9 of the leader in the
//! middle of a write load with no acknowledged write lost.

mod common;

use bytes::Bytes;
use common::*;
use server::pb::etcdserverpb::{
    cluster_client::ClusterClient, maintenance_client::MaintenanceClient, MemberListRequest,
    PutRequest, StatusRequest,
};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_real_three_process_cluster_serves_the_etcd_api_and_survives_kill_9() {
    let dir = tempfile::tempdir().unwrap();
    let mut procs = start(dir.path());
    // Every member accepts writes (followers forward to the leader).
    for (i, p) in procs.iter().enumerate() {
        let _ = p;
        put_any(&procs[i..=i], &format!("hello{i}"), "world").await;
    }
    for p in &procs {
        for i in 0..3 {
            assert_eq!(
                get(&p.client, &format!("hello{i}")).await.unwrap(),
                Some(Bytes::from("world")),
                "{}",
                p.name
            );
        }
    }
    // Status and member list, as etcdctl shows them.
    let mut m = MaintenanceClient::new(
        tonic::transport::Endpoint::from_shared(procs[0].client.clone())
            .unwrap()
            .connect_lazy(),
    );
    let status = m.status(StatusRequest {}).await.unwrap().into_inner();
    assert_ne!(status.leader, 0);
    // Three puts on a new store (at revision 1, as etcd's): revision 4.
    assert!(status.raft_index >= 3 && status.header.unwrap().revision == 4);
    let mut c = ClusterClient::new(
        tonic::transport::Endpoint::from_shared(procs[0].client.clone())
            .unwrap()
            .connect_lazy(),
    );
    // Every member's client URLs, as each announced them when it connected to the others
    // (streams open at start; allow them a moment).
    let mut expected: Vec<String> = procs.iter().map(|p| p.client.clone()).collect();
    expected.sort();
    let deadline = Instant::now() + Duration::from_secs(10);
    let members = loop {
        let members = c
            .member_list(MemberListRequest {
                linearizable: false,
            })
            .await
            .unwrap()
            .into_inner()
            .members;
        assert_eq!(members.len(), 3);
        let mut clients: Vec<String> = members
            .iter()
            .flat_map(|mm| mm.client_ur_ls.clone())
            .collect();
        clients.sort();
        if clients == expected {
            break members;
        }
        assert!(Instant::now() < deadline, "member list shows {clients:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    // A write load; the leader is killed -9 in the middle of it.
    let leader = members
        .iter()
        .position(|mm| mm.id == status.leader)
        .unwrap();
    let leader_name = members[leader].name.clone();
    let leader_proc = procs.iter().position(|p| p.name == leader_name).unwrap();
    let mut acked = Vec::new();
    for i in 0..60 {
        if i == 20 {
            procs[leader_proc].kill();
        }
        put_any(&procs, &format!("load{i}"), &i.to_string()).await;
        acked.push(i);
    }
    // The survivors have every acknowledged write; the killed member comes back and catches up.
    procs[leader_proc].spawn();
    let deadline = Instant::now() + Duration::from_secs(20);
    for p in &procs {
        for &i in &acked {
            loop {
                match get(&p.client, &format!("load{i}")).await {
                    Ok(Some(v)) => {
                        assert_eq!(v, Bytes::from(i.to_string()));
                        break;
                    }
                    Ok(None) => panic!("{} lost acknowledged write load{i}", p.name),
                    Err(_) if Instant::now() < deadline => {
                        tokio::time::sleep(Duration::from_millis(50)).await
                    }
                    Err(e) => panic!("{}: {e}", p.name),
                }
            }
        }
    }
}

#[test]
fn wrong_flags_are_explained() {
    // Ports of its own: the defaults (2379, 2380) may be held by a cluster on this machine.
    let (code, err) = run(&[
        "serve",
        "--name=a",
        "--initial-cluster=b=http://127.0.0.1:1",
        &format!("--listen-client-urls=http://127.0.0.1:{}", free_port()),
        &format!("--listen-peer-urls=http://127.0.0.1:{}", free_port()),
    ]);
    assert_ne!(code, 0);
    assert!(err.contains("no member named \"a\""), "{err}");
    let (code, err) = run(&["serve", "--listen-client-urls=127.0.0.1:5"]);
    assert_ne!(code, 0);
    assert!(err.contains("must start with http://"), "{err}");
    let (code, err) = run(&["serve", "--initial-cluster-state=maybe"]);
    assert_ne!(code, 0);
    assert!(err.contains("\"new\" or \"existing\""), "{err}");
    // A port someone else holds is reported before anything starts.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let (code, err) = run(&[
        "serve",
        &format!("--listen-client-urls=http://127.0.0.1:{port}"),
    ]);
    assert_ne!(code, 0);
    assert!(
        err.contains("cannot listen on") && err.contains("in use"),
        "{err}"
    );
    // A wrong name is reported as such even when the port is taken too.
    let (code, err) = run(&[
        "serve",
        "--name=a",
        "--initial-cluster=b=http://127.0.0.1:1",
        &format!("--listen-client-urls=http://127.0.0.1:{port}"),
    ]);
    assert_ne!(code, 0);
    assert!(err.contains("no member named \"a\""), "{err}");
    let (code, err) = run(&["serve", "--no-such-flag"]);
    assert_ne!(code, 0);
    assert!(err.contains("--no-such-flag"), "{err}");
}

#[test]
fn another_clusters_data_directory_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("d");
    let (cp, pp) = (free_port(), free_port());
    let args = |token: &str| {
        vec![
            "serve".to_string(),
            "--name=solo".into(),
            format!("--data-dir={}", data.display()),
            format!("--listen-client-urls=http://127.0.0.1:{cp}"),
            format!("--listen-peer-urls=http://127.0.0.1:{pp}"),
            format!("--initial-cluster=solo=http://127.0.0.1:{pp}"),
            format!("--initial-cluster-token={token}"),
        ]
    };
    // The first cluster creates the directory, then stops.
    let mut first = Command::new(env!("CARGO_BIN_EXE_raftkv"))
        .args(args("one"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !data.join("IDENTITY").exists() {
        assert!(
            Instant::now() < deadline,
            "the first member never created its data directory"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = first.kill();
    let _ = first.wait();
    let out = Command::new(env!("CARGO_BIN_EXE_raftkv"))
        .args(args("two"))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("another cluster"), "{err}");
}

/// `raftkv cluster`: starts members, serves the API, stops cleanly on SIGINT, and comes back
/// with its data.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cluster_command_runs_a_local_cluster_that_keeps_its_data() {
    let dir = tempfile::tempdir().unwrap();
    let base = free_base();
    let spawn = || {
        Command::new(env!("CARGO_BIN_EXE_raftkv"))
            .args([
                "cluster",
                "--dashboard-port",
                "0",
                "--base-port",
                &base.to_string(),
                "--data-dir",
            ])
            .arg(dir.path().join("data"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap()
    };
    let procs: Vec<Proc> = (0..3)
        .map(|i| Proc {
            name: format!("n{i}"),
            client: format!("http://127.0.0.1:{}", base + 10 * i),
            child: None,
            args: Vec::new(),
        })
        .collect();
    for round in 0..2 {
        let mut parent = spawn();
        if round == 0 {
            let deadline = Instant::now() + Duration::from_secs(20);
            'put: loop {
                for p in &procs {
                    let req = PutRequest {
                        key: Bytes::from("kept"),
                        value: Bytes::from("across restarts"),
                        ..Default::default()
                    };
                    if kv(&p.client).await.put(req).await.is_ok() {
                        break 'put;
                    }
                }
                assert!(
                    Instant::now() < deadline,
                    "the cluster never accepted a write"
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            match get(&procs[round].client, "kept").await {
                Ok(v) => {
                    assert_eq!(v, Some(Bytes::from("across restarts")));
                    break;
                }
                Err(_) => {
                    assert!(Instant::now() < deadline, "the cluster did not come up");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
        if round == 1 {
            // The command-line client against the running cluster.
            let endpoints = procs
                .iter()
                .map(|p| p.client.clone())
                .collect::<Vec<_>>()
                .join(",");
            let cli = |args: &[&str]| {
                let out = Command::new(env!("CARGO_BIN_EXE_raftkv"))
                    .args(args)
                    .arg(format!("--endpoints={endpoints}"))
                    .output()
                    .unwrap();
                assert!(
                    out.status.success(),
                    "{args:?}: {}",
                    String::from_utf8_lossy(&out.stderr)
                );
                String::from_utf8_lossy(&out.stdout).into_owned()
            };
            assert!(cli(&["put", "cli/a", "1"]).starts_with("OK"));
            assert!(cli(&["put", "cli/b", "2"]).starts_with("OK"));
            assert_eq!(cli(&["get", "cli/", "--prefix"]), "cli/a\n1\ncli/b\n2\n");
            assert_eq!(cli(&["del", "cli/", "--prefix"]).trim(), "2");
            assert_eq!(cli(&["get", "cli/a"]), "");
            let status = cli(&["status"]);
            assert_eq!(status.lines().count(), 4, "{status}");
            for op in ["put", "get"] {
                let out = cli(&[
                    "bench",
                    op,
                    "--clients=8",
                    "--conns=2",
                    "--total=200",
                    "--quiet",
                ]);
                assert!(
                    out.contains("RESULT ops_per_sec=") && out.contains("errors=0"),
                    "{out}"
                );
            }
            // The load generator's writes really happened (keys are zero-padded numbers).
            assert_eq!(
                cli(&["get", "00000199"]),
                format!("00000199\n{}\n", "v".repeat(256))
            );
        }
        // SAFETY: signalling our own child process.
        unsafe { libc::kill(parent.id() as libc::pid_t, libc::SIGINT) };
        let status = parent.wait().unwrap();
        assert!(
            status.success(),
            "the cluster did not stop cleanly: {status}"
        );
    }
}

/// A base port for `raftkv cluster` whose six ports (two per member) are free.
fn free_base() -> u16 {
    loop {
        let b = free_port();
        if b < 32_000
            && (0..3).all(|i| {
                (0..2).all(|p| std::net::TcpListener::bind(("127.0.0.1", b + 10 * i + p)).is_ok())
            })
        {
            return b;
        }
    }
}

/// `raftkv cluster` killed outright (kill -9, no chance to stop its members): the members,
/// whose switch pipe it held, stop on their own rather than keep the cluster's ports.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn members_stop_when_their_cluster_command_is_killed() {
    let dir = tempfile::tempdir().unwrap();
    let base = free_base();
    let mut parent = Command::new(env!("CARGO_BIN_EXE_raftkv"))
        .args(["cluster", "--dashboard-port", "0", "--base-port"])
        .arg(base.to_string())
        .arg("--data-dir")
        .arg(dir.path().join("data"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let clients: Vec<String> = (0..3)
        .map(|i| format!("http://127.0.0.1:{}", base + 10 * i))
        .collect();
    let deadline = Instant::now() + Duration::from_secs(20);
    for c in &clients {
        while get(c, "up?").await.is_err() {
            assert!(Instant::now() < deadline, "{c} never answered");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    parent.kill().unwrap();
    parent.wait().unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    for i in 0..3 {
        let port = base + 10 * i;
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            assert!(
                Instant::now() < deadline,
                "member n{i} still serves on {port} 10s after its supervisor was killed"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}
