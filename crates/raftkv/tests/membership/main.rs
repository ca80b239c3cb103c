//! Members come and go, with real `raftkv serve` processes on real disks, through etcd's
//! Cluster service: replacing a dead member under a write load (etcd's documented flow:
//! remove, add as a learner, start with `existing`, promote), growing 3 → 5 and shrinking
//! back while removing the leader, learners that count for nothing, etcd's refusals, and a
//! removed member that stops for good.
//!
//! This file holds the members and the helpers the tests share; the replacements are in
//! `replacement.rs`, growing, shrinking, learners and refusals in `changes.rs`.

#[path = "../common/mod.rs"]
mod common;

use bytes::Bytes;
use common::{free_port, get, kv};
use server::pb::etcdserverpb as pb;
use server::pb::etcdserverpb::{
    cluster_client::ClusterClient, maintenance_client::MaintenanceClient,
};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tonic::transport::Channel;

struct Member {
    name: String,
    client: String,
    peer: String,
    data: PathBuf,
    log: PathBuf,
    child: Option<Child>,
}

impl Member {
    fn new(dir: &Path, name: &str) -> Member {
        Member {
            name: name.to_string(),
            client: format!("http://127.0.0.1:{}", free_port()),
            peer: format!("http://127.0.0.1:{}", free_port()),
            data: dir.join(name),
            log: dir.join(format!("{name}.log")),
            child: None,
        }
    }

    fn args(&self, initial_cluster: &str, state: &str) -> Vec<String> {
        vec![
            "serve".into(),
            format!("--name={}", self.name),
            format!("--data-dir={}", self.data.display()),
            format!("--listen-client-urls={}", self.client),
            format!("--advertise-client-urls={}", self.client),
            format!("--listen-peer-urls={}", self.peer),
            format!("--initial-advertise-peer-urls={}", self.peer),
            format!("--initial-cluster={initial_cluster}"),
            format!("--initial-cluster-state={state}"),
            "--initial-cluster-token=test".into(),
            "--heartbeat-interval=20".into(),
            "--election-timeout=200".into(),
            "--snapshot-count=50".into(),
        ]
    }

    fn start(&mut self, initial_cluster: &str, state: &str) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_raftkv"))
            .args(self.args(initial_cluster, state))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start raftkv");
        self.child = Some(child);
    }

    /// Run to completion (a start expected to fail): exit code and stderr.
    fn run(&self, initial_cluster: &str, state: &str) -> (i32, String) {
        let out = Command::new(env!("CARGO_BIN_EXE_raftkv"))
            .args(self.args(initial_cluster, state))
            .output()
            .unwrap();
        let code = out.status.code().unwrap_or(-1);
        (code, String::from_utf8_lossy(&out.stderr).into_owned())
    }

    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill(); // SIGKILL
            let _ = c.wait();
        }
    }

    /// Wait for the process to exit on its own; its exit code and log.
    fn exited(&mut self, within: Duration) -> Option<(i32, String)> {
        let deadline = Instant::now() + within;
        let child = self.child.as_mut()?;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = child.try_wait() {
                self.child = None;
                let log = std::fs::read_to_string(&self.log).unwrap_or_default();
                return Some((status.code().unwrap_or(-1), log));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }

    fn running(&self) -> bool {
        self.child.is_some()
    }
}

impl Drop for Member {
    fn drop(&mut self) {
        self.kill();
    }
}

fn id_of(name: &str) -> u64 {
    server::member::bootstrap::fnv(&["test", name])
}

fn channel(url: &str) -> Channel {
    tonic::transport::Endpoint::from_shared(url.to_string())
        .unwrap()
        .timeout(Duration::from_secs(6))
        .connect_lazy()
}

fn cluster(url: &str) -> ClusterClient<Channel> {
    ClusterClient::new(channel(url))
}

/// A founding cluster of `n` members.
fn found(dir: &Path, n: usize) -> (Vec<Member>, String) {
    let mut ms: Vec<Member> = (0..n).map(|i| Member::new(dir, &format!("n{i}"))).collect();
    let initial = ms
        .iter()
        .map(|m| format!("{}={}", m.name, m.peer))
        .collect::<Vec<_>>()
        .join(",");
    for m in &mut ms {
        m.start(&initial, "new");
    }
    (ms, initial)
}

/// The `--initial-cluster` a new member starts with, built from MemberAdd's answer as
/// etcdctl builds it (every member's name=peer URL, the new one under its own name).
fn initial_cluster_for(added: &pb::MemberAddResponse, name: &str) -> String {
    let new_id = added.member.as_ref().unwrap().id;
    added
        .members
        .iter()
        .flat_map(|m| {
            let n = if m.id == new_id {
                name.to_string()
            } else {
                m.name.clone()
            };
            m.peer_ur_ls.iter().map(move |u| format!("{n}={u}"))
        })
        .collect::<Vec<_>>()
        .join(",")
}

/// Ask each running member's Cluster service in turn until one answers (any member takes a
/// membership request: followers pass it to the leader).
async fn with_any<T, F, Fut>(ms: &[Member], what: &str, f: F) -> T
where
    F: Fn(ClusterClient<Channel>) -> Fut,
    Fut: std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
{
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let mut last = None;
        for m in ms.iter().filter(|m| m.running()) {
            match f(cluster(&m.client)).await {
                Ok(r) => return r.into_inner(),
                Err(s) => last = Some(s),
            }
        }
        assert!(Instant::now() < deadline, "{what}: {last:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A request that must be refused: its error, once the member has a leader to ask (an
/// election under the load of the whole suite must not pass for a refusal).
async fn refusal<T, F, Fut>(url: &str, f: F) -> tonic::Status
where
    F: Fn(ClusterClient<Channel>) -> Fut,
    Fut: std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
{
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        match f(cluster(url)).await {
            Ok(_) => panic!("accepted, not refused"),
            Err(s) if s.message() == "etcdserver: no leader" && Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(50)).await
            }
            Err(s) => return s,
        }
    }
}

/// The member list, linearizable (retried while the member has no leader yet).
async fn members(url: &str) -> Vec<pb::Member> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let req = pb::MemberListRequest { linearizable: true };
        match cluster(url).member_list(req).await {
            Ok(r) => return r.into_inner().members,
            Err(s) => assert!(Instant::now() < deadline, "member list: {s:?}"),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The member list once every member in it has published its name and client URLs (a
/// member publishes itself through the log after it starts, so this may take a moment).
async fn published(url: &str) -> Vec<pb::Member> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let l = members(url).await;
        if l.iter()
            .all(|m| !m.name.is_empty() && !m.client_ur_ls.is_empty())
        {
            return l;
        }
        assert!(Instant::now() < deadline, "{l:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn put(url: &str, key: &str, value: &str) -> Result<(), tonic::Status> {
    let req = pb::PutRequest {
        key: Bytes::copy_from_slice(key.as_bytes()),
        value: Bytes::copy_from_slice(value.as_bytes()),
        ..Default::default()
    };
    kv(url).await.put(req).await.map(|_| ())
}

async fn put_retrying(ms: &[Member], key: &str, value: &str) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        for m in ms.iter().filter(|m| m.running()) {
            if put(&m.client, key, value).await.is_ok() {
                return;
            }
        }
        assert!(Instant::now() < deadline, "no member took {key}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn leader(ms: &[Member]) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        for m in ms.iter().filter(|m| m.running()) {
            let mut c = MaintenanceClient::new(channel(&m.client));
            if let Ok(s) = c.status(pb::StatusRequest {}).await {
                let s = s.into_inner();
                if s.leader != 0 && s.leader == s.header.unwrap().member_id {
                    return s.leader;
                }
            }
        }
        assert!(Instant::now() < deadline, "no leader");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Add a member (as a learner or a voter) through any running member and start it with
/// `existing`, as etcd's documentation does it.
async fn add_and_start(ms: &mut Vec<Member>, dir: &Path, name: &str, learner: bool) -> u64 {
    let mut m = Member::new(dir, name);
    let peer = m.peer.clone();
    let added = with_any(ms, "member add", |mut c| {
        let req = pb::MemberAddRequest {
            peer_ur_ls: vec![peer.clone()],
            is_learner: learner,
        };
        async move { c.member_add(req).await }
    })
    .await;
    let id = added.member.as_ref().unwrap().id;
    let listed = added.members.iter().find(|x| x.id == id).unwrap();
    assert_eq!(
        listed.name, "",
        "an added member is unnamed until it starts"
    );
    assert_eq!(listed.is_learner, learner);
    m.start(&initial_cluster_for(&added, name), "existing");
    ms.push(m);
    id
}

/// Promote a learner, retrying while it is refused as not yet in sync.
async fn promote_when_in_sync(ms: &[Member], id: u64) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let m = ms.iter().find(|m| m.running()).unwrap();
        match cluster(&m.client)
            .member_promote(pb::MemberPromoteRequest { id })
            .await
        {
            Ok(_) => return,
            Err(s) => assert!(
                Instant::now() < deadline
                    && (s.message().contains("in sync") || s.code() == tonic::Code::Unavailable),
                "promote: {s:?}"
            ),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Remove a member. An answer lost to a leader change (the leader removing itself steps
/// down as the change commits) is ambiguous, as for any write: a retry that finds the member
/// gone is the change having happened.
async fn remove(ms: &[Member], id: u64) {
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut tried = false;
    loop {
        for m in ms.iter().filter(|m| m.running()) {
            let r = cluster(&m.client)
                .member_remove(pb::MemberRemoveRequest { id })
                .await;
            match r {
                Ok(_) => return,
                Err(s) if tried && s.code() == tonic::Code::NotFound => return,
                Err(s) => {
                    tried = true;
                    assert!(Instant::now() < deadline, "member remove: {s:?}");
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A write load through every running member; records what was acknowledged and the
/// longest time without an acknowledgement.
struct Load {
    acked: Arc<Mutex<Vec<String>>>,
    longest_gap: Arc<Mutex<Duration>>,
    stop: Arc<std::sync::atomic::AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

fn start_load(endpoints: Arc<Mutex<Vec<String>>>) -> Load {
    let acked = Arc::new(Mutex::new(Vec::new()));
    let longest_gap = Arc::new(Mutex::new(Duration::ZERO));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (a, g, s) = (acked.clone(), longest_gap.clone(), stop.clone());
    let task = tokio::spawn(async move {
        let mut last = Instant::now();
        let mut i = 0u64;
        let mut next = 0usize;
        while !s.load(std::sync::atomic::Ordering::SeqCst) {
            let eps = endpoints.lock().unwrap().clone();
            let url = eps[next % eps.len()].clone();
            let key = format!("load{i}");
            let put = tokio::time::timeout(Duration::from_secs(2), put(&url, &key, "v"));
            match put.await {
                Ok(Ok(())) => {
                    a.lock().unwrap().push(key);
                    i += 1;
                    let mut gap = g.lock().unwrap();
                    *gap = (*gap).max(last.elapsed());
                    last = Instant::now();
                }
                // Try the next member; the same key again (a put is idempotent here).
                _ => next += 1,
            }
        }
    });
    Load {
        acked,
        longest_gap,
        stop,
        task,
    }
}

impl Load {
    async fn finish(self) -> (Vec<String>, Duration) {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        self.task.await.unwrap();
        let acked = self.acked.lock().unwrap().clone();
        let gap = *self.longest_gap.lock().unwrap();
        (acked, gap)
    }
}

/// A serializable read of `key` on `url`, retried while the member does not answer (a
/// member serves clients only once it has published itself). The first answer is returned,
/// whatever it holds.
async fn first_local_read(url: &str, key: &str) -> Option<Bytes> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let req = pb::RangeRequest {
            key: Bytes::copy_from_slice(key.as_bytes()),
            serializable: true,
            ..Default::default()
        };
        let read = tokio::time::timeout(Duration::from_secs(1), async {
            kv(url).await.range(req).await
        });
        if let Ok(Ok(r)) = read.await {
            return r.into_inner().kvs.into_iter().next().map(|kv| kv.value);
        }
        assert!(Instant::now() < deadline, "{url} never served a read");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Whether `m` is the member with id `id` (members added later have random ids: ask).
fn lead_of(m: &Member, id: u64) -> bool {
    let rt = tokio::runtime::Handle::current();
    tokio::task::block_in_place(|| {
        rt.block_on(async {
            let mut c = MaintenanceClient::new(channel(&m.client));
            c.status(pb::StatusRequest {})
                .await
                .map(|s| s.into_inner().header.unwrap().member_id == id)
                .unwrap_or(false)
        })
    })
}

async fn leader_index(ms: &[Member]) -> usize {
    let id = leader(ms).await;
    let mut m = None;
    for (i, x) in ms.iter().enumerate() {
        if lead_of(x, id) {
            m = Some(i);
        }
    }
    m.unwrap()
}

fn raftkv(args: &[&str]) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_raftkv"))
        .args(args)
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    (out.status.success(), text)
}

mod changes;
mod replacement;
