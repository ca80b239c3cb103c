//! Client writes as raft log entries: the etcd request itself, protobuf-encoded, tagged
//! with the proposing node's request id so that node can answer its client once the entry
//! is applied. Every node decodes and applies the same bytes, so they reach the same state.

use crate::api;
use crate::pb::etcdserverpb as pb;
use crate::pb::raftkvpb::{self as rpb, log_command::Command, LogCommand};
use driver::RequestId;
use prost::Message;
use tonic::Status;

/// A write accepted by the API, as it travels through the log.
#[derive(Clone, Debug, PartialEq)]
pub enum Write {
    Put(pb::PutRequest),
    DeleteRange(pb::DeleteRangeRequest),
    Txn(pb::TxnRequest),
    Compact(pb::CompactionRequest),
    /// A member announces its name and client URLs.
    Publish(rpb::MemberAttributes),
    /// Cluster.MemberUpdate.
    UpdatePeerUrls(rpb::MemberPeerUrls),
}

/// What a log command asks of the state machine.
#[derive(Debug)]
pub enum Decoded {
    Kv(kv::Request),
    Publish(rpb::MemberAttributes),
    UpdatePeerUrls(rpb::MemberPeerUrls),
}

pub fn encode(id: RequestId, write: Write) -> bytes::Bytes {
    let command = match write {
        Write::Put(p) => Command::Put(p),
        Write::DeleteRange(d) => Command::DeleteRange(d),
        Write::Txn(t) => Command::Txn(t),
        Write::Compact(c) => Command::Compaction(c),
        Write::Publish(a) => Command::Publish(a),
        Write::UpdatePeerUrls(u) => Command::UpdatePeerUrls(u),
    };
    LogCommand {
        request_id: id.seq,
        member: id.member,
        boot: id.boot,
        command: Some(command),
    }
    .encode_to_vec()
    .into()
}

/// Decode an entry into the request to apply. A command that decodes but does not convert
/// (say, an unknown enum value) is still deterministic: every node gets the same error, which
/// the proposer returns to its client.
#[allow(clippy::type_complexity)]
pub fn decode(data: &[u8]) -> Result<(RequestId, Result<Decoded, Status>), prost::DecodeError> {
    let cmd = LogCommand::decode(data)?;
    let kv = |r: Result<kv::Request, Status>| r.map(Decoded::Kv);
    let request = match cmd.command {
        Some(Command::Put(p)) => kv(api::put_request(&p).map(kv::Request::Put)),
        Some(Command::DeleteRange(d)) => kv(api::delete_request(&d).map(kv::Request::DeleteRange)),
        Some(Command::Txn(t)) => kv(api::txn_request(&t).map(kv::Request::Txn)),
        Some(Command::Compaction(c)) => Ok(Decoded::Kv(kv::Request::Compact(c.revision))),
        Some(Command::Publish(a)) => Ok(Decoded::Publish(a)),
        Some(Command::UpdatePeerUrls(u)) => Ok(Decoded::UpdatePeerUrls(u)),
        None => Err(Status::invalid_argument("etcdserver: empty log command")),
    };
    let id = RequestId {
        member: cmd.member,
        boot: cmd.boot,
        seq: cmd.request_id,
    };
    Ok((id, request))
}
