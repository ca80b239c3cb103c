//! Watch clients in the whole-system simulation: every member runs the production watch
//! hub ([`watch::Hub`]) on its applied store, and simulated clients keep watches open on
//! members at their own pace — some read fast, some slowly enough that their watchers fall
//! off the hub's fast path. When a client's member crashes, the client resumes on another
//! member from the revision after the last one it got, as an etcd client does. Every
//! response is checked against the history the members applied ([`watch::check`]): ordered,
//! unique, gapless, whole revisions, progress never ahead of events; and at the end every
//! client has every revision.

use kv::Revision;
use raft::NodeId;
use rand::Rng;
use watch::check::{History, Queue, StreamCheck};
use watch::{CreateRequest, Hub, Limits, StreamId};

/// Small bounds, so that catching up takes many passes and fragments happen.
pub fn limits() -> Limits {
    Limits {
        fragment_bytes: 120,
        revisions_per_response: 4,
        catch_up_writes: 16,
        ..Limits::default()
    }
}

pub type SimHub = Hub<Queue>;

/// The stream a client has open.
struct Open {
    member: NodeId,
    stream: StreamId,
    queue: Queue,
    check: StreamCheck,
}

pub struct Client {
    /// What it watches; `start_revision` is where its next stream resumes.
    want: CreateRequest,
    /// Responses it reads per turn.
    pace: usize,
    open: Option<Open>,
    pub resumes: u64,
    /// Every event it was given, over all its streams, as (revision, key).
    pub got: Vec<(Revision, bytes::Bytes)>,
}

#[derive(Default)]
pub struct WatchClients {
    pub clients: Vec<Client>,
    /// What the members applied, revision by revision.
    pub history: History,
}

impl WatchClients {
    /// `n` clients: on one key, on every key, with and without previous values; paces from
    /// one response a turn to many.
    pub fn new(n: usize, rng: &mut impl Rng) -> WatchClients {
        let clients = (0..n)
            .map(|i| {
                let (key, range_end) = if i % 2 == 0 {
                    (bytes::Bytes::new(), bytes::Bytes::from_static(b"\0"))
                } else {
                    (
                        bytes::Bytes::copy_from_slice(&0u64.to_be_bytes()),
                        bytes::Bytes::new(),
                    )
                };
                Client {
                    want: CreateRequest {
                        key,
                        range_end,
                        start_revision: 1,
                        prev_kv: rng.gen(),
                        fragment: rng.gen(),
                        ..Default::default()
                    },
                    pace: [1, 2, 64][i % 3],
                    open: None,
                    resumes: 0,
                    got: Vec::new(),
                }
            })
            .collect();
        WatchClients {
            clients,
            history: History::default(),
        }
    }

    /// A member crashed: its streams are gone.
    pub fn crashed(&mut self, id: NodeId) {
        for c in &mut self.clients {
            if c.open.as_ref().is_some_and(|o| o.member == id) {
                c.open = None;
            }
        }
    }

    /// Each client reads at its pace, then any client without a stream opens one on a
    /// random member with a hub (`hubs[id - 1]`: members that are up), from the revision
    /// after its last. Returns the members whose hubs may have work (to sync now).
    pub fn turn(
        &mut self,
        rng: &mut impl Rng,
        hubs: &mut [Option<SimHub>],
    ) -> Result<Vec<NodeId>, String> {
        let live: Vec<NodeId> = (1..=hubs.len() as NodeId)
            .filter(|id| hubs[*id as usize - 1].is_some())
            .collect();
        let mut touched = Vec::new();
        for c in &mut self.clients {
            if let Some(o) = &mut c.open {
                for _ in 0..c.pace {
                    let Some(slot) = o.queue.pop() else {
                        break;
                    };
                    for r in &slot {
                        o.check.received(&self.history, r)?;
                        for e in &r.events {
                            c.got.push((e.kv.mod_revision, e.kv.key.clone()));
                        }
                    }
                }
                touched.push(o.member);
                if rng.gen_ratio(1, 20) {
                    if let Some(h) = hubs[o.member as usize - 1].as_mut() {
                        h.request_progress(o.stream);
                    }
                }
                continue;
            }
            if live.is_empty() {
                continue;
            }
            let member = live[rng.gen_range(0..live.len())];
            let Some(h) = hubs[member as usize - 1].as_mut() else {
                continue;
            };
            let queue = Queue::new(3);
            let stream = h.open(queue.clone());
            let mut want = c.want.clone();
            want.start_revision = c.got.last().map_or(1, |g| g.0 + 1);
            if h.create(stream, &want).is_err() {
                return Err("a new stream had no room for its create".into());
            }
            let mut check = StreamCheck::new();
            check.sent(want);
            if !c.got.is_empty() {
                c.resumes += 1;
            }
            c.open = Some(Open {
                member,
                stream,
                queue,
                check,
            });
            touched.push(member);
        }
        Ok(touched)
    }

    /// At the end, with everything applied everywhere up to `last`: every client was given
    /// every revision of its range exactly once, across all its streams.
    pub fn complete(&self, last: Revision) -> Result<(), String> {
        for (i, c) in self.clients.iter().enumerate() {
            if let Some(o) = &c.open {
                o.check
                    .complete(&self.history, last)
                    .map_err(|e| format!("watch client {i}: {e}"))?;
            }
            let range = kv::KeyRange {
                key: c.want.key.clone(),
                range_end: c.want.range_end.clone(),
            };
            let mut want = Vec::new();
            for rev in 1..=last {
                for e in self.history.events_at(rev) {
                    if range.contains(&e.kv.key) {
                        want.push((rev, e.kv.key.clone()));
                    }
                }
            }
            if c.got != want {
                return Err(format!(
                    "watch client {i} was given {} events over {} streams, the history has {}",
                    c.got.len(),
                    c.resumes + 1,
                    want.len()
                ));
            }
        }
        Ok(())
    }
}
