//! Guided scenarios: the failure cases every Raft explainer draws, played on the real
//! processes, a step at a time with a sentence each. Each step acts (cut a link, write,
//! kill), then waits until the cluster shows what the sentence says — a new leader, an
//! entry overwritten, a retried write answered once — and reports what it saw. A step that
//! does not see it in time fails the scenario, saying what it waited for.
//!
//! The scenarios start from a healthy cluster: every member running, a leader, no cuts.
//! "A" is the leader at the start, "B" and "C" two of the others.

use super::supervisor::{ProcState, Supervisor};
use server::operations::dashboard::collect::{ClusterView, MemberView, ScenarioView, StepView};
use server::pb::etcdserverpb::{
    kv_client::KvClient, lease_client::LeaseClient, LeaseGrantRequest, PutRequest, RangeRequest,
};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::Notify;
use tonic::transport::Endpoint;

mod ctx;
mod plays;

use ctx::*;
use plays::*;

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
        key: format!("demo/{}", server::operations::insight::now_ms() % 1_000_000),
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
