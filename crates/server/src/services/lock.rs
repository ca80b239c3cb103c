//! etcd's Lock service: a named lock held by the contender whose key under the name was
//! created first (see `recipe.rs`), for as long as that key lives — until Unlock deletes it
//! or the contender's lease ends.

use crate::member::node::Node;
use crate::pb::etcdserverpb as pb;
use crate::pb::v3lockpb::{self as lockpb, lock_server};
use crate::services::recipe::{self, unknown, Client, Undo};
use bytes::Bytes;
use tonic::{Request, Response, Status};

/// What etcd answers when the caller's key went away while it waited (its lease ended).
const SESSION_EXPIRED: &str = "mutex: session is expired";

#[derive(Clone)]
pub struct LockService {
    client: Client,
}

impl LockService {
    pub fn new(node: Node) -> Self {
        LockService {
            client: Client::new(node),
        }
    }
}

fn answer(header: Option<pb::ResponseHeader>, key: Bytes) -> Response<lockpb::LockResponse> {
    Response::new(lockpb::LockResponse { header, key })
}

/// Delete `key` if it is still the version created at `rev`, so that an undo never deletes
/// a key a later Lock with the same lease put again.
fn delete_if_created_at(key: &Bytes, rev: i64) -> pb::TxnRequest {
    pb::TxnRequest {
        compare: vec![recipe::created_at(key, rev)],
        success: vec![recipe::delete_op(key)],
        failure: Vec::new(),
    }
}

#[tonic::async_trait]
impl lock_server::Lock for LockService {
    async fn lock(
        &self,
        req: Request<lockpb::LockRequest>,
    ) -> Result<Response<lockpb::LockResponse>, Status> {
        let r = req.into_inner();
        let lease = self.client.session_lease(r.lease).await.map_err(unknown)?;
        let prefix = recipe::prefix(&r.name);
        let key = recipe::contender_key(&prefix, lease);
        // Reading the holder in the same transaction answers an uncontended lock at once.
        let holder = recipe::range_op(recipe::first_created(&prefix));
        let joined = self
            .client
            .join(&key, Bytes::new(), lease, &[holder])
            .await
            .map_err(unknown)?;
        let held = recipe::kvs_of(&joined.txn, 1)
            .first()
            .is_none_or(|h| h.create_revision == joined.rev);
        if held {
            return Ok(answer(joined.txn.header, key));
        }
        let undo = Undo::new(&self.client, delete_if_created_at(&key, joined.rev));
        self.client
            .wait_deletes(&prefix, joined.rev - 1)
            .await
            .map_err(unknown)?;
        // The predecessors are gone, but so may be the caller's own key (its lease ended
        // while it waited): only a key still of this queue place holds the lock.
        let mine = self
            .client
            .range(recipe::get(&key))
            .await
            .map_err(unknown)?;
        undo.disarm();
        if !mine.kvs.iter().any(|kv| kv.create_revision == joined.rev) {
            return Err(Status::unknown(SESSION_EXPIRED));
        }
        Ok(answer(mine.header, key))
    }

    async fn unlock(
        &self,
        req: Request<lockpb::UnlockRequest>,
    ) -> Result<Response<lockpb::UnlockResponse>, Status> {
        let key = req.into_inner().key;
        let header = self.client.delete(&key).await.map_err(unknown)?;
        Ok(Response::new(lockpb::UnlockResponse {
            header: Some(header),
        }))
    }
}
