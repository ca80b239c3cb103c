//! The dashboard's eyes: polls every member's `GET /dashboard/state` a few times a second,
//! turns their cumulative counters into rates and percentiles, merges their chronicles
//! into one timeline, and publishes the cluster as one JSON snapshot (the page's contract:
//! `docs/dashboard.md`).
//!
//! A member that does not answer in time (killed, paused, cut off from this process) keeps
//! its last known state, marked unreachable: what a newcomer should see when a member dies.

use crate::operations::insight::{self, Event, LinkTraffic, MemberState};
use serde::Serialize;
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::watch;

/// How often the members are polled while somebody watches (or a supervisor needs to know).
pub const POLL_INTERVAL: Duration = Duration::from_millis(250);
/// How long a member gets to answer a poll.
const POLL_TIMEOUT: Duration = Duration::from_millis(600);
/// Events kept in the merged timeline.
pub const TIMELINE_CAP: usize = 200;
/// Rates are measured over this window.
const RATE_WINDOW: Duration = Duration::from_secs(1);

/// A member to poll: its name as far as the poller knows, and the base URL of a port that
/// serves `/dashboard/state` (its client URL, or a metrics URL).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Target {
    pub name: String,
    pub url: String,
}

/// What the process running the dashboard adds to the members' own states: a supervisor
/// adds its processes, the write load, scenarios and its own events.
pub trait Source: Send + Sync + 'static {
    fn targets(&self) -> Vec<Target>;
    /// Supervisor-side parts of the snapshot, with its events numbered `since` and on.
    fn extras(&self, since: u64) -> Extras;
    /// Whether to poll at full rate even when nobody watches (a scenario runs, say).
    fn busy(&self) -> bool {
        false
    }
}

#[derive(Clone, Debug, Default)]
pub struct Extras {
    pub controls: bool,
    /// Process state by member name ("running", "paused", "killed", "exited").
    pub processes: HashMap<String, &'static str>,
    pub load: Option<LoadView>,
    pub scenarios: Vec<ScenarioInfo>,
    pub scenario: Option<ScenarioView>,
    /// Events of the supervisor itself, and the number its next one will get.
    pub events: Vec<Event>,
    pub next_event: u64,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct LoadView {
    pub running: bool,
    pub ok_per_s: f64,
    pub errors_per_s: f64,
    pub p50_ms: Option<f64>,
    pub p99_ms: Option<f64>,
}

#[derive(Clone, Debug, Serialize)]
pub struct ScenarioInfo {
    pub id: &'static str,
    pub title: &'static str,
}

#[derive(Clone, Debug, Serialize)]
pub struct ScenarioView {
    pub id: &'static str,
    pub title: &'static str,
    pub steps: Vec<StepView>,
    pub can_next: bool,
    pub done: bool,
}

#[derive(Clone, Debug, Serialize)]
pub struct StepView {
    pub text: String,
    pub state: &'static str,
}

/// The snapshot the page draws (see `docs/dashboard.md`).
#[derive(Clone, Debug, Default, Serialize)]
pub struct ClusterView {
    pub now_ms: u64,
    pub controls: bool,
    pub cluster: ClusterStats,
    pub load: Option<LoadView>,
    pub members: Vec<MemberView>,
    pub links: Vec<LinkView>,
    pub timeline: Vec<TimelineEvent>,
    pub scenarios: Vec<ScenarioInfo>,
    pub scenario: Option<ScenarioView>,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct ClusterStats {
    pub leader: Option<String>,
    pub term: u64,
    pub leader_changes: u64,
    pub writes_per_s: f64,
    pub reads_per_s: f64,
    pub write_p50_ms: Option<f64>,
    pub write_p99_ms: Option<f64>,
    pub read_p50_ms: Option<f64>,
    pub read_p99_ms: Option<f64>,
}

#[derive(Clone, Debug, Serialize)]
pub struct MemberView {
    pub name: String,
    pub id: String,
    pub process: &'static str,
    pub reachable: bool,
    pub role: &'static str,
    pub learner: bool,
    pub term: u64,
    pub leader: Option<String>,
    pub last_index: u64,
    pub commit: u64,
    pub applied: u64,
    pub snapshot_index: u64,
    pub wal_bytes: u64,
    pub revision: i64,
    pub healthy: bool,
    pub alarms: Vec<String>,
    pub writes_per_s: f64,
    pub reads_per_s: f64,
    pub log: Vec<LogEntry>,
    pub cut_from: Vec<String>,
}

#[derive(Clone, Copy, Debug, Serialize)]
pub struct LogEntry {
    pub index: u64,
    pub term: u64,
}

#[derive(Clone, Debug, Serialize)]
pub struct LinkView {
    pub from: String,
    pub to: String,
    pub msgs_per_s: f64,
    pub bytes_per_s: f64,
    pub rtt_ms: Option<f64>,
    pub cut: bool,
}

#[derive(Clone, Debug, Serialize)]
pub struct TimelineEvent {
    pub at_ms: u64,
    pub member: Option<String>,
    pub kind: String,
    pub text: String,
}

/// Cumulative counters sampled over time; rates are taken over the last `RATE_WINDOW`.
#[derive(Debug, Default)]
pub struct Rate {
    samples: VecDeque<(Instant, Vec<u64>)>,
}

impl Rate {
    /// Add a sample; returns (per-second rate of each counter, the window's differences).
    pub fn sample(&mut self, now: Instant, counters: Vec<u64>) -> (Vec<f64>, Vec<u64>) {
        while self.samples.len() > 1 && now.duration_since(self.samples[1].0) >= RATE_WINDOW {
            self.samples.pop_front();
        }
        self.samples.push_back((now, counters));
        let (t0, first) = self.samples.front().unwrap();
        let (_, last) = self.samples.back().unwrap();
        let dt = now.duration_since(*t0).as_secs_f64();
        let diff: Vec<u64> = last
            .iter()
            .zip(first.iter().chain(std::iter::repeat(&0)))
            .map(|(b, a)| b.saturating_sub(*a))
            .collect();
        let rates = diff
            .iter()
            .map(|d| if dt > 0.0 { *d as f64 / dt } else { 0.0 })
            .collect();
        (rates, diff)
    }
}

/// What the collector remembers of one member between polls.
#[derive(Default)]
struct Known {
    state: Option<MemberState>,
    reachable: bool,
    next_event: u64,
    requests: Rate,
    links: HashMap<String, Rate>,
    /// Leader changes this member saw (counted by the collector from its events).
    leader_changes: u64,
}

/// Polls the members and publishes `ClusterView`s.
pub struct Collector {
    view: watch::Sender<Arc<ClusterView>>,
    /// The supervisor reads the names' ids from here (to flip switches by id).
    ids: Mutex<HashMap<String, String>>,
}

impl Collector {
    /// Start polling for `source` on the current runtime.
    pub fn start(source: Arc<dyn Source>) -> Arc<Collector> {
        let (view, _) = watch::channel(Arc::new(ClusterView::default()));
        let c = Arc::new(Collector {
            view,
            ids: Mutex::new(HashMap::new()),
        });
        tokio::spawn(c.clone().run(source));
        c
    }

    /// Live snapshots, for a page.
    pub fn subscribe(&self) -> watch::Receiver<Arc<ClusterView>> {
        self.view.subscribe()
    }

    pub fn latest(&self) -> Arc<ClusterView> {
        self.view.borrow().clone()
    }

    /// A member's id (hex) by name, once it answered a poll.
    pub fn id_of(&self, name: &str) -> Option<String> {
        self.ids.lock().unwrap().get(name).cloned()
    }

    async fn run(self: Arc<Self>, source: Arc<dyn Source>) {
        let mut known: BTreeMap<String, Known> = BTreeMap::new();
        let mut timeline: VecDeque<TimelineEvent> = VecDeque::new();
        let mut own_next = 0;
        let mut idle_rounds = 0u32;
        loop {
            tokio::time::sleep(POLL_INTERVAL).await;
            // Nobody watching and nothing running: poll once a second (the supervisor still
            // learns ids and notices deaths), not four times.
            if self.view.receiver_count() == 0 && !source.busy() {
                idle_rounds += 1;
                if idle_rounds % 4 != 0 {
                    continue;
                }
            }
            let targets = source.targets();
            known.retain(|name, _| targets.iter().any(|t| &t.name == name));
            let polls = targets.iter().map(|t| {
                let since = known.get(&t.name).map_or(0, |k| k.next_event);
                poll(t.clone(), since)
            });
            let results = futures_join(polls).await;
            let now = Instant::now();
            let extras = source.extras(own_next);
            own_next = extras.next_event;
            let mut fresh: Vec<TimelineEvent> = Vec::new();
            for (t, r) in targets.iter().zip(results) {
                let k = known.entry(t.name.clone()).or_default();
                match r {
                    Ok(mut s) => {
                        // A restarted member numbers its events from 0 again.
                        if s.next_event < k.next_event {
                            k.next_event = 0;
                        }
                        k.next_event = s.next_event;
                        for e in std::mem::take(&mut s.events) {
                            if e.kind == "leader" && !e.text.starts_with("no leader") {
                                k.leader_changes += 1;
                            }
                            fresh.push(TimelineEvent {
                                at_ms: e.at_ms,
                                member: Some(t.name.clone()),
                                kind: e.kind,
                                text: e.text,
                            });
                        }
                        k.state = Some(s);
                        k.reachable = true;
                    }
                    Err(_) => k.reachable = false,
                }
            }
            for e in extras.events.iter().cloned() {
                fresh.push(TimelineEvent {
                    at_ms: e.at_ms,
                    member: None,
                    kind: e.kind,
                    text: e.text,
                });
            }
            let names = self.learn_names(&known, &targets);
            fresh.sort_by_key(|e| e.at_ms);
            for mut e in fresh {
                e.text = with_names(&e.text, &names);
                if timeline.len() == TIMELINE_CAP {
                    timeline.pop_front();
                }
                timeline.push_back(e);
            }
            let view = build(now, &mut known, &targets, &names, &timeline, extras);
            self.view.send_replace(Arc::new(view));
        }
    }

    /// Hex id → name, from every state's registry and every member's own name.
    fn learn_names(
        &self,
        known: &BTreeMap<String, Known>,
        targets: &[Target],
    ) -> HashMap<String, String> {
        let mut names = HashMap::new();
        for k in known.values() {
            if let Some(s) = &k.state {
                for m in &s.members {
                    if !m.name.is_empty() {
                        names.insert(m.id.clone(), m.name.clone());
                    }
                }
            }
        }
        for t in targets {
            if let Some(s) = known.get(&t.name).and_then(|k| k.state.as_ref()) {
                names.insert(s.id.clone(), t.name.clone());
            }
        }
        let mut ids = self.ids.lock().unwrap();
        for (id, name) in &names {
            ids.insert(name.clone(), id.clone());
        }
        names
    }
}

/// Run the polls concurrently (a handful of members; no extra dependency for join_all).
async fn futures_join<F, T>(futs: impl Iterator<Item = F>) -> Vec<T>
where
    F: std::future::Future<Output = T> + Send + 'static,
    T: Send + 'static,
{
    let handles: Vec<_> = futs.map(tokio::spawn).collect();
    let mut out = Vec::with_capacity(handles.len());
    for h in handles {
        out.push(h.await.expect("a poll panicked"));
    }
    out
}

/// One member's state, with its events from `since` on.
pub async fn poll(t: Target, since: u64) -> Result<MemberState, String> {
    let path = format!("/dashboard/state?since={since}");
    let body = tokio::time::timeout(POLL_TIMEOUT, super::http::get(&t.url, &path))
        .await
        .map_err(|_| format!("{}: no answer in time", t.name))??;
    serde_json::from_slice(&body).map_err(|e| format!("{}: {e}", t.name))
}

/// Replace every member id in `text` by the member's name.
fn with_names(text: &str, names: &HashMap<String, String>) -> String {
    let mut out = text.to_string();
    for (id, name) in names {
        if out.contains(id.as_str()) {
            out = out.replace(id.as_str(), name);
        }
    }
    out
}

fn build(
    now: Instant,
    known: &mut BTreeMap<String, Known>,
    targets: &[Target],
    names: &HashMap<String, String>,
    timeline: &VecDeque<TimelineEvent>,
    extras: Extras,
) -> ClusterView {
    let name_of = |id: &str| names.get(id).cloned().unwrap_or_else(|| id.to_string());
    let mut members = Vec::new();
    let mut links = Vec::new();
    let mut stats = ClusterStats::default();
    let (mut write_diff, mut read_diff) =
        (vec![0u64; insight::BUCKETS], vec![0u64; insight::BUCKETS]);
    let mut cut_pairs: Vec<(String, String)> = Vec::new();
    for t in targets {
        let Some(k) = known.get_mut(&t.name) else {
            continue;
        };
        let process = extras.processes.get(&t.name).copied().unwrap_or("unknown");
        let Some(s) = &k.state else {
            members.push(MemberView::unknown(&t.name, process));
            continue;
        };
        stats.leader_changes = stats.leader_changes.max(k.leader_changes);
        let mut counters = s.writes.clone();
        counters.extend(&s.reads);
        let (_, diff) = k.requests.sample(now, counters.clone());
        let (w, r) = diff.split_at(s.writes.len().min(diff.len()));
        let window = known_window(&k.requests);
        let (wsum, rsum): (u64, u64) = (w.iter().sum(), r.iter().sum());
        let (writes_per_s, reads_per_s) = match window {
            Some(dt) if k.reachable => (wsum as f64 / dt, rsum as f64 / dt),
            _ => (0.0, 0.0),
        };
        if k.reachable {
            for (acc, d) in write_diff.iter_mut().zip(w) {
                *acc += d;
            }
            for (acc, d) in read_diff.iter_mut().zip(r) {
                *acc += d;
            }
            stats.writes_per_s += writes_per_s;
            stats.reads_per_s += reads_per_s;
            if s.role == "leader" && s.term >= stats.term {
                stats.leader = Some(t.name.clone());
            }
            stats.term = stats.term.max(s.term);
        }
        for (peer, traffic) in &s.links {
            let rate = k.links.entry(peer.clone()).or_default();
            let LinkTraffic {
                msgs_out,
                bytes_out,
                rtt_ms,
                ..
            } = *traffic;
            let (r, _) = rate.sample(now, vec![msgs_out, bytes_out]);
            let (msgs, bytes) = if k.reachable {
                (r[0], r[1])
            } else {
                (0.0, 0.0)
            };
            links.push(LinkView {
                from: t.name.clone(),
                to: name_of(peer),
                msgs_per_s: msgs,
                bytes_per_s: bytes,
                rtt_ms,
                cut: s.cut_to.contains(peer),
            });
        }
        for peer in &s.cut_from {
            cut_pairs.push((name_of(peer), t.name.clone()));
        }
        members.push(MemberView {
            name: t.name.clone(),
            id: s.id.clone(),
            process,
            reachable: k.reachable,
            role: role_str(&s.role),
            learner: s.learner,
            term: s.term,
            leader: s.leader.as_deref().map(name_of),
            last_index: s.last_index,
            commit: s.commit,
            applied: s.applied,
            snapshot_index: s.snapshot_index,
            wal_bytes: s.wal_bytes,
            revision: s.revision,
            healthy: s.healthy && k.reachable,
            alarms: s.alarms.iter().map(|a| with_names(a, names)).collect(),
            writes_per_s,
            reads_per_s,
            log: s
                .log
                .iter()
                .map(|(index, term)| LogEntry {
                    index: *index,
                    term: *term,
                })
                .collect(),
            cut_from: s.cut_from.iter().map(|p| name_of(p)).collect(),
        });
    }
    // A link is cut if either end drops it; a cut between two members that had nothing to
    // say to each other (two followers) is still drawn.
    for l in &mut links {
        if cut_pairs.iter().any(|(f, t)| *f == l.from && *t == l.to) {
            l.cut = true;
        }
    }
    for (from, to) in cut_pairs {
        if !links.iter().any(|l| l.from == from && l.to == to) {
            links.push(LinkView {
                from,
                to,
                msgs_per_s: 0.0,
                bytes_per_s: 0.0,
                rtt_ms: None,
                cut: true,
            });
        }
    }
    stats.write_p50_ms = insight::quantile_ms(&write_diff, 0.5);
    stats.write_p99_ms = insight::quantile_ms(&write_diff, 0.99);
    stats.read_p50_ms = insight::quantile_ms(&read_diff, 0.5);
    stats.read_p99_ms = insight::quantile_ms(&read_diff, 0.99);
    ClusterView {
        now_ms: insight::now_ms(),
        controls: extras.controls,
        cluster: stats,
        load: extras.load,
        members,
        links,
        timeline: timeline.iter().cloned().collect(),
        scenarios: extras.scenarios,
        scenario: extras.scenario,
    }
}

/// The span the rate's samples cover, in seconds (None before two samples).
fn known_window(r: &Rate) -> Option<f64> {
    let (a, b) = (r.samples.front()?, r.samples.back()?);
    let dt = b.0.duration_since(a.0).as_secs_f64();
    (dt > 0.0).then_some(dt)
}

/// The role names are `insight::role_name`'s; the page's JSON takes them as they are.
fn role_str(s: &str) -> &'static str {
    match s {
        "leader" => "leader",
        "candidate" => "candidate",
        "pre-candidate" => "pre-candidate",
        _ => "follower",
    }
}

impl MemberView {
    fn unknown(name: &str, process: &'static str) -> MemberView {
        MemberView {
            name: name.to_string(),
            id: String::new(),
            process,
            reachable: false,
            role: "follower",
            learner: false,
            term: 0,
            leader: None,
            last_index: 0,
            commit: 0,
            applied: 0,
            snapshot_index: 0,
            wal_bytes: 0,
            revision: 0,
            healthy: false,
            alarms: Vec::new(),
            writes_per_s: 0.0,
            reads_per_s: 0.0,
            log: Vec::new(),
            cut_from: Vec::new(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_are_taken_over_the_last_second() {
        let mut r = Rate::default();
        let t0 = Instant::now();
        r.sample(t0, vec![0]);
        r.sample(t0 + Duration::from_millis(500), vec![50]);
        let (rate, diff) = r.sample(t0 + Duration::from_millis(1000), vec![100]);
        assert_eq!(diff, vec![100]);
        assert!((rate[0] - 100.0).abs() < 1e-9);
        // The oldest sample falls out of the window: the rate follows the newest second.
        let (rate, diff) = r.sample(t0 + Duration::from_millis(1500), vec![100]);
        assert_eq!(diff, vec![50]);
        assert!((rate[0] - 50.0).abs() < 1e-9);
    }

    #[test]
    fn ids_in_event_texts_become_names() {
        let names = HashMap::from([("00000000000000ab".to_string(), "n1".to_string())]);
        assert_eq!(
            with_names("granted its vote to 00000000000000ab for term 3", &names),
            "granted its vote to n1 for term 3"
        );
    }
}
