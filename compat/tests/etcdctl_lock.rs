//! Differential: locks and elections against Debian's etcd 3.4 and against raftkv, a
//! one-member cluster each, the same script on both and the transcripts compared.
//!
//! Two clients we did not write. Debian's `etcdctl lock` and `etcdctl elect` (3.4) run
//! etcd's client-side recipes over the KV, Lease and Watch services: a second `lock` waits
//! while the first holds, and gets the lock when the first is interrupted (and unlocks); the
//! exec form runs a command holding the lock; `elect` waits its turn the same way and
//! `elect -l` prints each leader's proposal. The etcd-client crate's lock, unlock, campaign,
//! proclaim, leader, observe and resign calls go to the Lock and Election services, whose
//! answers (keys, leader keys, values, errors by code and message) are compared too.
//!
//! Normalized: lease ids (random on both: each becomes `lease1`, `lease2`, … in order of
//! appearance) and revisions (counted from the cluster's revision when the script starts).
//!
//! Needs `etcd` (Debian package etcd-server) and `etcdctl` (etcd-client); `.ci/run`
//! installs both. `RAFTKV_BIN` names the raftkv binary.

mod support;

use etcd_client::{LockOptions, ProclaimOptions, ResignOptions};
use std::time::Duration;
use support::{ports, Cluster, Names, Running, Timing, Transcript};

const WAIT: Duration = Duration::from_secs(10);
/// How long a waiting client is watched to show it keeps waiting.
const BLOCKED: Duration = Duration::from_secs(1);

/// A running etcdctl against `endpoint`, with nothing to read on its stdin.
fn spawn(endpoint: &str, args: &[&str]) -> Running {
    Running::spawn(endpoint, args, Some(""))
}

fn etcdctl_script(endpoint: &str) -> Transcript {
    let mut log = Transcript::new();
    let mut note = |what: &str, out: String| log.push((what.to_string(), out));
    let lines = |r: &Running, n| r.wait_lines(n, "of output", |_| true);
    let first = spawn(endpoint, &["lock", "job"]);
    lines(&first, 1);
    let second = spawn(endpoint, &["lock", "job"]);
    std::thread::sleep(BLOCKED);
    note("second lock, while the first holds", second.stdout());
    note("first lock, interrupted", first.interrupt().shown());
    lines(&second, 1);
    note("second lock, interrupted", second.interrupt().shown());
    let exec = ["lock", "job", "--", "sh", "-c", "echo \"$ETCD_LOCK_KEY\""];
    let out = support::etcdctl_run(endpoint, 5, &exec, "");
    note("lock running a command", out.shown());

    let observer = spawn(endpoint, &["elect", "-l", "vote"]);
    std::thread::sleep(BLOCKED);
    let one = spawn(endpoint, &["elect", "vote", "one"]);
    lines(&one, 2);
    lines(&observer, 2);
    let two = spawn(endpoint, &["elect", "vote", "two"]);
    std::thread::sleep(BLOCKED);
    note("second campaigner, while the first leads", two.stdout());
    note("first campaigner, interrupted", one.interrupt().shown());
    lines(&two, 2);
    lines(&observer, 4);
    note("second campaigner, interrupted", two.interrupt().shown());
    note("observer, interrupted", observer.interrupt().shown());
    log
}

/// An answer as compared: `f` of it, or the error's code and message.
fn show<T>(r: Result<T, etcd_client::Error>, f: impl FnOnce(T) -> String) -> String {
    r.map_or_else(|e| format!("{}\n", support::grpc_error(&e)), f)
}

async fn client_script(c: &Cluster) -> Transcript {
    let mut log = Transcript::new();
    let mut cl = c.client(0).await;
    let base = cl
        .get("x", None)
        .await
        .unwrap()
        .header()
        .unwrap()
        .revision();
    let rev = |r: i64| format!("rev+{}", r - base);
    let mut leases = Vec::new();
    for _ in 0..2 {
        leases.push(cl.lease_grant(60, None).await.unwrap().id());
    }
    let (a, b) = (leases[0], leases[1]);
    let lock = |lease| Some(LockOptions::new().with_lease(lease));
    let held = cl.lock("job", lock(a)).await.unwrap();
    let key = held.key().to_vec();
    log.push((
        "lock".into(),
        format!(
            "{} at {}\n",
            String::from_utf8_lossy(&key),
            rev(held.header().unwrap().revision())
        ),
    ));
    let mut other = cl.clone();
    let waiter = tokio::spawn(async move { other.lock("job", lock(b)).await });
    tokio::time::sleep(BLOCKED).await;
    log.push((
        "second lock waits".into(),
        format!("{}\n", !waiter.is_finished()),
    ));
    cl.unlock(key).await.unwrap();
    let got = tokio::time::timeout(WAIT, waiter).await.unwrap().unwrap();
    log.push((
        "second lock".into(),
        show(got, |r| format!("{}\n", String::from_utf8_lossy(r.key()))),
    ));
    let missing = cl.lock("job", lock(a ^ 1)).await;
    log.push((
        "lock, no such lease".into(),
        show(missing, |_| "ok\n".into()),
    ));

    let no_leader = cl.leader("vote").await;
    log.push(("leader of none".into(), show(no_leader, |_| "ok\n".into())));
    let won = cl.campaign("vote", "one", a).await.unwrap();
    let leader = won.leader().unwrap().clone();
    log.push((
        "campaign".into(),
        format!(
            "{} {} {} lease {}\n",
            String::from_utf8_lossy(leader.name()),
            String::from_utf8_lossy(leader.key()),
            rev(leader.rev()),
            leader.lease() == a
        ),
    ));
    // Observe sends the leader's value, then each new one.
    let mut observed = cl.observe("vote").await.unwrap();
    let mut observe = async || {
        let m = tokio::time::timeout(WAIT, observed.message())
            .await
            .unwrap();
        show(m, |r| {
            let r = r.expect("the stream ended");
            let kv = r.kv().unwrap();
            format!("{} {}\n", kv.key_str().unwrap(), kv.value_str().unwrap())
        })
    };
    log.push(("observed".into(), observe().await));
    let as_leader = Some(ProclaimOptions::new().with_leader(leader.clone()));
    cl.proclaim("uno", as_leader).await.unwrap();
    log.push(("observed after proclaim".into(), observe().await));
    let now = cl.leader("vote").await;
    log.push((
        "leader".into(),
        show(now, |r| {
            format!("{}\n", r.kv().unwrap().value_str().unwrap())
        }),
    ));
    let stale = leader.clone().with_key(b"vote/0".to_vec());
    let r = cl
        .proclaim("x", Some(ProclaimOptions::new().with_leader(stale)))
        .await;
    log.push(("proclaim, stale key".into(), show(r, |_| "ok\n".into())));
    let r = cl
        .resign(Some(ResignOptions::new().with_leader(leader.clone())))
        .await;
    log.push(("resign".into(), show(r, |_| "ok\n".into())));
    let after = cl.leader("vote").await;
    log.push(("leader after".into(), show(after, |_| "ok\n".into())));
    log
}

/// Lease ids (16 hex digits or fewer after a `/`, or decimal in answers) are random: name
/// them in order of appearance.
fn normalize(t: Transcript) -> Transcript {
    let mut names = Names::new("lease");
    t.into_iter()
        .map(|(what, out)| {
            let mut s = String::new();
            let mut rest = out.as_str();
            while let Some(at) = rest.find('/') {
                s.push_str(&rest[..=at]);
                rest = &rest[at + 1..];
                let hex = rest
                    .find(|c: char| !c.is_ascii_hexdigit())
                    .unwrap_or(rest.len());
                if hex > 0 {
                    s.push_str(&names.name(&rest[..hex]));
                }
                rest = &rest[hex..];
            }
            s.push_str(rest);
            (what, s)
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcdctl_lock_and_elect_work_as_against_etcd() {
    let (etcd, raftkv) = support::start_both(1, ports::LOCK, Timing::QUICK).await;
    let script = |c: &Cluster| normalize(etcdctl_script(&c.endpoints[0]));
    let (want, got) = support::script_on_both(etcd, raftkv, script).await;
    support::show_transcript("SHOW_LOCK_TRANSCRIPT", &want);
    // Not vacuous: the second of each waited for the first, then got its turn.
    assert_eq!(want[0].1, "", "etcd's second lock did not wait");
    assert!(want[2].1.starts_with("job/lease2\n"), "{}", want[2].1);
    support::assert_same(&want, &got);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_etcd_client_crates_lock_and_election_calls_answer_as_etcds() {
    let (etcd, raftkv) = support::start_both(1, ports::LOCK, Timing::QUICK).await;
    let (want, got) = tokio::join!(client_script(&etcd), client_script(&raftkv));
    let (want, got) = (normalize(want), normalize(got));
    support::show_transcript("SHOW_LOCK_TRANSCRIPT", &want);
    assert_eq!(want[1].1, "true\n", "etcd's second lock did not wait");
    support::assert_same(&want, &got);
}
