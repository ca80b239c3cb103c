//! Watch on real `raftkv serve` processes under faults: watchers on every member while the
//! leader is killed with -9 and members restart; each watcher resumes from its last
//! revision + 1 (on another member when its own is down) and what it saw, end to end, is the
//! store's history — every revision once, whole, none missing. Also: WithRequireLeader
//! streams end when their member loses its leader, and periodic progress notifications.

mod common;

use bytes::Bytes;
use common::*;
use server::pb::etcdserverpb::{
    maintenance_client::MaintenanceClient, watch_client::WatchClient, watch_request::RequestUnion,
    DeleteRangeRequest, PutRequest, RangeRequest, StatusRequest, WatchCreateRequest, WatchRequest,
    WatchResponse,
};
use server::pb::mvccpb;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::mpsc;
use tonic::transport::{Channel, Endpoint};
use tonic::Code;

fn channel(url: &str) -> Channel {
    Endpoint::from_shared(url.to_string())
        .unwrap()
        .connect_timeout(Duration::from_millis(500))
        .connect_lazy()
}

/// An event as compared: revision, kind (0 put, 1 delete), key, value.
type Seen = (i64, i32, Bytes, Bytes);

/// Open a watch on `url`; returns the response stream and the request sender (kept alive:
/// the stream lives while it does).
async fn open(
    url: &str,
    create: WatchCreateRequest,
    require_leader: bool,
) -> Result<(tonic::Streaming<WatchResponse>, mpsc::Sender<WatchRequest>), tonic::Status> {
    let (tx, rx) = mpsc::channel(4);
    tx.send(WatchRequest {
        request_union: Some(RequestUnion::CreateRequest(create)),
    })
    .await
    .unwrap();
    let mut req = tonic::Request::new(tokio_stream::wrappers::ReceiverStream::new(rx));
    if require_leader {
        req.metadata_mut()
            .insert("hasleader", "true".parse().unwrap());
    }
    let stream = WatchClient::new(channel(url))
        .watch(req)
        .await?
        .into_inner();
    Ok((stream, tx))
}

fn prefix(p: &str) -> WatchCreateRequest {
    WatchCreateRequest {
        key: Bytes::copy_from_slice(p.as_bytes()),
        range_end: kv::prefix_end(p.as_bytes()),
        ..Default::default()
    }
}

/// A client that watches `w/` from revision 1 and never gives up: when its stream breaks it
/// resumes from the revision after the last one it got, on the next member that answers.
/// Checks as it goes that each response holds whole revisions in increasing order.
async fn resilient_watcher(
    urls: Vec<String>,
    first: usize,
    seen: Arc<Mutex<Vec<Seen>>>,
    resumed: Arc<AtomicUsize>,
) {
    let mut next = 1;
    let mut at = first;
    loop {
        if next > 1 {
            resumed.fetch_add(1, Ordering::Relaxed);
        }
        let url = &urls[at % urls.len()];
        let mut create = prefix("w/");
        create.start_revision = next;
        if let Ok((mut stream, _keep)) = open(url, create, false).await {
            while let Ok(Some(r)) = stream.message().await {
                assert!(!r.canceled, "the watch was canceled: {r:?}");
                let mut got = Vec::new();
                for e in r.events {
                    let kv = e.kv.unwrap();
                    assert!(
                        kv.mod_revision >= next,
                        "revision {} again",
                        kv.mod_revision
                    );
                    got.push((kv.mod_revision, e.r#type, kv.key, kv.value));
                }
                if let Some(last) = got.last() {
                    next = last.0 + 1;
                }
                seen.lock().unwrap().extend(got);
            }
        }
        at += 1;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn status(url: &str) -> Option<server::pb::etcdserverpb::StatusResponse> {
    let mut m = MaintenanceClient::new(channel(url));
    let r = tokio::time::timeout(Duration::from_secs(1), m.status(StatusRequest {})).await;
    r.ok()?.ok().map(|r| r.into_inner())
}

/// The running member that leads, by index.
async fn leader(procs: &[Proc]) -> usize {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let mut ids = Vec::new();
        for (i, p) in procs.iter().enumerate().filter(|(_, p)| p.child.is_some()) {
            if let Some(s) = status(&p.client).await {
                ids.push((i, s.header.unwrap().member_id, s.leader));
            }
        }
        for (i, id, _) in &ids {
            if ids.iter().any(|(_, _, l)| l == id) {
                return *i;
            }
        }
        assert!(Instant::now() < deadline, "no leader");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A write through any member, retried until one takes it.
async fn write(procs: &[Proc], i: u64) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        for p in procs.iter().filter(|p| p.child.is_some()) {
            let mut c = kv(&p.client).await;
            let key = Bytes::from(format!("w/{}", i % 7));
            let ok = if i % 5 == 4 {
                let req = DeleteRangeRequest {
                    key,
                    ..Default::default()
                };
                c.delete_range(req).await.is_ok()
            } else {
                let req = PutRequest {
                    key,
                    value: Bytes::from(i.to_string()),
                    ..Default::default()
                };
                c.put(req).await.is_ok()
            };
            if ok {
                return;
            }
        }
        assert!(Instant::now() < deadline, "no member took write {i}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The store's history of `w/`, from reads at every revision: what each revision changed.
async fn history(url: &str, last: i64) -> Vec<Seen> {
    let mut c = kv(url).await;
    let mut before: BTreeMap<Bytes, Bytes> = BTreeMap::new();
    let mut out = Vec::new();
    for rev in 1..=last {
        let req = RangeRequest {
            key: Bytes::from_static(b"w/"),
            range_end: kv::prefix_end(b"w/"),
            revision: rev,
            ..Default::default()
        };
        let kvs = c.range(req).await.unwrap().into_inner().kvs;
        let now: BTreeMap<Bytes, (Bytes, i64)> = kvs
            .into_iter()
            .map(|kv| (kv.key, (kv.value, kv.mod_revision)))
            .collect();
        for (k, (v, m)) in &now {
            if *m == rev {
                out.push((
                    rev,
                    mvccpb::event::EventType::Put as i32,
                    k.clone(),
                    v.clone(),
                ));
            }
        }
        for k in before.keys().filter(|k| !now.contains_key(*k)) {
            out.push((
                rev,
                mvccpb::event::EventType::Delete as i32,
                k.clone(),
                Bytes::new(),
            ));
        }
        before = now.into_iter().map(|(k, (v, _))| (k, v)).collect();
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watchers_on_every_member_resume_through_kill_9_and_restarts_without_gaps_or_repeats() {
    let dir = tempfile::tempdir().unwrap();
    let mut procs = start(dir.path());
    let urls: Vec<String> = procs.iter().map(|p| p.client.clone()).collect();
    let _ = leader(&procs).await;
    let seen: Vec<Arc<Mutex<Vec<Seen>>>> = (0..3).map(|_| Default::default()).collect();
    let resumed = Arc::new(AtomicUsize::new(0));
    let watchers: Vec<_> = (0..3)
        .map(|i| {
            let w = resilient_watcher(urls.clone(), i, seen[i].clone(), resumed.clone());
            tokio::spawn(w)
        })
        .collect();
    for i in 0..240u64 {
        if i == 60 || i == 150 {
            let l = leader(&procs).await;
            procs[l].kill(); // SIGKILL, with writes and watches in flight
        }
        if i == 100 || i == 190 {
            for p in procs.iter_mut().filter(|p| p.child.is_none()) {
                p.spawn();
            }
        }
        if i == 120 {
            // A follower restarts too.
            let l = leader(&procs).await;
            let f = (l + 1) % 3;
            procs[f].kill();
            procs[f].spawn();
        }
        write(&procs, i).await;
    }
    for p in procs.iter_mut().filter(|p| p.child.is_none()) {
        p.spawn();
    }
    let l = leader(&procs).await;
    let last = status(&procs[l].client)
        .await
        .unwrap()
        .header
        .unwrap()
        .revision;
    let want = history(&procs[l].client, last).await;
    // Every put is a revision (a delete of a missing key is not).
    assert!(
        want.len() >= 192,
        "the writes are in the history: {}",
        want.len()
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    for (i, s) in seen.iter().enumerate() {
        loop {
            let got = s.lock().unwrap().clone();
            if got.last().is_some_and(|e| e.0 >= last) || Instant::now() > deadline {
                // Within a revision the store orders by write order, the reads by key.
                let mut got = got;
                got.sort_by(|a, b| (a.0, &a.2).cmp(&(b.0, &b.2)));
                let mut want = want.clone();
                want.sort_by(|a, b| (a.0, &a.2).cmp(&(b.0, &b.2)));
                assert_eq!(got.len(), want.len(), "watcher {i}: events seen");
                assert_eq!(got, want, "watcher {i}");
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    // The streams on the members killed broke, and their watchers resumed elsewhere.
    assert!(resumed.load(Ordering::Relaxed) >= 2, "resumes: {resumed:?}");
    for w in watchers {
        w.abort();
    }
}

/// A stream that requires a leader ends with etcd's "no leader" once its member has been
/// without one for a few election timeouts; a new one is refused at once. Streams that did
/// not ask keep going.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_that_requires_a_leader_ends_when_its_member_loses_it() {
    let dir = tempfile::tempdir().unwrap();
    let mut procs = start(dir.path());
    let _ = leader(&procs).await;
    put_any(&procs, "k", "v").await;
    let url = procs[0].client.clone();
    let (mut strict, _k1) = open(&url, prefix("k"), true).await.unwrap();
    let (mut lax, _k2) = open(&url, prefix("k"), false).await.unwrap();
    assert!(strict.message().await.unwrap().unwrap().created);
    assert!(lax.message().await.unwrap().unwrap().created);
    procs[1].kill();
    procs[2].kill();
    let started = Instant::now();
    let err = tokio::time::timeout(Duration::from_secs(10), strict.message())
        .await
        .expect("the stream ended")
        .expect_err("with an error");
    assert_eq!(err.code(), Code::Unavailable);
    assert_eq!(err.message(), "etcdserver: no leader");
    // 3 election timeouts of 200 ms, after the member noticed (check quorum).
    assert!(started.elapsed() >= Duration::from_millis(600));
    let refused = match open(&url, prefix("k"), true).await {
        Ok(_) => panic!("a stream requiring a leader opened without one"),
        Err(e) => e,
    };
    assert_eq!(refused.message(), "etcdserver: no leader");
    // The stream that did not ask is still open (nothing to read, no error).
    let pending = tokio::time::timeout(Duration::from_millis(300), lax.message()).await;
    assert!(pending.is_err(), "the lax stream ended: {pending:?}");
}

/// With `--experimental-watch-progress-notify-interval`, a quiet watcher that asked for
/// progress notifications gets them, with its id and the current revision; one that did not
/// ask gets none.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quiet_watchers_that_ask_get_periodic_progress_notifications() {
    let dir = tempfile::tempdir().unwrap();
    let procs = start_flags(
        dir.path(),
        &["--experimental-watch-progress-notify-interval=300ms"],
    );
    let _ = leader(&procs).await;
    put_any(&procs, "p", "1").await;
    let url = procs[1].client.clone();
    // The put is committed, but this member may not have applied it yet: a watch created
    // before it does would start at the revision before and see the put as an event. A
    // linearizable read here waits until it has.
    get(&url, "p").await.unwrap();
    let mut asks = prefix("p");
    asks.progress_notify = true;
    let (mut stream, keep) = open(&url, asks, false).await.unwrap();
    keep.send(WatchRequest {
        request_union: Some(RequestUnion::CreateRequest(prefix("q"))),
    })
    .await
    .unwrap();
    // The first watcher may get a progress notification before the second is created (a
    // tick can fall between them on a loaded machine): take the two creations.
    let mut created = Vec::new();
    while created.len() < 2 {
        let r = stream.message().await.unwrap().unwrap();
        if r.created {
            created.push(r);
        } else {
            assert!(
                r.events.is_empty(),
                "an event before both watchers exist: {r:?}"
            );
        }
    }
    let (a, b) = (&created[0], &created[1]);
    assert!(a.watch_id != b.watch_id);
    let mut notes = 0;
    let deadline = Instant::now() + Duration::from_secs(3);
    while Instant::now() < deadline {
        let Ok(r) = tokio::time::timeout(Duration::from_millis(500), stream.message()).await else {
            continue;
        };
        let r = r.unwrap().unwrap();
        assert!(r.events.is_empty());
        assert_eq!(r.watch_id, a.watch_id, "only the watcher that asked");
        assert!(r.header.unwrap().revision >= 1);
        notes += 1;
    }
    assert!(notes >= 3, "{notes} notifications in 3 s at 300 ms");
}

/// `raftkv watch` prints each change as etcdctl does, from a past revision on, and goes on
/// through the death of the member it watched on (it resumes on the next endpoint).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raftkv_watch_prints_changes_and_resumes_on_another_endpoint() {
    use std::io::{BufRead, BufReader};
    let dir = tempfile::tempdir().unwrap();
    let mut procs = start(dir.path());
    let _ = leader(&procs).await;
    put_any(&procs, "cli", "one").await;
    let endpoints: Vec<String> = procs
        .iter()
        .map(|p| p.client.trim_start_matches("http://").to_string())
        .collect();
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_raftkv"))
        .args(["watch", "cli", "--prev-kv", "--rev", "1"])
        .arg(format!("--endpoints={}", endpoints.join(",")))
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let (tx, mut rx) = mpsc::unbounded_channel();
    let stdout = child.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let mut lines = Vec::new();
    let mut read = |n: usize, lines: &mut Vec<String>| {
        let deadline = Instant::now() + Duration::from_secs(15);
        while lines.len() < n && Instant::now() < deadline {
            match rx.try_recv() {
                Ok(l) => lines.push(l),
                Err(_) => std::thread::sleep(Duration::from_millis(10)),
            }
        }
    };
    read(3, &mut lines);
    assert_eq!(lines, ["PUT", "cli", "one"], "the first put, from history");
    // The first endpoint's member goes; the watch goes on from the next.
    procs[0].kill();
    put_any(&procs, "cli", "two").await;
    read(8, &mut lines);
    let _ = child.kill();
    let _ = child.wait();
    assert_eq!(
        lines[3..],
        ["PUT", "cli", "one", "cli", "two"],
        "the second put with its previous value, once"
    );
}
