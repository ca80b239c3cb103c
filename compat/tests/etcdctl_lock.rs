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
use std::io::Read;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use support::{Cluster, KillOnDrop, Kind};

/// This file's ports (the other compat tests use 12000–19000 and 20000 and up).
const PORTS: (u16, u16) = (19_000, 20_000);
const WAIT: Duration = Duration::from_secs(10);
/// How long a waiting client is watched to show it keeps waiting.
const BLOCKED: Duration = Duration::from_secs(1);

/// A running etcdctl, its output read as it comes.
struct Ctl {
    child: KillOnDrop,
    out: Arc<Mutex<String>>,
    err: Arc<Mutex<String>>,
    what: String,
}

impl Ctl {
    fn spawn(endpoint: &str, args: &[&str]) -> Ctl {
        let mut child = support::etcdctl_cmd(endpoint, 5)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("etcdctl is installed (Debian package etcd-client; see .ci/run)");
        let read = |mut r: Box<dyn Read + Send>| {
            let buf = Arc::new(Mutex::new(String::new()));
            let b = buf.clone();
            std::thread::spawn(move || {
                let mut chunk = [0u8; 4096];
                while let Ok(n) = r.read(&mut chunk) {
                    if n == 0 {
                        break;
                    }
                    b.lock()
                        .unwrap()
                        .push_str(&String::from_utf8_lossy(&chunk[..n]));
                }
            });
            buf
        };
        let out = read(Box::new(child.stdout.take().unwrap()));
        let err = read(Box::new(child.stderr.take().unwrap()));
        Ctl {
            child: KillOnDrop(child),
            out,
            err,
            what: format!("etcdctl {}", args.join(" ")),
        }
    }

    fn stdout(&self) -> String {
        self.out.lock().unwrap().clone()
    }

    /// Wait until it has printed `n` lines.
    fn wait_lines(&self, n: usize) {
        let deadline = Instant::now() + WAIT;
        while self.stdout().lines().count() < n {
            assert!(
                Instant::now() < deadline,
                "{}: {n} lines did not come; it printed:\n{}\nstderr:\n{}",
                self.what,
                self.stdout(),
                self.err.lock().unwrap()
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Interrupt it as Ctrl-C does (it unlocks or resigns, then exits); its stdout, its
    /// messages and its exit code.
    fn interrupt(mut self) -> String {
        // SAFETY: signalling a child process we started has no memory effects.
        unsafe { libc::kill(self.child.0.id() as libc::pid_t, libc::SIGINT) };
        let deadline = Instant::now() + WAIT;
        let code = loop {
            if let Some(s) = self.child.0.try_wait().unwrap() {
                break s.code();
            }
            assert!(Instant::now() < deadline, "{} did not end", self.what);
            std::thread::sleep(Duration::from_millis(5));
        };
        // The readers finish once the pipes close.
        std::thread::sleep(Duration::from_millis(50));
        format!(
            "{}{}exit {code:?}\n",
            self.stdout(),
            support::messages(&self.err.lock().unwrap())
        )
    }
}

/// What the script saw, step by step: (step, what it printed or answered).
type Transcript = Vec<(String, String)>;

fn etcdctl_script(endpoint: &str) -> Transcript {
    let mut log = Transcript::new();
    let mut note = |what: &str, out: String| log.push((what.to_string(), out));
    let first = Ctl::spawn(endpoint, &["lock", "job"]);
    first.wait_lines(1);
    let second = Ctl::spawn(endpoint, &["lock", "job"]);
    std::thread::sleep(BLOCKED);
    note("second lock, while the first holds", second.stdout());
    note("first lock, interrupted", first.interrupt());
    second.wait_lines(1);
    note("second lock, interrupted", second.interrupt());
    let out = support::etcdctl_cmd(endpoint, 5)
        .args(["lock", "job", "--", "sh", "-c", "echo \"$ETCD_LOCK_KEY\""])
        .output()
        .unwrap();
    note(
        "lock running a command",
        format!(
            "{}{}exit {:?}\n",
            String::from_utf8_lossy(&out.stdout),
            support::messages(&String::from_utf8_lossy(&out.stderr)),
            out.status.code()
        ),
    );

    let observer = Ctl::spawn(endpoint, &["elect", "-l", "vote"]);
    std::thread::sleep(BLOCKED);
    let one = Ctl::spawn(endpoint, &["elect", "vote", "one"]);
    one.wait_lines(2);
    observer.wait_lines(2);
    let two = Ctl::spawn(endpoint, &["elect", "vote", "two"]);
    std::thread::sleep(BLOCKED);
    note("second campaigner, while the first leads", two.stdout());
    note("first campaigner, interrupted", one.interrupt());
    two.wait_lines(2);
    observer.wait_lines(4);
    note("second campaigner, interrupted", two.interrupt());
    note("observer, interrupted", observer.interrupt());
    log
}

/// A client error as compared: the gRPC code and message (the metadata differs).
fn error(e: etcd_client::Error) -> String {
    match e {
        etcd_client::Error::GRpcStatus(s) => format!("error {:?}: {}\n", s.code(), s.message()),
        other => format!("error {other}\n"),
    }
}

fn show<T>(r: Result<T, etcd_client::Error>, f: impl FnOnce(T) -> String) -> String {
    r.map_or_else(error, f)
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
    let mut names: Vec<String> = Vec::new();
    let mut name = |id: &str| {
        let i = names.iter().position(|n| n == id).unwrap_or_else(|| {
            names.push(id.to_string());
            names.len() - 1
        });
        format!("lease{}", i + 1)
    };
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
                    s.push_str(&name(&rest[..hex]));
                }
                rest = &rest[hex..];
            }
            s.push_str(rest);
            (what, s)
        })
        .collect()
}

fn compare(want: &Transcript, got: &Transcript) {
    let mut diffs = Vec::new();
    for ((what, w), (_, g)) in want.iter().zip(got) {
        if w != g {
            diffs.push(format!("{what}\n--- etcd:\n{w}\n--- raftkv:\n{g}\n"));
        }
    }
    assert!(
        diffs.is_empty(),
        "raftkv differs from etcd:\n{}",
        diffs.join("\n")
    );
    assert_eq!(want.len(), got.len());
}

fn print(t: &Transcript) {
    if std::env::var_os("SHOW_LOCK_TRANSCRIPT").is_some() {
        for (what, out) in t {
            println!("== {what}\n{out}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcdctl_lock_and_elect_work_as_against_etcd() {
    let (etcd, raftkv) = tokio::join!(
        support::start(Kind::Etcd, 1, PORTS.0, PORTS.1),
        support::start(Kind::Raftkv, 1, PORTS.0, PORTS.1)
    );
    let (e, r) = (etcd.endpoints[0].clone(), raftkv.endpoints[0].clone());
    let (want, got) = tokio::join!(
        tokio::task::spawn_blocking(move || normalize(etcdctl_script(&e))),
        tokio::task::spawn_blocking(move || normalize(etcdctl_script(&r)))
    );
    let (want, got) = (want.unwrap(), got.unwrap());
    print(&want);
    // Not vacuous: the second of each waited for the first, then got its turn.
    assert_eq!(want[0].1, "", "etcd's second lock did not wait");
    assert!(want[2].1.starts_with("job/lease2\n"), "{}", want[2].1);
    compare(&want, &got);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_etcd_client_crates_lock_and_election_calls_answer_as_etcds() {
    let (etcd, raftkv) = tokio::join!(
        support::start(Kind::Etcd, 1, PORTS.0, PORTS.1),
        support::start(Kind::Raftkv, 1, PORTS.0, PORTS.1)
    );
    let (want, got) = tokio::join!(client_script(&etcd), client_script(&raftkv));
    let (want, got) = (normalize(want), normalize(got));
    print(&want);
    assert_eq!(want[1].1, "true\n", "etcd's second lock did not wait");
    compare(&want, &got);
}
