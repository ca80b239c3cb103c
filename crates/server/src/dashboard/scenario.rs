//! Guided scenarios: the failure cases every Raft explainer draws, played on the real
//! processes, a step at a time with a sentence each. Each step acts (cut a link, write,
//! kill), then waits until the cluster shows what the sentence says — a new leader, an
//! entry overwritten, a retried write answered once — and reports what it saw. A step that
//! does not see it in time fails the scenario, saying what it waited for.
//!
//! The scenarios start from a healthy cluster: every member running, a leader, no cuts.
//! "A" is the leader at the start, "B" and "C" two of the others.

use super::collect::{ClusterView, MemberView, ScenarioView, StepView};
use super::supervisor::{ProcState, Supervisor};
use crate::pb::etcdserverpb::{
    kv_client::KvClient, lease_client::LeaseClient, LeaseGrantRequest, PutRequest, RangeRequest,
};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::Notify;
use tonic::transport::Endpoint;

/// Every scenario: (id, title).
pub const ALL: [(&str, &str); 4] = [
    (
        "leader-dies-before-replicating",
        "The leader dies before replicating a write",
    ),
    (
        "leader-dies-after-replicating",
        "The leader dies after replicating to one follower, before committing",
    ),
    (
        "leader-dies-before-answering",
        "The leader dies after committing, before the client hears back",
    ),
    (
        "split-brain",
        "Split brain: the old leader keeps accepting writes it cannot commit",
    ),
];

/// How long a client waits for an answer before it gives up (and later retries).
const CLIENT_DEADLINE: Duration = Duration::from_secs(3);
/// How long a step waits for the cluster to show what it describes.
const STEP_TIMEOUT: Duration = Duration::from_secs(15);

/// The running scenario, if any, as the page sees it.
#[derive(Default)]
pub struct Runner {
    run: Mutex<Option<Run>>,
}

struct Run {
    id: &'static str,
    title: &'static str,
    steps: Vec<StepView>,
    /// The current step finished and the next waits for the user.
    can_next: bool,
    done: bool,
    next: Arc<Notify>,
    task: Option<tokio::task::AbortHandle>,
}

impl Runner {
    pub fn view(&self) -> Option<ScenarioView> {
        let run = self.run.lock().unwrap();
        run.as_ref().map(|r| ScenarioView {
            id: r.id,
            title: r.title,
            steps: r.steps.clone(),
            can_next: r.can_next,
            done: r.done,
        })
    }

    pub fn active(&self) -> bool {
        self.run.lock().unwrap().as_ref().is_some_and(|r| !r.done)
    }

    pub fn next(&self) -> Result<(), String> {
        let mut run = self.run.lock().unwrap();
        let r = run.as_mut().ok_or("no scenario is running")?;
        if !r.can_next {
            return Err(match r.done {
                true => "the scenario is over".into(),
                false => "the current step has not finished yet".into(),
            });
        }
        r.can_next = false;
        r.next.notify_one();
        Ok(())
    }

    pub fn stop(&self) {
        if let Some(r) = self.run.lock().unwrap().take() {
            if let Some(t) = r.task {
                t.abort();
            }
        }
    }

    fn set(&self, i: usize, state: &'static str, outcome: Option<String>) {
        let mut run = self.run.lock().unwrap();
        if let Some(r) = run.as_mut() {
            if let Some(s) = r.steps.get_mut(i) {
                s.state = state;
                if let Some(o) = outcome {
                    s.text = format!("{} — {o}", s.text);
                }
            }
            if state == "failed" || (state == "done" && i + 1 == r.steps.len()) {
                r.done = true;
                r.can_next = false;
            } else if state == "done" {
                r.can_next = true;
            }
        }
    }
}

/// Start scenario `id` from the cluster as it is now.
pub fn start(sup: &Arc<Supervisor>, id: &str) -> Result<(), String> {
    let (id, title) = ALL
        .iter()
        .find(|(i, _)| *i == id)
        .copied()
        .ok_or_else(|| format!("no scenario {id:?}"))?;
    if sup.runner.active() {
        return Err("a scenario is running: stop it first".into());
    }
    let cast = Cast::of(sup)?;
    sup.stop_load();
    let texts = texts(id, &cast);
    let next = Arc::new(Notify::new());
    *sup.runner.run.lock().unwrap() = Some(Run {
        id,
        title,
        steps: texts
            .into_iter()
            .map(|text| StepView {
                text,
                state: "pending",
            })
            .collect(),
        can_next: false,
        done: false,
        next: next.clone(),
        task: None,
    });
    sup.note("scenario", format!("scenario started: {title}"));
    let ctx = Ctx {
        sup: sup.clone(),
        cast,
        next,
        step: Default::default(),
        key: format!("demo/{}", crate::insight::now_ms() % 1_000_000),
    };
    let task = tokio::spawn(async move {
        let sup = ctx.sup.clone();
        let result = match id {
            "leader-dies-before-replicating" => before_replicating(ctx).await,
            "leader-dies-after-replicating" => after_replicating(ctx).await,
            "leader-dies-before-answering" => before_answering(ctx).await,
            _ => split_brain(ctx).await,
        };
        let text = match result {
            Ok(()) => format!("scenario finished: {title}"),
            Err(e) => format!("scenario failed: {title}: {e}"),
        };
        sup.note("scenario", text);
    });
    if let Some(r) = sup.runner.run.lock().unwrap().as_mut() {
        r.task = Some(task.abort_handle());
    }
    Ok(())
}

/// Who plays which part: the leader at the start and two others, and its term.
#[derive(Clone, Debug)]
struct Cast {
    a: String,
    b: String,
    c: String,
    term: u64,
}

impl Cast {
    fn of(sup: &Supervisor) -> Result<Cast, String> {
        let view = sup.collector().latest();
        if view.members.len() < 3 {
            return Err("the scenarios need a cluster of 3 or more members".into());
        }
        for m in &view.members {
            if sup.state(&m.name) != Some(ProcState::Running) || !m.reachable {
                return Err(format!(
                    "{} is not running: restart it, wait for a leader, then start the scenario",
                    m.name
                ));
            }
        }
        if sup.is_cut() {
            return Err("heal the network first".into());
        }
        let leader = view
            .members
            .iter()
            .find(|m| m.role == "leader")
            .ok_or("the cluster has no leader yet: wait a moment")?;
        let others: Vec<&MemberView> = view
            .members
            .iter()
            .filter(|m| m.name != leader.name)
            .collect();
        Ok(Cast {
            a: leader.name.clone(),
            b: others[0].name.clone(),
            c: others[1].name.clone(),
            term: leader.term,
        })
    }
}

fn texts(id: &str, c: &Cast) -> Vec<String> {
    let (a, b, cc, t) = (&c.a, &c.b, &c.c, c.term);
    let steps: Vec<String> = match id {
        "leader-dies-before-replicating" => vec![
            format!("{a} leads term {t}. Cut {a} off from the other members, and at once a client writes a key at {a} (session serial number 1): {a} does not know it is cut off, appends the entry, but cannot replicate it. It stays uncommitted (drawn hollow)."),
            format!("Kill {a} (kill -9): the write exists only on the dead leader's disk."),
            format!("{b} and {cc} stop hearing heartbeats. After an election timeout one campaigns, gets the other's vote and leads a new term."),
            "The client's first attempt timed out (its leader died). It retries the same write with the same serial number at the new leader: this time it commits.".to_string(),
            format!("Restart {a}. It hears of the new term and follows the new leader, whose log overwrites {a}'s uncommitted entry (its colour changes in {a}'s strip)."),
            "Read the key back: it is there once (version 1), written by the retry.".to_string(),
        ],
        "leader-dies-after-replicating" => vec![
            format!("{a} leads term {t}. Cut links one way ({b} still receives {a}'s messages but its answers are lost; {cc} is cut off from {a}), and a client writes a key at {a} (serial 1). {a} sends the entry to {b}, which stores it; {a} never hears so and cannot commit. At that moment {a} is killed: the entry is on {a} and {b}, not on {cc}."),
            format!("Heal the network. Only {b} can win the election: {cc}'s log lacks the entry, and a voter refuses a candidate whose log is behind its own (§5.4.1)."),
            "The new leader commits the entry together with the no-op of its own term (§5.4.2): the write survives, although no client heard it succeed.".to_string(),
            "The client's first attempt timed out. It retries with the same serial number: the leader has applied that serial already, so it answers with the first result and applies nothing twice.".to_string(),
            format!("Restart {a}: it rejoins as a follower and catches up."),
        ],
        "leader-dies-before-answering" => vec![
            format!("A client connects to {a}, the leader of term {t}, through a relay that will lose {a}'s answers (as a broken network can)."),
            format!("It writes a key (serial 1). {a} replicates, commits and applies the write, and answers; the answer is lost on the way."),
            format!("Kill {a} before the client hears anything."),
            format!("{b} and {cc} elect a new leader. The entry was committed, so every member that can win has it (Leader Completeness, §5.4)."),
            "The client's attempt timed out. It retries with the same serial number at the new leader, which recognises it and answers with the original revision: the write is not applied twice.".to_string(),
            format!("Restart {a}: it rejoins as a follower."),
        ],
        _ => vec![
            format!("Split the network: {a}, the leader of term {t}, alone on one side; {b} and {cc} on the other. At once a client writes a key at {a} (serial 1): {a} still believes it leads and appends the write, which can never commit."),
            format!("On the other side {b} and {cc} miss heartbeats and elect a new leader, in a higher term."),
            "Writes go on at the majority: a second key commits there.".to_string(),
            format!("{a} has heard from no majority for an election timeout: it steps down (CheckQuorum) and stops taking writes."),
            format!("Heal the network. {a} learns of the higher term, follows the new leader, and its uncommitted entry is overwritten."),
            format!("The client's write to {a} timed out; it retries with the same serial at the new leader: applied once. Both keys are in the store, once each."),
        ],
    };
    steps
}

/// A running scenario's hands and eyes.
struct Ctx {
    sup: Arc<Supervisor>,
    cast: Cast,
    next: Arc<Notify>,
    step: std::sync::atomic::AtomicUsize,
    key: String,
}

type Attempt = tokio::task::JoinHandle<Result<i64, String>>;

impl Ctx {
    /// Run the next step: wait for the user's Next (not for the first), act, report.
    async fn step<F, T>(&self, f: F) -> Result<T, String>
    where
        F: std::future::Future<Output = Result<(T, Option<String>), String>>,
    {
        let i = self.step.fetch_add(1, Ordering::SeqCst);
        if i > 0 {
            self.next.notified().await;
        }
        self.sup.runner.set(i, "running", None);
        match f.await {
            Ok((v, outcome)) => {
                self.sup.runner.set(i, "done", outcome);
                Ok(v)
            }
            Err(e) => {
                self.sup.runner.set(i, "failed", Some(e.clone()));
                Err(e)
            }
        }
    }

    fn view(&self) -> Arc<ClusterView> {
        self.sup.collector().latest()
    }

    /// Wait until `f` finds what it looks for in the latest view.
    async fn until<T>(
        &self,
        what: &str,
        f: impl Fn(&ClusterView) -> Option<T>,
    ) -> Result<T, String> {
        let deadline = Instant::now() + STEP_TIMEOUT;
        loop {
            if let Some(v) = f(&self.view()) {
                return Ok(v);
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "did not see {what} within {}s ({})",
                    STEP_TIMEOUT.as_secs(),
                    summary(&self.view())
                ));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// A leader among `among` in a term above the cast's.
    async fn new_leader(&self, among: &[&str]) -> Result<(String, u64), String> {
        let min = self.cast.term;
        self.until("a new leader", |v| {
            v.members
                .iter()
                .find(|m| {
                    m.reachable
                        && m.role == "leader"
                        && m.term > min
                        && among.contains(&m.name.as_str())
                })
                .map(|m| (m.name.clone(), m.term))
        })
        .await
    }

    fn url(&self, name: &str) -> Result<String, String> {
        self.sup
            .client_url(name)
            .ok_or_else(|| format!("no member {name}"))
    }

    async fn grant_session(&self, at: &str) -> Result<i64, String> {
        let ch = channel(&self.url(at)?)?;
        let resp = LeaseClient::new(ch)
            .lease_grant(LeaseGrantRequest { ttl: 600, id: 0 })
            .await
            .map_err(|e| format!("granting the session's lease: {}", e.message()))?;
        Ok(resp.into_inner().id)
    }

    /// Start a client's write at `url` in the background (it may never be answered).
    fn attempt(
        &self,
        ch: tonic::transport::Channel,
        key: String,
        session: Option<(i64, u64)>,
    ) -> Attempt {
        tokio::spawn(async move { put_on(ch, key, session).await })
    }

    /// How a client's first attempt ended (waiting for its deadline if need be).
    async fn first_attempt(attempt: Attempt) -> String {
        match attempt.await {
            Ok(Ok(rev)) => format!("the first attempt was answered (revision {rev})"),
            Ok(Err(e)) => format!("the first attempt failed: {e}"),
            Err(_) => "the first attempt was abandoned".into(),
        }
    }

    /// The key's (version, mod revision), read linearizably at `at`.
    async fn read(&self, at: &str, key: &str) -> Result<Option<(i64, i64)>, String> {
        let ch = channel(&self.url(at)?)?;
        let resp = KvClient::new(ch)
            .range(RangeRequest {
                key: key.as_bytes().to_vec().into(),
                ..Default::default()
            })
            .await
            .map_err(|e| format!("reading {key}: {}", e.message()))?;
        Ok(resp
            .into_inner()
            .kvs
            .first()
            .map(|kv| (kv.version, kv.mod_revision)))
    }

    /// Check the key was applied once, by the write answered at `revision`.
    async fn applied_once(&self, at: &str, key: &str, revision: i64) -> Result<String, String> {
        match self.read(at, key).await? {
            Some((1, rev)) if rev == revision => Ok(format!("{key}: version 1, revision {rev}")),
            Some((version, rev)) => Err(format!(
                "{key} has version {version} (revision {rev}); expected version 1 at revision {revision}"
            )),
            None => Err(format!("{key} is not in the store")),
        }
    }

    /// Wait for `name`'s entry `index` to be the one `leader` holds there (the repair).
    async fn repaired(
        &self,
        name: &str,
        leader: &str,
        index: u64,
        old: u64,
    ) -> Result<String, String> {
        self.until("the old entry overwritten", |v| {
            let m = v.members.iter().find(|m| m.name == name && m.reachable)?;
            let l = v.members.iter().find(|m| m.name == leader && m.reachable)?;
            let mine = m.log.iter().find(|e| e.index == index)?.term;
            let theirs = l.log.iter().find(|e| e.index == index)?.term;
            (mine == theirs && mine != old).then(|| {
                format!("{name}'s entry {index}: term {old} → term {mine}, as on {leader}")
            })
        })
        .await
    }

    /// Cut `a` off and, at once, write `key` there (serial 1 of `session`): within an
    /// election timeout a cut-off leader steps down (CheckQuorum) and would refuse it. The
    /// client's attempt and the index of the entry only `a` holds.
    async fn isolate_and_write(
        &self,
        a: &str,
        key: &str,
        session: i64,
    ) -> Result<((Attempt, u64), Option<String>), String> {
        let ch = channel(&self.url(a)?)?;
        let quiet = self.quiet().await?;
        self.sup.isolate(a).await?;
        let attempt = self.attempt(ch, key.to_string(), Some((session, 1)));
        let names = self.sup.names();
        let others: Vec<&str> = names
            .iter()
            .map(String::as_str)
            .filter(|m| *m != a)
            .collect();
        let held = self.held_now(&others).await?;
        let (i, t) = self.uncommitted_on(a, quiet.max(held)).await?;
        let v = self.view();
        if let Some(m) = v
            .members
            .iter()
            .find(|m| m.name != a && m.log.iter().any(|e| e.index == i && e.term == t))
        {
            return Err(format!(
                "entry {i} (term {t}) reached {} through the cut",
                m.name
            ));
        }
        Ok((
            (attempt, i),
            Some(format!("entry {i} (term {t}) is only in {a}'s log")),
        ))
    }

    /// The last index once every member holds it committed: writes still in flight (the
    /// load's, just stopped) must not be taken for the scenario's own.
    async fn quiet(&self) -> Result<u64, String> {
        self.until("the cluster quiet", |v| {
            let last = v.members.first()?.last_index;
            v.members
                .iter()
                .all(|m| m.reachable && m.last_index == last && m.commit == last)
                .then_some(last)
        })
        .await
    }

    /// The highest last index among `names`, as they answer now. Asked once a cut has
    /// taken, it bounds what they got from a member cut off from them: an entry that
    /// member appended past it is one the cut kept to itself (not one proposed just
    /// before the cut, already sent).
    async fn held_now(&self, names: &[&str]) -> Result<u64, String> {
        let mut held = 0;
        for name in names {
            held = held.max(self.sup.state_now(name).await?.last_index);
        }
        Ok(held)
    }

    /// `name`'s last entry, once it is past `after` and uncommitted there.
    async fn uncommitted_on(&self, name: &str, after: u64) -> Result<(u64, u64), String> {
        self.until("an uncommitted entry", |v| {
            let m = v.members.iter().find(|m| m.name == name && m.reachable)?;
            let last = m.log.last()?;
            (last.index > after && m.last_index > m.commit).then_some((last.index, last.term))
        })
        .await
    }

    async fn follows(&self, name: &str, term: u64) -> Result<String, String> {
        self.until("the member back as a follower", |v| {
            let m = v.members.iter().find(|m| m.name == name && m.reachable)?;
            (m.role == "follower" && m.term >= term && m.leader.is_some()).then(|| {
                format!(
                    "{name} follows {} in term {}",
                    m.leader.clone().unwrap_or_default(),
                    m.term
                )
            })
        })
        .await
    }
}

/// What each member showed when a step gave up: enough to tell a slow cluster from a stuck
/// one (role, term, leader, indexes, its last entries, its cuts).
fn summary(v: &ClusterView) -> String {
    v.members
        .iter()
        .map(|m| {
            let tail: Vec<String> = m
                .log
                .iter()
                .rev()
                .take(4)
                .rev()
                .map(|e| format!("{}:{}", e.index, e.term))
                .collect();
            format!(
                "{} {}{} term {} leader {} last {} commit {} log [{}] cut from {:?}",
                m.name,
                m.role,
                if m.reachable { "" } else { " (unreachable)" },
                m.term,
                m.leader.as_deref().unwrap_or("none"),
                m.last_index,
                m.commit,
                tail.join(" "),
                m.cut_from
            )
        })
        .collect::<Vec<_>>()
        .join("; ")
}

fn channel(url: &str) -> Result<tonic::transport::Channel, String> {
    let e = Endpoint::from_shared(url.to_string())
        .map_err(|e| format!("{url}: {e}"))?
        .connect_timeout(Duration::from_secs(1));
    Ok(crate::tls::client_dialer().connect_lazy(e))
}

/// A put, tagged with a session and serial number if given; the revision it got.
async fn put(url: &str, key: String, session: Option<(i64, u64)>) -> Result<i64, String> {
    put_on(channel(url)?, key, session).await
}

async fn put_on(
    ch: tonic::transport::Channel,
    key: String,
    session: Option<(i64, u64)>,
) -> Result<i64, String> {
    let mut req = tonic::Request::new(PutRequest {
        key: key.into_bytes().into(),
        value: bytes::Bytes::from_static(b"written by a scenario"),
        ..Default::default()
    });
    req.set_timeout(CLIENT_DEADLINE);
    if let Some((lease, seq)) = session {
        let md = req.metadata_mut();
        md.insert(
            crate::grpc::SESSION,
            lease.to_string().parse().expect("digits"),
        );
        md.insert(crate::grpc::SEQ, seq.to_string().parse().expect("digits"));
    }
    let resp = KvClient::new(ch)
        .put(req)
        .await
        .map_err(|e| e.message().to_string())?;
    Ok(resp.into_inner().header.map_or(0, |h| h.revision))
}

async fn before_replicating(ctx: Ctx) -> Result<(), String> {
    let Cast { a, b, c, term } = ctx.cast.clone();
    let key = ctx.key.clone();
    let session = ctx.grant_session(&a).await?;
    let sup = ctx.sup.clone();
    // Cut and write at once: within an election timeout the cut-off leader steps down
    // (CheckQuorum) and would refuse the write.
    let (attempt, index) = ctx.step(ctx.isolate_and_write(&a, &key, session)).await?;
    ctx.step(async { sup.kill(&a).map(|_| ((), None)) }).await?;
    let (leader, new_term) = ctx
        .step(async {
            sup.heal().await?;
            let (l, t) = ctx.new_leader(&[&b, &c]).await?;
            Ok(((l.clone(), t), Some(format!("{l} leads term {t}"))))
        })
        .await?;
    let revision = ctx
        .step(async {
            let first = Ctx::first_attempt(attempt).await;
            let rev = put(&ctx.url(&leader)?, key.clone(), Some((session, 1))).await?;
            Ok((
                rev,
                Some(format!("{first}; the retry applied at revision {rev}")),
            ))
        })
        .await?;
    ctx.step(async {
        sup.restart(&a).await?;
        ctx.follows(&a, new_term).await?;
        let r = ctx.repaired(&a, &leader, index, term).await?;
        Ok(((), Some(r)))
    })
    .await?;
    ctx.step(async {
        let r = ctx.applied_once(&leader, &key, revision).await?;
        Ok(((), Some(r)))
    })
    .await
}

async fn after_replicating(ctx: Ctx) -> Result<(), String> {
    let Cast { a, b, c, term } = ctx.cast.clone();
    let key = ctx.key.clone();
    let session = ctx.grant_session(&a).await?;
    let sup = ctx.sup.clone();
    // One step: a leader that hears no answers steps down within an election timeout
    // (CheckQuorum), and then its follower would campaign on its own.
    let (attempt, index) = ctx
        .step(async {
            let ch = channel(&ctx.url(&a)?)?;
            let quiet = ctx.quiet().await?;
            sup.cut_directed(&[(&b, &a), (&a, &c), (&c, &a)]).await?;
            let attempt = ctx.attempt(ch, key.clone(), Some((session, 1)));
            let held = ctx.held_now(&[&c]).await?;
            let (i, t) = ctx.uncommitted_on(&a, quiet.max(held)).await?;
            ctx.until("the entry on the follower", |v| {
                let m = v.members.iter().find(|m| m.name == b)?;
                m.log
                    .iter()
                    .any(|e| e.index == i && e.term == t)
                    .then_some(())
            })
            .await?;
            sup.kill(&a)?;
            let seen = format!("entry {i} (term {t}) is on {a} and {b}, uncommitted; {a} killed");
            Ok(((attempt, i), Some(seen)))
        })
        .await?;
    let (leader, new_term) = ctx
        .step(async {
            sup.heal().await?;
            let (l, t) = ctx.new_leader(&[&b, &c]).await?;
            if l != b {
                return Err(format!("{l} won, but its log lacked entry {index}"));
            }
            Ok(((l.clone(), t), Some(format!("{l} leads term {t}"))))
        })
        .await?;
    ctx.step(async {
        let commit = ctx
            .until("the entry committed", |v| {
                let m = v.members.iter().find(|m| m.name == leader)?;
                let t = m.log.iter().find(|e| e.index == index)?.term;
                (m.commit >= index && t == term).then_some(m.commit)
            })
            .await?;
        Ok((
            (),
            Some(format!(
                "entry {index} kept its term {term}; commit index {commit}"
            )),
        ))
    })
    .await?;
    ctx.step(async {
        let first = Ctx::first_attempt(attempt).await;
        let rev = put(&ctx.url(&leader)?, key.clone(), Some((session, 1))).await?;
        let once = ctx.applied_once(&leader, &key, rev).await?;
        Ok((
            (),
            Some(format!("{first}; the retry got revision {rev}; {once}")),
        ))
    })
    .await?;
    ctx.step(async {
        sup.restart(&a).await?;
        Ok(((), Some(ctx.follows(&a, new_term).await?)))
    })
    .await
}

async fn before_answering(ctx: Ctx) -> Result<(), String> {
    let Cast { a, b, c, .. } = ctx.cast.clone();
    let key = ctx.key.clone();
    let session = ctx.grant_session(&a).await?;
    let sup = ctx.sup.clone();
    let (relay, ch) = ctx
        .step(async {
            let r = Relay::start(&ctx.url(&a)?).await?;
            // The client's connection opens (TLS, HTTP/2 settings) before answers are lost.
            let ch = channel(&r.url())?;
            KvClient::new(ch.clone())
                .range(RangeRequest {
                    key: key.clone().into_bytes().into(),
                    ..Default::default()
                })
                .await
                .map_err(|e| format!("through the relay: {}", e.message()))?;
            r.lose.store(true, Ordering::Relaxed);
            Ok(((r, ch), None))
        })
        .await?;
    let attempt = ctx
        .step(async {
            let before = ctx.quiet().await?;
            let attempt = ctx.attempt(ch, key.clone(), Some((session, 1)));
            let index = ctx
                .until("the write applied everywhere", |v| {
                    let m = v.members.iter().find(|m| m.name == a)?;
                    let all = v.members.iter().all(|o| o.commit > before);
                    (m.applied > before && all).then_some(m.applied)
                })
                .await?;
            let seen = format!("applied at index {index}; committed on every member");
            Ok((attempt, Some(seen)))
        })
        .await?;
    ctx.step(async { sup.kill(&a).map(|_| ((), None)) }).await?;
    let (leader, new_term) = ctx
        .step(async {
            let (l, t) = ctx.new_leader(&[&b, &c]).await?;
            Ok(((l.clone(), t), Some(format!("{l} leads term {t}"))))
        })
        .await?;
    ctx.step(async {
        let first = Ctx::first_attempt(attempt).await;
        let rev = put(&ctx.url(&leader)?, key.clone(), Some((session, 1))).await?;
        let once = ctx.applied_once(&leader, &key, rev).await?;
        Ok((
            (),
            Some(format!("{first}; the retry got revision {rev}; {once}")),
        ))
    })
    .await?;
    drop(relay);
    ctx.step(async {
        sup.restart(&a).await?;
        Ok(((), Some(ctx.follows(&a, new_term).await?)))
    })
    .await
}

async fn split_brain(ctx: Ctx) -> Result<(), String> {
    let Cast { a, b, c, term } = ctx.cast.clone();
    let key = ctx.key.clone();
    let key2 = format!("{key}-majority");
    let session = ctx.grant_session(&a).await?;
    let sup = ctx.sup.clone();
    let (attempt, index) = ctx.step(ctx.isolate_and_write(&a, &key, session)).await?;
    let leader = ctx
        .step(async {
            let (l, t) = ctx.new_leader(&[&b, &c]).await?;
            Ok((l.clone(), Some(format!("{l} leads term {t}"))))
        })
        .await?;
    ctx.step(async {
        let rev = put(&ctx.url(&leader)?, key2.clone(), None).await?;
        Ok(((), Some(format!("{key2} committed at revision {rev}"))))
    })
    .await?;
    ctx.step(async {
        let r = ctx
            .until("the old leader stepping down", |v| {
                let m = v.members.iter().find(|m| m.name == a && m.reachable)?;
                (m.role != "leader").then(|| format!("{a} is a {} of term {}", m.role, m.term))
            })
            .await?;
        Ok(((), Some(r)))
    })
    .await?;
    ctx.step(async {
        sup.heal().await?;
        Ok(((), Some(ctx.repaired(&a, &leader, index, term).await?)))
    })
    .await?;
    ctx.step(async {
        let first = Ctx::first_attempt(attempt).await;
        let rev = put(&ctx.url(&leader)?, key.clone(), Some((session, 1))).await?;
        let once = ctx.applied_once(&leader, &key, rev).await?;
        match ctx.read(&leader, &key2).await? {
            Some((1, _)) => {}
            other => return Err(format!("{key2}: expected version 1, found {other:?}")),
        }
        Ok((
            (),
            Some(format!("{first}; the retry got revision {rev}; {once}")),
        ))
    })
    .await
}

/// A TCP relay to a member's client port that can lose the member's answers: the
/// requests go through, the bytes coming back are dropped.
struct Relay {
    addr: std::net::SocketAddr,
    scheme: &'static str,
    lose: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

impl Relay {
    async fn start(target: &str) -> Result<Relay, String> {
        let uri: http::Uri = target.parse().map_err(|e| format!("{target}: {e}"))?;
        let scheme = if uri.scheme_str() == Some("https") {
            "https"
        } else {
            "http"
        };
        let upstream = uri
            .authority()
            .ok_or_else(|| format!("{target} has no address"))?
            .to_string();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .map_err(|e| format!("relay: {e}"))?;
        let addr = listener.local_addr().map_err(|e| e.to_string())?;
        let lose = Arc::new(AtomicBool::new(false));
        let lose2 = lose.clone();
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let upstream = upstream.clone();
                let lose = lose2.clone();
                tokio::spawn(async move {
                    let Ok(server) = tokio::net::TcpStream::connect(&upstream).await else {
                        return;
                    };
                    let (mut cr, mut cw) = client.into_split();
                    let (mut sr, mut sw) = server.into_split();
                    let up = tokio::io::copy(&mut cr, &mut sw);
                    let down = async {
                        use tokio::io::{AsyncReadExt, AsyncWriteExt};
                        let mut buf = vec![0u8; 16 * 1024];
                        loop {
                            let n = match sr.read(&mut buf).await {
                                Ok(0) | Err(_) => break,
                                Ok(n) => n,
                            };
                            if !lose.load(Ordering::Relaxed)
                                && cw.write_all(&buf[..n]).await.is_err()
                            {
                                break;
                            }
                        }
                    };
                    tokio::select! {
                        _ = up => {}
                        _ = down => {}
                    }
                });
            }
        });
        Ok(Relay {
            addr,
            scheme,
            lose,
            task,
        })
    }

    fn url(&self) -> String {
        format!("{}://{}", self.scheme, self.addr)
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.task.abort();
    }
}
