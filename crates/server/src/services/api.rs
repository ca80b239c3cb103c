//! The etcd v3 API's messages mapped onto the `kv` store's types, and `kv` errors mapped onto
//! the gRPC status codes and messages etcd uses (clients match on both).
//!
//! Requests come off the wire, so every conversion validates: an unknown enum value or an
//! empty operation is an `InvalidArgument`, never a panic.

use crate::pb::etcdserverpb as pb;
use crate::pb::mvccpb;
use tonic::{Code, Status};

/// etcd's default limit on one request (`--max-request-bytes`, 1.5 MiB).
pub const MAX_REQUEST_BYTES: usize = 3 * 512 * 1024;

pub fn status(e: &kv::Error) -> Status {
    let code = match e {
        kv::Error::Compacted | kv::Error::FutureRevision => Code::OutOfRange,
        kv::Error::BadSnapshot(_) => Code::Internal,
        kv::Error::LeaseNotFound => Code::NotFound,
        kv::Error::LeaseExists
        | kv::Error::StaleSequence { .. }
        | kv::Error::SessionMismatch { .. } => Code::FailedPrecondition,
        kv::Error::LeaseTtlTooLarge => Code::OutOfRange,
        _ => Code::InvalidArgument,
    };
    Status::new(code, e.to_string())
}

/// etcd's answer to a write while the NOSPACE alarm is raised (or that would pass the
/// quota).
pub fn no_space() -> Status {
    Status::resource_exhausted("etcdserver: mvcc: database space exceeded")
}

/// etcd's answer while the CORRUPT alarm is raised.
pub fn corrupt() -> Status {
    Status::data_loss("etcdserver: corrupt cluster")
}

pub fn request_too_large() -> Status {
    Status::invalid_argument("etcdserver: request is too large")
}

fn invalid(what: &str) -> Status {
    Status::invalid_argument(format!("etcdserver: {what}"))
}

fn range_of(key: &bytes::Bytes, range_end: &bytes::Bytes) -> kv::KeyRange {
    kv::KeyRange {
        key: key.clone(),
        range_end: range_end.clone(),
    }
}

pub fn range_request(r: &pb::RangeRequest) -> Result<kv::RangeRequest, Status> {
    use pb::range_request::{SortOrder, SortTarget};
    if r.key.is_empty() {
        return Err(invalid("key is not provided"));
    }
    let sort_order = match SortOrder::try_from(r.sort_order) {
        Ok(SortOrder::None) => kv::SortOrder::None,
        Ok(SortOrder::Ascend) => kv::SortOrder::Ascend,
        Ok(SortOrder::Descend) => kv::SortOrder::Descend,
        Err(_) => return Err(invalid("invalid sort option")),
    };
    let sort_target = match SortTarget::try_from(r.sort_target) {
        Ok(SortTarget::Key) => kv::SortTarget::Key,
        Ok(SortTarget::Version) => kv::SortTarget::Version,
        Ok(SortTarget::Create) => kv::SortTarget::Create,
        Ok(SortTarget::Mod) => kv::SortTarget::Mod,
        Ok(SortTarget::Value) => kv::SortTarget::Value,
        Err(_) => return Err(invalid("invalid sort option")),
    };
    Ok(kv::RangeRequest {
        range: range_of(&r.key, &r.range_end),
        limit: r.limit,
        revision: r.revision,
        sort_order,
        sort_target,
        keys_only: r.keys_only,
        count_only: r.count_only,
        min_mod_revision: r.min_mod_revision,
        max_mod_revision: r.max_mod_revision,
        min_create_revision: r.min_create_revision,
        max_create_revision: r.max_create_revision,
    })
}

pub fn put_request(p: &pb::PutRequest) -> Result<kv::PutRequest, Status> {
    if p.key.is_empty() {
        return Err(invalid("key is not provided"));
    }
    // etcd refuses these before looking at the store.
    if p.ignore_value && !p.value.is_empty() {
        return Err(invalid("value is provided"));
    }
    if p.ignore_lease && p.lease != 0 {
        return Err(invalid("lease is provided"));
    }
    Ok(kv::PutRequest {
        key: p.key.clone(),
        value: p.value.clone(),
        lease: p.lease,
        prev_kv: p.prev_kv,
        ignore_value: p.ignore_value,
        ignore_lease: p.ignore_lease,
    })
}

pub fn delete_request(d: &pb::DeleteRangeRequest) -> Result<kv::DeleteRangeRequest, Status> {
    if d.key.is_empty() {
        return Err(invalid("key is not provided"));
    }
    Ok(kv::DeleteRangeRequest {
        range: range_of(&d.key, &d.range_end),
        prev_kv: d.prev_kv,
    })
}

fn compare(c: &pb::Compare) -> Result<kv::Compare, Status> {
    use pb::compare::{CompareResult as R, CompareTarget as T, TargetUnion as U};
    let result = match R::try_from(c.result) {
        Ok(R::Equal) => kv::CompareResult::Equal,
        Ok(R::Greater) => kv::CompareResult::Greater,
        Ok(R::Less) => kv::CompareResult::Less,
        Ok(R::NotEqual) => kv::CompareResult::NotEqual,
        Err(_) => return Err(invalid("invalid compare result")),
    };
    // A missing union means the target's zero value, as protobuf defaults would give.
    let int = |want: fn(&U) -> Option<i64>| c.target_union.as_ref().and_then(want).unwrap_or(0);
    let target = match T::try_from(c.target) {
        Ok(T::Version) => kv::CompareTarget::Version(int(|u| match u {
            U::Version(v) => Some(*v),
            _ => None,
        })),
        Ok(T::Create) => kv::CompareTarget::Create(int(|u| match u {
            U::CreateRevision(v) => Some(*v),
            _ => None,
        })),
        Ok(T::Mod) => kv::CompareTarget::Mod(int(|u| match u {
            U::ModRevision(v) => Some(*v),
            _ => None,
        })),
        Ok(T::Lease) => kv::CompareTarget::Lease(int(|u| match u {
            U::Lease(v) => Some(*v),
            _ => None,
        })),
        Ok(T::Value) => kv::CompareTarget::Value(match &c.target_union {
            Some(U::Value(v)) => v.clone(),
            _ => bytes::Bytes::new(),
        }),
        Err(_) => return Err(invalid("invalid compare target")),
    };
    Ok(kv::Compare {
        range: range_of(&c.key, &c.range_end),
        result,
        target,
    })
}

fn request_op(op: &pb::RequestOp, depth: usize, max: usize) -> Result<kv::RequestOp, Status> {
    use pb::request_op::Request as R;
    Ok(match &op.request {
        Some(R::RequestRange(r)) => kv::RequestOp::Range(range_request(r)?),
        Some(R::RequestPut(p)) => kv::RequestOp::Put(put_request(p)?),
        Some(R::RequestDeleteRange(d)) => kv::RequestOp::DeleteRange(delete_request(d)?),
        Some(R::RequestTxn(t)) => kv::RequestOp::Txn(txn_at(t, depth + 1, max)?),
        None => return Err(invalid("empty operation in txn request")),
    })
}

/// Deepest nesting of transactions in a request (a transaction inside a transaction is at
/// depth 1). etcd has no bound of its own beyond its decoder's; raftkv's keeps the work a
/// request can make (recursive checks, a session's remembered answer) bounded, and stays
/// below the protobuf decoder's recursion limit (100 messages: two per level, plus the log
/// entry's wrapper), so that the refusal is this clear one. Checked when a client's request
/// arrives ([`client_txn_request`]), not when a log entry is applied: what the log holds
/// applies the same under every version.
pub const MAX_TXN_DEPTH: usize = 32;

/// A transaction from the log.
pub fn txn_request(t: &pb::TxnRequest) -> Result<kv::TxnRequest, Status> {
    txn_at(t, 0, usize::MAX)
}

/// A transaction from a client: nested at most [`MAX_TXN_DEPTH`] deep.
pub fn client_txn_request(t: &pb::TxnRequest) -> Result<kv::TxnRequest, Status> {
    txn_at(t, 0, MAX_TXN_DEPTH)
}

fn txn_at(t: &pb::TxnRequest, depth: usize, max: usize) -> Result<kv::TxnRequest, Status> {
    if depth > max {
        return Err(invalid(&format!(
            "txn request nested too deeply (at most {MAX_TXN_DEPTH} levels)"
        )));
    }
    let ops = |ops: &[pb::RequestOp]| {
        ops.iter()
            .map(|op| request_op(op, depth, max))
            .collect::<Result<Vec<_>, _>>()
    };
    Ok(kv::TxnRequest {
        compare: t.compare.iter().map(compare).collect::<Result<_, _>>()?,
        success: ops(&t.success)?,
        failure: ops(&t.failure)?,
    })
}

pub fn key_value(kv: kv::KeyValue) -> mvccpb::KeyValue {
    mvccpb::KeyValue {
        key: kv.key,
        create_revision: kv.create_revision,
        mod_revision: kv.mod_revision,
        version: kv.version,
        value: kv.value,
        lease: kv.lease,
    }
}

pub fn range_response(r: kv::RangeResponse, header: &pb::ResponseHeader) -> pb::RangeResponse {
    pb::RangeResponse {
        header: Some(*header),
        kvs: r.kvs.into_iter().map(key_value).collect(),
        more: r.more,
        count: r.count,
    }
}

pub fn put_response(r: kv::PutResponse, header: &pb::ResponseHeader) -> pb::PutResponse {
    pb::PutResponse {
        header: Some(*header),
        prev_kv: r.prev_kv.map(key_value),
    }
}

pub fn delete_response(
    r: kv::DeleteRangeResponse,
    header: &pb::ResponseHeader,
) -> pb::DeleteRangeResponse {
    pb::DeleteRangeResponse {
        header: Some(*header),
        deleted: r.deleted,
        prev_kvs: r.prev_kvs.into_iter().map(key_value).collect(),
    }
}

pub fn txn_response(r: kv::TxnResponse, header: &pb::ResponseHeader) -> pb::TxnResponse {
    use pb::response_op::Response as R;
    // The answers inside carry only a revision in their headers, as etcd's do: what the
    // transaction read once each had run (a nested transaction's own header is empty).
    let inner = |revision| pb::ResponseHeader {
        revision,
        ..Default::default()
    };
    let responses = r
        .responses
        .into_iter()
        .zip(r.revisions.into_iter().chain(std::iter::repeat(0)))
        .map(|(op, rev)| pb::ResponseOp {
            response: Some(match op {
                kv::ResponseOp::Range(r) => R::ResponseRange(range_response(r, &inner(rev))),
                kv::ResponseOp::Put(p) => R::ResponsePut(put_response(p, &inner(rev))),
                kv::ResponseOp::DeleteRange(d) => {
                    R::ResponseDeleteRange(delete_response(d, &inner(rev)))
                }
                kv::ResponseOp::Txn(t) => R::ResponseTxn(txn_response(t, &inner(0))),
            }),
        })
        .collect();
    pb::TxnResponse {
        header: Some(*header),
        succeeded: r.succeeded,
        responses,
    }
}
