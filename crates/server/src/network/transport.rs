//! Peer transport over gRPC: one long-lived client stream per peer carrying batches of raft
//! messages, reconnecting with backoff. The raft loop never waits on the network: messages
//! go into a bounded per-peer queue, and a full queue drops (raft retransmits).

use crate::member::members::Registry;
use crate::member::node::{Node, Transport, REMOVED};
use crate::network::peer;
use crate::pb::raftkvpb::{self as pb, raft_client::RaftClient, raft_server};
use raft::{Message, NodeId};
use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};
use tokio::sync::mpsc;
use tonic::{Request, Response, Status, Streaming};

/// Messages waiting for one peer's stream; beyond this they are dropped.
const PEER_QUEUE: usize = 4096;
/// Most messages in one frame.
const MAX_BATCH: usize = 256;

/// How long after its last frame a peer still counts as connected (etcd's health interval).
pub const HEALTH_INTERVAL: Duration = Duration::from_secs(5);

/// When each peer was last heard from, as the receiving side saw its frames.
pub type Heard = Arc<Mutex<HashMap<NodeId, Instant>>>;

struct Peer {
    url: String,
    /// Dropping it ends the peer's sender task.
    tx: mpsc::Sender<Message>,
}

/// The sending side: one task and stream per peer. The set of peers follows the replicated
/// member registry (`Transport::set_members`) and the configuration entries entering the log
/// (`learn_peer`), so streams open and close as members come and go.
pub struct PeerTransport {
    me: NodeId,
    hello: pb::Hello,
    peers: Mutex<HashMap<NodeId, Peer>>,
    heard: Heard,
    /// Told when a peer says this member was removed.
    node: Arc<OnceLock<Node>>,
    /// How https:// peer URLs are reached.
    dialer: crate::network::tls::Dialer,
}

impl PeerTransport {
    /// A transport for member `me`, whose streams open with `hello`, starting with `urls`
    /// (peer id → peer URL).
    pub fn start(
        me: NodeId,
        urls: HashMap<NodeId, String>,
        hello: pb::Hello,
        heard: Heard,
        node: Arc<OnceLock<Node>>,
        dialer: crate::network::tls::Dialer,
    ) -> PeerTransport {
        let t = PeerTransport {
            me,
            hello,
            peers: Mutex::new(HashMap::new()),
            heard,
            node,
            dialer,
        };
        for (id, url) in urls {
            t.ensure(id, &url, true);
        }
        t
    }

    /// Reach `id` at `url`; with `replace`, a known peer at another URL is reconnected.
    /// Never this member itself, under its id or at one of its own peer URLs: a registry
    /// may still list a removed predecessor there (a replacement reuses the URL), and a
    /// stream to ourselves would be refused by ourselves forever.
    fn ensure(&self, id: NodeId, url: &str, replace: bool) {
        if id == self.me || url.is_empty() || self.hello.peer_urls.iter().any(|u| u == url) {
            return;
        }
        let mut peers = self.peers.lock().unwrap();
        if let Some(p) = peers.get(&id) {
            if p.url == url || !replace {
                return;
            }
        }
        let (tx, rx) = mpsc::channel(PEER_QUEUE);
        tokio::spawn(run_peer(
            url.to_string(),
            self.hello.clone(),
            rx,
            self.node.clone(),
            self.dialer.clone(),
        ));
        peers.insert(
            id,
            Peer {
                url: url.to_string(),
                tx,
            },
        );
    }

    /// Peers this transport reaches, with their URLs.
    pub fn peers(&self) -> HashMap<NodeId, String> {
        let peers = self.peers.lock().unwrap();
        peers.iter().map(|(id, p)| (*id, p.url.clone())).collect()
    }
}

impl Transport for PeerTransport {
    fn send(&self, msgs: Vec<Message>) {
        let peers = self.peers.lock().unwrap();
        for m in msgs {
            if let Some(p) = peers.get(&m.to) {
                let _ = p.tx.try_send(m);
            }
        }
    }

    fn set_members(&self, me: NodeId, registry: &Registry) {
        for m in registry.members.values().filter(|m| m.id != me) {
            if let Some(url) = m.peer_urls.first() {
                self.ensure(m.id, url, true);
            }
        }
        let mut peers = self.peers.lock().unwrap();
        peers.retain(|id, _| !registry.removed.contains(id));
    }

    fn learn_peer(&self, id: NodeId, url: &str) {
        self.ensure(id, url, false);
    }

    fn active(&self, id: NodeId) -> bool {
        let heard = self.heard.lock().unwrap();
        heard
            .get(&id)
            .is_some_and(|t| t.elapsed() < HEALTH_INTERVAL)
    }
}

async fn run_peer(
    url: String,
    hello: pb::Hello,
    mut rx: mpsc::Receiver<Message>,
    node: Arc<OnceLock<Node>>,
    dialer: crate::network::tls::Dialer,
) {
    let mut backoff = Duration::from_millis(50);
    loop {
        let connected = match tonic::transport::Endpoint::from_shared(url.clone()) {
            Ok(endpoint) => dialer.connect(endpoint).await,
            Err(e) => Err(e),
        };
        let client = match connected {
            Ok(c) => RaftClient::new(c),
            Err(e) => {
                // A peer that is down is normal and retried in silence; one whose
                // certificate we refuse will not get better by itself.
                if let Some(why) = crate::network::tls::tls_failure(&e) {
                    crate::network::tls::warn_dial_refused(&url, &why);
                }
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(1));
                // Messages queued meanwhile are stale; raft will send what is still needed.
                while rx.try_recv().is_ok() {}
                continue;
            }
        };
        let opened = Instant::now();
        if !stream_to(client, &url, &hello, &mut rx, &node).await {
            return; // the node stopped
        }
        // A peer that refuses our certificate over TLS 1.3 lets the handshake finish and
        // drops the stream at its first frame: a stream that ends at once is retried with
        // backoff, as a failed connect is, rather than twenty handshakes a second.
        if url.starts_with("https://") && opened.elapsed() < Duration::from_secs(1) {
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(1));
        } else {
            backoff = Duration::from_millis(50);
        }
    }
}

/// Run one stream to a peer: the hello, then batches of whatever queues up. Returns false
/// when the node stopped, true when the stream ended and should be opened again.
async fn stream_to(
    mut client: RaftClient<tonic::transport::Channel>,
    url: &str,
    hello: &pb::Hello,
    rx: &mut mpsc::Receiver<Message>,
    node: &OnceLock<Node>,
) -> bool {
    let (frames_tx, frames_rx) = mpsc::channel::<pb::MessageBatch>(64);
    let mut call = tokio::spawn(async move {
        client
            .stream(tokio_stream::wrappers::ReceiverStream::new(frames_rx))
            .await
    });
    // Open with the hello at once, so that every member learns of every other even when
    // raft has nothing to say to it (followers talk only to the leader).
    let mut frame = pb::MessageBatch {
        messages: Vec::new(),
        hello: Some(hello.clone()),
    };
    loop {
        if frames_tx.send(frame).await.is_err() {
            break;
        }
        let first = tokio::select! {
            m = rx.recv() => m,
            ended = &mut call => {
                if let Ok(Err(status)) = ended {
                    if status.message() == REMOVED {
                        tracing::error!(peer = %url, "{REMOVED}");
                        if let Some(n) = node.get() {
                            n.removed_by_peer();
                        }
                        return false;
                    }
                    if let Some(why) = crate::network::tls::tls_failure(&status) {
                        // The peer refused our certificate (TLS 1.3 says so only once
                        // the stream starts): retrying at once would not change its mind.
                        crate::network::tls::warn_dial_refused(url, &why);
                        tokio::time::sleep(Duration::from_secs(1)).await;
                    } else if status.code() == tonic::Code::FailedPrecondition {
                        // Not a network hiccup: the peer will refuse us until someone fixes
                        // the configuration. Say so, and do not hammer it.
                        tracing::error!(peer = %url, "the peer refused us: {}", status.message());
                        tokio::time::sleep(Duration::from_secs(1)).await;
                    }
                }
                return true;
            }
        };
        let Some(first) = first else {
            call.abort();
            return false;
        };
        let mut messages = vec![peer::to_pb(&first)];
        while messages.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(m) => messages.push(peer::to_pb(&m)),
                Err(_) => break,
            }
        }
        frame = pb::MessageBatch {
            messages,
            hello: None,
        };
    }
    call.abort();
    true
}

/// The receiving side: checks the stream's hello, then steps every message of every frame
/// into the local node. Also answers newcomers asking who is in the cluster.
pub struct RaftService {
    node: Arc<OnceLock<Node>>,
    cluster_id: u64,
    /// The registry the cluster was bootstrapped with, for newcomers.
    bootstrap: Registry,
    transport: Arc<PeerTransport>,
    heard: Heard,
}

impl RaftService {
    pub fn new(
        node: Arc<OnceLock<Node>>,
        cluster_id: u64,
        bootstrap: Registry,
        transport: Arc<PeerTransport>,
        heard: Heard,
    ) -> Self {
        RaftService {
            node,
            cluster_id,
            bootstrap,
            transport,
            heard,
        }
    }

    /// Check a stream's hello; returns the member it says it comes from.
    fn admit(&self, hello: Option<pb::Hello>) -> Result<NodeId, Status> {
        let Some(h) = hello else {
            return Err(Status::failed_precondition(
                "a peer stream must open with a hello",
            ));
        };
        if h.cluster_id != self.cluster_id {
            tracing::warn!(
                peer = format_args!("{:016x}", h.member_id),
                "refused a peer of cluster {:016x} (this is {:016x})",
                h.cluster_id,
                self.cluster_id
            );
            return Err(Status::failed_precondition(format!(
                "it belongs to cluster {:016x}, not to cluster {:016x}",
                self.cluster_id, h.cluster_id
            )));
        }
        let Some(node) = self.node.get() else {
            return Err(Status::unavailable("the member is starting"));
        };
        node.admits(h.member_id)?;
        // A member we cannot reach yet (one that joined after us) is reached where it says.
        if let Some(url) = h.peer_urls.first() {
            self.transport.learn_peer(h.member_id, url);
        }
        self.heard
            .lock()
            .unwrap()
            .insert(h.member_id, Instant::now());
        Ok(h.member_id)
    }
}

#[tonic::async_trait]
impl raft_server::Raft for RaftService {
    async fn stream(
        &self,
        request: Request<Streaming<pb::MessageBatch>>,
    ) -> Result<Response<pb::Empty>, Status> {
        let mut frames = request.into_inner();
        let Some(first) = frames.message().await? else {
            return Ok(Response::new(pb::Empty {}));
        };
        let peer = self.admit(first.hello.clone())?;
        let mut next = Some(first);
        while let Some(batch) = match next.take() {
            Some(b) => Some(b),
            None => frames.message().await?,
        } {
            let Some(node) = self.node.get() else {
                continue;
            };
            self.heard.lock().unwrap().insert(peer, Instant::now());
            // A member removed while its stream was open is told on its next frame: it may
            // not have learned of its removal (the leader stops replicating to it once the
            // change commits), and must stop rather than campaign forever.
            if node.is_removed(peer) {
                return Err(Status::failed_precondition(REMOVED));
            }
            for m in batch.messages {
                let m = match peer::from_pb(m) {
                    Ok(m) => m,
                    Err(why) => {
                        // Dropped; the peer's raft resends whatever mattered.
                        tracing::warn!(
                            peer = format_args!("{peer:016x}"),
                            "malformed raft message dropped: {why}"
                        );
                        continue;
                    }
                };
                // A stream speaks for the member its hello named, and no other: a message
                // claiming another sender is a bug or an impostor, and ends the stream.
                if m.from != peer {
                    tracing::warn!(
                        peer = format_args!("{peer:016x}"),
                        "closing a peer stream: it carried a message from {:016x}",
                        m.from
                    );
                    return Err(Status::permission_denied(format!(
                        "this stream belongs to member {peer:016x}, not to {:016x}",
                        m.from
                    )));
                }
                node.step(m);
            }
        }
        Ok(Response::new(pb::Empty {}))
    }

    async fn members(&self, _: Request<pb::Empty>) -> Result<Response<pb::ClusterInfo>, Status> {
        let Some(node) = self.node.get() else {
            return Err(Status::unavailable("the member is starting"));
        };
        Ok(Response::new(pb::ClusterInfo {
            cluster_id: self.cluster_id,
            bootstrap: Some(self.bootstrap.to_pb()),
            current: Some(node.view().members().to_pb()),
        }))
    }
}
