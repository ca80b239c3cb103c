//! A hostile client against one real member: requests built to make the member keep
//! unbounded state, do unbounded work or hold absurd values. Each must meet a clear refusal
//! (or a bounded effect), and the member must keep serving afterwards.

mod common;

use bytes::Bytes;
use common::{channel, kv, one_member, Proc};
use server::pb::etcdserverpb::{
    self as pb, lease_client::LeaseClient, maintenance_client::MaintenanceClient,
    watch_client::WatchClient, watch_request::RequestUnion, CompactionRequest, HashKvRequest,
    LeaseGrantRequest, PutRequest, RangeRequest, RequestOp, SnapshotRequest, TxnRequest,
    WatchCreateRequest, WatchRequest,
};
use std::time::{Duration, Instant};
use tonic::Code;

fn b(s: &str) -> Bytes {
    Bytes::copy_from_slice(s.as_bytes())
}

async fn put(url: &str, key: &str, value: Bytes) -> Result<i64, tonic::Status> {
    let req = PutRequest {
        key: b(key),
        value,
        ..Default::default()
    };
    Ok(kv(url)
        .await
        .put(req)
        .await?
        .into_inner()
        .header
        .unwrap()
        .revision)
}

/// A member that starts serving, and the proof (after each attack) that it still does: a
/// write, then a read of it.
async fn serving(url: &str) {
    let deadline = Instant::now() + Duration::from_secs(20);
    let value = format!("{:?}", Instant::now());
    loop {
        if put(url, "alive", b(&value)).await.is_ok() {
            break;
        }
        assert!(Instant::now() < deadline, "the member does not serve");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(common::get(url, "alive").await.unwrap(), Some(b(&value)));
}

async fn start() -> (tempfile::TempDir, Proc, String) {
    let dir = tempfile::tempdir().unwrap();
    let p = one_member(dir.path(), &[]);
    let url = p.client.clone();
    serving(&url).await;
    (dir, p, url)
}

async fn backup_len(url: &str) -> usize {
    let mut s = MaintenanceClient::new(channel(url))
        .snapshot(SnapshotRequest {})
        .await
        .unwrap()
        .into_inner();
    let mut n = 0;
    while let Some(m) = s.message().await.unwrap() {
        n += m.blob.len();
    }
    n
}

fn range_op(key: &str) -> RequestOp {
    RequestOp {
        request: Some(pb::request_op::Request::RequestRange(RangeRequest {
            key: b(key),
            ..Default::default()
        })),
    }
}

/// Session transactions that read a 1 MB value, eight times each, again and again: the
/// member answers them, and the backup (what every raft snapshot and Hash also hold) stays
/// the size of the data.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_reads_of_a_big_value_do_not_grow_the_backup() {
    let (_dir, _p, url) = start().await;
    put(&url, "big", Bytes::from(vec![b'x'; 1 << 20]))
        .await
        .unwrap();
    let lease = LeaseClient::new(channel(&url))
        .lease_grant(LeaseGrantRequest { ttl: 600, id: 0 })
        .await
        .unwrap()
        .into_inner()
        .id;
    let before = backup_len(&url).await;
    for seq in 1..=8u64 {
        let mut req = tonic::Request::new(TxnRequest {
            success: (0..8).map(|_| range_op("big")).collect(),
            ..Default::default()
        });
        let md = req.metadata_mut();
        md.insert("raftkv-session", lease.to_string().parse().unwrap());
        md.insert("raftkv-seq", seq.to_string().parse().unwrap());
        // The first answer carries 8 MB: more than a client takes by default.
        let t = kv(&url)
            .await
            .max_decoding_message_size(64 << 20)
            .txn(req)
            .await
            .unwrap()
            .into_inner();
        // The first answer is whole.
        assert_eq!(t.responses.len(), 8);
    }
    let after = backup_len(&url).await;
    // Padding to 512 bytes and the write of "alive" aside, nothing grew.
    assert!(
        after < before + 4096,
        "the backup grew from {before} to {after} bytes"
    );
    serving(&url).await;
}

fn nested(depth: usize) -> TxnRequest {
    let mut t = TxnRequest {
        success: vec![RequestOp {
            request: Some(pb::request_op::Request::RequestPut(PutRequest {
                key: b("deep"),
                value: b("x"),
                ..Default::default()
            })),
        }],
        ..Default::default()
    };
    for _ in 0..depth {
        t = TxnRequest {
            success: vec![RequestOp {
                request: Some(pb::request_op::Request::RequestTxn(t)),
            }],
            ..Default::default()
        };
    }
    t
}

/// Transactions nested deeper than `MAX_TXN_DEPTH` are refused with raftkv's clear word,
/// and far deeper ones by the decoder; up to the bound they run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deeply_nested_txns_are_refused_clearly() {
    let (_dir, _p, url) = start().await;
    let max = server::services::api::MAX_TXN_DEPTH;
    kv(&url).await.txn(nested(max)).await.unwrap();
    let e = kv(&url).await.txn(nested(max + 1)).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    assert!(e.message().contains("nested too deeply"), "{e:?}");
    for depth in [200, 5000] {
        let e = kv(&url).await.txn(nested(depth)).await.unwrap_err();
        assert_ne!(e.code(), Code::Ok, "{e:?}");
        serving(&url).await;
    }
    // Wide instead of deep: etcd's bound on operations.
    let wide = TxnRequest {
        success: (0..129).map(|i| range_op(&format!("k{i}"))).collect(),
        ..Default::default()
    };
    let e = kv(&url).await.txn(wide).await.unwrap_err();
    assert!(e.message().contains("too many operations"), "{e:?}");
    serving(&url).await;
}

/// Revisions and TTLs at the ends of their types get etcd's errors, not a crash or a hang.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn absurd_revisions_and_ttls_are_refused_clearly() {
    let (_dir, _p, url) = start().await;
    for revision in [i64::MAX, i64::MAX / 2] {
        let e = kv(&url)
            .await
            .range(RangeRequest {
                key: b("alive"),
                revision,
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::OutOfRange, "{e:?}");
        assert!(e.message().contains("future revision"), "{e:?}");
        let e = kv(&url)
            .await
            .compact(CompactionRequest {
                revision,
                physical: false,
            })
            .await
            .unwrap_err();
        assert!(e.message().contains("future revision"), "{e:?}");
        let e = MaintenanceClient::new(channel(&url))
            .hash_kv(HashKvRequest { revision })
            .await
            .unwrap_err();
        assert!(e.message().contains("future revision"), "{e:?}");
    }
    // A negative compaction is below every revision: compacted already.
    let e = kv(&url)
        .await
        .compact(CompactionRequest {
            revision: i64::MIN,
            physical: false,
        })
        .await
        .unwrap_err();
    assert!(e.message().contains("compacted"), "{e:?}");
    for ttl in [i64::MAX, kv::MAX_LEASE_TTL + 1] {
        let e = LeaseClient::new(channel(&url))
            .lease_grant(LeaseGrantRequest { ttl, id: 0 })
            .await
            .unwrap_err();
        assert!(e.message().contains("too large lease TTL"), "{e:?}");
    }
    // A put naming a lease that cannot exist.
    let e = kv(&url)
        .await
        .put(PutRequest {
            key: b("k"),
            lease: i64::MAX,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert!(e.message().contains("lease not found"), "{e:?}");
    serving(&url).await;
}

/// One stream asking for watcher after watcher gets `watchers_per_stream` of them, then
/// clear refusals; the member keeps serving, and the stream's watchers still work.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thousands_of_watch_creates_on_one_stream_are_bounded() {
    let (_dir, _p, url) = start().await;
    let bound = watch::Limits::default().watchers_per_stream;
    let extra = 20;
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    let mut responses = WatchClient::new(channel(&url))
        .watch(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    let sender = tokio::spawn(async move {
        for i in 0..bound + extra {
            let create = WatchRequest {
                request_union: Some(RequestUnion::CreateRequest(WatchCreateRequest {
                    key: Bytes::from(format!("w{i}")),
                    ..Default::default()
                })),
            };
            if tx.send(create).await.is_err() {
                return;
            }
        }
        // Keep the stream open until the test ends.
        std::future::pending::<()>().await;
    });
    let (mut created, mut refused) = (0, 0);
    let deadline = Instant::now() + Duration::from_secs(60);
    while created + refused < bound + extra {
        assert!(
            Instant::now() < deadline,
            "{created} created, {refused} refused"
        );
        let r = responses.message().await.unwrap().unwrap();
        assert!(r.created, "{r:?}");
        if r.canceled {
            assert!(r.cancel_reason.contains("too many watchers"), "{r:?}");
            refused += 1;
        } else {
            created += 1;
        }
    }
    assert_eq!((created, refused), (bound, extra));
    serving(&url).await;
    // The watchers it has still see their keys.
    put(&url, "w7", b("seen")).await.unwrap();
    let r = tokio::time::timeout(Duration::from_secs(10), responses.message())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(r.events[0].kv.as_ref().unwrap().value, b("seen"));
    sender.abort();
}

/// Fields beyond the request limit (etcd's 1.5 MiB), or messages beyond the transport's,
/// are refused before anything is stored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_fields_are_refused() {
    let (_dir, _p, url) = start().await;
    let limit = server::services::api::MAX_REQUEST_BYTES;
    let huge = Bytes::from(vec![b'k'; limit + 1]);
    let e = put(&url, "v", huge.clone()).await.unwrap_err();
    assert!(e.message().contains("request is too large"), "{e:?}");
    let e = kv(&url)
        .await
        .put(PutRequest {
            key: huge.clone(),
            value: b("x"),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert!(e.message().contains("request is too large"), "{e:?}");
    let e = kv(&url)
        .await
        .range(RangeRequest {
            key: huge.clone(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert!(e.message().contains("request is too large"), "{e:?}");
    // Past the transport's own limit (tonic's 4 MiB): refused as it arrives.
    let e = put(&url, "v", Bytes::from(vec![0u8; 5 << 20]))
        .await
        .unwrap_err();
    assert_ne!(e.code(), Code::Ok, "{e:?}");
    assert_eq!(common::get(&url, "v").await.unwrap(), None);
    serving(&url).await;
}
