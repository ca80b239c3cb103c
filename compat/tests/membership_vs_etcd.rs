//! Differential: the same `etcdctl` membership commands against Debian's etcd 3.4 and
//! against raftkv, each a one-member cluster named `a`; their outputs (ids and ports
//! replaced by names) and exit codes must match. Covers member list/add/promote/update/
//! remove and move-leader, the ordinary answers and etcd's refusals.
//!
//! Left out on purpose, where etcd 3.4 behaves in a way raftkv does not copy:
//! - `member list` after `member update` of a learner: etcd 3.4 then shows the learner as a
//!   voter (its update rewrites the member without the flag); raftkv keeps the flag;
//! - `move-leader` to a learner: etcd 3.4 tries and times out ("context deadline exceeded");
//!   raftkv refuses at once with etcd's "bad leader transferee", as for an unknown member.
//!
//! Needs `etcd` (Debian package etcd-server) and `etcdctl` (etcd-client); `.ci/run` installs
//! both. `RAFTKV_BIN` names the raftkv binary.

mod support;

use std::collections::HashMap;
use std::time::Duration;
use support::{error_lines, one_dash_per_column, ports, sort_lists, word_after, words, Cluster};
use support::{Timing, Transcript};

/// A one-member cluster named `a`, with etcd's default timing, as the script sees it.
struct Server {
    endpoint: String,
    client_port: u16,
    peer_port: u16,
}

impl Server {
    fn of(c: &Cluster) -> Server {
        let port = |url: &str| url.rsplit(':').next().unwrap().parse().unwrap();
        Server {
            endpoint: c.endpoints[0].clone(),
            client_port: port(&c.endpoints[0]),
            peer_port: port(c.peer_url(0)),
        }
    }
}

/// etcdctl with a 3 s timeout: its exit code, and its stdout then its `Error:` lines
/// (its retry warnings, JSON log lines, differ in timestamps).
fn etcdctl(endpoint: &str, args: &[&str]) -> (i32, String) {
    let r = support::etcdctl_run(endpoint, 3, args, "");
    (r.code.unwrap_or(-1), r.stdout + &error_lines(&r.stderr))
}

/// Ids (hex, as etcdctl prints them) and this server's ports replaced by names, runs of
/// spaces made one, lines sorted (members are listed in id order, and ids are random).
fn normalize(s: &Server, names: &HashMap<String, &str>, text: &str) -> String {
    let mut out: Vec<String> = text
        .lines()
        .map(|line| {
            // The cluster id is named by position (raftkv's one-member cluster shares its id
            // with its member).
            let line = match line.find(" cluster ") {
                Some(at) => {
                    // etcdctl pads the id to 16 digits with spaces: an id with a leading
                    // zero digit (one run in 16) comes after two spaces.
                    let rest = line[at + " cluster ".len()..].trim_start();
                    let end = rest
                        .find(|c: char| !c.is_ascii_hexdigit())
                        .unwrap_or(rest.len());
                    format!("{} cluster <CLUSTER>{}", &line[..at], &rest[end..])
                }
                None => line.to_string(),
            };
            let mut l = line
                .replace(&s.client_port.to_string(), "<CLIENT-PORT>")
                .replace(&s.peer_port.to_string(), "<PEER-PORT>");
            for (id, name) in names {
                l = l.replace(id.as_str(), name);
            }
            // etcdctl pads ids to 16 hex digits with spaces; ids are random, so is the padding.
            // A table's rules are as wide as its widest id: an id with a leading zero digit
            // (one in 16) makes them a dash shorter. One dash per column.
            let l = one_dash_per_column(&words(&l));
            // `member add` prints the cluster in id order too: sort its items.
            sort_lists(&l, "ETCD_INITIAL_CLUSTER=\"", ",", '"')
        })
        .collect();
    out.sort();
    out.join("\n")
}

/// Run the script against one server; the normalized transcript.
fn transcript(c: &Cluster) -> Transcript {
    let s = &Server::of(c);
    let mut names: HashMap<String, &str> = HashMap::new();
    let e = s.endpoint.as_str();
    let (_, list) = etcdctl(e, &["member", "list"]);
    names.insert(word_after(&list, ""), "<A>");
    let a = word_after(&list, "");
    let mut log = Vec::new();
    // Raw outputs, named at the end (an id is known only once a command printed it).
    let mut run = |_: &HashMap<String, &str>, args: Vec<String>| -> String {
        let argv: Vec<&str> = args.iter().map(String::as_str).collect();
        let (code, out) = etcdctl(e, &argv);
        log.push((args.join(" "), code, out.clone()));
        out
    };
    let v = |x: &[&str]| x.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    run(&names, v(&["member", "list"]));
    let added = run(
        &names,
        v(&[
            "member",
            "add",
            "b",
            "--peer-urls=http://127.0.0.1:31001",
            "--learner",
        ]),
    );
    let b = word_after(&added, "Member ");
    names.insert(b.clone(), "<B>");
    run(&names, v(&["member", "list"]));
    run(&names, v(&["member", "list", "-w", "table"]));
    run(
        &names,
        v(&[
            "member",
            "add",
            "c",
            "--peer-urls=http://127.0.0.1:31002",
            "--learner",
        ]),
    );
    run(&names, v(&["member", "promote", &b]));
    run(&names, v(&["member", "promote", &a]));
    run(&names, v(&["member", "promote", "1234"]));
    run(&names, v(&["member", "remove", "1234"]));
    run(
        &names,
        v(&[
            "member",
            "update",
            "1234",
            "--peer-urls=http://127.0.0.1:31003",
        ]),
    );
    // etcd derives a new member's id from its peer URLs and the time in whole seconds, and
    // within the same second answers a duplicate with "member ID already exist"; a second
    // later, as raftkv always does, with "Peer URLs already exists".
    std::thread::sleep(Duration::from_millis(1100));
    run(
        &names,
        v(&["member", "add", "d", "--peer-urls=http://127.0.0.1:31001"]),
    );
    run(
        &names,
        v(&["member", "update", &b, "--peer-urls=http://127.0.0.1:31004"]),
    );
    run(&names, v(&["move-leader", "1234"]));
    run(&names, v(&["member", "remove", &b]));
    run(&names, v(&["member", "remove", &b]));
    run(&names, v(&["member", "remove", &a]));
    run(&names, v(&["member", "list"]));
    log.into_iter()
        .map(|(args, code, out)| {
            let mut shown = format!("etcdctl {args}");
            for (id, name) in &names {
                shown = shown.replace(id.as_str(), name);
            }
            (
                shown,
                format!("exit {code}\n{}", normalize(s, &names, &out)),
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcdctl_membership_commands_answer_as_etcd_does() {
    let (etcd, raftkv) = support::start_both(1, ports::MEMBERSHIP, Timing::ETCD_DEFAULT).await;
    let (want, got) = support::script_on_both(etcd, raftkv, transcript).await;
    support::show_transcript("SHOW_MEMBERSHIP_TRANSCRIPT", &want);
    support::assert_same(&want, &got);
}
