//! Differential testing, the part every such test shares: the same script run against
//! etcd and against raftkv at once, each step's rendered output recorded as a
//! [`Transcript`], and the two transcripts compared step by step, every differing step
//! listed (not only the first), so that one run shows all that raftkv gets wrong.

use super::processes::Cluster;
use std::sync::Arc;

/// What a script saw, step by step: (what it did, what it printed or was answered).
pub type Transcript = Vec<(String, String)>;

/// Run `script` against both clusters at once, each on a thread of its own (scripts wait
/// on processes); both transcripts, etcd's first. A script that fails fails the test with
/// what its cluster's logs say.
pub async fn script_on_both<T: Send + 'static>(
    etcd: Cluster,
    raftkv: Cluster,
    script: fn(&Cluster) -> T,
) -> (T, T) {
    let (etcd, raftkv) = (Arc::new(etcd), Arc::new(raftkv));
    let (e, r) = (etcd.clone(), raftkv.clone());
    let (w, g) = tokio::join!(
        tokio::task::spawn_blocking(move || script(&e)),
        tokio::task::spawn_blocking(move || script(&r))
    );
    // A script that failed: its server's log may say why.
    let failed = |c: &Cluster, e: tokio::task::JoinError| -> ! {
        panic!(
            "against {}: {e:?}\nmembers that exited: {:?}\n{}",
            c.kind.name(),
            c.exited(),
            c.logs()
        )
    };
    let w = w.unwrap_or_else(|e| failed(&etcd, e));
    let g = g.unwrap_or_else(|e| failed(&raftkv, e));
    (w, g)
}

/// Every step at which raftkv's transcript differs from etcd's, etcd's output then
/// raftkv's; and a word if one transcript is longer.
pub fn differences(want: &[(String, String)], got: &[(String, String)]) -> Vec<String> {
    let mut diffs = Vec::new();
    for ((what, w), (_, g)) in want.iter().zip(got) {
        if w != g {
            diffs.push(format!("{what}\n--- etcd:\n{w}\n--- raftkv:\n{g}\n"));
        }
    }
    if want.len() != got.len() {
        diffs.push(format!(
            "etcd's transcript has {} steps, raftkv's {}",
            want.len(),
            got.len()
        ));
    }
    diffs
}

/// Fail, listing every difference, unless raftkv's transcript is etcd's.
pub fn assert_same(want: &[(String, String)], got: &[(String, String)]) {
    let diffs = differences(want, got);
    assert!(
        diffs.is_empty(),
        "raftkv differs from etcd:\n{}",
        diffs.join("\n")
    );
}

/// Print a transcript when the environment variable `var` is set (to read what a test
/// compares, or to write a new step's expectations).
pub fn show_transcript(var: &str, t: &[(String, String)]) {
    if std::env::var_os(var).is_some() {
        for (what, out) in t {
            println!("== {what}\n{out}");
        }
    }
}

/// An etcd-client error as compared: the gRPC code and message (its metadata differs
/// between any two servers).
pub fn grpc_error(e: &etcd_client::Error) -> String {
    match e {
        etcd_client::Error::GRpcStatus(s) => format!("error {:?} {:?}", s.code(), s.message()),
        other => format!("error {other}"),
    }
}
