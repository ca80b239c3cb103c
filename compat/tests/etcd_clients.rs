//! raftkv through clients we did not write. `RAFTKV_BIN` names the raftkv binary to test.

mod support;

use etcd_client::{Client, Compare, CompareOp, GetOptions, Txn, TxnOp};
use std::process::Command;
use std::time::Duration;
use support::{ports, retry, spawn_logged, words, LocalCluster};

/// `raftkv cluster` on this file's ports, once a write goes through.
async fn start() -> LocalCluster {
    let c = LocalCluster::start(ports::ETCD_CLIENTS, &[]);
    support::retry_async(
        Duration::from_secs(30),
        Duration::from_millis(100),
        async || {
            let mut client = Client::connect(&c.endpoints, None).await?;
            client.put("ready", "yes", None).await
        },
    )
    .await
    .unwrap_or_else(|e| panic!("the cluster did not become ready: {e}"));
    c
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

/// etcdctl, which must succeed: its stdout.
fn etcdctl(endpoints: &str, args: &[&str]) -> String {
    support::etcdctl_ok(endpoints, 5, args, "")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcdctl_works_unchanged() {
    let c = start().await;
    let e = c.endpoints.join(",");
    tokio::task::spawn_blocking({
        move || {
            let e = e.as_str();
            assert_eq!(etcdctl(e, &["put", "greeting", "hello"]).trim(), "OK");
            assert_eq!(
                etcdctl(e, &["get", "greeting", "--print-value-only"]).trim(),
                "hello"
            );
            let txn =
                "value(\"greeting\") = \"hello\"\n\nput greeting bye\n\nput greeting never\n\n";
            assert!(support::etcdctl_ok(e, 5, &["txn"], txn).starts_with("SUCCESS"));
            assert_eq!(
                etcdctl(e, &["get", "greeting", "--print-value-only"]).trim(),
                "bye"
            );
            assert_eq!(etcdctl(e, &["del", "greeting"]).trim(), "1");
            let status = etcdctl(e, &["endpoint", "status", "-w", "table"]);
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
            let members = retry(Duration::from_secs(10), Duration::from_millis(100), || {
                let members = etcdctl(e, &["member", "list"]);
                if listed(&members) {
                    Ok(members)
                } else {
                    Err(members)
                }
            })
            .unwrap_or_else(|members| members);
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
            let moved = etcdctl(e, &["move-leader", &follower]);
            assert_eq!(
                moved.trim(),
                format!("Leadership transferred from {leader_id} to {follower}")
            );
            let status = etcdctl(e, &["endpoint", "status", "-w", "table"]);
            let now = status.lines().find(|l| l.contains("true")).unwrap();
            assert!(now.contains(&follower), "{status}");
        }
    })
    .await
    .unwrap();
}

/// etcd's "Replacing a failed etcd member", with Debian's etcdctl against raftkv: the dead
/// member is removed, the newcomer added as a learner and started with the environment
/// variables `member add` printed (ETCD_NAME, ETCD_INITIAL_CLUSTER, …), then promoted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcdctl_replaces_a_failed_member_as_etcds_documentation_does() {
    let c = start().await;
    let e = c.endpoints.join(",");
    etcdctl(&e, &["put", "before", "1"]);
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
    let list = etcdctl(&e, &["member", "list"]);
    let n2 = support::member_id(&list, "n2").unwrap_or_else(|| panic!("{list}"));
    // If n2 led, the others take an election timeout to notice: until then a member change
    // fails as unavailable, and the operator tries again.
    let removed = retry(Duration::from_secs(10), Duration::from_millis(200), || {
        let (ok, out) = support::etcdctl_result(&e, 5, &["member", "remove", &n2]);
        if ok {
            return Ok(out);
        }
        assert!(out.contains("Unavailable"), "{out}");
        Err(out)
    })
    .unwrap_or_else(|out| panic!("{out}"));
    assert!(
        words(&removed).contains(&format!("Member {n2} removed")),
        "{removed}"
    );
    // The newcomer: a block of ports of its own, from this file's range.
    let block = support::port_block(ports::ETCD_CLIENTS, 1);
    let (client, peer) = (
        format!("http://127.0.0.1:{block}"),
        format!("http://127.0.0.1:{}", block + 1),
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
    );
    let id = support::word_after(&added, "Member ");
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
    let newcomer = spawn_logged(
        Command::new(support::raftkv_bin())
            .arg("serve")
            .envs(env)
            .arg(format!("--data-dir={}", data.display()))
            .arg(format!("--listen-client-urls={client}"))
            .arg(format!("--advertise-client-urls={client}"))
            .arg(format!("--listen-peer-urls={peer}")),
        &c.dir.path().join("n3.log"),
    );
    // Promoted once it has caught up (etcd refuses until then).
    let promoted = retry(Duration::from_secs(30), Duration::from_millis(200), || {
        let (ok, out) = support::etcdctl_result(&e, 5, &["member", "promote", &id]);
        if ok {
            return Ok(out);
        }
        assert!(out.contains("in sync with leader"), "{out}");
        Err(out)
    })
    .unwrap_or_else(|out| panic!("{out}"));
    assert!(
        words(&promoted).contains(&format!("Member {id} promoted")),
        "{promoted}"
    );
    let at_newcomer = client.trim_start_matches("http://");
    assert_eq!(
        etcdctl(at_newcomer, &["get", "before", "--print-value-only"]).trim(),
        "1"
    );
    etcdctl(&e, &["put", "after", "2"]);
    let list = retry(Duration::from_secs(10), Duration::from_millis(100), || {
        let list = etcdctl(&e, &["member", "list"]);
        if list.contains(&format!("started, n3, {peer}, {client}, false")) {
            Ok(list)
        } else {
            Err(list)
        }
    })
    .unwrap_or_else(|list| panic!("{list}"));
    assert_eq!(list.lines().count(), 3, "{list}");
    assert!(!list.contains(", n2,"), "{list}");
    drop(newcomer);
    support::release_block(block);
}
