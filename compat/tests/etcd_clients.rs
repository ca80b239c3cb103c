//! raftkv through clients we did not write. `RAFTKV_BIN` names the raftkv binary to test.

mod support;

use etcd_client::{Client, Compare, CompareOp, GetOptions, Txn, TxnOp};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

struct LocalCluster {
    parent: Child,
    endpoints: Vec<String>,
    dir: tempfile::TempDir,
}

impl Drop for LocalCluster {
    fn drop(&mut self) {
        // SAFETY: signalling our own child; it stops its members and exits.
        unsafe { libc::kill(self.parent.id() as libc::pid_t, libc::SIGINT) };
        let _ = self.parent.wait();
    }
}

/// A base port with `base + 10 * i + p` free for three members' client and peer ports. Below
/// the kernel's ephemeral range (32768 and up), so no outgoing connection can hold them;
/// starting at a point derived from the process id.
fn free_base_port() -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    // Tests of this file run in parallel: each call starts at a different block.
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let start = (std::process::id() % 100) * 100 + NEXT.fetch_add(1_000, Ordering::Relaxed);
    let mut b = 20_000 + (start % 11_000) as u16;
    loop {
        let free = (0..3).all(|i| {
            (0..2).all(|p| std::net::TcpListener::bind(("127.0.0.1", b + 10 * i + p)).is_ok())
        });
        if free {
            return b;
        }
        b = if b >= 31_000 { 20_000 } else { b + 100 };
    }
}

async fn start() -> LocalCluster {
    let bin =
        std::env::var("RAFTKV_BIN").expect("set RAFTKV_BIN to the raftkv binary (see .ci/run)");
    let dir = tempfile::tempdir().unwrap();
    let base = free_base_port();
    let parent = Command::new(bin)
        .args([
            "cluster",
            "--dashboard-port",
            "0",
            "--base-port",
            &base.to_string(),
            "--data-dir",
        ])
        .arg(dir.path())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start raftkv cluster");
    let endpoints = (0..3)
        .map(|i| format!("127.0.0.1:{}", base + 10 * i))
        .collect();
    let c = LocalCluster {
        parent,
        endpoints,
        dir,
    };
    // Ready when a write goes through.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(mut client) = Client::connect(&c.endpoints, None).await {
            if client.put("ready", "yes", None).await.is_ok() {
                return c;
            }
        }
        assert!(
            Instant::now() < deadline,
            "the cluster did not become ready"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_etcd_client_crate_works_unchanged() {
    let c = start().await;
    let mut client = Client::connect(&c.endpoints, None).await.unwrap();
    client.put("app/a", "1", None).await.unwrap();
    client.put("app/b", "2", None).await.unwrap();
    client.put("other", "x", None).await.unwrap();
    let resp = client.get("app/a", None).await.unwrap();
    assert_eq!(resp.kvs()[0].value_str().unwrap(), "1");
    let all = client
        .get("app/", Some(GetOptions::new().with_prefix()))
        .await
        .unwrap();
    assert_eq!(all.count(), 2);
    let first_rev = resp.header().unwrap().revision();
    // A compare-and-swap transaction, both ways.
    let cas = |expect: &'static str, new: &'static str| {
        Txn::new()
            .when([Compare::value("app/a", CompareOp::Equal, expect)])
            .and_then([TxnOp::put("app/a", new, None)])
            .or_else([TxnOp::get("app/a", None)])
    };
    assert!(client.txn(cas("1", "10")).await.unwrap().succeeded());
    assert!(!client.txn(cas("1", "11")).await.unwrap().succeeded());
    assert_eq!(
        client.get("app/a", None).await.unwrap().kvs()[0]
            .value_str()
            .unwrap(),
        "10"
    );
    let del = client.delete("other", None).await.unwrap();
    assert_eq!(del.deleted(), 1);
    // Compaction: reading below it is refused with etcd's error.
    let now = client
        .get("app/a", None)
        .await
        .unwrap()
        .header()
        .unwrap()
        .revision();
    client.compact(now, None).await.unwrap();
    let old = client
        .get("app/a", Some(GetOptions::new().with_revision(first_rev)))
        .await;
    let err = old
        .expect_err("a compacted revision must be refused")
        .to_string();
    assert!(
        err.contains("required revision has been compacted"),
        "{err}"
    );
    // Maintenance and cluster calls.
    let status = client.status().await.unwrap();
    assert_ne!(status.leader(), 0);
    assert!(status.raft_index() >= 6);
    let members = client.member_list().await.unwrap();
    assert_eq!(members.members().len(), 3);
}

fn etcdctl(endpoints: &str, args: &[&str], stdin: Option<&str>) -> String {
    use std::io::Write;
    let mut child = support::etcdctl_cmd(endpoints, 5)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("etcdctl is installed (Debian package etcd-client; see .ci/run)");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(stdin.unwrap_or("").as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "etcdctl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    text
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcdctl_works_unchanged() {
    let c = start().await;
    let e = c.endpoints.join(",");
    tokio::task::spawn_blocking({
        move || {
            let e = e.as_str();
            assert_eq!(etcdctl(e, &["put", "greeting", "hello"], None).trim(), "OK");
            assert_eq!(
                etcdctl(e, &["get", "greeting", "--print-value-only"], None).trim(),
                "hello"
            );
            let txn =
                "value(\"greeting\") = \"hello\"\n\nput greeting bye\n\nput greeting never\n\n";
            assert!(etcdctl(e, &["txn"], Some(txn)).starts_with("SUCCESS"));
            assert_eq!(
                etcdctl(e, &["get", "greeting", "--print-value-only"], None).trim(),
                "bye"
            );
            assert_eq!(etcdctl(e, &["del", "greeting"], None).trim(), "1");
            let status = etcdctl(e, &["endpoint", "status", "-w", "table"], None);
            assert_eq!(status.matches("| 127.0.0.1:").count(), 3, "{status}");
            assert_eq!(
                status.matches("true").count(),
                1,
                "exactly one leader: {status}"
            );
            // Every member's client URL: each member publishes its own through the log once
            // it has a leader (as etcd's do), so the list may lack one for a moment.
            let listed = |members: &str| {
                e.split(',')
                    .all(|endpoint| members.contains(&format!("http://{endpoint}")))
            };
            let deadline = Instant::now() + Duration::from_secs(10);
            let members = loop {
                let members = etcdctl(e, &["member", "list"], None);
                if listed(&members) || Instant::now() > deadline {
                    break members;
                }
                std::thread::sleep(Duration::from_millis(100));
            };
            assert_eq!(members.lines().count(), 3, "{members}");
            assert!(listed(&members), "{members}");
            // move-leader: etcdctl finds the leader among the endpoints and asks it to hand
            // over to a follower.
            let leader_line = status.lines().find(|l| l.contains("true")).unwrap();
            let leader_id = leader_line.split('|').nth(2).unwrap().trim().to_string();
            let follower = members
                .lines()
                .map(|l| l.split(',').next().unwrap().trim().to_string())
                .find(|id| *id != leader_id)
                .unwrap();
            let moved = etcdctl(e, &["move-leader", &follower], None);
            assert_eq!(
                moved.trim(),
                format!("Leadership transferred from {leader_id} to {follower}")
            );
            let status = etcdctl(e, &["endpoint", "status", "-w", "table"], None);
            let now = status.lines().find(|l| l.contains("true")).unwrap();
            assert!(now.contains(&follower), "{status}");
        }
    })
    .await
    .unwrap();
}

/// A process started by a test, killed when the test ends, passed or failed.
struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Runs of whitespace made one: etcdctl pads ids to 16 hex digits with spaces.
fn words(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// etcd's "Replacing a failed etcd member", with Debian's etcdctl against raftkv: the dead
/// member is removed, the newcomer added as a learner and started with the environment
/// variables `member add` printed (ETCD_NAME, ETCD_INITIAL_CLUSTER, …), then promoted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcdctl_replaces_a_failed_member_as_etcds_documentation_does() {
    let c = start().await;
    let e = c.endpoints.join(",");
    let bin = std::env::var("RAFTKV_BIN").unwrap();
    etcdctl(&e, &["put", "before", "1"], None);
    // n2's machine is gone for good.
    let n2_data = c.dir.path().join("n2");
    let killed = Command::new("pkill")
        .args(["-9", "-f", &format!("data-dir={}", n2_data.display())])
        .status()
        .unwrap();
    assert!(killed.success(), "n2 was running");
    std::thread::sleep(Duration::from_millis(200));
    std::fs::remove_dir_all(&n2_data).unwrap();
    // From now on the operator talks to the members alive (etcdctl does not retry a
    // member change on another endpoint when the one it picked is down).
    let e = c.endpoints[..2].join(",");
    let list = etcdctl(&e, &["member", "list"], None);
    let n2 = list
        .lines()
        .find(|l| l.contains(", n2,"))
        .and_then(|l| l.split(',').next())
        .unwrap_or_else(|| panic!("{list}"))
        .to_string();
    // If n2 led, the others take an election timeout to notice: until then a member change
    // fails as unavailable, and the operator tries again.
    let deadline = Instant::now() + Duration::from_secs(10);
    let removed = loop {
        let (ok, out) = support::etcdctl_result(&e, 5, &["member", "remove", &n2]);
        if ok {
            break out;
        }
        assert!(
            out.contains("Unavailable") && Instant::now() < deadline,
            "{out}"
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    assert!(
        words(&removed).contains(&format!("Member {n2} removed")),
        "{removed}"
    );
    // The newcomer: ports of its own beside the cluster's.
    let port = |from: u16| {
        (from..from + 500)
            .find(|&p| std::net::TcpListener::bind(("127.0.0.1", p)).is_ok())
            .unwrap()
    };
    let first = c.endpoints[2]
        .rsplit(':')
        .next()
        .unwrap()
        .parse::<u16>()
        .unwrap()
        + 50;
    let client = port(first);
    let peer = port(client + 1);
    let (client, peer) = (
        format!("http://127.0.0.1:{client}"),
        format!("http://127.0.0.1:{peer}"),
    );
    let added = etcdctl(
        &e,
        &[
            "member",
            "add",
            "n3",
            &format!("--peer-urls={peer}"),
            "--learner",
        ],
        None,
    );
    let id = added
        .split_whitespace()
        .skip_while(|w| *w != "Member")
        .nth(1)
        .unwrap_or_else(|| panic!("{added}"))
        .to_string();
    // ETCD_NAME="n3" and the rest, as `export` lines.
    let env: Vec<(String, String)> = added
        .lines()
        .filter_map(|l| l.split_once('='))
        .filter(|(k, _)| k.starts_with("ETCD_"))
        .map(|(k, v)| (k.to_string(), v.trim_matches('"').to_string()))
        .collect();
    assert_eq!(env.len(), 4, "{added}");
    assert!(env.contains(&("ETCD_INITIAL_CLUSTER_STATE".into(), "existing".into())));
    let data = c.dir.path().join("n3");
    let log = std::fs::File::create(c.dir.path().join("n3.log")).unwrap();
    let _newcomer = KillOnDrop(
        Command::new(&bin)
            .arg("serve")
            .envs(env)
            .arg(format!("--data-dir={}", data.display()))
            .arg(format!("--listen-client-urls={client}"))
            .arg(format!("--advertise-client-urls={client}"))
            .arg(format!("--listen-peer-urls={peer}"))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap(),
    );
    // Promoted once it has caught up (etcd refuses until then).
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (ok, out) = support::etcdctl_result(&e, 5, &["member", "promote", &id]);
        if ok {
            assert!(
                words(&out).contains(&format!("Member {id} promoted")),
                "{out}"
            );
            break;
        }
        assert!(
            out.contains("in sync with leader") && Instant::now() < deadline,
            "{out}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let at_newcomer = client.trim_start_matches("http://");
    assert_eq!(
        etcdctl(at_newcomer, &["get", "before", "--print-value-only"], None).trim(),
        "1"
    );
    etcdctl(&e, &["put", "after", "2"], None);
    let deadline = Instant::now() + Duration::from_secs(10);
    let list = loop {
        let list = etcdctl(&e, &["member", "list"], None);
        if list.contains(&format!("started, n3, {peer}, {client}, false")) {
            break list;
        }
        assert!(Instant::now() < deadline, "{list}");
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(list.lines().count(), 3, "{list}");
    assert!(!list.contains(", n2,"), "{list}");
}
