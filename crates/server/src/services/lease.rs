//! The Lease service. Grants and revokes are writes through the log like any other, so any
//! member takes them. Keep-alives and time-to-live questions are about time, which only the
//! leader keeps (see `kv::lessor`): a follower passes them to the leader's `LeaseForward`
//! service (raftkv's own, on the client port) and relays the answer, so a client may keep
//! its leases alive through any member.

use crate::member::command::Write;
use crate::member::node::{not_leader, LeaseInfo, Node};
use crate::pb::etcdserverpb::{self as pb, lease_server};
use crate::pb::raftkvpb::lease_forward_client::LeaseForwardClient;
use crate::pb::raftkvpb::lease_forward_server;
use crate::services::{channel_to, relayed, timed_out, REQUEST_TIMEOUT};
use kv::lessor::Renewal;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::mpsc;
use tokio_stream::{wrappers::ReceiverStream, Stream, StreamExt};
use tonic::transport::Channel;
use tonic::{Request, Response, Status, Streaming};

/// How long a follower waits to learn where its leader is before saying "no leader".
const LEADER_WAIT: Duration = Duration::from_secs(2);

/// Keep-alive answers queued for one stream before the stream stops reading requests.
const KEEPALIVE_QUEUE: usize = 64;

#[derive(Clone)]
pub struct LeaseService {
    node: Node,
    /// The next candidate for a server-chosen lease id (see `next_id`).
    ids: Arc<AtomicU64>,
    /// A channel to the leader's client URL, kept while the leader stays the same.
    leader: Arc<Mutex<Option<Forward>>>,
}

/// The leader's id and a client of its LeaseForward service.
type Forward = (u64, LeaseForwardClient<Channel>);

/// A mix of the bits of `x` (splitmix64's finalizer): a bijection, so distinct counters
/// give distinct ids.
fn mix(mut x: u64) -> u64 {
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58476d1ce4e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d049bb133111eb);
    x ^ (x >> 31)
}

impl LeaseService {
    pub fn new(node: Node) -> Self {
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        LeaseService {
            ids: Arc::new(AtomicU64::new(mix(seed ^ node.id()))),
            node,
            leader: Arc::new(Mutex::new(None)),
        }
    }

    /// A server-chosen id: positive, never 0, and different on every call of this member's
    /// life (a collision with another member's is refused by the store as "lease already
    /// exists", and retried once with the next id).
    fn next_id(&self) -> i64 {
        loop {
            let id = (mix(self.ids.fetch_add(1, Ordering::Relaxed)) >> 1) as i64;
            if id != 0 {
                return id;
            }
        }
    }

    /// etcd's answer about a lease that does not exist: no error, a TTL of -1
    /// (`etcdctl lease timetolive` prints "already expired").
    fn expired(&self, id: i64) -> pb::LeaseTimeToLiveResponse {
        pb::LeaseTimeToLiveResponse {
            header: Some(self.node.current_header()),
            id,
            ttl: -1,
            ..Default::default()
        }
    }

    async fn grant(&self, id: i64, ttl: i64) -> Result<(pb::ResponseHeader, i64), Status> {
        let ttl = ttl.max(self.node.min_lease_ttl());
        let write = self.node.write(Write::LeaseGrant { id, ttl });
        let (resp, header) = tokio::time::timeout(REQUEST_TIMEOUT, write)
            .await
            .map_err(|_| timed_out())??;
        match resp {
            kv::Response::Lease(kv::LeaseResponse::Granted { ttl, .. }) => Ok((header, ttl)),
            _ => Err(Status::internal("the store answered a different request")),
        }
    }

    /// The leader's LeaseForward service, unless this member leads. Right after a start,
    /// the leader's client URL may not have reached this member yet (each member announces
    /// its own through the log): wait a little for it.
    async fn leader_client(&self) -> Result<Option<LeaseForwardClient<Channel>>, Status> {
        let deadline = tokio::time::Instant::now() + LEADER_WAIT;
        loop {
            match self.try_leader_client() {
                Err(_) if tokio::time::Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                other => return other,
            }
        }
    }

    fn try_leader_client(&self) -> Result<Option<LeaseForwardClient<Channel>>, Status> {
        // Read without copying the view: this runs for every keep-alive a follower passes on.
        let leader = self
            .node
            .leader()
            .ok_or_else(|| Status::unavailable("etcdserver: no leader"))?;
        if leader == self.node.id() {
            return Ok(None);
        }
        let mut cached = self.leader.lock().unwrap();
        if let Some((id, client)) = cached.as_ref() {
            if *id == leader {
                return Ok(Some(client.clone()));
            }
        }
        let client = LeaseForwardClient::new(channel_to(&self.node.view(), leader)?);
        *cached = Some((leader, client.clone()));
        Ok(Some(client))
    }

    /// Renew here if this member leads, else at the leader. The answer's TTL is 0 for a
    /// lease that does not exist (etcd's).
    async fn renew(&self, id: i64) -> Result<pb::LeaseKeepAliveResponse, Status> {
        match self.renew_here(id).await? {
            Some(resp) => Ok(resp),
            None => match self.leader_client().await? {
                Some(mut leader) => {
                    let mut req = Request::new(pb::LeaseKeepAliveRequest { id });
                    req.set_timeout(REQUEST_TIMEOUT);
                    let mut resp = leader.renew(req).await.map_err(relayed)?.into_inner();
                    // The answer is this member's, as etcd's is: its header too.
                    resp.header = Some(self.node.current_header());
                    Ok(resp)
                }
                // It leads, but its clock does not run yet (its term's first entry has
                // not applied): the client tries again.
                None => Err(not_leader()),
            },
        }
    }

    /// Renew on this member's clock; None if it does not lead.
    async fn renew_here(&self, id: i64) -> Result<Option<pb::LeaseKeepAliveResponse>, Status> {
        let ttl = match self.node.renew(id).await? {
            Renewal::NotLeader => return Ok(None),
            Renewal::Expiring => {
                return Err(Status::unavailable(
                    "etcdserver: the lease expired and is being revoked; try again",
                ))
            }
            Renewal::NotFound => 0,
            Renewal::Renewed {
                ttl,
                clear_checkpoint,
            } => {
                if clear_checkpoint {
                    // The checkpointed (shorter) remaining TTL must be gone from the log
                    // before the client counts on the renewal.
                    let clear = self.node.write(Write::LeaseCheckpoint(vec![(id, 0)]));
                    tokio::time::timeout(REQUEST_TIMEOUT, clear)
                        .await
                        .map_err(|_| timed_out())??;
                }
                ttl
            }
        };
        Ok(Some(pb::LeaseKeepAliveResponse {
            header: Some(self.node.current_header()),
            id,
            ttl,
        }))
    }

    async fn time_to_live(
        &self,
        req: pb::LeaseTimeToLiveRequest,
    ) -> Result<pb::LeaseTimeToLiveResponse, Status> {
        match self.node.time_to_live(req.id).await {
            Ok(Some(info)) => Ok(self.ttl_response(req, info)),
            Ok(None) => Ok(self.expired(req.id)),
            Err(_) => match self.leader_client().await? {
                Some(mut leader) => {
                    let mut fwd = Request::new(req);
                    fwd.set_timeout(REQUEST_TIMEOUT);
                    let mut resp = leader.time_to_live(fwd).await.map_err(relayed)?;
                    resp.get_mut().header = Some(self.node.current_header());
                    Ok(resp.into_inner())
                }
                None => Err(not_leader()),
            },
        }
    }

    fn ttl_response(
        &self,
        req: pb::LeaseTimeToLiveRequest,
        info: LeaseInfo,
    ) -> pb::LeaseTimeToLiveResponse {
        pb::LeaseTimeToLiveResponse {
            header: Some(self.node.current_header()),
            id: req.id,
            // Whole seconds left, rounded down, as etcd reports them.
            ttl: (info.remaining / 1000) as i64,
            granted_ttl: info.granted_ttl,
            keys: if req.keys { info.keys } else { Vec::new() },
        }
    }
}

type KeepAliveStream =
    Pin<Box<dyn Stream<Item = Result<pb::LeaseKeepAliveResponse, Status>> + Send + 'static>>;

#[tonic::async_trait]
impl lease_server::Lease for LeaseService {
    async fn lease_grant(
        &self,
        req: Request<pb::LeaseGrantRequest>,
    ) -> Result<Response<pb::LeaseGrantResponse>, Status> {
        let req = req.into_inner();
        let chosen = req.id == 0;
        let id = if chosen { self.next_id() } else { req.id };
        let granted = match self.grant(id, req.ttl).await {
            // Another member's id generator met this one's: once more with the next id.
            Err(s) if chosen && s.code() == tonic::Code::FailedPrecondition => {
                let id = self.next_id();
                self.grant(id, req.ttl).await.map(|g| (id, g))
            }
            other => other.map(|g| (id, g)),
        };
        let (id, (header, ttl)) = granted?;
        Ok(Response::new(pb::LeaseGrantResponse {
            header: Some(header),
            id,
            ttl,
            error: String::new(),
        }))
    }

    async fn lease_revoke(
        &self,
        req: Request<pb::LeaseRevokeRequest>,
    ) -> Result<Response<pb::LeaseRevokeResponse>, Status> {
        let write = self.node.write(Write::LeaseRevoke(req.into_inner().id));
        let (_, header) = tokio::time::timeout(REQUEST_TIMEOUT, write)
            .await
            .map_err(|_| timed_out())??;
        Ok(Response::new(pb::LeaseRevokeResponse {
            header: Some(header),
        }))
    }

    type LeaseKeepAliveStream = KeepAliveStream;

    /// One answer per request, in order. A failure (no leader) ends the stream with that
    /// error, as etcd's does; clients open a new one.
    async fn lease_keep_alive(
        &self,
        req: Request<Streaming<pb::LeaseKeepAliveRequest>>,
    ) -> Result<Response<KeepAliveStream>, Status> {
        let mut incoming = req.into_inner();
        let (tx, rx) = mpsc::channel(KEEPALIVE_QUEUE);
        let this = self.clone();
        tokio::spawn(async move {
            while let Some(Ok(req)) = incoming.next().await {
                let answer = this.renew(req.id).await;
                let failed = answer.is_err();
                if tx.send(answer).await.is_err() || failed {
                    return;
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn lease_time_to_live(
        &self,
        req: Request<pb::LeaseTimeToLiveRequest>,
    ) -> Result<Response<pb::LeaseTimeToLiveResponse>, Status> {
        self.time_to_live(req.into_inner()).await.map(Response::new)
    }

    async fn lease_leases(
        &self,
        _req: Request<pb::LeaseLeasesRequest>,
    ) -> Result<Response<pb::LeaseLeasesResponse>, Status> {
        let ids = self.node.leases().await?;
        Ok(Response::new(pb::LeaseLeasesResponse {
            header: Some(self.node.current_header()),
            leases: ids.into_iter().map(|id| pb::LeaseStatus { id }).collect(),
        }))
    }
}

/// What a follower passes on: answered from this member's clock only (a leader that lost
/// office meanwhile says so rather than passing it further).
#[tonic::async_trait]
impl lease_forward_server::LeaseForward for LeaseService {
    async fn renew(
        &self,
        req: Request<pb::LeaseKeepAliveRequest>,
    ) -> Result<Response<pb::LeaseKeepAliveResponse>, Status> {
        match self.renew_here(req.into_inner().id).await? {
            Some(resp) => Ok(Response::new(resp)),
            None => Err(not_leader()),
        }
    }

    async fn time_to_live(
        &self,
        req: Request<pb::LeaseTimeToLiveRequest>,
    ) -> Result<Response<pb::LeaseTimeToLiveResponse>, Status> {
        let req = req.into_inner();
        match self.node.time_to_live(req.id).await? {
            Some(info) => Ok(Response::new(self.ttl_response(req, info))),
            None => Ok(Response::new(self.expired(req.id))),
        }
    }
}
