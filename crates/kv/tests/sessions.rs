//! Exactly-once sessions' memory: what a retry is answered, what is kept (no read results),
//! that it is counted in the store's size, that a retry must resend the same command, and
//! that snapshots carry it — the current format and version 3's.

use bytes::{BufMut, Bytes, BytesMut};
use kv::*;

fn b(s: &str) -> Bytes {
    Bytes::copy_from_slice(s.as_bytes())
}

fn put(key: &str, value: Bytes) -> Request {
    Request::Put(PutRequest {
        key: b(key),
        value,
        ..Default::default()
    })
}

fn read(key: &str) -> RequestOp {
    RequestOp::Range(RangeRequest {
        range: KeyRange {
            key: b(key),
            range_end: Bytes::new(),
        },
        ..Default::default()
    })
}

fn grant(s: &mut Store, id: i64) {
    s.apply(&Request::LeaseGrant { id, ttl: 60 }).unwrap();
}

const MB: usize = 1 << 20;

/// A store with a 1 MB value at `big` and a lease 7.
fn big_store() -> Store {
    let mut s = Store::new();
    s.apply(&put("big", Bytes::from(vec![b'x'; MB]))).unwrap();
    grant(&mut s, 7);
    s
}

/// A transaction that reads `big` `reads` times and writes `k`, asking for its previous
/// value too.
fn reading_txn(reads: usize) -> Request {
    let mut success: Vec<RequestOp> = (0..reads).map(|_| read("big")).collect();
    success.push(RequestOp::Put(PutRequest {
        key: b("big"),
        value: b("small"),
        prev_kv: true,
        ..Default::default()
    }));
    Request::Txn(TxnRequest {
        compare: vec![],
        success,
        failure: vec![],
    })
}

#[test]
fn a_retry_gets_what_the_write_said_without_the_values_read() {
    let mut s = big_store();
    let session = Session { lease: 7, seq: 1 };
    let txn = reading_txn(2);
    let first = s.apply_in_session(session, &txn).unwrap();
    // The first answer is complete: the values read and the put's previous value.
    let Ok(Response::Txn(t)) = &first.result else {
        panic!("{:?}", first.result)
    };
    let ResponseOp::Range(r) = &t.responses[0] else {
        panic!()
    };
    assert_eq!(r.kvs[0].value.len(), MB);
    let rev = s.revision();
    // The retry: same header revision, `succeeded`, per-op revisions and counts; no values.
    let retry = s.apply_in_session(session, &txn).unwrap();
    assert_eq!(s.revision(), rev, "the retry ran again");
    assert_eq!(retry.revision, first.revision);
    let Ok(Response::Txn(rt)) = &retry.result else {
        panic!("{:?}", retry.result)
    };
    assert!(rt.succeeded);
    assert_eq!(rt.revisions, t.revisions);
    assert_eq!(rt.responses.len(), 3);
    for op in &rt.responses {
        match op {
            ResponseOp::Range(r) => {
                assert_eq!((r.count, r.more), (1, false));
                assert!(r.kvs.is_empty());
            }
            ResponseOp::Put(p) => assert_eq!(p.prev_kv, None),
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(s.session(7).unwrap().result, retry.result);
}

/// Defect 4: reading a 1 MB value in session transactions, again and again and eight times
/// per transaction, leaves the snapshot (what every backup, raft snapshot and Hash holds)
/// the size it was, give or take the few bytes per operation a retry's answer takes.
#[test]
fn session_memory_does_not_grow_with_what_was_read() {
    let mut s = big_store();
    let before = s.snapshot().len();
    for seq in 1..=4 {
        let session = Session { lease: 7, seq };
        // Reads only (the put would shrink the store): the txn reads `big` eight times.
        let txn = Request::Txn(TxnRequest {
            compare: vec![],
            success: (0..8).map(|_| read("big")).collect(),
            failure: vec![],
        });
        let answer = s.apply_in_session(session, &txn).unwrap();
        assert!(answer.result.is_ok());
    }
    let after = s.snapshot().len();
    assert!(
        after < before + 1024,
        "the snapshot grew from {before} to {after} bytes"
    );
    assert_eq!(s.snapshot_len(), after as u64);
}

#[test]
fn session_memory_counts_in_the_store_size() {
    let mut s = big_store();
    let keys = s.size_bytes();
    let session = Session { lease: 7, seq: 1 };
    s.apply_in_session(session, &put("k", b("v"))).unwrap();
    let with_put = s.size_bytes();
    let memory = with_put - keys - 2; // the key and value of `k`
    assert!(memory > 0, "the session's memory is not counted");
    // A larger answer (a transaction of several operations) costs more, and replacing the
    // memory releases the old one's cost.
    let txn = reading_txn(3);
    s.apply_in_session(Session { lease: 7, seq: 2 }, &txn)
        .unwrap();
    let restored = Store::restore(&s.snapshot()).unwrap();
    assert_eq!(restored.size_bytes(), s.size_bytes());
    assert_eq!(restored, s);
    // Ending the lease frees it: what is left is the keys' history.
    let before_revoke = s.size_bytes();
    s.apply(&Request::LeaseRevoke(7)).unwrap();
    assert_eq!(s.session_count(), 0);
    let mut no_session = big_store();
    no_session.apply(&put("k", b("v"))).unwrap();
    no_session.apply(&txn).unwrap();
    no_session.apply(&Request::LeaseRevoke(7)).unwrap();
    assert_eq!(s.size_bytes(), no_session.size_bytes());
    assert!(before_revoke > s.size_bytes());
}

#[test]
fn a_retry_with_another_body_is_refused() {
    let mut s = big_store();
    let session = Session { lease: 7, seq: 1 };
    s.apply_in_session(session, &put("k", b("one"))).unwrap();
    let rev = s.revision();
    let e = s.apply_in_session(session, &put("k", b("two")));
    assert_eq!(e, Err(Error::SessionMismatch { seq: 1 }));
    assert!(e.unwrap_err().to_string().contains("different request"));
    // Nothing ran, the memory is unchanged, and the real retry still gets its answer.
    assert_eq!(s.revision(), rev);
    assert!(s.apply_in_session(session, &put("k", b("one"))).is_ok());
    // Every field counts: a flag alone differs.
    let with_prev = Request::Put(PutRequest {
        key: b("k"),
        value: b("one"),
        prev_kv: true,
        ..Default::default()
    });
    assert_eq!(
        s.apply_in_session(session, &with_prev),
        Err(Error::SessionMismatch { seq: 1 })
    );
    assert_ne!(
        session_digest(&reading_txn(1)),
        session_digest(&reading_txn(2))
    );
}

fn session_digest(r: &Request) -> u32 {
    let mut s = big_store();
    s.apply_in_session(Session { lease: 7, seq: 1 }, r)
        .unwrap()
        .digest
        .unwrap()
}

#[test]
fn snapshot_chunks_are_the_snapshot_in_pieces() {
    let mut s = big_store();
    for i in 0..50 {
        s.apply(&put(&format!("k{i:02}"), b("value"))).unwrap();
    }
    s.apply(&Request::DeleteRange(DeleteRangeRequest {
        range: KeyRange {
            key: b("k10"),
            range_end: b("k20"),
        },
        prev_kv: false,
    }))
    .unwrap();
    grant(&mut s, 8);
    s.apply_in_session(Session { lease: 7, seq: 1 }, &reading_txn(2))
        .unwrap();
    s.apply_in_session(Session { lease: 8, seq: 3 }, &put("x", b("y")))
        .unwrap();
    let whole = s.snapshot();
    assert_eq!(s.snapshot_len(), whole.len() as u64);
    for target in [1, 7, 100, 4096, MB / 2, usize::MAX] {
        let chunks: Vec<Bytes> = s.clone().snapshot_chunks(target).collect();
        let joined: Vec<u8> = chunks.iter().flat_map(|c| c.to_vec()).collect();
        assert_eq!(joined, whole.to_vec(), "chunks of {target}");
        // Every chunk but the last holds at least the target, and never much more than one
        // key's history beyond it.
        for c in &chunks[..chunks.len() - 1] {
            assert!(c.len() >= target.min(whole.len()));
            assert!(c.len() < target.saturating_add(MB + 100), "{}", c.len());
        }
    }
}

/// A version 3 snapshot (whole answers, key-values included, no digest) restores: its
/// sessions keep what a retry needs, and are counted.
#[test]
fn a_version_3_snapshot_restores_with_its_answers_stripped() {
    let value = vec![b'v'; 1000];
    let mut v3 = BytesMut::new();
    v3.put_slice(b"RKVKV003");
    v3.put_i64_le(2); // revision
    v3.put_i64_le(0); // compact revision
    v3.put_u64_le(1); // one key
    v3.put_u32_le(3);
    v3.put_slice(b"big");
    v3.put_u32_le(1); // one version
    v3.put_i64_le(2);
    v3.put_u32_le(0);
    v3.put_u8(1);
    for n in [2, 1, 0] {
        v3.put_i64_le(n); // create, version, lease
    }
    v3.put_u32_le(value.len() as u32);
    v3.put_slice(&value);
    v3.put_u64_le(1); // one lease
    for n in [7, 60, 60] {
        v3.put_i64_le(n);
    }
    v3.put_u64_le(1); // one session
    v3.put_i64_le(7);
    v3.put_u64_le(1); // seq
    v3.put_i64_le(2); // revision
    v3.put_u8(0); // ok
    v3.put_u8(4); // txn
    v3.put_u8(1); // succeeded
    v3.put_u32_le(1);
    v3.put_i64_le(2);
    v3.put_u8(1); // range
    v3.put_u8(0);
    v3.put_i64_le(1);
    v3.put_u32_le(1); // one key-value
    v3.put_u32_le(3);
    v3.put_slice(b"big");
    for n in [2, 2, 1, 0] {
        v3.put_i64_le(n);
    }
    v3.put_u32_le(value.len() as u32);
    v3.put_slice(&value);
    let s = Store::restore(&v3.freeze()).unwrap();
    let m = s.session(7).unwrap();
    assert_eq!((m.seq, m.revision, m.digest), (1, 2, None));
    assert_eq!(
        m.result,
        Ok(Response::Txn(TxnResponse {
            succeeded: true,
            responses: vec![ResponseOp::Range(RangeResponse {
                kvs: vec![],
                more: false,
                count: 1,
            })],
            revisions: vec![2],
        }))
    );
    // Counted, written in the current format, and restored to the same store.
    assert!(s.size_bytes() > 3 + 1000);
    let again = Store::restore(&s.snapshot()).unwrap();
    assert_eq!(again, s);
    assert_eq!(&again.snapshot()[..8], b"RKVKV004");
    // Without a digest, a retry is answered as before.
    let mut s = s;
    let any = put("other", b("x"));
    let retry = s
        .apply_in_session(Session { lease: 7, seq: 1 }, &any)
        .unwrap();
    assert_eq!(retry.revision, 2);
}

#[test]
fn a_truncated_snapshot_with_sessions_is_refused_never_a_panic() {
    let mut s = big_store();
    s.apply_in_session(Session { lease: 7, seq: 1 }, &put("k", b("v")))
        .unwrap();
    let bytes = s.snapshot();
    // Every truncation is refused, never a panic.
    for n in 0..bytes.len().min(64) {
        assert!(Store::restore(&bytes.slice(..n)).is_err(), "{n}");
    }
    for n in bytes.len() - 64..bytes.len() {
        assert!(Store::restore(&bytes.slice(..n)).is_err(), "{n}");
    }
}
