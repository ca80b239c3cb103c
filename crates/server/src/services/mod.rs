//! etcd's v3 gRPC API, one file per service: KV (`kv`), Cluster (`cluster`), Maintenance,
//! Watch, Lease, Lock and Election, with the mapping of etcd's messages and errors onto the
//! `kv` store in `api`. Any member serves any request, so a client configured with every
//! endpoint just works: a follower forwards writes to the leader through raft and answers
//! once it has applied them; linearizable reads on a follower are confirmed through the
//! leader by ReadIndex and served locally; what only the leader may do (membership changes,
//! lease keep-alives) a follower passes to the leader's service.
//!
//! This file holds what the KV and Cluster services share: [`Services`], the response
//! header, the request timeout, and how a follower reaches its leader.

pub mod api;
pub mod cluster;
pub mod election;
pub mod kv;
pub mod lease;
pub mod lock;
pub mod maintenance;
pub mod recipe;
pub mod watch;

pub use kv::{SEQ, SESSION};

use crate::member::command::Write;
use crate::member::node::{Node, View, WriteResult};
use crate::pb::etcdserverpb as pb;
use raft::NodeId;
use std::time::Duration;
use tonic::{Response, Status};

/// The version reported by Maintenance.Status: the etcd API level raftkv implements. 3.4.31
/// is the first 3.4 release whose progress notifications are ordered with the events and
/// sent only once every watcher of the stream is caught up — the behaviour raftkv has —
/// and Kubernetes enables progress requests (consistent reads from its watch cache,
/// watch-list) only from that version on.
pub const API_VERSION: &str = "3.4.31";
/// How long a request may wait for the cluster before "request timed out".
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Clone)]
pub struct Services {
    node: Node,
    cluster_id: u64,
    member_id: NodeId,
}

pub fn timed_out() -> Status {
    Status::unavailable("etcdserver: request timed out")
}

impl Services {
    pub fn new(node: Node) -> Self {
        Services {
            cluster_id: node.cluster_id(),
            member_id: node.id(),
            node,
        }
    }

    fn header(&self, revision: i64, raft_term: u64) -> pb::ResponseHeader {
        pb::ResponseHeader {
            cluster_id: self.cluster_id,
            member_id: self.member_id,
            revision,
            raft_term,
        }
    }

    async fn write(&self, w: Write) -> WriteResult {
        tokio::time::timeout(REQUEST_TIMEOUT, self.node.write(w))
            .await
            .map_err(|_| timed_out())?
    }

    /// Propose a write and turn the store's answer into the RPC's response.
    async fn write_as<R>(
        &self,
        w: Write,
        answer: impl FnOnce(::kv::Response, &pb::ResponseHeader) -> Option<R>,
    ) -> Result<Response<R>, Status> {
        let (resp, header) = self.write(w).await?;
        answer(resp, &header)
            .map(Response::new)
            .ok_or_else(|| Status::internal("the store answered a different request"))
    }
}

fn too_large<M: prost::Message>(m: &M) -> Result<(), Status> {
    if m.encoded_len() > api::MAX_REQUEST_BYTES {
        return Err(api::request_too_large());
    }
    Ok(())
}

/// A channel (connected on first use) to `member`'s client URL: how a follower reaches its
/// leader's services. "No leader" while the member's URL is not known here yet.
pub fn channel_to(v: &View, member: NodeId) -> Result<tonic::transport::Channel, Status> {
    let url = v
        .registry
        .members
        .get(&member)
        .and_then(|m| m.client_urls.first())
        .ok_or_else(|| Status::unavailable("etcdserver: no leader"))?;
    let endpoint = tonic::transport::Endpoint::from_shared(url.clone())
        .map_err(|_| Status::unavailable("etcdserver: no leader"))?
        .connect_timeout(Duration::from_secs(1));
    // With this member's client certificate, if its client URLs are https.
    Ok(crate::network::tls::client_dialer().connect_lazy(endpoint))
}

/// A leader's refusal passes through unchanged; failing to reach it (a leader that died
/// before this member noticed) is "no leader" to the client, as etcd says, which retries.
pub fn relayed(s: Status) -> Status {
    match s.code() {
        tonic::Code::Unavailable | tonic::Code::Unknown | tonic::Code::Cancelled => {
            if s.message().starts_with("etcdserver:") {
                s
            } else {
                Status::unavailable("etcdserver: no leader")
            }
        }
        _ => s,
    }
}
