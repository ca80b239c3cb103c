//! HashKV: members that applied the same log agree at every revision; any difference in
//! the history shows; a member further ahead hashes an earlier revision as a member that
//! stopped there does.

use bytes::Bytes;
use kv::*;
use proptest::prelude::*;

fn put(key: &str, value: &str) -> Request {
    Request::Put(PutRequest {
        key: Bytes::copy_from_slice(key.as_bytes()),
        value: Bytes::copy_from_slice(value.as_bytes()),
        ..Default::default()
    })
}

fn delete(key: &str) -> Request {
    Request::DeleteRange(DeleteRangeRequest {
        range: KeyRange {
            key: Bytes::copy_from_slice(key.as_bytes()),
            range_end: Bytes::new(),
        },
        ..Default::default()
    })
}

/// A random history: puts and deletes over a few keys, and a compaction now and then.
fn history() -> impl Strategy<Value = Vec<Request>> {
    let op = prop_oneof![
        4 => (0..6u8, 0..4u8).prop_map(|(k, v)| put(&format!("k{k}"), &format!("v{v}"))),
        1 => (0..6u8).prop_map(|k| delete(&format!("k{k}"))),
        1 => Just(Request::Compact(0)),
    ];
    proptest::collection::vec(op, 1..60)
}

/// Apply, turning `Compact(0)` into a compaction at half the current revision.
fn apply_all(ops: &[Request]) -> Vec<Store> {
    let mut s = Store::new();
    let mut states = vec![s.clone()];
    for op in ops {
        let op = match op {
            Request::Compact(_) => Request::Compact(s.revision() / 2 + 1),
            op => op.clone(),
        };
        let _ = s.apply(&op);
        states.push(s.clone());
    }
    states
}

proptest! {
    #[test]
    fn members_that_applied_the_same_log_agree(ops in history()) {
        let states = apply_all(&ops);
        let last = states.last().unwrap();
        // A member restored from a snapshot agrees with one that applied everything.
        let restored = Store::restore(&last.snapshot()).unwrap();
        prop_assert_eq!(restored.hash_kv(0).unwrap(), last.hash_kv(0).unwrap());
        // A member that stopped at an earlier revision (with the same compaction) hashes
        // that revision as the member further ahead does.
        for earlier in &states {
            if earlier.compact_revision() != last.compact_revision()
                || earlier.revision() <= last.compact_revision()
            {
                continue;
            }
            let rev = earlier.revision();
            prop_assert_eq!(earlier.hash_kv(rev).unwrap(), last.hash_kv(rev).unwrap());
        }
    }

    /// Values moved to other memory (as a member moves them into the snapshot file it
    /// wrote), a few keys at a time, leave the store, its hash and its answers as they
    /// were, and only the values asked for move.
    #[test]
    fn rehomed_values_change_nothing_but_where_they_live(ops in history(), step in 1..4usize) {
        let before = apply_all(&ops).pop().unwrap();
        let mut after = before.clone();
        let arena: std::cell::RefCell<Vec<Bytes>> = Default::default();
        let wants = |v: &Bytes| v.ends_with(b"1") || v.ends_with(b"3");
        let (mut moved, mut at) = (0, None);
        loop {
            let (m, next) = after.rehome_values(at.as_ref(), step, wants, |v| {
                let copy = Bytes::copy_from_slice(v);
                arena.borrow_mut().push(copy.clone());
                copy
            });
            moved += m;
            match next {
                Some(k) => at = Some(k),
                None => break,
            }
        }
        let expected: u64 = before.values().filter(|v| wants(v)).map(|v| v.len() as u64).sum();
        prop_assert_eq!(moved, expected);
        prop_assert_eq!(&after, &before);
        prop_assert_eq!(after.hash_kv(0).unwrap(), before.hash_kv(0).unwrap());
        let arena = arena.borrow();
        for v in after.values() {
            let in_arena = arena.iter().any(|a| a.as_ptr() == v.as_ptr());
            prop_assert_eq!(in_arena, wants(v));
        }
    }

    /// The values a snapshot holds come out as slices of it, in the store's order.
    #[test]
    fn snapshot_values_are_the_stores_values_in_order(ops in history()) {
        let store = apply_all(&ops).pop().unwrap();
        let snap = store.snapshot();
        let values: Vec<Bytes> = Store::snapshot_values(&snap).unwrap().collect::<Result<_>>().unwrap();
        let expected: Vec<&Bytes> = store.values().collect();
        prop_assert_eq!(values.iter().collect::<Vec<_>>(), expected);
        let range = snap.as_ptr() as usize..snap.as_ptr() as usize + snap.len();
        for v in &values {
            prop_assert!(v.is_empty() || range.contains(&(v.as_ptr() as usize)));
        }
    }
}

#[test]
fn a_different_value_or_a_missing_delete_changes_the_hash() {
    let mut a = Store::new();
    let mut b = Store::new();
    for s in [&mut a, &mut b] {
        s.apply(&put("x", "1")).unwrap();
        s.apply(&put("y", "2")).unwrap();
    }
    assert_eq!(a.hash_kv(0).unwrap(), b.hash_kv(0).unwrap());
    a.apply(&put("x", "3")).unwrap();
    b.apply(&put("x", "4")).unwrap();
    assert_ne!(a.hash_kv(0).unwrap().hash, b.hash_kv(0).unwrap().hash);
    // Up to the revision before the difference they still agree.
    assert_eq!(a.hash_kv(3).unwrap(), b.hash_kv(3).unwrap());

    let mut c = Store::new();
    let mut d = Store::new();
    c.apply(&put("x", "1")).unwrap();
    d.apply(&put("x", "1")).unwrap();
    c.apply(&delete("x")).unwrap();
    d.apply(&put("z", "1")).unwrap();
    assert_eq!(c.revision(), d.revision());
    assert_ne!(c.hash_kv(0).unwrap().hash, d.hash_kv(0).unwrap().hash);
}

#[test]
fn future_and_compacted_revisions_are_refused_as_etcd_refuses_them() {
    let mut s = Store::new();
    for i in 0..5 {
        s.apply(&put("k", &i.to_string())).unwrap();
    }
    assert_eq!(s.hash_kv(s.revision() + 1), Err(Error::FutureRevision));
    s.apply(&Request::Compact(4)).unwrap();
    assert_eq!(s.hash_kv(4), Err(Error::Compacted));
    assert_eq!(s.hash_kv(3), Err(Error::Compacted));
    let h = s.hash_kv(0).unwrap();
    assert_eq!((h.revision, h.compact_revision), (s.revision(), 4));
    assert_eq!(s.hash_kv(s.revision()).unwrap(), h);
    assert_ne!(s.hash_kv(5).unwrap().hash, h.hash);
}
