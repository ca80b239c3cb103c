//! `raftkv cluster`'s side of the dashboard: it owns the members' processes, so the page
//! can kill (-9), pause (SIGSTOP), resume and restart them, cut and heal the network
//! between them, run a write load, and walk through the scenarios of `scenario/`.
//!
//! The network switch needs no root: every member runs with `--supervised`, reading
//! `cut from=… to=…` lines on its stdin (a pipe only this process holds), and drops the
//! Raft messages of the links named there (`insight::Links`). Cuts are directed, and both
//! ends of a cut link enforce it, so a member restarted behind a cut stays behind it.

use super::load::Load;
use super::scenario::{self, Runner};
use axum::extract::Path;
use axum::http::StatusCode;
use axum::routing::post;
use server::operations::dashboard::collect::{Collector, Extras, ScenarioInfo, Source, Target};
use server::operations::insight::{self, Chronicle, Cut};
use std::collections::{BTreeSet, HashMap, HashSet};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use tokio::io::AsyncWriteExt;

/// How long a running member may take to report a new network switch.
const CUT_TAKEN: std::time::Duration = std::time::Duration::from_secs(2);

/// One member as the supervisor starts it.
#[derive(Clone, Debug)]
pub struct MemberSpec {
    pub name: String,
    /// Arguments after the program (`serve …`).
    pub args: Vec<String>,
    pub log: PathBuf,
    /// Where clients reach it (the load, the scenarios' clients).
    pub client_url: String,
    /// Where `/dashboard/state` is polled.
    pub poll_url: String,
}

/// What became of a member's process.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProcState {
    Running,
    Paused,
    Killed,
    Exited,
}

impl ProcState {
    fn name(self) -> &'static str {
        match self {
            ProcState::Running => "running",
            ProcState::Paused => "paused",
            ProcState::Killed => "killed",
            ProcState::Exited => "exited",
        }
    }
}

struct Proc {
    pid: Option<u32>,
    state: ProcState,
    /// Bumped at each start, so that the reaper of an earlier process does not mark the
    /// new one exited.
    generation: u64,
    stdin: Option<Arc<tokio::sync::Mutex<tokio::process::ChildStdin>>>,
}

pub struct Supervisor {
    exe: PathBuf,
    specs: Vec<MemberSpec>,
    procs: Mutex<Vec<Proc>>,
    /// Cut links, directed: (from, to) by member name.
    blocked: Mutex<BTreeSet<(String, String)>>,
    chronicle: Mutex<Chronicle>,
    collector: std::sync::OnceLock<Arc<Collector>>,
    pub(super) load: Arc<Load>,
    pub(super) runner: Runner,
    /// Told when a member's process exits by itself (the command line reports it).
    exits: tokio::sync::mpsc::UnboundedSender<(String, std::process::ExitStatus)>,
}

/// The supervisor as the collector sees it.
struct SupervisorSource(Arc<Supervisor>);

impl Supervisor {
    /// Start every member and the collector. Exits of members (not killed from the page)
    /// arrive on the returned receiver.
    pub async fn start(
        exe: PathBuf,
        specs: Vec<MemberSpec>,
    ) -> Result<
        (
            Arc<Supervisor>,
            tokio::sync::mpsc::UnboundedReceiver<(String, std::process::ExitStatus)>,
        ),
        String,
    > {
        let (exits, exits_rx) = tokio::sync::mpsc::unbounded_channel();
        let procs = specs
            .iter()
            .map(|_| Proc {
                pid: None,
                state: ProcState::Exited,
                generation: 0,
                stdin: None,
            })
            .collect();
        let s = Arc::new(Supervisor {
            exe,
            specs,
            procs: Mutex::new(procs),
            blocked: Mutex::new(BTreeSet::new()),
            chronicle: Mutex::new(Chronicle::default()),
            collector: std::sync::OnceLock::new(),
            load: Arc::new(Load::default()),
            runner: Runner::default(),
            exits,
        });
        for i in 0..s.specs.len() {
            s.spawn(i).await?;
        }
        let collector = Collector::start(Arc::new(SupervisorSource(s.clone())));
        let _ = s.collector.set(collector);
        Ok((s, exits_rx))
    }

    pub fn collector(&self) -> Arc<Collector> {
        self.collector.get().expect("set at start").clone()
    }

    pub fn names(&self) -> Vec<String> {
        self.specs.iter().map(|s| s.name.clone()).collect()
    }

    pub fn client_url(&self, name: &str) -> Option<String> {
        self.specs
            .iter()
            .find(|s| s.name == name)
            .map(|s| s.client_url.clone())
    }

    pub fn client_urls(&self) -> Vec<String> {
        self.specs.iter().map(|s| s.client_url.clone()).collect()
    }

    pub(super) fn note(&self, kind: &'static str, text: String) {
        tracing::info!("dashboard: {text}");
        self.chronicle.lock().unwrap().push(kind, text);
    }

    fn index(&self, name: &str) -> Result<usize, String> {
        self.specs
            .iter()
            .position(|s| s.name == name)
            .ok_or_else(|| format!("no member named {name:?}"))
    }

    pub fn state(&self, name: &str) -> Option<ProcState> {
        let i = self.index(name).ok()?;
        Some(self.procs.lock().unwrap()[i].state)
    }

    async fn spawn(self: &Arc<Self>, i: usize) -> Result<(), String> {
        let spec = &self.specs[i];
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&spec.log)
            .map_err(|e| format!("{}: {e}", spec.log.display()))?;
        let mut cmd = tokio::process::Command::new(&self.exe);
        cmd.args(&spec.args).arg("--supervised");
        // The members' flags are all on their command lines: an ETCD_* variable exported
        // for a member started by hand (ETCD_INITIAL_CLUSTER_STATE=existing, say) must not
        // reach them.
        for (k, _) in std::env::vars_os() {
            if k.to_string_lossy().starts_with("ETCD_") {
                cmd.env_remove(k);
            }
        }
        let mut child = cmd
            .stdin(std::process::Stdio::piped())
            .stdout(log.try_clone().map_err(|e| e.to_string())?)
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| format!("starting member {}: {e}", spec.name))?;
        let stdin = child
            .stdin
            .take()
            .map(|s| Arc::new(tokio::sync::Mutex::new(s)));
        let generation = {
            let mut procs = self.procs.lock().unwrap();
            let p = &mut procs[i];
            p.generation += 1;
            p.pid = child.id();
            p.state = ProcState::Running;
            p.stdin = stdin;
            p.generation
        };
        let me = self.clone();
        tokio::spawn(async move {
            let status = child.wait().await;
            let mut procs = me.procs.lock().unwrap();
            let p = &mut procs[i];
            if p.generation != generation {
                return;
            }
            p.pid = None;
            p.stdin = None;
            if p.state != ProcState::Killed {
                p.state = ProcState::Exited;
                if let Ok(status) = status {
                    let _ = me.exits.send((me.specs[i].name.clone(), status));
                }
            }
        });
        // A member started behind a cut is told at once.
        self.push_cuts_to(i).await;
        Ok(())
    }

    fn signal(&self, i: usize, sig: libc::c_int) -> Result<(), String> {
        let procs = self.procs.lock().unwrap();
        let pid = procs[i]
            .pid
            .ok_or_else(|| format!("{} is not running", self.specs[i].name))?;
        // SAFETY: signalling a child process we started has no memory effects.
        if unsafe { libc::kill(pid as libc::pid_t, sig) } != 0 {
            return Err(format!(
                "signal {sig} to {}: {}",
                self.specs[i].name,
                std::io::Error::last_os_error()
            ));
        }
        Ok(())
    }

    /// kill -9.
    pub fn kill(&self, name: &str) -> Result<(), String> {
        let i = self.index(name)?;
        self.signal(i, libc::SIGKILL)?;
        self.procs.lock().unwrap()[i].state = ProcState::Killed;
        self.note("fault", format!("{name} killed (kill -9)"));
        Ok(())
    }

    pub fn pause(&self, name: &str) -> Result<(), String> {
        let i = self.index(name)?;
        if self.procs.lock().unwrap()[i].state != ProcState::Running {
            return Err(format!("{name} is not running"));
        }
        self.signal(i, libc::SIGSTOP)?;
        self.procs.lock().unwrap()[i].state = ProcState::Paused;
        self.note("fault", format!("{name} paused (SIGSTOP)"));
        Ok(())
    }

    pub fn resume(&self, name: &str) -> Result<(), String> {
        let i = self.index(name)?;
        if self.procs.lock().unwrap()[i].state != ProcState::Paused {
            return Err(format!("{name} is not paused"));
        }
        self.signal(i, libc::SIGCONT)?;
        self.procs.lock().unwrap()[i].state = ProcState::Running;
        self.note("fault", format!("{name} resumed (SIGCONT)"));
        Ok(())
    }

    /// Start a member that is not running (killed or exited); a paused one is resumed
    /// first and then killed and started again.
    pub async fn restart(self: &Arc<Self>, name: &str) -> Result<(), String> {
        let i = self.index(name)?;
        let state = self.procs.lock().unwrap()[i].state;
        if matches!(state, ProcState::Running | ProcState::Paused) {
            self.signal(i, libc::SIGKILL)?;
            self.procs.lock().unwrap()[i].state = ProcState::Killed;
            // Its ports are free once it is gone.
            for _ in 0..100 {
                if self.procs.lock().unwrap()[i].pid.is_none() {
                    break;
                }
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            }
        }
        self.spawn(i).await?;
        self.note("fault", format!("{name} restarted"));
        Ok(())
    }

    /// Cut the links between `a` and `b`, both ways.
    pub async fn cut(&self, a: &str, b: &str) -> Result<(), String> {
        self.cut_directed(&[(a, b), (b, a)]).await?;
        self.note("fault", format!("network cut between {a} and {b}"));
        Ok(())
    }

    /// Cut `name` off from every other member.
    pub async fn isolate(&self, name: &str) -> Result<(), String> {
        self.index(name)?;
        let mut pairs = Vec::new();
        for other in self.specs.iter().map(|s| s.name.as_str()) {
            if other != name {
                pairs.push((name, other));
                pairs.push((other, name));
            }
        }
        self.cut_directed(&pairs).await?;
        self.note("fault", format!("{name} cut off from every other member"));
        Ok(())
    }

    /// Cut these directed links (messages from .0 to .1 are lost), keeping earlier cuts.
    pub async fn cut_directed(&self, pairs: &[(&str, &str)]) -> Result<(), String> {
        for (a, b) in pairs {
            self.index(a)?;
            self.index(b)?;
            if a == b {
                return Err("a member has no link to itself".into());
            }
        }
        {
            let mut blocked = self.blocked.lock().unwrap();
            for (a, b) in pairs {
                blocked.insert((a.to_string(), b.to_string()));
            }
        }
        self.push_cuts().await
    }

    pub async fn heal(&self) -> Result<(), String> {
        self.blocked.lock().unwrap().clear();
        self.push_cuts().await?;
        self.note("fault", "network healed".into());
        Ok(())
    }

    pub fn is_cut(&self) -> bool {
        !self.blocked.lock().unwrap().is_empty()
    }

    /// Tell every member its cuts, and return once every running member has taken them.
    ///
    /// The switch is a line on each member's stdin, read beside its peer traffic: without
    /// waiting, a write sent right after a cut could still leave on a link being cut (or be
    /// heard by a member that has not read its line yet), reaching a follower the scenario
    /// says it cannot reach.
    async fn push_cuts(&self) -> Result<(), String> {
        let ids = self.ids()?;
        let mut wanted = Vec::new();
        for i in 0..self.specs.len() {
            wanted.push((i, self.push_cuts_with(i, &ids).await));
        }
        for (i, cut) in wanted {
            if self.procs.lock().unwrap()[i].state == ProcState::Running {
                self.await_cut(i, &cut).await?;
            }
        }
        Ok(())
    }

    /// `name`'s state as it answers now, without its events (the collector's latest view
    /// may be a poll old).
    pub async fn state_now(&self, name: &str) -> Result<insight::MemberState, String> {
        let spec = &self.specs[self.index(name)?];
        let target = server::operations::dashboard::collect::Target {
            name: spec.name.clone(),
            url: spec.client_url.clone(),
        };
        server::operations::dashboard::collect::poll(target, u64::MAX).await
    }

    /// Wait until member `i` reports `cut` as its switch (a paused member reads it later).
    async fn await_cut(&self, i: usize, cut: &Cut) -> Result<(), String> {
        let spec = &self.specs[i];
        let hexes = |ids: &HashSet<u64>| ids.iter().map(|id| insight::hex(*id)).collect();
        let (from, to): (HashSet<String>, HashSet<String>) = (hexes(&cut.from), hexes(&cut.to));
        let deadline = std::time::Instant::now() + CUT_TAKEN;
        loop {
            if let Ok(s) = self.state_now(&spec.name).await {
                if HashSet::from_iter(s.cut_from) == from && HashSet::from_iter(s.cut_to) == to {
                    return Ok(());
                }
            }
            if std::time::Instant::now() > deadline {
                return Err(format!(
                    "{} did not take its network switch within {}s",
                    spec.name,
                    CUT_TAKEN.as_secs()
                ));
            }
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
    }

    async fn push_cuts_to(&self, i: usize) {
        if !self.is_cut() {
            return;
        }
        if let Ok(ids) = self.ids() {
            self.push_cuts_with(i, &ids).await;
        }
    }

    /// Write member `i` its cuts; the cuts written.
    async fn push_cuts_with(&self, i: usize, ids: &HashMap<String, u64>) -> Cut {
        let me = &self.specs[i].name;
        let mut cut = Cut::default();
        for (from, to) in self.blocked.lock().unwrap().iter() {
            if to == me {
                cut.from.extend(ids.get(from));
            }
            if from == me {
                cut.to.extend(ids.get(to));
            }
        }
        let stdin = self.procs.lock().unwrap()[i].stdin.clone();
        if let Some(stdin) = stdin {
            let line = insight::cut_line(&cut);
            // A paused member reads it when it resumes (the pipe holds it meanwhile).
            let _ = stdin.lock().await.write_all(line.as_bytes()).await;
        }
        cut
    }

    /// Every member's id, as the collector learned them (cuts are by id).
    fn ids(&self) -> Result<HashMap<String, u64>, String> {
        let c = self
            .collector
            .get()
            .ok_or("the members have not reported yet")?;
        let mut ids = HashMap::new();
        for s in &self.specs {
            let id = c
                .id_of(&s.name)
                .and_then(|h| u64::from_str_radix(&h, 16).ok())
                .ok_or_else(|| {
                    format!(
                        "{} has not reported its id yet; try again in a moment",
                        s.name
                    )
                })?;
            ids.insert(s.name.clone(), id);
        }
        Ok(ids)
    }

    pub fn start_load(&self) -> Result<(), String> {
        if !self.load.start(self.client_urls()) {
            return Err("the load is running already".into());
        }
        self.note("load", "write load started".into());
        Ok(())
    }

    pub fn stop_load(&self) {
        if self.load.running() {
            self.load.stop();
            self.note("load", "write load stopped".into());
        }
    }

    /// Stop every member (SIGTERM, then SIGKILL after `grace`).
    pub async fn stop_all(&self, grace: std::time::Duration) {
        self.load.stop();
        let pids: Vec<u32> = {
            let procs = self.procs.lock().unwrap();
            procs.iter().filter_map(|p| p.pid).collect()
        };
        for pid in &pids {
            // SAFETY: as in `signal`; SIGCONT first, so a paused member can act on SIGTERM.
            unsafe {
                libc::kill(*pid as libc::pid_t, libc::SIGCONT);
                libc::kill(*pid as libc::pid_t, libc::SIGTERM);
            }
        }
        let deadline = std::time::Instant::now() + grace;
        while std::time::Instant::now() < deadline {
            if self.procs.lock().unwrap().iter().all(|p| p.pid.is_none()) {
                return;
            }
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
        for pid in self.procs.lock().unwrap().iter().filter_map(|p| p.pid) {
            // SAFETY: as above.
            unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
        }
    }

    /// The page, its feed and the controls, behind `controls`' checks (`guard.rs`).
    pub fn router(self: &Arc<Self>, controls: Arc<super::guard::Controls>) -> axum::Router {
        let s = self.clone();
        let member = move |Path((name, action)): Path<(String, String)>| {
            let s = s.clone();
            async move {
                let r = match action.as_str() {
                    "kill" => s.kill(&name),
                    "pause" => s.pause(&name),
                    "resume" => s.resume(&name),
                    "restart" => s.restart(&name).await,
                    "isolate" => s.isolate(&name).await,
                    _ => Err(format!("unknown action {action:?}")),
                };
                answer(r)
            }
        };
        let s2 = self.clone();
        let cut = move |Path((a, b)): Path<(String, String)>| {
            let s = s2.clone();
            async move { answer(s.cut(&a, &b).await) }
        };
        let s3 = self.clone();
        let heal = move || {
            let s = s3.clone();
            async move { answer(s.heal().await) }
        };
        let s4 = self.clone();
        let load = move |Path(what): Path<String>| {
            let s = s4.clone();
            async move {
                answer(match what.as_str() {
                    "start" => s.start_load(),
                    "stop" => {
                        s.stop_load();
                        Ok(())
                    }
                    _ => Err(format!("unknown load action {what:?}")),
                })
            }
        };
        let s5 = self.clone();
        let start = move |Path(id): Path<String>| {
            let s = s5.clone();
            async move { answer(scenario::start(&s, &id)) }
        };
        let s6 = self.clone();
        let next = move || {
            let s = s6.clone();
            async move { answer(s.runner.next()) }
        };
        let s7 = self.clone();
        let stop = move || {
            let s = s7.clone();
            async move {
                s.runner.stop();
                answer(Ok(()))
            }
        };
        axum::Router::new()
            .route("/dashboard/api/member/{name}/{action}", post(member))
            .route("/dashboard/api/cut/{a}/{b}", post(cut))
            .route("/dashboard/api/heal", post(heal))
            .route("/dashboard/api/load/{what}", post(load))
            .route("/dashboard/api/scenario/{id}/start", post(start))
            .route("/dashboard/api/scenario/next", post(next))
            .route("/dashboard/api/scenario/stop", post(stop))
            .merge(server::operations::dashboard::page_routes(self.collector()))
            .route(
                "/",
                axum::routing::get(|| async { axum::response::Redirect::temporary("/dashboard/") }),
            )
            .layer(axum::middleware::from_fn_with_state(
                controls,
                super::guard::enforce,
            ))
    }
}

fn answer(r: Result<(), String>) -> (StatusCode, String) {
    match r {
        Ok(()) => (StatusCode::OK, "ok".into()),
        Err(e) => (StatusCode::CONFLICT, e),
    }
}

impl Source for SupervisorSource {
    fn targets(&self) -> Vec<Target> {
        self.0
            .specs
            .iter()
            .map(|s| Target {
                name: s.name.clone(),
                url: s.poll_url.clone(),
            })
            .collect()
    }

    fn extras(&self, since: u64) -> Extras {
        let s = &self.0;
        let processes = {
            let procs = s.procs.lock().unwrap();
            s.specs
                .iter()
                .zip(procs.iter())
                .map(|(spec, p)| (spec.name.clone(), p.state.name()))
                .collect()
        };
        let (events, next_event) = s.chronicle.lock().unwrap().since(since);
        Extras {
            controls: true,
            processes,
            load: Some(s.load.view()),
            scenarios: scenario::ALL
                .iter()
                .map(|(id, title)| ScenarioInfo { id, title })
                .collect(),
            scenario: s.runner.view(),
            events,
            next_event,
        }
    }

    fn busy(&self) -> bool {
        self.0.load.running() || self.0.runner.active() || self.0.is_cut()
    }
}
