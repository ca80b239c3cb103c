//! The cluster changing shape: growing to five and back, learners, etcd's refusals, a
//! removed member, and raftkv's own member commands.

use super::*;

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

/// A member added to a cluster that holds megabytes catches up — from a snapshot, the data
/// being far past `--snapshot-count` — while the cluster keeps taking writes, and no peer
/// stream breaks on the way. Before frames were cut to size, the leader sent a whole
/// flow-control window (32 MiB of snapshot chunks or appends) as one gRPC message, the
/// newcomer refused it as too large, the stream closed, and the transfer started over at
/// the next heartbeat, forever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_added_to_a_cluster_holding_megabytes_catches_up_from_a_snapshot() {
    let dir = tempfile::tempdir().unwrap();
    let (mut ms, _) = found(dir.path(), 3);
    // 24 MiB in 96 values of 256 KiB: a few snapshots' worth, each snapshot ~24 MiB.
    let value = "v".repeat(256 << 10);
    for i in 0..96 {
        put_retrying(&ms, &format!("big/{i:03}"), &value).await;
    }
    let started = Instant::now();
    let id = add_and_start(&mut ms, dir.path(), "n3", true).await;
    let newcomer = ms[3].client.clone();
    // Writes go on while it catches up.
    let mut i = 0;
    let caught_up = loop {
        put_retrying(&ms[..3], &format!("during/{i}"), "x").await;
        i += 1;
        let read = tokio::time::timeout(
            Duration::from_secs(1),
            first_local_read(&newcomer, "big/095"),
        );
        if let Ok(Some(v)) = read.await {
            assert_eq!(v.len(), value.len());
            break started.elapsed();
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "the newcomer never caught up; its log:\n{}",
            std::fs::read_to_string(&ms[3].log).unwrap_or_default()
        );
    };
    promote_when_in_sync(&ms, id).await;
    for m in &ms {
        let log = std::fs::read_to_string(&m.log).unwrap_or_default();
        assert!(
            !log.contains("the stream to the peer ended"),
            "{} lost a peer stream:\n{log}",
            m.name
        );
    }
    eprintln!("24 MiB caught up in {caught_up:?} with {i} writes meanwhile");
}
