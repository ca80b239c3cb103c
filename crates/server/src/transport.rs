//! Peer transport over gRPC: one long-lived client stream per peer carrying batches of raft
//! messages, reconnecting with backoff. The raft loop never waits on the network: messages
//! go into a bounded per-peer queue, and a full queue drops (raft retransmits).

use crate::node::{Node, Transport};
use crate::pb::raftkvpb::{self as pb, raft_client::RaftClient, raft_server};
use crate::peer;
use raft::{Message, NodeId};
use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;
use tokio::sync::mpsc;
use tonic::{Request, Response, Status, Streaming};

/// Messages waiting for one peer's stream; beyond this they are dropped.
const PEER_QUEUE: usize = 4096;
/// Most messages in one frame.
const MAX_BATCH: usize = 256;

pub struct PeerTransport {
    peers: HashMap<NodeId, mpsc::Sender<Message>>,
}

/// Peers' client URLs as they announced them when their stream opened.
pub type ClientUrls = Arc<Mutex<HashMap<NodeId, Vec<String>>>>;

impl PeerTransport {
    /// Start one sender task per peer (`urls`: peer id → peer URL). Each stream opens with
    /// `hello`, which says who we are.
    pub fn start(urls: HashMap<NodeId, String>, hello: pb::Hello) -> PeerTransport {
        let peers = urls
            .into_iter()
            .map(|(id, url)| {
                let (tx, rx) = mpsc::channel(PEER_QUEUE);
                tokio::spawn(run_peer(url, hello.clone(), rx));
                (id, tx)
            })
            .collect();
        PeerTransport { peers }
    }
}

impl Transport for PeerTransport {
    fn send(&self, msgs: Vec<Message>) {
        for m in msgs {
            if let Some(tx) = self.peers.get(&m.to) {
                let _ = tx.try_send(m);
            }
        }
    }
}

async fn run_peer(url: String, hello: pb::Hello, mut rx: mpsc::Receiver<Message>) {
    let mut backoff = Duration::from_millis(50);
    loop {
        let client = match RaftClient::connect(url.clone()).await {
            Ok(c) => c,
            Err(_) => {
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(1));
                // Messages queued meanwhile are stale; raft will send what is still needed.
                while rx.try_recv().is_ok() {}
                continue;
            }
        };
        backoff = Duration::from_millis(50);
        if !stream_to(client, &url, &hello, &mut rx).await {
            return; // the node stopped
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
                    if status.code() == tonic::Code::FailedPrecondition {
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
/// into the local node.
pub struct RaftService {
    node: Arc<OnceLock<Node>>,
    cluster_id: u64,
    members: Vec<NodeId>,
    client_urls: ClientUrls,
}

impl RaftService {
    pub fn new(
        node: Arc<OnceLock<Node>>,
        cluster_id: u64,
        members: Vec<NodeId>,
        client_urls: ClientUrls,
    ) -> Self {
        RaftService {
            node,
            cluster_id,
            members,
            client_urls,
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
        if !self.members.contains(&h.member_id) {
            return Err(Status::failed_precondition(format!(
                "{:016x} is not a member of its cluster {:016x}",
                h.member_id, self.cluster_id
            )));
        }
        self.client_urls
            .lock()
            .unwrap()
            .insert(h.member_id, h.client_urls);
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
}
