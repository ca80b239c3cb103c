//! Running raftkv in production, on real processes: metrics and health that follow the
//! cluster, the NOSPACE alarm and etcd's recovery procedure, backups restored into a new
//! cluster that serves the same data (checked by HashKV), and the background consistency
//! check catching a member whose store diverged.

mod common;

use bytes::Bytes;
use common::*;
use server::pb::etcdserverpb::{
    alarm_request::AlarmAction, kv_client::KvClient, lease_client::LeaseClient,
    maintenance_client::MaintenanceClient, request_op, AlarmMember, AlarmRequest,
    CompactionRequest, DefragmentRequest, DeleteRangeRequest, HashKvRequest, LeaseGrantRequest,
    MoveLeaderRequest, PutRequest, RangeRequest, RequestOp, StatusRequest, TxnRequest,
};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use tonic::transport::Channel;

const NOSPACE: i32 = 1;
const CORRUPT: i32 = 2;

fn maintenance(url: &str) -> MaintenanceClient<Channel> {
    MaintenanceClient::new(channel(url))
}

async fn eventually(what: &str, secs: u64, mut ok: impl AsyncFnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !ok().await {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn member_id(url: &str) -> u64 {
    let s = maintenance(url).status(StatusRequest {}).await.unwrap();
    s.into_inner().header.unwrap().member_id
}

async fn leader_index(procs: &[Proc]) -> usize {
    let mut found = None;
    eventually("a leader is known", 20, async || {
        for (i, p) in procs.iter().enumerate().filter(|(_, p)| p.child.is_some()) {
            if let Ok(s) = maintenance(&p.client).status(StatusRequest {}).await {
                let s = s.into_inner();
                if s.leader != 0 && s.leader == s.header.unwrap().member_id {
                    found = Some(i);
                    return true;
                }
            }
        }
        false
    })
    .await;
    found.unwrap()
}

async fn alarms(url: &str) -> Result<Vec<AlarmMember>, tonic::Status> {
    let get = AlarmRequest {
        action: AlarmAction::Get as i32,
        ..Default::default()
    };
    Ok(maintenance(url).alarm(get).await?.into_inner().alarms)
}

fn put(key: &str, value: Vec<u8>) -> PutRequest {
    PutRequest {
        key: Bytes::copy_from_slice(key.as_bytes()),
        value: value.into(),
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_health_and_version_follow_the_cluster() {
    let dir = tempfile::tempdir().unwrap();
    let mut procs = start(dir.path());
    put_any(&procs, "warm", "up").await;
    for p in &procs {
        eventually("every member knows the leader", 10, async || {
            scrape(&p.client, "etcd_server_has_leader") == 1.0
        })
        .await;
        let (code, body) = http_get(&p.client, "/health");
        assert_eq!((code, body.as_str()), (200, r#"{"health":"true"}"#));
        let (code, body) = http_get(&p.client, "/version");
        assert_eq!(code, 200);
        assert!(body.contains(r#""etcdserver":"3.4.31""#), "{body}");
        assert!(body.contains(r#""etcdcluster":"3.4.0""#), "{body}");
    }
    let leaders: f64 = procs
        .iter()
        .map(|p| scrape(&p.client, "etcd_server_is_leader"))
        .sum();
    assert_eq!(leaders, 1.0, "exactly one member reports it leads");

    // Ten puts through the first member: committed and applied proposals move by at least
    // ten on every member, and the gRPC counter names the method and the code.
    let before: Vec<f64> = procs
        .iter()
        .map(|p| scrape(&p.client, "etcd_server_proposals_committed_total"))
        .collect();
    let mut kv = KvClient::new(channel(&procs[0].client));
    for i in 0..10 {
        kv.put(put(&format!("k{i}"), b"v".to_vec())).await.unwrap();
    }
    for (p, b) in procs.iter().zip(&before) {
        eventually(
            "the puts are committed and applied everywhere",
            10,
            async || {
                scrape(&p.client, "etcd_server_proposals_committed_total") >= b + 10.0
                    && scrape(&p.client, "etcd_server_proposals_applied_total") >= b + 10.0
            },
        )
        .await;
        assert!(scrape(&p.client, "etcd_disk_wal_fsync_duration_seconds_count") > 0.0);
    }
    let (_, text) = http_get(&procs[0].client, "/metrics");
    let put_ok = text.lines().find(|l| {
        l.starts_with("grpc_server_handled_total{")
            && l.contains(r#"grpc_method="Put""#)
            && l.contains(r#"grpc_code="OK""#)
            && l.contains(r#"grpc_service="etcdserverpb.KV""#)
    });
    let count: f64 = put_ok
        .and_then(|l| l.rsplit_once(' '))
        .map_or(0.0, |(_, v)| v.parse().unwrap());
    assert!(count >= 10.0, "Put/OK counted {count} times:\n{text}");
    // A refused request is counted under its code.
    let compacted = kv
        .range(RangeRequest {
            key: Bytes::from_static(b"k0"),
            revision: 1_000_000,
            ..Default::default()
        })
        .await;
    assert!(compacted.is_err());
    let (_, text) = http_get(&procs[0].client, "/metrics");
    assert!(
        text.lines().any(
            |l| l.contains(r#"grpc_method="Range""#) && l.contains(r#"grpc_code="OutOfRange""#)
        ),
        "a future-revision read is counted as OutOfRange:\n{text}"
    );

    // The leader times its heartbeats to each follower.
    let l = leader_index(&procs).await;
    eventually("the leader has peer round trips", 10, async || {
        scrape(
            &procs[l].client,
            "etcd_network_peer_round_trip_time_seconds_count",
        ) > 0.0
    })
    .await;

    // Killing the leader: the others see a leader change.
    let seen: Vec<(usize, f64)> = (0..3)
        .filter(|&i| i != l)
        .map(|i| {
            (
                i,
                scrape(&procs[i].client, "etcd_server_leader_changes_seen_total"),
            )
        })
        .collect();
    procs[l].kill();
    for &(i, before) in &seen {
        eventually("the survivors count a leader change", 20, async || {
            scrape(&procs[i].client, "etcd_server_leader_changes_seen_total") > before
                && scrape(&procs[i].client, "etcd_server_has_leader") == 1.0
        })
        .await;
    }
    // One member left of three: no leader, and /health says so.
    let (gone, last) = (seen[0].0, seen[1].0);
    procs[gone].kill();
    eventually("the lone member reports no leader", 20, async || {
        scrape(&procs[last].client, "etcd_server_has_leader") == 0.0
            && http_get(&procs[last].client, "/health")
                == (503, "{\"health\":\"false\"}\n".to_string())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nospace_refuses_writes_until_compacted_defragmented_and_disarmed() {
    let dir = tempfile::tempdir().unwrap();
    let procs = start_flags(dir.path(), &["--quota-backend-bytes=200000"]);
    put_any(&procs, "warm", "up").await;
    let url = procs[0].client.clone();
    let mut kv = KvClient::new(channel(&url));
    // Puts of 20 kB pass the 200 kB quota within a dozen; the one that would is refused
    // with etcd's words and code.
    let mut refused = None;
    for i in 0..30 {
        match kv.put(put(&format!("big{i}"), vec![b'x'; 20_000])).await {
            Ok(_) => {}
            Err(e) => {
                refused = Some(e);
                break;
            }
        }
    }
    let e = refused.expect("the quota refused a put");
    assert_eq!(e.code(), tonic::Code::ResourceExhausted);
    assert_eq!(e.message(), "etcdserver: mvcc: database space exceeded");
    // The alarm is replicated: every member lists it, and refuses writes that add data.
    let me = member_id(&url).await;
    for p in &procs {
        eventually("every member lists NOSPACE", 10, async || {
            alarms(&p.client)
                .await
                .is_ok_and(|a| a.iter().any(|a| a.alarm == NOSPACE && a.member_id == me))
        })
        .await;
        let mut other = KvClient::new(channel(&p.client));
        let e = other.put(put("small", b"v".to_vec())).await.unwrap_err();
        assert_eq!(e.message(), "etcdserver: mvcc: database space exceeded");
        let txn = TxnRequest {
            success: vec![RequestOp {
                request: Some(request_op::Request::RequestPut(put("t", b"v".to_vec()))),
            }],
            ..Default::default()
        };
        let e = other.txn(txn).await.unwrap_err();
        assert_eq!(e.message(), "etcdserver: mvcc: database space exceeded");
        let grant = LeaseClient::new(channel(&p.client))
            .lease_grant(LeaseGrantRequest { ttl: 60, id: 0 })
            .await
            .unwrap_err();
        assert_eq!(grant.code(), tonic::Code::ResourceExhausted);
        let s = maintenance(&p.client)
            .status(StatusRequest {})
            .await
            .unwrap()
            .into_inner();
        assert_eq!(s.errors, vec![format!("memberID:{me} alarm:NOSPACE ")]);
        let (code, body) = http_get(&p.client, "/health");
        assert_eq!((code, body.as_str()), (503, "{\"health\":\"false\"}\n"));
        // Reads still work.
        assert!(get(&p.client, "big0").await.unwrap().is_some());
    }
    // etcd's procedure: delete (or compact away) what is not needed, compact, defragment,
    // disarm. Deleting frees nothing until the compaction.
    let del = kv
        .delete_range(DeleteRangeRequest {
            key: Bytes::from_static(b"big"),
            range_end: kv::prefix_end(b"big"),
            ..Default::default()
        })
        .await
        .expect("deletes work under NOSPACE")
        .into_inner();
    let rev = del.header.unwrap().revision;
    kv.compact(CompactionRequest {
        revision: rev,
        physical: true,
    })
    .await
    .expect("compaction works under NOSPACE");
    for p in &procs {
        maintenance(&p.client)
            .defragment(DefragmentRequest {})
            .await
            .expect("defragment");
    }
    // Still refused until the operator disarms.
    let e = kv.put(put("small", b"v".to_vec())).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::ResourceExhausted);
    for a in alarms(&url).await.unwrap() {
        let disarm = AlarmRequest {
            action: AlarmAction::Deactivate as i32,
            member_id: a.member_id,
            alarm: a.alarm,
        };
        let r = maintenance(&url).alarm(disarm).await.unwrap().into_inner();
        assert_eq!(r.alarms, vec![a]);
    }
    assert!(alarms(&url).await.unwrap().is_empty());
    kv.put(put("small", b"v".to_vec()))
        .await
        .expect("writes work again once disarmed");
    for p in &procs {
        eventually("every member is healthy again", 10, async || {
            http_get(&p.client, "/health").0 == 200
        })
        .await;
    }
}

/// The arguments of a member of a three-member cluster on the given ports.
fn member_args(dir: &Path, i: usize, ports: &[(u16, u16)], token: &str) -> Vec<String> {
    let cluster = (0..ports.len())
        .map(|j| format!("m{j}=http://127.0.0.1:{}", ports[j].1))
        .collect::<Vec<_>>()
        .join(",");
    let (c, p) = ports[i];
    vec![
        "serve".into(),
        format!("--name=m{i}"),
        format!("--data-dir={}", dir.join(format!("m{i}")).display()),
        format!("--listen-client-urls=http://127.0.0.1:{c}"),
        format!("--advertise-client-urls=http://127.0.0.1:{c}"),
        format!("--listen-peer-urls=http://127.0.0.1:{p}"),
        format!("--initial-advertise-peer-urls=http://127.0.0.1:{p}"),
        format!("--initial-cluster={cluster}"),
        format!("--initial-cluster-token={token}"),
        "--heartbeat-interval=20".into(),
        "--election-timeout=200".into(),
    ]
}

/// A member process with its stderr in a file and extra environment.
struct Member {
    child: Child,
    client: String,
    log: std::path::PathBuf,
}

impl Drop for Member {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn spawn_member(args: &[String], log: &Path, env: &[(&str, &str)]) -> Member {
    let file = std::fs::File::create(log).unwrap();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_raftkv"));
    cmd.args(args).stdout(Stdio::null()).stderr(file);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let client = args
        .iter()
        .find_map(|a| a.strip_prefix("--listen-client-urls="))
        .unwrap()
        .to_string();
    Member {
        child: cmd.spawn().expect("start raftkv"),
        client,
        log: log.to_path_buf(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backup_restores_into_a_new_cluster_that_serves_the_same_data() {
    let dir = tempfile::tempdir().unwrap();
    let procs = start(dir.path());
    for i in 0..60 {
        put_any(&procs, &format!("key{:02}", i % 40), &format!("value{i}")).await;
    }
    let url = procs[1].client.clone();
    let mut kv = KvClient::new(channel(&url));
    kv.delete_range(DeleteRangeRequest {
        key: Bytes::from_static(b"key3"),
        range_end: kv::prefix_end(b"key3"),
        ..Default::default()
    })
    .await
    .unwrap();
    let file = dir.path().join("backup.db");
    let file_s = file.display().to_string();
    let (code, err) = run(&["snapshot", "save", &file_s, "--endpoints", &url]);
    assert_eq!(code, 0, "{err}");
    // The backup's revision and hash: what every original member hashes at that revision.
    let out = Command::new(env!("CARGO_BIN_EXE_raftkv"))
        .args(["snapshot", "status", &file_s])
        .output()
        .unwrap();
    let status = String::from_utf8_lossy(&out.stdout).to_string();
    let field = |name: &str| -> i64 {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .unwrap_or_else(|| panic!("{name} in {status}"))
            .trim()
            .parse()
            .unwrap()
    };
    let (revision, hash) = (field("revision:"), field("hashkv:") as u32);
    for p in &procs {
        let h = maintenance(&p.client)
            .hash_kv(HashKvRequest { revision })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(
            h.hash, hash,
            "{} hashes the backup's revision alike",
            p.name
        );
    }
    let expected = kv
        .range(RangeRequest {
            key: Bytes::from_static(b"\0"),
            range_end: Bytes::from_static(b"\0"),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .kvs;
    drop(procs);

    // A damaged file is refused, and so is a data directory in use.
    let mut damaged = std::fs::read(&file).unwrap();
    damaged[40] ^= 0xff;
    let damaged_path = dir.path().join("damaged.db");
    std::fs::write(&damaged_path, &damaged).unwrap();
    let (code, err) = run(&[
        "snapshot",
        "restore",
        &damaged_path.display().to_string(),
        "--data-dir",
        &dir.path().join("x").display().to_string(),
    ]);
    assert_ne!(code, 0);
    assert!(err.contains("SHA-256 does not match"), "{err}");
    let (code, err) = run(&[
        "snapshot",
        "restore",
        &file_s,
        "--data-dir",
        &dir.path().join("n0").display().to_string(),
        "--name",
        "n0",
        "--initial-cluster",
        "n0=http://127.0.0.1:1",
    ]);
    assert_ne!(code, 0);
    assert!(err.contains("not empty"), "{err}");

    // Restore once per member of a new cluster, then start it.
    let new = dir.path().join("restored");
    let ports: Vec<(u16, u16)> = (0..3).map(|_| (free_port(), free_port())).collect();
    let mut members = Vec::new();
    for i in 0..3 {
        let args = member_args(&new, i, &ports, "restored");
        let flag = |name: &str| {
            args.iter()
                .find_map(|a| a.strip_prefix(&format!("--{name}=")))
                .unwrap()
                .to_string()
        };
        let (code, err) = run(&[
            "snapshot",
            "restore",
            &file_s,
            "--name",
            &flag("name"),
            "--initial-cluster",
            &flag("initial-cluster"),
            "--initial-cluster-token",
            "restored",
            "--initial-advertise-peer-urls",
            &flag("initial-advertise-peer-urls"),
            "--data-dir",
            &flag("data-dir"),
        ]);
        assert_eq!(code, 0, "{err}");
        members.push(spawn_member(
            &args,
            &dir.path().join(format!("m{i}.log")),
            &[],
        ));
    }
    for m in &members {
        eventually("a restored member serves", 20, async || {
            maintenance(&m.client)
                .hash_kv(HashKvRequest { revision: 0 })
                .await
                .is_ok_and(|h| {
                    let h = h.into_inner();
                    h.hash == hash && h.header.unwrap().revision == revision
                })
        })
        .await;
        let mut got = None;
        eventually(
            "a restored member answers a linearizable read",
            20,
            async || {
                let all = RangeRequest {
                    key: Bytes::from_static(b"\0"),
                    range_end: Bytes::from_static(b"\0"),
                    ..Default::default()
                };
                got = KvClient::new(channel(&m.client))
                    .range(all)
                    .await
                    .ok()
                    .map(|r| r.into_inner().kvs);
                got.is_some()
            },
        )
        .await;
        assert_eq!(
            got.unwrap(),
            expected,
            "the restored cluster serves the same data"
        );
    }
    // And it takes writes, continuing the revisions.
    let r = KvClient::new(channel(&members[0].client))
        .put(put("after", b"restore".to_vec()))
        .await
        .expect("the restored cluster takes writes")
        .into_inner();
    assert_eq!(r.header.unwrap().revision, revision + 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_whose_store_diverges_gets_the_corrupt_alarm() {
    let dir = tempfile::tempdir().unwrap();
    let ports: Vec<(u16, u16)> = (0..3).map(|_| (free_port(), free_port())).collect();
    let metrics_port = free_port();
    let spawn = |i: usize, env: &[(&str, &str)]| {
        let mut args = member_args(dir.path(), i, &ports, "corrupt");
        args.push("--experimental-corrupt-check-time=300ms".into());
        args.push("--log-format=json".into());
        if i == 0 {
            args.push(format!(
                "--listen-metrics-urls=http://127.0.0.1:{metrics_port}"
            ));
        }
        spawn_member(&args, &dir.path().join(format!("m{i}.log")), env)
    };
    // m2 applies every put with another value than the log's (the test-only hook).
    let mut members = vec![
        spawn(0, &[]),
        spawn(1, &[]),
        spawn(2, &[("RAFTKV_TEST_ONLY_CORRUPT_PUTS", "1")]),
    ];
    let corrupt_id = loop {
        if let Ok(s) = maintenance(&members[2].client)
            .status(StatusRequest {})
            .await
        {
            let s = s.into_inner();
            let me = s.header.unwrap().member_id;
            if s.leader != 0 && s.leader != me {
                break me;
            }
            if s.leader == me {
                // The corrupt member leads: hand leadership to a healthy one, so the check
                // (run by the leader) compares against a healthy store.
                let to = member_id(&members[0].client).await;
                let _ = maintenance(&members[2].client)
                    .move_leader(MoveLeaderRequest { target_id: to })
                    .await;
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let mut kv = KvClient::new(channel(&members[0].client));
    let mut stopped = None;
    for i in 0..200 {
        if let Err(e) = kv.put(put(&format!("k{i}"), b"v".to_vec())).await {
            stopped = Some(e);
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let e = stopped.expect("writes stop once the check finds the divergence");
    assert_eq!(e.message(), "etcdserver: corrupt cluster");
    let listed = alarms(&members[0].client).await.unwrap();
    assert!(
        listed
            .iter()
            .any(|a| a.member_id == corrupt_id && a.alarm == CORRUPT),
        "CORRUPT raised for the diverged member {corrupt_id:x}: {listed:?}"
    );
    assert!(
        listed.iter().all(|a| a.member_id == corrupt_id),
        "only the diverged member is blamed: {listed:?}"
    );
    // Reads go on (etcd serves reads under CORRUPT).
    assert!(get(&members[0].client, "k0").await.unwrap().is_some());
    // The extra metrics URL serves the same endpoints: unhealthy, with an alarm raised.
    let extra = format!("http://127.0.0.1:{metrics_port}");
    let (code, body) = http_get(&extra, "/health");
    assert_eq!((code, body.as_str()), (503, "{\"health\":\"false\"}\n"));
    assert_eq!(scrape(&extra, "etcd_server_has_leader"), 1.0);
    // The leader logged both hashes, as JSON lines.
    let leader = leader_of(&members).await;
    let log = std::fs::read_to_string(&members[leader].log).unwrap();
    let line = log
        .lines()
        .find(|l| l.contains("raising CORRUPT"))
        .unwrap_or_else(|| panic!("no CORRUPT line in the leader's log:\n{log}"));
    assert!(line.starts_with('{') && line.ends_with('}'), "{line}");
    assert!(
        line.contains("\"leader_hash\"") && line.contains("\"member_hash\""),
        "{line}"
    );
    assert!(
        log.lines()
            .filter(|l| !l.starts_with("raftkv member"))
            .all(|l| l.starts_with('{')),
        "every log line is JSON:\n{log}"
    );
    // One line per election won and leader change, on every member.
    let logs: Vec<String> = members
        .iter()
        .map(|m| std::fs::read_to_string(&m.log).unwrap())
        .collect();
    assert!(
        logs.iter().any(|l| l.contains("elected leader")),
        "{logs:?}"
    );
    assert!(
        logs.iter().all(|l| l.contains("leader changed")),
        "{logs:?}"
    );
    members.clear();
}

async fn leader_of(members: &[Member]) -> usize {
    for _ in 0..100 {
        for (i, m) in members.iter().enumerate() {
            if let Ok(s) = maintenance(&m.client).status(StatusRequest {}).await {
                let s = s.into_inner();
                if s.leader != 0 && s.leader == s.header.unwrap().member_id {
                    return i;
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("no leader");
}
