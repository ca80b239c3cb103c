//! Property tests: the store against a naive model that keeps every write and recomputes
//! any past state from scratch; snapshot/restore round trips; determinism.

use bytes::Bytes;
use kv::*;
use proptest::prelude::*;

const KEYS: [&str; 5] = ["a", "ab", "b", "c", "cz"];

#[derive(Clone, Debug)]
enum Op {
    Put(usize, u8),
    Delete(usize, Option<usize>),
    /// Put if the key's version equals `v`, else delete another key.
    CasTxn(usize, i64, u8, usize),
    Compact(u8),
    ReadAt(u8),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        5 => (0..5usize, any::<u8>()).prop_map(|(k, v)| Op::Put(k, v)),
        2 => (0..5usize, prop::option::of(0..5usize)).prop_map(|(k, e)| Op::Delete(k, e)),
        2 => (0..5usize, 0..3i64, any::<u8>(), 0..5usize).prop_map(|(k, v, x, o)| Op::CasTxn(k, v, x, o)),
        1 => any::<u8>().prop_map(Op::Compact),
        3 => any::<u8>().prop_map(Op::ReadAt),
    ]
}

fn key(i: usize) -> Bytes {
    Bytes::from_static(KEYS[i].as_bytes())
}

/// Every write ever made: (revision, key, value or deletion).
#[derive(Default)]
struct Model {
    writes: Vec<(Revision, Bytes, Option<Bytes>)>,
    revision: Revision,
}

impl Model {
    /// The live keys at `rev`, computed from scratch.
    fn state_at(&self, rev: Revision) -> Vec<KeyValue> {
        let mut live: std::collections::BTreeMap<Bytes, KeyValue> = Default::default();
        for (r, k, v) in self.writes.iter().filter(|w| w.0 <= rev) {
            match v {
                None => {
                    live.remove(k);
                }
                Some(v) => {
                    let prev = live.get(k);
                    let kv = KeyValue {
                        key: k.clone(),
                        create_revision: prev.map_or(*r, |p| p.create_revision),
                        mod_revision: *r,
                        version: prev.map_or(1, |p| p.version + 1),
                        value: v.clone(),
                        lease: 0,
                    };
                    live.insert(k.clone(), kv);
                }
            }
        }
        live.into_values().collect()
    }

    /// What revision `rev` changed, in the order it changed it.
    fn events_at(&self, rev: Revision) -> Vec<Event> {
        let find = |at: Revision, k: &Bytes| self.state_at(at).into_iter().find(|kv| kv.key == *k);
        self.writes
            .iter()
            .filter(|w| w.0 == rev)
            .map(|(_, k, v)| Event {
                kind: if v.is_some() {
                    EventKind::Put
                } else {
                    EventKind::Delete
                },
                kv: find(rev, k).unwrap_or(KeyValue {
                    key: k.clone(),
                    mod_revision: rev,
                    ..Default::default()
                }),
                prev_kv: find(rev - 1, k),
            })
            .collect()
    }

    fn version(&self, k: &Bytes) -> i64 {
        self.state_at(self.revision)
            .iter()
            .find(|kv| kv.key == *k)
            .map_or(0, |kv| kv.version)
    }
}

fn all_at(s: &Store, rev: Revision) -> Result<Vec<KeyValue>> {
    let req = RangeRequest {
        range: KeyRange {
            key: Bytes::from_static(b"\0"),
            range_end: Bytes::from_static(b"\0"),
        },
        revision: rev,
        ..Default::default()
    };
    s.range(&req, s.revision()).map(|r| r.kvs)
}

fn run(ops: Vec<Op>) {
    let mut s = Store::new();
    // A new store is at revision 1 (etcd's): its first write is revision 2.
    let mut m = Model {
        revision: 1,
        ..Model::default()
    };
    for op in ops {
        match op {
            Op::Put(k, v) => {
                let req = PutRequest {
                    key: key(k),
                    value: Bytes::from(vec![v]),
                    ..Default::default()
                };
                s.apply(&Request::Put(req)).unwrap();
                m.revision += 1;
                m.writes
                    .push((m.revision, key(k), Some(Bytes::from(vec![v]))));
            }
            Op::Delete(k, end) => {
                let range_end = end.map_or(Bytes::new(), key);
                let range = KeyRange {
                    key: key(k),
                    range_end: range_end.clone(),
                };
                s.apply(&Request::DeleteRange(DeleteRangeRequest {
                    range,
                    prev_kv: false,
                }))
                .unwrap();
                let live: Vec<Bytes> = m
                    .state_at(m.revision)
                    .into_iter()
                    .map(|kv| kv.key)
                    .filter(|kk| {
                        if range_end.is_empty() {
                            *kk == key(k)
                        } else {
                            *kk >= key(k) && *kk < range_end
                        }
                    })
                    .collect();
                if !live.is_empty() {
                    m.revision += 1;
                    for kk in live {
                        m.writes.push((m.revision, kk, None));
                    }
                }
            }
            Op::CasTxn(k, v, x, other) => {
                let t = TxnRequest {
                    compare: vec![Compare {
                        range: KeyRange {
                            key: key(k),
                            range_end: Bytes::new(),
                        },
                        result: CompareResult::Equal,
                        target: CompareTarget::Version(v),
                    }],
                    success: vec![RequestOp::Put(PutRequest {
                        key: key(k),
                        value: Bytes::from(vec![x]),
                        ..Default::default()
                    })],
                    failure: vec![RequestOp::DeleteRange(DeleteRangeRequest {
                        range: KeyRange {
                            key: key(other),
                            range_end: Bytes::new(),
                        },
                        prev_kv: false,
                    })],
                };
                let succeeded = m.version(&key(k)) == v;
                let resp = s.apply(&Request::Txn(t)).unwrap();
                assert_eq!(
                    resp,
                    match &resp {
                        Response::Txn(r) if r.succeeded == succeeded => resp.clone(),
                        _ => panic!("txn branch differs from the model"),
                    }
                );
                if succeeded {
                    m.revision += 1;
                    m.writes
                        .push((m.revision, key(k), Some(Bytes::from(vec![x]))));
                } else if m.version(&key(other)) > 0 {
                    m.revision += 1;
                    m.writes.push((m.revision, key(other), None));
                }
            }
            Op::Compact(r) => {
                let rev = r as i64 % (m.revision + 1);
                let floor = s.compact_revision();
                let res = s.apply(&Request::Compact(rev));
                assert_eq!(
                    res.is_ok(),
                    rev > floor,
                    "compact to {rev} with floor {floor}"
                );
            }
            Op::ReadAt(r) => {
                let rev = r as i64 % (m.revision + 1);
                match all_at(&s, rev) {
                    Ok(kvs) => {
                        let want = m.state_at(if rev == 0 { m.revision } else { rev });
                        assert_eq!(kvs, want, "read at {rev}");
                    }
                    Err(Error::Compacted) => assert!(rev < s.compact_revision()),
                    Err(e) => panic!("{e}"),
                }
            }
        }
        assert_eq!(s.revision(), m.revision);
    }
    // Snapshot round trip: same state, same bytes, same answers.
    let snap = s.snapshot();
    let restored = Store::restore(&snap).unwrap();
    assert_eq!(restored, s);
    assert_eq!(restored.snapshot(), snap);
    for rev in s.compact_revision().max(1)..=s.revision() {
        assert_eq!(all_at(&restored, rev).unwrap(), m.state_at(rev));
    }
    // Every revision's events, from the store and from its restored copy, are the model's
    // writes of that revision in the order they were made.
    assert_eq!(s.first_event_revision(), s.compact_revision().max(1));
    for rev in s.first_event_revision()..=s.revision() {
        let mut want = m.events_at(rev);
        if rev == s.compact_revision() {
            // Compaction keeps the live values of its revision, without what preceded them.
            want.retain(|e| e.kind == EventKind::Put);
            want.iter_mut().for_each(|e| e.prev_kv = None);
        }
        assert_eq!(s.events_at(rev, None), want, "events of revision {rev}");
        assert_eq!(
            restored.events_at(rev, None),
            want,
            "restored events of {rev}"
        );
        let one = KeyRange {
            key: key(1),
            range_end: Bytes::new(),
        };
        want.retain(|e| e.kv.key == key(1));
        assert_eq!(s.events_at(rev, Some(&one)), want);
    }
    assert!(s.events_at(s.revision() + 1, None).is_empty());
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 300, ..ProptestConfig::default() })]
    #[test]
    fn store_matches_a_full_history_model(ops in prop::collection::vec(op(), 1..80)) {
        run(ops);
    }

    /// Garbage never panics the snapshot decoder.
    #[test]
    fn restore_rejects_garbage_without_panicking(data in prop::collection::vec(any::<u8>(), 0..200)) {
        let mut bytes = if data.first().is_some_and(|b| b % 2 == 0) { b"RKVKV001".to_vec() } else { b"RKVKV002".to_vec() };
        bytes.extend(data);
        let _ = Store::restore(&Bytes::from(bytes));
    }
}

#[test]
fn the_same_requests_give_the_same_state() {
    let ops: Vec<Op> = (0..200)
        .map(|i| match i % 4 {
            0 => Op::Put(i % 5, i as u8),
            1 => Op::CasTxn(i % 5, 1, i as u8, (i + 1) % 5),
            2 => Op::Delete(i % 5, None),
            _ => Op::Put((i + 2) % 5, 7),
        })
        .collect();
    let build = |ops: &[Op]| {
        let mut s = Store::new();
        for op in ops {
            if let Op::Put(k, v) = op {
                let req = PutRequest {
                    key: key(*k),
                    value: Bytes::from(vec![*v]),
                    ..Default::default()
                };
                s.apply(&Request::Put(req)).unwrap();
            }
        }
        s.snapshot()
    };
    assert_eq!(build(&ops), build(&ops));
    run(ops);
}
