//! A checker of watch streams against the history they watch: each of etcd's promises as an
//! assertion over what one stream received. Used by this crate's tests, the simulator's
//! soak and the server's real-process tests — wherever the history is known.
//!
//! The history is every revision's events as the store made them. A compaction at C also
//! changes what revision C itself can still give (its deletes are gone, and what preceded
//! its puts), so for a compacted revision either form is accepted.

use crate::{CreateRequest, Response, WatchId, INVALID_WATCH_ID};
use kv::{Event, EventKind, KeyRange, Revision, Store};
use std::collections::{BTreeMap, BTreeSet, HashMap};

/// Every revision's events, recorded as they were applied.
#[derive(Clone, Debug, Default)]
pub struct History {
    events: BTreeMap<Revision, Vec<Event>>,
    compactions: BTreeSet<Revision>,
}

impl History {
    /// Record the revisions `store` holds that the history lacks. Call after every apply,
    /// before any compaction of what was applied. Several stores (the members of one
    /// cluster) may feed one history: a store whose newest revision the history has with
    /// other events has diverged, and that is the error.
    pub fn record(&mut self, store: &Store) -> Result<(), String> {
        let newest = store.revision();
        if let Some(known) = self.events.get(&newest) {
            let own = store.events_at(newest, None);
            if newest >= store.first_event_revision() && *known != own {
                return Err(format!(
                    "revision {newest} changed {own:?} here but {known:?} elsewhere"
                ));
            }
        }
        let from = self.last() + 1;
        for rev in from.max(store.first_event_revision())..=newest {
            self.events.insert(rev, store.events_at(rev, None));
        }
        Ok(())
    }

    pub fn compacted(&mut self, rev: Revision) {
        self.compactions.insert(rev);
    }

    /// Revision `rev`'s events as applied (empty if not recorded).
    pub fn events_at(&self, rev: Revision) -> &[Event] {
        self.events.get(&rev).map_or(&[], |e| &e[..])
    }

    pub fn last(&self) -> Revision {
        self.events.keys().next_back().copied().unwrap_or(0)
    }

    /// What a watcher of `spec` may be given at `rev`: the full form, and the form left
    /// after a compaction at `rev` if there was one.
    fn at(&self, spec: &Spec, rev: Revision) -> (Vec<Event>, Option<Vec<Event>>) {
        let full: Vec<Event> = self
            .events
            .get(&rev)
            .map(|evs| evs.iter().filter_map(|e| spec.take(e)).collect())
            .unwrap_or_default();
        let reduced = self.compactions.contains(&rev).then(|| {
            full.iter()
                .filter(|e| e.kind == EventKind::Put)
                .cloned()
                .map(|mut e| {
                    e.prev_kv = None;
                    e
                })
                .collect()
        });
        (full, reduced)
    }
}

/// What a watcher asked for, normalized as the hub normalizes it.
#[derive(Clone, Debug)]
struct Spec {
    range: KeyRange,
    start: Revision,
    no_put: bool,
    no_delete: bool,
    prev_kv: bool,
}

impl Spec {
    fn new(req: &CreateRequest, created_at: Revision) -> Result<Spec, String> {
        let range = crate::hub::watched_range(req)
            .map_err(|why| format!("created although refusable ({why}): {req:?}"))?;
        Ok(Spec {
            range,
            start: if req.start_revision == 0 {
                created_at + 1
            } else {
                req.start_revision
            },
            no_put: req.no_put,
            no_delete: req.no_delete,
            prev_kv: req.prev_kv,
        })
    }

    fn take(&self, e: &Event) -> Option<Event> {
        let wanted = match e.kind {
            EventKind::Put => !self.no_put,
            EventKind::Delete => !self.no_delete,
        };
        if !wanted || !self.range.contains(&e.kv.key) {
            return None;
        }
        let mut e = e.clone();
        if !self.prev_kv {
            e.prev_kv = None;
        }
        Some(e)
    }
}

#[derive(Debug)]
struct Watch {
    spec: Spec,
    /// The first revision not yet given.
    cursor: Revision,
    /// Events of an unfinished fragmented response.
    fragments: Vec<Event>,
    done: bool,
}

/// One stream as its client saw it, checked response by response.
#[derive(Default)]
pub struct StreamCheck {
    /// Create requests sent and not yet answered, oldest first.
    creates: std::collections::VecDeque<CreateRequest>,
    watches: HashMap<WatchId, Watch>,
    /// Events received per watcher, for resumption by the caller.
    pub last_revision: HashMap<WatchId, Revision>,
}

impl StreamCheck {
    pub fn new() -> Self {
        StreamCheck::default()
    }

    /// A create request the client sent (answers come in the order of the requests).
    pub fn sent(&mut self, req: CreateRequest) {
        self.creates.push_back(req);
    }

    /// Check the next response of the stream against `history`.
    pub fn received(&mut self, history: &History, r: &Response) -> Result<(), String> {
        if r.created {
            let req = self
                .creates
                .pop_front()
                .ok_or("a created response without a create request")?;
            if r.canceled {
                return Ok(()); // refused; the caller checks the reason
            }
            if self.watches.get(&r.watch_id).is_some_and(|w| !w.done) {
                return Err(format!("watch id {} created twice", r.watch_id));
            }
            let spec = Spec::new(&req, r.revision)?;
            let cursor = spec.start;
            self.watches.insert(
                r.watch_id,
                Watch {
                    spec,
                    cursor,
                    fragments: Vec::new(),
                    done: false,
                },
            );
            return Ok(());
        }
        if r.watch_id == INVALID_WATCH_ID {
            if !r.is_progress() {
                return Err(format!("an answer to no watcher: {r:?}"));
            }
            // Bookmark: every watcher of the stream has everything up to it.
            let ids: Vec<WatchId> = self.watches.keys().copied().collect();
            for id in ids {
                self.check_progress(history, id, r.revision)?;
            }
            return Ok(());
        }
        if r.canceled && self.watches.get(&r.watch_id).is_some_and(|w| w.done) {
            // The answer to the client's cancel of a watch already canceled (compacted).
            return Ok(());
        }
        let w = self
            .watches
            .get_mut(&r.watch_id)
            .filter(|w| !w.done)
            .ok_or_else(|| format!("a response for unknown watch {}: {r:?}", r.watch_id))?;
        if r.canceled {
            if r.compact_revision > 0 && w.cursor >= r.compact_revision {
                return Err(format!(
                    "watch {} canceled as compacted at {} with nothing compacted it needed \
                     (next revision {})",
                    r.watch_id, r.compact_revision, w.cursor
                ));
            }
            w.done = true;
            return Ok(());
        }
        if r.is_progress() {
            return self.check_progress(history, r.watch_id, r.revision);
        }
        w.fragments.extend(r.events.iter().cloned());
        if r.fragment {
            return Ok(());
        }
        let events = std::mem::take(&mut w.fragments);
        let id = r.watch_id;
        deliver(history, w, &events).map_err(|e| format!("watch {id}: {e}"))?;
        if let Some(last) = events.last() {
            self.last_revision.insert(id, last.kv.mod_revision);
        }
        if events
            .last()
            .is_some_and(|e| e.kv.mod_revision > r.revision)
        {
            return Err(format!("watch {id}: events beyond the header's revision"));
        }
        Ok(())
    }

    fn check_progress(&self, history: &History, id: WatchId, rev: Revision) -> Result<(), String> {
        let Some(w) = self.watches.get(&id).filter(|w| !w.done) else {
            return Ok(());
        };
        let missing = pending(history, w, rev);
        if let Some(r) = missing {
            return Err(format!(
                "watch {id}: progress at {rev} while the events of revision {r} are not delivered"
            ));
        }
        Ok(())
    }

    /// At the end: every open watcher has been given everything up to `rev`.
    pub fn complete(&self, history: &History, rev: Revision) -> Result<(), String> {
        for (id, w) in &self.watches {
            if w.done {
                continue;
            }
            if let Some(r) = pending(history, w, rev) {
                return Err(format!(
                    "watch {id}: the events of revision {r} never arrived (stream at {rev})"
                ));
            }
        }
        Ok(())
    }

    /// The watchers still open, with the first revision each has not been given.
    pub fn cursors(&self) -> Vec<(WatchId, Revision)> {
        let mut v: Vec<_> = self
            .watches
            .iter()
            .filter(|(_, w)| !w.done)
            .map(|(id, w)| (*id, w.cursor))
            .collect();
        v.sort();
        v
    }
}

/// The first revision at or below `upto` with events `w` has not been given, if any.
fn pending(history: &History, w: &Watch, upto: Revision) -> Option<Revision> {
    (w.cursor..=upto).find(|&rev| {
        let (full, reduced) = history.at(&w.spec, rev);
        !full.is_empty() && reduced.is_none_or(|r| !r.is_empty())
    })
}

/// `events` (one whole response) must be the next revisions of the watcher's history, each
/// revision whole, with nothing skipped: ordered, unique, reliable and atomic at once.
fn deliver(history: &History, w: &mut Watch, events: &[Event]) -> Result<(), String> {
    let mut i = 0;
    while i < events.len() {
        let rev = events[i].kv.mod_revision;
        if rev < w.cursor {
            return Err(format!(
                "revision {rev} again or out of order (expected {} or later)",
                w.cursor
            ));
        }
        if let Some(gap) = pending(history, w, rev - 1) {
            return Err(format!("revision {gap} skipped before {rev}"));
        }
        let n = events[i..]
            .iter()
            .take_while(|e| e.kv.mod_revision == rev)
            .count();
        let got = &events[i..i + n];
        let (full, reduced) = history.at(&w.spec, rev);
        if got != &full[..] && reduced.as_deref() != Some(got) {
            return Err(format!(
                "revision {rev}: got {} events {got:?}, the history has {} {full:?}",
                got.len(),
                full.len()
            ));
        }
        w.cursor = rev + 1;
        i += n;
    }
    Ok(())
}

/// A bounded in-memory sink that its owner reads at its own pace, a slot at a time; clones
/// share the queue (the hub holds one, the test client another). It asserts the hub's side
/// of the contract: never a send beyond the room it reported, never an empty slot.
#[derive(Clone)]
pub struct Queue {
    slots: std::rc::Rc<std::cell::RefCell<std::collections::VecDeque<Vec<Response>>>>,
    cap: usize,
}

impl Queue {
    pub fn new(cap: usize) -> Queue {
        Queue {
            slots: Default::default(),
            cap,
        }
    }

    /// The oldest slot: one response, or the fragments of one.
    pub fn pop(&self) -> Option<Vec<Response>> {
        self.slots.borrow_mut().pop_front()
    }

    pub fn len(&self) -> usize {
        self.slots.borrow().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl crate::Sink for Queue {
    fn room(&self) -> usize {
        self.cap.saturating_sub(self.len())
    }

    fn send(&mut self, rs: Vec<Response>) {
        assert!(self.room() > 0, "the hub sent beyond a queue's room");
        assert!(!rs.is_empty(), "the hub sent an empty slot");
        self.slots.borrow_mut().push_back(rs);
    }
}
