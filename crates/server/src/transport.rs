//! Peer transport over gRPC: one long-lived client stream per peer carrying batches of raft
//! messages, reconnecting with backoff. The raft loop never waits on the network: messages
//! go into a bounded per-peer queue, and a full queue drops (raft retransmits).

use crate::node::{Node, Transport};
use crate::pb::raftkvpb::{self as pb, raft_client::RaftClient, raft_server};
use crate::peer;
use raft::{Message, NodeId};
use std::collections::HashMap;
use std::sync::{Arc, OnceLock};
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

impl PeerTransport {
    /// Start one sender task per peer (`urls`: peer id → peer URL).
    pub fn start(urls: HashMap<NodeId, String>) -> PeerTransport {
        let peers = urls
            .into_iter()
            .map(|(id, url)| {
                let (tx, rx) = mpsc::channel(PEER_QUEUE);
                tokio::spawn(run_peer(url, rx));
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

async fn run_peer(url: String, mut rx: mpsc::Receiver<Message>) {
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
        let (frames_tx, frames_rx) = mpsc::channel::<pb::MessageBatch>(64);
        let mut client = client;
        let call = tokio::spawn(async move {
            client
                .stream(tokio_stream::wrappers::ReceiverStream::new(frames_rx))
                .await
        });
        // Forward batches until the stream breaks or the node stops.
        loop {
            let Some(first) = rx.recv().await else {
                return; // the node stopped
            };
            let mut batch = vec![peer::to_pb(&first)];
            while batch.len() < MAX_BATCH {
                match rx.try_recv() {
                    Ok(m) => batch.push(peer::to_pb(&m)),
                    Err(_) => break,
                }
            }
            if frames_tx
                .send(pb::MessageBatch { messages: batch })
                .await
                .is_err()
            {
                break; // the stream ended: reconnect
            }
        }
        call.abort();
    }
}

/// The receiving side: steps every message of every frame into the local node.
pub struct RaftService {
    node: Arc<OnceLock<Node>>,
}

impl RaftService {
    pub fn new(node: Arc<OnceLock<Node>>) -> Self {
        RaftService { node }
    }
}

#[tonic::async_trait]
impl raft_server::Raft for RaftService {
    async fn stream(
        &self,
        request: Request<Streaming<pb::MessageBatch>>,
    ) -> Result<Response<pb::Empty>, Status> {
        let mut frames = request.into_inner();
        while let Some(batch) = frames.message().await? {
            let Some(node) = self.node.get() else {
                continue;
            };
            for m in batch.messages {
                // A malformed message is dropped; the peer's raft will resend what matters.
                if let Ok(m) = peer::from_pb(m) {
                    node.step(m);
                }
            }
        }
        Ok(Response::new(pb::Empty {}))
    }
}
