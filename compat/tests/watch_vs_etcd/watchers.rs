//! Watch scenarios fixed in advance, where how events are grouped into responses is
//! compared too: watchers around a compaction, large responses in fragments, a delete at
//! the compaction's revision.

use crate::requests::*;
use crate::run::{run_actions, watch_on, Action};

/// Compaction and watchers, step by step: a watch from the compaction's revision is
/// served (its first event without prev_kv: etcd reads it at the revision before, which is
/// compacted), one from below is canceled with the compact revision and keeps its id until
/// the client cancels it; odd requests answered as etcd answers them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watchers_around_a_compaction_answer_as_etcds_do() {
    let k = || one("k");
    let from = |start: i64, prev_kv: bool, id: i64| WatchSpec {
        start,
        prev_kv,
        id,
        ..watch_spec(k())
    };
    let compact = |revision| {
        Action::Kv(Req::Compact {
            m: 0,
            revision,
            physical: false,
        })
    };
    // Run::new wrote revision 2 and watches everything from it on stream 0.
    let actions = vec![
        Action::Kv(put("k", "1")), // 3
        Action::Kv(put("k", "2")), // 4
        Action::Kv(put("k", "3")), // 5
        compact(4),
        watch_on(None, from(4, true, 0)),    // stream 1, id 0
        watch_on(Some(1), from(3, true, 0)), // id 1: compacted
        watch_on(Some(1), from(5, true, 7)),
        watch_on(Some(1), from(4, false, 0)), // id 2
        watch_on(Some(1), from(4, false, 1)), // id 1 is still taken
        watch_on(Some(1), from(0, false, 0)), // id 3
        Action::Kv(put("k", "4")),            // 6
        Action::Kv(Req::Delete {
            m: 0,
            span: k(),
            prev_kv: true,
        }), // 7
        Action::Cancel { stream: 1, id: 1 },
        Action::Cancel { stream: 1, id: 1 },
        watch_on(Some(1), from(0, true, 1)), // id 1 free again
        // A key and range end of the same key; an empty key (etcd's "\0").
        watch_on(Some(1), watch_spec(span("k", b"k"))),
        watch_on(Some(1), watch_spec(span("", b""))),
        watch_on(Some(1), from(8, false, 0)),
        Action::Kv(put("k", "5")),    // 8
        Action::Kv(put("\0", "nul")), // 9
        compact(9),
        compact(9),
        compact(20),
        Action::Cancel { stream: 1, id: 99 },
        Action::Kv(put("k", "6")), // 10
        // Negative ids of the client's choosing are ids like others.
        watch_on(Some(1), from(0, false, -5)),
        watch_on(Some(1), from(0, true, -1)),
        Action::Kv(put("k", "7")), // 11
        Action::Cancel { stream: 1, id: -5 },
        Action::Cancel { stream: 1, id: -1 },
    ];
    let c = run_actions(1, &actions)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    println!(
        "{} watchers ({} refused, {} canceled for compaction, {} canceled), {} events",
        c.watchers, c.refused, c.compacted, c.canceled, c.events
    );
}

/// Responses over etcd's limit (its request limit plus gRPC's overhead, 2 MiB) split into
/// fragments for watchers that asked, live and when catching up from history; others get
/// them whole.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_responses_fragment_as_etcds_do() {
    const MIB: usize = 1024 * 1024;
    let big = |c: char, n: usize| c.to_string().repeat(n);
    let prefix = || span("big/", b"big0");
    let w = |prev_kv: bool, fragment: bool| WatchSpec {
        prev_kv,
        fragment,
        ..watch_spec(prefix())
    };
    let actions = vec![
        watch_on(None, w(true, true)),
        watch_on(Some(1), w(true, false)),
        watch_on(Some(1), w(false, true)),
        Action::Kv(put("big/1", &big('a', MIB))), // 3
        Action::Kv(put("big/2", &big('b', MIB))),
        Action::Kv(put("big/3", &big('c', MIB))),
        // Two puts of 700 KiB at one revision; with prev_kv, 3.4 MiB of events.
        Action::Kv(txn(
            vec![],
            vec![
                TOp::Put("big/2".into(), big('d', 700 * 1024), false, 0),
                TOp::Put("big/1".into(), big('e', 700 * 1024), false, 0),
            ],
            vec![],
        )),
        Action::Kv(Req::Delete {
            m: 0,
            span: prefix(),
            prev_kv: false,
        }),
        // Everything again, from history.
        watch_on(
            None,
            WatchSpec {
                start: 3,
                ..w(true, true)
            },
        ),
        watch_on(
            Some(2),
            WatchSpec {
                start: 6,
                ..w(false, true)
            },
        ),
    ];
    let c = run_actions(1, &actions)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    println!("{} watchers, {} events", c.watchers, c.events);
}

/// A delete at the revision a compaction kept: the compaction removes it (the key is gone
/// at that revision), so a watch from there sees no event for it, on both.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delete_at_the_compaction_revision_is_compacted_away() {
    let from = |key: &str, start: i64| WatchSpec {
        start,
        prev_kv: true,
        ..watch_spec(one(key))
    };
    let actions = vec![
        Action::Kv(put("t", "1")), // 3
        Action::Kv(Req::Delete {
            m: 0,
            span: one("t"),
            prev_kv: false,
        }), // 4
        // Physical: etcd answers once its compaction has run.
        Action::Kv(Req::Compact {
            m: 0,
            revision: 4,
            physical: true,
        }),
        watch_on(None, from("t", 4)),
        Action::Kv(put("t", "2")), // 5
    ];
    let c = run_actions(1, &actions)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(c.events, 4 + 1, "the observer's four, the watcher's put");
}
