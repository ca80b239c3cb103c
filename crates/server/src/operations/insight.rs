//! What a member tells the dashboard about itself (`GET /dashboard/state`): its Raft state,
//! the recent shape of its log, the traffic on each peer link, request latencies, and a
//! chronicle of the events a Raft explainer draws — campaigns and votes, leader changes,
//! snapshots, membership changes, alarms. Also the switch on its peer links that the
//! supervisor of `raftkv cluster` flips to cut the network between members.
//!
//! Everything here is bounded: the chronicle keeps its last `CHRONICLE_CAP` events, the
//! log strip its last `LOG_STRIP` entries, the link table one row per peer. The hot path
//! pays a few relaxed atomic adds per request and per message batch; nothing is computed
//! until somebody asks.

use raft::NodeId;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Events kept for the dashboard (older ones are dropped: a page that polls every quarter
/// second never misses any, a page that was closed for hours does not need them).
pub const CHRONICLE_CAP: usize = 512;
/// Entries of the log drawn per member.
pub const LOG_STRIP: u64 = 60;

/// One event in a member's chronicle.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Event {
    pub seq: u64,
    /// Wall-clock time (milliseconds since the Unix epoch): the page merges members'
    /// chronicles by it, and they share the machine's clock in `raftkv cluster`.
    pub at_ms: u64,
    pub kind: String,
    pub text: String,
}

/// The member's recent events, oldest first.
#[derive(Debug, Default)]
pub struct Chronicle {
    events: VecDeque<Event>,
    next: u64,
}

pub type SharedChronicle = Arc<Mutex<Chronicle>>;

pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

impl Chronicle {
    pub fn push(&mut self, kind: &'static str, text: String) {
        if self.events.len() == CHRONICLE_CAP {
            self.events.pop_front();
        }
        self.events.push_back(Event {
            seq: self.next,
            at_ms: now_ms(),
            kind: kind.to_string(),
            text,
        });
        self.next += 1;
    }

    /// The events numbered `since` and after, and the number the next one will get.
    pub fn since(&self, since: u64) -> (Vec<Event>, u64) {
        let events = self
            .events
            .iter()
            .filter(|e| e.seq >= since)
            .cloned()
            .collect();
        (events, self.next)
    }
}

/// Traffic on the link to one peer since the member started: Raft messages and their
/// approximate payload bytes (entries' and snapshot chunks' data plus a fixed header each).
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize)]
pub struct LinkTraffic {
    pub msgs_out: u64,
    pub bytes_out: u64,
    pub msgs_in: u64,
    pub bytes_in: u64,
    /// The last heartbeat's round trip, in milliseconds.
    pub rtt_ms: Option<f64>,
}

/// The bytes a message carries, roughly: what the dashboard draws as a link's load.
pub fn approx_bytes(m: &raft::Message) -> u64 {
    const HEADER: u64 = 32;
    match &m.body {
        raft::Body::Append { entries, .. } => {
            HEADER
                + entries
                    .iter()
                    .map(|e| 24 + e.data.len() as u64)
                    .sum::<u64>()
        }
        raft::Body::InstallSnapshot { data, .. } => HEADER + data.len() as u64,
        _ => HEADER,
    }
}

/// The peer links as the raft loop sees them: traffic, and the cut switch. Owned by the
/// loop's transport (no lock: only the loop touches it; the dashboard asks through the
/// loop's queue).
#[derive(Debug, Default)]
pub struct Links {
    pub traffic: HashMap<NodeId, LinkTraffic>,
    /// The supervisor's switch (`raftkv cluster`, through the member's stdin, so nothing
    /// needs root to split a network): peers whose messages to this member are dropped,
    /// and peers this member's messages to are dropped. One-way cuts make the classic
    /// cases reproducible (a follower that receives the leader's appends while its answers
    /// are lost).
    pub cut: Cut,
}

/// Directed cuts of one member's links.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Cut {
    pub from: HashSet<NodeId>,
    pub to: HashSet<NodeId>,
}

impl Cut {
    pub fn is_empty(&self) -> bool {
        self.from.is_empty() && self.to.is_empty()
    }
}

impl Links {
    pub fn sent(&mut self, m: &raft::Message) {
        let t = self.traffic.entry(m.to).or_default();
        t.msgs_out += 1;
        t.bytes_out += approx_bytes(m);
    }

    pub fn received(&mut self, m: &raft::Message) {
        let t = self.traffic.entry(m.from).or_default();
        t.msgs_in += 1;
        t.bytes_in += approx_bytes(m);
    }

    pub fn rtt(&mut self, peer: NodeId, rtt: Duration) {
        self.traffic.entry(peer).or_default().rtt_ms = Some(rtt.as_secs_f64() * 1e3);
    }
}

/// Buckets of a latency histogram: bucket `i` counts requests that took less than
/// 2^i microseconds (and at least 2^(i-1)); the last one takes the rest.
pub const BUCKETS: usize = 24;

/// A cumulative latency histogram with relaxed atomic counters: one add per request.
#[derive(Debug, Default)]
pub struct Latency {
    buckets: [AtomicU64; BUCKETS],
}

impl Latency {
    pub fn record(&self, d: Duration) {
        let us = d.as_micros().max(1) as u64;
        let i = (64 - (us - 1).leading_zeros() as usize).min(BUCKETS - 1);
        self.buckets[i].fetch_add(1, Ordering::Relaxed);
    }

    pub fn counts(&self) -> Vec<u64> {
        self.buckets
            .iter()
            .map(|b| b.load(Ordering::Relaxed))
            .collect()
    }
}

/// The `q` quantile of a histogram of `Latency::counts` (or a difference of two), in
/// milliseconds: the upper bound of the bucket it falls in. None without requests.
pub fn quantile_ms(counts: &[u64], q: f64) -> Option<f64> {
    let total: u64 = counts.iter().sum();
    if total == 0 {
        return None;
    }
    let rank = ((total as f64) * q).ceil().max(1.0) as u64;
    let mut seen = 0;
    for (i, c) in counts.iter().enumerate() {
        seen += c;
        if seen >= rank {
            return Some((1u64 << i) as f64 / 1e3);
        }
    }
    None
}

/// Writes and reads a member served, with their latencies (what the dashboard's rates
/// and percentiles come from).
#[derive(Debug, Default)]
pub struct Requests {
    pub writes: Latency,
    pub reads: Latency,
}

pub type SharedRequests = Arc<Requests>;

/// A member's state, as `GET /dashboard/state?since=N` answers it.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct MemberState {
    pub id: String,
    pub name: String,
    pub cluster_id: String,
    pub role: String,
    pub learner: bool,
    pub term: u64,
    pub leader: Option<String>,
    pub last_index: u64,
    pub commit: u64,
    pub applied: u64,
    pub snapshot_index: u64,
    pub revision: i64,
    pub wal_bytes: u64,
    pub healthy: bool,
    pub alarms: Vec<String>,
    pub members: Vec<MemberInfo>,
    /// The last `LOG_STRIP` entries: (index, term), ascending.
    pub log: Vec<(u64, u64)>,
    /// Traffic per peer, by the peer's id (hex).
    pub links: BTreeMap<String, LinkTraffic>,
    /// Peers whose messages this member drops, and peers it sends nothing to (hex ids).
    pub cut_from: Vec<String>,
    pub cut_to: Vec<String>,
    pub writes: Vec<u64>,
    pub reads: Vec<u64>,
    pub events: Vec<Event>,
    pub next_event: u64,
}

/// A member as another member's registry knows it.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct MemberInfo {
    pub id: String,
    pub name: String,
    pub client_urls: Vec<String>,
    pub learner: bool,
}

pub fn hex(id: NodeId) -> String {
    format!("{id:016x}")
}

pub fn role_name(r: raft::Role) -> &'static str {
    match r {
        raft::Role::Leader => "leader",
        raft::Role::Follower => "follower",
        raft::Role::Candidate => "candidate",
        raft::Role::PreCandidate => "pre-candidate",
    }
}

/// etcd's alarm names.
pub fn alarm_name(kind: i32) -> &'static str {
    match kind {
        1 => "NOSPACE",
        2 => "CORRUPT",
        _ => "UNKNOWN",
    }
}

/// A supervisor's switch line: `cut from=<ids> to=<ids>`, each a comma-separated list of
/// hex member ids, either possibly empty (`cut from= to=` heals every link).
pub fn cut_line(c: &Cut) -> String {
    let ids = |s: &HashSet<NodeId>| {
        let mut v: Vec<String> = s.iter().map(|id| hex(*id)).collect();
        v.sort();
        v.join(",")
    };
    format!("cut from={} to={}\n", ids(&c.from), ids(&c.to))
}

pub fn parse_cut(line: &str) -> Result<Cut, String> {
    let rest = line
        .trim()
        .strip_prefix("cut")
        .ok_or_else(|| format!("unknown supervisor command {line:?}"))?;
    let mut cut = Cut::default();
    for part in rest.split_whitespace() {
        let (side, ids) = part
            .split_once('=')
            .ok_or_else(|| format!("{part:?} is not from=… or to=…"))?;
        let set = match side {
            "from" => &mut cut.from,
            "to" => &mut cut.to,
            _ => return Err(format!("{side:?} is not from or to")),
        };
        for id in ids.split(',').filter(|s| !s.is_empty()) {
            let id =
                u64::from_str_radix(id, 16).map_err(|_| format!("{id:?} is not a member id"))?;
            set.insert(id);
        }
    }
    Ok(cut)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_chronicle_keeps_its_last_events_and_numbers_them() {
        let mut c = Chronicle::default();
        for i in 0..(CHRONICLE_CAP + 10) {
            c.push("vote", format!("e{i}"));
        }
        let (all, next) = c.since(0);
        assert_eq!(all.len(), CHRONICLE_CAP);
        assert_eq!(next, (CHRONICLE_CAP + 10) as u64);
        assert_eq!(all[0].text, "e10");
        let (tail, _) = c.since(next - 2);
        assert_eq!(
            tail.iter().map(|e| e.text.as_str()).collect::<Vec<_>>(),
            [
                format!("e{}", CHRONICLE_CAP + 8),
                format!("e{}", CHRONICLE_CAP + 9)
            ]
        );
    }

    #[test]
    fn latency_quantiles_come_from_power_of_two_buckets() {
        let l = Latency::default();
        for _ in 0..90 {
            l.record(Duration::from_micros(300)); // < 512 µs
        }
        for _ in 0..10 {
            l.record(Duration::from_millis(20)); // < 32768 µs
        }
        let c = l.counts();
        assert_eq!(quantile_ms(&c, 0.5), Some(0.512));
        assert_eq!(quantile_ms(&c, 0.99), Some(32.768));
        assert_eq!(quantile_ms(&[0; BUCKETS], 0.5), None);
    }

    #[test]
    fn cut_lines_round_trip_and_bad_ones_are_refused() {
        assert_eq!(parse_cut("cut from= to=").unwrap(), Cut::default());
        let c = Cut {
            from: HashSet::from([10u64, 255]),
            to: HashSet::from([7u64]),
        };
        assert_eq!(parse_cut(&cut_line(&c)).unwrap(), c);
        assert!(parse_cut("cut from=zz").is_err());
        assert!(parse_cut("cut sideways=01").is_err());
        assert!(parse_cut("rm -rf").is_err());
    }
}
