//! The raft core's entry point must refuse or absorb any sequence of messages without a
//! panic (debug assertions included), and its output must stay sane: it only ever addresses
//! its peers, never commits past its log, and never lets its term go back. Structure-aware:
//! the fuzzer builds whole messages, mostly with small numbers so that indexes and terms
//! collide with the node's own log, sometimes with extreme ones.
#![no_main]

use arbitrary::Arbitrary;
use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use raft::{
    Body, Change, ConfChange, ConfEntry, Config, ConflictHint, Entry, EntryKind, Membership,
    Message, Raft, RestoreState, SnapshotMeta, Transition,
};

#[derive(Arbitrary, Debug)]
enum Num {
    Small(u8),
    Big(u64),
}

impl Num {
    fn get(&self) -> u64 {
        match self {
            Num::Small(n) => u64::from(*n % 16),
            Num::Big(n) => *n,
        }
    }
}

#[derive(Arbitrary, Debug)]
struct FEntry {
    index: Num,
    term: Num,
    noop: bool,
    data: Vec<u8>,
    /// A configuration entry: well-formed (voters, learners) or raw bytes.
    conf: Option<Result<(Vec<u8>, Vec<u8>), ()>>,
}

#[derive(Arbitrary, Debug)]
enum FBody {
    Append { prev_index: Num, prev_term: Num, entries: Vec<FEntry>, commit: Num },
    AppendResponse { reject: bool, index: Num, hint: Option<(Option<Num>, Num)> },
    Heartbeat { commit: Num, seq: Num },
    HeartbeatResponse { seq: Num },
    Vote { pre_vote: bool, transfer: bool, last_index: Num, last_term: Num },
    VoteResponse { pre_vote: bool, granted: bool },
    TimeoutNow,
    InstallSnapshot { index: Num, term: Num, voters: Vec<u8>, offset: Num, total: Num, data: Vec<u8> },
    SnapshotResponse { index: Num, received: Num, reject: bool },
    ReadIndex { ctx: u64 },
    ReadIndexResponse { ctx: u64, index: Num },
    Propose { data: Vec<Vec<u8>> },
    Commit { commit: Num },
}

#[derive(Arbitrary, Debug)]
enum Action {
    Step { from: u8, to: u8, term: Num, body: FBody },
    Tick,
    Propose(Vec<u8>),
    ReadIndex(u64),
    Campaign,
    ConfChange { transition: u8, changes: Vec<(u8, u8)> },
}

fn ids(v: &[u8]) -> Vec<u64> {
    v.iter().map(|&i| u64::from(i % 6)).collect()
}

fn membership(voters: &[u8], learners: &[u8]) -> Membership {
    let voters = ids(voters);
    let learners = ids(learners).into_iter().filter(|l| !voters.contains(l)).collect();
    Membership::from_parts(voters, vec![], learners, vec![], false).unwrap_or_default()
}

fn entry(e: FEntry) -> Entry {
    Entry {
        index: e.index.get(),
        term: e.term.get(),
        kind: match (&e.conf, e.noop) {
            (Some(_), _) => EntryKind::ConfChange,
            (None, true) => EntryKind::Noop,
            (None, false) => EntryKind::Normal,
        },
        data: match e.conf {
            Some(Ok((v, l))) => {
                let change = ConfChange::simple(Change::AddVoter(1));
                ConfEntry { change, membership: membership(&v, &l) }.encode().into()
            }
            _ => Bytes::from(e.data),
        },
    }
}

fn body(b: FBody) -> Body {
    match b {
        FBody::Append { prev_index, prev_term, entries, commit } => Body::Append {
            prev_index: prev_index.get(),
            prev_term: prev_term.get(),
            entries: entries.into_iter().map(entry).collect(),
            commit: commit.get(),
        },
        FBody::AppendResponse { reject, index, hint } => Body::AppendResponse {
            reject,
            index: index.get(),
            hint: hint.map(|(term, first)| ConflictHint {
                term: term.map(|t| t.get()),
                first_index: first.get(),
            }),
        },
        FBody::Heartbeat { commit, seq } => Body::Heartbeat { commit: commit.get(), seq: seq.get() },
        FBody::HeartbeatResponse { seq } => Body::HeartbeatResponse { seq: seq.get() },
        FBody::Vote { pre_vote, transfer, last_index, last_term } => Body::Vote {
            pre_vote,
            transfer,
            last_index: last_index.get(),
            last_term: last_term.get(),
        },
        FBody::VoteResponse { pre_vote, granted } => Body::VoteResponse { pre_vote, granted },
        FBody::TimeoutNow => Body::TimeoutNow,
        FBody::InstallSnapshot { index, term, voters, offset, total, data } => {
            Body::InstallSnapshot {
                meta: SnapshotMeta {
                    index: index.get(),
                    term: term.get(),
                    membership: membership(&voters, &[]),
                },
                offset: offset.get(),
                total: total.get(),
                data: Bytes::from(data),
            }
        }
        FBody::SnapshotResponse { index, received, reject } => Body::SnapshotResponse {
            index: index.get(),
            received: received.get(),
            reject,
        },
        FBody::ReadIndex { ctx } => Body::ReadIndex { ctx },
        FBody::ReadIndexResponse { ctx, index } => Body::ReadIndexResponse { ctx, index: index.get() },
        FBody::Propose { data } => Body::Propose { data: data.into_iter().map(Bytes::from).collect() },
        FBody::Commit { commit } => Body::Commit { commit: commit.get() },
    }
}

fuzz_target!(|actions: Vec<Action>| {
    let mut cfg = Config::new(1, vec![1, 2, 3]);
    cfg.snapshot_chunk_bytes = 8;
    let mut node = Raft::new(cfg, RestoreState::default()).unwrap();
    let mut term = 0;
    for a in actions {
        match a {
            Action::Step { from, to, term, body: b } => {
                let m = Message {
                    from: u64::from(from % 5),
                    to: u64::from(to % 3),
                    term: term.get(),
                    body: body(b),
                };
                let _ = node.step(m);
            }
            Action::Tick => node.tick(),
            Action::Propose(d) => {
                let _ = node.propose(Bytes::from(d));
            }
            Action::ReadIndex(ctx) => {
                let _ = node.read_index(ctx);
            }
            Action::Campaign => node.campaign(),
            Action::ConfChange { transition, changes } => {
                let transition = match transition % 4 {
                    0 => Transition::Simple,
                    1 => Transition::Joint { auto_leave: true },
                    2 => Transition::Joint { auto_leave: false },
                    _ => Transition::Leave,
                };
                let changes = changes
                    .into_iter()
                    .map(|(op, id)| {
                        let id = u64::from(id % 6);
                        match op % 4 {
                            0 => Change::AddVoter(id),
                            1 => Change::AddLearner(id),
                            2 => Change::Promote(id),
                            _ => Change::Remove(id),
                        }
                    })
                    .collect();
                let _ = node.propose_conf_change(ConfChange { transition, changes });
            }
        }
        // The disk is instant: everything handed out is durable and applied at once.
        let rd = node.ready();
        for m in rd.messages.iter().chain(&rd.persisted_messages) {
            assert_eq!(m.from, 1);
            assert!(m.to != 0 && m.to != 1, "sent to {}", m.to);
        }
        node.advance(&rd);
        assert!(node.commit_index() <= node.last_index());
        assert!(node.term() >= term, "the term went back");
        term = node.term();
    }
});
