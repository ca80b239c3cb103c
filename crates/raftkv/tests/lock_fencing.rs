//! Mutual exclusion through etcd's Lock service on three real `raftkv serve` processes while
//! members are killed (-9), paused (SIGSTOP) and restarted: four clients, each with a lease
//! of its own kept alive through any member, take the lock `fenced` in turn and, holding it,
//! increment a counter with a read and a fenced, exactly-once transaction. Each holder's
//! fencing token is its lock key's create revision; the transaction writes only if no
//! holder with a later token wrote before (`fence <= token`).
//!
//! What must hold at the end: the counter is the number of acknowledged increments (none
//! lost) and its version, like that of a key every fencing transaction puts, shows none ran
//! twice (a doubled run writes the same absolute values, so only versions show it); the
//! increments ordered by the values they wrote are 1..=N with strictly increasing tokens;
//! no two clients were ever between "Lock answered" and "Unlock sent" at the same moment;
//! and no transaction was fenced off (with a lock that excludes and leases kept alive, no
//! holder is ever stale).

mod common;

use bytes::Bytes;
use common::*;
use server::pb::etcdserverpb::{
    compare, kv_client::KvClient, lease_client::LeaseClient, maintenance_client::MaintenanceClient,
    request_op, response_op, Compare, LeaseGrantRequest, LeaseKeepAliveRequest, LeaseRevokeRequest,
    PutRequest, RangeRequest, RequestOp, StatusRequest, TxnRequest, TxnResponse,
};
use server::pb::mvccpb::KeyValue;
use server::pb::v3lockpb::{lock_client::LockClient, LockRequest, UnlockRequest};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Status};

const CLIENTS: usize = 4;
/// Each client's lease TTL, in seconds: well above the longest outage the faults cause
/// (a paused leader plus an election), so a lease kept alive never ends.
const TTL: i64 = 5;
const LOCK: &str = "fenced";
const COUNTER: &str = "counter";
const FENCE: &str = "fence";
/// Every fencing transaction puts this key, on either branch, so its version counts how
/// many times such transactions ran: a retry that ran twice shows even when the fence or
/// the absolute value it writes would hide it.
const RUNS: &str = "txns";
/// A Lock call blocks until held. Long enough to outwait a holder whose lease is left to
/// expire (see `retire`), so that a wait is not given up (and the lease retired) for
/// nothing; a call stuck on a paused member resumes with it anyway.
const LOCK_WAIT: Duration = Duration::from_secs(8);
/// Any other call gets this long on one member before it is tried on the next.
const CALL: Duration = Duration::from_millis(1500);

fn channel(url: &str) -> Channel {
    Endpoint::from_shared(url.to_string())
        .unwrap()
        .connect_timeout(Duration::from_millis(300))
        .connect_lazy()
}

fn b(s: &str) -> Bytes {
    Bytes::copy_from_slice(s.as_bytes())
}

/// A token (or the counter) as the store keeps it: zero-padded to 20 digits, so that the
/// store's byte order on values is numeric order.
fn padded(n: i64) -> Bytes {
    b(&format!("{n:020}"))
}

/// The index in `procs` of the member that leads, once one does.
async fn leader(procs: &[Proc]) -> usize {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        for (i, p) in procs.iter().enumerate().filter(|(_, p)| p.child.is_some()) {
            let mut m = MaintenanceClient::new(channel(&p.client));
            let s = tokio::time::timeout(CALL, m.status(StatusRequest {})).await;
            if let Ok(Ok(s)) = s {
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

/// SIGSTOP or SIGCONT a member.
fn signal(p: &Proc, sig: i32) {
    if let Some(c) = &p.child {
        unsafe {
            libc::kill(c.id() as i32, sig);
        }
    }
}

fn put_op(key: &str, value: Bytes) -> RequestOp {
    RequestOp {
        request: Some(request_op::Request::RequestPut(PutRequest {
            key: b(key),
            value,
            ..Default::default()
        })),
    }
}

fn range_op(key: &[u8]) -> RequestOp {
    RequestOp {
        request: Some(request_op::Request::RequestRange(RangeRequest {
            key: Bytes::copy_from_slice(key),
            ..Default::default()
        })),
    }
}

/// The key-value a transaction's `i`th answer read, if any.
fn read_of(t: &TxnResponse, i: usize) -> Option<KeyValue> {
    match t.responses.get(i)?.response.as_ref()? {
        response_op::Response::ResponseRange(r) => r.kvs.first().cloned(),
        _ => None,
    }
}

fn number(kv: &KeyValue) -> i64 {
    std::str::from_utf8(&kv.value).unwrap().parse().unwrap()
}

/// One keep-alive through a fresh stream: the TTL answered (0: the lease is gone).
async fn keep_alive_once(ch: &Channel, id: i64) -> Result<i64, Status> {
    let req = tokio_stream::iter(vec![LeaseKeepAliveRequest { id }]);
    let mut stream = LeaseClient::new(ch.clone())
        .lease_keep_alive(req)
        .await?
        .into_inner();
    match stream.message().await? {
        Some(r) => Ok(r.ttl),
        None => Err(Status::unavailable("stream ended")),
    }
}

/// One acknowledged fencing transaction.
#[derive(Clone, Debug)]
struct Ack {
    client: usize,
    token: i64,
    /// The counter value the success branch wrote (the one read, plus one).
    wrote: i64,
    succeeded: bool,
}

/// What every client and the checker share.
struct Shared {
    chans: Vec<Channel>,
    stop: AtomicBool,
    /// How many clients are between "Lock answered" and "Unlock sent" right now.
    inside: AtomicUsize,
    overlaps: Mutex<Vec<String>>,
    acks: Mutex<Vec<Ack>>,
    /// Per lease: its last acknowledged keep-alive and the longest gap between two.
    kept: Mutex<HashMap<i64, (Instant, Duration)>>,
    /// Leases reported gone while their client still used them.
    lost_leases: Mutex<Vec<i64>>,
}

impl Shared {
    fn stopped(&self) -> bool {
        self.stop.load(Ordering::Relaxed)
    }

    /// Grant a lease through any member, and start counting its keep-alive gaps.
    async fn grant(&self, from: usize) -> i64 {
        let deadline = Instant::now() + Duration::from_secs(20);
        let mut m = from;
        loop {
            let mut l = LeaseClient::new(self.chans[m].clone());
            let req = LeaseGrantRequest { ttl: TTL, id: 0 };
            if let Ok(Ok(r)) = tokio::time::timeout(CALL, l.lease_grant(req)).await {
                let id = r.into_inner().id;
                self.kept
                    .lock()
                    .unwrap()
                    .insert(id, (Instant::now(), Duration::ZERO));
                return id;
            }
            assert!(Instant::now() < deadline, "no member granted a lease");
            m = (m + 1) % self.chans.len();
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// One client of the lock.
struct Client {
    id: usize,
    shared: Arc<Shared>,
    /// The member calls go to first; moved on whenever one fails.
    member: usize,
    /// The client's lease, which its keeper keeps alive.
    lease: Arc<Mutex<i64>>,
    /// The last sequence number used in the lease's session.
    seq: u64,
    locks: usize,
    retired: usize,
    retried_txns: usize,
    lost_keys: usize,
}

impl Client {
    fn next_member(&mut self) {
        self.member = (self.member + 1) % self.shared.chans.len();
    }

    fn chan(&self) -> Channel {
        self.shared.chans[self.member].clone()
    }

    fn current_lease(&self) -> i64 {
        *self.lease.lock().unwrap()
    }

    /// Leave the lease behind for a new one. Done whenever a Lock or Unlock call failed
    /// without an answer: such a call may still run later (a paused member reads it when it
    /// wakes), and since a lease has one key per lock name, it would act on whatever key
    /// the lease has then — a late Unlock deletes it, a late abandoned Lock's cleanup
    /// deletes it if the retry found the same key again — so the client would hold the lock
    /// by a key that is gone. Under a new lease the new key is another key. The old lease
    /// is revoked (its key goes with it), or, if no member answers, no longer kept alive,
    /// so it ends within a TTL.
    async fn retire(&mut self) {
        self.retired += 1;
        let fresh = self.shared.grant(self.member).await;
        let old = std::mem::replace(&mut *self.lease.lock().unwrap(), fresh);
        self.seq = 0;
        let chans = self.shared.chans.clone();
        tokio::spawn(async move {
            let deadline = Instant::now() + Duration::from_secs(TTL as u64);
            for m in (0..chans.len()).cycle() {
                let mut l = LeaseClient::new(chans[m].clone());
                let r = tokio::time::timeout(CALL, l.lease_revoke(LeaseRevokeRequest { id: old }));
                match r.await {
                    Ok(Ok(_)) => return,
                    Ok(Err(e)) if e.code() == Code::NotFound => return,
                    _ if Instant::now() > deadline => return,
                    _ => tokio::time::sleep(Duration::from_millis(50)).await,
                }
            }
        });
    }

    /// Take the lock: the lock key, or None once the test stops.
    async fn lock(&mut self) -> Option<Bytes> {
        loop {
            if self.shared.stopped() {
                return None;
            }
            let req = LockRequest {
                name: b(LOCK),
                lease: self.current_lease(),
            };
            let mut c = LockClient::new(self.chan());
            let call = tokio::time::timeout(LOCK_WAIT, c.lock(req));
            let shared = self.shared.clone();
            let stop = async move {
                while !shared.stopped() {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            };
            tokio::select! {
                r = call => match r {
                    Ok(Ok(r)) => return Some(r.into_inner().key),
                    _ => {
                        self.next_member();
                        self.retire().await;
                    }
                },
                _ = stop => return None,
            }
        }
    }

    /// `call` (named `what` in failures), made on the current member and retried on the
    /// next one until one answers.
    async fn until_answered<T, F, Fut>(&mut self, what: &str, mut call: F) -> T
    where
        F: FnMut(Channel) -> Fut,
        Fut: std::future::Future<Output = Result<T, Status>>,
    {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            match tokio::time::timeout(CALL, call(self.chan())).await {
                Ok(Ok(t)) => return t,
                // Refusals that no retry changes: the test cannot go on.
                Ok(Err(e))
                    if matches!(
                        e.code(),
                        Code::NotFound | Code::FailedPrecondition | Code::InvalidArgument
                    ) =>
                {
                    panic!("client {}: {what} refused: {e:?}", self.id)
                }
                _ => {}
            }
            assert!(
                Instant::now() < deadline,
                "client {}: no member answered {what}",
                self.id
            );
            self.next_member();
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The critical section: read the counter, the fence and the lock key; then write the
    /// next count if no later holder wrote. Returns false if the lock key was gone.
    async fn increment(&mut self, key: &Bytes) -> bool {
        let reads = TxnRequest {
            compare: vec![],
            success: vec![
                range_op(COUNTER.as_bytes()),
                range_op(FENCE.as_bytes()),
                range_op(key),
            ],
            failure: vec![],
        };
        let r = self
            .until_answered("the reads", |ch| {
                let req = reads.clone();
                async move { Ok(KvClient::new(ch).txn(req).await?.into_inner()) }
            })
            .await;
        let n = number(&read_of(&r, 0).expect("the counter exists"));
        let Some(mine) = read_of(&r, 2) else {
            self.lost_keys += 1;
            return false;
        };
        let token = mine.create_revision;

        // `fence <= token`, as etcd compares only `<`, `=`, `>` and `!=`.
        let fenced = TxnRequest {
            compare: vec![Compare {
                result: compare::CompareResult::Less as i32,
                target: compare::CompareTarget::Value as i32,
                key: b(FENCE),
                target_union: Some(compare::TargetUnion::Value(padded(token + 1))),
                ..Default::default()
            }],
            success: vec![
                put_op(FENCE, padded(token)),
                put_op(COUNTER, b(&(n + 1).to_string())),
                put_op(RUNS, b(&self.id.to_string())),
            ],
            failure: vec![put_op(RUNS, b(&self.id.to_string()))],
        };
        // One number per transaction, the same on every retry: the store runs it once and
        // answers a retry with the first answer.
        self.seq += 1;
        let (lease, seq) = (self.current_lease(), self.seq);
        let mut attempts = 0;
        let t = self
            .until_answered("the fenced txn", |ch| {
                attempts += 1;
                let mut req = tonic::Request::new(fenced.clone());
                let md = req.metadata_mut();
                md.insert("raftkv-session", lease.to_string().parse().unwrap());
                md.insert("raftkv-seq", seq.to_string().parse().unwrap());
                async move { Ok(KvClient::new(ch).txn(req).await?.into_inner()) }
            })
            .await;
        if attempts > 1 {
            self.retried_txns += 1;
        }
        self.shared.acks.lock().unwrap().push(Ack {
            client: self.id,
            token,
            wrote: n + 1,
            succeeded: t.succeeded,
        });
        true
    }

    async fn run(mut self) -> Self {
        while let Some(key) = self.lock().await {
            self.locks += 1;
            let others = self.shared.inside.fetch_add(1, Ordering::SeqCst);
            if others > 0 {
                self.shared.overlaps.lock().unwrap().push(format!(
                    "client {} got the lock ({}) while {others} other client(s) held it",
                    self.id,
                    String::from_utf8_lossy(&key)
                ));
            }
            let held = self.increment(&key).await;
            // Out of the critical section before Unlock is sent: the next holder can only
            // be answered after the unlock is applied.
            self.shared.inside.fetch_sub(1, Ordering::SeqCst);
            if !held {
                self.retire().await;
                continue;
            }
            let mut c = LockClient::new(self.chan());
            let r = tokio::time::timeout(CALL, c.unlock(UnlockRequest { key })).await;
            if !matches!(r, Ok(Ok(_))) {
                self.next_member();
                self.retire().await;
            }
        }
        self
    }
}

/// Keep a client's lease alive every 400 ms through some member, moving on when one fails.
fn keeper(
    shared: Arc<Shared>,
    lease: Arc<Mutex<i64>>,
    first: usize,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut m = first;
        while !shared.stopped() {
            let id = *lease.lock().unwrap();
            let sent = Instant::now();
            for _ in 0..shared.chans.len() {
                let r = tokio::time::timeout(
                    Duration::from_millis(700),
                    keep_alive_once(&shared.chans[m], id),
                );
                match r.await {
                    Ok(Ok(ttl)) if ttl > 0 => {
                        let mut kept = shared.kept.lock().unwrap();
                        let (last, gap) = kept[&id];
                        kept.insert(id, (sent, gap.max(sent - last)));
                        break;
                    }
                    Ok(Ok(_)) => {
                        // Gone: fine for a lease just retired, not for the one in use.
                        if *lease.lock().unwrap() == id {
                            shared.lost_leases.lock().unwrap().push(id);
                        }
                        break;
                    }
                    _ => m = (m + 1) % shared.chans.len(),
                }
            }
            tokio::time::sleep(Duration::from_millis(400)).await;
        }
    })
}

async fn read_kv(chans: &[Channel], key: &str) -> KeyValue {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        for ch in chans {
            let req = RangeRequest {
                key: b(key),
                ..Default::default()
            };
            if let Ok(Ok(r)) =
                tokio::time::timeout(CALL, KvClient::new(ch.clone()).range(req)).await
            {
                return r.into_inner().kvs.into_iter().next().expect(key);
            }
        }
        assert!(Instant::now() < deadline, "no member answered a read");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fenced_increments_under_the_lock_run_once_in_token_order_through_kills_and_pauses() {
    let started = Instant::now();
    let dir = tempfile::tempdir().unwrap();
    let mut procs = start(dir.path());
    leader(&procs).await;
    // A value compare on a missing key is false: the fence starts at zero.
    put_any(&procs, FENCE, &"0".repeat(20)).await;
    put_any(&procs, COUNTER, "0").await;

    let shared = Arc::new(Shared {
        chans: procs.iter().map(|p| channel(&p.client)).collect(),
        stop: AtomicBool::new(false),
        inside: AtomicUsize::new(0),
        overlaps: Mutex::new(Vec::new()),
        acks: Mutex::new(Vec::new()),
        kept: Mutex::new(HashMap::new()),
        lost_leases: Mutex::new(Vec::new()),
    });
    let mut clients = Vec::new();
    let mut keepers = Vec::new();
    for id in 0..CLIENTS {
        let member = id % procs.len();
        let lease = Arc::new(Mutex::new(shared.grant(member).await));
        keepers.push(keeper(shared.clone(), lease.clone(), member));
        let c = Client {
            id,
            shared: shared.clone(),
            member,
            lease,
            seq: 0,
            locks: 0,
            retired: 0,
            retried_txns: 0,
            lost_keys: 0,
        };
        clients.push(tokio::spawn(c.run()));
    }

    // Faults meanwhile: the leader killed and restarted, the leader paused for longer than
    // an election timeout, a follower paused.
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let mut rounds = 0;
    for _ in 0..3 {
        let l = leader(&procs).await;
        procs[l].kill();
        tokio::time::sleep(Duration::from_millis(1000)).await;
        procs[l].spawn();
        tokio::time::sleep(Duration::from_millis(1000)).await;

        let l = leader(&procs).await;
        signal(&procs[l], libc::SIGSTOP);
        tokio::time::sleep(Duration::from_millis(1500)).await;
        signal(&procs[l], libc::SIGCONT);
        tokio::time::sleep(Duration::from_millis(700)).await;

        let f = (leader(&procs).await + 1) % 3;
        signal(&procs[f], libc::SIGSTOP);
        tokio::time::sleep(Duration::from_millis(1000)).await;
        signal(&procs[f], libc::SIGCONT);
        tokio::time::sleep(Duration::from_millis(500)).await;
        rounds += 1;
    }
    tokio::time::sleep(Duration::from_millis(1000)).await;
    shared.stop.store(true, Ordering::Relaxed);
    let mut done = Vec::new();
    for c in clients {
        done.push(c.await.unwrap());
    }
    for k in keepers {
        k.await.unwrap();
    }

    // Whether the test can judge: every lease in use was kept alive all along (else a
    // lease could have ended under its holder, and two holders overlapped for that reason).
    assert!(
        shared.lost_leases.lock().unwrap().is_empty(),
        "leases ended while in use: {:x?}",
        shared.lost_leases.lock().unwrap()
    );
    let now = Instant::now();
    let in_use: Vec<i64> = done.iter().map(|c| c.current_lease()).collect();
    for (id, (last, gap)) in shared.kept.lock().unwrap().iter() {
        let gap = if in_use.contains(id) {
            (*gap).max(now - *last)
        } else {
            *gap
        };
        assert!(
            gap < Duration::from_secs(TTL as u64),
            "lease {id:x} went {gap:?} without an acknowledged keep-alive: the cluster was \
             unavailable too long for the test to judge"
        );
    }

    let acks = shared.acks.lock().unwrap().clone();
    let mut wins: Vec<Ack> = acks.iter().filter(|a| a.succeeded).cloned().collect();
    let fenced = acks.len() - wins.len();
    for c in &done {
        println!(
            "client {}: {} locks, {} increments, {} leases retired, {} txns retried, {} lock \
             keys found gone",
            c.id,
            c.locks,
            wins.iter().filter(|a| a.client == c.id).count(),
            c.retired,
            c.retried_txns,
            c.lost_keys
        );
    }
    println!(
        "{} increments, {fenced} txns fenced off, {rounds} fault rounds, {:?}",
        wins.len(),
        started.elapsed()
    );

    // No two clients were ever inside at once.
    let overlaps = shared.overlaps.lock().unwrap().clone();
    assert!(
        overlaps.is_empty(),
        "the lock was held twice at once: {overlaps:#?}"
    );

    // The store: the counter is the number of acknowledged increments, and each
    // transaction ran once (the initial put is the counter's first version).
    let counter = read_kv(&shared.chans, COUNTER).await;
    assert_eq!(
        number(&counter),
        wins.len() as i64,
        "the counter is not the number of acknowledged increments"
    );
    assert_eq!(
        counter.version,
        wins.len() as i64 + 1,
        "some increment ran twice (or ran unacknowledged)"
    );
    let runs = read_kv(&shared.chans, RUNS).await;
    assert_eq!(
        runs.version,
        acks.len() as i64,
        "some fenced txn ran more (or fewer) times than acknowledged"
    );

    // In the order of the values they wrote, the increments are 1..=N, each by a holder
    // with a later token than the one before: the holders took turns.
    wins.sort_by_key(|a| a.wrote);
    for (i, a) in wins.iter().enumerate() {
        assert_eq!(
            a.wrote,
            i as i64 + 1,
            "counter values repeat or skip: {a:?}"
        );
        if i > 0 {
            assert!(
                a.token > wins[i - 1].token,
                "increment {} by a holder with an earlier token than the one before: {:?} \
                 after {:?}",
                a.wrote,
                a,
                wins[i - 1]
            );
        }
    }
    let fence = read_kv(&shared.chans, FENCE).await;
    assert_eq!(number(&fence), wins.last().map_or(0, |a| a.token));
    // No holder was stale when it wrote: the fence never had to refuse one.
    assert_eq!(fenced, 0, "{fenced} holders wrote after a later holder had");

    // The test judged something: enough increments, by every client, across the faults.
    assert_eq!(rounds, 3);
    assert!(wins.len() >= 20, "only {} increments", wins.len());
    for c in 0..CLIENTS {
        assert!(
            wins.iter().any(|a| a.client == c),
            "client {c} never incremented"
        );
    }
}
