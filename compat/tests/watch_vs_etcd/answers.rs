//! Answers as compared: revisions translated back to etcd's numbering, then every field
//! rendered as text but the header's cluster id, member id and raft term (random, or
//! counting elections). Text, so that a difference is printed as it is found.

use crate::requests::from_side;
use etcd_client::proto::{PbEvent, PbKeyValue, PbResponseHeader, PbTxnOpResponse, PbWatchResponse};
use std::fmt::Write as _;

pub fn fix_header(h: &mut Option<PbResponseHeader>, off: i64) {
    if let Some(h) = h {
        h.revision = from_side(off, h.revision);
    }
}

pub fn fix_kv(kv: &mut PbKeyValue, off: i64) {
    kv.create_revision = from_side(off, kv.create_revision);
    kv.mod_revision = from_side(off, kv.mod_revision);
}

pub fn fix_watch(r: &mut PbWatchResponse, off: i64) {
    fix_header(&mut r.header, off);
    r.compact_revision = from_side(off, r.compact_revision);
    for e in &mut r.events {
        if let Some(kv) = &mut e.kv {
            fix_kv(kv, off);
        }
        if let Some(kv) = &mut e.prev_kv {
            fix_kv(kv, off);
        }
    }
}

pub fn value(b: &[u8]) -> String {
    if b.len() <= 40 {
        format!("{:?}", String::from_utf8_lossy(b))
    } else {
        // FNV-1a: long values by length and digest.
        let h = b.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, x| {
            (h ^ u64::from(*x)).wrapping_mul(0x100_0000_01b3)
        });
        format!("<{} bytes {h:016x}>", b.len())
    }
}

pub fn kv(k: &PbKeyValue) -> String {
    format!(
        "{{key {} create {} mod {} version {} value {} lease {}}}",
        value(&k.key),
        k.create_revision,
        k.mod_revision,
        k.version,
        value(&k.value),
        k.lease
    )
}

pub fn kvs(ks: &[PbKeyValue]) -> String {
    ks.iter().map(kv).collect::<Vec<_>>().join(", ")
}

pub fn header(h: &Option<PbResponseHeader>) -> String {
    match h {
        Some(h) => format!("rev {}", h.revision),
        None => "no header".into(),
    }
}

pub fn event(e: &PbEvent) -> String {
    let t = match e.r#type {
        0 => "PUT".to_string(),
        1 => "DELETE".to_string(),
        t => format!("type {t}"),
    };
    let k = e.kv.as_ref().map_or("no kv".into(), kv);
    match &e.prev_kv {
        Some(p) => format!("{t} {k} prev {}", kv(p)),
        None => format!("{t} {k}"),
    }
}

pub fn watch_response(r: &PbWatchResponse) -> String {
    let mut s = format!(
        "{} id {} created {} canceled {} compact_revision {} cancel_reason {:?} fragment {}",
        header(&r.header),
        r.watch_id,
        r.created,
        r.canceled,
        r.compact_revision,
        r.cancel_reason,
        r.fragment
    );
    for e in &r.events {
        let _ = write!(s, "\n      {}", event(e));
    }
    s
}

/// A remaining TTL, marked (`~`) to be compared within a second when it counts down;
/// -1 (no such lease) is exact.
pub fn remaining(ttl: i64) -> String {
    if ttl >= 0 {
        format!("~{ttl}")
    } else {
        ttl.to_string()
    }
}

/// Two rendered answers agree: the same but for remaining TTLs (`~N`), which may be a
/// second apart (the two clusters' lease clocks started a moment apart).
pub fn same_answer(a: &str, b: &str) -> bool {
    fn split(s: &str) -> (String, Vec<i64>) {
        let mut text = String::new();
        let mut nums = Vec::new();
        let mut rest = s;
        while let Some(at) = rest.find('~') {
            text.push_str(&rest[..=at]);
            rest = &rest[at + 1..];
            let end = rest
                .find(|c: char| !c.is_ascii_digit())
                .unwrap_or(rest.len());
            nums.push(rest[..end].parse().unwrap_or(-1));
            rest = &rest[end..];
        }
        text.push_str(rest);
        (text, nums)
    }
    let ((ta, na), (tb, nb)) = (split(a), split(b));
    ta == tb && na.len() == nb.len() && na.iter().zip(&nb).all(|(x, y)| (x - y).abs() <= 1)
}

pub fn fix_txn(t: &mut etcd_client::proto::PbTxnResponse, off: i64) {
    fix_header(&mut t.header, off);
    for r in &mut t.responses {
        match &mut r.response {
            Some(PbTxnOpResponse::ResponseRange(g)) => {
                fix_header(&mut g.header, off);
                g.kvs.iter_mut().for_each(|k| fix_kv(k, off));
            }
            Some(PbTxnOpResponse::ResponsePut(p)) => {
                fix_header(&mut p.header, off);
                if let Some(k) = &mut p.prev_kv {
                    fix_kv(k, off);
                }
            }
            Some(PbTxnOpResponse::ResponseDeleteRange(d)) => {
                fix_header(&mut d.header, off);
                d.prev_kvs.iter_mut().for_each(|k| fix_kv(k, off));
            }
            Some(PbTxnOpResponse::ResponseTxn(t)) => fix_txn(t, off),
            None => {}
        }
    }
}

/// A transaction's answer. `inner` renders the headers of the answers inside it (see
/// main.rs's header for why the sequence test leaves them out).
pub fn render_txn(t: &etcd_client::proto::PbTxnResponse, depth: usize, inner: bool) -> String {
    let pad = "  ".repeat(depth + 3);
    let own = if depth == 0 || inner {
        header(&t.header)
    } else {
        "-".to_string()
    };
    let header = |h: &Option<PbResponseHeader>| {
        if inner {
            header(h)
        } else {
            "-".to_string()
        }
    };
    let mut s = format!("{own} succeeded {}", t.succeeded);
    for r in &t.responses {
        let one = match &r.response {
            Some(PbTxnOpResponse::ResponseRange(g)) => format!(
                "range {} count {} more {} [{}]",
                header(&g.header),
                g.count,
                g.more,
                kvs(&g.kvs)
            ),
            Some(PbTxnOpResponse::ResponsePut(p)) => format!(
                "put {} prev {}",
                header(&p.header),
                p.prev_kv.as_ref().map_or("none".into(), kv)
            ),
            Some(PbTxnOpResponse::ResponseDeleteRange(d)) => format!(
                "delete {} deleted {} prev [{}]",
                header(&d.header),
                d.deleted,
                kvs(&d.prev_kvs)
            ),
            Some(PbTxnOpResponse::ResponseTxn(t)) => {
                format!("txn {}", render_txn(t, depth + 1, inner))
            }
            None => "empty response op".into(),
        };
        let _ = write!(s, "\n{pad}{one}");
    }
    s
}
