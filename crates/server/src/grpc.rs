//! The etcd v3 gRPC services on top of a [`Node`]: KV and Cluster (Maintenance is in
//! `maintenance.rs`). Any member serves any request, so a client configured with every endpoint just
//! works: a follower forwards writes to the leader through raft and answers once it has
//! applied them; linearizable reads on a follower are confirmed through the leader by
//! ReadIndex and served locally; a membership change asked of a follower is passed to the
//! leader's Cluster service, since only the leader may propose one.

use crate::api;
use crate::command::Write;
use crate::node::{Node, View, WriteResult};
use crate::pb::etcdserverpb::{
    self as pb, cluster_client::ClusterClient, cluster_server, kv_server,
};
use crate::reconfig::{self, MemberOp};
use raft::NodeId;
use std::time::Duration;
use tonic::{Request, Response, Status};

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

/// Set on a membership request a follower passes to the leader, so that it is passed on at
/// most once (a leader that lost office meanwhile answers instead of passing it further).
const FORWARDED: &str = "raftkv-forwarded";

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

/// The gRPC metadata that makes a write exactly-once: the session (a lease id the client
/// holds, in decimal) and the write's number in it (1, 2, 3… one write at a time).
pub const SESSION: &str = "raftkv-session";
pub const SEQ: &str = "raftkv-seq";

/// A write's session, if its metadata names one. Both keys or neither.
fn session(md: &tonic::metadata::MetadataMap) -> Result<Option<kv::Session>, Status> {
    let field = |name: &str| -> Result<Option<&str>, Status> {
        md.get(name)
            .map(|v| {
                v.to_str()
                    .map_err(|_| Status::invalid_argument(format!("raftkv: {name} is not text")))
            })
            .transpose()
    };
    let bad = |name: &str| Status::invalid_argument(format!("raftkv: {name} must be a number"));
    match (field(SESSION)?, field(SEQ)?) {
        (None, None) => Ok(None),
        (Some(lease), Some(seq)) => {
            let lease: i64 = lease.trim().parse().map_err(|_| bad(SESSION))?;
            if lease == 0 {
                return Err(Status::invalid_argument(format!(
                    "raftkv: {SESSION} must name a lease (not 0)"
                )));
            }
            let seq = seq.trim().parse().map_err(|_| bad(SEQ))?;
            Ok(Some(kv::Session { lease, seq }))
        }
        _ => Err(Status::invalid_argument(format!(
            "raftkv: {SESSION} and {SEQ} go together"
        ))),
    }
}

fn tagged(session: Option<kv::Session>, w: Write) -> Write {
    match session {
        Some(s) => Write::InSession(s, Box::new(w)),
        None => w,
    }
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
        let session = session(req.metadata())?;
        let p = req.into_inner();
        too_large(&p)?;
        api::put_request(&p)?;
        let answer = |r, h: &_| match r {
            kv::Response::Put(r) => Some(api::put_response(r, h)),
            _ => None,
        };
        self.write_as(tagged(session, Write::Put(p)), answer).await
    }

    async fn delete_range(
        &self,
        req: Request<pb::DeleteRangeRequest>,
    ) -> Result<Response<pb::DeleteRangeResponse>, Status> {
        let session = session(req.metadata())?;
        let d = req.into_inner();
        too_large(&d)?;
        api::delete_request(&d)?;
        let answer = |r, h: &_| match r {
            kv::Response::DeleteRange(r) => Some(api::delete_response(r, h)),
            _ => None,
        };
        self.write_as(tagged(session, Write::DeleteRange(d)), answer)
            .await
    }

    async fn txn(&self, req: Request<pb::TxnRequest>) -> Result<Response<pb::TxnResponse>, Status> {
        let session = session(req.metadata())?;
        let t = req.into_inner();
        too_large(&t)?;
        api::client_txn_request(&t)?;
        let answer = |r, h: &_| match r {
            kv::Response::Txn(r) => Some(api::txn_response(r, h)),
            _ => None,
        };
        self.write_as(tagged(session, Write::Txn(t)), answer).await
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

/// Peer URLs as etcd accepts them: http(s)://host:port, at least one.
fn check_peer_urls(urls: &[String]) -> Result<(), Status> {
    let bad = || Status::invalid_argument("etcdserver: given member URLs are invalid");
    if urls.is_empty() {
        return Err(bad());
    }
    for u in urls {
        let rest = u
            .strip_prefix("http://")
            .or_else(|| u.strip_prefix("https://"))
            .ok_or_else(bad)?;
        let (host, port) = rest.rsplit_once(':').ok_or_else(bad)?;
        if host.is_empty() || port.parse::<u16>().map_or(true, |p| p == 0) || host.contains('/') {
            return Err(bad());
        }
    }
    Ok(())
}

/// A fresh member id: random, never 0, unused by any member present or past.
fn new_member_id(v: &View) -> NodeId {
    use std::hash::{BuildHasher, Hasher};
    loop {
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u128(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos()),
        );
        let id = h.finish();
        if id != 0 && !v.knows(id) && !v.registry.removed.contains(&id) {
            return id;
        }
    }
}

/// The members as etcd lists them: by id, learners flagged, a member that has not started
/// yet with an empty name and no client URLs.
fn member_list(v: &View) -> Vec<pb::Member> {
    v.members()
        .members
        .values()
        .map(|m| pb::Member {
            id: m.id,
            name: m.name.clone(),
            peer_ur_ls: m.peer_urls.clone(),
            client_ur_ls: m.client_urls.clone(),
            is_learner: v.is_learner(m.id),
        })
        .collect()
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
    Ok(crate::tls::client_dialer().connect_lazy(endpoint))
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

impl Services {
    /// The leader's Cluster service, if this member is not the leader: membership changes
    /// are the leader's to propose.
    fn leader_elsewhere<T>(
        &self,
        req: &Request<T>,
    ) -> Result<Option<ClusterClient<tonic::transport::Channel>>, Status> {
        let v = self.node.view();
        let Some(leader) = v.leader else {
            return Err(Status::unavailable("etcdserver: no leader"));
        };
        if leader == self.member_id {
            return Ok(None);
        }
        if req.metadata().contains_key(FORWARDED) {
            return Err(Status::unavailable("etcdserver: leader changed"));
        }
        Ok(Some(ClusterClient::new(channel_to(&v, leader)?)))
    }

    /// A request for the leader, marked as passed on.
    fn forwarded<T>(inner: T) -> Request<T> {
        let mut r = Request::new(inner);
        r.metadata_mut().insert(FORWARDED, "1".parse().unwrap());
        r.set_timeout(REQUEST_TIMEOUT);
        r
    }

    /// Propose a membership change and answer with the list of members once it applied.
    async fn change(&self, op: MemberOp) -> Result<(pb::ResponseHeader, Vec<pb::Member>), Status> {
        let header = tokio::time::timeout(REQUEST_TIMEOUT, self.node.change_membership(op))
            .await
            .map_err(|_| timed_out())??;
        // Any input the loop takes after the change applied sees the view it left; a member
        // that removed itself has stopped, and its last view is the one to show.
        let _ = self.node.status().await;
        Ok((header, member_list(&self.node.view())))
    }
}

#[tonic::async_trait]
impl cluster_server::Cluster for Services {
    async fn member_add(
        &self,
        req: Request<pb::MemberAddRequest>,
    ) -> Result<Response<pb::MemberAddResponse>, Status> {
        if let Some(mut leader) = self.leader_elsewhere(&req)? {
            let forwarded = leader.member_add(Self::forwarded(req.into_inner()));
            return forwarded.await.map_err(relayed);
        }
        let r = req.into_inner();
        check_peer_urls(&r.peer_ur_ls)?;
        let id = new_member_id(&self.node.view());
        let op = MemberOp::Add {
            id,
            peer_urls: r.peer_ur_ls.clone(),
            learner: r.is_learner,
        };
        let (header, members) = self.change(op).await?;
        Ok(Response::new(pb::MemberAddResponse {
            header: Some(header),
            member: Some(pb::Member {
                id,
                name: String::new(),
                peer_ur_ls: r.peer_ur_ls,
                client_ur_ls: Vec::new(),
                is_learner: r.is_learner,
            }),
            members,
        }))
    }

    async fn member_remove(
        &self,
        req: Request<pb::MemberRemoveRequest>,
    ) -> Result<Response<pb::MemberRemoveResponse>, Status> {
        if let Some(mut leader) = self.leader_elsewhere(&req)? {
            return leader
                .member_remove(Self::forwarded(req.into_inner()))
                .await
                .map_err(relayed);
        }
        let id = req.into_inner().id;
        if self.node.view().registry.removed.contains(&id) {
            return Err(reconfig::member_not_found());
        }
        let (header, members) = self.change(MemberOp::Remove(id)).await?;
        Ok(Response::new(pb::MemberRemoveResponse {
            header: Some(header),
            members,
        }))
    }

    async fn member_update(
        &self,
        req: Request<pb::MemberUpdateRequest>,
    ) -> Result<Response<pb::MemberUpdateResponse>, Status> {
        let r = req.into_inner();
        check_peer_urls(&r.peer_ur_ls)?;
        let v = self.node.view();
        if !v.registry.members.contains_key(&r.id) {
            return Err(reconfig::member_not_found());
        }
        if v.registry.peer_url_owner(&r.peer_ur_ls, r.id).is_some() {
            return Err(reconfig::peer_urls_exist());
        }
        let header = tokio::time::timeout(
            REQUEST_TIMEOUT,
            self.node.update_peer_urls(r.id, r.peer_ur_ls),
        )
        .await
        .map_err(|_| timed_out())??;
        let _ = self.node.status().await;
        Ok(Response::new(pb::MemberUpdateResponse {
            header: Some(header),
            members: member_list(&self.node.view()),
        }))
    }

    async fn member_list(
        &self,
        req: Request<pb::MemberListRequest>,
    ) -> Result<Response<pb::MemberListResponse>, Status> {
        if req.into_inner().linearizable {
            // Confirmed through the leader, as a linearizable read is.
            let probe = kv::RangeRequest::default();
            tokio::time::timeout(REQUEST_TIMEOUT, self.node.read(probe, true))
                .await
                .map_err(|_| timed_out())??;
        }
        let s = self.node.status().await?;
        Ok(Response::new(pb::MemberListResponse {
            header: Some(self.header(s.revision, s.term)),
            members: member_list(&self.node.view()),
        }))
    }

    async fn member_promote(
        &self,
        req: Request<pb::MemberPromoteRequest>,
    ) -> Result<Response<pb::MemberPromoteResponse>, Status> {
        if let Some(mut leader) = self.leader_elsewhere(&req)? {
            return leader
                .member_promote(Self::forwarded(req.into_inner()))
                .await
                .map_err(relayed);
        }
        let id = req.into_inner().id;
        let (header, members) = self.change(MemberOp::Promote(id)).await?;
        Ok(Response::new(pb::MemberPromoteResponse {
            header: Some(header),
            members,
        }))
    }
}
