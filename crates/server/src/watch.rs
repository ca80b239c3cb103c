//! The Watch service: etcd's bidirectional watch stream over the member's [`::watch::Hub`].
//!
//! Watches are served by the member the client talks to, from its applied state. The hub
//! lives beside the raft loop: the loop hands it each new revision as it applies (see
//! `node.rs`), and this file connects it to gRPC. Each stream gets a bounded queue (etcd's
//! 128 responses); the hub never sends more than the queue holds, so a client that stops
//! reading costs its queue and nothing else — its watchers fall off the fast path and are
//! caught up from history once it reads again. Requests on the stream (create, cancel,
//! progress) take the hub's lock briefly; a create or cancel that finds the queue full
//! waits for the client to read, as its answer must not be dropped.

use crate::api;
use crate::node::Node;
use crate::pb::etcdserverpb::{self as pb, watch_request::RequestUnion, watch_server};
use crate::pb::mvccpb;
use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;
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
                if self.rx.len() + 1 >= STREAM_QUEUE {
                    self.wake.notify_one();
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
        let stop = require_leader.then(|| {
            let (stop_tx, stop_rx) = oneshot::channel();
            tokio::spawn(self.clone().monitor_leader(stop_tx));
            stop_rx
        });
        tokio::spawn(self.clone().requests(stream, req.into_inner()));
        Ok(Response::new(Outgoing {
            rx,
            ready: VecDeque::new(),
            stop,
            ended: false,
            hub: self.watchers.hub.clone(),
            stream,
            wake: self.watchers.wake.clone(),
        }))
    }
}

impl WatchService {
    /// Read the client's requests until it stops sending. A client that only half-closes
    /// keeps receiving (as etcd's streams do); the stream closes when the call ends.
    async fn requests(self, stream: ::watch::StreamId, mut inbound: Streaming<pb::WatchRequest>) {
        while let Ok(Some(req)) = inbound.message().await {
            match req.request_union {
                Some(RequestUnion::CreateRequest(c)) => {
                    let c = create_request(c);
                    self.until_room(|hub| hub.create(stream, &c)).await;
                }
                Some(RequestUnion::CancelRequest(c)) => {
                    self.until_room(|hub| hub.cancel(stream, c.watch_id)).await;
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

    /// Run a request whose answer needs room in the stream's queue, waiting for the client
    /// to read if there is none.
    async fn until_room(
        &self,
        mut f: impl FnMut(&mut ::watch::Hub<StreamSink>) -> Result<(), ::watch::Full>,
    ) {
        loop {
            if f(&mut self.watchers.hub.lock().unwrap()).is_ok() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
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
