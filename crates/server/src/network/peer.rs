//! Raft messages on the wire between peers. Decoding validates: a message with no body, an
//! unknown entry kind or a snapshot without metadata is refused, never a panic.

use crate::pb::raftkvpb as pb;
use pb::message::Body as B;
use raft::{Body, ConflictHint, Entry, EntryKind, Membership, Message, SnapshotMeta};

fn entry_to_pb(e: &Entry) -> pb::Entry {
    pb::Entry {
        term: e.term,
        index: e.index,
        noop: e.kind == EntryKind::Noop,
        conf_change: e.kind == EntryKind::ConfChange,
        data: e.data.clone(),
    }
}

fn entry_from_pb(e: pb::Entry) -> Result<Entry, &'static str> {
    let kind = match (e.noop, e.conf_change) {
        (false, false) => EntryKind::Normal,
        (true, false) => EntryKind::Noop,
        (false, true) => EntryKind::ConfChange,
        (true, true) => return Err("an entry is both a no-op and a configuration change"),
    };
    Ok(Entry {
        term: e.term,
        index: e.index,
        kind,
        data: e.data,
    })
}

fn meta_to_pb(meta: &SnapshotMeta) -> pb::SnapshotMeta {
    let m = &meta.membership;
    pb::SnapshotMeta {
        index: meta.index,
        term: meta.term,
        voters: m.voters().to_vec(),
        outgoing: m.outgoing().to_vec(),
        learners: m.learners().to_vec(),
        learners_next: m.learners_next().to_vec(),
        auto_leave: m.auto_leave(),
    }
}

fn meta_from_pb(meta: pb::SnapshotMeta) -> Result<SnapshotMeta, &'static str> {
    let membership = Membership::from_parts(
        meta.voters,
        meta.outgoing,
        meta.learners,
        meta.learners_next,
        meta.auto_leave,
    )
    .map_err(|_| "a snapshot's configuration breaks the membership rules")?;
    Ok(SnapshotMeta {
        index: meta.index,
        term: meta.term,
        membership,
    })
}

pub fn to_pb(m: &Message) -> pb::Message {
    let body = match &m.body {
        Body::Append {
            prev_index,
            prev_term,
            entries,
            commit,
        } => B::Append(pb::Append {
            prev_index: *prev_index,
            prev_term: *prev_term,
            entries: entries.iter().map(entry_to_pb).collect(),
            commit: *commit,
        }),
        Body::AppendResponse {
            reject,
            index,
            hint,
        } => B::AppendResponse(pb::AppendResponse {
            reject: *reject,
            index: *index,
            hint: hint.map(|h| pb::ConflictHint {
                has_term: h.term.is_some(),
                term: h.term.unwrap_or(0),
                first_index: h.first_index,
            }),
        }),
        Body::Heartbeat { commit, seq } => B::Heartbeat(pb::Heartbeat {
            commit: *commit,
            seq: *seq,
        }),
        Body::HeartbeatResponse { seq } => {
            B::HeartbeatResponse(pb::HeartbeatResponse { seq: *seq })
        }
        Body::Vote {
            pre_vote,
            transfer,
            last_index,
            last_term,
        } => B::Vote(pb::Vote {
            pre_vote: *pre_vote,
            transfer: *transfer,
            last_index: *last_index,
            last_term: *last_term,
        }),
        Body::VoteResponse { pre_vote, granted } => B::VoteResponse(pb::VoteResponse {
            pre_vote: *pre_vote,
            granted: *granted,
        }),
        Body::TimeoutNow => B::TimeoutNow(pb::TimeoutNow {}),
        Body::ReadIndex { ctx } => B::ReadIndex(pb::ReadIndex { ctx: *ctx }),
        Body::ReadIndexResponse { ctx, index } => B::ReadIndexResponse(pb::ReadIndexResponse {
            ctx: *ctx,
            index: *index,
        }),
        Body::InstallSnapshot {
            meta,
            offset,
            total,
            data,
        } => B::InstallSnapshot(pb::InstallSnapshot {
            meta: Some(meta_to_pb(meta)),
            offset: *offset,
            total: *total,
            data: data.clone(),
        }),
        Body::SnapshotResponse {
            index,
            received,
            reject,
        } => B::SnapshotResponse(pb::SnapshotResponse {
            index: *index,
            received: *received,
            reject: *reject,
        }),
        Body::Propose { data } => B::Propose(pb::Propose { data: data.clone() }),
        Body::Commit { commit } => B::Commit(pb::Commit { commit: *commit }),
    };
    pb::Message {
        from: m.from,
        to: m.to,
        term: m.term,
        body: Some(body),
    }
}

pub fn from_pb(m: pb::Message) -> Result<Message, &'static str> {
    let body = match m.body.ok_or("raft message without a body")? {
        B::Append(a) => Body::Append {
            prev_index: a.prev_index,
            prev_term: a.prev_term,
            entries: a
                .entries
                .into_iter()
                .map(entry_from_pb)
                .collect::<Result<_, _>>()?,
            commit: a.commit,
        },
        B::AppendResponse(r) => Body::AppendResponse {
            reject: r.reject,
            index: r.index,
            hint: r.hint.map(|h| ConflictHint {
                term: h.has_term.then_some(h.term),
                first_index: h.first_index,
            }),
        },
        B::Heartbeat(h) => Body::Heartbeat {
            commit: h.commit,
            seq: h.seq,
        },
        B::HeartbeatResponse(h) => Body::HeartbeatResponse { seq: h.seq },
        B::Vote(v) => Body::Vote {
            pre_vote: v.pre_vote,
            transfer: v.transfer,
            last_index: v.last_index,
            last_term: v.last_term,
        },
        B::VoteResponse(v) => Body::VoteResponse {
            pre_vote: v.pre_vote,
            granted: v.granted,
        },
        B::TimeoutNow(_) => Body::TimeoutNow,
        B::ReadIndex(r) => Body::ReadIndex { ctx: r.ctx },
        B::ReadIndexResponse(r) => Body::ReadIndexResponse {
            ctx: r.ctx,
            index: r.index,
        },
        B::InstallSnapshot(s) => {
            let meta = s.meta.ok_or("snapshot chunk without metadata")?;
            Body::InstallSnapshot {
                meta: meta_from_pb(meta)?,
                offset: s.offset,
                total: s.total,
                data: s.data,
            }
        }
        B::SnapshotResponse(s) => Body::SnapshotResponse {
            index: s.index,
            received: s.received,
            reject: s.reject,
        },
        B::Propose(p) => Body::Propose { data: p.data },
        B::Commit(c) => Body::Commit { commit: c.commit },
    };
    Ok(Message {
        from: m.from,
        to: m.to,
        term: m.term,
        body,
    })
}
