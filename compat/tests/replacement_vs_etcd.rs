//! Differential: every member of a three-member cluster replaced in turn with etcd's
//! documented flow, driven by Debian's etcdctl, against Debian's etcd 3.4 and against
//! raftkv. For b, then c, then a: the member's machine dies (killed, data directory gone),
//! `etcdctl member remove`, `etcdctl member add` at the same peer URL, and the member is
//! started again with the flags the cluster was founded with but
//! `--initial-cluster-state existing`. Writes go on throughout. The third newcomer is the
//! hard case: none of the members running then is one its flags name.
//!
//! Both servers must tell the same story: each newcomer joins, serves the data written
//! before it was added, and is listed as started under its name.
//!
//! Needs `etcd` (etcd-server) and `etcdctl` (etcd-client); `.ci/run` installs both.
//! `RAFTKV_BIN` names the raftkv binary.

mod support;

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use support::{ports, retry, retry_async, wait_until_async, Cluster, Kind};

/// etcdctl with a 3 s timeout: whether it succeeded, and stdout then stderr.
fn etcdctl(endpoints: &str, args: &[&str]) -> (bool, String) {
    support::etcdctl_result(endpoints, 3, args)
}

/// Run an etcdctl command until it succeeds (a member change is refused while the cluster
/// has just lost its leader, or has not yet heard from a newcomer); its output.
fn until_ok(endpoints: &str, args: &[&str], within: Duration) -> Result<String, String> {
    retry(within, Duration::from_millis(200), || {
        match etcdctl(endpoints, args) {
            (true, out) => Ok(out),
            (false, out) => Err(out),
        }
    })
}

/// A write load: one etcdctl put after another, each to the next member in turn (a member
/// that is down or not yet serving just fails that put).
struct Load {
    acked: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<()>,
}

fn start_load(endpoints: Vec<String>) -> Load {
    let acked = Arc::new(AtomicUsize::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let (a, s) = (acked.clone(), stop.clone());
    let thread = std::thread::spawn(move || {
        let mut i = 0usize;
        while !s.load(Ordering::SeqCst) {
            let ep = &endpoints[i % endpoints.len()];
            if etcdctl(ep, &["put", &format!("load{i}"), "v"]).0 {
                a.fetch_add(1, Ordering::SeqCst);
            }
            i += 1;
        }
    });
    Load {
        acked,
        stop,
        thread,
    }
}

/// Replace every member in turn; what an operator would note of each step.
async fn replace_each(kind: Kind) -> Vec<String> {
    let mut c = support::start(kind, 3, ports::REPLACEMENT).await;
    let all = c.endpoints.join(",");
    until_ok(&all, &["put", "before", "yes"], Duration::from_secs(10)).unwrap();
    let load = start_load(c.endpoints.clone());
    let mut story = Vec::new();
    for victim in [1, 2, 0] {
        let name = Cluster::name(victim);
        let peer = c.peer_url(victim).to_string();
        c.wipe(victim);
        let others: Vec<&str> = (0..3)
            .filter(|&i| i != victim)
            .map(|i| c.endpoints[i].as_str())
            .collect();
        let others = others.join(",");
        let list = until_ok(&others, &["member", "list"], Duration::from_secs(10)).unwrap();
        let id = support::member_id(&list, &name)
            .unwrap_or_else(|| panic!("{} lists no {name}: {list}", kind.name()));
        let removed = until_ok(&others, &["member", "remove", &id], Duration::from_secs(15));
        story.push(format!("{name} removed: {}", removed.is_ok()));
        let add = ["member", "add", &name, &format!("--peer-urls={peer}")];
        let added = until_ok(&others, &add, Duration::from_secs(15));
        story.push(format!("{name} added: {}", added.is_ok()));
        let acked_before = load.acked.load(Ordering::SeqCst);
        c.start_existing(victim);
        // Joined: it serves what was written before it was added (a linearizable read on
        // the newcomer itself), and every member is listed as started under its name.
        let at = c.endpoints[victim].clone();
        let joined = retry_async(
            Duration::from_secs(40),
            Duration::from_millis(200),
            async || {
                let (ok, value) = etcdctl(&at, &["get", "before", "--print-value-only"]);
                let (_, list) = etcdctl(&at, &["member", "list"]);
                let started = ["a", "b", "c"]
                    .iter()
                    .all(|n| list.contains(&format!("started, {n}, ")));
                if ok && value.trim() == "yes" && started {
                    Ok(())
                } else {
                    Err(list)
                }
            },
        )
        .await;
        if let Err(list) = &joined {
            eprintln!("{} {name} did not join:\n{list}\n{}", kind.name(), c.logs());
        }
        let joined = joined.is_ok();
        story.push(format!("{name} joined and serves: {joined}"));
        let went_on = wait_until_async(Duration::from_secs(20), Duration::from_millis(100), || {
            load.acked.load(Ordering::SeqCst) >= acked_before + 5
        })
        .await;
        story.push(format!("writes went on: {went_on}"));
    }
    load.stop.store(true, Ordering::SeqCst);
    load.thread.join().unwrap();
    // No founder is left: one member more may fail.
    c.kill(0);
    let rest = format!("{},{}", c.endpoints[1], c.endpoints[2]);
    let after = until_ok(
        &rest,
        &["put", "after", "one down"],
        Duration::from_secs(15),
    );
    story.push(format!("a write with one member down: {}", after.is_ok()));
    story
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_member_replaced_in_turn_with_etcdctl_joins_as_on_etcd() {
    let etcd = replace_each(Kind::Etcd).await;
    let raftkv = replace_each(Kind::Raftkv).await;
    assert!(
        etcd.iter().all(|l| l.ends_with("true")),
        "etcd itself: {etcd:#?}"
    );
    assert_eq!(raftkv, etcd);
}
