//! etcd's Cluster service: MemberAdd, MemberRemove, MemberUpdate, MemberPromote and
//! MemberList. A change is the leader's to propose, so a follower passes it on, once.

use super::{channel_to, relayed, timed_out, Services, REQUEST_TIMEOUT};
use crate::member::node::View;
use crate::member::reconfig::{self, MemberOp};
use crate::pb::etcdserverpb::{self as pb, cluster_client::ClusterClient, cluster_server};
use raft::NodeId;
use tonic::{Request, Response, Status};

/// Set on a membership request a follower passes to the leader, so that it is passed on at
/// most once (a leader that lost office meanwhile answers instead of passing it further).
const FORWARDED: &str = "raftkv-forwarded";

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
