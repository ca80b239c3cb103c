//! etcd v3 semantics, one behaviour per test.

use bytes::Bytes;
use kv::*;

fn b(s: &str) -> Bytes {
    Bytes::copy_from_slice(s.as_bytes())
}

fn put(s: &mut Store, k: &str, v: &str) -> PutResponse {
    match s
        .apply(&Request::Put(PutRequest {
            key: b(k),
            value: b(v),
            prev_kv: true,
            ..Default::default()
        }))
        .unwrap()
    {
        Response::Put(p) => p,
        r => panic!("{r:?}"),
    }
}

fn get(s: &Store, k: &str, rev: Revision) -> Result<Option<KeyValue>> {
    let req = RangeRequest {
        range: KeyRange {
            key: b(k),
            range_end: Bytes::new(),
        },
        revision: rev,
        ..Default::default()
    };
    s.range(&req, s.revision())
        .map(|r| r.kvs.into_iter().next())
}

fn range(s: &Store, req: RangeRequest) -> RangeResponse {
    s.range(&req, s.revision()).unwrap()
}

fn prefix(p: &str) -> KeyRange {
    KeyRange {
        key: b(p),
        range_end: prefix_end(p.as_bytes()),
    }
}

fn del(s: &mut Store, range: KeyRange) -> DeleteRangeResponse {
    match s
        .apply(&Request::DeleteRange(DeleteRangeRequest {
            range,
            prev_kv: true,
        }))
        .unwrap()
    {
        Response::DeleteRange(d) => d,
        r => panic!("{r:?}"),
    }
}

#[test]
fn puts_count_versions_and_revisions() {
    let mut s = Store::new();
    // etcd's numbering: a new store is at revision 1, its first write is revision 2.
    assert_eq!(s.revision(), 1);
    assert_eq!(get(&s, "a", 1).unwrap(), None);
    assert_eq!(put(&mut s, "a", "1").prev_kv, None);
    let prev = put(&mut s, "a", "2").prev_kv.unwrap();
    assert_eq!((prev.value, prev.version), (b("1"), 1));
    put(&mut s, "b", "x");
    let a = get(&s, "a", 0).unwrap().unwrap();
    assert_eq!((a.create_revision, a.mod_revision, a.version), (2, 3, 2));
    assert_eq!(s.revision(), 4);
    // Past revisions stay readable.
    assert_eq!(get(&s, "a", 2).unwrap().unwrap().value, b("1"));
    assert_eq!(get(&s, "b", 3).unwrap(), None);
    assert_eq!(get(&s, "a", 5), Err(Error::FutureRevision));
}

#[test]
fn delete_bumps_the_revision_only_when_it_deletes_and_resets_the_version() {
    let mut s = Store::new();
    put(&mut s, "a", "1");
    put(&mut s, "a", "2");
    let d = del(
        &mut s,
        KeyRange {
            key: b("zz"),
            range_end: Bytes::new(),
        },
    );
    assert_eq!(
        (d.deleted, s.revision()),
        (0, 3),
        "deleting nothing is no write"
    );
    let d = del(
        &mut s,
        KeyRange {
            key: b("a"),
            range_end: Bytes::new(),
        },
    );
    assert_eq!(
        (d.deleted, d.prev_kvs[0].value.clone(), s.revision()),
        (1, b("2"), 4)
    );
    assert_eq!(get(&s, "a", 0).unwrap(), None);
    put(&mut s, "a", "3");
    let a = get(&s, "a", 0).unwrap().unwrap();
    assert_eq!((a.create_revision, a.version), (5, 1), "a new generation");
}

#[test]
fn ranges_prefixes_limits_counts_and_sorting() {
    let mut s = Store::new();
    for (k, v) in [
        ("foo/a", "3"),
        ("foo/b", "1"),
        ("foo/c", "2"),
        ("fop", "x"),
        ("zed", "y"),
    ] {
        put(&mut s, k, v);
    }
    let r = range(
        &s,
        RangeRequest {
            range: prefix("foo/"),
            ..Default::default()
        },
    );
    let keys: Vec<_> = r.kvs.iter().map(|kv| kv.key.clone()).collect();
    assert_eq!(keys, vec![b("foo/a"), b("foo/b"), b("foo/c")]);
    let r = range(
        &s,
        RangeRequest {
            range: prefix("foo/"),
            limit: 2,
            ..Default::default()
        },
    );
    assert_eq!((r.kvs.len(), r.more, r.count), (2, true, 3));
    let r = range(
        &s,
        RangeRequest {
            range: prefix("foo/"),
            count_only: true,
            ..Default::default()
        },
    );
    assert!(r.kvs.is_empty() && r.count == 3);
    let r = range(
        &s,
        RangeRequest {
            range: prefix("foo/"),
            keys_only: true,
            ..Default::default()
        },
    );
    assert!(r.kvs.iter().all(|kv| kv.value.is_empty()));
    // From a key to the end of the keyspace.
    let all = KeyRange {
        key: b("fop"),
        range_end: b("\0"),
    };
    assert_eq!(
        range(
            &s,
            RangeRequest {
                range: all,
                ..Default::default()
            }
        )
        .count,
        2
    );
    // Sorted by value, descending.
    let r = range(
        &s,
        RangeRequest {
            range: prefix("foo/"),
            sort_order: SortOrder::Descend,
            sort_target: SortTarget::Value,
            ..Default::default()
        },
    );
    let vals: Vec<_> = r.kvs.iter().map(|kv| kv.value.clone()).collect();
    assert_eq!(vals, vec![b("3"), b("2"), b("1")]);
    // Filtered by mod revision (foo/a, b, c are revisions 2, 3, 4): etcd counts the keys
    // in the range before the filter.
    let r = range(
        &s,
        RangeRequest {
            range: prefix("foo/"),
            min_mod_revision: 3,
            ..Default::default()
        },
    );
    assert_eq!((r.kvs.len(), r.count), (2, 3));
}

fn cmp(k: &str, result: CompareResult, target: CompareTarget) -> Compare {
    Compare {
        range: KeyRange {
            key: b(k),
            range_end: Bytes::new(),
        },
        result,
        target,
    }
}

fn put_op(k: &str, v: &str) -> RequestOp {
    RequestOp::Put(PutRequest {
        key: b(k),
        value: b(v),
        ..Default::default()
    })
}

fn txn(s: &mut Store, t: TxnRequest) -> Result<TxnResponse> {
    s.apply(&Request::Txn(t)).map(|r| match r {
        Response::Txn(t) => t,
        r => panic!("{r:?}"),
    })
}

#[test]
fn txn_compares_pick_a_branch_and_write_at_one_revision() {
    let mut s = Store::new();
    put(&mut s, "k", "v1");
    let t = TxnRequest {
        compare: vec![cmp(
            "k",
            CompareResult::Equal,
            CompareTarget::Value(b("v1")),
        )],
        success: vec![
            put_op("k", "v2"),
            put_op("other", "o"),
            RequestOp::Range(RangeRequest {
                range: KeyRange {
                    key: b("k"),
                    range_end: Bytes::new(),
                },
                ..Default::default()
            }),
        ],
        failure: vec![put_op("k", "lost")],
    };
    let r = txn(&mut s, t.clone()).unwrap();
    assert!(r.succeeded);
    assert_eq!(s.revision(), 3, "one revision for the whole transaction");
    match &r.responses[2] {
        ResponseOp::Range(rr) => assert_eq!(rr.kvs[0].value, b("v2"), "reads see the txn's writes"),
        other => panic!("{other:?}"),
    }
    // Now the compare fails: the failure branch runs.
    let r = txn(&mut s, t).unwrap();
    assert!(!r.succeeded);
    assert_eq!(get(&s, "k", 0).unwrap().unwrap().value, b("lost"));
    // Compares on a missing key: version 0, and a value compare is false.
    let t = TxnRequest {
        compare: vec![
            cmp("missing", CompareResult::Equal, CompareTarget::Version(0)),
            cmp("missing", CompareResult::Equal, CompareTarget::Create(0)),
        ],
        success: vec![put_op("created", "1")],
        failure: vec![],
    };
    assert!(txn(&mut s, t).unwrap().succeeded);
    let t = TxnRequest {
        compare: vec![cmp(
            "missing",
            CompareResult::NotEqual,
            CompareTarget::Value(b("x")),
        )],
        ..Default::default()
    };
    assert!(!txn(&mut s, t).unwrap().succeeded);
}

#[test]
fn a_failing_txn_leaves_nothing_behind() {
    let mut s = Store::new();
    put(&mut s, "a", "1");
    let before = s.clone();
    let t = TxnRequest {
        success: vec![
            put_op("b", "new"),
            RequestOp::Put(PutRequest {
                key: b("nope"),
                ignore_value: true,
                ..Default::default()
            }),
        ],
        ..Default::default()
    };
    assert_eq!(txn(&mut s, t), Err(Error::KeyNotFound));
    assert_eq!(
        s, before,
        "the first put of the failed transaction was not undone"
    );
}

#[test]
fn txns_that_write_a_key_twice_or_are_too_big_are_refused() {
    let mut s = Store::new();
    let dup = TxnRequest {
        success: vec![put_op("a", "1"), put_op("a", "2")],
        ..Default::default()
    };
    assert_eq!(txn(&mut s, dup), Err(Error::DuplicateKey));
    let put_in_delete = TxnRequest {
        success: vec![
            RequestOp::DeleteRange(DeleteRangeRequest {
                range: prefix("a"),
                prev_kv: false,
            }),
            put_op("ab", "1"),
        ],
        ..Default::default()
    };
    assert_eq!(txn(&mut s, put_in_delete), Err(Error::DuplicateKey));
    let nested = TxnRequest {
        success: vec![
            put_op("a", "1"),
            RequestOp::Txn(TxnRequest {
                success: vec![put_op("a", "2")],
                ..Default::default()
            }),
        ],
        ..Default::default()
    };
    assert_eq!(txn(&mut s, nested), Err(Error::DuplicateKey));
    let big = TxnRequest {
        success: (0..=MAX_TXN_OPS)
            .map(|i| put_op(&format!("k{i}"), "v"))
            .collect(),
        ..Default::default()
    };
    assert_eq!(txn(&mut s, big), Err(Error::TooManyOps));
    assert_eq!(s.revision(), 1);
}

#[test]
fn compaction_forgets_history_but_not_the_present() {
    let mut s = Store::new();
    put(&mut s, "a", "1"); // rev 2
    put(&mut s, "a", "2"); // rev 3
    put(&mut s, "gone", "x"); // rev 4
    del(
        &mut s,
        KeyRange {
            key: b("gone"),
            range_end: Bytes::new(),
        },
    ); // rev 5
    put(&mut s, "a", "3"); // rev 6
    s.apply(&Request::Compact(5)).unwrap();
    assert_eq!(get(&s, "a", 4), Err(Error::Compacted));
    assert_eq!(
        get(&s, "a", 5).unwrap().unwrap().value,
        b("2"),
        "the compact revision itself stays readable"
    );
    assert_eq!(get(&s, "a", 0).unwrap().unwrap().value, b("3"));
    assert_eq!(get(&s, "gone", 5).unwrap(), None);
    assert_eq!(s.apply(&Request::Compact(5)), Err(Error::Compacted));
    assert_eq!(s.apply(&Request::Compact(9)), Err(Error::FutureRevision));
    // The version count survives compaction.
    assert_eq!(get(&s, "a", 0).unwrap().unwrap().version, 3);
}

#[test]
fn ignore_value_and_lease_keep_what_is_there() {
    let mut s = Store::new();
    for id in [7, 9] {
        s.apply(&Request::LeaseGrant { id, ttl: 60 }).unwrap();
    }
    s.apply(&Request::Put(PutRequest {
        key: b("k"),
        value: b("v"),
        lease: 7,
        ..Default::default()
    }))
    .unwrap();
    s.apply(&Request::Put(PutRequest {
        key: b("k"),
        ignore_value: true,
        lease: 9,
        ..Default::default()
    }))
    .unwrap();
    let kv = get(&s, "k", 0).unwrap().unwrap();
    assert_eq!((kv.value, kv.lease), (b("v"), 9));
    s.apply(&Request::Put(PutRequest {
        key: b("k"),
        value: b("w"),
        ignore_lease: true,
        ..Default::default()
    }))
    .unwrap();
    let kv = get(&s, "k", 0).unwrap().unwrap();
    assert_eq!((kv.value, kv.lease), (b("w"), 9));
    let err = s.apply(&Request::Put(PutRequest {
        key: b("none"),
        ignore_value: true,
        ..Default::default()
    }));
    assert_eq!(err, Err(Error::KeyNotFound));
    assert_eq!(err.unwrap_err().to_string(), "etcdserver: key not found");
    assert_eq!(
        s.apply(&Request::Put(PutRequest::default())),
        Err(Error::EmptyKey)
    );
}

#[test]
fn errors_carry_etcds_messages() {
    assert_eq!(
        Error::Compacted.to_string(),
        "etcdserver: mvcc: required revision has been compacted"
    );
    assert_eq!(
        Error::FutureRevision.to_string(),
        "etcdserver: mvcc: required revision is a future revision"
    );
}

#[test]
fn prefix_end_matches_etcd() {
    assert_eq!(prefix_end(b"foo"), b("fop"));
    assert_eq!(prefix_end(b"a\xff"), b("b"));
    assert_eq!(prefix_end(b"\xff\xff"), b("\0"));
}

/// A transaction's events come in the order it made its writes (etcd's sub-revisions), not
/// in key order — and keep that order through a snapshot and through compaction.
#[test]
fn a_transactions_events_keep_their_order_through_snapshots_and_compaction() {
    let mut s = Store::new();
    put(&mut s, "a", "0");
    let txn = TxnRequest {
        compare: Vec::new(),
        success: vec![
            put_op("c", "1"),
            RequestOp::DeleteRange(DeleteRangeRequest {
                range: KeyRange {
                    key: b("a"),
                    range_end: Bytes::new(),
                },
                prev_kv: false,
            }),
            put_op("b", "1"),
        ],
        failure: Vec::new(),
    };
    s.apply(&Request::Txn(txn)).unwrap();
    put(&mut s, "c", "2");
    let order = |s: &Store, rev| -> Vec<(EventKind, Bytes)> {
        s.events_at(rev, None)
            .into_iter()
            .map(|e| (e.kind, e.kv.key))
            .collect()
    };
    let want = vec![
        (EventKind::Put, b("c")),
        (EventKind::Delete, b("a")),
        (EventKind::Put, b("b")),
    ];
    assert_eq!(order(&s, 3), want);
    let restored = Store::restore(&s.snapshot()).unwrap();
    assert_eq!(order(&restored, 3), want);
    assert_eq!(restored, s);

    // The delete: a tombstone at revision 2, with the value it removed.
    let del = &s.events_at(3, None)[1];
    assert_eq!(
        del.kv,
        KeyValue {
            key: b("a"),
            mod_revision: 3,
            ..Default::default()
        }
    );
    assert_eq!(
        del.prev_kv.as_ref().map(|kv| kv.value.clone()),
        Some(b("0"))
    );
    // A put over a value reports it as the previous one.
    let over = &s.events_at(4, None)[0];
    assert_eq!(over.prev_kv.as_ref().map(|kv| kv.mod_revision), Some(3));

    // Compacting at 3 drops revision 2 and the tombstone of revision 3; the puts remain.
    s.compact(3).unwrap();
    assert_eq!(s.first_event_revision(), 3);
    assert!(s.events_at(2, None).is_empty());
    let kept = vec![(EventKind::Put, b("c")), (EventKind::Put, b("b"))];
    assert_eq!(order(&s, 3), kept);
    let restored = Store::restore(&s.snapshot()).unwrap();
    assert_eq!(order(&restored, 3), kept);
    assert_eq!(restored, s);
    s.compact(4).unwrap();
    assert_eq!(order(&s, 4), vec![(EventKind::Put, b("c"))]);
}

/// A snapshot of the first format (no sub-revisions) still restores, its revisions' writes
/// in key order.
#[test]
fn a_version_one_snapshot_restores() {
    let mut v1 = b"RKVKV001".to_vec();
    for x in [1i64, 0, 1] {
        v1.extend_from_slice(&x.to_le_bytes()); // revision 1, compact 0, one key
    }
    v1.extend_from_slice(&1u32.to_le_bytes());
    v1.push(b'k');
    v1.extend_from_slice(&1u32.to_le_bytes()); // one version
    v1.extend_from_slice(&1i64.to_le_bytes()); // at revision 1
    v1.push(1);
    for x in [1i64, 1, 0] {
        v1.extend_from_slice(&x.to_le_bytes()); // create 1, version 1, lease 0
    }
    v1.extend_from_slice(&1u32.to_le_bytes());
    v1.push(b'v');
    let s = Store::restore(&Bytes::from(v1)).unwrap();
    assert_eq!(get(&s, "k", 0).unwrap().unwrap().value, b("v"));
    assert_eq!(s.events_at(1, None).len(), 1);
}

/// Details etcd 3.4 shows that the differential test (compat/tests/watch_vs_etcd/) found
/// raftkv answering otherwise: each now answered as etcd does.
#[test]
fn ranges_and_transactions_answer_in_etcds_detail() {
    let mut s = Store::new();
    for (k, v) in [("s/1", "c"), ("s/2", "b"), ("s/3", "a")] {
        put(&mut s, k, v); // revisions 2, 3, 4
    }
    // count_only with a limit: no key-values, so never `more`.
    let r = range(
        &s,
        RangeRequest {
            range: prefix("s/"),
            count_only: true,
            limit: 1,
            ..Default::default()
        },
    );
    assert_eq!((r.kvs.len(), r.count, r.more), (0, 3, false));
    // Sort order NONE on the value with a limit: etcd sorts (ascending) only the first
    // limit + 1 keys in key order, then cuts.
    let r = range(
        &s,
        RangeRequest {
            range: prefix("s/"),
            sort_target: SortTarget::Value,
            limit: 1,
            ..Default::default()
        },
    );
    assert_eq!((r.kvs[0].key.clone(), r.more), (b("s/2"), true));
    // A compare over a range that holds no key compares one missing key.
    let empty = |target, result| TxnRequest {
        compare: vec![Compare {
            range: KeyRange {
                key: b("q"),
                range_end: b("r"),
            },
            result,
            target,
        }],
        ..Default::default()
    };
    let t = empty(CompareTarget::Version(3), CompareResult::Equal);
    assert!(!txn(&mut s, t).unwrap().succeeded);
    let t = empty(CompareTarget::Version(0), CompareResult::Equal);
    assert!(txn(&mut s, t).unwrap().succeeded);
    let t = empty(CompareTarget::Value(b("x")), CompareResult::NotEqual);
    assert!(!txn(&mut s, t).unwrap().succeeded);
    // Every compare on the path is read before the transaction writes: the nested compare
    // sees "x" missing although the transaction put it first.
    let nested = TxnRequest {
        compare: vec![cmp("x", CompareResult::Equal, CompareTarget::Value(b("1")))],
        success: vec![put_op("then", "1")],
        failure: vec![put_op("else", "1")],
    };
    let t = TxnRequest {
        success: vec![
            RequestOp::Range(RangeRequest {
                range: prefix("s/"),
                ..Default::default()
            }),
            put_op("x", "1"),
            RequestOp::Txn(nested),
            RequestOp::DeleteRange(DeleteRangeRequest {
                range: prefix("zz"),
                prev_kv: false,
            }),
        ],
        ..Default::default()
    };
    let r = txn(&mut s, t).unwrap();
    assert_eq!(get(&s, "else", 0).unwrap().unwrap().value, b("1"));
    assert_eq!(get(&s, "then", 0).unwrap(), None);
    // Each answer's header revision: a read before the writes sees 4, what follows 5; a
    // nested transaction's own header has none, its inner answers their own.
    assert_eq!(r.revisions, vec![4, 5, 0, 5]);
    match &r.responses[2] {
        ResponseOp::Txn(inner) => assert_eq!(inner.revisions, vec![5]),
        other => panic!("{other:?}"),
    }
}
