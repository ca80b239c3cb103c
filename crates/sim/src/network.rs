//! The simulated network: per-message latency, loss and long reordering, and directed
//! partitions. Every decision draws from the cluster's seeded generator.

use raft::{Body, Message, NodeId};
use rand::Rng;
use rand_chacha::ChaCha8Rng;
use std::collections::{BTreeMap, HashSet};

/// Virtual time in microseconds.
pub type Micros = u64;
pub const MS: Micros = 1_000;

/// How messages fare in flight.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Faults {
    /// Drop 10% of requests and 10% of replies; deliver the rest after 0–26 ms.
    pub unreliable: bool,
    /// Hold about 2/3 of messages for 200–2200 ms, so old messages arrive very late.
    pub long_reordering: bool,
}

impl Faults {
    pub const RELIABLE: Faults = Faults {
        unreliable: false,
        long_reordering: false,
    };
    pub const UNRELIABLE: Faults = Faults {
        unreliable: true,
        long_reordering: false,
    };
    pub const UNRELIABLE_REORDERING: Faults = Faults {
        unreliable: true,
        long_reordering: true,
    };
}

/// Traffic a node sent, counted when sent (whether or not it arrived).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Counters {
    pub messages: u64,
    pub bytes: u64,
    /// By message kind: "append", "append_response", "heartbeat", "vote", ...
    pub by_kind: BTreeMap<&'static str, u64>,
}

impl Counters {
    pub fn kind(&self, kind: &str) -> u64 {
        self.by_kind.get(kind).copied().unwrap_or(0)
    }

    pub fn add(&mut self, other: &Counters) {
        self.messages += other.messages;
        self.bytes += other.bytes;
        for (k, v) in &other.by_kind {
            *self.by_kind.entry(k).or_default() += v;
        }
    }
}

pub fn kind_name(body: &Body) -> &'static str {
    match body {
        Body::Append { .. } => "append",
        Body::AppendResponse { reject: true, .. } => "append_reject",
        Body::AppendResponse { .. } => "append_response",
        Body::Heartbeat { .. } => "heartbeat",
        Body::HeartbeatResponse { .. } => "heartbeat_response",
        Body::Vote { pre_vote: true, .. } => "pre_vote",
        Body::Vote { .. } => "vote",
        Body::VoteResponse { pre_vote: true, .. } => "pre_vote_response",
        Body::VoteResponse { .. } => "vote_response",
        Body::TimeoutNow => "timeout_now",
        Body::InstallSnapshot { .. } => "snapshot_chunk",
        Body::SnapshotResponse { reject: true, .. } => "snapshot_reject",
        Body::SnapshotResponse { .. } => "snapshot_response",
        Body::ReadIndex { .. } => "read_index",
        Body::ReadIndexResponse { .. } => "read_index_response",
        Body::Propose { .. } => "propose",
        Body::Commit { .. } => "commit",
    }
}

#[derive(Debug)]
pub struct Network {
    pub faults: Faults,
    /// Directed links that deliver nothing: (from, to).
    blocked: HashSet<(NodeId, NodeId)>,
    /// Latest delivery time scheduled on each link: a reliable link is FIFO, like the one
    /// stream per peer a real transport keeps.
    last_delivery: BTreeMap<(NodeId, NodeId), Micros>,
    pub counters: BTreeMap<NodeId, Counters>,
}

impl Network {
    pub fn new() -> Self {
        Network {
            faults: Faults::RELIABLE,
            blocked: HashSet::new(),
            last_delivery: BTreeMap::new(),
            counters: BTreeMap::new(),
        }
    }

    /// Count `m` and decide when (if ever) it arrives.
    pub fn send(&mut self, m: &Message, now: Micros, rng: &mut ChaCha8Rng) -> Option<Micros> {
        let c = self.counters.entry(m.from).or_default();
        c.messages += 1;
        c.bytes += m.size();
        *c.by_kind.entry(kind_name(&m.body)).or_default() += 1;
        if !self.connected(m.from, m.to) {
            return None;
        }
        if !self.faults.unreliable {
            let at = now + rng.gen_range(MS / 2..=3 * MS / 2);
            let last = self.last_delivery.entry((m.from, m.to)).or_default();
            *last = (*last).max(at);
            return Some(*last);
        }
        if rng.gen_bool(0.1) {
            return None;
        }
        let mut delay = rng.gen_range(0..=26 * MS);
        if self.faults.long_reordering && rng.gen_ratio(2, 3) {
            delay += rng.gen_range(200 * MS..=2200 * MS);
        }
        Some(now + delay)
    }

    pub fn connected(&self, from: NodeId, to: NodeId) -> bool {
        !self.blocked.contains(&(from, to))
    }

    pub fn block(&mut self, from: NodeId, to: NodeId) {
        self.blocked.insert((from, to));
    }

    pub fn unblock(&mut self, from: NodeId, to: NodeId) {
        self.blocked.remove(&(from, to));
    }

    pub fn heal(&mut self) {
        self.blocked.clear();
    }

    pub fn total(&self) -> Counters {
        let mut t = Counters::default();
        for c in self.counters.values() {
            t.add(c);
        }
        t
    }
}

impl Default for Network {
    fn default() -> Self {
        Self::new()
    }
}
