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
//! see watch_vs_etcd/main.rs). A watcher without `--rev` is known to be in place once it has
//! printed a write made for that purpose (repeated until it shows; the output up to it is
//! cut, and the key deleted so that versions stay in step); an interactive one once it has
//! printed its answer to `progress` (once every watcher is in place and caught up, both
//! servers answer at once).
//!
//! Needs `etcd` (Debian package etcd-server) and `etcdctl` (etcd-client); `.ci/run`
//! installs both. `RAFTKV_BIN` names the raftkv binary.

mod support;

use std::time::Duration;
use support::{etcdctl_run, hide_header_ids, number_after, ports, replace_after, Names, Output};
use support::{Cluster, Running, Timing};

const WAIT: Duration = Duration::from_secs(10);

/// A running `etcdctl watch ARGS` against `endpoint`, its stdin open for `watch -i`.
fn watch(endpoint: &str, args: &[&str]) -> Running {
    let all: Vec<&str> = ["watch"].iter().chain(args).copied().collect();
    Running::spawn(endpoint, &all, None)
}

/// Wait until `n` lines of `w`'s output start with `prefix`.
fn wait_prefixed(w: &Running, prefix: &str, n: usize) {
    w.wait_lines(n, &format!("starting {prefix:?}"), |l| {
        l.starts_with(prefix)
    });
}

/// One server's run of the script: its outputs, raw, and its revisions' names.
struct Script<'a> {
    endpoint: &'a str,
    /// The revisions the script's writes made, `r1`, `r2`, … in order.
    names: Names,
    log: Vec<(String, String)>,
}

impl Script<'_> {
    /// Run an etcdctl command that writes, `-w json`: its revision gets the next name.
    fn write(&mut self, args: &[&str], stdin: Option<&str>) -> i64 {
        let json: Vec<&str> = args.iter().chain(&["-w", "json"]).copied().collect();
        let text = support::etcdctl_ok(self.endpoint, 5, &json, stdin.unwrap_or(""));
        let rev = number_after(&text, "\"revision\":").unwrap_or_else(|| panic!("{text}"));
        self.names.name(&rev.to_string());
        rev
    }

    fn put(&mut self, key: &str, value: &str) -> i64 {
        self.write(&["put", key, value], None)
    }

    fn record(&mut self, what: &str, r: Output) {
        self.log.push((what.to_string(), r.shown()));
    }

    /// Make sure watchers without `--rev` are in place: write `key` until each shows it,
    /// then a last write to know where their output for the script starts, then delete
    /// the key (so that its version is the same on both servers). Returns where each
    /// watcher's output for the script starts.
    fn in_place(&mut self, key: &str, watchers: &[&Running]) -> Vec<usize> {
        let there = support::retry(WAIT, Duration::ZERO, || {
            etcdctl_run(self.endpoint, 5, &["put", key, "is-it-there"], "");
            let shown =
                support::wait_until(Duration::from_millis(500), Duration::from_millis(5), || {
                    watchers
                        .iter()
                        .all(|w| w.stdout().lines().any(|l| l == "is-it-there"))
                });
            if shown {
                Ok(())
            } else {
                Err(())
            }
        });
        assert!(there.is_ok(), "watchers not in place");
        etcdctl_run(self.endpoint, 5, &["put", key, "in-place"], "");
        let cut = watchers
            .iter()
            .map(|w| {
                w.wait_line("in-place", 1);
                let out = w.stdout();
                let at = out.find("\nin-place\n").unwrap();
                at + "\nin-place\n".len()
            })
            .collect();
        self.write(&["del", key], None);
        cut
    }
}

/// Header ids hidden; every revision named by the write that made it (0 and negative
/// numbers are kept).
fn normalize(text: &str, names: &Names) -> String {
    let ids = hide_header_ids(text, false);
    let mut name = |r: &str| {
        let n: i64 = r.parse().unwrap();
        if n <= 0 {
            return r.to_string();
        }
        names.get(r).unwrap_or(format!("<unnamed {r}>"))
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
        &mut name,
    )
}

/// The script, against one server: (what, normalized output).
fn transcript(c: &Cluster) -> Vec<(String, String)> {
    let e = c.endpoints[0].as_str();
    let mut s = Script {
        endpoint: e,
        names: Names::new("r"),
        log: Vec::new(),
    };
    s.put("other", "before");

    // Watchers from now on.
    let plain = watch(e, &["foo"]);
    let prev = watch(e, &["--prev-kv", "foo"]);
    let range = watch(e, &["foo", "fop"]);
    let prefix = watch(e, &["--prefix", "p/"]);
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
        w.wait_line("end", n);
        let what = w.what.clone();
        let mut r = w.finish(false);
        r.stdout = r.stdout[cut..].to_string();
        s.record(&what, r);
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
        let w = watch(e, args);
        let last = if args.contains(&"p/") { "p/end" } else { "end" };
        if args.contains(&"json") {
            // One line per response; wait for the last key's.
            let b64 = if last == "end" { "ZW5k" } else { "cC9lbmQ=" };
            w.wait_for(b64, |out| out.contains(b64));
        } else if args.contains(&"fields") {
            w.wait_line("\"Value\" : \"end\"", 1);
        } else if args.contains(&"--") {
            w.wait_for("|\"end\"|", |out| out.contains("|\"end\"|"));
        } else {
            w.wait_line(if last == "p/end" { "p/end" } else { "end" }, 1);
        }
        let what = w.what.clone();
        let r = w.finish(false);
        s.record(&what, r);
    }

    // Compacted: canceled, and etcdctl says so and exits.
    let compact_to = s.put("foo", "compact-me");
    let r = etcdctl_run(e, 5, &["compact", &compact_to.to_string()], "");
    s.record("etcdctl compact", r);
    let w = watch(e, &["--rev", &rev, "foo"]);
    let what = w.what.clone();
    let r = w.finish(true);
    s.record(&what, r);
    let w = watch(e, &["--rev", &rev, "-w", "json", "foo"]);
    let what = w.what.clone();
    let r = w.finish(true);
    s.record(&what, r);
    // From the compaction's own revision: served.
    let w = watch(e, &["--rev", &compact_to.to_string(), "--prev-kv", "foo"]);
    w.wait_line("compact-me", 1);
    let what = w.what.clone();
    let r = w.finish(false);
    s.record(&what, r);

    // Interactive: watchers on one stream, each known to be in place by `progress`.
    let mut i = watch(e, &["-i"]);
    i.type_line("watch bar");
    i.type_line("progress");
    wait_prefixed(&i, "progress notify:", 1);
    i.type_line("watch --prefix --prev-kv q/");
    i.type_line("progress");
    wait_prefixed(&i, "progress notify:", 3);
    i.type_line("nonsense");
    i.type_line("watch");
    let from = s.put("bar", "1");
    s.put("q/1", "a");
    s.put("q/1", "b");
    s.write(&["del", "q/1"], None);
    s.put("bar", "2");
    s.put("q/end", "end");
    i.wait_line("end", 1);
    i.type_line(&format!("watch --rev {from} bar"));
    i.wait_line("2", 2);
    i.type_line("progress");
    wait_prefixed(&i, "progress notify:", 6);
    let what = i.what.clone();
    let r = i.finish(true);
    s.record(&what, r);

    let names = s.names;
    s.log
        .into_iter()
        .map(|(what, out)| (normalize(&what, &names), normalize(&out, &names)))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcdctl_watch_prints_as_against_etcd() {
    let (etcd, raftkv) = support::start_both(1, ports::ETCDCTL_WATCH, Timing::QUICK).await;
    let (want, got) = support::script_on_both(etcd, raftkv, transcript).await;
    support::show_transcript("SHOW_WATCH_TRANSCRIPT", &want);
    support::assert_same(&want, &got);
}
