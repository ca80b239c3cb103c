//! The random sequence: a seeded generator, and each next step drawn from what etcd has
//! answered so far (its revision, its compaction, the leases it holds, the watchers open
//! on each stream). The same seed draws the same steps.

use crate::requests::*;
use crate::run::{Action, Run};
use crate::streams::Slot;
use crate::MEMBERS;
use std::collections::BTreeSet;

pub const KEYS: &[&str] = &["a", "b", "c", "d", "e", "p/1", "p/2", "p/3", "p/x/1", "z"];
/// Keys written now and then only, and range ends.
pub const OTHER: &[&str] = &["c1", "p0", "q", "zz"];

/// A small deterministic generator (splitmix64): the seed is its state.
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
    /// Uniform in `lo..=hi` (`lo` when the range is empty).
    pub fn within(&mut self, lo: i64, hi: i64) -> i64 {
        if hi <= lo {
            lo
        } else {
            lo + self.below((hi - lo + 1) as u64) as i64
        }
    }
    pub fn percent(&mut self, p: u64) -> bool {
        self.below(100) < p
    }
    pub fn pick<'a, T>(&mut self, xs: &'a [T]) -> &'a T {
        &xs[self.below(xs.len() as u64) as usize]
    }
}

/// What the generator knows, from etcd's answers.
pub struct Model {
    pub rev: i64,
    pub compact: i64,
    /// Whether a watcher from the past was created since the last compaction.
    pub from_past: bool,
    /// None in a sequence without lease steps (which then draws exactly what it drew before
    /// there were any); else the leases etcd holds: granted, not revoked, not expired.
    pub leases: Option<BTreeSet<i64>>,
}

impl Model {
    /// A fresh store at revision `rev`; `leases`: whether the sequence has lease steps.
    pub fn new(rev: i64, leases: bool) -> Model {
        Model {
            rev,
            compact: 0,
            from_past: false,
            leases: leases.then(BTreeSet::new),
        }
    }
}

/// Client-chosen lease ids: a few, so that grants meet existing ones ("lease already
/// exists"), and the extremes.
pub const LEASE_IDS: &[i64] = &[1, 2, 3, 4, 5, 6, i64::MAX];
/// An id no sequence grants.
pub const NO_LEASE: i64 = 99;

/// A lease for a put: a live one, now and then one that does not exist, else none.
pub fn gen_lease(rng: &mut Rng, leases: &BTreeSet<i64>, live: u64) -> i64 {
    let live_ids: Vec<i64> = leases.iter().copied().collect();
    match rng.below(100) {
        p if p < live && !live_ids.is_empty() => *rng.pick(&live_ids),
        p if p >= 95 => NO_LEASE,
        _ => 0,
    }
}

/// A lease id to ask about: mostly a live one.
pub fn gen_known_lease(rng: &mut Rng, leases: &BTreeSet<i64>) -> i64 {
    let live: Vec<i64> = leases.iter().copied().collect();
    if live.is_empty() || rng.percent(15) {
        let any = *rng.pick(LEASE_IDS);
        *rng.pick(&[NO_LEASE, any])
    } else {
        *rng.pick(&live)
    }
}

pub fn gen_value(rng: &mut Rng) -> String {
    match rng.below(20) {
        0 => String::new(),
        1 => "x".repeat(100 + rng.below(200) as usize),
        _ => format!("v{}", rng.below(12)),
    }
}

pub fn gen_key(rng: &mut Rng) -> String {
    if rng.percent(90) {
        rng.pick(KEYS).to_string()
    } else {
        rng.pick(OTHER).to_string()
    }
}

pub fn gen_span(rng: &mut Rng) -> Span {
    let any = |rng: &mut Rng| -> Vec<u8> {
        if rng.percent(75) {
            rng.pick(KEYS).as_bytes().to_vec()
        } else {
            rng.pick(OTHER).as_bytes().to_vec()
        }
    };
    match rng.below(10) {
        0..=3 => Span {
            key: gen_key(rng).into_bytes(),
            end: vec![],
        },
        4 | 5 => Span {
            key: any(rng),
            end: any(rng),
        },
        6 | 7 => {
            let p = rng.pick(&["p/", "p/x/", "a", "p"]).as_bytes().to_vec();
            Span {
                end: prefix_end(&p),
                key: p,
            }
        }
        8 => Span {
            key: any(rng),
            end: vec![0],
        },
        _ => Span {
            key: if rng.percent(50) { vec![0] } else { vec![] },
            end: vec![0],
        },
    }
}

/// A span for a write or a read: the empty key only now and then (both refuse it, "key
/// is not provided", before anything else).
pub fn gen_kv_span(rng: &mut Rng) -> Span {
    let mut s = gen_span(rng);
    if s.key.is_empty() && rng.percent(80) {
        s.key = vec![0];
    }
    s
}

pub fn gen_range_opts(rng: &mut Rng, m: &Model, with_revision: bool) -> RangeOpts {
    let mut o = RangeOpts::default();
    if with_revision && rng.percent(40) {
        let low = m.compact.max(2);
        o.revision = match rng.below(6) {
            0 if m.compact > 2 => m.compact - 1,
            1 => low,
            2 => m.rev + 1,
            _ => rng.within(low, m.rev.max(2)),
        };
    }
    if rng.percent(20) {
        o.limit = rng.within(1, 3);
    }
    o.keys_only = rng.percent(10);
    // (count_only with a limit: see main.rs's header.)
    o.count_only = o.limit == 0 && rng.percent(10);
    if rng.percent(25) {
        o.sort = Some((rng.below(5) as u8, rng.below(3) as u8));
    }
    // (A limit with sort order NONE on another target than the key: see main.rs's header.)
    if matches!(o.sort, Some((t, 0)) if t != 0) {
        o.limit = 0;
    }
    // (min_mod and max_create: see main.rs's header.)
    o
}

pub fn gen_cmp(rng: &mut Rng, m: &Model) -> Cmp {
    // One key (compares over ranges: see main.rs's header).
    let span = Span {
        key: gen_key(rng).into_bytes(),
        end: vec![],
    };
    let rev = |rng: &mut Rng| {
        if rng.percent(20) {
            0
        } else {
            rng.within(2, m.rev + 1)
        }
    };
    let target = match rng.below(4) {
        0 => Target::Value(gen_value(rng)),
        1 => Target::Version(rng.within(0, 3)),
        2 => Target::Create(rev(rng)),
        _ => Target::Mod(rev(rng)),
    };
    let target = match &m.leases {
        Some(leases) if rng.percent(20) => Target::Lease(gen_lease(rng, leases, 60)),
        _ => target,
    };
    Cmp {
        span,
        target,
        op: rng.below(4) as u8,
    }
}

pub fn gen_ops(rng: &mut Rng, m: &Model, depth: usize) -> Vec<TOp> {
    let n = rng.below(5) as usize;
    let mut written: Vec<String> = Vec::new();
    let mut ops = Vec::new();
    for _ in 0..n {
        let op = match rng.below(20) {
            0..=8 => {
                let k = gen_key(rng);
                // Writes to distinct keys, but now and then a duplicate (refused).
                if written.contains(&k) && rng.percent(80) {
                    continue;
                }
                written.push(k.clone());
                let lease = m.leases.as_ref().map_or(0, |l| gen_lease(rng, l, 30));
                TOp::Put(k, gen_value(rng), rng.percent(40), lease)
            }
            9..=13 => TOp::Get(gen_kv_span(rng), gen_range_opts(rng, m, false)),
            14..=17 => {
                let mut s = if rng.percent(70) {
                    Span {
                        key: gen_key(rng).into_bytes(),
                        end: vec![],
                    }
                } else {
                    gen_kv_span(rng)
                };
                // No delete from a key to the end in a transaction (etcd's check for
                // keys written twice misreads it: see main.rs's header).
                if s.end == [0] {
                    s.end = vec![];
                }
                let hit = written.iter().any(|w| s.holds(w.as_bytes()));
                if hit && rng.percent(80) {
                    continue;
                }
                TOp::Delete(s, rng.percent(40))
            }
            // One nested transaction at most, first: etcd's check for keys written twice
            // misses a put in one and a delete in a later one, and etcd evaluates a nested
            // transaction's compares before the enclosing one's writes (see main.rs's
            // header).
            _ if depth == 0 && ops.is_empty() => TOp::Txn(Box::new(gen_txn(rng, m, 1))),
            _ => continue,
        };
        ops.push(op);
    }
    ops
}

pub fn gen_txn(rng: &mut Rng, m: &Model, depth: usize) -> TxnSpec {
    let n = rng.below(3) as usize;
    TxnSpec {
        when: (0..n).map(|_| gen_cmp(rng, m)).collect(),
        then: gen_ops(rng, m, depth),
        els: gen_ops(rng, m, depth),
    }
}

pub fn gen_watch(rng: &mut Rng, m: &Model, ids: &[i64]) -> WatchSpec {
    let low = m.compact.max(2);
    let start = match rng.below(20) {
        0..=7 => 0,
        8 | 9 => m.rev,
        10 | 11 => m.rev + 1 + rng.below(3) as i64,
        12..=15 => rng.within(low, m.rev),
        16 | 17 => low,
        _ if m.compact > 2 => rng.within(2, m.compact - 1),
        _ => 0,
    };
    let (no_put, no_delete) = match rng.below(20) {
        0..=2 => (true, false),
        3..=5 => (false, true),
        6 => (true, true),
        _ => (false, false),
    };
    let id = match rng.below(10) {
        0..=5 => 0,
        // An id in use now and then: refused as a duplicate.
        6 if !ids.is_empty() => *rng.pick(ids),
        _ => rng.within(1, 8),
    };
    WatchSpec {
        span: gen_span(rng),
        start,
        prev_kv: rng.percent(50),
        no_put,
        no_delete,
        id,
        fragment: rng.percent(20),
        progress_notify: rng.percent(10),
    }
}

/// A lease step. Grants are long (no lease expires but by an `Expire` step).
pub fn gen_lease_action(rng: &mut Rng, leases: &BTreeSet<i64>) -> Action {
    let member = rng.below(u64::from(MEMBERS)) as usize;
    let req = match rng.below(100) {
        0..=24 => {
            let ttl = match rng.below(20) {
                0 => 9_000_000_000,
                1 => 9_000_000_001,
                _ => rng.within(600, 3600),
            };
            Req::LeaseGrant {
                m: member,
                id: *rng.pick(LEASE_IDS),
                ttl,
            }
        }
        25..=39 => Req::LeaseRevoke {
            m: member,
            id: gen_known_lease(rng, leases),
        },
        40..=59 => Req::LeaseTtl {
            m: member,
            id: gen_known_lease(rng, leases),
            keys: rng.percent(60),
        },
        60..=69 => Req::LeaseLeases { m: member },
        70..=87 => Req::LeaseKeepAlive {
            m: member,
            id: gen_known_lease(rng, leases),
        },
        _ => {
            // A lease that is not there, with a TTL at or below etcd's minimum (a second,
            // with the tests' election timeout) but now and then, and 0 to 3 keys put on
            // it: in one transaction when it lives a second, so that they are on it
            // before it expires.
            let free: Vec<i64> = LEASE_IDS
                .iter()
                .copied()
                .filter(|id| !leases.contains(id))
                .collect();
            let id = if free.is_empty() {
                NO_LEASE + 1
            } else {
                *rng.pick(&free)
            };
            let ttl = *rng.pick(&[-1, 0, 1, 1, 2]);
            let mut keys: Vec<String> = (0..rng.below(4)).map(|_| gen_key(rng)).collect();
            keys.sort();
            keys.dedup();
            let attach = if ttl <= 1 && !keys.is_empty() {
                let then = keys
                    .iter()
                    .map(|k| TOp::Put(k.clone(), gen_value(rng), false, id))
                    .collect();
                vec![Req::Txn {
                    m: member,
                    txn: TxnSpec {
                        when: vec![],
                        then,
                        els: vec![],
                    },
                }]
            } else {
                keys.iter()
                    .map(|k| Req::Put {
                        m: rng.below(u64::from(MEMBERS)) as usize,
                        key: k.clone(),
                        value: gen_value(rng),
                        prev_kv: rng.percent(50),
                        ignore_value: false,
                        lease: id,
                        ignore_lease: false,
                    })
                    .collect()
            };
            return Action::Expire {
                member,
                id,
                ttl,
                attach,
            };
        }
    };
    Action::Kv(req)
}

/// The next random step, from what etcd has answered so far.
pub fn gen_action(rng: &mut Rng, r: &Run) -> Option<Action> {
    let (m, etcd) = (&r.m, &r.etcd);
    if let Some(leases) = &m.leases {
        if rng.percent(25) {
            return Some(gen_lease_action(rng, leases));
        }
    }
    let member = rng.below(u64::from(MEMBERS)) as usize;
    let req = match rng.below(100) {
        0..=21 => {
            // ignore_value with no value, as it is meant (a value with it is refused,
            // differently: see main.rs's header).
            let key = gen_key(rng);
            let ignore_value = rng.percent(5);
            let value = if ignore_value {
                String::new()
            } else {
                gen_value(rng)
            };
            let prev_kv = rng.percent(50);
            // (A lease, or ignore_lease: refused with one, "key not found" for a key
            // that does not exist, else the key keeps its lease.)
            let (lease, ignore_lease) = match &m.leases {
                Some(l) => (gen_lease(rng, l, 40), rng.percent(8)),
                None => (0, false),
            };
            Req::Put {
                m: member,
                key,
                value,
                prev_kv,
                ignore_value,
                lease,
                ignore_lease,
            }
        }
        22..=31 => Req::Delete {
            m: member,
            span: gen_kv_span(rng),
            prev_kv: rng.percent(50),
        },
        32..=37 => Req::Get {
            m: member,
            span: gen_kv_span(rng),
            opts: gen_range_opts(rng, m, true),
        },
        38..=52 => Req::Txn {
            m: member,
            txn: gen_txn(rng, m, 0),
        },
        53..=56 => {
            let revision = match rng.below(8) {
                0 => m.compact.max(2),
                1 => m.rev + 1,
                _ => rng.within(m.compact.max(1) + 1, m.rev),
            };
            Req::Compact {
                m: member,
                revision,
                physical: rng.percent(30),
            }
        }
        57..=86 => {
            // A new stream, or another watcher on an existing one (at most 8 each).
            let open: Vec<usize> = (1..etcd.streams.len())
                .filter(|&s| etcd.streams[s].creates.len() < 8)
                .collect();
            let stream = if open.is_empty() || etcd.streams.len() < 7 && rng.percent(35) {
                None
            } else {
                Some(*rng.pick(&open))
            };
            let ids: Vec<i64> = match stream {
                Some(s) => etcd
                    .parsed(s)
                    .slots
                    .iter()
                    .filter(|x| x.open())
                    .filter_map(Slot::id)
                    .collect(),
                None => vec![],
            };
            let mut spec = gen_watch(rng, m, &ids);
            // Not from a compaction's revision that deleted a key: etcd drops that delete
            // from history when its compaction runs, which for a non-physical one is a
            // moment later (so a watch from there may or may not see it).
            if spec.start == m.compact
                && etcd
                    .history()
                    .iter()
                    .any(|(r, t, _)| *r == m.compact && *t == 1)
            {
                spec.start += 1;
            }
            return Some(Action::Watch {
                stream,
                member,
                spec,
            });
        }
        _ => {
            if etcd.streams.len() < 2 {
                return None;
            }
            let stream = rng.within(1, etcd.streams.len() as i64 - 1) as usize;
            let known: Vec<i64> = etcd
                .parsed(stream)
                .slots
                .iter()
                .filter_map(|x| x.id().filter(|id| *id >= 0))
                .collect();
            // A watcher's id (live, compacted or canceled already), or one never used.
            let id = if known.is_empty() || rng.percent(15) {
                rng.within(40, 50)
            } else {
                *rng.pick(&known)
            };
            return Some(Action::Cancel { stream, id });
        }
    };
    Some(Action::Kv(req))
}
