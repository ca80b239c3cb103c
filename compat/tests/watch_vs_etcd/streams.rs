//! Watch streams as each side saw them: every response a stream sent, sorted out to the
//! create request it answers (the n-th created response answers the n-th create), and the
//! comparison of two sides' streams, watcher by watcher.

use crate::answers::{event, watch_response};
use crate::requests::WatchSpec;
use etcd_client::proto::{PbEvent, PbWatchResponse};
use etcd_client::WatchRequestSender;
use std::fmt::Write as _;
use std::sync::{Arc, Mutex};

#[derive(Default)]
pub struct Log {
    pub responses: Vec<PbWatchResponse>,
    /// How the stream ended, if it did.
    pub end: Option<String>,
}

pub struct WStream {
    pub member: usize,
    pub tx: WatchRequestSender,
    pub log: Arc<Mutex<Log>>,
    pub reader: tokio::task::JoinHandle<()>,
    /// The create requests sent on it, in order, and the compact revision when each was.
    pub creates: Vec<(WatchSpec, i64)>,
}

impl Drop for WStream {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

/// One create request's watcher, from the stream's responses.
#[derive(Default, Clone)]
pub struct Slot {
    pub created: Option<PbWatchResponse>,
    pub events: Vec<PbEvent>,
    /// Per response with events: header revision, the events' revisions, fragment.
    pub batches: Vec<(i64, Vec<i64>, bool)>,
    pub compacted: Option<PbWatchResponse>,
    pub canceled: Option<PbWatchResponse>,
    /// Responses with this watcher's id that are none of the above (progress-like).
    pub other: Vec<PbWatchResponse>,
}

impl Slot {
    pub fn refused(&self) -> bool {
        self.created.as_ref().is_some_and(|c| c.canceled)
    }
    /// Created, not refused, not canceled by the client: its id is taken on the stream.
    pub fn open(&self) -> bool {
        self.created.is_some() && !self.refused() && self.canceled.is_none()
    }
    pub fn id(&self) -> Option<i64> {
        self.created.as_ref().map(|c| c.watch_id)
    }
    pub fn last_rev(&self) -> i64 {
        self.events
            .last()
            .and_then(|e| e.kv.as_ref())
            .map_or(0, |k| k.mod_revision)
    }
}

pub struct Parsed {
    pub slots: Vec<Slot>,
    /// Responses for no watcher of the stream.
    pub strays: Vec<PbWatchResponse>,
    pub end: Option<String>,
}

pub fn parse(log: &Log, creates: usize) -> Parsed {
    let mut slots: Vec<Slot> = vec![Slot::default(); creates];
    let mut strays = Vec::new();
    let mut next = 0;
    for r in &log.responses {
        if r.created {
            if next < slots.len() {
                slots[next].created = Some(r.clone());
                next += 1;
            } else {
                strays.push(r.clone());
            }
            continue;
        }
        let Some(s) = slots[..next]
            .iter_mut()
            .rev()
            .find(|s| s.open() && s.id() == Some(r.watch_id))
        else {
            strays.push(r.clone());
            continue;
        };
        if r.canceled && r.compact_revision != 0 && s.compacted.is_none() {
            s.compacted = Some(r.clone());
        } else if r.canceled {
            s.canceled = Some(r.clone());
        } else if !r.events.is_empty() {
            let revs = r
                .events
                .iter()
                .map(|e| e.kv.as_ref().map_or(0, |k| k.mod_revision))
                .collect();
            let h = r.header.as_ref().map_or(0, |h| h.revision);
            s.batches.push((h, revs, r.fragment));
            s.events.extend(r.events.iter().cloned());
        } else {
            s.other.push(r.clone());
        }
    }
    Parsed {
        slots,
        strays,
        end: log.end.clone(),
    }
}

/// A watcher's responses break no rule of etcd's.
pub fn batch_problems(s: &Slot) -> Vec<String> {
    let mut out = Vec::new();
    let mut prev: Option<(i64, bool)> = None;
    for (i, (h, revs, fragment)) in s.batches.iter().enumerate() {
        if revs.windows(2).any(|w| w[0] > w[1]) {
            out.push(format!(
                "response {i}: events out of revision order {revs:?}"
            ));
        }
        let (first, last) = (revs[0], revs[revs.len() - 1]);
        if *h < last {
            out.push(format!(
                "response {i}: header revision {h} below its last event's {last}"
            ));
        }
        if let Some((prev_last, prev_fragment)) = prev {
            if prev_fragment && first < prev_last || !prev_fragment && first <= prev_last {
                out.push(format!(
                    "response {i}: starts at revision {first}, the one before ended at \
                     {prev_last} (fragment {prev_fragment}): a revision split or repeated"
                ));
            }
        }
        prev = Some((last, *fragment));
    }
    out
}

pub fn describe(w: &WatchSpec) -> String {
    let mut s = format!("watch {} start {}", w.span.show(), w.start);
    for (on, what) in [
        (w.prev_kv, "prev_kv"),
        (w.no_put, "NOPUT"),
        (w.no_delete, "NODELETE"),
        (w.fragment, "fragment"),
        (w.progress_notify, "progress_notify"),
    ] {
        if on {
            s.push(' ');
            s.push_str(what);
        }
    }
    if w.id != 0 {
        let _ = write!(s, " id {}", w.id);
    }
    s
}

pub fn opt_response(r: &Option<PbWatchResponse>) -> String {
    r.as_ref().map_or("none".into(), watch_response)
}

/// The first difference between the two sides' view of stream `s`, or a rule either broke.
pub fn compare_stream(
    s: usize,
    specs: &[(WatchSpec, i64)],
    a: &Parsed,
    b: &Parsed,
    batches: bool,
) -> Option<String> {
    for (k, (sa, sb)) in a.slots.iter().zip(&b.slots).enumerate() {
        let what = format!("stream {s} watcher {k} ({})", describe(&specs[k].0));
        for (name, x, y) in [
            ("created response", &sa.created, &sb.created),
            ("compaction cancel", &sa.compacted, &sb.compacted),
            ("cancel response", &sa.canceled, &sb.canceled),
        ] {
            let (x, y) = (opt_response(x), opt_response(y));
            if x != y {
                return Some(format!("{what}, {name}:\n  etcd:   {x}\n  raftkv: {y}"));
            }
        }
        let n = sa.events.len().max(sb.events.len());
        for i in 0..n {
            let x = sa.events.get(i).map_or("(no more events)".into(), event);
            let y = sb.events.get(i).map_or("(no more events)".into(), event);
            if x != y {
                return Some(format!(
                    "{what}, event {i} of {}/{}:\n  etcd:   {x}\n  raftkv: {y}",
                    sa.events.len(),
                    sb.events.len()
                ));
            }
        }
        let (x, y) = (
            sa.other.iter().map(watch_response).collect::<Vec<_>>(),
            sb.other.iter().map(watch_response).collect::<Vec<_>>(),
        );
        if x != y {
            return Some(format!(
                "{what}, other responses:\n  etcd:   {x:?}\n  raftkv: {y:?}"
            ));
        }
        if batches && specs[k].0.fragment && sa.batches != sb.batches {
            return Some(format!(
                "{what}, responses (header revision, events' revisions, fragment):\n  \
                 etcd:   {:?}\n  raftkv: {:?}",
                sa.batches, sb.batches
            ));
        }
        for (name, slot) in [("etcd", sa), ("raftkv", sb)] {
            let p = batch_problems(slot);
            if !p.is_empty() {
                return Some(format!("{what}: {name}'s responses: {}", p.join("; ")));
            }
        }
    }
    let (x, y) = (
        a.strays.iter().map(watch_response).collect::<Vec<_>>(),
        b.strays.iter().map(watch_response).collect::<Vec<_>>(),
    );
    if x != y {
        return Some(format!(
            "stream {s}, responses for no watcher:\n  etcd:   {x:?}\n  raftkv: {y:?}"
        ));
    }
    if a.end != b.end {
        return Some(format!(
            "stream {s} ended:\n  etcd:   {:?}\n  raftkv: {:?}",
            a.end, b.end
        ));
    }
    None
}
