//! Leases and exactly-once sessions on real `raftkv serve` processes: the Lease service on
//! any member (a follower passes keep-alives and time-to-live to the leader), expiry that
//! deletes a lease's keys at one revision, leases kept alive through kill -9, SIGSTOP and
//! restarts of members and never revoked, and session-tagged writes that run once.

mod common;

use bytes::Bytes;
use common::*;
use server::pb::etcdserverpb::{
    lease_client::LeaseClient, maintenance_client::MaintenanceClient, LeaseGrantRequest,
    LeaseKeepAliveRequest, LeaseLeasesRequest, LeaseRevokeRequest, LeaseTimeToLiveRequest,
    PutRequest, RangeRequest, StatusRequest,
};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tonic::transport::{Channel, Endpoint};
use tonic::Code;

fn channel(url: &str) -> Channel {
    Endpoint::from_shared(url.to_string())
        .unwrap()
        .connect_timeout(Duration::from_millis(300))
        .timeout(Duration::from_secs(2))
        .connect_lazy()
}

fn lease(url: &str) -> LeaseClient<Channel> {
    LeaseClient::new(channel(url))
}

fn b(s: &str) -> Bytes {
    Bytes::copy_from_slice(s.as_bytes())
}

/// The members' indexes in `procs` by role, once one leads and all agree.
async fn leader(procs: &[Proc]) -> usize {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        for (i, p) in procs.iter().enumerate().filter(|(_, p)| p.child.is_some()) {
            let mut m = MaintenanceClient::new(channel(&p.client));
            if let Ok(s) = m.status(StatusRequest {}).await {
                let s = s.into_inner();
                if s.leader != 0 && s.leader == s.header.unwrap().member_id {
                    return i;
                }
            }
        }
        assert!(Instant::now() < deadline, "no leader");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn grant_any(procs: &[Proc], ttl: i64) -> i64 {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        for p in procs.iter().filter(|p| p.child.is_some()) {
            let req = LeaseGrantRequest { ttl, id: 0 };
            if let Ok(r) = lease(&p.client).lease_grant(req).await {
                return r.into_inner().id;
            }
        }
        assert!(Instant::now() < deadline, "no member granted a lease");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn put_lease(url: &str, key: &str, id: i64) -> Result<i64, tonic::Status> {
    let req = PutRequest {
        key: b(key),
        value: b("v"),
        lease: id,
        ..Default::default()
    };
    let r = kv(url).await.put(req).await?.into_inner();
    Ok(r.header.unwrap().revision)
}

/// One keep-alive through a fresh stream on `url`: the TTL answered.
async fn keep_alive_once(url: &str, id: i64) -> Result<i64, tonic::Status> {
    let req = tokio_stream::iter(vec![LeaseKeepAliveRequest { id }]);
    let mut stream = lease(url).lease_keep_alive(req).await?.into_inner();
    match stream.message().await? {
        Some(r) => Ok(r.ttl),
        None => Err(tonic::Status::unavailable("stream ended")),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_lease_service_works_on_every_member_and_expiry_deletes_keys_at_one_revision() {
    let dir = tempfile::tempdir().unwrap();
    let procs = start(dir.path());
    let l = leader(&procs).await;
    let f = (l + 1) % 3;
    let (fu, lu) = (procs[f].client.clone(), procs[l].client.clone());

    // Granted through a follower; etcd's minimum TTL applies (1.5 election timeouts of
    // 200 ms, rounded up to a second).
    let g = lease(&fu)
        .lease_grant(LeaseGrantRequest { ttl: 0, id: 0 })
        .await
        .unwrap()
        .into_inner();
    assert!(g.id > 0);
    assert_eq!(g.ttl, 1);
    let chosen = lease(&fu)
        .lease_grant(LeaseGrantRequest { ttl: 30, id: 77 })
        .await
        .unwrap()
        .into_inner();
    assert_eq!((chosen.id, chosen.ttl), (77, 30));
    let again = lease(&lu)
        .lease_grant(LeaseGrantRequest { ttl: 30, id: 77 })
        .await
        .unwrap_err();
    assert_eq!(again.code(), Code::FailedPrecondition);
    assert_eq!(again.message(), "etcdserver: lease already exists");

    // Attached through a follower; a missing lease is refused.
    put_lease(&fu, "a", 77).await.unwrap();
    put_lease(&fu, "b", 77).await.unwrap();
    let missing = put_lease(&fu, "c", 404).await.unwrap_err();
    assert_eq!(missing.code(), Code::NotFound);
    assert_eq!(missing.message(), "etcdserver: requested lease not found");

    // Keep-alive and time-to-live through the follower are the leader's answers.
    assert_eq!(keep_alive_once(&fu, 77).await.unwrap(), 30);
    assert_eq!(keep_alive_once(&fu, 404).await.unwrap(), 0);
    let ttl = lease(&fu)
        .lease_time_to_live(LeaseTimeToLiveRequest { id: 77, keys: true })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(ttl.granted_ttl, 30);
    assert!((28..=30).contains(&ttl.ttl), "{}", ttl.ttl);
    assert_eq!(ttl.keys, vec![b("a"), b("b")]);
    let gone = lease(&fu)
        .lease_time_to_live(LeaseTimeToLiveRequest {
            id: 404,
            keys: false,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(gone.ttl, -1);
    let mut ids: Vec<i64> = lease(&fu)
        .lease_leases(LeaseLeasesRequest {})
        .await
        .unwrap()
        .into_inner()
        .leases
        .iter()
        .map(|l| l.id)
        .collect();
    ids.sort();
    let mut want = vec![g.id, 77];
    want.sort();
    assert_eq!(ids, want);

    // A revoke deletes both keys at one revision.
    let before = put_lease(&lu, "other", 0).await.unwrap();
    let r = lease(&fu)
        .lease_revoke(LeaseRevokeRequest { id: 77 })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.header.unwrap().revision, before + 1);
    for k in ["a", "b"] {
        assert_eq!(get(&lu, k).await.unwrap(), None);
    }

    // Expiry: a 1 s lease with two keys, never kept alive, goes by itself, both keys at
    // one revision.
    let short = grant_any(&procs, 1).await;
    let first = put_lease(&lu, "x", short).await.unwrap();
    put_lease(&lu, "y", short).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while get(&fu, "x").await.unwrap().is_some() || get(&fu, "y").await.unwrap().is_some() {
        assert!(Instant::now() < deadline, "the lease never expired");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let after = kv(&lu)
        .await
        .range(RangeRequest {
            key: b("other"),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .header
        .unwrap()
        .revision;
    // Two puts and one revoke since `first`.
    assert_eq!(after, first + 2);
}

/// SIGSTOP or SIGCONT a member.
fn signal(p: &Proc, sig: i32) {
    if let Some(c) = &p.child {
        unsafe {
            libc::kill(c.id() as i32, sig);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lease_kept_alive_is_never_revoked_through_kills_pauses_and_restarts() {
    const TTL: i64 = 4;
    let dir = tempfile::tempdir().unwrap();
    let mut procs = start(dir.path());
    let urls: Vec<String> = procs.iter().map(|p| p.client.clone()).collect();
    leader(&procs).await;
    let mut kept = Vec::new();
    for i in 0..4 {
        let id = grant_any(&procs, TTL).await;
        put_lease(&urls[i % 3], &format!("kept/{i}"), id)
            .await
            .or(put_lease(&urls[(i + 1) % 3], &format!("kept/{i}"), id).await)
            .unwrap();
        kept.push(id);
    }
    let control = grant_any(&procs, 2).await;
    put_any(&procs, "warmup", "1").await;
    put_lease(&urls[0], "control", control)
        .await
        .or(put_lease(&urls[1], "control", control).await)
        .unwrap();

    // The keeper: every 300 ms each lease is kept alive through some member, moving on
    // when one fails. It records when each lease's last acknowledged keep-alive was sent.
    let stop = Arc::new(AtomicBool::new(false));
    let acked: Arc<Mutex<HashMap<i64, (Instant, Duration)>>> = Arc::new(Mutex::new(
        kept.iter()
            .map(|id| (*id, (Instant::now(), Duration::ZERO)))
            .collect(),
    ));
    let keeper = {
        let (stop, acked, urls, kept) = (stop.clone(), acked.clone(), urls.clone(), kept.clone());
        tokio::spawn(async move {
            let mut next = 0;
            while !stop.load(Ordering::Relaxed) {
                for id in &kept {
                    let sent = Instant::now();
                    for _ in 0..urls.len() {
                        let url = &urls[next % urls.len()];
                        match tokio::time::timeout(
                            Duration::from_millis(700),
                            keep_alive_once(url, *id),
                        )
                        .await
                        {
                            Ok(Ok(ttl)) => {
                                assert_eq!(ttl, TTL, "lease {id:x} reported gone by {url}");
                                let mut a = acked.lock().unwrap();
                                let (last, gap) = a[id];
                                a.insert(*id, (sent, gap.max(sent - last)));
                                break;
                            }
                            _ => next += 1,
                        }
                    }
                }
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
        })
    };

    // Faults for a while: the leader killed and restarted, the leader paused for longer
    // than an election timeout, a follower paused.
    for round in 0..3 {
        let l = leader(&procs).await;
        procs[l].kill();
        tokio::time::sleep(Duration::from_millis(1500)).await;
        procs[l].spawn();
        tokio::time::sleep(Duration::from_millis(1000)).await;

        let l = leader(&procs).await;
        signal(&procs[l], libc::SIGSTOP);
        tokio::time::sleep(Duration::from_millis(1200 + 300 * round)).await;
        signal(&procs[l], libc::SIGCONT);
        tokio::time::sleep(Duration::from_millis(800)).await;

        let f = (leader(&procs).await + 1) % 3;
        signal(&procs[f], libc::SIGSTOP);
        tokio::time::sleep(Duration::from_millis(1000)).await;
        signal(&procs[f], libc::SIGCONT);
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    stop.store(true, Ordering::Relaxed);
    keeper.await.unwrap();

    // The test means something only if each lease was really kept alive: no gap between
    // acknowledged keep-alives reached the TTL.
    for (id, (_, gap)) in acked.lock().unwrap().iter() {
        assert!(
            *gap < Duration::from_secs(TTL as u64),
            "lease {id:x} went {gap:?} without an acknowledged keep-alive: the cluster was \
             unavailable too long for the test to judge"
        );
    }
    let l = leader(&procs).await;
    for (i, id) in kept.iter().enumerate() {
        let t = lease(&urls[l])
            .lease_time_to_live(LeaseTimeToLiveRequest {
                id: *id,
                keys: true,
            })
            .await
            .unwrap()
            .into_inner();
        assert!(t.ttl > 0, "kept lease {id:x} was revoked");
        assert_eq!(t.keys, vec![b(&format!("kept/{i}"))]);
    }
    // The lease nobody kept alive went, and its key with it.
    let c = lease(&urls[l])
        .lease_time_to_live(LeaseTimeToLiveRequest {
            id: control,
            keys: false,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(c.ttl, -1);
    assert_eq!(get(&urls[l], "control").await.unwrap(), None);
}

/// A put tagged with a session and sequence number, as any gRPC client can send it.
async fn put_in_session(
    url: &str,
    key: &str,
    session: Option<(i64, &str)>,
) -> Result<(i64, Option<i64>), tonic::Status> {
    let mut req = tonic::Request::new(PutRequest {
        key: b(key),
        value: b("x"),
        prev_kv: true,
        ..Default::default()
    });
    if let Some((lease, seq)) = session {
        let md = req.metadata_mut();
        md.insert("raftkv-session", lease.to_string().parse().unwrap());
        md.insert("raftkv-seq", seq.parse().unwrap());
    }
    let r = kv(url).await.put(req).await?.into_inner();
    Ok((r.header.unwrap().revision, r.prev_kv.map(|kv| kv.version)))
}

async fn version(url: &str, key: &str) -> i64 {
    let req = RangeRequest {
        key: b(key),
        ..Default::default()
    };
    let r = kv(url).await.range(req).await.unwrap().into_inner();
    r.kvs.first().map_or(0, |kv| kv.version)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_tagged_with_a_session_runs_once_however_often_it_is_retried() {
    let dir = tempfile::tempdir().unwrap();
    let procs = start(dir.path());
    let l = leader(&procs).await;
    let (lu, fu) = (procs[l].client.clone(), procs[(l + 1) % 3].client.clone());
    let s = grant_any(&procs, 60).await;

    // Every put moves the key's version: a put that ran twice would show.
    let first = put_in_session(&lu, "k", Some((s, "1"))).await.unwrap();
    assert_eq!(version(&lu, "k").await, 1);
    // The retry, through another member: the first answer (revision and prev_kv), no run.
    let retry = put_in_session(&fu, "k", Some((s, "1"))).await.unwrap();
    assert_eq!(retry, first);
    assert_eq!(version(&lu, "k").await, 1);
    put_in_session(&fu, "k", Some((s, "2"))).await.unwrap();
    assert_eq!(version(&lu, "k").await, 2);
    let stale = put_in_session(&lu, "k", Some((s, "1"))).await.unwrap_err();
    assert_eq!(stale.code(), Code::FailedPrecondition);
    assert!(stale.message().contains("older than the last applied (2)"));

    // Untagged writes are etcd's: each runs.
    put_in_session(&lu, "k", None).await.unwrap();
    put_in_session(&lu, "k", None).await.unwrap();
    assert_eq!(version(&lu, "k").await, 4);

    // Bad tags are refused before anything runs.
    for (lease, seq) in [(s, "x"), (0, "1")] {
        let e = put_in_session(&lu, "k", Some((lease, seq)))
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    }
    let e = put_in_session(&lu, "k", Some((404, "1")))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound);

    // The session ends with its lease.
    lease(&lu)
        .lease_revoke(LeaseRevokeRequest { id: s })
        .await
        .unwrap();
    let e = put_in_session(&lu, "k", Some((s, "3"))).await.unwrap_err();
    assert_eq!(e.code(), Code::NotFound);
    assert_eq!(version(&lu, "k").await, 4);
}

/// A leader paused (SIGSTOP) while another is elected must not, on waking, renew a lease on
/// its own stale word: the new leader would expire the lease a TTL after its own last
/// renewal, while the client counts from the stale one. The keep-alive is sent to the
/// paused leader just before it resumes, so it is among the first things it reads; whoever
/// answers it, the lease must then live a TTL from the moment it was sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_leader_does_not_renew_a_lease_on_its_own_stale_word() {
    const TTL: u64 = 3;
    let dir = tempfile::tempdir().unwrap();
    let procs = start(dir.path());
    for round in 0..3 {
        let l = leader(&procs).await;
        let id = grant_any(&procs, TTL as i64).await;
        let key = format!("paused/{round}");
        put_lease(&procs[(l + 1) % 3].client, &key, id)
            .await
            .or(put_lease(&procs[(l + 2) % 3].client, &key, id).await)
            .unwrap();
        // A keep-alive stream to the leader, open before the pause, so that the request
        // sent during it waits in the leader's socket with the peers' messages.
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        tx.send(LeaseKeepAliveRequest { id }).await.unwrap();
        let mut answers = lease(&procs[l].client)
            .lease_keep_alive(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(answers.message().await.unwrap().unwrap().ttl, TTL as i64);
        signal(&procs[l], libc::SIGSTOP);
        // Long enough for the others to elect a leader (timeouts of 200–400 ms).
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let sent = Instant::now();
        tx.send(LeaseKeepAliveRequest { id }).await.unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
        signal(&procs[l], libc::SIGCONT);
        let answer = tokio::time::timeout(Duration::from_secs(3), answers.message()).await;
        let Ok(Ok(Some(answer))) = answer else {
            continue; // refused ("not leader"): nothing was promised
        };
        if answer.ttl == 0 {
            continue;
        }
        // Promised until `sent` + TTL: the lease and its key must be there until then.
        let until = sent + Duration::from_secs(TTL) - Duration::from_millis(300);
        while Instant::now() < until {
            let other = &procs[(l + 1) % 3].client;
            let t = lease(other)
                .lease_time_to_live(LeaseTimeToLiveRequest { id, keys: false })
                .await;
            if let Ok(t) = t {
                assert!(
                    t.into_inner().ttl != -1,
                    "round {round}: lease {id:x} revoked {:?} after a renewal promised {TTL} s",
                    sent.elapsed()
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}
