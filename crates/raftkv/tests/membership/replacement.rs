//! A dead member replaced as etcd's documentation does it: under a write load, and for
//! every member in turn with the flags the cluster was founded with.

use super::*;

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
