//! The wire layer: etcd requests map onto the kv store with etcd's meanings, writes survive
//! the trip through a log entry, raft messages survive the trip between peers, and bad
//! bytes or bad enum values are refused with the right errors, never a panic.

use bytes::Bytes;
use proptest::prelude::*;
use prost::Message as _;
use server::member::command::{self, Write};
use server::network::peer;
use server::pb::etcdserverpb as pb;
use server::services::api;
use tonic::Code;

fn header(rev: i64) -> pb::ResponseHeader {
    pb::ResponseHeader {
        cluster_id: 1,
        member_id: 2,
        revision: rev,
        raft_term: 3,
    }
}

/// A request id with every part set, so a lost part shows.
fn rid(seq: u64) -> driver::RequestId {
    driver::RequestId {
        member: 0xfeed_0000_0000_0001,
        boot: 0x0123_4567_89ab_cdef,
        seq,
    }
}

fn apply(store: &mut kv::Store, data: &Bytes) -> Result<kv::Response, tonic::Status> {
    let (_, req) = command::decode(data).expect("decodes");
    match req? {
        command::Decoded::Kv(r) => store.apply(&r).map_err(|e| api::status(&e)),
        other => panic!("not a kv request: {other:?}"),
    }
}

/// What the store keeps may be a slice of the log entry only where it is most of the
/// entry: a large value is not copied on apply (the log's entry and the store's value are
/// one allocation), while keys and values small beside their entry are copies, which hold
/// no entry in memory once the log lets it go.
#[test]
fn the_store_keeps_a_slice_of_an_entry_only_for_a_value_that_is_most_of_it() {
    use pb::request_op::Request as Op;
    let within = |b: &Bytes, entry: &Bytes| entry.as_ptr_range().contains(&b.as_ptr());
    let put = |key: &'static [u8], size: usize| pb::PutRequest {
        key: Bytes::from_static(key),
        value: Bytes::from(vec![b'v'; size]),
        ..Default::default()
    };
    let entry = command::encode(rid(1), Write::Put(put(b"big", 4096)));
    let Ok(command::Decoded::Kv(kv::Request::Put(p))) = command::decode(&entry).unwrap().1 else {
        panic!("a put decodes as a put")
    };
    assert!(
        within(&p.value, &entry),
        "a large value is the entry's own bytes"
    );
    assert!(!within(&p.key, &entry), "a key is a copy");
    assert_eq!((&p.key[..], p.value.len()), (&b"big"[..], 4096));

    let op = |p| pb::RequestOp {
        request: Some(Op::RequestPut(p)),
    };
    let txn = pb::TxnRequest {
        success: vec![op(put(b"large", 4096)), op(put(b"small", 16))],
        ..Default::default()
    };
    let entry = command::encode(rid(2), Write::Txn(txn));
    let Ok(command::Decoded::Kv(kv::Request::Txn(t))) = command::decode(&entry).unwrap().1 else {
        panic!("a txn decodes as a txn")
    };
    let puts: Vec<_> = t
        .success
        .iter()
        .map(|op| match op {
            kv::RequestOp::Put(p) => p,
            other => panic!("not a put: {other:?}"),
        })
        .collect();
    assert!(within(&puts[0].value, &entry));
    assert!(
        !within(&puts[1].value, &entry),
        "a small value beside a large one is a copy"
    );
    assert!(puts.iter().all(|p| !within(&p.key, &entry)));
    assert_eq!(puts[1].value, Bytes::from(vec![b'v'; 16]));
}

#[test]
fn an_etcd_txn_travels_through_the_log_and_applies_with_etcd_semantics() {
    use pb::compare::{CompareResult, CompareTarget, TargetUnion};
    use pb::request_op::Request as Op;
    let mut store = kv::Store::new();
    let put = pb::PutRequest {
        key: Bytes::from_static(b"k"),
        value: Bytes::from_static(b"v1"),
        ..Default::default()
    };
    apply(&mut store, &command::encode(rid(7), Write::Put(put))).unwrap();
    // "if k == v1 then put k=v2 and read it, else delete k"
    let txn = pb::TxnRequest {
        compare: vec![pb::Compare {
            result: CompareResult::Equal as i32,
            target: CompareTarget::Value as i32,
            key: Bytes::from_static(b"k"),
            target_union: Some(TargetUnion::Value(Bytes::from_static(b"v1"))),
            ..Default::default()
        }],
        success: vec![
            pb::RequestOp {
                request: Some(Op::RequestPut(pb::PutRequest {
                    key: Bytes::from_static(b"k"),
                    value: Bytes::from_static(b"v2"),
                    prev_kv: true,
                    ..Default::default()
                })),
            },
            pb::RequestOp {
                request: Some(Op::RequestRange(pb::RangeRequest {
                    key: Bytes::from_static(b"k"),
                    ..Default::default()
                })),
            },
        ],
        failure: vec![pb::RequestOp {
            request: Some(Op::RequestDeleteRange(pb::DeleteRangeRequest {
                key: Bytes::from_static(b"k"),
                ..Default::default()
            })),
        }],
    };
    let entry = command::encode(rid(8), Write::Txn(txn));
    let (id, _) = command::decode(&entry).unwrap();
    assert_eq!(id, rid(8));
    let kv::Response::Txn(resp) = apply(&mut store, &entry).unwrap() else {
        panic!("a txn answers with a txn")
    };
    let resp = api::txn_response(resp, &header(store.revision()));
    assert!(resp.succeeded);
    assert_eq!(resp.header.unwrap().revision, 3);
    use pb::response_op::Response as R;
    match (&resp.responses[0].response, &resp.responses[1].response) {
        (Some(R::ResponsePut(p)), Some(R::ResponseRange(r))) => {
            assert_eq!(p.prev_kv.as_ref().unwrap().value, Bytes::from_static(b"v1"));
            assert_eq!(r.kvs[0].value, Bytes::from_static(b"v2"));
            assert_eq!((r.kvs[0].version, r.kvs[0].create_revision), (2, 2));
            // The answers inside carry the revision they saw, and nothing else (etcd's).
            assert_eq!(p.header.unwrap().revision, 3);
            assert_eq!(
                r.header.unwrap(),
                pb::ResponseHeader {
                    revision: 3,
                    ..Default::default()
                }
            );
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn bad_requests_get_etcds_codes_and_messages() {
    let bad_sort = pb::RangeRequest {
        key: Bytes::from_static(b"k"),
        sort_order: 42,
        ..Default::default()
    };
    let e = api::range_request(&bad_sort).unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    let e = api::put_request(&pb::PutRequest::default()).unwrap_err();
    assert_eq!(e.message(), "etcdserver: key is not provided");
    let empty_op = pb::TxnRequest {
        success: vec![pb::RequestOp { request: None }],
        ..Default::default()
    };
    assert_eq!(
        api::txn_request(&empty_op).unwrap_err().code(),
        Code::InvalidArgument
    );
    let compacted = api::status(&kv::Error::Compacted);
    assert_eq!(compacted.code(), Code::OutOfRange);
    assert_eq!(
        compacted.message(),
        "etcdserver: mvcc: required revision has been compacted"
    );
    assert_eq!(
        api::request_too_large().message(),
        "etcdserver: request is too large"
    );
    // ignore_value with a value, ignore_lease with a lease: refused first, as etcd does.
    for (p, why) in [
        (
            pb::PutRequest {
                key: Bytes::from_static(b"k"),
                value: Bytes::from_static(b"v"),
                ignore_value: true,
                ..Default::default()
            },
            "etcdserver: value is provided",
        ),
        (
            pb::PutRequest {
                key: Bytes::from_static(b"k"),
                lease: 5,
                ignore_lease: true,
                ..Default::default()
            },
            "etcdserver: lease is provided",
        ),
    ] {
        let e = api::put_request(&p).unwrap_err();
        assert_eq!((e.code(), e.message()), (Code::InvalidArgument, why));
    }
    // A write that converts badly still decodes, so every node fails it the same way.
    let mut store = kv::Store::new();
    let bad = command::encode(rid(1), Write::Put(pb::PutRequest::default()));
    assert_eq!(
        apply(&mut store, &bad).unwrap_err().code(),
        Code::InvalidArgument
    );
    assert_eq!(
        store.revision(),
        1,
        "nothing written: still a new store's revision"
    );
    // Bytes that are not a command at all.
    assert!(command::decode(&Bytes::from_static(&[0xff, 0xff, 0xff])).is_err());
}

fn raft_message() -> impl Strategy<Value = raft::Message> {
    use raft::{Body, ConflictHint, Entry, EntryKind, SnapshotMeta};
    let entry = (
        any::<u64>(),
        any::<u64>(),
        0..3u8,
        prop::collection::vec(any::<u8>(), 0..16),
    )
        .prop_map(|(term, index, kind, data)| Entry {
            term,
            index,
            kind: match kind {
                0 => EntryKind::Normal,
                1 => EntryKind::Noop,
                _ => EntryKind::ConfChange,
            },
            data: data.into(),
        });
    let body = prop_oneof![
        (
            any::<u64>(),
            any::<u64>(),
            prop::collection::vec(entry, 0..4),
            any::<u64>()
        )
            .prop_map(|(prev_index, prev_term, entries, commit)| Body::Append {
                prev_index,
                prev_term,
                entries,
                commit
            }),
        (
            any::<bool>(),
            any::<u64>(),
            prop::option::of((prop::option::of(any::<u64>()), any::<u64>()))
        )
            .prop_map(|(reject, index, hint)| Body::AppendResponse {
                reject,
                index,
                hint: hint.map(|(term, first_index)| ConflictHint { term, first_index }),
            }),
        (any::<u64>(), any::<u64>()).prop_map(|(commit, seq)| Body::Heartbeat { commit, seq }),
        any::<u64>().prop_map(|seq| Body::HeartbeatResponse { seq }),
        (any::<bool>(), any::<bool>(), any::<u64>(), any::<u64>()).prop_map(
            |(pre_vote, transfer, last_index, last_term)| Body::Vote {
                pre_vote,
                transfer,
                last_index,
                last_term
            }
        ),
        (any::<bool>(), any::<bool>())
            .prop_map(|(pre_vote, granted)| Body::VoteResponse { pre_vote, granted }),
        Just(Body::TimeoutNow),
        any::<u64>().prop_map(|ctx| Body::ReadIndex { ctx }),
        (any::<u64>(), any::<u64>())
            .prop_map(|(ctx, index)| Body::ReadIndexResponse { ctx, index }),
        (
            any::<u64>(),
            any::<u64>(),
            prop::collection::vec(1..100u64, 0..5),
            prop::collection::vec(1..100u64, 0..3),
            any::<u64>(),
            any::<u64>(),
            prop::collection::vec(any::<u8>(), 0..32)
        )
            .prop_map(|(index, term, voters, learners, offset, total, data)| {
                Body::InstallSnapshot {
                    meta: SnapshotMeta {
                        index,
                        term,
                        membership: {
                            let learners = learners.into_iter().filter(|l| !voters.contains(l));
                            raft::Membership::from_parts(
                                voters.clone(),
                                vec![],
                                learners.collect(),
                                vec![],
                                false,
                            )
                            .unwrap()
                        },
                    },
                    offset,
                    total,
                    data: data.into(),
                }
            }),
        (any::<u64>(), any::<u64>(), any::<bool>()).prop_map(|(index, received, reject)| {
            Body::SnapshotResponse {
                index,
                received,
                reject,
            }
        }),
        prop::collection::vec(prop::collection::vec(any::<u8>(), 0..16), 0..4).prop_map(|data| {
            Body::Propose {
                data: data.into_iter().map(Into::into).collect(),
            }
        }),
        any::<u64>().prop_map(|commit| Body::Commit { commit }),
    ];
    (any::<u64>(), any::<u64>(), any::<u64>(), body).prop_map(|(from, to, term, body)| {
        raft::Message {
            from,
            to,
            term,
            body,
        }
    })
}

proptest! {
    #[test]
    fn raft_messages_survive_the_wire(m in raft_message()) {
        let bytes = peer::to_pb(&m).encode_to_vec();
        let back = peer::from_pb(server::pb::raftkvpb::Message::decode(&bytes[..]).unwrap()).unwrap();
        prop_assert_eq!(back, m);
    }

    #[test]
    fn garbage_never_panics_the_decoders(data in prop::collection::vec(any::<u8>(), 0..64)) {
        if let Ok(m) = server::pb::raftkvpb::Message::decode(&data[..]) {
            let _ = peer::from_pb(m);
        }
        let _ = command::decode(&Bytes::from(data));
    }
}

#[test]
fn a_message_without_a_body_is_refused() {
    let m = server::pb::raftkvpb::Message {
        from: 1,
        to: 2,
        term: 3,
        body: None,
    };
    assert!(peer::from_pb(m).is_err());
}
