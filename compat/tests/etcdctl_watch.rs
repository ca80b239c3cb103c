//! Differential: Debian's `etcdctl watch` (3.4) against Debian's etcd 3.4 and against
//! raftkv, a one-member cluster each: the same script on both, every watcher's output
//! (stdout and etcdctl's own messages on stderr) and exit code compared. Covers
//! `watch KEY`, `--prefix`, `--prev-kv`, a key and range end, `--rev N` (from history, and
//! from a compacted revision: canceled), the simple, json and fields output formats, the
//! exec form (`watch KEY -- CMD`, with etcdctl's ETCD_WATCH_* variables) and interactive
//! `watch -i` (several watchers on one stream, `progress`).
//!
//! Normalized: cluster and member ids and raft terms (random); revisions, named by the
//! scripted write that made them (`r1`, `r2`, …: raftkv's revisions run one behind etcd's,
//! see watch_vs_etcd.rs). A watcher without `--rev` is known to be in place once it has
//! printed a write made for that purpose (repeated until it shows; the output up to it is
//! cut, and the key deleted so that versions stay in step); an interactive one once it has
//! printed its answer to `progress` (once every watcher is in place and caught up, both
//! servers answer at once).
//!
//! Needs `etcd` (Debian package etcd-server) and `etcdctl` (etcd-client); `.ci/run`
//! installs both. `RAFTKV_BIN` names the raftkv binary.

mod support;

use std::io::{Read, Write};
use std::process::{ChildStdin, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use support::{Cluster, KillOnDrop, Kind};

/// This file's ports (the other compat tests use 12000–14000 and 20000 and up).
const PORTS: (u16, u16) = (14_000, 16_000);
const WAIT: Duration = Duration::from_secs(10);

/// A running `etcdctl watch`, its output read as it comes.
struct Watch {
    child: KillOnDrop,
    stdin: Option<ChildStdin>,
    out: Arc<Mutex<String>>,
    err: Arc<Mutex<String>>,
    what: String,
}

impl Watch {
    fn spawn(endpoint: &str, args: &[&str]) -> Watch {
        let mut child = support::etcdctl_cmd(endpoint, 5)
            .arg("watch")
            .args(args)
            .stdin(Stdio::piped())
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
        Watch {
            stdin: child.stdin.take(),
            child: KillOnDrop(child),
            out,
            err,
            what: format!("etcdctl watch {}", args.join(" ")),
        }
    }

    fn stdout(&self) -> String {
        self.out.lock().unwrap().clone()
    }

    /// Wait until the output holds `n` copies of `s` (a whole line).
    fn wait_lines(&self, s: &str, n: usize) {
        let deadline = Instant::now() + WAIT;
        loop {
            let out = self.stdout();
            if out.lines().filter(|l| *l == s).count() >= n {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{}: {n} lines {s:?} did not come; it printed:\n{out}\nstderr:\n{}",
                self.what,
                self.err.lock().unwrap()
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    fn type_line(&mut self, line: &str) {
        let stdin = self.stdin.as_mut().unwrap();
        stdin.write_all(format!("{line}\n").as_bytes()).unwrap();
        stdin.flush().unwrap();
    }

    /// Stop it (or let it end, for one that ends by itself): its stdout, its messages on
    /// stderr, and its exit code (None: still running, killed).
    fn finish(mut self, ends: bool) -> (String, String, Option<i32>) {
        drop(self.stdin.take());
        let deadline = Instant::now() + WAIT;
        let code = loop {
            if let Some(s) = self.child.0.try_wait().unwrap() {
                break s.code();
            }
            if !ends {
                break None;
            }
            assert!(Instant::now() < deadline, "{} did not end", self.what);
            std::thread::sleep(Duration::from_millis(5));
        };
        let _ = self.child.0.kill();
        let _ = self.child.0.wait();
        // The readers finish once the pipes close.
        std::thread::sleep(Duration::from_millis(50));
        let out = self.stdout();
        let err = support::messages(&self.err.lock().unwrap());
        (out, err, code)
    }
}

/// One server's run of the script: its outputs, raw, and its revisions' names.
struct Script<'a> {
    endpoint: &'a str,
    names: Vec<(i64, String)>,
    log: Vec<(String, String)>,
}

impl Script<'_> {
    /// Run an etcdctl command that writes, `-w json`: its revision gets the next name.
    fn write(&mut self, args: &[&str], stdin: Option<&str>) -> i64 {
        let mut child = support::etcdctl_cmd(self.endpoint, 5)
            .args(args)
            .arg("-w")
            .arg("json")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
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
            "etcdctl {args:?}: {text}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let rev = number_after(&text, "\"revision\":").unwrap_or_else(|| panic!("{text}"));
        if !self.names.iter().any(|(r, _)| *r == rev) {
            let name = format!("r{}", self.names.len() + 1);
            self.names.push((rev, name));
        }
        rev
    }

    fn put(&mut self, key: &str, value: &str) -> i64 {
        self.write(&["put", key, value], None)
    }

    fn other(&mut self, args: &[&str]) -> (String, String, Option<i32>) {
        let out = support::etcdctl_cmd(self.endpoint, 5)
            .args(args)
            .output()
            .unwrap();
        (
            String::from_utf8_lossy(&out.stdout).into_owned(),
            support::messages(&String::from_utf8_lossy(&out.stderr)),
            out.status.code(),
        )
    }

    fn record(&mut self, what: &str, (out, err, code): (String, String, Option<i32>)) {
        self.log.push((
            what.to_string(),
            format!("{out}--- stderr:\n{err}--- exit: {code:?}"),
        ));
    }

    /// Make sure watchers without `--rev` are in place: write `key` until each shows it,
    /// then a last write to know where their output for the script starts, then delete
    /// the key (so that its version is the same on both servers). Returns where each
    /// watcher's output for the script starts.
    fn in_place(&mut self, key: &str, watchers: &[&Watch]) -> Vec<usize> {
        let deadline = Instant::now() + WAIT;
        'again: loop {
            support::etcdctl_cmd(self.endpoint, 5)
                .args(["put", key, "is-it-there"])
                .output()
                .unwrap();
            let until = Instant::now() + Duration::from_millis(500);
            while Instant::now() < until {
                if watchers
                    .iter()
                    .all(|w| w.stdout().lines().any(|l| l == "is-it-there"))
                {
                    break 'again;
                }
                std::thread::sleep(Duration::from_millis(5));
            }
            assert!(Instant::now() < deadline, "watchers not in place");
        }
        support::etcdctl_cmd(self.endpoint, 5)
            .args(["put", key, "in-place"])
            .output()
            .unwrap();
        let cut = watchers
            .iter()
            .map(|w| {
                w.wait_lines("in-place", 1);
                let out = w.stdout();
                let at = out.find("\nin-place\n").unwrap();
                at + "\nin-place\n".len()
            })
            .collect();
        self.write(&["del", key], None);
        cut
    }
}

/// The number after the first `label` in `text`.
fn number_after(text: &str, label: &str) -> Option<i64> {
    let at = text.find(label)? + label.len();
    let rest = text[at..].trim_start();
    let end = rest
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(rest.len());
    rest[..end].parse().ok()
}

/// Every number after one of `labels` replaced by `map` of it.
fn replace_after(text: &str, labels: &[&str], map: &dyn Fn(&str) -> String) -> String {
    let mut out = text.to_string();
    for label in labels {
        let mut result = String::new();
        let mut rest = out.as_str();
        while let Some(at) = rest.find(label) {
            let after = at + label.len();
            result.push_str(&rest[..after]);
            rest = &rest[after..];
            let spaces = rest.len() - rest.trim_start_matches(' ').len();
            result.push_str(&rest[..spaces]);
            rest = &rest[spaces..];
            let end = rest
                .find(|c: char| !c.is_ascii_digit())
                .unwrap_or(rest.len());
            if end > 0 {
                result.push_str(&map(&rest[..end]));
                rest = &rest[end..];
            }
        }
        result.push_str(rest);
        out = result;
    }
    out
}

fn normalize(text: &str, names: &[(i64, String)]) -> String {
    let ids = replace_after(
        text,
        &[
            "\"cluster_id\":",
            "\"member_id\":",
            "\"raft_term\":",
            "\"ClusterID\" :",
            "\"MemberID\" :",
            "\"RaftTerm\" :",
        ],
        &|_| "<id>".into(),
    );
    let name = |r: &str| {
        let r: i64 = r.parse().unwrap();
        if r == 0 {
            return "0".to_string();
        }
        names
            .iter()
            .find(|(x, _)| *x == r)
            .map_or(format!("<unnamed {r}>"), |(_, n)| n.clone())
    };
    replace_after(
        &ids,
        &[
            "\"revision\":",
            "\"create_revision\":",
            "\"mod_revision\":",
            "\"CompactRevision\":",
            "\"Revision\" :",
            "\"CreateRevision\" :",
            "\"ModRevision\" :",
            "\"PrevCreateRevision\" :",
            "\"PrevModRevision\" :",
            "progress notify:",
            "compacted revision",
            "|rev ",
            "--rev ",
        ],
        &name,
    )
}

/// The script, against one server: (what, normalized output).
fn transcript(c: &Cluster) -> Vec<(String, String)> {
    let e = c.endpoints[0].as_str();
    let mut s = Script {
        endpoint: e,
        names: Vec::new(),
        log: Vec::new(),
    };
    s.put("other", "before");

    // Watchers from now on.
    let plain = Watch::spawn(e, &["foo"]);
    let prev = Watch::spawn(e, &["--prev-kv", "foo"]);
    let range = Watch::spawn(e, &["foo", "fop"]);
    let prefix = Watch::spawn(e, &["--prefix", "p/"]);
    let cut_foo = s.in_place("foo", &[&plain, &prev, &range]);
    let cut_p = s.in_place("p/", &[&prefix]);
    let first = s.put("foo", "1");
    s.put("foo", "2");
    s.put("p/a", "x");
    s.put("foo/child", "c");
    s.put("p/b", "y");
    s.write(&["del", "foo"], None);
    s.write(
        &["txn"],
        Some("\nput p/a z\nput foo 3\ndel p/b\nput fo 0\n\n\n"),
    );
    s.put("other", "after");
    s.write(&["del", "--prefix", "p/", "--prev-kv"], None);
    s.put("foo", "end");
    s.put("p/end", "end");
    for (w, cut, n) in [
        (plain, cut_foo[0], 1),
        (prev, cut_foo[1], 1),
        (range, cut_foo[2], 1),
        (prefix, cut_p[0], 1),
    ] {
        w.wait_lines("end", n);
        let what = w.what.clone();
        let (out, err, code) = w.finish(false);
        s.record(&what, (out[cut..].to_string(), err, code));
    }

    // From history: every event since `first`, in each output format.
    let rev = first.to_string();
    let exec = "echo \"[$ETCD_WATCH_EVENT_TYPE|$ETCD_WATCH_KEY|$ETCD_WATCH_VALUE|rev \
                $ETCD_WATCH_REVISION]\"";
    let history: Vec<Vec<&str>> = vec![
        vec!["--rev", &rev, "foo"],
        vec!["--rev", &rev, "--prev-kv", "--prefix", "p/"],
        vec!["--rev", &rev, "foo", "fop"],
        vec!["--rev", &rev, "-w", "json", "foo"],
        vec!["--rev", &rev, "-w", "json", "--prev-kv", "--prefix", "p/"],
        vec!["--rev", &rev, "-w", "fields", "--prev-kv", "foo"],
        vec!["--rev", &rev, "foo", "--", "sh", "-c", exec],
    ];
    for args in &history {
        let w = Watch::spawn(e, args);
        let last = if args.contains(&"p/") { "p/end" } else { "end" };
        if args.contains(&"json") {
            // One line per response; wait for the last key's.
            let deadline = Instant::now() + WAIT;
            let b64 = if last == "end" { "ZW5k" } else { "cC9lbmQ=" };
            while !w.stdout().contains(b64) {
                assert!(Instant::now() < deadline, "{}: {}", w.what, w.stdout());
                std::thread::sleep(Duration::from_millis(5));
            }
        } else if args.contains(&"fields") {
            w.wait_lines("\"Value\" : \"end\"", 1);
        } else if args.contains(&"--") {
            let deadline = Instant::now() + WAIT;
            while !w.stdout().contains("|\"end\"|") {
                assert!(Instant::now() < deadline, "{}: {}", w.what, w.stdout());
                std::thread::sleep(Duration::from_millis(5));
            }
        } else {
            w.wait_lines(if last == "p/end" { "p/end" } else { "end" }, 1);
        }
        let what = w.what.clone();
        let r = w.finish(false);
        s.record(&what, r);
    }

    // Compacted: canceled, and etcdctl says so and exits.
    let compact_to = s.put("foo", "compact-me");
    let (out, err, code) = s.other(&["compact", &compact_to.to_string()]);
    s.record("etcdctl compact", (out, err, code));
    let w = Watch::spawn(e, &["--rev", &rev, "foo"]);
    let what = w.what.clone();
    let r = w.finish(true);
    s.record(&what, r);
    let w = Watch::spawn(e, &["--rev", &rev, "-w", "json", "foo"]);
    let what = w.what.clone();
    let r = w.finish(true);
    s.record(&what, r);
    // From the compaction's own revision: served.
    let w = Watch::spawn(e, &["--rev", &compact_to.to_string(), "--prev-kv", "foo"]);
    w.wait_lines("compact-me", 1);
    let what = w.what.clone();
    let r = w.finish(false);
    s.record(&what, r);

    // Interactive: watchers on one stream, each known to be in place by `progress`.
    let mut i = Watch::spawn(e, &["-i"]);
    i.type_line("watch bar");
    i.type_line("progress");
    i.wait_lines_prefix("progress notify:", 1);
    i.type_line("watch --prefix --prev-kv q/");
    i.type_line("progress");
    i.wait_lines_prefix("progress notify:", 3);
    i.type_line("nonsense");
    i.type_line("watch");
    let from = s.put("bar", "1");
    s.put("q/1", "a");
    s.put("q/1", "b");
    s.write(&["del", "q/1"], None);
    s.put("bar", "2");
    s.put("q/end", "end");
    i.wait_lines("end", 1);
    i.type_line(&format!("watch --rev {from} bar"));
    i.wait_lines("2", 2);
    i.type_line("progress");
    i.wait_lines_prefix("progress notify:", 6);
    let what = i.what.clone();
    let r = i.finish(true);
    s.record(&what, r);

    let names = s.names.clone();
    s.log
        .into_iter()
        .map(|(what, out)| (normalize(&what, &names), normalize(&out, &names)))
        .collect()
}

impl Watch {
    /// Wait until `n` lines start with `prefix`.
    fn wait_lines_prefix(&self, prefix: &str, n: usize) {
        let deadline = Instant::now() + WAIT;
        loop {
            let out = self.stdout();
            if out.lines().filter(|l| l.starts_with(prefix)).count() >= n {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{}: {n} lines starting {prefix:?} did not come; it printed:\n{out}\nstderr:\n{}",
                self.what,
                self.err.lock().unwrap()
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcdctl_watch_prints_as_against_etcd() {
    let (etcd, raftkv) = tokio::join!(
        support::start(Kind::Etcd, 1, PORTS.0, PORTS.1),
        support::start(Kind::Raftkv, 1, PORTS.0, PORTS.1)
    );
    let (etcd, raftkv) = (Arc::new(etcd), Arc::new(raftkv));
    let (want, got) = {
        let (e, r) = (etcd.clone(), raftkv.clone());
        let (w, g) = tokio::join!(
            tokio::task::spawn_blocking(move || transcript(&e)),
            tokio::task::spawn_blocking(move || transcript(&r))
        );
        (w.unwrap(), g.unwrap())
    };
    if std::env::var_os("SHOW_WATCH_TRANSCRIPT").is_some() {
        for (what, out) in &want {
            println!("== {what}\n{out}");
        }
    }
    let mut diffs = Vec::new();
    for ((what, w), (_, g)) in want.iter().zip(&got) {
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
