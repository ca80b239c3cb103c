//! The dashboard in a real browser: `raftkv cluster` is started as a newcomer starts it,
//! Debian's `chromium` (headless, driven through `chromedriver` by WebDriver) opens the URL
//! it prints, and the test looks at the page as a person would — three member cards and a
//! leader — then clicks "kill" on the leader's card and waits for the page to show another
//! member leading and the election in the timeline.
//!
//! `.ci/run` installs `chromium` and `chromium-driver`. With `DASHBOARD_SCREENSHOT=FILE`
//! the test also starts the write load and saves a screenshot of the page under load (the
//! README's picture is made this way).

mod support;

use fantoccini::{Client, ClientBuilder, Locator};
use std::io::{BufRead, BufReader};
use std::process::{ChildStdout, Command, Stdio};
use std::time::{Duration, Instant};
use support::{ports, retry_async, LocalCluster};

/// chromedriver's port, inside the cluster's block (the members use base..base+22).
const DRIVER_OFFSET: u16 = 50;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_page_shows_the_cluster_and_a_kill_at_a_click_elects_another_leader() {
    let (cluster, stdout) = LocalCluster::start_reading(ports::DASHBOARD, &[]);
    let url = dashboard_url(stdout);
    let driver_port = cluster.base + DRIVER_OFFSET;
    let _driver = support::KillOnDrop(
        Command::new("chromedriver")
            .arg(format!("--port={driver_port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("chromedriver is installed (Debian's chromium-driver)"),
    );
    let browser = connect(driver_port).await;
    let outcome = look_and_kill(&browser, &url).await;
    if outcome.is_err() {
        if let Ok(html) = browser.source().await {
            eprintln!("the page when the test failed:\n{html}");
        }
    }
    browser.close().await.ok();
    drop(cluster);
    outcome.unwrap();
}

async fn look_and_kill(b: &Client, url: &str) -> Result<(), String> {
    b.goto(url).await.map_err(|e| format!("open {url}: {e}"))?;
    wait(b, "the page to say it is live", |b| async move {
        Ok(text(&b, "#connection").await? == "live")
    })
    .await?;
    // The page keeps the controls' token (the URL's fragment) but takes it out of the
    // address bar, so a copied link or a screenshot does not carry it.
    let now = b.current_url().await.map_err(s)?;
    if now.as_str().contains("token=") {
        return Err(format!("the token stayed in the address bar: {now}"));
    }
    wait(b, "three member cards", |b| async move {
        Ok(b.find_all(Locator::Css("[data-member]"))
            .await
            .map_err(s)?
            .len()
            == 3)
    })
    .await?;
    let leader = wait_for(b, "a leader on the page", |b| async move {
        leader_on_page(&b).await
    })
    .await?;
    let header = text(b, "#leader").await?;
    if header != leader {
        return Err(format!(
            "#leader says {header:?}, the leader's card {leader:?}"
        ));
    }
    let elections_before = count(b, "#timeline .event[data-kind=\"election\"]").await?;

    // Kill the leader, as a person would: its card's kill button.
    let kill = format!("button[data-action=\"kill\"][data-target=\"{leader}\"]");
    b.find(Locator::Css(&kill))
        .await
        .map_err(s)?
        .click()
        .await
        .map_err(s)?;
    let at = Instant::now();
    wait(b, "the old leader's card to show it killed", |b| {
        let sel = format!("[data-member=\"{leader}\"][data-role=\"killed\"]");
        async move { Ok(count(&b, &sel).await? == 1) }
    })
    .await?;
    let new = wait_for(b, "another member leading", |b| {
        let old = leader.clone();
        async move { Ok(leader_on_page(&b).await?.filter(|l| *l != old)) }
    })
    .await?;
    eprintln!(
        "{new} leads on the page {:?} after the kill of {leader}",
        at.elapsed()
    );
    // The election that made it leader, in the timeline: its own "won the election".
    wait(b, "the new leader's election in the timeline", |b| {
        let new = new.clone();
        async move {
            let sel = "#timeline .event[data-kind=\"election\"]";
            let events = b.find_all(Locator::Css(sel)).await.map_err(s)?;
            let mut won = false;
            for e in &events {
                let t = e.text().await.map_err(s)?;
                won |= t.contains(&new) && t.contains("won the election");
            }
            Ok(won && events.len() > elections_before)
        }
    })
    .await?;
    if let Ok(path) = std::env::var("DASHBOARD_SCREENSHOT") {
        screenshot_under_load(b, &leader, &path).await?;
    }
    Ok(())
}

/// Restart the killed member, run the load for a while, and save the page.
async fn screenshot_under_load(b: &Client, killed: &str, path: &str) -> Result<(), String> {
    let restart = format!("button[data-action=\"restart\"][data-target=\"{killed}\"]");
    b.find(Locator::Css(&restart))
        .await
        .map_err(s)?
        .click()
        .await
        .map_err(s)?;
    b.find(Locator::Id("load-toggle"))
        .await
        .map_err(s)?
        .click()
        .await
        .map_err(s)?;
    tokio::time::sleep(Duration::from_secs(20)).await;
    let png = b.screenshot().await.map_err(s)?;
    std::fs::write(path, png).map_err(s)
}

/// The member whose card says it leads, if exactly one does.
async fn leader_on_page(b: &Client) -> Result<Option<String>, String> {
    let cards = b
        .find_all(Locator::Css("[data-member][data-role=\"leader\"]"))
        .await
        .map_err(s)?;
    match cards.as_slice() {
        [one] => one.attr("data-member").await.map_err(s),
        _ => Ok(None),
    }
}

async fn text(b: &Client, css: &str) -> Result<String, String> {
    let e = b.find(Locator::Css(css)).await.map_err(s)?;
    Ok(e.text().await.map_err(s)?.trim().to_string())
}

async fn count(b: &Client, css: &str) -> Result<usize, String> {
    Ok(b.find_all(Locator::Css(css)).await.map_err(s)?.len())
}

fn s(e: impl std::fmt::Display) -> String {
    e.to_string()
}

/// How long the page may take to show what a step waits for. An election takes about a
/// second here; the rest is headroom for a loaded CI machine.
const PATIENCE: Duration = Duration::from_secs(15);

async fn wait<F, Fut>(b: &Client, what: &str, f: F) -> Result<(), String>
where
    F: Fn(Client) -> Fut,
    Fut: std::future::Future<Output = Result<bool, String>>,
{
    wait_for(b, what, |b| {
        let fut = f(b);
        async move { Ok(fut.await?.then_some(())) }
    })
    .await
}

/// Poll the page until `f` finds what it looks for. A stale element (the page redraws from
/// every snapshot) is not a failure, only a reason to look again.
async fn wait_for<T, F, Fut>(b: &Client, what: &str, f: F) -> Result<T, String>
where
    F: Fn(Client) -> Fut,
    Fut: std::future::Future<Output = Result<Option<T>, String>>,
{
    let mut last = String::new();
    let found = retry_async(PATIENCE, Duration::from_millis(100), async || {
        match f(b.clone()).await {
            Ok(Some(v)) => Ok(v),
            Ok(None) => Err(()),
            Err(e) => {
                last = e;
                Err(())
            }
        }
    })
    .await;
    found.map_err(|()| format!("waited {PATIENCE:?} for {what}; last error: {last:?}"))
}

/// The URL `raftkv cluster` prints for its dashboard.
fn dashboard_url(out: ChildStdout) -> String {
    let mut lines = BufReader::new(out).lines();
    let mut seen = Vec::new();
    for line in lines.by_ref() {
        let line = line.unwrap();
        if let Some(i) = line.find("http://") {
            if line.starts_with("Dashboard") {
                let url = line[i..].trim().to_string();
                // Keep draining stdout so the cluster never blocks on a full pipe.
                std::thread::spawn(move || lines.for_each(drop));
                return url;
            }
        }
        seen.push(line);
    }
    panic!(
        "raftkv cluster printed no dashboard URL:\n{}",
        seen.join("\n")
    );
}

/// A headless chromium session. chromedriver takes a moment to listen.
async fn connect(port: u16) -> Client {
    let caps: serde_json::Map<String, serde_json::Value> =
        serde_json::from_value(serde_json::json!({
            "goog:chromeOptions": {
                "binary": "/usr/bin/chromium",
                "args": ["--headless=new", "--no-sandbox", "--disable-gpu",
                         "--disable-dev-shm-usage", "--window-size=1280,1000"]
            }
        }))
        .unwrap();
    retry_async(
        Duration::from_secs(30),
        Duration::from_millis(200),
        async || {
            // chromedriver speaks plain HTTP on loopback: no TLS stack needed.
            let http = hyper_util::client::legacy::connect::HttpConnector::new();
            ClientBuilder::new(http)
                .capabilities(caps.clone())
                .connect(&format!("http://127.0.0.1:{port}"))
                .await
        },
    )
    .await
    .unwrap_or_else(|e| panic!("no WebDriver session from chromedriver on {port}: {e}"))
}
