//! Leases, sessions and the leader's lease clock, as the store and the lessor see them.

use bytes::Bytes;
use kv::lessor::{Lessor, LessorConfig, Renewal};
use kv::*;

fn b(s: &str) -> Bytes {
    Bytes::copy_from_slice(s.as_bytes())
}

fn put(key: &str, lease: i64) -> Request {
    Request::Put(PutRequest {
        key: b(key),
        value: b("v"),
        lease,
        ..Default::default()
    })
}

fn delete(key: &str) -> Request {
    Request::DeleteRange(DeleteRangeRequest {
        range: KeyRange {
            key: b(key),
            range_end: Bytes::new(),
        },
        prev_kv: false,
    })
}

fn grant(s: &mut Store, id: i64, ttl: i64) {
    s.apply(&Request::LeaseGrant { id, ttl }).unwrap();
}

fn attached(s: &Store, id: i64) -> Vec<Bytes> {
    s.lease(id).unwrap().keys.iter().cloned().collect()
}

/// An increment of a counter key: read it, write it plus one (a non-idempotent command).
fn increment(s: &Store, key: &str) -> Request {
    let range = KeyRange {
        key: b(key),
        range_end: Bytes::new(),
    };
    let now = s
        .range(
            &RangeRequest {
                range,
                ..Default::default()
            },
            s.revision(),
        )
        .unwrap()
        .kvs
        .first()
        .map_or(0, |kv| {
            std::str::from_utf8(&kv.value).unwrap().parse().unwrap()
        });
    Request::Put(PutRequest {
        key: b(key),
        value: Bytes::from((now + 1).to_string()),
        ..Default::default()
    })
}

#[test]
fn a_put_naming_a_missing_lease_is_refused_and_changes_nothing() {
    let mut s = Store::new();
    let before = s.clone();
    assert_eq!(s.apply(&put("a", 7)), Err(Error::LeaseNotFound));
    assert_eq!(
        Error::LeaseNotFound.to_string(),
        "etcdserver: requested lease not found"
    );
    // Inside a transaction, the writes before it are undone too.
    let txn = Request::Txn(TxnRequest {
        compare: vec![],
        success: vec![
            RequestOp::Put(PutRequest {
                key: b("b"),
                ..Default::default()
            }),
            RequestOp::Put(PutRequest {
                key: b("c"),
                lease: 7,
                ..Default::default()
            }),
        ],
        failure: vec![],
    });
    assert_eq!(s.apply(&txn), Err(Error::LeaseNotFound));
    assert_eq!(s, before);
}

#[test]
fn grants_follow_etcds_rules() {
    let mut s = Store::new();
    let rev = s.revision();
    assert_eq!(
        s.apply(&Request::LeaseGrant { id: 5, ttl: 10 }),
        Ok(Response::Lease(LeaseResponse::Granted { id: 5, ttl: 10 }))
    );
    // A grant is not a write of the keyspace: the revision stays.
    assert_eq!(s.revision(), rev);
    assert_eq!(
        s.apply(&Request::LeaseGrant { id: 5, ttl: 10 }),
        Err(Error::LeaseExists)
    );
    assert_eq!(
        s.apply(&Request::LeaseGrant {
            id: 6,
            ttl: MAX_LEASE_TTL + 1
        }),
        Err(Error::LeaseTtlTooLarge)
    );
    assert_eq!(s.apply(&Request::LeaseRevoke(9)), Err(Error::LeaseNotFound));
}

#[test]
fn a_key_belongs_to_the_lease_of_its_live_version() {
    let mut s = Store::new();
    grant(&mut s, 1, 60);
    grant(&mut s, 2, 60);
    s.apply(&put("a", 1)).unwrap();
    s.apply(&put("b", 1)).unwrap();
    assert_eq!(attached(&s, 1), vec![b("a"), b("b")]);
    // Moved to another lease, then to none, then deleted.
    s.apply(&put("a", 2)).unwrap();
    assert_eq!(attached(&s, 1), vec![b("b")]);
    assert_eq!(attached(&s, 2), vec![b("a")]);
    s.apply(&put("a", 0)).unwrap();
    assert!(attached(&s, 2).is_empty());
    s.apply(&delete("b")).unwrap();
    assert!(attached(&s, 1).is_empty());
    // ignore_lease keeps the lease.
    s.apply(&put("c", 2)).unwrap();
    s.apply(&Request::Put(PutRequest {
        key: b("c"),
        value: b("w"),
        ignore_lease: true,
        ..Default::default()
    }))
    .unwrap();
    assert_eq!(attached(&s, 2), vec![b("c")]);
}

#[test]
fn a_revoke_deletes_every_attached_key_at_one_revision() {
    let mut s = Store::new();
    grant(&mut s, 1, 60);
    for k in ["x", "a", "m"] {
        s.apply(&put(k, 1)).unwrap();
    }
    s.apply(&put("other", 0)).unwrap();
    let before = s.revision();
    assert_eq!(
        s.apply(&Request::LeaseRevoke(1)),
        Ok(Response::Lease(LeaseResponse::Revoked {
            id: 1,
            deleted: 3
        }))
    );
    assert_eq!(s.revision(), before + 1);
    let events = s.events_at(before + 1, None);
    let deleted: Vec<_> = events.iter().map(|e| e.kv.key.clone()).collect();
    assert_eq!(deleted, vec![b("a"), b("m"), b("x")]);
    assert!(events.iter().all(|e| e.kind == EventKind::Delete));
    assert!(s.lease(1).is_none());
    // A lease without keys goes without a revision.
    grant(&mut s, 2, 60);
    s.apply(&Request::LeaseRevoke(2)).unwrap();
    assert_eq!(s.revision(), before + 1);
}

#[test]
fn leases_and_sessions_survive_a_snapshot() {
    let mut s = Store::new();
    grant(&mut s, 1, 60);
    grant(&mut s, 2, 3600);
    s.apply(&put("a", 1)).unwrap();
    s.apply(&put("b", 2)).unwrap();
    s.apply(&Request::LeaseCheckpoint(vec![(2, 1200)])).unwrap();
    let txn = Request::Txn(TxnRequest {
        compare: vec![],
        success: vec![
            RequestOp::Range(RangeRequest {
                range: KeyRange {
                    key: b("a"),
                    range_end: b("z"),
                },
                ..Default::default()
            }),
            RequestOp::Put(PutRequest {
                key: b("c"),
                prev_kv: true,
                ..Default::default()
            }),
        ],
        failure: vec![],
    });
    s.apply_in_session(Session { lease: 1, seq: 1 }, &txn)
        .unwrap();
    s.apply_in_session(Session { lease: 2, seq: 4 }, &put("a", 1))
        .unwrap();
    let restored = Store::restore(&s.snapshot()).unwrap();
    assert_eq!(restored, s);
    assert_eq!(restored.lease(2).unwrap().remaining, 1200);
    assert_eq!(attached(&restored, 1), vec![b("a")]);
    // Every truncation is refused, never a panic.
    let bytes = s.snapshot();
    for n in 0..bytes.len() {
        assert!(Store::restore(&bytes.slice(..n)).is_err(), "{n}");
    }
}

#[test]
fn a_retried_command_runs_once_and_gets_the_first_answer() {
    let mut s = Store::new();
    grant(&mut s, 9, 60);
    let session = Session { lease: 9, seq: 1 };
    let first = increment(&s, "counter");
    let answer = s.apply_in_session(session, &first).unwrap();
    let rev = s.revision();
    // The client's retry carries the same command and number: nothing runs again.
    let again = s.apply_in_session(session, &first).unwrap();
    assert_eq!(again, answer);
    assert_eq!(s.revision(), rev);
    // The next command runs; an older number is refused.
    let second = increment(&s, "counter");
    s.apply_in_session(Session { lease: 9, seq: 2 }, &second)
        .unwrap();
    assert_eq!(s.revision(), rev + 1);
    assert_eq!(
        s.apply_in_session(session, &first),
        Err(Error::StaleSequence { last: 2 })
    );
    // A refusal is remembered as the answer too.
    let bad = s
        .apply_in_session(Session { lease: 9, seq: 3 }, &put("k", 404))
        .unwrap();
    assert_eq!(bad.result, Err(Error::LeaseNotFound));
    assert_eq!(
        s.apply_in_session(Session { lease: 9, seq: 3 }, &put("k", 404))
            .unwrap()
            .result,
        Err(Error::LeaseNotFound)
    );
    // The same number with another command is refused: a retry resends its command.
    assert_eq!(
        s.apply_in_session(Session { lease: 9, seq: 3 }, &put("k", 0)),
        Err(Error::SessionMismatch { seq: 3 })
    );
    // Without a lease there is no session; ending the lease frees its memory.
    assert_eq!(
        s.apply_in_session(Session { lease: 8, seq: 1 }, &first),
        Err(Error::LeaseNotFound)
    );
    assert_eq!(s.session_count(), 1);
    s.apply(&Request::LeaseRevoke(9)).unwrap();
    assert_eq!(s.session_count(), 0);
    assert_eq!(
        s.apply_in_session(Session { lease: 9, seq: 4 }, &first),
        Err(Error::LeaseNotFound)
    );
}

fn lessor() -> Lessor {
    Lessor::new(LessorConfig {
        extend: 1000,
        checkpoint_interval: 60_000,
        ..LessorConfig::default()
    })
}

#[test]
fn a_member_that_does_not_lead_never_expires_a_lease() {
    let mut s = Store::new();
    grant(&mut s, 1, 5);
    let mut l = lessor();
    for now in (0..1_000_000).step_by(500) {
        assert_eq!(l.poll(now, false, &s), Default::default());
    }
    assert_eq!(l.renew(1, 0, &s), Renewal::NotLeader);
    assert!(!l.is_primary());
}

#[test]
fn a_new_leader_extends_every_lease_before_expiring_it() {
    let mut s = Store::new();
    grant(&mut s, 1, 5);
    let mut l = lessor();
    let t0 = 10_000;
    assert!(l.poll(t0, true, &s).revoke.is_empty());
    // Not before TTL + extend.
    assert!(l.poll(t0 + 5999, true, &s).revoke.is_empty());
    assert_eq!(l.poll(t0 + 6000, true, &s).revoke, vec![1]);
    // Proposed once; again only after the retry interval if it never applied.
    assert!(l.poll(t0 + 6001, true, &s).revoke.is_empty());
    assert_eq!(l.renew(1, t0 + 6002, &s), Renewal::Expiring);
    assert_eq!(l.poll(t0 + 9000, true, &s).revoke, vec![1]);
    s.apply(&Request::LeaseRevoke(1)).unwrap();
    l.changed(&LeaseResponse::Revoked { id: 1, deleted: 0 }, t0 + 9001);
    assert_eq!(l.timed(), 0);
    assert_eq!(l.renew(1, t0 + 9002, &s), Renewal::NotFound);
}

#[test]
fn a_renewed_lease_lives_a_ttl_from_its_renewal() {
    let mut s = Store::new();
    grant(&mut s, 1, 5);
    let mut l = lessor();
    l.poll(0, true, &s);
    for t in (1000..100_000).step_by(2000) {
        assert_eq!(
            l.renew(1, t, &s),
            Renewal::Renewed {
                ttl: 5,
                clear_checkpoint: false
            }
        );
        assert!(l.poll(t + 1999, true, &s).revoke.is_empty());
    }
    assert!(l.poll(99_000 + 4999, true, &s).revoke.is_empty());
    assert_eq!(l.poll(99_000 + 5000, true, &s).revoke, vec![1]);
    // A grant seen while leading starts its clock at once.
    l.changed(&LeaseResponse::Granted { id: 2, ttl: 3 }, 200_000);
    grant(&mut s, 2, 3);
    assert_eq!(l.remaining(2, 200_500), Some(2500));
}

#[test]
fn a_long_lease_is_checkpointed_and_a_later_leader_counts_from_it() {
    let mut s = Store::new();
    grant(&mut s, 1, 600);
    let mut l = lessor();
    l.poll(0, true, &s);
    // One interval on: 600 s + 1 s extension - 60 s = 541 s left.
    let work = l.poll(60_000, true, &s);
    assert_eq!(work.checkpoint, vec![(1, 541)]);
    s.apply(&Request::LeaseCheckpoint(work.checkpoint)).unwrap();
    // Leadership moves: the next leader counts 541 s (plus its extension), not 600.
    let mut next = lessor();
    next.poll(100_000, true, &s);
    assert_eq!(next.remaining(1, 100_000), Some(542_000));
    // A renewal of a checkpointed lease must clear the checkpoint before it is answered.
    assert_eq!(
        next.renew(1, 100_000, &s),
        Renewal::Renewed {
            ttl: 600,
            clear_checkpoint: true
        }
    );
    s.apply(&Request::LeaseCheckpoint(vec![(1, 0)])).unwrap();
    assert_eq!(
        next.renew(1, 100_001, &s),
        Renewal::Renewed {
            ttl: 600,
            clear_checkpoint: false
        }
    );
    // Demoted: nothing is timed any more.
    next.poll(100_002, false, &s);
    assert_eq!(next.remaining(1, 100_002), None);
}

#[test]
fn expiry_keeps_a_bounded_number_of_revokes_in_flight() {
    let mut s = Store::new();
    for id in 1..=5000 {
        grant(&mut s, id, 1);
    }
    let mut l = Lessor::new(LessorConfig {
        max_revoking: 1000,
        ..LessorConfig::default()
    });
    l.poll(0, true, &s);
    let first = l.poll(10_000, true, &s).revoke;
    assert_eq!(first.len(), 1000);
    assert!(l.poll(10_001, true, &s).revoke.is_empty());
    for id in &first[..300] {
        s.apply(&Request::LeaseRevoke(*id)).unwrap();
        l.changed(
            &LeaseResponse::Revoked {
                id: *id,
                deleted: 0,
            },
            10_002,
        );
    }
    assert_eq!(l.poll(10_003, true, &s).revoke.len(), 300);
}
