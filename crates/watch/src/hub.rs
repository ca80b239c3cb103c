//! The hub: watchers by stream, the synced watchers' range index, the unsynced set, and
//! the rules that move a watcher between them (see the crate docs for the promises).

use crate::index::{End, Index};
use crate::{
    CreateRequest, Response, StreamId, WatchId, AUTO_WATCH_ID, COMPACTED, DUPLICATE_ID,
    EMPTY_RANGE, INVALID_WATCH_ID, TOO_MANY_WATCHERS,
};
use bytes::Bytes;
use kv::{Event, EventKind, KeyRange, Revision, Store};
use std::collections::{BTreeMap, BTreeSet, HashMap};

/// A watch stream's outgoing queue. Bounded: `room` is how many more slots it has now, and
/// the hub never sends more than that. Only the hub sends on it, so room shrinks only by
/// the hub's own sends.
pub trait Sink {
    fn room(&self) -> usize;
    /// Queue responses in one slot; called only when `room() > 0`. Usually one response;
    /// the fragments of one response, which must reach the client back to back (etcd's
    /// clients merge consecutive fragments), travel together.
    fn send(&mut self, rs: Vec<Response>);
    /// The client is gone: the hub forgets the stream.
    fn is_closed(&self) -> bool {
        false
    }
}

/// A request the stream's queue has no room to answer now; the caller retries once the
/// client has read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Full;

/// Bounds on what the hub does at once.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// A response bigger than this is split into fragments, for watchers that asked.
    /// etcd's: its request limit plus gRPC overhead (1.5 MiB + 512 KiB).
    pub fragment_bytes: usize,
    /// Most revisions in one catch-up response (etcd's `watchBatchMaxRevs`).
    pub revisions_per_response: usize,
    /// Most key writes one [`Hub::sync`] replays for unsynced watchers: the bound on how
    /// long catching up holds the member's apply loop.
    pub catch_up_writes: usize,
    /// Most watchers one stream holds at once; a create beyond it is refused (created and
    /// canceled at once, with [`TOO_MANY_WATCHERS`]). etcd has no such bound; without one
    /// a single stream could hold any number of watchers (each with its range, up to a
    /// request's size) in the member's memory.
    pub watchers_per_stream: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            fragment_bytes: 2 * 1024 * 1024,
            revisions_per_response: 1000,
            catch_up_writes: 16 * 1024,
            watchers_per_stream: 10_000,
        }
    }
}

type Wid = (StreamId, WatchId);

/// The range a create request watches, normalized as etcd does (an empty key is "\0"; a
/// range end of "\0" is every key from the key), copied out of the request's buffer; or
/// etcd's refusal of an empty range.
pub(crate) fn watched_range(req: &CreateRequest) -> Result<KeyRange, &'static str> {
    let key = if req.key.is_empty() {
        Bytes::from_static(b"\0")
    } else {
        Bytes::copy_from_slice(&req.key)
    };
    let bounded = !req.range_end.is_empty() && &req.range_end[..] != b"\0";
    if bounded && req.range_end[..] <= key[..] {
        return Err(EMPTY_RANGE);
    }
    Ok(KeyRange {
        key,
        range_end: Bytes::copy_from_slice(&req.range_end),
    })
}

/// A range's end as the index takes it: `None` for a single key.
fn index_end(range: &KeyRange) -> Option<End> {
    match &range.range_end[..] {
        [] => None,
        [0] => Some(End::Unbounded),
        _ => Some(End::Key(range.range_end.clone())),
    }
}

struct Watcher {
    /// See [`watched_range`].
    range: KeyRange,
    /// The first revision this watcher has not been given. Invariant: for a synced watcher,
    /// every event below `max(next_rev, hub.revision + 1)` in its range is queued.
    next_rev: Revision,
    synced: bool,
    /// Canceled for compaction: kept only so that the client's cancel is answered.
    compacted: bool,
    prev_kv: bool,
    no_put: bool,
    no_delete: bool,
    fragment: bool,
    progress_notify: bool,
    /// Nothing was sent to it since the last periodic progress tick.
    quiet: bool,
}

impl Watcher {
    fn wants(&self, e: &Event) -> bool {
        match e.kind {
            EventKind::Put => !self.no_put,
            EventKind::Delete => !self.no_delete,
        }
    }

    /// The events of one revision as this watcher takes them.
    fn take(&self, events: impl IntoIterator<Item = Event>) -> Vec<Event> {
        events
            .into_iter()
            .filter(|e| self.wants(e))
            .map(|mut e| {
                if !self.prev_kv {
                    e.prev_kv = None;
                }
                e
            })
            .collect()
    }
}

struct Stream<S> {
    sink: S,
    /// The next id to try for an automatic watch id.
    next_id: WatchId,
    /// Unsynced watchers of this stream (a progress response must wait for none).
    unsynced: usize,
    /// A progress request waits for its stream to be synced.
    progress_wanted: bool,
    /// How many watchers the stream holds (bounded by `Limits::watchers_per_stream`).
    watchers: usize,
}

pub struct Hub<S> {
    /// Every revision up to here has been dispatched to the synced watchers.
    revision: Revision,
    /// Ordered, so that every pass visits streams in the same order on every run (the
    /// simulator replays runs exactly).
    streams: BTreeMap<StreamId, Stream<S>>,
    next_stream: StreamId,
    watchers: BTreeMap<Wid, Watcher>,
    synced: Index<Wid>,
    unsynced: BTreeSet<Wid>,
    /// The stream the last catch-up pass stopped at, so that slow streams take turns.
    cursor: Option<StreamId>,
    limits: Limits,
}

impl<S: Sink> Hub<S> {
    /// A hub for a member whose store is at `revision`.
    pub fn new(revision: Revision, limits: Limits) -> Self {
        Hub {
            revision,
            streams: BTreeMap::new(),
            next_stream: 1,
            watchers: BTreeMap::new(),
            synced: Index::default(),
            unsynced: BTreeSet::new(),
            cursor: None,
            limits,
        }
    }

    /// The revision every synced watcher has been given.
    pub fn revision(&self) -> Revision {
        self.revision
    }

    pub fn watchers(&self) -> usize {
        self.watchers.len()
    }

    /// Watchers off the fast path, waiting to be caught up.
    pub fn unsynced(&self) -> usize {
        self.unsynced.len()
    }

    /// Whether [`Hub::sync`] has work it can do now besides new revisions: slow watchers
    /// whose queues have room again, a progress response that may go. A client that reads
    /// nothing makes no work (its owner should call `sync` again once it reads).
    pub fn backlog(&self) -> bool {
        self.streams.iter().any(|(id, s)| {
            s.sink.room() > 0
                && ((s.unsynced > 0) || (s.progress_wanted && self.progress_ready(*id)))
        })
    }

    /// Whether a progress response may go on `stream` now: every watcher has been given
    /// everything up to the hub's revision (and none waits for a later start).
    fn progress_ready(&self, stream: StreamId) -> bool {
        self.stream_watchers(stream).all(|wid| {
            let w = &self.watchers[&wid];
            w.compacted || (w.synced && w.next_rev <= self.revision + 1)
        })
    }

    pub fn open(&mut self, sink: S) -> StreamId {
        let id = self.next_stream;
        self.next_stream += 1;
        self.streams.insert(
            id,
            Stream {
                sink,
                next_id: 0,
                unsynced: 0,
                progress_wanted: false,
                watchers: 0,
            },
        );
        id
    }

    /// Forget a stream and its watchers.
    pub fn close(&mut self, stream: StreamId) {
        let ids: Vec<Wid> = self.stream_watchers(stream).collect();
        for w in ids {
            self.remove(w);
        }
        self.streams.remove(&stream);
    }

    fn stream_watchers(&self, stream: StreamId) -> impl Iterator<Item = Wid> + '_ {
        self.watchers
            .range((stream, WatchId::MIN)..=(stream, WatchId::MAX))
            .map(|(w, _)| *w)
    }

    /// A create request: answered with `created` (or refused as etcd refuses it), before
    /// any of the watcher's events.
    pub fn create(&mut self, stream: StreamId, req: &CreateRequest) -> Result<(), Full> {
        let Some(st) = self.streams.get_mut(&stream) else {
            return Ok(());
        };
        if st.sink.room() == 0 {
            return Err(Full);
        }
        let revision = self.revision;
        let refuse = |st: &mut Stream<S>, reason: &str| {
            st.sink.send(vec![Response {
                revision,
                watch_id: INVALID_WATCH_ID,
                created: true,
                canceled: true,
                cancel_reason: reason.to_string(),
                ..Response::default()
            }]);
            Ok(())
        };
        let range = match watched_range(req) {
            Ok(r) => r,
            Err(why) => return refuse(st, why),
        };
        if req.start_revision < 0 {
            return refuse(st, COMPACTED);
        }
        if st.watchers >= self.limits.watchers_per_stream {
            return refuse(st, TOO_MANY_WATCHERS);
        }
        let id = if req.watch_id == AUTO_WATCH_ID {
            while self.watchers.contains_key(&(stream, st.next_id)) {
                st.next_id += 1;
            }
            st.next_id += 1;
            st.next_id - 1
        } else if self.watchers.contains_key(&(stream, req.watch_id)) {
            return refuse(st, DUPLICATE_ID);
        } else {
            req.watch_id
        };
        st.sink.send(vec![Response {
            revision,
            watch_id: id,
            created: true,
            ..Response::default()
        }]);
        // From now (0), or a future revision: synced, the index delivers as revisions
        // apply. From the past: unsynced, replayed from the store's history.
        let synced = req.start_revision == 0 || req.start_revision > revision;
        let w = Watcher {
            range,
            next_rev: if req.start_revision == 0 {
                revision + 1
            } else {
                req.start_revision
            },
            synced,
            compacted: false,
            prev_kv: req.prev_kv,
            no_put: req.no_put,
            no_delete: req.no_delete,
            fragment: req.fragment,
            progress_notify: req.progress_notify,
            quiet: true,
        };
        if synced {
            let end = index_end(&w.range);
            self.synced.insert(&w.range.key, end.as_ref(), (stream, id));
        } else {
            st.unsynced += 1;
            self.unsynced.insert((stream, id));
        }
        self.watchers.insert((stream, id), w);
        st.watchers += 1;
        Ok(())
    }

    /// A cancel request: answered with `canceled`; an unknown id gets no answer (etcd's).
    pub fn cancel(&mut self, stream: StreamId, id: WatchId) -> Result<(), Full> {
        if !self.watchers.contains_key(&(stream, id)) {
            return Ok(());
        }
        let Some(st) = self.streams.get_mut(&stream) else {
            return Ok(());
        };
        if st.sink.room() == 0 {
            return Err(Full);
        }
        st.sink.send(vec![Response {
            revision: self.revision,
            watch_id: id,
            canceled: true,
            ..Response::default()
        }]);
        self.remove((stream, id));
        Ok(())
    }

    /// A progress request: once every watcher of the stream is synced, a response with no
    /// watch id whose revision says every event up to it has been sent. A stream without
    /// watchers gets none (etcd's).
    pub fn request_progress(&mut self, stream: StreamId) {
        if self.stream_watchers(stream).next().is_none() {
            return;
        }
        if let Some(st) = self.streams.get_mut(&stream) {
            st.progress_wanted = true;
        }
        self.flush_progress(stream);
    }

    /// Send a stream's wanted progress response if it may go now.
    fn flush_progress(&mut self, stream: StreamId) {
        let revision = self.revision;
        let ready = self.progress_ready(stream);
        let Some(st) = self.streams.get_mut(&stream) else {
            return;
        };
        if !st.progress_wanted || !ready || st.sink.room() == 0 {
            return;
        }
        st.progress_wanted = false;
        st.sink.send(vec![Response {
            revision,
            watch_id: INVALID_WATCH_ID,
            ..Response::default()
        }]);
    }

    /// The periodic progress notification (etcd's every ten minutes): each synced watcher
    /// that asked for it and was sent nothing since the last tick gets its id and the
    /// current revision.
    pub fn progress_tick(&mut self) {
        let revision = self.revision;
        for ((stream, id), w) in self.watchers.iter_mut() {
            let due = w.progress_notify && w.quiet && w.synced && w.next_rev <= revision + 1;
            if due {
                if let Some(st) = self.streams.get_mut(stream).filter(|s| s.sink.room() > 0) {
                    st.sink.send(vec![Response {
                        revision,
                        watch_id: *id,
                        ..Response::default()
                    }]);
                }
            }
            w.quiet = true;
        }
    }

    fn remove(&mut self, wid: Wid) {
        let Some(w) = self.watchers.remove(&wid) else {
            return;
        };
        if let Some(st) = self.streams.get_mut(&wid.0) {
            st.watchers -= 1;
        }
        if w.compacted {
            return;
        }
        if w.synced {
            self.synced
                .remove(&w.range.key, index_end(&w.range).as_ref(), wid);
        } else {
            self.unsynced.remove(&wid);
            if let Some(st) = self.streams.get_mut(&wid.0) {
                st.unsynced -= 1;
            }
        }
    }

    fn unsync(&mut self, wid: Wid, next_rev: Revision) {
        let Some(w) = self.watchers.get_mut(&wid) else {
            return;
        };
        debug_assert!(w.synced);
        self.synced
            .remove(&w.range.key, index_end(&w.range).as_ref(), wid);
        w.synced = false;
        w.next_rev = w.next_rev.max(next_rev);
        self.unsynced.insert(wid);
        if let Some(st) = self.streams.get_mut(&wid.0) {
            st.unsynced += 1;
        }
    }

    fn resync(&mut self, wid: Wid) {
        let Some(w) = self.watchers.get_mut(&wid) else {
            return;
        };
        debug_assert!(!w.synced && w.next_rev > self.revision);
        w.synced = true;
        self.unsynced.remove(&wid);
        self.synced
            .insert(&w.range.key, index_end(&w.range).as_ref(), wid);
        if let Some(st) = self.streams.get_mut(&wid.0) {
            st.unsynced -= 1;
        }
        self.flush_progress(wid.0);
    }

    /// Bring the watchers up to `store`, the member's applied state: dispatch the revisions
    /// applied since the last call to the synced watchers, then replay a bounded slice of
    /// history to the unsynced ones. Call after every apply, and again soon while it
    /// returns true ([`Hub::backlog`]: there is more it can do now).
    pub fn sync(&mut self, store: &Store) -> bool {
        self.drop_closed();
        self.advance(store);
        if !self.unsynced.is_empty() {
            self.catch_up(store);
        }
        let waiting: Vec<StreamId> = self
            .streams
            .iter()
            .filter(|(_, s)| s.progress_wanted)
            .map(|(id, _)| *id)
            .collect();
        for stream in waiting {
            self.flush_progress(stream);
        }
        self.backlog()
    }

    fn drop_closed(&mut self) {
        let closed: Vec<StreamId> = self
            .streams
            .iter()
            .filter(|(_, s)| s.sink.is_closed())
            .map(|(id, _)| *id)
            .collect();
        for stream in closed {
            self.close(stream);
        }
    }

    fn advance(&mut self, store: &Store) {
        let to = store.revision();
        if to <= self.revision {
            return;
        }
        if self.synced.is_empty() {
            self.revision = to;
            return;
        }
        if store.first_event_revision() > self.revision + 1 {
            // The store jumped ahead (restored from a leader's snapshot) past revisions it
            // no longer holds: every synced watcher must be replayed, or canceled as
            // compacted, from history.
            let synced: Vec<Wid> = self
                .watchers
                .iter()
                .filter(|(_, w)| w.synced)
                .map(|(id, _)| *id)
                .collect();
            let from = self.revision + 1;
            for wid in synced {
                self.unsync(wid, from);
            }
            self.revision = to;
            return;
        }
        for rev in self.revision + 1..=to {
            self.dispatch(rev, store.events_at(rev, None));
            self.revision = rev;
        }
    }

    /// One revision's events to the synced watchers whose ranges hold them.
    fn dispatch(&mut self, rev: Revision, events: Vec<Event>) {
        let mut per: Vec<(Wid, Vec<Event>)> = Vec::new();
        let mut slot: HashMap<Wid, usize> = HashMap::new();
        for e in &events {
            self.synced.matches(&e.kv.key, |wid| {
                let i = *slot.entry(wid).or_insert_with(|| {
                    per.push((wid, Vec::new()));
                    per.len() - 1
                });
                per[i].1.push(e.clone());
            });
        }
        for (wid, evs) in per {
            let Some(w) = self.watchers.get_mut(&wid) else {
                continue;
            };
            if w.next_rev > rev {
                continue; // a watch from a future revision
            }
            let evs = w.take(evs);
            if evs.is_empty() {
                w.next_rev = rev + 1;
                continue; // everything filtered: etcd sends nothing
            }
            let responses = split(evs, rev, wid.1, w.fragment, &self.limits);
            let st = self.streams.get_mut(&wid.0).expect("a watcher's stream");
            if st.sink.room() == 0 {
                // Its client is slow: off the fast path, cursor kept, nothing lost.
                self.unsync(wid, rev);
                continue;
            }
            w.next_rev = rev + 1;
            w.quiet = false;
            st.sink.send(responses);
        }
    }

    /// Replay history to unsynced watchers within `catch_up_writes`, stream by stream,
    /// the streams taking turns. Only streams with room are visited: a stuck client costs
    /// nothing per pass.
    fn catch_up(&mut self, store: &Store) {
        debug_assert_eq!(store.revision(), self.revision);
        let mut budget = self.limits.catch_up_writes;
        let mut ready: Vec<StreamId> = self
            .streams
            .iter()
            .filter(|(_, s)| s.unsynced > 0 && s.sink.room() > 0)
            .map(|(id, _)| *id)
            .collect();
        // Start after the stream the last pass stopped at.
        let after = ready.partition_point(|id| self.cursor.is_some_and(|c| *id <= c));
        ready.rotate_left(after);
        for stream in ready {
            if budget == 0 {
                break;
            }
            self.cursor = Some(stream);
            let wids: Vec<Wid> = self
                .unsynced
                .range((stream, WatchId::MIN)..=(stream, WatchId::MAX))
                .copied()
                .collect();
            for wid in wids {
                let room = self.streams.get(&stream).map_or(0, |s| s.sink.room());
                if budget == 0 || room == 0 {
                    break;
                }
                self.catch_up_one(wid, store, &mut budget);
            }
        }
    }

    fn catch_up_one(&mut self, wid: Wid, store: &Store, budget: &mut usize) {
        let Some(st) = self.streams.get_mut(&wid.0) else {
            return;
        };
        let w = self.watchers.get_mut(&wid).expect("an unsynced watcher");
        if st.sink.room() == 0 {
            return;
        }
        if w.next_rev < store.compact_revision() {
            // etcd's answer: the compact revision, canceled, no reason, no header revision.
            st.sink.send(vec![Response {
                watch_id: wid.1,
                canceled: true,
                compact_revision: store.compact_revision(),
                ..Response::default()
            }]);
            w.compacted = true;
            self.unsynced.remove(&wid);
            st.unsynced -= 1;
            return;
        }
        while w.next_rev <= self.revision && *budget > 0 {
            let mut events = Vec::new();
            let (mut rev, mut revs) = (w.next_rev, 0);
            while rev <= self.revision && revs < self.limits.revisions_per_response && *budget > 0 {
                *budget = budget.saturating_sub(store.writes_at(rev).max(1));
                let evs = w.take(store.events_at(rev, Some(&w.range)));
                if !evs.is_empty() {
                    revs += 1;
                    events.extend(evs);
                }
                rev += 1;
            }
            if !events.is_empty() {
                if st.sink.room() == 0 {
                    return; // the queue filled: this slice again, later
                }
                st.sink.send(split(
                    events,
                    self.revision,
                    wid.1,
                    w.fragment,
                    &self.limits,
                ));
                w.quiet = false;
            }
            w.next_rev = rev;
        }
        if w.next_rev > self.revision {
            self.resync(wid);
        }
    }
}

/// The response(s) carrying `events` to one watcher: one, or — for a watcher that asked for
/// fragments and a response over the limit — several, all but the last marked `fragment`.
fn split(
    events: Vec<Event>,
    revision: Revision,
    watch_id: WatchId,
    fragment: bool,
    limits: &Limits,
) -> Vec<Response> {
    let response = |events| Response {
        revision,
        watch_id,
        events,
        ..Response::default()
    };
    let size = |e: &Event| {
        64 + e.kv.key.len()
            + e.kv.value.len()
            + e.prev_kv
                .as_ref()
                .map_or(0, |p| 64 + p.key.len() + p.value.len())
    };
    if !fragment
        || events.len() < 2
        || events.iter().map(size).sum::<usize>() < limits.fragment_bytes
    {
        return vec![response(events)];
    }
    let mut out: Vec<Response> = Vec::new();
    let (mut cur, mut bytes) = (Vec::new(), 0);
    for e in events {
        let s = size(&e);
        if !cur.is_empty() && bytes + s >= limits.fragment_bytes {
            out.push(response(std::mem::take(&mut cur)));
            bytes = 0;
        }
        bytes += s;
        cur.push(e);
    }
    out.push(response(cur));
    let last = out.len() - 1;
    for r in &mut out[..last] {
        r.fragment = true;
    }
    out
}
