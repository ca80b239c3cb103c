//! What the compat tests share: clusters of real processes — Debian's etcd 3.4 or raftkv,
//! started with the same etcd flags — on loopback ports below the ephemeral range, killed
//! when the test ends, passed or failed; and the etcdctl they are driven with.

#![allow(dead_code)] // each test file uses part of this

use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

/// The raftkv binary under test.
pub fn raftkv_bin() -> String {
    std::env::var("RAFTKV_BIN").expect("set RAFTKV_BIN to the raftkv binary (see .ci/run)")
}

/// Debian's etcdctl (package etcd-client; `.ci/run` installs it), speaking the v3 API to
/// `endpoints` (comma-separated `host:port`), giving up on a request after `timeout_secs`.
pub fn etcdctl_cmd(endpoints: &str, timeout_secs: u32) -> Command {
    let mut c = Command::new("etcdctl");
    c.env("ETCDCTL_API", "3")
        .arg(format!("--endpoints={endpoints}"))
        .arg(format!("--command-timeout={timeout_secs}s"));
    c
}

/// Run etcdctl (see [`etcdctl_cmd`]): whether it succeeded, and its stdout then stderr.
pub fn etcdctl_result(endpoints: &str, timeout_secs: u32, args: &[&str]) -> (bool, String) {
    let out = etcdctl_cmd(endpoints, timeout_secs)
        .args(args)
        .output()
        .expect("etcdctl is installed (Debian package etcd-client; see .ci/run)");
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    (out.status.success(), text)
}

/// etcdctl's stderr without log lines (its client library's, JSON, and its own, each with
/// a timestamp): what it says to its user.
pub fn messages(stderr: &str) -> String {
    stderr
        .lines()
        .filter(|l| !l.starts_with('{') && !l.contains(" W | ") && !l.contains(" I | "))
        .map(|l| format!("{l}\n"))
        .collect()
}

/// A process started by a test, killed when the test ends, passed or failed.
pub struct KillOnDrop(pub Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Which server a cluster runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Etcd,
    Raftkv,
}

impl Kind {
    pub fn name(self) -> &'static str {
        match self {
            Kind::Etcd => "etcd",
            Kind::Raftkv => "raftkv",
        }
    }
}

pub struct Cluster {
    pub kind: Kind,
    /// host:port of each member's client URL, in member order.
    pub endpoints: Vec<String>,
    peer_urls: Vec<String>,
    procs: Vec<KillOnDrop>,
    /// How each member was started (program, arguments), to start it again.
    commands: Vec<(String, Vec<String>)>,
    pub dir: tempfile::TempDir,
    /// The port block, given back when the cluster is dropped.
    base: u16,
}

impl Drop for Cluster {
    fn drop(&mut self) {
        // Kill the members first: the block is free only once nothing listens on it.
        self.procs.clear();
        release_block(self.base);
    }
}

/// A block of `2 * members` ports, `base + 10 * i` (client) and `+ 1` (peer) for member
/// `i`, in `[from, to)`: fixed ports below the ephemeral range (32768 and up), so no
/// outgoing connection can hold them. Each call of a test binary starts at a different
/// block (tests of one file run in parallel), offset by the process id (so that two runs at
/// once rarely meet); a block some other process holds is skipped.
///
/// A block handed out stays this process's until `release_block`: the tests of one file
/// run at once, and a block that one test was given but has not bound yet looks free to
/// the next (two clusters on the same ports — seen in CI).
pub fn port_block(from: u16, to: u16, members: u16) -> u16 {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let span = u32::from(to - from);
    let blocks = span / 100;
    let first = std::process::id() % blocks + NEXT.fetch_add(1, Ordering::Relaxed);
    let mut taken = TAKEN.lock().unwrap();
    for k in 0..blocks {
        let base = from + (((first + k) % blocks) * 100) as u16;
        if taken.contains(&base) {
            continue;
        }
        let free = (0..members).all(|i| {
            (0..2).all(|p| std::net::TcpListener::bind(("127.0.0.1", base + 10 * i + p)).is_ok())
        });
        if free {
            taken.insert(base);
            return base;
        }
    }
    panic!("no free block of ports in {from}..{to}");
}

/// The blocks `port_block` has handed out and that are not yet released.
static TAKEN: std::sync::Mutex<std::collections::BTreeSet<u16>> =
    std::sync::Mutex::new(std::collections::BTreeSet::new());

/// Give a block back once nothing listens on it any more.
pub fn release_block(base: u16) {
    TAKEN.lock().unwrap().remove(&base);
}

/// Somewhere quick for the members' data: a tmpfs when there is one (both servers fsync
/// every write; the comparison is about answers, not disks).
fn data_dir(prefix: &str) -> tempfile::TempDir {
    let shm = std::path::Path::new("/dev/shm");
    if shm.is_dir() {
        if let Ok(d) = tempfile::Builder::new().prefix(prefix).tempdir_in(shm) {
            return d;
        }
    }
    tempfile::Builder::new().prefix(prefix).tempdir().unwrap()
}

/// Heartbeat interval and election timeout, in milliseconds, as etcd's flags take them.
#[derive(Clone, Copy, Debug)]
pub struct Timing {
    pub heartbeat_ms: u64,
    pub election_ms: u64,
}

impl Timing {
    /// What the tests use unless they need otherwise: quick elections.
    pub const QUICK: Timing = Timing {
        heartbeat_ms: 50,
        election_ms: 500,
    };
    /// etcd's defaults.
    pub const ETCD_DEFAULT: Timing = Timing {
        heartbeat_ms: 100,
        election_ms: 1000,
    };

    /// The shortest TTL a lease gets, in seconds: etcd's rule, one and a half election
    /// timeouts counted in whole heartbeat ticks (`3 * ticks / 2`, rounded down), then in
    /// whole seconds rounded up.
    pub fn min_lease_ttl(self) -> i64 {
        let ticks = self.election_ms / self.heartbeat_ms;
        let ms = (3 * ticks / 2) * self.heartbeat_ms;
        ms.div_ceil(1000) as i64
    }
}

/// Start a cluster of `members` members named a, b, c… with etcd's flags (raftkv's `serve`
/// takes the same), ports from `port_block(from, to, …)`, heartbeat 50 ms and election
/// timeout 500 ms for both. Returns once every member answers a linearizable read and
/// lists this cluster's members (a test run beside this one may have taken the ports
/// between the check and the start: then the next block).
pub async fn start(kind: Kind, members: u16, from: u16, to: u16) -> Cluster {
    start_timed(kind, members, from, to, Timing::QUICK).await
}

/// `start`, with the given heartbeat and election timeout.
pub async fn start_timed(kind: Kind, members: u16, from: u16, to: u16, t: Timing) -> Cluster {
    start_flags(kind, members, from, to, t, &[]).await
}

/// `start_timed`, with more flags for every member (etcd's, which raftkv takes too).
pub async fn start_flags(
    kind: Kind,
    members: u16,
    from: u16,
    to: u16,
    t: Timing,
    flags: &[&str],
) -> Cluster {
    let mut last = String::new();
    for _ in 0..5 {
        let mut c = spawn(kind, members, port_block(from, to, members), t, flags);
        match c.ready().await {
            Ok(()) => return c,
            Err(e) => last = e,
        }
    }
    panic!("{} did not start: {last}", kind.name());
}

fn spawn(kind: Kind, members: u16, base: u16, t: Timing, flags: &[&str]) -> Cluster {
    let (program, extra): (String, &[&str]) = match kind {
        Kind::Etcd => ("etcd".to_string(), &[]),
        Kind::Raftkv => (raftkv_bin(), &["serve"]),
    };
    let dir = data_dir(&format!("watch-{}-", kind.name()));
    let name = |i: u16| ((b'a' + i as u8) as char).to_string();
    let peer = |i: u16| format!("http://127.0.0.1:{}", base + 10 * i + 1);
    let initial: Vec<String> = (0..members)
        .map(|i| format!("{}={}", name(i), peer(i)))
        .collect();
    let token = format!("watch-{}-{base}", kind.name());
    let mut procs = Vec::new();
    let mut commands = Vec::new();
    for i in 0..members {
        let client = format!("http://127.0.0.1:{}", base + 10 * i);
        let mut args: Vec<String> = extra.iter().map(|a| a.to_string()).collect();
        args.extend([
            format!("--name={}", name(i)),
            format!("--data-dir={}", dir.path().join(name(i)).display()),
            format!("--listen-client-urls={client}"),
            format!("--advertise-client-urls={client}"),
            format!("--listen-peer-urls={}", peer(i)),
            format!("--initial-advertise-peer-urls={}", peer(i)),
            format!("--initial-cluster={}", initial.join(",")),
            format!("--initial-cluster-token={token}"),
            "--initial-cluster-state=new".to_string(),
            format!("--heartbeat-interval={}", t.heartbeat_ms),
            format!("--election-timeout={}", t.election_ms),
        ]);
        args.extend(flags.iter().map(|a| a.to_string()));
        procs.push(run_member(&program, &args, &dir, &name(i)));
        commands.push((program.clone(), args));
    }
    Cluster {
        kind,
        endpoints: (0..members)
            .map(|i| format!("127.0.0.1:{}", base + 10 * i))
            .collect(),
        peer_urls: (0..members).map(peer).collect(),
        procs,
        commands,
        dir,
        base,
    }
}

/// Start one member, its log appended to `<name>.log` in the cluster's directory.
fn run_member(program: &str, args: &[String], dir: &tempfile::TempDir, name: &str) -> KillOnDrop {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.path().join(format!("{name}.log")))
        .unwrap();
    let child = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap_or_else(|e| panic!("start {program}: {e} (see .ci/run for the packages)"));
    KillOnDrop(child)
}

impl Cluster {
    /// Member `i`'s name (a, b, c…).
    pub fn name(i: usize) -> String {
        ((b'a' + i as u8) as char).to_string()
    }

    /// Member `i`'s peer URL.
    pub fn peer_url(&self, i: usize) -> &str {
        &self.peer_urls[i]
    }

    /// Start member `i` again with the flags it was founded with, but as a member joining
    /// an existing cluster (`--initial-cluster-state existing`): etcd's way to start the
    /// replacement of a dead member once `member add` has taken it. Its data directory
    /// must be gone (see [`Cluster::wipe`]).
    pub fn start_existing(&mut self, i: usize) {
        let (program, mut args) = self.commands[i].clone();
        for a in &mut args {
            if a == "--initial-cluster-state=new" {
                *a = "--initial-cluster-state=existing".into();
            }
        }
        self.procs[i] = run_member(&program, &args, &self.dir, &Self::name(i));
    }

    /// Kill member `i` and delete its data directory: its machine is gone for good.
    pub fn wipe(&mut self, i: usize) {
        self.kill(i);
        let data = self.dir.path().join(Self::name(i));
        let _ = std::fs::remove_dir_all(data);
    }

    /// Every member answers a linearizable read (no write: a write retried after a timeout
    /// could apply twice, and the two clusters' revisions must stay in step) and lists
    /// this cluster's peer URLs, and every process still runs.
    async fn ready(&mut self) -> Result<(), String> {
        let deadline = Instant::now() + Duration::from_secs(30);
        for e in &self.endpoints {
            loop {
                let ok = async {
                    let mut c = etcd_client::Client::connect([e], None).await.ok()?;
                    c.get("ready?", None).await.ok()?;
                    let list = c.member_list().await.ok()?;
                    Some(
                        self.peer_urls
                            .iter()
                            .all(|u| list.members().iter().any(|m| m.peer_urls().contains(u))),
                    )
                };
                match tokio::time::timeout(Duration::from_secs(2), ok).await {
                    Ok(Some(true)) => break,
                    Ok(Some(false)) => return Err(format!("{e} is another cluster's")),
                    _ => {}
                }
                if Instant::now() > deadline {
                    return Err(format!("member {e} did not become ready:\n{}", self.logs()));
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        for i in 0..self.procs.len() {
            if let Ok(Some(status)) = self.procs[i].0.try_wait() {
                return Err(format!("member {i} exited ({status}):\n{}", self.logs()));
            }
        }
        Ok(())
    }

    /// The last lines of every member's log, for a failure message.
    pub fn logs(&self) -> String {
        let mut out = String::new();
        for i in 0..self.procs.len() {
            let name = ((b'a' + i as u8) as char).to_string();
            let text = std::fs::read_to_string(self.dir.path().join(format!("{name}.log")))
                .unwrap_or_default();
            let lines: Vec<&str> = text.lines().collect();
            let tail = &lines[lines.len().saturating_sub(15)..];
            out.push_str(&format!(
                "--- {} {name}\n{}\n",
                self.kind.name(),
                tail.join("\n")
            ));
        }
        out
    }

    /// Which members' processes have ended (a failure message names them: a member that
    /// ended without a word in its log was probably signalled from outside the test).
    pub fn exited(&self) -> Vec<usize> {
        (0..self.procs.len())
            .filter(|&i| {
                let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.procs[i].0.id()));
                // The state follows the command name, which is in parentheses.
                stat.map_or(true, |s| {
                    s.rsplit_once(") ")
                        .is_some_and(|(_, rest)| rest.starts_with(['Z', 'X']))
                })
            })
            .collect()
    }

    /// Kill member `i` (SIGKILL).
    pub fn kill(&mut self, i: usize) {
        let _ = self.procs[i].0.kill();
        let _ = self.procs[i].0.wait();
    }

    /// A client that talks to member `i` only.
    pub async fn client(&self, i: usize) -> etcd_client::Client {
        etcd_client::Client::connect([&self.endpoints[i]], None)
            .await
            .unwrap()
    }
}
