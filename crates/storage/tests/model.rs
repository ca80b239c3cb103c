//! Property test: the storage behaves like a simple in-memory model of a raft log across
//! random appends (with overwrites), hard-state changes, compactions, snapshot installs and
//! restarts. Segments are tiny, so rotation and segment deletion happen all the time.

use proptest::prelude::*;
use raft::{Entry, EntryKind, HardState, Snapshot, SnapshotMeta};
use storage::{Identity, Options, Storage};

const ID: Identity = Identity {
    cluster_id: 7,
    node_id: 2,
};

#[derive(Clone, Debug)]
enum Op {
    /// Append `n` entries starting `back` before the end (overwriting), maybe in a new term.
    Append {
        back: u64,
        n: u64,
        new_term: bool,
        size: usize,
    },
    Commit(u64),
    /// The application compacts at `k` entries past the snapshot point.
    Compact {
        k: u64,
        size: usize,
    },
    /// A snapshot from the leader at `ahead` entries past the end (0: within the log), either
    /// matching the log or of a newer term.
    Install {
        back_or_ahead: i64,
        conflict: bool,
    },
    Restart,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        5 => (0u64..4, 1u64..6, any::<bool>(), 8usize..200).prop_map(|(back, n, new_term, size)| Op::Append { back, n, new_term, size }),
        1 => (0u64..30).prop_map(Op::Commit),
        1 => (0u64..20, 0usize..3000).prop_map(|(k, size)| Op::Compact { k, size }),
        1 => (-5i64..5, any::<bool>()).prop_map(|(back_or_ahead, conflict)| Op::Install { back_or_ahead, conflict }),
        1 => Just(Op::Restart),
    ]
}

#[derive(Default)]
struct Model {
    snapshot: Option<Snapshot>,
    entries: Vec<Entry>,
    hard_state: HardState,
    term: u64,
}

impl Model {
    fn snap_index(&self) -> u64 {
        self.snapshot.as_ref().map_or(0, |s| s.meta.index)
    }
    fn last(&self) -> u64 {
        self.entries.last().map_or(self.snap_index(), |e| e.index)
    }
    fn term_at(&self, i: u64) -> Option<u64> {
        if i == self.snap_index() {
            return self.snapshot.as_ref().map(|s| s.meta.term);
        }
        self.entries.iter().find(|e| e.index == i).map(|e| e.term)
    }
}

fn snapshot(index: u64, term: u64, size: usize) -> Snapshot {
    Snapshot {
        meta: SnapshotMeta {
            index,
            term,
            membership: raft::Membership::new(vec![1, 2, 3]),
        },
        data: vec![(index % 251) as u8; size].into(),
    }
}

fn check(dir: &std::path::Path, m: &Model) -> Storage {
    let (s, state) = Storage::open(dir, ID, Options { segment_bytes: 512 }).unwrap();
    assert_eq!(state.snapshot, m.snapshot);
    assert_eq!(state.entries, m.entries);
    assert_eq!(state.hard_state, m.hard_state);
    s
}

fn run(ops: Vec<Op>) {
    let dir = tempfile::tempdir().unwrap();
    let mut m = Model::default();
    let mut s = check(dir.path(), &m);
    for op in ops {
        match op {
            Op::Append {
                back,
                n,
                new_term,
                size,
            } => {
                // Raft never overwrites a committed entry.
                let floor = m.snap_index().max(m.hard_state.commit) + 1;
                let start = (m.last() + 1).saturating_sub(back).max(floor);
                m.term += u64::from(new_term || m.term == 0);
                let new: Vec<Entry> = (start..start + n)
                    .map(|index| Entry {
                        term: m.term,
                        index,
                        kind: EntryKind::Normal,
                        data: vec![index as u8; size].into(),
                    })
                    .collect();
                m.entries.retain(|e| e.index < start);
                m.entries.extend(new.iter().cloned());
                m.hard_state.term = m.term;
                s.save(None, Some(m.hard_state), &new).unwrap();
            }
            Op::Commit(c) => {
                m.hard_state.commit = c.min(m.last());
                s.save(None, Some(m.hard_state), &[]).unwrap();
            }
            Op::Compact { k, size } => {
                let index = (m.snap_index() + k).min(m.last());
                if index <= m.snap_index() {
                    continue;
                }
                let snap = snapshot(index, m.term_at(index).unwrap(), size);
                s.sync().unwrap(); // only durable entries are compacted
                s.compact(&snap).unwrap();
                m.entries.retain(|e| e.index > index);
                m.snapshot = Some(snap);
            }
            Op::Install {
                back_or_ahead,
                conflict,
            } => {
                let index = (m.last() as i64 + back_or_ahead).max(m.snap_index() as i64 + 1) as u64;
                let term = match m.term_at(index) {
                    Some(t) if !conflict => t,
                    _ => {
                        m.term += 1;
                        m.term
                    }
                };
                let snap = snapshot(index, term, 100);
                // §7, as the core applies it.
                if m.term_at(index) == Some(term) {
                    m.entries.retain(|e| e.index > index);
                } else {
                    m.entries.clear();
                }
                m.snapshot = Some(snap.clone());
                m.hard_state.term = m.hard_state.term.max(term);
                m.hard_state.commit = index;
                s.save(Some(&snap), Some(m.hard_state), &[]).unwrap();
            }
            Op::Restart => {
                s.sync().unwrap();
                drop(s);
                s = check(dir.path(), &m);
            }
        }
    }
    s.sync().unwrap();
    drop(s);
    check(dir.path(), &m);
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 200, ..ProptestConfig::default() })]
    #[test]
    fn storage_matches_the_model(ops in prop::collection::vec(op(), 1..60)) {
        run(ops);
    }
}

#[test]
fn overwrites_across_segments() {
    use Op::*;
    let a = |back, n, size| Append {
        back,
        n,
        new_term: false,
        size,
    };
    run(vec![
        a(0, 2, 8),
        a(0, 5, 8),
        a(0, 5, 8),
        a(2, 1, 9),
        a(0, 5, 35),
        Commit(16),
        a(3, 1, 8),
        a(0, 1, 8),
        a(3, 1, 8),
        a(3, 1, 8),
        a(0, 1, 8),
    ]);
}

#[test]
fn compaction_after_rotation() {
    use Op::*;
    let a = |n, size| Append {
        back: 0,
        n,
        new_term: false,
        size,
    };
    run(vec![
        a(4, 61),
        Commit(4),
        a(2, 15),
        a(1, 116),
        a(1, 61),
        Compact { k: 2, size: 0 },
        a(1, 8),
        Compact { k: 6, size: 0 },
    ]);
}

/// Compaction deletes the segment holding the snapshot's mark; the mark must survive at
/// the head of a later segment.
#[test]
fn compaction_deletes_the_segment_that_held_the_mark() {
    use Op::*;
    let a = |back, n, size| Append {
        back,
        n,
        new_term: false,
        size,
    };
    run(vec![
        a(0, 3, 104),
        Compact { k: 1, size: 0 },
        a(1, 1, 13),
        Commit(0),
        a(0, 4, 26),
        Compact { k: 6, size: 0 },
        a(0, 1, 8),
        Restart,
    ]);
}
