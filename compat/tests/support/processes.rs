//! The servers the compat tests talk to, as real processes: clusters of Debian's etcd 3.4
//! or of raftkv started with the same etcd flags ([`Cluster`]), and `raftkv cluster`, which
//! starts its own three members ([`LocalCluster`]). Every process is stopped when the test
//! ends, passed or failed; every cluster gets a block of loopback ports from its file's
//! range in [`ports`], so that the tests of one file can run at once and the files never
//! meet. Also here: plain HTTP to a member (`/health`, `/metrics`, `/version`).

use std::io::{Read, Write};
use std::path::Path;
use std::process::{Child, ChildStdout, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

/// The raftkv binary under test.
pub fn raftkv_bin() -> String {
    std::env::var("RAFTKV_BIN").expect("set RAFTKV_BIN to the raftkv binary (see .ci/run)")
}

/// A process started by a test, killed when the test ends, passed or failed.
pub struct KillOnDrop(pub Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Send SIGINT to a child, as Ctrl-C in a terminal would: etcdctl then unlocks or resigns
/// before it exits, `raftkv cluster` stops its members.
pub fn interrupt(child: &Child) {
    // SAFETY: kill(2) on the id of a child we started and have not reaped; no memory is
    // touched.
    unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGINT) };
}

/// Each test file's loopback ports, `(from, to)`: below the ephemeral range (32768 and up),
/// so that no outgoing connection holds one, and apart, so that two files never meet even
/// when run at once. All below 20,000: the workspace's process tests draw their ports from
/// 20,000–32,000 (`crates/raftkv/tests/common`), so both suites can run at the same time
/// on one machine. One table, so that a new file finds a free range at a glance.
pub mod ports {
    pub const ETCD_CLIENTS: (u16, u16) = (4_000, 5_000);
    pub const MEMBERSHIP: (u16, u16) = (5_000, 6_000);
    pub const REPLACEMENT: (u16, u16) = (6_000, 7_000);
    pub const DASHBOARD: (u16, u16) = (7_000, 8_000);
    pub const MAINTENANCE: (u16, u16) = (9_000, 10_000);
    pub const TLS: (u16, u16) = (10_000, 12_000);
    pub const WATCH_VS_ETCD: (u16, u16) = (12_000, 14_000);
    pub const ETCDCTL_WATCH: (u16, u16) = (14_000, 16_000);
    pub const ETCD_CLIENT_WATCH: (u16, u16) = (16_000, 18_000);
    pub const LEASE: (u16, u16) = (18_000, 19_000);
    pub const LOCK: (u16, u16) = (19_000, 20_000);
}

/// A block of `2 * members` ports, `base + 10 * i` (client) and `+ 1` (peer) for member
/// `i`, in `[from, to)` (one of [`ports`]). Each call of a test binary starts at a
/// different block (tests of one file run in parallel), offset by the process id (so that
/// two runs at once rarely meet); a block some other process holds is skipped.
///
/// A block handed out stays this process's until `release_block`: the tests of one file
/// run at once, and a block that one test was given but has not bound yet looks free to
/// the next (two clusters on the same ports — seen in CI).
pub fn port_block((from, to): (u16, u16), members: u16) -> u16 {
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
    let shm = Path::new("/dev/shm");
    if shm.is_dir() {
        if let Ok(d) = tempfile::Builder::new().prefix(prefix).tempdir_in(shm) {
            return d;
        }
    }
    tempfile::Builder::new().prefix(prefix).tempdir().unwrap()
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

/// `name=peer,…` for `--initial-cluster`.
pub fn initial_cluster<'a>(members: impl IntoIterator<Item = (&'a str, &'a str)>) -> String {
    members
        .into_iter()
        .map(|(name, peer)| format!("{name}={peer}"))
        .collect::<Vec<_>>()
        .join(",")
}

/// The etcd flags (raftkv's `serve` takes the same) that make a process member `name` of
/// the cluster `initial` (see [`initial_cluster`]), serving clients on `client` and peers
/// on `peer` (URLs), its data in `data`. The cluster's state (new or existing) is left to
/// the caller: a restored data directory takes none.
pub fn member_flags(
    name: &str,
    data: &Path,
    client: &str,
    peer: &str,
    initial: &str,
    token: &str,
    t: Timing,
) -> Vec<String> {
    vec![
        format!("--name={name}"),
        format!("--data-dir={}", data.display()),
        format!("--listen-client-urls={client}"),
        format!("--advertise-client-urls={client}"),
        format!("--listen-peer-urls={peer}"),
        format!("--initial-advertise-peer-urls={peer}"),
        format!("--initial-cluster={initial}"),
        format!("--initial-cluster-token={token}"),
        format!("--heartbeat-interval={}", t.heartbeat_ms),
        format!("--election-timeout={}", t.election_ms),
    ]
}

/// Start `cmd` with nothing on its stdin or stdout and its stderr appended to `log`.
pub fn spawn_logged(cmd: &mut Command, log: &Path) -> KillOnDrop {
    let file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .unwrap_or_else(|e| panic!("open {}: {e}", log.display()));
    let child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(file)
        .spawn()
        .unwrap_or_else(|e| {
            let program = cmd.get_program().to_string_lossy().into_owned();
            panic!("start {program}: {e} (see .ci/run for the packages)")
        });
    KillOnDrop(child)
}

/// A cluster of etcd or raftkv members started with the same etcd flags (see [`start`]),
/// its data and each member's log (`<name>.log`) in a directory of its own.
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

/// Start a cluster of `members` members named a, b, c… with etcd's flags (raftkv's `serve`
/// takes the same), ports from `port_block(ports, …)`, heartbeat 50 ms and election timeout
/// 500 ms for both. Returns once every member answers a linearizable read and lists this
/// cluster's members (a test run beside this one may have taken the ports between the
/// check and the start: then the next block).
pub async fn start(kind: Kind, members: u16, ports: (u16, u16)) -> Cluster {
    start_timed(kind, members, ports, Timing::QUICK).await
}

/// `start`, with the given heartbeat and election timeout.
pub async fn start_timed(kind: Kind, members: u16, ports: (u16, u16), t: Timing) -> Cluster {
    start_flags(kind, members, ports, t, &[]).await
}

/// `start_timed`, with more flags for every member (etcd's, which raftkv takes too).
pub async fn start_flags(
    kind: Kind,
    members: u16,
    ports: (u16, u16),
    t: Timing,
    flags: &[&str],
) -> Cluster {
    let mut last = String::new();
    for _ in 0..5 {
        let mut c = spawn(kind, members, port_block(ports, members), t, flags);
        match c.ready().await {
            Ok(()) => return c,
            Err(e) => last = e,
        }
    }
    panic!("{} did not start: {last}", kind.name());
}

/// An etcd cluster and a raftkv cluster alike (`start_timed` of each), started at once:
/// the two sides of a differential test, etcd's first.
pub async fn start_both(members: u16, ports: (u16, u16), t: Timing) -> (Cluster, Cluster) {
    tokio::join!(
        start_timed(Kind::Etcd, members, ports, t),
        start_timed(Kind::Raftkv, members, ports, t)
    )
}

fn spawn(kind: Kind, members: u16, base: u16, t: Timing, flags: &[&str]) -> Cluster {
    let (program, extra): (String, &[&str]) = match kind {
        Kind::Etcd => ("etcd".to_string(), &[]),
        Kind::Raftkv => (raftkv_bin(), &["serve"]),
    };
    let dir = data_dir(&format!("watch-{}-", kind.name()));
    let peer = |i: u16| format!("http://127.0.0.1:{}", base + 10 * i + 1);
    let peers: Vec<String> = (0..members).map(peer).collect();
    let names: Vec<String> = (0..members).map(|i| Cluster::name(i.into())).collect();
    let initial = initial_cluster(
        names
            .iter()
            .map(String::as_str)
            .zip(peers.iter().map(String::as_str)),
    );
    let token = format!("watch-{}-{base}", kind.name());
    let mut procs = Vec::new();
    let mut commands = Vec::new();
    for i in 0..members {
        let name = &names[usize::from(i)];
        let client = format!("http://127.0.0.1:{}", base + 10 * i);
        let mut args: Vec<String> = extra.iter().map(|a| a.to_string()).collect();
        args.extend(member_flags(
            name,
            &dir.path().join(name),
            &client,
            &peer(i),
            &initial,
            &token,
            t,
        ));
        args.push("--initial-cluster-state=new".to_string());
        args.extend(flags.iter().map(|a| a.to_string()));
        let log = dir.path().join(format!("{name}.log"));
        procs.push(spawn_logged(Command::new(&program).args(&args), &log));
        commands.push((program.clone(), args));
    }
    Cluster {
        kind,
        endpoints: (0..members)
            .map(|i| format!("127.0.0.1:{}", base + 10 * i))
            .collect(),
        peer_urls: peers,
        procs,
        commands,
        dir,
        base,
    }
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

    fn log_path(&self, i: usize) -> std::path::PathBuf {
        self.dir.path().join(format!("{}.log", Self::name(i)))
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
        self.procs[i] = spawn_logged(Command::new(&program).args(&args), &self.log_path(i));
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
            let text = std::fs::read_to_string(self.log_path(i)).unwrap_or_default();
            let lines: Vec<&str> = text.lines().collect();
            let tail = &lines[lines.len().saturating_sub(15)..];
            out.push_str(&format!(
                "--- {} {}\n{}\n",
                self.kind.name(),
                Self::name(i),
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

/// `raftkv cluster` as a newcomer runs it: three members n0, n1, n2 started by raftkv
/// itself on `--base-port` (a block from [`port_block`]), their data and logs
/// (`n<i>.log`) in a temporary directory. Stopped with SIGINT, as Ctrl-C stops it, so
/// that it stops its members (a SIGKILL would leave them running); killed if it has not
/// ended ten seconds later.
pub struct LocalCluster {
    child: Child,
    /// Each member's client endpoint, in member order: `host:port`, or
    /// `https://host:port` with `--tls`.
    pub endpoints: Vec<String>,
    /// The data directory (`--data-dir`).
    pub dir: tempfile::TempDir,
    pub base: u16,
}

impl LocalCluster {
    /// Start `raftkv cluster FLAGS` with its dashboard on a port of its choosing, on a
    /// block of `ports`. Not waited for: each test knows best when it is ready.
    pub fn start(ports: (u16, u16), flags: &[&str]) -> LocalCluster {
        Self::spawn(ports, flags, Stdio::null())
    }

    /// `start`, with what it prints (the dashboard's URL among it) to read. The reader must
    /// go on reading, or the cluster blocks on a full pipe.
    pub fn start_reading(ports: (u16, u16), flags: &[&str]) -> (LocalCluster, ChildStdout) {
        let mut c = Self::spawn(ports, flags, Stdio::piped());
        let out = c.child.stdout.take().unwrap();
        (c, out)
    }

    fn spawn(ports: (u16, u16), flags: &[&str], stdout: Stdio) -> LocalCluster {
        let base = port_block(ports, 3);
        let dir = tempfile::tempdir().unwrap();
        let child = Command::new(raftkv_bin())
            .args(["cluster", "--dashboard-port", "0", "--base-port"])
            .arg(base.to_string())
            .arg("--data-dir")
            .arg(dir.path())
            .args(flags)
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(Stdio::null())
            .spawn()
            .expect("start raftkv cluster");
        let scheme = if flags.contains(&"--tls") {
            "https://"
        } else {
            ""
        };
        LocalCluster {
            child,
            endpoints: (0..3)
                .map(|i| format!("{scheme}127.0.0.1:{}", base + 10 * i))
                .collect(),
            dir,
            base,
        }
    }

    /// Every member's whole log, for a failure message.
    pub fn logs(&self) -> String {
        (0..3)
            .map(|i| {
                let log = std::fs::read_to_string(self.dir.path().join(format!("n{i}.log")));
                format!("--- n{i}\n{}\n", log.unwrap_or_default())
            })
            .collect()
    }
}

impl Drop for LocalCluster {
    fn drop(&mut self) {
        interrupt(&self.child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                release_block(self.base);
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        release_block(self.base);
    }
}

/// `GET path` over plain HTTP/1.1 from a member's client port (`host:port`), as etcd serves
/// `/health`, `/version` and `/metrics` there: the status code and the body (a chunked one
/// put back together), or why there is none. Gives up on a read after `timeout`.
pub fn http_get(endpoint: &str, path: &str, timeout: Duration) -> Result<(u16, String), String> {
    let mut s =
        std::net::TcpStream::connect(endpoint).map_err(|e| format!("connect {endpoint}: {e}"))?;
    s.set_read_timeout(Some(timeout)).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {endpoint}\r\nConnection: close\r\n\r\n"
    )
    .map_err(|e| format!("{endpoint}: {e}"))?;
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    let code = out
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let (head, body) = out.split_once("\r\n\r\n").unwrap_or((&out, ""));
    let chunked = head
        .lines()
        .any(|l| l.eq_ignore_ascii_case("transfer-encoding: chunked"));
    Ok((
        code,
        if chunked {
            dechunk(body)
        } else {
            body.to_string()
        },
    ))
}

/// An HTTP/1.1 chunked body, put back together (Go's server sends big ones so).
fn dechunk(mut body: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = body.split_once("\r\n") {
        let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
        if n == 0 || rest.len() < n {
            break;
        }
        out.push_str(&rest[..n]);
        body = rest[n..].strip_prefix("\r\n").unwrap_or(&rest[n..]);
    }
    out
}
