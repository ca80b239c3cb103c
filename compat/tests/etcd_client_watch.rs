//! raftkv's Watch through the `etcd-client` crate's watch API, on a three-member cluster:
//! watchers with options on one stream, events, cancel, request_progress (raftkv answers
//! once every watcher of the stream has caught up, as etcd does since 3.4.31, so the
//! answer's revision covers every event before it), watches from history on followers,
//! compaction, refusals, and WithRequireLeader. `RAFTKV_BIN` names the raftkv binary.

mod support;

use etcd_client::{
    Client, ConnectOptions, Error, EventType, GetOptions, WatchFilterType, WatchOptions,
    WatchResponse, WatchStream,
};
use std::time::Duration;
use support::{ports, Kind};

const PORTS: (u16, u16) = ports::ETCD_CLIENT_WATCH;

/// The stream's next response, within five seconds.
async fn next(s: &mut WatchStream) -> WatchResponse {
    tokio::time::timeout(Duration::from_secs(5), s.message())
        .await
        .expect("a watch response within 5 s")
        .expect("the stream is fine")
        .expect("the stream has not ended")
}

/// No response within `ms`.
async fn quiet(s: &mut WatchStream, ms: u64) {
    if let Ok(r) = tokio::time::timeout(Duration::from_millis(ms), s.message()).await {
        panic!("expected nothing, got {r:?}");
    }
}

fn rev(r: &WatchResponse) -> i64 {
    r.header().unwrap().revision()
}

/// (type, key, value, mod revision, prev value) of each event.
fn events(r: &WatchResponse) -> Vec<(EventType, String, String, i64, Option<String>)> {
    r.events()
        .iter()
        .map(|e| {
            let kv = e.kv().unwrap();
            (
                e.event_type(),
                kv.key_str().unwrap().to_string(),
                kv.value_str().unwrap().to_string(),
                kv.mod_revision(),
                e.prev_kv().map(|p| p.value_str().unwrap().to_string()),
            )
        })
        .collect()
}

fn s(x: &str) -> String {
    x.to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_cancel_and_progress_through_the_etcd_client_crate() {
    let c = support::start(Kind::Raftkv, 3, PORTS).await;
    let mut client = c.client(1).await;
    // A prefix with prev_kv: created first, with the current revision; ids from 0.
    let now = client.put("other", "x", None).await.unwrap();
    let now = now.header().unwrap().revision();
    let mut w = client
        .watch(
            "app/",
            Some(WatchOptions::new().with_prefix().with_prev_key()),
        )
        .await
        .unwrap();
    let created = next(&mut w).await;
    assert!(created.created() && !created.canceled());
    assert_eq!((created.watch_id(), rev(&created)), (0, now));
    // A second watcher on the same stream: a chosen id, deletes filtered out.
    w.watch(
        "app/a",
        Some(
            WatchOptions::new()
                .with_watch_id(7)
                .with_filters([WatchFilterType::NoDelete]),
        ),
    )
    .await
    .unwrap();
    let created = next(&mut w).await;
    assert!(created.created());
    assert_eq!(created.watch_id(), 7);

    let p1 = client.put("app/a", "1", None).await.unwrap();
    let r1 = p1.header().unwrap().revision();
    client.put("app/a", "2", None).await.unwrap();
    client.put("app/b", "3", None).await.unwrap();
    let del = client.delete("app/a", None).await.unwrap();
    let last = del.header().unwrap().revision();
    // Each watcher's events, a revision per response (they are synced).
    let mut got: Vec<(i64, Vec<_>)> = Vec::new();
    let mut raw = Vec::new();
    while got.iter().map(|(_, e)| e.len()).sum::<usize>() < 6 {
        let r = next(&mut w).await;
        assert!(!r.created() && !r.canceled(), "{r:?}");
        assert!(rev(&r) >= r.events().last().unwrap().kv().unwrap().mod_revision());
        got.push((r.watch_id(), events(&r)));
        raw.push(r);
    }
    let of = |id: i64| -> Vec<_> {
        got.iter()
            .filter(|(w, _)| *w == id)
            .flat_map(|(_, e)| e.clone())
            .collect()
    };
    use EventType::{Delete, Put};
    assert_eq!(
        of(0),
        vec![
            (Put, s("app/a"), s("1"), r1, None),
            (Put, s("app/a"), s("2"), r1 + 1, Some(s("1"))),
            (Put, s("app/b"), s("3"), r1 + 2, None),
            (Delete, s("app/a"), s(""), last, Some(s("2"))),
        ]
    );
    assert_eq!(
        of(7),
        vec![
            (Put, s("app/a"), s("1"), r1, None),
            (Put, s("app/a"), s("2"), r1 + 1, None),
        ]
    );
    // A delete event carries the key and its revision only.
    let d = raw
        .iter()
        .flat_map(|r| r.events())
        .find(|e| e.event_type() == Delete)
        .unwrap()
        .kv()
        .unwrap();
    assert_eq!(
        (
            d.key(),
            d.mod_revision(),
            d.create_revision(),
            d.version(),
            d.value(),
            d.lease()
        ),
        (&b"app/a"[..], last, 0, 0, &b""[..], 0)
    );

    // Progress: watch id -1, no events, a revision at or past every event sent.
    w.request_progress().await.unwrap();
    let p = next(&mut w).await;
    assert_eq!(p.watch_id(), -1, "{p:?}");
    assert!(!p.created() && !p.canceled() && p.events().is_empty());
    assert!(rev(&p) >= last, "progress at {} before {last}", rev(&p));

    // A duplicate id is refused.
    w.watch("x", Some(WatchOptions::new().with_watch_id(7)))
        .await
        .unwrap();
    let r = next(&mut w).await;
    assert!(r.created() && r.canceled() && r.watch_id() == -1, "{r:?}");
    assert_eq!(
        r.cancel_reason(),
        "mvcc: duplicate watch ID provided on the WatchStream"
    );
    // Cancel: answered; an unknown id is not.
    w.cancel(7).await.unwrap();
    let r = next(&mut w).await;
    assert!(r.canceled() && r.watch_id() == 7, "{r:?}");
    w.cancel(7).await.unwrap();
    w.cancel(12345).await.unwrap();
    quiet(&mut w, 300).await;
    // A range that ends before it starts is refused.
    w.watch("m", Some(WatchOptions::new().with_range("a")))
        .await
        .unwrap();
    let r = next(&mut w).await;
    assert!(r.created() && r.canceled() && r.watch_id() == -1, "{r:?}");
    assert_eq!(r.cancel_reason(), "mvcc: watcher range is empty");
    // An automatic id skips the taken ones: 0 is; 7 is free again but 1 comes first.
    w.watch("x", None).await.unwrap();
    let r = next(&mut w).await;
    assert_eq!((r.created(), r.watch_id()), (true, 1));

    // A stream whose watchers are all gone gets no progress answer: the next response is
    // the next create's.
    w.cancel(0).await.unwrap();
    w.cancel(1).await.unwrap();
    assert!(next(&mut w).await.canceled());
    assert!(next(&mut w).await.canceled());
    w.request_progress().await.unwrap();
    w.watch("x", None).await.unwrap();
    let r = next(&mut w).await;
    assert!(r.created(), "{r:?}");

    // From history, on another member, with prev_kv: the same events again.
    let mut other = c.client(2).await;
    let mut h = other
        .watch(
            "app/",
            Some(
                WatchOptions::new()
                    .with_prefix()
                    .with_prev_key()
                    .with_start_revision(r1),
            ),
        )
        .await
        .unwrap();
    assert!(next(&mut h).await.created());
    let mut replay = Vec::new();
    while replay.len() < 4 {
        let r = next(&mut h).await;
        replay.extend(events(&r));
    }
    assert_eq!(replay, of(0));

    // Compaction: a watch from below it is created, then canceled with the compact
    // revision; one from the compaction's revision is served.
    let last = client.put("app/c", "4", None).await.unwrap();
    let last = last.header().unwrap().revision();
    client.compact(r1 + 1, None).await.unwrap();
    let mut old = other
        .watch(
            "app/",
            Some(WatchOptions::new().with_prefix().with_start_revision(r1)),
        )
        .await
        .unwrap();
    assert!(next(&mut old).await.created());
    let r = next(&mut old).await;
    assert!(r.canceled() && r.watch_id() == 0, "{r:?}");
    assert_eq!((r.compact_revision(), r.cancel_reason()), (r1 + 1, ""));
    old.watch(
        "app/",
        Some(
            WatchOptions::new()
                .with_prefix()
                .with_start_revision(r1 + 1),
        ),
    )
    .await
    .unwrap();
    let r = next(&mut old).await;
    assert_eq!((r.created(), r.watch_id()), (true, 1));
    let mut served = Vec::new();
    while served.last().is_none_or(|e: &(_, _, _, i64, _)| e.3 < last) {
        served.extend(events(&next(&mut old).await));
    }
    assert_eq!(served[0].3, r1 + 1);
}

/// Progress answers wait for the stream's watchers to catch up: requested right after a
/// watch from far back, it comes after every event up to its revision.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn progress_comes_after_the_history_a_watcher_catches_up() {
    let c = support::start(Kind::Raftkv, 3, PORTS).await;
    let client = c.client(0).await;
    let first = client
        .clone()
        .put("h/0", "0", None)
        .await
        .unwrap()
        .header()
        .unwrap()
        .revision();
    // More revisions than one catch-up response carries (etcd's 1000).
    let writers: Vec<_> = (0..8)
        .map(|t| {
            let mut c = client.clone();
            tokio::spawn(async move {
                for i in 0..200 {
                    c.put(format!("h/{t}/{i}"), "v", None).await.unwrap();
                }
            })
        })
        .collect();
    for w in writers {
        w.await.unwrap();
    }
    // On a member that has applied every write, so that the answer must cover them all.
    let mut member = c.client(1).await;
    let last = first + 1600;
    while member
        .get("h/0", Some(GetOptions::new().with_serializable()))
        .await
        .unwrap()
        .header()
        .unwrap()
        .revision()
        < last
    {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let mut w = member
        .watch(
            "h/",
            Some(WatchOptions::new().with_prefix().with_start_revision(first)),
        )
        .await
        .unwrap();
    w.request_progress().await.unwrap();
    let mut seen = 0;
    let mut top = 0;
    let progress = loop {
        let r = next(&mut w).await;
        if r.created() {
            continue;
        }
        if r.watch_id() == -1 {
            break r;
        }
        seen += r.events().len();
        top = r.events().last().unwrap().kv().unwrap().mod_revision();
    };
    assert_eq!(rev(&progress), last);
    assert_eq!(
        (seen, top),
        (1601, last),
        "every event before the progress answer"
    );
    // Writes keep coming: the answer still covers what came before it.
    let mut writer = client.clone();
    let busy = tokio::spawn(async move {
        for i in 0..200 {
            writer.put(format!("h/late/{i}"), "v", None).await.unwrap();
        }
    });
    for _ in 0..5 {
        w.request_progress().await.unwrap();
        let mut top = 0;
        let p = loop {
            let r = next(&mut w).await;
            if r.watch_id() == -1 {
                break r;
            }
            top = r.events().last().unwrap().kv().unwrap().mod_revision();
        };
        assert!(rev(&p) >= top, "progress {} before event {top}", rev(&p));
    }
    busy.await.unwrap();
}

/// WithRequireLeader: the watch is served while there is a leader, and its stream ends
/// with etcd's "no leader" once the member has had none for a while; a new one is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_require_leader_watch_ends_without_a_leader() {
    let mut c = support::start(Kind::Raftkv, 3, PORTS).await;
    let opts = || Some(ConnectOptions::new().with_require_leader(true));
    let mut client = Client::connect([&c.endpoints[0]], opts()).await.unwrap();
    let mut w = client.watch("k", None).await.unwrap();
    assert!(next(&mut w).await.created());
    client.put("k", "1", None).await.unwrap();
    assert_eq!(next(&mut w).await.events().len(), 1);
    c.kill(1);
    c.kill(2);
    // Three election timeouts (500 ms here) without a leader, once the member notices.
    let end = tokio::time::timeout(Duration::from_secs(15), async {
        loop {
            match w.message().await {
                Ok(Some(_)) => continue,
                other => return other,
            }
        }
    })
    .await
    .expect("the stream ends within 15 s");
    match end {
        Err(Error::GRpcStatus(s)) => {
            assert_eq!(format!("{:?}", s.code()), "Unavailable", "{s:?}");
            assert_eq!(s.message(), "etcdserver: no leader");
        }
        other => panic!("expected etcd's no-leader error, got {other:?}"),
    }
    let refused = client.watch("k", None).await;
    match refused {
        Err(Error::GRpcStatus(s)) => assert_eq!(s.message(), "etcdserver: no leader"),
        // The refusal may come as the stream's first message instead.
        Ok(mut w) => match w.message().await {
            Err(Error::GRpcStatus(s)) => assert_eq!(s.message(), "etcdserver: no leader"),
            other => panic!("expected etcd's no-leader error, got {other:?}"),
        },
        Err(other) => panic!("expected etcd's no-leader error, got {other}"),
    }
    // Without the requirement, the same member still serves watches (from its state).
    let mut plain = Client::connect([&c.endpoints[0]], None).await.unwrap();
    let mut w = plain
        .watch("k", Some(WatchOptions::new().with_start_revision(1)))
        .await
        .unwrap();
    assert!(next(&mut w).await.created());
    assert_eq!(next(&mut w).await.events().len(), 1);
    let _ = plain
        .get("k", Some(GetOptions::new().with_serializable()))
        .await;
}

/// A watch from now, created right after a write was answered by the same member, starts
/// after that write: its created response's revision is at least the write's, and the
/// write's event does not come.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watch_from_now_starts_after_the_write_just_answered() {
    let c = support::start(Kind::Raftkv, 3, PORTS).await;
    for member in 0..3 {
        let mut client = c.client(member).await;
        let mut w = client.watch("warm-up", None).await.unwrap();
        assert!(next(&mut w).await.created());
        for i in 0..100 {
            let key = format!("now/{member}/{i}");
            let put = client.put(key.clone(), "v", None).await.unwrap();
            let at = put.header().unwrap().revision();
            w.watch(key.clone(), None).await.unwrap();
            let created = next(&mut w).await;
            assert!(created.created(), "{created:?}");
            assert!(
                rev(&created) >= at,
                "member {member}: watch created at {} after a write answered at {at}",
                rev(&created)
            );
            w.cancel(created.watch_id()).await.unwrap();
            let r = next(&mut w).await;
            assert!(r.canceled() && r.events().is_empty(), "{r:?}");
        }
    }
}
