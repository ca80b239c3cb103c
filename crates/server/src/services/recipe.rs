//! What the Lock and Election services share: etcd's recipe for waiting one's turn under a
//! key prefix, run against this member's own KV and Watch services.
//!
//! The recipe: each contender puts a key under the prefix, attached to its lease, in a
//! transaction that creates the key only if it does not exist (so a retry with the same
//! lease finds its key again). Turns go by create revision: the contender whose key was
//! created first holds the lock (or leads), and each of the others waits until every key
//! of the prefix created before its own is deleted — by its holder, or by the expiry of the
//! holder's lease. Waiting for the latest of those first means each contender watches only
//! the key just ahead of it: a release wakes one waiter, not the whole queue.
//!
//! etcd serves these services with its client library running in-process over its own
//! services; here too every read and write goes through the KV service (so the store checks
//! leases and sizes as it does for clients' requests), leases are granted by the Lease
//! service, and every wait goes through the Watch service, called through its generated
//! client without a socket (so a waiter is one bounded watch stream like any other).

use crate::member::node::Node;
use crate::pb::etcdserverpb::{
    self as pb, compare, kv_server::Kv, lease_server::Lease, range_request, request_op,
    response_op, watch_client::WatchClient, watch_create_request::FilterType,
    watch_request::RequestUnion, watch_server::WatchServer,
};
use crate::pb::mvccpb;
use crate::services::lease::LeaseService;
use crate::services::watch::WatchService;
use crate::services::Services;
use bytes::Bytes;
use tonic::{Request, Status};

/// A watch stream on this member.
pub type Watch = tonic::Streaming<pb::WatchResponse>;

/// The TTL of the lease granted to a contender that names none (etcd's default for a
/// client session), in seconds. Nothing keeps it alive: the key lasts a minute at most.
const SESSION_TTL: i64 = 60;

/// The member's KV, Watch and Lease services, called in-process.
#[derive(Clone)]
pub struct Client {
    kv: Services,
    watch: WatchClient<WatchServer<WatchService>>,
    lease: LeaseService,
}

/// etcd's services answer with what its client library returned, and that library's errors
/// reach gRPC as plain errors: whatever the cause, the code is Unknown and only the message
/// tells. Clients of these services match on the message, so it is kept as is.
pub fn unknown(s: Status) -> Status {
    Status::unknown(s.message().to_string())
}

/// The keys of a lock or an election: its name and a slash.
pub fn prefix(name: &[u8]) -> Bytes {
    let mut p = name.to_vec();
    p.push(b'/');
    p.into()
}

/// A contender's key: the prefix and its lease id in lowercase hex (Go's `%x`, which writes a
/// negative number as a minus sign and its magnitude), so each lease has one key per prefix.
pub fn contender_key(prefix: &[u8], lease: i64) -> Bytes {
    let hex = if lease < 0 {
        format!("-{:x}", lease.unsigned_abs())
    } else {
        format!("{lease:x}")
    };
    [prefix, hex.as_bytes()].concat().into()
}

/// A read of the prefix's key created first: its holder or leader.
pub fn first_created(prefix: &Bytes) -> pb::RangeRequest {
    pb::RangeRequest {
        key: prefix.clone(),
        range_end: kv::prefix_end(prefix),
        sort_target: range_request::SortTarget::Create as i32,
        sort_order: range_request::SortOrder::Ascend as i32,
        limit: 1,
        ..Default::default()
    }
}

pub fn get(key: &Bytes) -> pb::RangeRequest {
    pb::RangeRequest {
        key: key.clone(),
        ..Default::default()
    }
}

/// A comparison of a key's create revision (0: the key does not exist).
pub fn created_at(key: &Bytes, rev: i64) -> pb::Compare {
    pb::Compare {
        result: compare::CompareResult::Equal as i32,
        target: compare::CompareTarget::Create as i32,
        key: key.clone(),
        target_union: Some(compare::TargetUnion::CreateRevision(rev)),
        ..Default::default()
    }
}

pub fn put_op(key: &Bytes, value: Bytes, lease: i64) -> pb::RequestOp {
    pb::RequestOp {
        request: Some(request_op::Request::RequestPut(pb::PutRequest {
            key: key.clone(),
            value,
            lease,
            ..Default::default()
        })),
    }
}

pub fn range_op(r: pb::RangeRequest) -> pb::RequestOp {
    pb::RequestOp {
        request: Some(request_op::Request::RequestRange(r)),
    }
}

pub fn delete_op(key: &Bytes) -> pb::RequestOp {
    pb::RequestOp {
        request: Some(request_op::Request::RequestDeleteRange(
            pb::DeleteRangeRequest {
                key: key.clone(),
                ..Default::default()
            },
        )),
    }
}

/// The key-values of a transaction's `i`th answer, if it was a read.
pub fn kvs_of(t: &pb::TxnResponse, i: usize) -> &[mvccpb::KeyValue] {
    match t.responses.get(i).and_then(|r| r.response.as_ref()) {
        Some(response_op::Response::ResponseRange(r)) => &r.kvs,
        _ => &[],
    }
}

/// Where a contender stands once its key is in place.
pub struct Joined {
    pub txn: pb::TxnResponse,
    /// The create revision of the contender's key: its place in the queue.
    pub rev: i64,
    /// The key's value, if the key was there already.
    pub existing: Option<Bytes>,
}

impl Client {
    pub fn new(node: Node) -> Self {
        Client {
            watch: WatchClient::new(WatchServer::new(WatchService::new(node.clone()))),
            kv: Services::new(node.clone()),
            lease: LeaseService::new(node),
        }
    }

    /// The lease a contender's key is attached to: the one it names, or — for 0, no lease
    /// — a new one, as etcd's services start a client session with a lease of its own.
    pub async fn session_lease(&self, lease: i64) -> Result<i64, Status> {
        if lease != 0 {
            return Ok(lease);
        }
        let req = pb::LeaseGrantRequest {
            ttl: SESSION_TTL,
            id: 0,
        };
        Ok(self
            .lease
            .lease_grant(Request::new(req))
            .await?
            .into_inner()
            .id)
    }

    pub async fn txn(&self, t: pb::TxnRequest) -> Result<pb::TxnResponse, Status> {
        Ok(self.kv.txn(Request::new(t)).await?.into_inner())
    }

    /// A linearizable read, as etcd's client library reads by default.
    pub async fn range(&self, r: pb::RangeRequest) -> Result<pb::RangeResponse, Status> {
        Ok(self.kv.range(Request::new(r)).await?.into_inner())
    }

    pub async fn delete(&self, key: &Bytes) -> Result<pb::ResponseHeader, Status> {
        let d = pb::DeleteRangeRequest {
            key: key.clone(),
            ..Default::default()
        };
        let r = self.kv.delete_range(Request::new(d)).await?.into_inner();
        Ok(r.header.unwrap_or_default())
    }

    /// Open a watch stream with one watcher. The request side stays open for as long as the
    /// stream lives: a finished request stream would not end the watch, but there is nothing
    /// more to send.
    pub async fn watch(&self, create: pb::WatchCreateRequest) -> Result<Watch, Status> {
        let req = pb::WatchRequest {
            request_union: Some(RequestUnion::CreateRequest(create)),
        };
        let requests =
            tokio_stream::StreamExt::chain(tokio_stream::once(req), tokio_stream::pending());
        Ok(self.watch.clone().watch(requests).await?.into_inner())
    }

    /// Put the contender's key (`key`, attached to `lease`) unless it exists, in one
    /// transaction with `also` (reads to answer in the same revision, on either branch).
    pub async fn join(
        &self,
        key: &Bytes,
        value: Bytes,
        lease: i64,
        also: &[pb::RequestOp],
    ) -> Result<Joined, Status> {
        let t = pb::TxnRequest {
            compare: vec![created_at(key, 0)],
            success: [&[put_op(key, value, lease)], also].concat(),
            failure: [&[range_op(get(key))], also].concat(),
        };
        let txn = self.txn(t).await?;
        let header = txn.header.unwrap_or_default();
        if txn.succeeded {
            return Ok(Joined {
                rev: header.revision,
                existing: None,
                txn,
            });
        }
        let Some(kv) = kvs_of(&txn, 0).first().cloned() else {
            // The compare found the key and the read in the same transaction sees what it
            // saw: an empty answer means the store answered something else.
            return Err(Status::internal(
                "the contender's key vanished inside its txn",
            ));
        };
        Ok(Joined {
            rev: kv.create_revision,
            existing: Some(kv.value),
            txn,
        })
    }

    /// Wait until no key of `prefix` created at or before `max_create_rev` exists; answers
    /// with the header of the read that found none.
    pub async fn wait_deletes(
        &self,
        prefix: &Bytes,
        max_create_rev: i64,
    ) -> Result<pb::ResponseHeader, Status> {
        loop {
            let r = pb::RangeRequest {
                key: prefix.clone(),
                range_end: kv::prefix_end(prefix),
                sort_target: range_request::SortTarget::Create as i32,
                sort_order: range_request::SortOrder::Descend as i32,
                limit: 1,
                max_create_revision: max_create_rev,
                ..Default::default()
            };
            let r = self.range(r).await?;
            let header = r.header.unwrap_or_default();
            let Some(last) = r.kvs.into_iter().next() else {
                return Ok(header);
            };
            self.wait_delete(last.key, header.revision).await?;
        }
    }

    /// Wait for a delete of `key` at or after `rev` (the revision at which it was seen, so a
    /// delete between the read and the watch is not missed). A watch cancelled because
    /// `rev` was compacted meanwhile also ends the wait: the caller reads again, and a key
    /// still there is waited for from the new read's revision.
    async fn wait_delete(&self, key: Bytes, rev: i64) -> Result<(), Status> {
        let mut w = self
            .watch(pb::WatchCreateRequest {
                key,
                start_revision: rev,
                filters: vec![FilterType::Noput as i32],
                ..Default::default()
            })
            .await?;
        while let Some(r) = w.message().await? {
            if r.canceled || !r.events.is_empty() {
                return Ok(());
            }
        }
        Err(Status::unavailable("lost watcher waiting for delete"))
    }
}

/// Undoes a contender's key if the call that put it ends before it is answered — the
/// client cancelled (the call's future is dropped) or the wait failed — as etcd does, so an
/// abandoned waiter does not hold up the queue until its lease expires. The undo is a write
/// of its own, as the call that would have made it is gone.
pub struct Undo {
    client: Client,
    txn: Option<pb::TxnRequest>,
}

impl Undo {
    pub fn new(client: &Client, txn: pb::TxnRequest) -> Self {
        Undo {
            client: client.clone(),
            txn: Some(txn),
        }
    }

    /// The call is answered: keep the key.
    pub fn disarm(mut self) {
        self.txn = None;
    }
}

impl Drop for Undo {
    fn drop(&mut self) {
        if let Some(t) = self.txn.take() {
            let client = self.client.clone();
            tokio::spawn(async move {
                let _ = client.txn(t).await;
            });
        }
    }
}

/// The header of a transaction's answer.
pub fn header(t: &pb::TxnResponse) -> pb::ResponseHeader {
    t.header.unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn contender_keys_write_lease_ids_as_go_does() {
        let p = prefix(b"job");
        assert_eq!(
            contender_key(&p, 0x694d_7a0c_1f3e_2b01),
            "job/694d7a0c1f3e2b01"
        );
        assert_eq!(contender_key(&p, 26), "job/1a");
        assert_eq!(contender_key(&p, -26), "job/-1a");
        assert_eq!(contender_key(&p, i64::MIN), "job/-8000000000000000");
    }
}
