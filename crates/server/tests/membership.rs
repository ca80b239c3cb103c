//! Members come and go, with real `raftkv serve` processes on real disks, through etcd's
//! Cluster service: replacing a dead member under a write load (etcd's documented flow:
//! remove, add as a learner, start with `existing`, promote), growing 3 → 5 and shrinking
//! back while removing the leader, learners that count for nothing, etcd's refusals, and a
//! removed member that stops for good.

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
    server::bootstrap::fnv(&["test", name])
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_member_is_replaced_under_a_write_load_as_etcds_documentation_does_it() {
    let dir = tempfile::tempdir().unwrap();
    let (mut ms, _) = found(dir.path(), 3);
    put_retrying(&ms, "before", "replacement").await;
    let endpoints = Arc::new(Mutex::new(
        ms[..2].iter().map(|m| m.client.clone()).collect::<Vec<_>>(),
    ));
    let load = start_load(endpoints.clone());
    tokio::time::sleep(Duration::from_millis(300)).await;
    // The machine of n2 dies for good: killed, its disk gone.
    ms[2].kill();
    std::fs::remove_dir_all(&ms[2].data).unwrap();
    remove(&ms, id_of("n2")).await;
    let listed = members(&ms[0].client).await;
    assert_eq!(listed.len(), 2, "{listed:?}");
    // Its replacement joins as a learner, catches up (by snapshot: the log was compacted),
    // and is promoted once in sync.
    let new_id = add_and_start(&mut ms, dir.path(), "n3", true).await;
    promote_when_in_sync(&ms, new_id).await;
    endpoints.lock().unwrap().push(ms[3].client.clone());
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (acked, gap) = load.finish().await;
    eprintln!(
        "replacement: {} writes acknowledged, longest pause {gap:?}",
        acked.len()
    );
    assert!(
        acked.len() > 20,
        "the load made little progress: {}",
        acked.len()
    );
    assert!(gap < Duration::from_secs(2), "the load stopped for {gap:?}");
    let listed = members(&ms[3].client).await;
    let mut names: Vec<(String, bool)> = listed
        .iter()
        .map(|m| (m.name.clone(), m.is_learner))
        .collect();
    names.sort();
    let want = [("n0", false), ("n1", false), ("n3", false)].map(|(n, l)| (n.to_string(), l));
    assert_eq!(names, want);
    // No acknowledged write lost, read linearizably on the newcomer.
    for key in acked.iter().chain([&"before".to_string()]) {
        assert!(
            get(&ms[3].client, key).await.unwrap().is_some(),
            "acknowledged write {key} is missing on the new member"
        );
    }
    // The new member counts: with n1 down, n0 and n3 still make a quorum.
    ms[1].kill();
    put_retrying(&ms, "after", "n1 down").await;
    assert_eq!(
        get(&ms[3].client, "after").await.unwrap(),
        Some(Bytes::from("n1 down"))
    );
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

/// etcd's documented replacement of a dead member, for every member in turn and with the
/// flags the cluster was founded with (same names, same peer URLs): kill, wipe, `member
/// remove`, `member add`, start with `existing`. Each newcomer must join although the
/// members that now run are not the ones its flags name (all were replaced before it), and
/// must not serve a read before it has caught up and published itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_member_replaced_in_turn_with_the_founding_flags_joins_and_serves() {
    let dir = tempfile::tempdir().unwrap();
    let (mut ms, initial) = found(dir.path(), 3);
    put_retrying(&ms, "before", "replacements").await;
    let mut ids: Vec<u64> = ms.iter().map(|m| id_of(&m.name)).collect();
    let endpoints = Arc::new(Mutex::new(
        ms.iter().map(|m| m.client.clone()).collect::<Vec<_>>(),
    ));
    let load = start_load(endpoints.clone());
    for victim in [1, 2, 0] {
        let acked_before = load.acked.lock().unwrap().len();
        ms[victim].kill();
        std::fs::remove_dir_all(&ms[victim].data).unwrap();
        remove(&ms, ids[victim]).await;
        let peer = ms[victim].peer.clone();
        let added = with_any(&ms, "member add", |mut c| {
            let req = pb::MemberAddRequest {
                peer_ur_ls: vec![peer.clone()],
                is_learner: false,
            };
            async move { c.member_add(req).await }
        })
        .await;
        ids[victim] = added.member.unwrap().id;
        ms[victim].start(&initial, "existing");
        // Its first answer already holds what the cluster held before it was added.
        assert_eq!(
            first_local_read(&ms[victim].client, "before").await,
            Some(Bytes::from("replacements")),
            "{} served before it caught up",
            ms[victim].name
        );
        let listed = published(&ms[victim].client).await;
        let mut names: Vec<&str> = listed.iter().map(|m| m.name.as_str()).collect();
        names.sort();
        assert_eq!(names, ["n0", "n1", "n2"], "{listed:?}");
        assert!(listed.iter().any(|m| m.id == ids[victim]), "{listed:?}");
        // The load goes on through the replacement.
        let deadline = Instant::now() + Duration::from_secs(20);
        while load.acked.lock().unwrap().len() < acked_before + 10 {
            assert!(Instant::now() < deadline, "the load stalled");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    let (acked, _) = load.finish().await;
    assert!(acked.len() > 30, "{}", acked.len());
    for m in &ms {
        let log = std::fs::read_to_string(&m.log).unwrap_or_default();
        assert!(
            !log.contains("is not a member of cluster"),
            "{} refused a member:\n{log}",
            m.name
        );
    }
    // No founder is left, and every newcomer counts: with one down, two make a quorum.
    for key in acked.iter().step_by(7) {
        assert!(get(&ms[0].client, key).await.unwrap().is_some(), "{key}");
    }
    let lead = leader_index(&ms).await;
    ms[lead].kill();
    // A follower asked to change the membership while its leader is dead answers in
    // etcd's words (not the transport's), whether or not it noticed the death yet.
    let follower = (0..3).find(|&i| i != lead).unwrap();
    let err = cluster(&ms[follower].client)
        .member_add(pb::MemberAddRequest {
            peer_ur_ls: vec!["http://127.0.0.1:1".into()],
            is_learner: true,
        })
        .await
        .unwrap_err();
    assert!(err.message().starts_with("etcdserver: "), "{err:?}");
    put_retrying(&ms, "after", "one down").await;
    for m in ms.iter().filter(|m| m.running()) {
        assert_eq!(
            get(&m.client, "after").await.unwrap(),
            Some(Bytes::from("one down"))
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_grows_from_three_to_five_and_shrinks_back_removing_its_leader() {
    let dir = tempfile::tempdir().unwrap();
    let (mut ms, _) = found(dir.path(), 3);
    put_retrying(&ms, "k0", "three").await;
    // Voters join directly (no learner step), one at a time.
    add_and_start(&mut ms, dir.path(), "n3", false).await;
    put_retrying(&ms, "k1", "four").await;
    add_and_start(&mut ms, dir.path(), "n4", false).await;
    put_retrying(&ms, "k2", "five").await;
    let listed = members(&ms[4].client).await;
    assert_eq!(listed.len(), 5);
    assert!(listed.iter().all(|m| !m.is_learner));
    // With five voters, two may be down.
    ms[0].kill();
    ms[1].kill();
    put_retrying(&ms, "k3", "two down of five").await;
    let initial: String = (0..3)
        .map(|i| format!("n{i}={}", ms[i].peer))
        .collect::<Vec<_>>()
        .join(",");
    ms[0].start(&initial, "new");
    ms[1].start(&initial, "new");
    // Shrink: the leader goes first, then another member.
    let i = leader_index(&ms).await;
    let lead = leader(&ms).await;
    remove(&ms, lead).await;
    let (code, log) = ms[i]
        .exited(Duration::from_secs(10))
        .expect("the removed leader stops");
    assert_ne!(code, 0);
    assert!(
        log.contains("permanently removed from the cluster"),
        "{log}"
    );
    let next = ms
        .iter()
        .find(|m| m.running() && m.name != ms[i].name)
        .map(|m| m.name.clone())
        .unwrap();
    let next_id = members(&ms.iter().find(|m| m.running()).unwrap().client)
        .await
        .into_iter()
        .find(|m| m.name == next)
        .unwrap()
        .id;
    remove(&ms, next_id).await;
    let j = ms.iter().position(|m| m.name == next).unwrap();
    ms[j]
        .exited(Duration::from_secs(10))
        .expect("the removed member stops");
    put_retrying(&ms, "k4", "three again").await;
    let alive: Vec<&Member> = ms.iter().filter(|m| m.running()).collect();
    assert_eq!(alive.len(), 3);
    for m in &alive {
        assert_eq!(members(&m.client).await.len(), 3, "{}", m.name);
        for (k, v) in [("k0", "three"), ("k2", "five"), ("k3", "two down of five")] {
            assert_eq!(get(&m.client, k).await.unwrap(), Some(Bytes::from(v)));
        }
    }
    // Three voters again: one may be down, not two.
    let mut alive_idx: Vec<usize> = (0..ms.len()).filter(|&i| ms[i].running()).collect();
    ms[alive_idx.pop().unwrap()].kill();
    put_retrying(&ms, "k5", "one down of three").await;
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_learner_far_behind_is_not_promoted_and_learners_count_for_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let (mut ms, _) = found(dir.path(), 3);
    for i in 0..100 {
        put_retrying(&ms, &format!("k{i}"), "v").await;
    }
    // Added but not started: it has none of the log.
    let mut learner = Member::new(dir.path(), "l");
    let peer = learner.peer.clone();
    let added = with_any(&ms, "member add", |mut c| {
        let req = pb::MemberAddRequest {
            peer_ur_ls: vec![peer.clone()],
            is_learner: true,
        };
        async move { c.member_add(req).await }
    })
    .await;
    let id = added.member.as_ref().unwrap().id;
    let err = refusal(&ms[0].client, |mut c| async move {
        c.member_promote(pb::MemberPromoteRequest { id }).await
    })
    .await;
    assert_eq!(
        err.message(),
        "etcdserver: can only promote a learner member which is in sync with leader"
    );
    assert_eq!(err.code(), tonic::Code::FailedPrecondition);
    // A second learner is one too many.
    let other = format!("http://127.0.0.1:{}", free_port());
    let err = refusal(&ms[1].client, |mut c| {
        let req = pb::MemberAddRequest {
            peer_ur_ls: vec![other.clone()],
            is_learner: true,
        };
        async move { c.member_add(req).await }
    })
    .await;
    assert_eq!(
        err.message(),
        "etcdserver: too many learner members in cluster"
    );
    learner.start(&initial_cluster_for(&added, "l"), "existing");
    ms.push(learner);
    // Once in sync it reads like any member (a linearizable read on a learner)…
    let deadline = Instant::now() + Duration::from_secs(20);
    while get(&ms[3].client, "k99").await.ok().flatten().is_none() {
        assert!(Instant::now() < deadline, "the learner never caught up");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut m = MaintenanceClient::new(channel(&ms[3].client));
    let status = m.status(pb::StatusRequest {}).await.unwrap().into_inner();
    assert!(status.is_learner);
    // …but with two of three voters down, the learner makes no quorum: no write commits.
    let lead = leader(&ms).await;
    let mut down = 0;
    for m in ms.iter_mut().take(3) {
        if id_of(&m.name) != lead && down < 2 {
            m.kill();
            down += 1;
        }
    }
    if down < 2 {
        ms[0..3].iter_mut().find(|m| m.running()).unwrap().kill();
    }
    for m in ms.iter().filter(|m| m.running()) {
        let put = tokio::time::timeout(Duration::from_secs(1), put(&m.client, "x", "y")).await;
        assert!(
            !matches!(put, Ok(Ok(()))),
            "a write committed with one voter of three and a learner"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_membership_requests_get_etcds_errors_and_change_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let (ms, _) = found(dir.path(), 3);
    put_retrying(&ms, "k", "v").await;
    let before = published(&ms[0].client).await;
    let mut c = cluster(&ms[1].client);
    let expect = |r: Result<_, tonic::Status>, code: tonic::Code, msg: &str| {
        let e = r.expect_err("refused");
        assert_eq!((e.code(), e.message()), (code, msg), "{e:?}");
    };
    use tonic::Code::{FailedPrecondition, InvalidArgument, NotFound};
    let unknown = 0x1234_5678;
    expect(
        c.member_remove(pb::MemberRemoveRequest { id: unknown })
            .await
            .map(|_| ()),
        NotFound,
        "etcdserver: member not found",
    );
    expect(
        c.member_promote(pb::MemberPromoteRequest { id: unknown })
            .await
            .map(|_| ()),
        NotFound,
        "etcdserver: member not found",
    );
    expect(
        c.member_update(pb::MemberUpdateRequest {
            id: unknown,
            peer_ur_ls: vec!["http://127.0.0.1:1".into()],
        })
        .await
        .map(|_| ()),
        NotFound,
        "etcdserver: member not found",
    );
    expect(
        c.member_promote(pb::MemberPromoteRequest { id: id_of("n0") })
            .await
            .map(|_| ()),
        FailedPrecondition,
        "etcdserver: can only promote a learner member",
    );
    expect(
        c.member_add(pb::MemberAddRequest {
            peer_ur_ls: vec![ms[2].peer.clone()],
            is_learner: false,
        })
        .await
        .map(|_| ()),
        FailedPrecondition,
        "etcdserver: Peer URLs already exists",
    );
    expect(
        c.member_update(pb::MemberUpdateRequest {
            id: id_of("n0"),
            peer_ur_ls: vec![ms[1].peer.clone()],
        })
        .await
        .map(|_| ()),
        FailedPrecondition,
        "etcdserver: Peer URLs already exists",
    );
    for bad in [
        "127.0.0.1:2380",
        "http://",
        "http://host",
        "ftp://h:1",
        "http://h:0",
        "",
    ] {
        expect(
            c.member_add(pb::MemberAddRequest {
                peer_ur_ls: vec![bad.to_string()],
                is_learner: true,
            })
            .await
            .map(|_| ()),
            InvalidArgument,
            "etcdserver: given member URLs are invalid",
        );
    }
    expect(
        c.member_add(pb::MemberAddRequest {
            peer_ur_ls: vec![],
            is_learner: false,
        })
        .await
        .map(|_| ()),
        InvalidArgument,
        "etcdserver: given member URLs are invalid",
    );
    let mut m = MaintenanceClient::new(channel(&ms[leader_index(&ms).await].client));
    expect(
        m.move_leader(pb::MoveLeaderRequest { target_id: unknown })
            .await
            .map(|_| ()),
        FailedPrecondition,
        "etcdserver: bad leader transferee",
    );
    assert_eq!(members(&ms[2].client).await, before, "membership changed");
    // MemberUpdate changes the URLs the others use; the member list shows them.
    let moved = format!("http://127.0.0.1:{}", free_port());
    let updated = c
        .member_update(pb::MemberUpdateRequest {
            id: id_of("n2"),
            peer_ur_ls: vec![moved.clone()],
        })
        .await
        .unwrap()
        .into_inner();
    let n2 = updated.members.iter().find(|m| m.name == "n2").unwrap();
    assert_eq!(n2.peer_ur_ls, vec![moved]);
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_removed_member_stops_for_good_and_strangers_cannot_join() {
    let dir = tempfile::tempdir().unwrap();
    let (mut ms, initial) = found(dir.path(), 3);
    put_retrying(&ms, "k", "v").await;
    // The last voter of a one-member cluster cannot be removed.
    let solo_dir = tempfile::tempdir().unwrap();
    let (solo, _) = found(solo_dir.path(), 1);
    put_retrying(&solo, "k", "v").await;
    let err = refusal(&solo[0].client, |mut c| async move {
        c.member_remove(pb::MemberRemoveRequest { id: id_of("n0") })
            .await
    })
    .await;
    assert_eq!(
        err.message(),
        "etcdserver: re-configuration failed due to not enough started members"
    );
    // A lone member takes a second voter: the change needs the newcomer's acknowledgement to
    // commit, so the leader must reach it before any member has applied the change.
    let mut solo = solo;
    add_and_start(&mut solo, solo_dir.path(), "n1", false).await;
    put_retrying(&solo, "k2", "two voters").await;
    let listed = published(&solo[1].client).await;
    assert_eq!(listed.len(), 2);
    assert!(listed.iter().all(|m| !m.is_learner), "{listed:?}");
    assert_eq!(
        get(&solo[1].client, "k").await.unwrap(),
        Some(Bytes::from("v"))
    );
    // A member started with `existing` that the cluster does not know is refused, plainly.
    let stranger = Member::new(dir.path(), "stranger");
    let with_stranger = format!("{initial},stranger={}", stranger.peer);
    let (code, err) = stranger.run(&with_stranger, "existing");
    assert_ne!(code, 0);
    assert!(err.contains("has no member with peer URLs"), "{err}");
    assert!(err.contains("member add"), "{err}");
    // A removed follower stops, says why, and refuses its data directory afterwards.
    let lead = leader(&ms).await;
    let victim = (0..3).find(|&i| id_of(&ms[i].name) != lead).unwrap();
    remove(&ms, id_of(&ms[victim].name)).await;
    let (code, log) = ms[victim]
        .exited(Duration::from_secs(10))
        .expect("the removed member stops");
    assert_ne!(code, 0);
    assert!(
        log.contains("the member has been permanently removed from the cluster"),
        "{log}"
    );
    let (code, err) = ms[victim].run(&initial, "new");
    assert_ne!(code, 0);
    assert!(err.contains("permanently removed"), "{err}");
    // The others go on.
    put_retrying(&ms, "k2", "v2").await;
    // Another cluster's data directory: `new` with other flags refuses it.
    let (code, err) = ms[victim].run(&initial.replace("n0=", "x0="), "new");
    assert_ne!(code, 0, "{err}");
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raftkvs_own_member_commands_add_list_promote_and_remove() {
    let dir = tempfile::tempdir().unwrap();
    let (ms, _) = found(dir.path(), 3);
    put_retrying(&ms, "k", "v").await;
    let endpoints = format!(
        "--endpoints={}",
        ms.iter()
            .map(|m| m.client.as_str())
            .collect::<Vec<_>>()
            .join(",")
    );
    let e = endpoints.clone();
    tokio::task::spawn_blocking(move || {
        let (ok, out) = raftkv(&[
            "member",
            "add",
            "x",
            "--peer-urls=http://127.0.0.1:31999",
            "--learner",
            &e,
        ]);
        assert!(ok, "{out}");
        assert!(out.contains("added to cluster"), "{out}");
        assert!(out.contains("--initial-cluster-state=existing"), "{out}");
        assert!(out.contains("x=http://127.0.0.1:31999"), "{out}");
        let id = out.split_whitespace().nth(1).unwrap().to_string();
        let (ok, list) = raftkv(&["member", "list", &e]);
        assert!(ok, "{list}");
        let row = list.lines().find(|l| l.starts_with(&id)).expect("listed");
        assert!(row.contains("unstarted") && row.contains("true"), "{row}");
        let (ok, out) = raftkv(&["member", "promote", &id, &e]);
        assert!(!ok && out.contains("in sync with leader"), "{out}");
        let (ok, out) = raftkv(&["member", "remove", &id, &e]);
        assert!(ok && out.contains("removed from cluster"), "{out}");
        let (_, list) = raftkv(&["member", "list", &e]);
        assert_eq!(
            list.lines().count(),
            4,
            "a header and three members: {list}"
        );
        let (ok, out) = raftkv(&["member", "remove", "not-hex", &e]);
        assert!(!ok && out.contains("is not a member id"), "{out}");
    })
    .await
    .unwrap();
}
