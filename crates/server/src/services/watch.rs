//! The Watch service: etcd's bidirectional watch stream over the member's [`::watch::Hub`].
//!
//! Watches are served by the member the client talks to, from its applied state. The hub
//! lives beside the raft loop: the loop hands it each new revision as it applies (see
//! `node/`), and this file connects it to gRPC. Each stream gets a bounded queue (etcd's
//! 128 responses); the hub never sends more than the queue holds, so a client that stops
//! reading costs its queue and nothing else — its watchers fall off the fast path and are
//! caught up from history once it reads again. Requests on the stream (create, cancel,
//! progress) take the hub's lock briefly; a create or cancel that finds the queue full
//! waits for the client to read, as its answer must not be dropped. It waits on the
//! stream's own notification, which the reader signals when it takes from a full queue (or
//! goes away): no polling, so a client that stops reading costs no CPU and never contends
//! for the hub's lock, which the raft loop takes on every apply. A stream holds at most
//! `watch::Limits::watchers_per_stream` watchers (raftkv's bound; etcd has none).

use crate::member::node::Node;
use crate::pb::etcdserverpb::{self as pb, watch_request::RequestUnion, watch_server};
use crate::pb::mvccpb;
use crate::services::api;
use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use tokio::sync::{mpsc, oneshot, Notify};
use tonic::{Request, Response, Status, Streaming};

/// Responses queued per stream (etcd's `chanBufLen`).
pub const STREAM_QUEUE: usize = 128;
/// The gRPC metadata by which a client asks that its streams end when the member has no
/// leader (clientv3's `WithRequireLeader`).
const HAS_LEADER: &str = "hasleader";
/// Checks without a leader before such streams are ended (etcd's `maxNoLeaderCnt`), one
/// per election timeout.
const NO_LEADER_CHECKS: u32 = 3;

fn no_leader() -> Status {
    Status::unavailable("etcdserver: no leader")
}

/// The member's watchers, shared by the raft loop (which feeds them revisions) and the
/// streams (which add and remove them).
#[derive(Clone)]
pub struct Watchers {
    pub hub: Arc<Mutex<::watch::Hub<StreamSink>>>,
    /// Wakes the loop when a stream added work it must do (a watch from the past to replay,
    /// a progress request).
    pub wake: Arc<Notify>,
    /// The member's current term, for response headers.
    pub term: Arc<AtomicU64>,
}

impl Watchers {
    pub fn new(revision: i64) -> Self {
        Watchers {
            hub: Arc::new(Mutex::new(::watch::Hub::new(
                revision,
                ::watch::Limits::default(),
            ))),
            wake: Arc::new(Notify::new()),
            term: Arc::new(AtomicU64::new(0)),
        }
    }
}

/// One stream's queue, as the hub sees it: responses become etcd's messages with the
/// member's header as they are queued.
pub struct StreamSink {
    tx: mpsc::Sender<Vec<pb::WatchResponse>>,
    cluster_id: u64,
    member_id: u64,
    term: Arc<AtomicU64>,
}

impl ::watch::Sink for StreamSink {
    fn room(&self) -> usize {
        self.tx.capacity()
    }

    fn send(&mut self, rs: Vec<::watch::Response>) {
        let raft_term = self.term.load(Ordering::Relaxed);
        let out = rs
            .into_iter()
            .map(|r| pb::WatchResponse {
                header: Some(pb::ResponseHeader {
                    cluster_id: self.cluster_id,
                    member_id: self.member_id,
                    revision: r.revision,
                    raft_term,
                }),
                watch_id: r.watch_id,
                created: r.created,
                canceled: r.canceled,
                compact_revision: r.compact_revision,
                cancel_reason: r.cancel_reason,
                fragment: r.fragment,
                events: r.events.into_iter().map(event).collect(),
            })
            .collect();
        // Room was checked by the hub, and only the hub sends; a closed stream is dropped
        // by the hub on its next pass.
        let _ = self.tx.try_send(out);
    }

    fn is_closed(&self) -> bool {
        self.tx.is_closed()
    }
}

/// Run a request whose answer needs room in the stream's queue, waiting for the client to
/// read if there is none: on `room`, which the stream's reader signals (see [`Outgoing`]).
/// Returns how many times it tried (each try takes the hub's lock once).
async fn until_room(
    hub: &Mutex<::watch::Hub<StreamSink>>,
    room: &Notify,
    mut f: impl FnMut(&mut ::watch::Hub<StreamSink>) -> Result<(), ::watch::Full>,
) -> u64 {
    let mut tries = 0;
    loop {
        tries += 1;
        if f(&mut hub.lock().unwrap()).is_ok() {
            return tries;
        }
        room.notified().await;
    }
}

fn event(e: ::watch::Event) -> mvccpb::Event {
    mvccpb::Event {
        r#type: match e.kind {
            ::watch::EventKind::Put => mvccpb::event::EventType::Put as i32,
            ::watch::EventKind::Delete => mvccpb::event::EventType::Delete as i32,
        },
        kv: Some(api::key_value(e.kv)),
        prev_kv: e.prev_kv.map(api::key_value),
    }
}

fn create_request(c: pb::WatchCreateRequest) -> ::watch::CreateRequest {
    use pb::watch_create_request::FilterType;
    let has = |f: FilterType| c.filters.contains(&(f as i32));
    ::watch::CreateRequest {
        no_put: has(FilterType::Noput),
        no_delete: has(FilterType::Nodelete),
        key: c.key,
        range_end: c.range_end,
        start_revision: c.start_revision,
        progress_notify: c.progress_notify,
        prev_kv: c.prev_kv,
        watch_id: c.watch_id,
        fragment: c.fragment,
    }
}

#[derive(Clone)]
pub struct WatchService {
    node: Node,
    watchers: Watchers,
}

impl WatchService {
    pub fn new(node: Node) -> Self {
        WatchService {
            watchers: node.watchers(),
            node,
        }
    }
}

/// What the client reads: the queue's responses one by one, then — for a stream that
/// required a leader and lost it — the error that ends it. Dropped when the call ends,
/// which closes the stream in the hub.
pub struct Outgoing {
    rx: mpsc::Receiver<Vec<pb::WatchResponse>>,
    ready: VecDeque<pb::WatchResponse>,
    stop: Option<oneshot::Receiver<Status>>,
    ended: bool,
    hub: Arc<Mutex<::watch::Hub<StreamSink>>>,
    stream: ::watch::StreamId,
    /// Wakes the loop when this queue had been full: its watchers may be waiting for room.
    wake: Arc<Notify>,
    /// Wakes this stream's request task when the queue had been full (see [`until_room`]).
    room: Arc<Notify>,
}

impl tokio_stream::Stream for Outgoing {
    type Item = Result<pb::WatchResponse, Status>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        if self.ended {
            return Poll::Ready(None);
        }
        if let Some(r) = self.ready.pop_front() {
            return Poll::Ready(Some(Ok(r)));
        }
        if let Some(stop) = self.stop.as_mut() {
            if let Poll::Ready(result) = Pin::new(stop).poll(cx) {
                self.stop = None;
                if let Ok(status) = result {
                    self.ended = true;
                    return Poll::Ready(Some(Err(status)));
                }
            }
        }
        match self.rx.poll_recv(cx) {
            Poll::Ready(Some(rs)) => {
                // The queue was full: the hub, and a request waiting for room, may go on. (A
                // waiter saw the queue full under the hub's lock, and only this reader makes
                // room, so the read that does is one that finds it had been full; a wake-up
                // before the waiter awaits is kept as a permit.)
                if self.rx.len() + 1 >= STREAM_QUEUE {
                    self.wake.notify_one();
                    self.room.notify_one();
                }
                self.ready.extend(rs);
                Poll::Ready(self.ready.pop_front().map(Ok))
            }
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending => Poll::Pending,
        }
    }
}

impl Drop for Outgoing {
    fn drop(&mut self) {
        if let Ok(mut hub) = self.hub.lock() {
            hub.close(self.stream);
        }
        // A request waiting for room finds the stream gone (the hub then answers it with
        // nothing) instead of waiting forever.
        self.room.notify_one();
    }
}

#[tonic::async_trait]
impl watch_server::Watch for WatchService {
    type WatchStream = Outgoing;

    async fn watch(
        &self,
        req: Request<Streaming<pb::WatchRequest>>,
    ) -> Result<Response<Outgoing>, Status> {
        let require_leader = req
            .metadata()
            .get(HAS_LEADER)
            .is_some_and(|v| v.as_bytes() == b"true");
        if require_leader && !self.node.has_leader() {
            return Err(no_leader());
        }
        let (tx, rx) = mpsc::channel(STREAM_QUEUE);
        let sink = StreamSink {
            tx,
            cluster_id: self.node.cluster_id(),
            member_id: self.node.id(),
            term: self.watchers.term.clone(),
        };
        let stream = self.watchers.hub.lock().unwrap().open(sink);
        let room = Arc::new(Notify::new());
        let stop = require_leader.then(|| {
            let (stop_tx, stop_rx) = oneshot::channel();
            tokio::spawn(self.clone().monitor_leader(stop_tx));
            stop_rx
        });
        tokio::spawn(
            self.clone()
                .requests(stream, room.clone(), req.into_inner()),
        );
        Ok(Response::new(Outgoing {
            rx,
            ready: VecDeque::new(),
            stop,
            ended: false,
            hub: self.watchers.hub.clone(),
            stream,
            wake: self.watchers.wake.clone(),
            room,
        }))
    }
}

impl WatchService {
    /// Read the client's requests until it stops sending. A client that only half-closes
    /// keeps receiving (as etcd's streams do); the stream closes when the call ends.
    async fn requests(
        self,
        stream: ::watch::StreamId,
        room: Arc<Notify>,
        mut inbound: Streaming<pb::WatchRequest>,
    ) {
        let hub = &self.watchers.hub;
        while let Ok(Some(req)) = inbound.message().await {
            match req.request_union {
                Some(RequestUnion::CreateRequest(c)) => {
                    let c = create_request(c);
                    until_room(hub, &room, |hub| hub.create(stream, &c)).await;
                }
                Some(RequestUnion::CancelRequest(c)) => {
                    until_room(hub, &room, |hub| hub.cancel(stream, c.watch_id)).await;
                }
                Some(RequestUnion::ProgressRequest(_)) => {
                    self.watchers.hub.lock().unwrap().request_progress(stream);
                }
                None => {}
            }
            // The loop replays watches from the past and sends waiting progress.
            self.watchers.wake.notify_one();
        }
    }

    /// For a stream that requires a leader: end it once the member has had none for
    /// `NO_LEADER_CHECKS` election timeouts in a row (etcd's rule), or stop watching when
    /// the stream ends first.
    async fn monitor_leader(self, mut stop: oneshot::Sender<Status>) {
        let mut without = 0;
        loop {
            tokio::select! {
                _ = stop.closed() => return,
                _ = tokio::time::sleep(self.node.election_timeout()) => {}
            }
            without = if self.node.has_leader() {
                0
            } else {
                without + 1
            };
            if without >= NO_LEADER_CHECKS {
                let _ = stop.send(no_leader());
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;
    use tokio_stream::StreamExt;

    fn create(key: &str) -> ::watch::CreateRequest {
        create_request(pb::WatchCreateRequest {
            key: bytes::Bytes::copy_from_slice(key.as_bytes()),
            ..Default::default()
        })
    }

    /// A hub with one stream whose client never reads: the answers to its creates have
    /// filled its queue.
    #[allow(clippy::type_complexity)]
    fn full_stream() -> (
        Arc<Mutex<::watch::Hub<StreamSink>>>,
        ::watch::StreamId,
        mpsc::Receiver<Vec<pb::WatchResponse>>,
    ) {
        let hub = Arc::new(Mutex::new(::watch::Hub::new(1, ::watch::Limits::default())));
        let (tx, rx) = mpsc::channel(STREAM_QUEUE);
        let sink = StreamSink {
            tx,
            cluster_id: 1,
            member_id: 1,
            term: Arc::new(AtomicU64::new(1)),
        };
        let stream = hub.lock().unwrap().open(sink);
        for i in 0..STREAM_QUEUE {
            hub.lock()
                .unwrap()
                .create(stream, &create(&format!("k{i}")))
                .unwrap();
        }
        (hub, stream, rx)
    }

    /// Defect 9: a create on a stream whose client stopped reading waits without spinning —
    /// it tries once, sleeps until the client reads, then tries once more — instead of
    /// taking the hub's lock every few milliseconds.
    #[tokio::test]
    async fn a_request_waiting_for_room_waits_without_polling() {
        let (hub, stream, rx) = full_stream();
        let room = Arc::new(Notify::new());
        let waiting = tokio::spawn({
            let (hub, room) = (hub.clone(), room.clone());
            async move {
                let req = create("late");
                until_room(&hub, &room, |h| h.create(stream, &req)).await
            }
        });
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(!waiting.is_finished(), "a full queue took a create");
        // The client reads one answer: the waiting create goes on, having tried twice.
        let mut out = Outgoing {
            rx,
            ready: VecDeque::new(),
            stop: None,
            ended: false,
            hub: hub.clone(),
            stream,
            wake: Arc::new(Notify::new()),
            room,
        };
        assert!(out.next().await.is_some());
        let tries = tokio::time::timeout(Duration::from_secs(5), waiting)
            .await
            .expect("the create was not woken when the client read")
            .unwrap();
        assert!(tries <= 3, "{tries} tries while the queue was full: a poll");
        assert_eq!(hub.lock().unwrap().watchers(), STREAM_QUEUE + 1);
    }

    /// A stream whose client goes away wakes a request waiting for room, which then ends.
    #[tokio::test]
    async fn a_request_waiting_for_room_ends_with_its_stream() {
        let (hub, stream, rx) = full_stream();
        let room = Arc::new(Notify::new());
        let out = Outgoing {
            rx,
            ready: VecDeque::new(),
            stop: None,
            ended: false,
            hub: hub.clone(),
            stream,
            wake: Arc::new(Notify::new()),
            room: room.clone(),
        };
        let waiting = tokio::spawn({
            let hub = hub.clone();
            async move {
                let req = create("late");
                until_room(&hub, &room, |h| h.create(stream, &req)).await
            }
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        drop(out);
        tokio::time::timeout(Duration::from_secs(5), waiting)
            .await
            .expect("the create waited on a stream that was gone")
            .unwrap();
        assert_eq!(hub.lock().unwrap().watchers(), 0);
    }
}
