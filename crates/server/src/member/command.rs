//! Client writes as raft log entries: the etcd request itself, protobuf-encoded, tagged
//! with the proposing node's request id so that node can answer its client once the entry
//! is applied. Every node decodes and applies the same bytes, so they reach the same state.

use crate::pb::etcdserverpb as pb;
use crate::pb::raftkvpb::{self as rpb, log_command::Command, LogCommand};
use crate::services::api;
use bytes::Bytes;
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
    /// A lease with its id chosen and its TTL raised to the minimum.
    LeaseGrant {
        id: i64,
        ttl: i64,
    },
    LeaseRevoke(i64),
    /// Remaining TTLs the leader records (seconds).
    LeaseCheckpoint(Vec<(i64, i64)>),
    /// A write that must run once however often it is retried (see `kv::Session`).
    InSession(kv::Session, Box<Write>),
    /// Maintenance.Alarm (every action goes through the log, as in etcd).
    Alarm(pb::AlarmRequest),
}

/// What a log command asks of the state machine.
#[derive(Debug)]
pub enum Decoded {
    Kv(kv::Request),
    InSession(kv::Session, kv::Request),
    Publish(rpb::MemberAttributes),
    UpdatePeerUrls(rpb::MemberPeerUrls),
    Alarm(pb::AlarmRequest),
}

/// What a write adds to the store, for the quota check (etcd's "cost"): the bytes of its
/// puts' keys and values; 0 for writes that add nothing (deletes, compactions, revokes).
pub fn cost(w: &Write) -> u64 {
    fn ops(list: &[pb::RequestOp]) -> u64 {
        use pb::request_op::Request;
        list.iter()
            .map(|op| match &op.request {
                Some(Request::RequestPut(p)) => (p.key.len() + p.value.len()) as u64 + 1,
                Some(Request::RequestTxn(t)) => ops(&t.success) + ops(&t.failure),
                _ => 0,
            })
            .sum()
    }
    match w {
        Write::Put(p) => (p.key.len() + p.value.len()) as u64 + 1,
        Write::Txn(t) => ops(&t.success) + ops(&t.failure),
        // A lease's own record.
        Write::LeaseGrant { .. } => 64,
        Write::InSession(_, w) => cost(w),
        _ => 0,
    }
}

pub fn encode(id: RequestId, write: Write) -> bytes::Bytes {
    let (session, write) = match write {
        Write::InSession(s, w) => (Some(s), *w),
        w => (None, w),
    };
    let command = match write {
        Write::Put(p) => Command::Put(p),
        Write::DeleteRange(d) => Command::DeleteRange(d),
        Write::Txn(t) => Command::Txn(t),
        Write::Compact(c) => Command::Compaction(c),
        Write::Publish(a) => Command::Publish(a),
        Write::UpdatePeerUrls(u) => Command::UpdatePeerUrls(u),
        Write::LeaseGrant { id, ttl } => Command::LeaseGrant(pb::LeaseGrantRequest { id, ttl }),
        Write::LeaseRevoke(id) => Command::LeaseRevoke(pb::LeaseRevokeRequest { id }),
        Write::LeaseCheckpoint(c) => Command::LeaseCheckpoint(pb::LeaseCheckpointRequest {
            checkpoints: c
                .into_iter()
                .map(|(id, remaining_ttl)| pb::LeaseCheckpoint { id, remaining_ttl })
                .collect(),
        }),
        Write::Alarm(a) => Command::Alarm(a),
        // Sessions do not nest.
        Write::InSession(_, w) => return encode(id, *w),
    };
    LogCommand {
        request_id: id.seq,
        member: id.member,
        boot: id.boot,
        command: Some(command),
        session: session.map_or(0, |s| s.lease),
        seq: session.map_or(0, |s| s.seq),
    }
    .encode_to_vec()
    .into()
}

/// Decode an entry into the request to apply. A command that decodes but does not convert
/// (say, an unknown enum value) is still deterministic: every node gets the same error, which
/// the proposer returns to its client.
#[allow(clippy::type_complexity)]
pub fn decode(data: &Bytes) -> Result<(RequestId, Result<Decoded, Status>), prost::DecodeError> {
    // Decoded from `Bytes`, the command's byte fields are slices of the entry, not copies;
    // `detach` then decides which of them the store may keep as such.
    let cmd = LogCommand::decode(data.clone())?;
    let kv = |r: Result<kv::Request, Status>| {
        r.map(|mut r| {
            detach(&mut r, data.len());
            Decoded::Kv(r)
        })
    };
    let request = match cmd.command {
        Some(Command::Put(p)) => kv(api::put_request(&p).map(kv::Request::Put)),
        Some(Command::DeleteRange(d)) => kv(api::delete_request(&d).map(kv::Request::DeleteRange)),
        Some(Command::Txn(t)) => kv(api::txn_request(&t).map(kv::Request::Txn)),
        Some(Command::Compaction(c)) => Ok(Decoded::Kv(kv::Request::Compact(c.revision))),
        Some(Command::Publish(a)) => Ok(Decoded::Publish(a)),
        Some(Command::UpdatePeerUrls(u)) => Ok(Decoded::UpdatePeerUrls(u)),
        Some(Command::LeaseGrant(g)) => Ok(Decoded::Kv(kv::Request::LeaseGrant {
            id: g.id,
            ttl: g.ttl,
        })),
        Some(Command::LeaseRevoke(r)) => Ok(Decoded::Kv(kv::Request::LeaseRevoke(r.id))),
        Some(Command::LeaseCheckpoint(c)) => Ok(Decoded::Kv(kv::Request::LeaseCheckpoint(
            c.checkpoints
                .iter()
                .map(|c| (c.id, c.remaining_ttl))
                .collect(),
        ))),
        Some(Command::Alarm(a)) => Ok(Decoded::Alarm(a)),
        None => Err(Status::invalid_argument("etcdserver: empty log command")),
    };
    let request = match (request, cmd.session) {
        (Ok(Decoded::Kv(r)), lease) if lease != 0 => Ok(Decoded::InSession(
            kv::Session {
                lease,
                seq: cmd.seq,
            },
            r,
        )),
        (r, _) => r,
    };
    let id = RequestId {
        member: cmd.member,
        boot: cmd.boot,
        seq: cmd.request_id,
    };
    Ok((id, request))
}

/// What the store keeps of a request may share the entry's buffer only where it is most of
/// that buffer. A value of at least half the entry stays a slice of it: no copy when it is
/// applied, and the log's entry and the store's value are one allocation until the log is
/// compacted (with a copy each, a member held every value written since its last snapshot
/// twice). Keys and smaller values are copied, so that something small and long-lived
/// never holds a large entry in memory: an overwritten key's name kept by the key index, a
/// small value written beside a large one in a transaction. Memory for stored bytes is
/// therefore at most twice what the quota counts.
fn detach(r: &mut kv::Request, entry_len: usize) {
    match r {
        kv::Request::Put(p) => detach_put(p, entry_len),
        kv::Request::DeleteRange(d) => detach_range(&mut d.range),
        kv::Request::Txn(t) => detach_txn(t, entry_len),
        _ => {}
    }
}

fn detach_txn(t: &mut kv::TxnRequest, entry_len: usize) {
    for op in t.success.iter_mut().chain(t.failure.iter_mut()) {
        match op {
            kv::RequestOp::Put(p) => detach_put(p, entry_len),
            kv::RequestOp::DeleteRange(d) => detach_range(&mut d.range),
            kv::RequestOp::Txn(t) => detach_txn(t, entry_len),
            kv::RequestOp::Range(_) => {} // read, never kept
        }
    }
}

fn detach_put(p: &mut kv::PutRequest, entry_len: usize) {
    p.key = Bytes::copy_from_slice(&p.key);
    if p.value.len() * 2 < entry_len {
        p.value = Bytes::copy_from_slice(&p.value);
    }
}

fn detach_range(r: &mut kv::KeyRange) {
    r.key = Bytes::copy_from_slice(&r.key);
    r.range_end = Bytes::copy_from_slice(&r.range_end);
}
