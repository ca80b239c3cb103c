//! The dashboard's controls and guided scenarios, driven through its HTTP API against a
//! real `raftkv cluster` (the browser test in `compat/` drives the page itself).
//!
//! Each scenario checks what its sentences claim as it runs (an entry only on the old
//! leader, that entry overwritten after the restart, a retried write applied once at the
//! original revision); a step that does not see it fails the scenario, and this test with
//! it, printing every step.

mod common;

use common::free_port;
use serde_json::Value;
use server::operations::dashboard::http::{get, post_with_token};
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        // SIGINT: `raftkv cluster` stops its members before it exits.
        unsafe { libc::kill(self.0.id() as i32, libc::SIGINT) };
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.0.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.0.kill();
    }
}

/// The run's token, from the dashboard URL `raftkv cluster` printed.
static TOKEN: std::sync::OnceLock<String> = std::sync::OnceLock::new();

/// POST to a control as the page does: with the token.
async fn post(url: &str, path: &str) -> Result<Vec<u8>, String> {
    let token = TOKEN.get().expect("the cluster printed its token");
    post_with_token(url, path, token).await
}

/// `raftkv cluster` on a free block of ports; its dashboard's base URL (its token saved).
fn start(dir: &std::path::Path) -> (Running, String, u16) {
    let base = loop {
        let b = free_port();
        if b < 31_000
            && (0..3).all(|i| {
                (0..2).all(|p| std::net::TcpListener::bind(("127.0.0.1", b + 10 * i + p)).is_ok())
            })
        {
            break b;
        }
    };
    let mut child = Command::new(env!("CARGO_BIN_EXE_raftkv"))
        .args(["cluster", "--base-port", &base.to_string()])
        .args(["--dashboard-port", "0", "--data-dir"])
        .arg(dir.join("data"))
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let url = lines
        .by_ref()
        .map_while(Result::ok)
        .find_map(|l| {
            let rest = l.strip_prefix("Dashboard")?;
            let url = rest[rest.find("http://")?..].trim();
            let (base, token) = url.split_once("/dashboard/#token=")?;
            let _ = TOKEN.set(token.to_string());
            Some(base.to_string())
        })
        .expect("raftkv cluster prints its dashboard's URL, with the token");
    std::thread::spawn(move || lines.for_each(drop));
    (Running(child), url, base)
}

async fn view(url: &str) -> Value {
    let body = get(url, "/dashboard/view")
        .await
        .expect("GET /dashboard/view");
    serde_json::from_slice(&body).expect("the view is JSON")
}

/// Wait until the view satisfies `ok`; the last view otherwise.
async fn until(url: &str, what: &str, ok: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let v = view(url).await;
        if ok(&v) {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "waited 20 s for {what}; the view: {v:#}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn member<'a>(v: &'a Value, name: &str) -> &'a Value {
    v["members"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["name"] == name)
        .unwrap_or_else(|| panic!("no member {name} in {v:#}"))
}

/// Every member running and reachable, one leader they all follow, nothing cut.
fn healthy(v: &Value) -> bool {
    let leader = &v["cluster"]["leader"];
    let ms = v["members"].as_array().unwrap();
    !leader.is_null()
        && ms.len() == 3
        && ms.iter().all(|m| {
            m["process"] == "running"
                && m["reachable"] == true
                && m["leader"] == *leader
                && m["cut_from"].as_array().is_some_and(|c| c.is_empty())
                && m["applied"] == m["commit"]
        })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn faults_at_a_click_and_every_scenario_play_out_on_a_real_cluster() {
    let dir = tempfile::tempdir().unwrap();
    let (_cluster, url, base) = start(dir.path());
    let v = until(&url, "a healthy cluster", healthy).await;
    assert_eq!(v["controls"], true, "raftkv cluster serves the controls");

    // Every member answers for itself on its client port, as /metrics is served.
    let own = get(
        &format!("http://127.0.0.1:{}", base + 10),
        "/dashboard/state",
    )
    .await
    .unwrap();
    let own: Value = serde_json::from_slice(&own).unwrap();
    assert_eq!(own["name"], "n1");
    assert!(
        own["log"].as_array().is_some_and(|l| !l.is_empty()),
        "{own:#}"
    );

    // Refusals say why.
    let e = post(&url, "/dashboard/api/member/n9/kill")
        .await
        .unwrap_err();
    assert!(e.contains("409") && e.contains("n9"), "{e}");
    let e = post(&url, "/dashboard/api/scenario/next")
        .await
        .unwrap_err();
    assert!(e.contains("no scenario is running"), "{e}");
    let e = post(&url, "/dashboard/api/scenario/nonesuch/start")
        .await
        .unwrap_err();
    assert!(e.contains("409"), "{e}");

    // A cut shows on the page's links and stops traffic on them; heal brings it back.
    post(&url, "/dashboard/api/cut/n0/n1").await.unwrap();
    until(&url, "the n0–n1 link drawn cut", |v| {
        v["links"]
            .as_array()
            .unwrap()
            .iter()
            .any(|l| l["from"] == "n0" && l["to"] == "n1" && l["cut"] == true)
            && member(v, "n1")["cut_from"]
                .as_array()
                .is_some_and(|c| c.iter().any(|n| n == "n0"))
    })
    .await;
    post(&url, "/dashboard/api/heal").await.unwrap();
    until(&url, "healed", healthy).await;

    // Pause (SIGSTOP) a follower: it is shown paused and falls behind; resume, it catches up.
    let v = view(&url).await;
    let leader = v["cluster"]["leader"].as_str().unwrap().to_string();
    let follower = ["n0", "n1", "n2"]
        .into_iter()
        .find(|n| *n != leader)
        .unwrap();
    post(&url, &format!("/dashboard/api/member/{follower}/pause"))
        .await
        .unwrap();
    until(&url, "the follower shown paused", |v| {
        member(v, follower)["process"] == "paused"
    })
    .await;
    post(&url, "/dashboard/api/load/start").await.unwrap();
    let v = until(&url, "the load's writes committing", |v| {
        v["load"]["running"] == true && v["cluster"]["writes_per_s"].as_f64() > Some(1.0)
    })
    .await;
    let commit = member(&v, &leader)["commit"].as_u64().unwrap();
    post(&url, &format!("/dashboard/api/member/{follower}/resume"))
        .await
        .unwrap();
    until(&url, "the resumed follower caught up", |v| {
        member(v, follower)["process"] == "running"
            && member(v, follower)["applied"].as_u64() > Some(commit)
    })
    .await;
    post(&url, "/dashboard/api/load/stop").await.unwrap();

    // kill -9 and restart the leader: another leads, and the restarted one follows it.
    post(&url, &format!("/dashboard/api/member/{leader}/kill"))
        .await
        .unwrap();
    let v = until(&url, "another leader", |v| {
        member(v, &leader)["process"] == "killed"
            && v["cluster"]["leader"].as_str().is_some_and(|l| l != leader)
    })
    .await;
    let changes = v["cluster"]["leader_changes"].as_u64().unwrap();
    assert!(changes >= 1, "{v:#}");
    assert!(
        v["timeline"]
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["kind"] == "election"
                && e["text"].as_str().unwrap().contains("won the election")),
        "the election is in the timeline: {v:#}"
    );
    post(&url, &format!("/dashboard/api/member/{leader}/restart"))
        .await
        .unwrap();
    until(&url, "the old leader back as a follower", healthy).await;

    // Every scenario, step by step, as a user presses Next.
    let ids: Vec<String> = view(&url).await["scenarios"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["id"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(ids.len(), 4);
    for id in &ids {
        // A failure fails the test: a step's message says what each member showed.
        let steps = play(&url, id)
            .await
            .unwrap_or_else(|e| panic!("scenario {id} failed: {e}"));
        // Every step ran and said what it saw.
        for st in &steps {
            assert_eq!(st["state"], "done", "{id}: {st:#}");
        }
        assert!(
            steps
                .iter()
                .any(|st| st["text"].as_str().unwrap().contains("version 1")),
            "{id}: the client's write is read back applied once: {steps:#?}"
        );
        let v = until(&url, "a healthy cluster after the scenario", healthy).await;
        assert!(
            v["timeline"]
                .as_array()
                .unwrap()
                .iter()
                .any(|e| e["kind"] == "scenario"),
            "{v:#}"
        );
    }
}

/// Play scenario `id` to its end, pressing Next as a user would: its steps, or the steps
/// when one failed.
async fn play(url: &str, id: &str) -> Result<Vec<Value>, String> {
    {
        post(url, &format!("/dashboard/api/scenario/{id}/start"))
            .await
            .unwrap_or_else(|e| panic!("start {id}: {e}"));
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let v = view(url).await;
            let s = &v["scenario"];
            if s["id"] == id {
                let steps = s["steps"].as_array().unwrap().clone();
                if steps.iter().any(|st| st["state"] == "failed") {
                    return Err(format!("{:#}", s["steps"]));
                }
                if s["done"] == true {
                    return Ok(steps);
                }
                if s["can_next"] == true {
                    // The view may be a poll behind a Next already pressed.
                    if let Err(e) = post(url, "/dashboard/api/scenario/next").await {
                        assert!(
                            e.contains("has not finished yet") || e.contains("is over"),
                            "next in {id}: {e}"
                        );
                    }
                }
            }
            assert!(Instant::now() < deadline, "scenario {id} stuck: {s:#}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}
