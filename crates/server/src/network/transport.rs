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
/// Most bytes of messages in one frame (a frame is one gRPC message). The core lets 32 MiB
/// of appends or snapshot chunks be in flight to a follower, and the loop queues a whole
/// window before the sender runs: sent as one frame, it was over what the peer accepts
/// ([`MAX_FRAME_DECODE`]), the peer refused it and closed the stream, the window was lost,
/// and a follower behind by megabytes caught up at one probe per heartbeat (a newcomer
/// needing a snapshot, never). A message larger than this on its own goes alone.
pub const MAX_FRAME_BYTES: usize = 2 << 20;
/// The largest frame a member accepts from a peer: well above [`MAX_FRAME_BYTES`], so that a
/// single message bigger than that (an entry near etcd's 1.5 MiB request limit with its
/// framing) still passes; tonic's default, 4 MiB, left no room.
pub const MAX_FRAME_DECODE: usize = 16 << 20;

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
    // A message that did not fit in the last frame: it opens the next.
    let mut held = None;
    loop {
        if frames_tx.send(frame).await.is_err() {
            // The call ended while this frame waited: say why, as below.
            return match tokio::time::timeout(Duration::from_secs(1), &mut call).await {
                Ok(Ok(Err(status))) => stream_failed(url, &status, node).await,
                _ => {
                    call.abort();
                    true
                }
            };
        }
        let first = match held.take() {
            Some(m) => m,
            None => tokio::select! {
                m = rx.recv() => match m {
                    Some(m) => peer::to_pb(&m),
                    None => {
                        call.abort();
                        return false;
                    }
                },
                ended = &mut call => {
                    if let Ok(Err(status)) = ended {
                        return stream_failed(url, &status, node).await;
                    }
                    return true;
                }
            },
        };
        let messages;
        (messages, held) = fill_frame(first, rx);
        frame = pb::MessageBatch {
            messages,
            hello: None,
        };
    }
}

/// A frame's messages: `first`, then whatever is queued, up to [`MAX_BATCH`] messages and
/// [`MAX_FRAME_BYTES`] (`first` alone if it is larger). The message that would have taken
/// the frame past its bytes is returned, to open the next frame: order is kept.
fn fill_frame(
    first: pb::Message,
    rx: &mut mpsc::Receiver<Message>,
) -> (Vec<pb::Message>, Option<pb::Message>) {
    use prost::Message as _;
    let mut bytes = first.encoded_len();
    let mut messages = vec![first];
    while messages.len() < MAX_BATCH {
        let Ok(m) = rx.try_recv() else { break };
        let m = peer::to_pb(&m);
        let len = m.encoded_len();
        if bytes + len > MAX_FRAME_BYTES {
            return (messages, Some(m));
        }
        bytes += len;
        messages.push(m);
    }
    (messages, None)
}

/// A stream to a peer ended with `status`: say why where it is not the network's ordinary
/// coming and going, and wait where retrying at once would not help. Returns false when this
/// member was removed (the sender stops), true when the stream should be opened again.
async fn stream_failed(url: &str, status: &Status, node: &OnceLock<Node>) -> bool {
    if status.message() == REMOVED {
        tracing::error!(peer = %url, "{REMOVED}");
        if let Some(n) = node.get() {
            n.removed_by_peer();
        }
        return false;
    }
    if let Some(why) = crate::network::tls::tls_failure(status) {
        // The peer refused our certificate (TLS 1.3 says so only once the stream starts):
        // retrying at once would not change its mind.
        crate::network::tls::warn_dial_refused(url, &why);
        tokio::time::sleep(Duration::from_secs(1)).await;
    } else if status.code() == tonic::Code::FailedPrecondition {
        // Not a network hiccup: the peer will refuse us until someone fixes the
        // configuration. Say so, and do not hammer it.
        tracing::error!(peer = %url, "the peer refused us: {}", status.message());
        tokio::time::sleep(Duration::from_secs(1)).await;
    } else if !matches!(
        status.code(),
        tonic::Code::Unavailable | tonic::Code::Unknown | tonic::Code::Cancelled
    ) {
        // A peer that is down, dies or restarts shows as Unavailable, or as an Unknown
        // transport error (a broken pipe); anything else is the peer refusing what we sent
        // (a frame too large, say), which lost the frames queued on the stream: say so.
        tracing::warn!(peer = %url, "the stream to the peer ended: {status}");
    }
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

#[cfg(test)]
mod tests {
    use super::*;
    use prost::Message as _;
    use raft::{Body, Entry, EntryKind};

    /// An append of `entries` entries of `size` bytes each, numbered from `first`.
    fn append(first: u64, entries: u64, size: usize) -> Message {
        Message {
            from: 1,
            to: 2,
            term: 1,
            body: Body::Append {
                prev_index: first - 1,
                prev_term: 1,
                entries: (first..first + entries)
                    .map(|index| Entry {
                        term: 1,
                        index,
                        kind: EntryKind::Normal,
                        data: vec![7u8; size].into(),
                    })
                    .collect(),
                commit: 0,
            },
        }
    }

    fn first_index(m: &pb::Message) -> u64 {
        match peer::from_pb(m.clone()).unwrap().body {
            Body::Append { prev_index, .. } => prev_index + 1,
            _ => unreachable!(),
        }
    }

    /// A full flow-control window of appends (32 MiB: 32 messages of 256 entries of 4 KiB,
    /// what a follower behind by megabytes is sent at once) leaves in frames the peer
    /// accepts, every message once and in order.
    #[test]
    fn a_full_window_is_cut_into_frames_the_peer_accepts() {
        let (tx, mut rx) = mpsc::channel(PEER_QUEUE);
        for i in 0..32 {
            tx.try_send(append(1 + i * 256, 256, 4096)).unwrap();
        }
        let mut next = 1;
        let mut frames = 0;
        let mut held: Option<pb::Message> = None;
        loop {
            let first = match held.take() {
                Some(m) => m,
                None => match rx.try_recv() {
                    Ok(m) => peer::to_pb(&m),
                    Err(_) => break,
                },
            };
            let (messages, rest) = fill_frame(first, &mut rx);
            held = rest;
            frames += 1;
            let frame = pb::MessageBatch {
                messages,
                hello: None,
            };
            // One message of 1 MiB and a bit goes alone; otherwise the cap holds.
            assert!(
                frame.encoded_len() <= MAX_FRAME_BYTES + 64 || frame.messages.len() == 1,
                "a frame of {} bytes",
                frame.encoded_len()
            );
            assert!(frame.encoded_len() <= MAX_FRAME_DECODE);
            for m in &frame.messages {
                assert_eq!(first_index(m), next, "out of order or lost");
                next += 256;
            }
        }
        assert_eq!(next, 1 + 32 * 256, "every message sent");
        assert!(frames >= 16, "{frames} frames for 32 MiB");
    }

    /// Small messages still go many to a frame.
    #[test]
    fn small_messages_share_a_frame() {
        let (tx, mut rx) = mpsc::channel(PEER_QUEUE);
        for i in 0..300 {
            tx.try_send(append(1 + i, 1, 100)).unwrap();
        }
        let first = peer::to_pb(&rx.try_recv().unwrap());
        let (messages, rest) = fill_frame(first, &mut rx);
        assert_eq!(messages.len(), MAX_BATCH);
        assert!(rest.is_none());
    }
}
