//! The etcd v3 gRPC services on top of a [`Node`]: KV, Maintenance.Status and
//! Cluster.MemberList. Any member serves any request, so a client configured with every
//! endpoint just works: a follower forwards writes to the leader through raft and answers
//! once it has applied them; linearizable reads on a follower are confirmed through the
//! leader by ReadIndex and served locally.

use crate::api;
use crate::command::Write;
use crate::node::{Node, WriteResult};
use crate::pb::etcdserverpb::{self as pb, cluster_server, kv_server, maintenance_server};
use crate::transport::ClientUrls;
use raft::NodeId;
use std::sync::Arc;
use std::time::Duration;
use tonic::{Request, Response, Status};

/// The version reported by Maintenance.Status: the etcd API level raftkv implements.
pub const API_VERSION: &str = "3.4.0";
/// How long a request may wait for the cluster before "request timed out".
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Clone, Debug)]
pub struct Member {
    pub id: NodeId,
    pub name: String,
    pub peer_urls: Vec<String>,
    pub client_urls: Vec<String>,
}

#[derive(Clone)]
pub struct Services {
    node: Node,
    members: Arc<Vec<Member>>,
    cluster_id: u64,
    member_id: NodeId,
    /// Other members' client URLs, as they announced them on their peer streams.
    peer_client_urls: ClientUrls,
}

fn timed_out() -> Status {
    Status::unavailable("etcdserver: request timed out")
}

impl Services {
    pub fn new(
        node: Node,
        members: Vec<Member>,
        cluster_id: u64,
        member_id: NodeId,
        peer_client_urls: ClientUrls,
    ) -> Self {
        Services {
            node,
            members: Arc::new(members),
            cluster_id,
            member_id,
            peer_client_urls,
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
        answer: impl FnOnce(kv::Response, &pb::ResponseHeader) -> Option<R>,
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

#[tonic::async_trait]
impl kv_server::Kv for Services {
    async fn range(
        &self,
        req: Request<pb::RangeRequest>,
    ) -> Result<Response<pb::RangeResponse>, Status> {
        let r = req.into_inner();
        too_large(&r)?;
        let kv_req = api::range_request(&r)?;
        let (resp, header) =
            tokio::time::timeout(REQUEST_TIMEOUT, self.node.read(kv_req, !r.serializable))
                .await
                .map_err(|_| timed_out())??;
        Ok(Response::new(api::range_response(resp, &header)))
    }

    async fn put(&self, req: Request<pb::PutRequest>) -> Result<Response<pb::PutResponse>, Status> {
        let p = req.into_inner();
        too_large(&p)?;
        api::put_request(&p)?;
        let answer = |r, h: &_| match r {
            kv::Response::Put(r) => Some(api::put_response(r, h)),
            _ => None,
        };
        self.write_as(Write::Put(p), answer).await
    }

    async fn delete_range(
        &self,
        req: Request<pb::DeleteRangeRequest>,
    ) -> Result<Response<pb::DeleteRangeResponse>, Status> {
        let d = req.into_inner();
        too_large(&d)?;
        api::delete_request(&d)?;
        let answer = |r, h: &_| match r {
            kv::Response::DeleteRange(r) => Some(api::delete_response(r, h)),
            _ => None,
        };
        self.write_as(Write::DeleteRange(d), answer).await
    }

    async fn txn(&self, req: Request<pb::TxnRequest>) -> Result<Response<pb::TxnResponse>, Status> {
        let t = req.into_inner();
        too_large(&t)?;
        api::txn_request(&t)?;
        let answer = |r, h: &_| match r {
            kv::Response::Txn(r) => Some(api::txn_response(r, h)),
            _ => None,
        };
        self.write_as(Write::Txn(t), answer).await
    }

    async fn compact(
        &self,
        req: Request<pb::CompactionRequest>,
    ) -> Result<Response<pb::CompactionResponse>, Status> {
        let c = req.into_inner();
        let answer = |_, h: &pb::ResponseHeader| Some(pb::CompactionResponse { header: Some(*h) });
        self.write_as(Write::Compact(c), answer).await
    }
}

#[tonic::async_trait]
impl maintenance_server::Maintenance for Services {
    async fn status(
        &self,
        _: Request<pb::StatusRequest>,
    ) -> Result<Response<pb::StatusResponse>, Status> {
        let s = self.node.status().await?;
        Ok(Response::new(pb::StatusResponse {
            header: Some(self.header(s.revision, s.term)),
            version: API_VERSION.to_string(),
            db_size: s.db_size as i64,
            leader: s.leader.unwrap_or(0),
            raft_index: s.commit,
            raft_term: s.term,
            raft_applied_index: s.applied,
            errors: Vec::new(),
            db_size_in_use: s.db_size as i64,
            is_learner: false,
        }))
    }
}

#[tonic::async_trait]
impl cluster_server::Cluster for Services {
    async fn member_list(
        &self,
        _: Request<pb::MemberListRequest>,
    ) -> Result<Response<pb::MemberListResponse>, Status> {
        let s = self.node.status().await?;
        let announced = self.peer_client_urls.lock().unwrap().clone();
        let members = self
            .members
            .iter()
            .map(|m| pb::Member {
                id: m.id,
                name: m.name.clone(),
                peer_ur_ls: m.peer_urls.clone(),
                // A member that has not reached us yet shows none, as in etcd before a
                // member publishes itself.
                client_ur_ls: match announced.get(&m.id) {
                    Some(urls) if m.id != self.member_id => urls.clone(),
                    _ => m.client_urls.clone(),
                },
                is_learner: false,
            })
            .collect();
        Ok(Response::new(pb::MemberListResponse {
            header: Some(self.header(s.revision, s.term)),
            members,
        }))
    }
}
