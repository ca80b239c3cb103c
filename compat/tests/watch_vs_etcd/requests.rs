//! The requests both sides are sent, in etcd's revision numbering (each side translates
//! to its own when it sends one: see `to_side`), and how each becomes an etcd-client call's
//! options. Plain data, so that a sequence can be generated, printed and replayed.

use etcd_client::{
    Compare, CompareOp, DeleteOptions, GetOptions, PutOptions, SortOrder, SortTarget, Txn, TxnOp,
    WatchFilterType, WatchOptions,
};

/// `[key, end)` as sent: `end` empty for one key, `"\0"` for everything from `key`.
#[derive(Clone, Debug)]
pub struct Span {
    pub key: Vec<u8>,
    pub end: Vec<u8>,
}

impl Span {
    pub fn show(&self) -> String {
        format!(
            "[{}, {})",
            String::from_utf8_lossy(&self.key).escape_debug(),
            String::from_utf8_lossy(&self.end).escape_debug()
        )
    }
    /// Whether a key is in it, with etcd's reading of an empty key and of `"\0"`.
    pub fn holds(&self, k: &[u8]) -> bool {
        let key: &[u8] = if self.key.is_empty() {
            b"\0"
        } else {
            &self.key
        };
        match &self.end[..] {
            [] => k == key,
            [0] => k >= key,
            e => k >= key && k < e,
        }
    }
}

pub fn prefix_end(p: &[u8]) -> Vec<u8> {
    let mut e = p.to_vec();
    while let Some(last) = e.pop() {
        if last < 0xff {
            e.push(last + 1);
            return e;
        }
    }
    vec![0]
}

#[derive(Clone, Debug, Default)]
pub struct RangeOpts {
    pub revision: i64,
    pub limit: i64,
    pub keys_only: bool,
    pub count_only: bool,
    pub sort: Option<(u8, u8)>,
    pub min_mod: i64,
    pub max_create: i64,
}

#[derive(Clone, Debug)]
pub enum Target {
    Value(String),
    Version(i64),
    Create(i64),
    Mod(i64),
    Lease(i64),
}

#[derive(Clone, Debug)]
pub struct Cmp {
    pub span: Span,
    pub target: Target,
    pub op: u8,
}

#[derive(Clone, Debug)]
pub enum TOp {
    /// Key, value, prev_kv, lease.
    Put(String, String, bool, i64),
    Get(Span, RangeOpts),
    Delete(Span, bool),
    Txn(Box<TxnSpec>),
}

#[derive(Clone, Debug)]
pub struct TxnSpec {
    pub when: Vec<Cmp>,
    pub then: Vec<TOp>,
    pub els: Vec<TOp>,
}

#[derive(Clone, Debug)]
pub struct WatchSpec {
    pub span: Span,
    pub start: i64,
    pub prev_kv: bool,
    pub no_put: bool,
    pub no_delete: bool,
    pub id: i64,
    pub fragment: bool,
    pub progress_notify: bool,
}

#[derive(Clone, Debug)]
pub enum Req {
    Put {
        m: usize,
        key: String,
        value: String,
        prev_kv: bool,
        ignore_value: bool,
        lease: i64,
        ignore_lease: bool,
    },
    Delete {
        m: usize,
        span: Span,
        prev_kv: bool,
    },
    Get {
        m: usize,
        span: Span,
        opts: RangeOpts,
    },
    Txn {
        m: usize,
        txn: TxnSpec,
    },
    Compact {
        m: usize,
        revision: i64,
        physical: bool,
    },
    LeaseGrant {
        m: usize,
        id: i64,
        ttl: i64,
    },
    LeaseRevoke {
        m: usize,
        id: i64,
    },
    /// LeaseTimeToLive, with the keys or without.
    LeaseTtl {
        m: usize,
        id: i64,
        keys: bool,
    },
    LeaseLeases {
        m: usize,
    },
    /// Two keep-alive requests on a new stream, and the second's answer.
    LeaseKeepAlive {
        m: usize,
        id: i64,
    },
}

impl Req {
    pub fn member(&self) -> usize {
        match self {
            Req::Put { m, .. }
            | Req::Delete { m, .. }
            | Req::Get { m, .. }
            | Req::Txn { m, .. }
            | Req::Compact { m, .. }
            | Req::LeaseGrant { m, .. }
            | Req::LeaseRevoke { m, .. }
            | Req::LeaseTtl { m, .. }
            | Req::LeaseLeases { m }
            | Req::LeaseKeepAlive { m, .. } => *m,
        }
    }

    /// Whether it asks a member's lease state (kept by each member as it applies the log,
    /// or by the leader), not a write or a KV read.
    pub fn reads_leases(&self) -> bool {
        matches!(
            self,
            Req::LeaseTtl { .. } | Req::LeaseLeases { .. } | Req::LeaseKeepAlive { .. }
        )
    }
}

/// etcd's revisions to a side's: that side's revision + `off` is etcd's. 0 (latest, now,
/// none) is kept; the generator never asks for revision 1 (etcd's empty store).
pub fn to_side(off: i64, r: i64) -> i64 {
    if r > 1 {
        r - off
    } else {
        r
    }
}

pub fn from_side(off: i64, r: i64) -> i64 {
    if r > 0 {
        r + off
    } else {
        r
    }
}

pub fn cmp_op(op: u8) -> CompareOp {
    [
        CompareOp::Equal,
        CompareOp::Greater,
        CompareOp::Less,
        CompareOp::NotEqual,
    ][op as usize]
}

pub fn get_options(span: &Span, o: &RangeOpts, off: i64) -> GetOptions {
    let mut g = GetOptions::new();
    if !span.end.is_empty() {
        g = g.with_range(span.end.clone());
    }
    if o.revision != 0 {
        g = g.with_revision(to_side(off, o.revision));
    }
    if o.limit != 0 {
        g = g.with_limit(o.limit);
    }
    if o.keys_only {
        g = g.with_keys_only();
    }
    if o.count_only {
        g = g.with_count_only();
    }
    if let Some((t, ord)) = o.sort {
        let t = [
            SortTarget::Key,
            SortTarget::Version,
            SortTarget::Create,
            SortTarget::Mod,
            SortTarget::Value,
        ][t as usize];
        let ord = [SortOrder::None, SortOrder::Ascend, SortOrder::Descend][ord as usize];
        g = g.with_sort(t, ord);
    }
    if o.min_mod != 0 {
        g = g.with_min_mod_revision(to_side(off, o.min_mod));
    }
    if o.max_create != 0 {
        g = g.with_max_create_revision(to_side(off, o.max_create));
    }
    g
}

pub fn delete_options(span: &Span, prev_kv: bool) -> DeleteOptions {
    let mut d = DeleteOptions::new();
    if !span.end.is_empty() {
        d = d.with_range(span.end.clone());
    }
    if prev_kv {
        d = d.with_prev_key();
    }
    d
}

pub fn put_options(
    prev_kv: bool,
    ignore_value: bool,
    lease: i64,
    ignore_lease: bool,
) -> PutOptions {
    let mut p = PutOptions::new();
    if prev_kv {
        p = p.with_prev_key();
    }
    if ignore_value {
        p = p.with_ignore_value();
    }
    if lease != 0 {
        p = p.with_lease(lease);
    }
    if ignore_lease {
        p = p.with_ignore_lease();
    }
    p
}

pub fn build_txn(t: &TxnSpec, off: i64) -> Txn {
    let when: Vec<Compare> = t
        .when
        .iter()
        .map(|c| {
            let (k, op) = (c.span.key.clone(), cmp_op(c.op));
            let cmp = match &c.target {
                Target::Value(v) => Compare::value(k, op, v.clone()),
                Target::Version(v) => Compare::version(k, op, *v),
                Target::Create(r) => Compare::create_revision(k, op, to_side(off, *r)),
                Target::Mod(r) => Compare::mod_revision(k, op, to_side(off, *r)),
                Target::Lease(l) => Compare::lease(k, op, *l),
            };
            if c.span.end.is_empty() {
                cmp
            } else {
                cmp.with_range(c.span.end.clone())
            }
        })
        .collect();
    let ops = |ops: &[TOp]| -> Vec<TxnOp> {
        ops.iter()
            .map(|op| match op {
                TOp::Put(k, v, prev, lease) => TxnOp::put(
                    k.clone(),
                    v.clone(),
                    Some(put_options(*prev, false, *lease, false)),
                ),
                TOp::Get(s, o) => TxnOp::get(s.key.clone(), Some(get_options(s, o, off))),
                TOp::Delete(s, prev) => {
                    TxnOp::delete(s.key.clone(), Some(delete_options(s, *prev)))
                }
                TOp::Txn(inner) => TxnOp::txn(build_txn(inner, off)),
            })
            .collect()
    };
    Txn::new()
        .when(when)
        .and_then(ops(&t.then))
        .or_else(ops(&t.els))
}

pub fn watch_options(w: &WatchSpec, off: i64) -> WatchOptions {
    let mut o = WatchOptions::new();
    if !w.span.end.is_empty() {
        o = o.with_range(w.span.end.clone());
    }
    if w.start != 0 {
        o = o.with_start_revision(to_side(off, w.start));
    }
    if w.prev_kv {
        o = o.with_prev_key();
    }
    let mut filters = Vec::new();
    if w.no_put {
        filters.push(WatchFilterType::NoPut);
    }
    if w.no_delete {
        filters.push(WatchFilterType::NoDelete);
    }
    if !filters.is_empty() {
        o = o.with_filters(filters);
    }
    if w.id != 0 {
        o = o.with_watch_id(w.id);
    }
    if w.fragment {
        o = o.with_fragment();
    }
    if w.progress_notify {
        o = o.with_progress_notify();
    }
    o
}

pub fn watch_spec(span: Span) -> WatchSpec {
    WatchSpec {
        span,
        start: 0,
        prev_kv: false,
        no_put: false,
        no_delete: false,
        id: 0,
        fragment: false,
        progress_notify: false,
    }
}

pub fn one(key: &str) -> Span {
    Span {
        key: key.as_bytes().to_vec(),
        end: vec![],
    }
}

pub fn span(key: &str, end: &[u8]) -> Span {
    Span {
        key: key.as_bytes().to_vec(),
        end: end.to_vec(),
    }
}

pub fn put(key: &str, value: &str) -> Req {
    Req::Put {
        m: 0,
        key: key.into(),
        value: value.into(),
        prev_kv: false,
        ignore_value: false,
        lease: 0,
        ignore_lease: false,
    }
}

pub fn txn(when: Vec<Cmp>, then: Vec<TOp>, els: Vec<TOp>) -> Req {
    Req::Txn {
        m: 0,
        txn: TxnSpec { when, then, els },
    }
}
