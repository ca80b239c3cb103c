//! etcd's Election service: campaigners queue under the election's name as lock contenders
//! do (see `recipe.rs`); the one whose key was created first leads, and its key's value is
//! the election's proclamation. A leader proves it leads with its key's create revision,
//! which Proclaim and Resign compare, so a leader whose key was deleted (its lease ended)
//! and perhaps put again cannot speak for the election any more.

use crate::member::node::Node;
use crate::pb::etcdserverpb as pb;
use crate::pb::mvccpb;
use crate::pb::v3electionpb::{self as epb, election_server};
use crate::services::recipe::{self, unknown, Client, Undo, Watch};
use bytes::Bytes;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

const NOT_LEADER: &str = "election: not leader";
const NO_LEADER: &str = "election: no leader";
/// Observe's answers waiting for the client to read them; the task that makes them waits
/// for room, and its watch stream's own bounded queue behind it.
const OBSERVE_QUEUE: usize = 16;

fn missing_leader() -> Status {
    Status::unknown("\"leader\" field must be provided")
}

#[derive(Clone)]
pub struct ElectionService {
    client: Client,
}

impl ElectionService {
    pub fn new(node: Node) -> Self {
        ElectionService {
            client: Client::new(node),
        }
    }

    /// Replace the leader's value if `leader` still leads.
    async fn proclaim_as(
        &self,
        leader: &epb::LeaderKey,
        value: Bytes,
    ) -> Result<pb::ResponseHeader, Status> {
        let t = pb::TxnRequest {
            compare: vec![recipe::created_at(&leader.key, leader.rev)],
            success: vec![recipe::put_op(&leader.key, value, leader.lease)],
            failure: Vec::new(),
        };
        let r = self.client.txn(t).await.map_err(unknown)?;
        if !r.succeeded {
            return Err(Status::unknown(NOT_LEADER));
        }
        Ok(recipe::header(&r))
    }
}

/// Delete the leader key if it is still the one `leader` names; a resignation that finds
/// another key (or none) changes nothing and is no error.
fn resign_txn(leader: &epb::LeaderKey) -> pb::TxnRequest {
    pb::TxnRequest {
        compare: vec![recipe::created_at(&leader.key, leader.rev)],
        success: vec![recipe::delete_op(&leader.key)],
        failure: Vec::new(),
    }
}

type Observed = Result<epb::LeaderResponse, Status>;

#[tonic::async_trait]
impl election_server::Election for ElectionService {
    async fn campaign(
        &self,
        req: Request<epb::CampaignRequest>,
    ) -> Result<Response<epb::CampaignResponse>, Status> {
        let r = req.into_inner();
        let lease = self.client.session_lease(r.lease).await.map_err(unknown)?;
        let prefix = recipe::prefix(&r.name);
        let key = recipe::contender_key(&prefix, lease);
        let joined = self
            .client
            .join(&key, r.value.clone(), lease, &[])
            .await
            .map_err(unknown)?;
        let leader = epb::LeaderKey {
            name: r.name,
            key,
            rev: joined.rev,
            lease,
        };
        let undo = Undo::new(&self.client, resign_txn(&leader));
        // A campaign resumed with the same lease proclaims its new value.
        if joined.existing.is_some_and(|v| v != r.value) {
            self.proclaim_as(&leader, r.value).await?;
        }
        if let Err(e) = self.client.wait_deletes(&prefix, leader.rev - 1).await {
            // Only a cancelled campaign resigns (by dropping the undo); one that failed
            // keeps its place, which a retry with the same lease takes up again.
            undo.disarm();
            return Err(unknown(e));
        }
        undo.disarm();
        Ok(Response::new(epb::CampaignResponse {
            header: joined.txn.header,
            leader: Some(leader),
        }))
    }

    async fn proclaim(
        &self,
        req: Request<epb::ProclaimRequest>,
    ) -> Result<Response<epb::ProclaimResponse>, Status> {
        let r = req.into_inner();
        let leader = r.leader.ok_or_else(missing_leader)?;
        let header = self.proclaim_as(&leader, r.value).await?;
        Ok(Response::new(epb::ProclaimResponse {
            header: Some(header),
        }))
    }

    async fn leader(
        &self,
        req: Request<epb::LeaderRequest>,
    ) -> Result<Response<epb::LeaderResponse>, Status> {
        let prefix = recipe::prefix(&req.into_inner().name);
        let r = self
            .client
            .range(recipe::first_created(&prefix))
            .await
            .map_err(unknown)?;
        let Some(kv) = r.kvs.into_iter().next() else {
            return Err(Status::unknown(NO_LEADER));
        };
        Ok(Response::new(epb::LeaderResponse {
            header: r.header,
            kv: Some(kv),
        }))
    }

    type ObserveStream = ReceiverStream<Observed>;

    async fn observe(
        &self,
        req: Request<epb::LeaderRequest>,
    ) -> Result<Response<Self::ObserveStream>, Status> {
        let prefix = recipe::prefix(&req.into_inner().name);
        let (tx, rx) = mpsc::channel(OBSERVE_QUEUE);
        let client = self.client.clone();
        tokio::spawn(async move {
            let gone = tx.clone();
            // Ends when the client goes away, or — as etcd's Observe does — quietly, ending
            // the stream, when a read or a watch fails.
            tokio::select! {
                _ = gone.closed() => {}
                _ = observe(&client, &prefix, &tx) => {}
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn resign(
        &self,
        req: Request<epb::ResignRequest>,
    ) -> Result<Response<epb::ResignResponse>, Status> {
        let leader = req.into_inner().leader.ok_or_else(missing_leader)?;
        let r = self
            .client
            .txn(resign_txn(&leader))
            .await
            .map_err(unknown)?;
        Ok(Response::new(epb::ResignResponse { header: r.header }))
    }
}

/// Send the leader's key-value, then each new value it proclaims; when its key is deleted,
/// start over with the next leader. Returns when the stream should end.
async fn observe(
    client: &Client,
    prefix: &Bytes,
    tx: &mpsc::Sender<Observed>,
) -> Result<(), Status> {
    loop {
        let r = client.range(recipe::first_created(prefix)).await?;
        let header = r.header.unwrap_or_default();
        let (header, kv) = match r.kvs.into_iter().next() {
            Some(kv) => (header, kv),
            None => first_put(client, prefix, header.revision).await?,
        };
        let mut w = client
            .watch(pb::WatchCreateRequest {
                key: kv.key.clone(),
                start_revision: header.revision + 1,
                ..Default::default()
            })
            .await?;
        send(tx, header, kv).await?;
        if !follow(&mut w, tx).await? {
            return Ok(());
        }
    }
}

/// With no leader: the first key put under the prefix from `rev` on, with a header at its
/// revision (a response may carry later revisions too).
async fn first_put(
    client: &Client,
    prefix: &Bytes,
    rev: i64,
) -> Result<(pb::ResponseHeader, mvccpb::KeyValue), Status> {
    let mut w = client
        .watch(pb::WatchCreateRequest {
            key: prefix.clone(),
            range_end: kv::prefix_end(prefix),
            start_revision: rev,
            ..Default::default()
        })
        .await?;
    while let Some(r) = w.message().await? {
        if r.canceled {
            break;
        }
        let put = r
            .events
            .into_iter()
            .find(|e| e.r#type == mvccpb::event::EventType::Put as i32);
        if let Some(kv) = put.and_then(|e| e.kv) {
            let mut header = r.header.unwrap_or_default();
            header.revision = kv.mod_revision;
            return Ok((header, kv));
        }
    }
    Err(Status::unavailable("observe: the watch ended"))
}

/// Pass on the leader key's puts until it is deleted (true: a new leader is next) or the
/// watch ends (false).
async fn follow(w: &mut Watch, tx: &mpsc::Sender<Observed>) -> Result<bool, Status> {
    while let Some(r) = w.message().await? {
        if r.canceled {
            return Ok(false);
        }
        let header = r.header.unwrap_or_default();
        for e in r.events {
            if e.r#type == mvccpb::event::EventType::Delete as i32 {
                return Ok(true);
            }
            if let Some(kv) = e.kv {
                send(tx, header, kv).await?;
            }
        }
    }
    Ok(false)
}

async fn send(
    tx: &mpsc::Sender<Observed>,
    header: pb::ResponseHeader,
    kv: mvccpb::KeyValue,
) -> Result<(), Status> {
    let r = epb::LeaderResponse {
        header: Some(header),
        kv: Some(kv),
    };
    tx.send(Ok(r))
        .await
        .map_err(|_| Status::cancelled("observer gone"))
}
