//! The Lock and Election services on three real `raftkv serve` processes, through the
//! clients generated from etcd's protos: a lock passes from holder to waiter only when the
//! holder's key goes (unlocked, or its lease revoked), in queue order; an election's leader
//! proclaims, resigns and is observed; stale leader keys and abandoned waiters are refused
//! and cleaned up as etcd does. Waiters and holders talk to different members, so each
//! wait also crosses a follower's forwarding and its own watch hub.

mod common;

use bytes::Bytes;
use common::*;
use server::pb::etcdserverpb::{
    kv_client::KvClient, lease_client::LeaseClient, LeaseGrantRequest, LeaseRevokeRequest,
    LeaseTimeToLiveRequest, RangeRequest,
};
use server::pb::v3electionpb::{
    election_client::ElectionClient, CampaignRequest, CampaignResponse, LeaderKey, LeaderRequest,
    LeaderResponse, ProclaimRequest, ResignRequest,
};
use server::pb::v3lockpb::{lock_client::LockClient, LockRequest, LockResponse, UnlockRequest};
use std::time::{Duration, Instant};
use tokio::task::JoinHandle;
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Status};

/// How long a blocked call is given to show it does not return (it would return within
/// milliseconds if it did not wait).
const BLOCKED: Duration = Duration::from_millis(800);
/// How long a call that should return is given.
const WAIT: Duration = Duration::from_secs(10);

fn channel(url: &str) -> Channel {
    Endpoint::from_shared(url.to_string())
        .unwrap()
        .connect_timeout(Duration::from_millis(500))
        .connect_lazy()
}

/// Three members, each answering linearizable reads. Returns their client URLs too.
async fn cluster(dir: &std::path::Path) -> (Vec<Proc>, Vec<String>) {
    let procs = start_flags(dir, &[]);
    put_any(&procs, "ready", "1").await;
    let deadline = Instant::now() + Duration::from_secs(20);
    for p in &procs {
        while get(&p.client, "ready").await.is_err() {
            assert!(Instant::now() < deadline, "{} never answered", p.name);
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    let urls = procs.iter().map(|p| p.client.clone()).collect();
    (procs, urls)
}

async fn grant(url: &str) -> i64 {
    let req = LeaseGrantRequest { ttl: 60, id: 0 };
    let r = LeaseClient::new(channel(url)).lease_grant(req).await;
    r.unwrap().into_inner().id
}

async fn revoke(url: &str, id: i64) {
    let req = LeaseRevokeRequest { id };
    LeaseClient::new(channel(url))
        .lease_revoke(req)
        .await
        .unwrap();
}

/// A key's create revision, if it exists.
async fn created(url: &str, key: &[u8]) -> Option<i64> {
    let req = RangeRequest {
        key: Bytes::copy_from_slice(key),
        ..Default::default()
    };
    let r = KvClient::new(channel(url)).range(req).await.unwrap();
    r.into_inner().kvs.first().map(|kv| kv.create_revision)
}

/// Wait until `key` is gone (a cleanup made after a call ended is not ordered with it).
async fn gone(url: &str, key: &[u8]) {
    let deadline = Instant::now() + WAIT;
    while created(url, key).await.is_some() {
        assert!(
            Instant::now() < deadline,
            "{} is still there",
            String::from_utf8_lossy(key)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn key_of(name: &str, lease: i64) -> Bytes {
    format!("{name}/{lease:x}").into()
}

fn lock_req(name: &str, lease: i64) -> LockRequest {
    LockRequest {
        name: Bytes::copy_from_slice(name.as_bytes()),
        lease,
    }
}

fn spawn_lock(url: &str, name: &str, lease: i64) -> JoinHandle<Result<LockResponse, Status>> {
    let (mut c, req) = (LockClient::new(channel(url)), lock_req(name, lease));
    tokio::spawn(async move { c.lock(req).await.map(|r| r.into_inner()) })
}

fn spawn_campaign(
    url: &str,
    name: &str,
    lease: i64,
    value: &str,
) -> JoinHandle<Result<CampaignResponse, Status>> {
    let mut c = ElectionClient::new(channel(url));
    let req = CampaignRequest {
        name: Bytes::copy_from_slice(name.as_bytes()),
        lease,
        value: Bytes::copy_from_slice(value.as_bytes()),
    };
    tokio::spawn(async move { c.campaign(req).await.map(|r| r.into_inner()) })
}

/// The answer of a call that should have returned by now (or soon).
async fn answered<T>(h: JoinHandle<Result<T, Status>>) -> T {
    tokio::time::timeout(WAIT, h)
        .await
        .expect("the call did not return")
        .unwrap()
        .unwrap()
}

async fn still_blocked<T>(h: &JoinHandle<T>) {
    tokio::time::sleep(BLOCKED).await;
    assert!(!h.is_finished(), "the call returned without waiting");
}

fn assert_unknown<T: std::fmt::Debug>(r: Result<T, Status>, message: &str) {
    let e = r.expect_err(message);
    assert_eq!((e.code(), e.message()), (Code::Unknown, message));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lock_passes_to_the_waiter_only_when_the_holder_unlocks() {
    let dir = tempfile::tempdir().unwrap();
    let (_procs, url) = cluster(dir.path()).await;
    let (a, b) = (grant(&url[0]).await, grant(&url[0]).await);
    let mut l0 = LockClient::new(channel(&url[0]));
    // Uncontended: held at once, by the lease's key under the name.
    let held = l0.lock(lock_req("job", a)).await.unwrap().into_inner();
    assert_eq!(held.key, key_of("job", a));
    let a_rev = created(&url[0], &held.key).await.unwrap();
    assert_eq!(held.header.unwrap().revision, a_rev);
    // Locking again with the holder's lease is the same acquisition.
    let again = l0.lock(lock_req("job", a)).await.unwrap().into_inner();
    assert_eq!(again.key, held.key);

    let waiter = spawn_lock(&url[1], "job", b);
    still_blocked(&waiter).await;
    // The waiter is queued behind the holder.
    let b_rev = created(&url[0], &key_of("job", b)).await.unwrap();
    assert!(b_rev > a_rev);
    let unlocked = l0
        .unlock(UnlockRequest {
            key: held.key.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    let got = answered(waiter).await;
    assert_eq!(got.key, key_of("job", b));
    assert!(got.header.unwrap().revision >= unlocked.header.unwrap().revision);
    assert_eq!(created(&url[2], &got.key).await, Some(b_rev));
    assert_eq!(created(&url[2], &held.key).await, None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waiters_get_the_lock_in_queue_order_and_an_abandoned_waiter_leaves_the_queue() {
    let dir = tempfile::tempdir().unwrap();
    let (_procs, url) = cluster(dir.path()).await;
    let mut leases = Vec::new();
    for _ in 0..4 {
        leases.push(grant(&url[0]).await);
    }
    let mut l0 = LockClient::new(channel(&url[0]));
    let held = l0
        .lock(lock_req("q", leases[0]))
        .await
        .unwrap()
        .into_inner();
    // Two waiters, on two members; the client of the second one queued goes away.
    let first = spawn_lock(&url[1], "q", leases[1]);
    still_blocked(&first).await;
    let quitter = spawn_lock(&url[2], "q", leases[2]);
    still_blocked(&quitter).await;
    quitter.abort();
    gone(&url[0], &key_of("q", leases[2])).await;
    let last = spawn_lock(&url[2], "q", leases[3]);
    still_blocked(&last).await;
    // Each unlock passes the lock to the next in line, and to no one else.
    l0.unlock(UnlockRequest { key: held.key }).await.unwrap();
    let got = answered(first).await;
    assert_eq!(got.key, key_of("q", leases[1]));
    still_blocked(&last).await;
    l0.unlock(UnlockRequest { key: got.key }).await.unwrap();
    assert_eq!(answered(last).await.key, key_of("q", leases[3]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_lease_releases_its_lock_and_a_missing_one_takes_none() {
    let dir = tempfile::tempdir().unwrap();
    let (_procs, url) = cluster(dir.path()).await;
    let (a, b, c) = (
        grant(&url[0]).await,
        grant(&url[0]).await,
        grant(&url[0]).await,
    );
    let mut l0 = LockClient::new(channel(&url[0]));
    let held = l0.lock(lock_req("res", a)).await.unwrap().into_inner();
    let waiter = spawn_lock(&url[1], "res", b);
    still_blocked(&waiter).await;
    let doomed = spawn_lock(&url[2], "res", c);
    still_blocked(&doomed).await;
    // The holder's lease ends: its key goes with it, and the next waiter holds the lock.
    revoke(&url[2], a).await;
    let got = answered(waiter).await;
    assert_eq!(got.key, key_of("res", b));
    assert_eq!(created(&url[0], &held.key).await, None);
    // A waiter whose own lease ends meanwhile is told so when its turn comes.
    revoke(&url[0], c).await;
    still_blocked(&doomed).await;
    l0.unlock(UnlockRequest { key: got.key }).await.unwrap();
    let r = tokio::time::timeout(WAIT, doomed).await.unwrap().unwrap();
    assert_unknown(r, "mutex: session is expired");
    // A lease that does not exist holds nothing.
    let r = l0.lock(lock_req("res", a)).await;
    assert_unknown(r, "etcdserver: requested lease not found");
    assert_eq!(created(&url[0], &key_of("res", a)).await, None);
    // No lease at all: the lock takes a lease of its own, of a minute, as etcd's does.
    let own = l0.lock(lock_req("solo", 0)).await.unwrap().into_inner();
    let req = RangeRequest {
        key: own.key.clone(),
        ..Default::default()
    };
    let kv = KvClient::new(channel(&url[1])).range(req).await.unwrap();
    let lease = kv.into_inner().kvs[0].lease;
    assert_eq!(own.key, key_of("solo", lease));
    let req = LeaseTimeToLiveRequest {
        id: lease,
        keys: false,
    };
    let ttl = LeaseClient::new(channel(&url[1]))
        .lease_time_to_live(req)
        .await;
    assert_eq!(ttl.unwrap().into_inner().granted_ttl, 60);
}

fn leader_req(name: &str) -> LeaderRequest {
    LeaderRequest {
        name: Bytes::copy_from_slice(name.as_bytes()),
    }
}

async fn leader(c: &mut ElectionClient<Channel>, name: &str) -> LeaderResponse {
    c.leader(leader_req(name)).await.unwrap().into_inner()
}

fn proclaim(leader: &LeaderKey, value: &str) -> ProclaimRequest {
    ProclaimRequest {
        leader: Some(leader.clone()),
        value: Bytes::copy_from_slice(value.as_bytes()),
    }
}

/// The next (key, value) an Observe stream sends.
async fn next(s: &mut tonic::Streaming<LeaderResponse>) -> (Bytes, Bytes) {
    let r = tokio::time::timeout(WAIT, s.message())
        .await
        .expect("nothing observed")
        .unwrap()
        .expect("the stream ended");
    let kv = r.kv.unwrap();
    (kv.key, kv.value)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_election_leader_proclaims_resigns_and_is_observed() {
    let dir = tempfile::tempdir().unwrap();
    let (_procs, url) = cluster(dir.path()).await;
    let (a, b, c, d) = (
        grant(&url[0]).await,
        grant(&url[0]).await,
        grant(&url[0]).await,
        grant(&url[0]).await,
    );
    let mut e0 = ElectionClient::new(channel(&url[0]));
    assert_unknown(e0.leader(leader_req("vote")).await, "election: no leader");
    // Observing an election with no leader yet waits for one. (etcd answers the call only
    // with the first leader, hence a task; it is given time to find no leader.)
    let mut e1 = ElectionClient::new(channel(&url[1]));
    let early = tokio::spawn(async move { e1.observe(leader_req("vote")).await });
    tokio::time::sleep(BLOCKED).await;
    let first = answered(spawn_campaign(&url[0], "vote", a, "a1")).await;
    let la = first.leader.unwrap();
    assert_eq!(
        (la.name.as_ref(), &la.key, la.lease),
        (&b"vote"[..], &key_of("vote", a), a)
    );
    assert_eq!(created(&url[0], &la.key).await, Some(la.rev));
    let mut early = answered(early).await.into_inner();
    assert_eq!(next(&mut early).await, (la.key.clone(), "a1".into()));
    let l = leader(&mut e0, "vote").await.kv.unwrap();
    assert_eq!(
        (&l.key, l.value.as_ref(), l.create_revision),
        (&la.key, &b"a1"[..], la.rev)
    );

    let second = spawn_campaign(&url[1], "vote", b, "b1");
    still_blocked(&second).await;
    // The leader's new value is what Leader answers and Observe sends next.
    e0.proclaim(proclaim(&la, "a2")).await.unwrap();
    assert_eq!(leader(&mut e0, "vote").await.kv.unwrap().value, "a2");
    assert_eq!(next(&mut early).await, (la.key.clone(), "a2".into()));
    // A leader key with another create revision does not lead.
    let stale = LeaderKey {
        rev: la.rev + 1,
        ..la.clone()
    };
    assert_unknown(
        e0.proclaim(proclaim(&stale, "x")).await,
        "election: not leader",
    );
    let no_key = ProclaimRequest {
        leader: None,
        value: "x".into(),
    };
    assert_unknown(
        e0.proclaim(no_key).await,
        "\"leader\" field must be provided",
    );
    // A campaigner that gives up (its deadline passes) leaves the queue.
    let mut quitter = ElectionClient::new(channel(&url[2]));
    let mut req = tonic::Request::new(CampaignRequest {
        name: "vote".into(),
        lease: c,
        value: "c1".into(),
    });
    req.set_timeout(BLOCKED);
    assert!(quitter.campaign(req).await.is_err());
    gone(&url[0], &key_of("vote", c)).await;
    let third = spawn_campaign(&url[2], "vote", d, "d1");

    // Resigning hands over to the next campaigner, in queue order.
    e0.resign(ResignRequest {
        leader: Some(la.clone()),
    })
    .await
    .unwrap();
    let lb = answered(second).await.leader.unwrap();
    assert_eq!(lb.key, key_of("vote", b));
    assert!(lb.rev > la.rev);
    assert_eq!(next(&mut early).await, (lb.key.clone(), "b1".into()));
    assert_eq!(leader(&mut e0, "vote").await.kv.unwrap().value, "b1");
    // The old leader key speaks for no one, and resigning with it changes nothing.
    assert_unknown(
        e0.proclaim(proclaim(&la, "a3")).await,
        "election: not leader",
    );
    e0.resign(ResignRequest { leader: Some(la) }).await.unwrap();
    assert_eq!(leader(&mut e0, "vote").await.kv.unwrap().value, "b1");
    // Campaigning again with the leader's lease is the same campaign, with a new value.
    let again = answered(spawn_campaign(&url[0], "vote", b, "b2")).await;
    assert_eq!(again.leader.unwrap().rev, lb.rev);
    assert_eq!(next(&mut early).await, (lb.key.clone(), "b2".into()));
    // A late observer starts from the current leader.
    let mut late = e0.observe(leader_req("vote")).await.unwrap().into_inner();
    assert_eq!(next(&mut late).await, (lb.key.clone(), "b2".into()));
    still_blocked(&third).await;
    // The leader's lease ends: the next campaigner leads, and both observers see it.
    revoke(&url[1], b).await;
    let ld = answered(third).await.leader.unwrap();
    assert_eq!(ld.key, key_of("vote", d));
    for s in [&mut early, &mut late] {
        assert_eq!(next(s).await, (ld.key.clone(), "d1".into()));
    }
}
