//! etcd's watch promises, each a test, against the hub driven by a real store: random
//! writes, transactions and compactions; watchers on keys, ranges, prefixes and everything,
//! from now, from the past and from the future; clients that read slowly enough to push
//! their watchers off the fast path. Every stream is checked response by response against
//! the history (`watch::check`). Each randomized test runs many seeds; a failure names its
//! seed.

use bytes::Bytes;
use kv::*;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::collections::VecDeque;
use watch::check::{History, Queue, StreamCheck};
use watch::{CreateRequest, Hub, Limits, Response, StreamId};

const KEYS: [&str; 6] = ["a", "a/1", "a/2", "b", "b/1", "c"];

fn b(s: &str) -> Bytes {
    Bytes::copy_from_slice(s.as_bytes())
}

struct Client {
    stream: StreamId,
    queue: Queue,
    /// Responses read so far, for tests that look at them directly.
    seen: Vec<Response>,
    /// Create requests not yet accepted by the hub (its queue was full).
    waiting: VecDeque<CreateRequest>,
}

struct World {
    rng: ChaCha8Rng,
    store: Store,
    history: History,
    hub: Hub<Queue>,
    clients: Vec<Client>,
    /// What each client's stream was sent, checked as it is read.
    checks: Vec<StreamCheck>,
    /// Whether random writes include compactions.
    compactions: bool,
}

impl World {
    fn new(seed: u64, streams: usize, cap: usize, limits: Limits) -> World {
        let mut hub = Hub::new(1, limits); // a new store's revision
        let mut clients = Vec::new();
        for _ in 0..streams {
            let queue = Queue::new(cap);
            let stream = hub.open(queue.clone());
            clients.push(Client {
                stream,
                queue,
                seen: Vec::new(),
                waiting: VecDeque::new(),
            });
        }
        World {
            rng: ChaCha8Rng::seed_from_u64(seed),
            store: Store::new(),
            history: History::default(),
            hub,
            checks: (0..clients.len()).map(|_| StreamCheck::new()).collect(),
            clients,
            compactions: true,
        }
    }

    fn apply(&mut self, req: Request) {
        if self.store.apply(&req).is_ok() {
            if let Request::Compact(rev) = req {
                self.history.compacted(rev);
            }
        }
        self.history.record(&self.store).unwrap();
        self.hub.sync(&self.store);
    }

    fn random_write(&mut self) {
        let k = |rng: &mut ChaCha8Rng| b(KEYS[rng.gen_range(0..KEYS.len())]);
        let put = |rng: &mut ChaCha8Rng, key: Bytes| {
            RequestOp::Put(PutRequest {
                key,
                value: Bytes::from(rng.gen::<u32>().to_string()),
                ..Default::default()
            })
        };
        let req = match self.rng.gen_range(0..10) {
            0..=4 => {
                let key = k(&mut self.rng);
                match put(&mut self.rng, key) {
                    RequestOp::Put(p) => Request::Put(p),
                    _ => unreachable!(),
                }
            }
            5 | 6 => Request::DeleteRange(DeleteRangeRequest {
                range: KeyRange {
                    key: k(&mut self.rng),
                    range_end: if self.rng.gen() { b("b") } else { Bytes::new() },
                },
                prev_kv: false,
            }),
            7 | 8 => {
                // Several keys at one revision, in a random order (not key order).
                let mut keys: Vec<Bytes> = KEYS.iter().map(|s| b(s)).collect();
                let n = self.rng.gen_range(2..5);
                let mut ops = Vec::new();
                for _ in 0..n {
                    let key = keys.remove(self.rng.gen_range(0..keys.len()));
                    ops.push(if self.rng.gen_ratio(1, 4) {
                        RequestOp::DeleteRange(DeleteRangeRequest {
                            range: KeyRange {
                                key,
                                range_end: Bytes::new(),
                            },
                            prev_kv: false,
                        })
                    } else {
                        put(&mut self.rng, key)
                    });
                }
                Request::Txn(TxnRequest {
                    compare: Vec::new(),
                    success: ops,
                    failure: Vec::new(),
                })
            }
            _ => {
                let rev = self.store.revision();
                let c = self.store.compact_revision();
                if rev <= c + 1 || !self.compactions {
                    return;
                }
                Request::Compact(self.rng.gen_range(c + 1..rev))
            }
        };
        self.apply(req);
    }

    fn random_create(&mut self) -> CreateRequest {
        let rng = &mut self.rng;
        let (key, range_end) = match rng.gen_range(0..4) {
            0 => (b(KEYS[rng.gen_range(0..KEYS.len())]), Bytes::new()),
            1 => (b("a"), b("b")),
            2 => (b("b/"), watch_prefix_end("b/")),
            _ => (Bytes::new(), b("\0")),
        };
        let now = self.store.revision();
        let start_revision = match rng.gen_range(0..4) {
            0 => 0,
            1 => now + rng.gen_range(1..4),
            _ => rng.gen_range(1..=now.max(1)),
        };
        CreateRequest {
            key,
            range_end,
            start_revision,
            prev_kv: rng.gen(),
            no_put: rng.gen_ratio(1, 6),
            no_delete: rng.gen_ratio(1, 6),
            progress_notify: rng.gen(),
            fragment: rng.gen(),
            ..Default::default()
        }
    }

    /// Let client `c` read up to `n` responses, checking each.
    fn read(&mut self, c: usize, n: usize) {
        for _ in 0..n {
            let Some(slot) = self.clients[c].queue.pop() else {
                break;
            };
            for r in slot {
                if let Err(e) = self.checks[c].received(&self.history, &r) {
                    panic!("stream {c}: {e}\n  response: {r:?}");
                }
                self.clients[c].seen.push(r);
            }
        }
        // Room again: creates that waited go in, and slow watchers move on.
        while let Some(req) = self.clients[c].waiting.pop_front() {
            match self.hub.create(self.clients[c].stream, &req) {
                Ok(()) => self.checks[c].sent(req),
                Err(watch::Full) => {
                    self.clients[c].waiting.push_front(req);
                    break;
                }
            }
        }
        self.hub.sync(&self.store);
    }

    fn create(&mut self, c: usize, req: CreateRequest) {
        self.clients[c].waiting.push_back(req);
        self.read(c, 0);
    }

    /// Read everything until the hub has nothing left to send.
    fn drain(&mut self) {
        for _ in 0..10_000 {
            for c in 0..self.clients.len() {
                self.read(c, usize::MAX);
            }
            let idle = !self.hub.backlog()
                && self.clients.iter().all(|c| c.queue.is_empty())
                && self.clients.iter().all(|c| c.waiting.is_empty());
            if idle {
                return;
            }
        }
        panic!("the hub never caught up");
    }
}

fn watch_prefix_end(p: &str) -> Bytes {
    kv::prefix_end(p.as_bytes())
}

/// The randomized run behind the ordered / unique / reliable / atomic / bookmarkable tests:
/// returns the world for the test's own assertions.
fn run(seed: u64, steps: usize, cap: usize, limits: Limits) -> World {
    let mut w = World::new(seed, 3, cap, limits);
    for _ in 0..steps {
        match w.rng.gen_range(0..20) {
            0..=9 => w.random_write(),
            10 | 11 => {
                let c = w.rng.gen_range(0..3);
                let req = w.random_create();
                w.create(c, req);
            }
            12 => {
                let c = w.rng.gen_range(0..3);
                let ids = w.checks[c].cursors();
                if !ids.is_empty() {
                    let id = ids[w.rng.gen_range(0..ids.len())].0;
                    let stream = w.clients[c].stream;
                    if w.hub.cancel(stream, id).is_ok() {
                        // The answer arrives in order; the check sees it then.
                    }
                }
            }
            13 => {
                let c = w.rng.gen_range(0..3);
                let stream = w.clients[c].stream;
                w.hub.request_progress(stream);
            }
            14 => w.hub.progress_tick(),
            _ => {
                // Clients read at different paces: client 0 keeps up, 2 lags.
                let c = w.rng.gen_range(0..3);
                let n = [8, 3, 1][c];
                w.read(c, n);
            }
        }
    }
    w.drain();
    let last = w.store.revision();
    for (c, check) in w.checks.iter().enumerate() {
        if let Err(e) = check.complete(&w.history, last) {
            panic!("seed {seed}, stream {c}: {e}");
        }
    }
    w
}

fn limits(seed: u64) -> Limits {
    // Small bounds on some seeds push every path: fragments, many catch-up responses, many
    // catch-up passes.
    match seed % 3 {
        0 => Limits::default(),
        1 => Limits {
            fragment_bytes: 200,
            revisions_per_response: 3,
            catch_up_writes: 5,
            ..Limits::default()
        },
        _ => Limits {
            fragment_bytes: 400,
            revisions_per_response: 1,
            catch_up_writes: 50,
            ..Limits::default()
        },
    }
}

/// Ordered, unique, reliable and atomic, for fast and slow clients, through compactions,
/// cancels and progress requests: every response of every stream is checked against the
/// history (see `watch::check`), and at the end every open watcher has everything.
#[test]
fn every_stream_gets_its_history_in_order_once_whole_and_without_gaps() {
    for seed in 0..300 {
        let cap = [1, 2, 4, 128][seed as usize % 4];
        run(seed, 400, cap, limits(seed));
    }
}

fn create(key: &str, end: &str, start: Revision) -> CreateRequest {
    CreateRequest {
        key: b(key),
        range_end: b(end),
        start_revision: start,
        ..Default::default()
    }
}

fn put(w: &mut World, k: &str, v: &str) {
    w.apply(Request::Put(PutRequest {
        key: b(k),
        value: b(v),
        ..Default::default()
    }));
}

fn delete(w: &mut World, k: &str) {
    w.apply(Request::DeleteRange(DeleteRangeRequest {
        range: KeyRange {
            key: b(k),
            range_end: Bytes::new(),
        },
        prev_kv: false,
    }));
}

fn events_of(seen: &[Response]) -> Vec<(EventKind, String, Revision)> {
    seen.iter()
        .flat_map(|r| &r.events)
        .map(|e| {
            (
                e.kind,
                String::from_utf8_lossy(&e.kv.key).into_owned(),
                e.kv.mod_revision,
            )
        })
        .collect()
}

/// A watcher whose client stops reading leaves the fast path without blocking anyone or
/// losing anything, and is replayed from the store's history once its client reads again.
#[test]
fn a_slow_watcher_is_caught_up_from_history_without_loss_or_repeats() {
    let mut w = World::new(1, 2, 2, Limits::default());
    w.create(0, create("k", "", 0));
    w.create(1, create("k", "", 0));
    w.read(0, 1);
    w.read(1, 1);
    for i in 0..50 {
        put(&mut w, "k", &i.to_string());
        w.read(0, 1); // stream 0 keeps up; stream 1 reads nothing
    }
    assert_eq!(w.hub.unsynced(), 1, "the slow watcher left the fast path");
    assert!(
        !w.hub.backlog(),
        "a client that reads nothing makes no work"
    );
    assert_eq!(w.clients[1].queue.len(), 2, "bounded by its queue");
    assert_eq!(events_of(&w.clients[0].seen).len(), 50);
    w.drain();
    let want: Vec<_> = (2..=51).map(|r| (EventKind::Put, "k".into(), r)).collect();
    assert_eq!(events_of(&w.clients[1].seen), want);
    assert!(!w.hub.backlog());
    // Back on the fast path: the next put arrives as it applies.
    put(&mut w, "k", "x");
    assert_eq!(w.clients[1].queue.len(), 1);
}

/// A progress response claims a revision only once every event up to it is queued ahead of
/// it: while a watcher of the stream is behind, the response waits.
#[test]
fn progress_never_runs_ahead_of_pending_events() {
    // Two revisions per catch-up pass: ten past revisions take five passes, with room in
    // the queue all along.
    let limits = Limits {
        revisions_per_response: 1,
        catch_up_writes: 2,
        ..Limits::default()
    };
    let mut w = World::new(2, 1, 64, limits);
    for i in 0..10 {
        put(&mut w, "a", &i.to_string());
    }
    w.create(0, create("a", "", 1)); // from the past: unsynced, its queue small
    w.create(0, create("b", "", 0));
    assert_eq!(w.hub.unsynced(), 1, "still catching up");
    w.hub.request_progress(w.clients[0].stream);
    w.drain();
    let seen = &w.clients[0].seen;
    let progress = seen
        .iter()
        .position(|r| r.is_progress())
        .expect("a progress response");
    assert_eq!(seen[progress].revision, 11);
    assert_eq!(seen[progress].watch_id, watch::INVALID_WATCH_ID);
    assert_eq!(
        events_of(&seen[..progress]).len(),
        10,
        "every event before the bookmark"
    );
    // A stream without watchers gets no progress response (etcd's).
    let mut empty = World::new(3, 1, 4, Limits::default());
    empty.hub.request_progress(empty.clients[0].stream);
    empty.drain();
    assert!(empty.clients[0].seen.is_empty());
}

/// prev_kv on puts and deletes when asked, none when not; created responses first, with
/// the revision the watch starts after.
#[test]
fn prev_kv_and_created_are_set_as_etcd_sets_them() {
    let mut w = World::new(4, 1, 64, Limits::default());
    put(&mut w, "k", "v1");
    let mut with_prev = create("k", "", 0);
    with_prev.prev_kv = true;
    w.create(0, with_prev);
    w.create(0, create("k", "", 0));
    put(&mut w, "k", "v2");
    delete(&mut w, "k");
    put(&mut w, "k", "v3");
    w.drain();
    let seen = &w.clients[0].seen;
    assert!(seen[0].created && seen[0].watch_id == 0 && seen[0].revision == 2);
    assert!(seen[1].created && seen[1].watch_id == 1);
    let of = |id| -> Vec<&Event> {
        seen.iter()
            .filter(|r| r.watch_id == id)
            .flat_map(|r| &r.events)
            .collect()
    };
    let prev: Vec<Option<&str>> = of(0)
        .iter()
        .map(|e| {
            e.prev_kv
                .as_ref()
                .map(|p| std::str::from_utf8(&p.value).unwrap())
        })
        .collect();
    // The put over v1, the delete of v2, the put after a delete (no previous value).
    assert_eq!(prev, vec![Some("v1"), Some("v2"), None]);
    assert!(of(1).iter().all(|e| e.prev_kv.is_none()));
    let del = of(0)[1];
    assert_eq!(del.kind, EventKind::Delete);
    assert_eq!(
        del.kv,
        KeyValue {
            key: b("k"),
            mod_revision: 4,
            ..Default::default()
        }
    );
}

/// NOPUT and NODELETE drop those events; a revision left with nothing sends nothing.
#[test]
fn filters_drop_what_they_name_and_send_nothing_for_an_emptied_revision() {
    let mut w = World::new(5, 1, 64, Limits::default());
    let mut no_put = create("k", "", 0);
    no_put.no_put = true;
    w.create(0, no_put);
    let mut no_delete = create("k", "", 0);
    no_delete.no_delete = true;
    w.create(0, no_delete);
    put(&mut w, "k", "1");
    delete(&mut w, "k");
    w.drain();
    let seen = &w.clients[0].seen;
    let of = |id| -> Vec<(EventKind, String, Revision)> {
        events_of(
            &seen
                .iter()
                .filter(|r| r.watch_id == id)
                .cloned()
                .collect::<Vec<_>>(),
        )
    };
    assert_eq!(of(0), vec![(EventKind::Delete, "k".into(), 3)]);
    assert_eq!(of(1), vec![(EventKind::Put, "k".into(), 2)]);
    // Two created responses and one response per watcher: nothing empty.
    assert_eq!(seen.len(), 4);
}

/// A watch from a revision not yet written waits for it, then delivers from it.
#[test]
fn a_watch_on_a_future_revision_waits_and_then_delivers() {
    let mut w = World::new(6, 1, 64, Limits::default());
    put(&mut w, "k", "1");
    w.create(0, create("k", "", 5)); // revisions 2, 3 and 4 come first
    put(&mut w, "k", "2");
    put(&mut w, "k", "3");
    w.drain();
    assert_eq!(
        w.clients[0].seen.len(),
        1,
        "only created, nothing before revision 5"
    );
    put(&mut w, "k", "4");
    put(&mut w, "k", "5");
    w.drain();
    assert_eq!(
        events_of(&w.clients[0].seen),
        vec![
            (EventKind::Put, "k".into(), 5),
            (EventKind::Put, "k".into(), 6)
        ]
    );
}

/// A watch that needs compacted history is created, then canceled with the compact
/// revision (no reason, etcd's form); one from the compact revision itself is served.
#[test]
fn a_watch_from_a_compacted_revision_is_canceled_with_the_compact_revision() {
    let mut w = World::new(7, 1, 64, Limits::default());
    for i in 0..5 {
        put(&mut w, "k", &i.to_string());
    }
    w.apply(Request::Compact(3));
    w.create(0, create("k", "", 2));
    w.create(0, create("k", "", 3));
    w.drain();
    let seen = &w.clients[0].seen;
    let canceled: Vec<&Response> = seen.iter().filter(|r| r.canceled).collect();
    assert_eq!(canceled.len(), 1);
    assert_eq!(canceled[0].watch_id, 0);
    assert_eq!(canceled[0].compact_revision, 3);
    assert!(canceled[0].cancel_reason.is_empty());
    let served: Vec<Revision> = seen
        .iter()
        .filter(|r| r.watch_id == 1)
        .flat_map(|r| r.events.iter().map(|e| e.kv.mod_revision))
        .collect();
    assert_eq!(served, vec![3, 4, 5, 6]);
    // The client's cancel of the compacted watch is still answered.
    w.hub.cancel(w.clients[0].stream, 0).unwrap();
    w.drain();
    assert!(w.clients[0].seen.last().unwrap().canceled);
}

/// A client whose stream broke resumes on another member's hub from its last revision + 1
/// and gets exactly the rest: together, the two streams are the history once.
#[test]
fn resuming_from_the_last_revision_plus_one_on_another_member_gives_exactly_the_rest() {
    for seed in 0..50 {
        let mut a = World::new(seed, 1, 2, limits(seed));
        a.compactions = false;
        let mut all = create("", "\0", 1);
        all.prev_kv = true;
        a.create(0, all.clone());
        for _ in 0..40 {
            a.random_write();
            if a.rng.gen_ratio(1, 3) {
                a.read(0, 1);
            }
        }
        // The stream breaks here: what the client read is all it has.
        let last = a.checks[0].last_revision.get(&0).copied().unwrap_or(0);
        // Another member, with the same log applied, further along.
        let mut b = World::new(seed + 1000, 1, 2, limits(seed));
        b.compactions = false;
        b.store = a.store.clone();
        b.history = a.history.clone();
        b.hub = Hub::new(b.store.revision(), limits(seed));
        b.clients[0].stream = b.hub.open(b.clients[0].queue.clone());
        for _ in 0..10 {
            b.random_write();
        }
        let mut rest = all.clone();
        rest.start_revision = last + 1;
        b.create(0, rest);
        for _ in 0..10 {
            b.random_write();
        }
        b.drain();
        let got: Vec<Event> = a.clients[0]
            .seen
            .iter()
            .chain(&b.clients[0].seen)
            .flat_map(|r| r.events.clone())
            .collect();
        let want: Vec<Event> = (1..=b.store.revision())
            .flat_map(|rev| b.history.events_at(rev).to_vec())
            .collect();
        assert_eq!(got, want, "seed {seed}");
    }
}

/// Ids: automatic ones count from 0 and skip ids the client took; a taken id, an empty
/// range and a negative start are refused with etcd's words; cancel of an unknown id gets
/// no answer.
#[test]
fn ids_and_refusals_follow_etcd() {
    let mut w = World::new(8, 1, 64, Limits::default());
    let mut mine = create("k", "", 0);
    mine.watch_id = 1;
    w.create(0, mine.clone());
    w.create(0, create("k", "", 0)); // 0
    w.create(0, create("k", "", 0)); // 2: 1 is taken
    w.create(0, mine); // 1 again
    w.create(0, create("b", "a", 0));
    w.create(0, create("k", "", -1));
    w.hub.cancel(w.clients[0].stream, 99).unwrap();
    w.drain();
    let seen = &w.clients[0].seen;
    let ids: Vec<i64> = seen.iter().map(|r| r.watch_id).collect();
    assert_eq!(ids, vec![1, 0, 2, -1, -1, -1]);
    assert_eq!(seen[3].cancel_reason, watch::DUPLICATE_ID);
    assert_eq!(seen[4].cancel_reason, watch::EMPTY_RANGE);
    assert_eq!(seen[5].cancel_reason, watch::COMPACTED);
    assert!(seen[3..].iter().all(|r| r.created && r.canceled));
}

/// A revision bigger than the fragment limit goes to a watcher that asked for fragments in
/// several responses, all but the last marked; to one that did not, in one.
#[test]
fn a_big_revision_is_fragmented_only_for_watchers_that_ask() {
    let mut w = World::new(
        9,
        1,
        64,
        Limits {
            fragment_bytes: 300,
            ..Limits::default()
        },
    );
    let mut frag = create("", "\0", 0);
    frag.fragment = true;
    w.create(0, frag);
    w.create(0, create("", "\0", 0));
    let ops = (0..6)
        .map(|i| {
            RequestOp::Put(PutRequest {
                key: b(&format!("k{i}")),
                value: Bytes::from(vec![b'x'; 100]),
                ..Default::default()
            })
        })
        .collect();
    w.apply(Request::Txn(TxnRequest {
        compare: vec![],
        success: ops,
        failure: vec![],
    }));
    w.drain();
    let seen = &w.clients[0].seen;
    let of = |id| {
        seen.iter()
            .filter(|r| r.watch_id == id && !r.created)
            .collect::<Vec<_>>()
    };
    let frags = of(0);
    assert!(frags.len() > 1);
    assert!(frags[..frags.len() - 1].iter().all(|r| r.fragment));
    assert!(!frags.last().unwrap().fragment);
    assert_eq!(frags.iter().map(|r| r.events.len()).sum::<usize>(), 6);
    assert_eq!(of(1).len(), 1);
    assert_eq!(of(1)[0].events.len(), 6);
}
