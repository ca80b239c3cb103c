//! etcd's KV service: Range, Put, DeleteRange, Txn and Compact. Reads are served from the
//! member's applied state (linearizable ones after a ReadIndex round); writes go through
//! the log, exactly once when the client tags them with a session.

use super::{api, timed_out, too_large, Services, REQUEST_TIMEOUT};
use crate::member::command::Write;
use crate::pb::etcdserverpb::{self as pb, kv_server};
use tonic::{Request, Response, Status};

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
