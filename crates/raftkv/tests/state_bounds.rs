//! Real one-member processes: a retried exactly-once write gets its first answer over the
//! quota and under alarms (and raises none); Snapshot and Hash calls are bounded, and a
//! streamed backup restores.

mod common;

use bytes::Bytes;
use common::{channel, kv, one_member};
use server::pb::etcdserverpb::{
    alarm_request::AlarmAction, lease_client::LeaseClient, maintenance_client::MaintenanceClient,
    AlarmRequest, HashKvRequest, HashRequest, LeaseGrantRequest, PutRequest, SnapshotRequest,
};
use std::time::{Duration, Instant};
use tonic::Code;

/// Wait until the member answers a write.
pub async fn ready(url: &str) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let put = PutRequest {
            key: Bytes::from_static(b"ready"),
            ..Default::default()
        };
        if kv(url).await.put(put).await.is_ok() {
            return;
        }
        assert!(Instant::now() < deadline, "the member never served");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

pub async fn grant(url: &str) -> i64 {
    LeaseClient::new(channel(url))
        .lease_grant(LeaseGrantRequest { ttl: 600, id: 0 })
        .await
        .unwrap()
        .into_inner()
        .id
}

/// A put of `size` bytes, in session `lease` with number `seq` (if any): its header revision.
async fn put(
    url: &str,
    key: &str,
    size: usize,
    session: Option<(i64, u64)>,
) -> Result<i64, tonic::Status> {
    let mut req = tonic::Request::new(PutRequest {
        key: Bytes::copy_from_slice(key.as_bytes()),
        value: Bytes::from(vec![b'v'; size]),
        ..Default::default()
    });
    if let Some((lease, seq)) = session {
        let md = req.metadata_mut();
        md.insert("raftkv-session", lease.to_string().parse().unwrap());
        md.insert("raftkv-seq", seq.to_string().parse().unwrap());
    }
    Ok(kv(url)
        .await
        .put(req)
        .await?
        .into_inner()
        .header
        .unwrap()
        .revision)
}

async fn alarms(url: &str) -> Vec<(u64, i32)> {
    let r = MaintenanceClient::new(channel(url))
        .alarm(AlarmRequest {
            action: AlarmAction::Get as i32,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    r.alarms.iter().map(|a| (a.member_id, a.alarm)).collect()
}

/// Defect 5: on one member with a 3000-byte quota, a 2000-byte put in a session passes; its
/// retry (which would pass the quota if it ran again) is answered with the first answer,
/// raises no alarm, and still is once NOSPACE is raised by a genuine write.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retried_session_write_gets_its_first_answer_over_the_quota() {
    let dir = tempfile::tempdir().unwrap();
    let p = one_member(dir.path(), &["--quota-backend-bytes=3000"]);
    let url = p.client.clone();
    ready(&url).await;
    let lease = grant(&url).await;
    let first = put(&url, "k", 2000, Some((lease, 1))).await.unwrap();
    let retry = put(&url, "k", 2000, Some((lease, 1))).await;
    assert_eq!(
        retry.map_err(|e| e.to_string()),
        Ok(first),
        "the retry was not answered as the first run"
    );
    assert_eq!(alarms(&url).await, vec![], "a retry raised an alarm");
    // A new write in the session is over the quota, as any other.
    let e = put(&url, "k2", 2000, Some((lease, 2))).await.unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
    assert!(e.message().contains("database space exceeded"), "{e:?}");
    // NOSPACE is now raised (by that write). Number 2 was refused before it was proposed,
    // so 1 is still the session's last: its retry still gets its answer.
    wait_for_alarm(&url, 1).await;
    let retry = put(&url, "k", 2000, Some((lease, 1))).await;
    assert_eq!(
        retry.map_err(|e| e.to_string()),
        Ok(first),
        "a retry under NOSPACE was refused"
    );
    // The member still serves what frees space.
    kv(&url)
        .await
        .delete_range(server::pb::etcdserverpb::DeleteRangeRequest {
            key: Bytes::from_static(b"k"),
            ..Default::default()
        })
        .await
        .unwrap();
}

async fn wait_for_alarm(url: &str, alarm: i32) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !alarms(url).await.iter().any(|a| a.1 == alarm) {
        assert!(Instant::now() < deadline, "alarm {alarm} never raised");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Defect 5, CORRUPT: a retry of an applied write gets its first answer while every new
/// write is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retried_session_write_gets_its_first_answer_under_corrupt() {
    let dir = tempfile::tempdir().unwrap();
    let p = one_member(dir.path(), &[]);
    let url = p.client.clone();
    ready(&url).await;
    let lease = grant(&url).await;
    let first = put(&url, "k", 10, Some((lease, 1))).await.unwrap();
    let member = kv(&url)
        .await
        .range(server::pb::etcdserverpb::RangeRequest {
            key: Bytes::from_static(b"k"),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .header
        .unwrap()
        .member_id;
    MaintenanceClient::new(channel(&url))
        .alarm(AlarmRequest {
            action: AlarmAction::Activate as i32,
            member_id: member,
            alarm: 2,
        })
        .await
        .unwrap();
    wait_for_alarm(&url, 2).await;
    let retry = put(&url, "k", 10, Some((lease, 1))).await;
    assert_eq!(retry.map_err(|e| e.to_string()), Ok(first));
    let e = put(&url, "k", 10, Some((lease, 2))).await.unwrap_err();
    assert_eq!(e.code(), Code::DataLoss, "{e:?}");
    // The same number with another body is refused, clearly, whatever the alarms.
    let e = put(&url, "k", 11, Some((lease, 1))).await.unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    assert!(e.message().contains("different request"), "{e:?}");
}

/// Defect 7: at most `MAX_SNAPSHOTS` Snapshot calls at once; one more is refused with "too
/// many requests" while they are open (Hash and HashKV, bounded apart, still answer), and
/// served once one ends. A backup streamed chunk by chunk still restores.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshot_calls_beyond_the_bound_are_refused_and_hashes_go_on() {
    let dir = tempfile::tempdir().unwrap();
    let p = one_member(dir.path(), &[]);
    let url = p.client.clone();
    ready(&url).await;
    // Enough that a stream not read holds its copy: more than the queue and the
    // transport's windows take.
    for i in 0..12 {
        put(&url, &format!("big{i}"), 1_000_000, None)
            .await
            .unwrap();
    }
    let bound = server::services::maintenance::MAX_SNAPSHOTS;
    let mut open = Vec::new();
    for _ in 0..bound {
        // Each on a connection of its own, reading one message and no more.
        let mut s = MaintenanceClient::new(channel(&url))
            .snapshot(SnapshotRequest {})
            .await
            .unwrap()
            .into_inner();
        assert!(s.message().await.unwrap().is_some());
        open.push(s);
    }
    let e = MaintenanceClient::new(channel(&url))
        .snapshot(SnapshotRequest {})
        .await
        .map(|_| ())
        .unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
    assert!(e.message().contains("too many requests"), "{e:?}");
    // Clients that stop reading their backups stop no one's Hash, nor the consistency
    // check's HashKV: those have a bound of their own.
    let mut m = MaintenanceClient::new(channel(&url));
    m.hash(HashRequest {}).await.unwrap();
    m.hash_kv(HashKvRequest { revision: 0 }).await.unwrap();
    // The member keeps serving writes meanwhile.
    put(&url, "during", 10, None).await.unwrap();
    // One ends: another is served, whole, and is a backup `raftkv snapshot restore` takes.
    drop(open.pop());
    let deadline = Instant::now() + Duration::from_secs(10);
    let backup = loop {
        match MaintenanceClient::new(channel(&url))
            .snapshot(SnapshotRequest {})
            .await
        {
            Ok(s) => {
                let mut s = s.into_inner();
                let mut out = Vec::new();
                let mut last_remaining = u64::MAX;
                while let Some(m) = s.message().await.unwrap() {
                    out.extend_from_slice(&m.blob);
                    assert!(m.remaining_bytes < last_remaining);
                    last_remaining = m.remaining_bytes;
                }
                assert_eq!(last_remaining, 0);
                break out;
            }
            Err(e) => {
                assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
                assert!(Instant::now() < deadline, "the ended call kept its permit");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    };
    let data = server::services::maintenance::check_backup(&backup).unwrap();
    let (_, store) = server::member::members::decode_snapshot(&data).unwrap();
    let store = kv::Store::restore(&store).unwrap();
    assert!(store.size_bytes() > 12_000_000);
    drop(open);
}
