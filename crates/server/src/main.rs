//! `raftkv`: a strongly consistent key-value store speaking etcd's v3 API.
//!
//! `raftkv serve` takes etcd's flag names with etcd's meanings, so whoever can start an etcd
//! cluster can start raftkv the same way.

use clap::{Parser, Subcommand};
use server::bootstrap;
use server::corrupt;
use server::dashboard::supervisor;
use server::election::ElectionService;
use server::grpc::Services;
use server::grpc_metrics::GrpcMetricsLayer;
use server::guard::GuardLayer;
use server::health;
use server::lease::LeaseService;
use server::lock::LockService;
use server::maintenance::MaintenanceService;
use server::metrics::Metrics;
use server::node::{self, Node, NodeConfig};
use server::pb::etcdserverpb::{
    cluster_server::ClusterServer, kv_server::KvServer, lease_server::LeaseServer,
    maintenance_server::MaintenanceServer, watch_server::WatchServer,
};
use server::pb::raftkvpb::{
    self, lease_forward_server::LeaseForwardServer, raft_server::RaftServer,
};
use server::pb::v3electionpb::election_server::ElectionServer;
use server::pb::v3lockpb::lock_server::LockServer;
use server::tls;
use server::transport::{Heard, PeerTransport, RaftService};
use server::watch::WatchService;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, OnceLock};
use std::time::Duration;
use tonic::transport::server::TcpIncoming;

#[derive(Parser)]
#[command(
    name = "raftkv",
    version,
    about = "A strongly consistent key-value store speaking etcd's v3 API"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run one member of a cluster (etcd's flags and meanings).
    Serve(Box<ServeArgs>),
    /// Run a local cluster of child processes on loopback; Ctrl-C stops it, and running it
    /// again brings it back with its data.
    Cluster(ClusterArgs),
    /// Write a key.
    Put {
        key: String,
        value: String,
        #[command(flatten)]
        c: ClientArgs,
    },
    /// Read a key, or every key with a prefix.
    Get {
        key: String,
        #[arg(long)]
        prefix: bool,
        /// Serve from the member's local state (may be stale) instead of a linearizable read.
        #[arg(long)]
        serializable: bool,
        #[command(flatten)]
        c: ClientArgs,
    },
    /// Delete a key, or every key with a prefix.
    Del {
        key: String,
        #[arg(long)]
        prefix: bool,
        #[command(flatten)]
        c: ClientArgs,
    },
    /// Print every change of a key, or of every key with a prefix, as it happens; resumes
    /// on another endpoint if the stream breaks.
    Watch {
        key: String,
        #[arg(long)]
        prefix: bool,
        /// Start from this revision (0: from now).
        #[arg(long, default_value_t = 0)]
        rev: i64,
        /// Print each change's previous key and value too.
        #[arg(long)]
        prev_kv: bool,
        #[command(flatten)]
        c: ClientArgs,
    },
    /// Show each endpoint's member id, leader, term and indexes.
    Status {
        #[command(flatten)]
        c: ClientArgs,
    },
    /// Add, remove, promote, update or list members.
    Member {
        #[command(subcommand)]
        cmd: member_cli::MemberCmd,
        #[command(flatten)]
        c: ClientArgs,
    },
    /// Backups: save a member's snapshot, check a file, restore a new cluster from one.
    Snapshot {
        #[command(subcommand)]
        cmd: snapshot_cli::SnapshotCmd,
        #[command(flatten)]
        c: ClientArgs,
    },
    /// Hand leadership to another voter (hex member id).
    MoveLeader {
        id: String,
        #[command(flatten)]
        c: ClientArgs,
    },
    /// Load generator over the etcd API (works against etcd too): ops/s and latency.
    Bench(bench::BenchArgs),
    /// Benchmark watch: many idle watchers on one member, a steady put rate; reports event
    /// delivery latency and memory per watcher.
    BenchWatch(bench_watch::WatchArgs),
    /// Benchmark leases: grant many, keep them all alive, let others lapse; reports grants
    /// and keep-alives per second, how late expired leases are revoked, memory per lease
    BenchLease(bench_lease::LeaseArgs),
}

#[derive(Parser, Debug)]
struct ClientArgs {
    /// Comma-separated host:port (or http://host:port) client endpoints; tried in order.
    #[arg(
        long,
        global = true,
        default_value = "127.0.0.1:2379,127.0.0.1:2389,127.0.0.1:2399"
    )]
    endpoints: String,
    /// Verify the members' certificates with this CA (etcdctl's --cacert); given any of
    /// --cacert, --cert, --key, host:port endpoints are dialed with TLS.
    #[arg(long, global = true)]
    cacert: Option<PathBuf>,
    /// Present this client certificate (for members started with --client-cert-auth).
    #[arg(long, global = true)]
    cert: Option<PathBuf>,
    /// The key of --cert.
    #[arg(long = "key", value_name = "KEY", global = true)]
    cert_key: Option<PathBuf>,
}

impl ClientArgs {
    /// The endpoints, after making this process dial https:// ones as the flags say.
    fn endpoints(&self) -> Result<&str, String> {
        let files = server::tls::Files {
            cert: self.cert.clone(),
            key: self.cert_key.clone(),
            trusted_ca: self.cacert.clone(),
            cert_auth: false,
        };
        server::tls::set_client_dialer(server::tls::Dialer::from_cli(&files)?);
        Ok(&self.endpoints)
    }
}

#[derive(Parser, Debug)]
struct ClusterArgs {
    /// Number of members.
    #[arg(long, default_value_t = 3)]
    nodes: usize,
    /// Where the members keep their data (one directory each) and logs.
    #[arg(long, default_value = "raftkv-data")]
    data_dir: PathBuf,
    /// Member i serves clients on base + 10·i and peers on base + 10·i + 1.
    #[arg(long, default_value_t = 2379)]
    base_port: u16,
    /// Serve clients and peers over TLS, with client certificates required on both: makes
    /// a throwaway CA and certificates under <data-dir>/tls (kept for the next run).
    #[arg(long)]
    tls: bool,
    /// Where the dashboard listens on 127.0.0.1 (default: --base-port + 100; 0 picks a
    /// free port, printed at start).
    #[arg(long)]
    dashboard_port: Option<u16>,
}

/// etcd's flags, each also taken from its environment variable as etcd does
/// (`ETCD_NAME`, `ETCD_INITIAL_CLUSTER`, …: what `etcdctl member add` prints); a flag given
/// on the command line wins.
#[derive(Parser, Debug)]
struct ServeArgs {
    /// Human-readable name of this member; must appear in --initial-cluster.
    #[arg(long, default_value = "default", env = "ETCD_NAME")]
    name: String,
    /// Where this member keeps its log and snapshots.
    #[arg(long, env = "ETCD_DATA_DIR")]
    data_dir: Option<PathBuf>,
    #[arg(
        long,
        default_value = "http://127.0.0.1:2379",
        env = "ETCD_LISTEN_CLIENT_URLS"
    )]
    listen_client_urls: String,
    #[arg(
        long,
        default_value = "http://127.0.0.1:2379",
        env = "ETCD_ADVERTISE_CLIENT_URLS"
    )]
    advertise_client_urls: String,
    #[arg(
        long,
        default_value = "http://127.0.0.1:2380",
        env = "ETCD_LISTEN_PEER_URLS"
    )]
    listen_peer_urls: String,
    #[arg(
        long,
        default_value = "http://127.0.0.1:2380",
        env = "ETCD_INITIAL_ADVERTISE_PEER_URLS"
    )]
    initial_advertise_peer_urls: String,
    /// Every member as name=peer-url, comma separated.
    #[arg(
        long,
        default_value = "default=http://127.0.0.1:2380",
        env = "ETCD_INITIAL_CLUSTER"
    )]
    initial_cluster: String,
    /// "new" or "existing".
    #[arg(long, default_value = "new", env = "ETCD_INITIAL_CLUSTER_STATE")]
    initial_cluster_state: String,
    /// Distinguishes clusters: members of different clusters refuse each other's data.
    #[arg(
        long,
        default_value = "etcd-cluster",
        env = "ETCD_INITIAL_CLUSTER_TOKEN"
    )]
    initial_cluster_token: String,
    /// Entries applied between snapshots (log compactions).
    #[arg(long, default_value_t = 100_000, env = "ETCD_SNAPSHOT_COUNT")]
    snapshot_count: u64,
    /// Heartbeat interval in milliseconds.
    #[arg(long, default_value_t = 100, env = "ETCD_HEARTBEAT_INTERVAL")]
    heartbeat_interval: u64,
    /// Election timeout in milliseconds.
    #[arg(long, default_value_t = 1000, env = "ETCD_ELECTION_TIMEOUT")]
    election_timeout: u64,
    /// How often watchers that asked for progress notifications get one (a Go duration:
    /// "10m", "500ms", "1m30s").
    #[arg(
        long,
        default_value = "10m",
        value_parser = parse_go_duration,
        env = "ETCD_EXPERIMENTAL_WATCH_PROGRESS_NOTIFY_INTERVAL"
    )]
    experimental_watch_progress_notify_interval: Duration,
    /// Threads serving gRPC and the raft loop (not an etcd flag). 1 suits small machines
    /// and several members per machine; more may help a lone member on many cores.
    #[arg(long, default_value_t = 1)]
    worker_threads: usize,
    /// Certificate for the client URLs (required if --listen-client-urls is https://);
    /// also presented when this member connects to other members' https client URLs.
    #[arg(long, env = "ETCD_CERT_FILE")]
    cert_file: Option<PathBuf>,
    /// The key of --cert-file.
    #[arg(long, env = "ETCD_KEY_FILE")]
    key_file: Option<PathBuf>,
    /// CA that signs the client certificates accepted (with --client-cert-auth), and the
    /// certificates of other members' https client URLs when this member connects to them
    /// (the system's CAs if not given).
    #[arg(long, env = "ETCD_TRUSTED_CA_FILE")]
    trusted_ca_file: Option<PathBuf>,
    /// Refuse clients without a certificate signed by --trusted-ca-file.
    #[arg(long, env = "ETCD_CLIENT_CERT_AUTH")]
    client_cert_auth: bool,
    /// Certificate for the peer URLs (required if --listen-peer-urls is https://); also
    /// presented when connecting to peers.
    #[arg(long, env = "ETCD_PEER_CERT_FILE")]
    peer_cert_file: Option<PathBuf>,
    /// The key of --peer-cert-file.
    #[arg(long, env = "ETCD_PEER_KEY_FILE")]
    peer_key_file: Option<PathBuf>,
    /// CA that signs the peers' certificates: those accepted (with --peer-client-cert-auth)
    /// and those of the peers this member connects to (the system's CAs if not given).
    #[arg(long, env = "ETCD_PEER_TRUSTED_CA_FILE")]
    peer_trusted_ca_file: Option<PathBuf>,
    /// Refuse peers without a certificate signed by --peer-trusted-ca-file.
    #[arg(long, env = "ETCD_PEER_CLIENT_CERT_AUTH")]
    peer_client_cert_auth: bool,
    /// Past this many bytes of keys and values in the store, the cluster raises NOSPACE and
    /// refuses writes that add data (0: etcd's default, 2 GiB).
    #[arg(long, default_value_t = 0, env = "ETCD_QUOTA_BACKEND_BYTES")]
    quota_backend_bytes: u64,
    /// More URLs serving /metrics, /health and /version (the client port always does).
    #[arg(long, default_value = "", env = "ETCD_LISTEN_METRICS_URLS")]
    listen_metrics_urls: String,
    /// How often the leader compares every member's HashKV with its own, raising CORRUPT on
    /// a mismatch (a Go duration; 0, etcd's default, turns the check off).
    #[arg(
        long,
        default_value = "0",
        value_parser = parse_go_duration_or_zero,
        env = "ETCD_EXPERIMENTAL_CORRUPT_CHECK_TIME"
    )]
    experimental_corrupt_check_time: Duration,
    /// Serve the live dashboard, read-only, at /dashboard/ on the client port and the
    /// metrics URLs (not an etcd flag; `raftkv cluster` serves it with controls).
    #[arg(long)]
    dashboard: bool,
    /// Run under `raftkv cluster`: take its network switch (`cut from=… to=…` lines) on
    /// stdin. Not for use by hand.
    #[arg(long, hide = true)]
    supervised: bool,
    #[command(flatten)]
    log: LogArgs,
}

/// How the process logs (to stderr).
#[derive(Parser, Debug, Clone)]
struct LogArgs {
    /// debug, info, warn or error.
    #[arg(long, default_value = "info", value_parser = parse_log_level, env = "ETCD_LOG_LEVEL")]
    log_level: tracing::Level,
    /// text (one human-readable line per event) or json (one JSON object per line).
    #[arg(long, default_value = "text", value_parser = ["text", "json"], env = "ETCD_LOG_FORMAT")]
    log_format: String,
}

fn parse_log_level(s: &str) -> Result<tracing::Level, String> {
    match s {
        "debug" => Ok(tracing::Level::DEBUG),
        "info" => Ok(tracing::Level::INFO),
        "warn" => Ok(tracing::Level::WARN),
        "error" | "panic" | "fatal" => Ok(tracing::Level::ERROR),
        _ => Err(format!(
            "{s:?} is not a log level (debug, info, warn, error)"
        )),
    }
}

fn parse_go_duration_or_zero(s: &str) -> Result<Duration, String> {
    if s.trim() == "0" {
        return Ok(Duration::ZERO);
    }
    parse_go_duration(s)
}

/// A duration as Go writes them (etcd's flags take these): numbers with units h, m, s, ms,
/// us (or µs) and ns, run together ("1m30s"). Zero is refused.
fn parse_go_duration(s: &str) -> Result<Duration, String> {
    let bad = || format!("{s:?} is not a duration like 10m, 500ms or 1m30s");
    let mut total = Duration::ZERO;
    let mut rest = s.trim();
    if rest.is_empty() {
        return Err(bad());
    }
    while !rest.is_empty() {
        let digits = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .ok_or_else(bad)?;
        let n: f64 = rest[..digits].parse().map_err(|_| bad())?;
        rest = &rest[digits..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let secs = match &rest[..unit_len] {
            "h" => 3600.0,
            "m" => 60.0,
            "s" => 1.0,
            "ms" => 1e-3,
            "us" | "µs" => 1e-6,
            "ns" => 1e-9,
            _ => return Err(bad()),
        };
        rest = &rest[unit_len..];
        total += Duration::try_from_secs_f64(n * secs).map_err(|_| bad())?;
    }
    if total.is_zero() {
        return Err(format!("{s:?}: the interval must be more than zero"));
    }
    Ok(total)
}

/// SIGTERM, as sent by service managers and `kill`.
async fn terminated() {
    match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(mut s) => {
            s.recv().await;
        }
        Err(_) => std::future::pending().await,
    }
}

/// The address to listen on, and whether it is https://.
fn listen_addr(urls: &str, flag: &str) -> Result<(SocketAddr, bool), String> {
    let first = urls.split(',').next().unwrap_or_default();
    let (hostport, https) = match first.strip_prefix("https://") {
        Some(rest) => (rest, true),
        None => (
            first.strip_prefix("http://").ok_or_else(|| {
                format!("--{flag}: {first:?} must start with http:// or https://")
            })?,
            false,
        ),
    };
    let addr = hostport
        .parse()
        .map_err(|_| format!("--{flag}: {first:?} is not an http(s)://IP:port address"))?;
    Ok((addr, https))
}

async fn cluster(a: ClusterArgs) -> Result<(), String> {
    if !(1..=9).contains(&a.nodes) {
        return Err("--nodes must be between 1 and 9".into());
    }
    let port = |i: usize, peer: bool| u32::from(a.base_port) + 10 * i as u32 + u32::from(peer);
    if port(a.nodes - 1, true) > u32::from(u16::MAX) {
        return Err("--base-port is too high for that many members".into());
    }
    for i in 0..a.nodes {
        for peer in [false, true] {
            let addr = format!("127.0.0.1:{}", port(i, peer));
            std::net::TcpListener::bind(&addr)
                .map_err(|e| format!("port {addr} is not free ({e}); pick another --base-port"))?;
        }
    }
    std::fs::create_dir_all(&a.data_dir).map_err(|e| format!("{}: {e}", a.data_dir.display()))?;
    let scheme = if a.tls { "https" } else { "http" };
    let names: Vec<String> = (0..a.nodes).map(|i| format!("n{i}")).collect();
    let pki = match a.tls {
        true => Some(tls::DevPki::ensure(&a.data_dir.join("tls"), &names)?),
        false => None,
    };
    let initial_cluster = (0..a.nodes)
        .map(|i| format!("n{i}={scheme}://127.0.0.1:{}", port(i, true)))
        .collect::<Vec<_>>()
        .join(",");
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let mut specs = Vec::new();
    for (i, n) in names.iter().enumerate() {
        let client = format!("{scheme}://127.0.0.1:{}", port(i, false));
        let peer = format!("{scheme}://127.0.0.1:{}", port(i, true));
        let mut args = vec!["serve".to_string()];
        if let Some(pki) = &pki {
            let path = |p: PathBuf| p.display().to_string();
            args.extend([
                format!("--cert-file={}", path(pki.server_cert(n))),
                format!("--key-file={}", path(pki.server_key(n))),
                format!("--trusted-ca-file={}", path(pki.ca())),
                "--client-cert-auth".to_string(),
                format!("--peer-cert-file={}", path(pki.peer_cert(n))),
                format!("--peer-key-file={}", path(pki.peer_key(n))),
                format!("--peer-trusted-ca-file={}", path(pki.ca())),
                "--peer-client-cert-auth".to_string(),
            ]);
        }
        // The dashboard polls each member's state over plain HTTP on loopback: the client
        // port when it is plaintext, else a metrics URL of its own (base + 10·i + 2).
        let poll_url = match a.tls {
            true => {
                let url = format!("http://127.0.0.1:{}", port(i, true) + 1);
                args.push(format!("--listen-metrics-urls={url}"));
                url
            }
            false => client.clone(),
        };
        args.extend([
            format!("--name={n}"),
            format!("--data-dir={}", a.data_dir.join(n).display()),
            format!("--listen-client-urls={client}"),
            format!("--advertise-client-urls={client}"),
            format!("--listen-peer-urls={peer}"),
            format!("--initial-advertise-peer-urls={peer}"),
            format!("--initial-cluster={initial_cluster}"),
            "--initial-cluster-token=raftkv-local".to_string(),
            // A small local cluster hashes in microseconds: check the members agree often.
            "--experimental-corrupt-check-time=1m".to_string(),
        ]);
        specs.push(supervisor::MemberSpec {
            name: n.clone(),
            args,
            log: a.data_dir.join(format!("{n}.log")),
            client_url: client,
            poll_url,
        });
    }
    if let Some(pki) = &pki {
        // The load and the scenarios' clients present the client certificate.
        tls::set_client_dialer(tls::Dialer::from_cli(&tls::Files {
            cert: Some(pki.client_cert()),
            key: Some(pki.client_key()),
            trusted_ca: Some(pki.ca()),
            cert_auth: false,
        })?);
    }
    let dash_port = match a.dashboard_port {
        Some(p) => p,
        None => u16::try_from(u32::from(a.base_port) + 100).map_err(|_| {
            "--base-port is too high for the dashboard's port; give --dashboard-port"
        })?,
    };
    let dash_listener = tokio::net::TcpListener::bind(("127.0.0.1", dash_port))
        .await
        .map_err(|e| {
            format!("dashboard port 127.0.0.1:{dash_port}: {e}; pick another --dashboard-port")
        })?;
    let dash_addr = dash_listener.local_addr().map_err(|e| e.to_string())?;
    let (sup, mut exits) = supervisor::Supervisor::start(exe, specs).await?;
    // The controls obey only the page opened from the URL printed below (its token).
    let controls = Arc::new(server::dashboard::guard::Controls::new(dash_addr));
    let app = sup.router(controls.clone());
    tokio::spawn(async move {
        if let Err(e) = axum::serve(dash_listener, app).await {
            eprintln!("raftkv: the dashboard stopped: {e}");
        }
    });
    let endpoints = (0..a.nodes)
        .map(|i| match a.tls {
            true => format!("https://127.0.0.1:{}", port(i, false)),
            false => format!("127.0.0.1:{}", port(i, false)),
        })
        .collect::<Vec<_>>()
        .join(",");
    // etcdctl's TLS flags (raftkv's client commands take the same), if any.
    let tls_flags = match &pki {
        Some(pki) => format!(
            " --cacert {} --cert {} --key {}",
            pki.ca().display(),
            pki.client_cert().display(),
            pki.client_key().display()
        ),
        None => String::new(),
    };
    println!(
        "raftkv: {} members, data in {}",
        a.nodes,
        a.data_dir.display()
    );
    for i in 0..a.nodes {
        println!(
            "  n{i}: client {scheme}://127.0.0.1:{}  peer {scheme}://127.0.0.1:{}",
            port(i, false),
            port(i, true)
        );
    }
    println!();
    println!("Dashboard (watch it, break it): {}", controls.url());
    println!();
    println!("Try it (etcd's own client, etcdctl 3.4+):");
    println!("  ETCDCTL_API=3 etcdctl --endpoints={endpoints}{tls_flags} put hello world");
    println!("  ETCDCTL_API=3 etcdctl --endpoints={endpoints}{tls_flags} endpoint status -w table");
    println!("  ETCDCTL_API=3 etcdctl --endpoints={endpoints}{tls_flags} watch hello --prev-kv   # in another terminal");
    println!();
    println!(
        "Metrics and health (etcd's names): {scheme}://127.0.0.1:{}/metrics, /health, /version",
        port(0, false)
    );
    println!();
    println!("Ctrl-C stops the cluster; running this again brings it back with its data.");
    use std::io::Write as _;
    let _ = std::io::stdout().flush();
    // Ctrl-C reaches the whole process group: each member shuts down on its own. A member
    // that exits by itself (removed from the cluster, a failed disk) is reported and the
    // others keep running; one killed from the dashboard is the dashboard's to restart.
    loop {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => break,
            _ = terminated() => break,
            Some((name, status)) = exits.recv() => {
                eprintln!(
                    "raftkv: member {name} exited ({status}); see {}",
                    a.data_dir.join(format!("{name}.log")).display()
                );
            }
        }
    }
    sup.stop_all(Duration::from_secs(5)).await;
    println!("raftkv: stopped");
    Ok(())
}

async fn serve(a: ServeArgs) -> Result<(), String> {
    if a.initial_cluster_state != "new" && a.initial_cluster_state != "existing" {
        return Err(format!(
            "--initial-cluster-state must be \"new\" or \"existing\", not {:?}",
            a.initial_cluster_state
        ));
    }
    if a.heartbeat_interval == 0 || a.election_timeout < 5 * a.heartbeat_interval {
        return Err("--election-timeout must be at least 5 times --heartbeat-interval".into());
    }
    let mut cluster: Vec<(String, String)> = Vec::new();
    for part in a.initial_cluster.split(',').filter(|p| !p.is_empty()) {
        let (name, url) = part
            .split_once('=')
            .ok_or_else(|| format!("--initial-cluster: {part:?} is not name=url"))?;
        cluster.push((name.to_string(), url.to_string()));
    }
    // Checked before anything binds a port: a port clash must not hide a wrong name.
    if a.initial_cluster_state == "new" && !cluster.iter().any(|(n, _)| *n == a.name) {
        return Err(format!(
            "--initial-cluster has no member named {:?} (--name)",
            a.name
        ));
    }
    let urls = |s: &str| -> Vec<String> {
        s.split(',')
            .filter(|u| !u.is_empty())
            .map(str::to_string)
            .collect()
    };
    let own_client_urls = urls(&a.advertise_client_urls);
    let own_peer_urls = urls(&a.initial_advertise_peer_urls);
    let (client_addr, client_https) = listen_addr(&a.listen_client_urls, "listen-client-urls")?;
    let (peer_addr, peer_https) = listen_addr(&a.listen_peer_urls, "listen-peer-urls")?;
    let client_tls = tls::Side::load(
        &tls::Files {
            cert: a.cert_file.clone(),
            key: a.key_file.clone(),
            trusted_ca: a.trusted_ca_file.clone(),
            cert_auth: a.client_cert_auth,
        },
        tls::CLIENT_FLAGS,
        client_https,
    )?;
    let peer_tls = tls::Side::load(
        &tls::Files {
            cert: a.peer_cert_file.clone(),
            key: a.peer_key_file.clone(),
            trusted_ca: a.peer_trusted_ca_file.clone(),
            cert_auth: a.peer_client_cert_auth,
        },
        tls::PEER_FLAGS,
        peer_https,
    )?;
    // This member reaches the leader's client URL with its own client identity.
    tls::set_client_dialer(client_tls.dialer.clone());
    // Bind before touching the data directory, so a taken port is reported plainly and
    // nothing is recovered or started for nothing.
    let bind = |addr, flag: &str| {
        TcpIncoming::bind(addr)
            .map(|l| l.with_nodelay(Some(true)))
            .map_err(|e| format!("--{flag}: cannot listen on {addr}: {e}"))
    };
    let client_listener = bind(client_addr, "listen-client-urls")?;
    let peer_listener = bind(peer_addr, "listen-peer-urls")?;
    let mut metrics_listeners = Vec::new();
    for url in a.listen_metrics_urls.split(',').filter(|u| !u.is_empty()) {
        let (addr, https) = listen_addr(url, "listen-metrics-urls")?;
        if https {
            return Err(format!(
                "--listen-metrics-urls: {url:?}: metrics are served over http:// only (the \
                 client port serves them over TLS when its URLs are https://)"
            ));
        }
        let l = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|e| format!("--listen-metrics-urls: cannot listen on {addr}: {e}"))?;
        metrics_listeners.push(l);
    }
    let data_dir = a
        .data_dir
        .clone()
        .unwrap_or_else(|| PathBuf::from(format!("{}.raftkv", a.name)));
    let flags = bootstrap::Flags {
        name: a.name.clone(),
        initial_cluster: cluster,
        new_cluster: a.initial_cluster_state == "new",
        token: a.initial_cluster_token.clone(),
        advertise_peer_urls: own_peer_urls.clone(),
        data_dir: data_dir.clone(),
        peer_dialer: peer_tls.dialer.clone(),
    };
    let plan = bootstrap::plan(&flags).await?;
    let (me, cluster_id) = (plan.id, plan.cluster_id);
    let metrics = Metrics::new();
    let cfg = NodeConfig {
        id: me,
        voters: plan.voters.clone(),
        bootstrap: plan.bootstrap.clone(),
        introduced: plan.peers.keys().copied().collect(),
        cluster_id,
        data_dir,
        tick: Duration::from_millis(a.heartbeat_interval),
        election_ticks: a.election_timeout / a.heartbeat_interval,
        snapshot_count: a.snapshot_count.max(1),
        watch_progress_interval: a.experimental_watch_progress_notify_interval,
        quota_bytes: match a.quota_backend_bytes {
            0 => node::DEFAULT_QUOTA_BYTES,
            q => q,
        },
        metrics: metrics.clone(),
    };
    let cell = Arc::new(OnceLock::new());
    let hello = raftkvpb::Hello {
        cluster_id,
        member_id: me,
        client_urls: own_client_urls.clone(),
        peer_urls: own_peer_urls,
    };
    let heard = Heard::default();
    let transport = Arc::new(PeerTransport::start(
        me,
        plan.peers.clone(),
        hello,
        heard.clone(),
        cell.clone(),
        peer_tls.dialer.clone(),
    ));
    let (node, task) = Node::start(cfg, transport.clone()).await?;
    let _ = cell.set(node.clone());
    // As etcd, a member serves clients only once it has published itself through the log:
    // it then has a leader and has applied at least the entry that made it a member, so a
    // newcomer never answers from the empty store it starts with.
    let published = tokio::spawn(bootstrap::publish(
        node.clone(),
        a.name.clone(),
        own_client_urls,
    ));
    let raft_service = RaftService::new(cell, cluster_id, plan.bootstrap, transport, heard);
    let services = Services::new(node.clone());
    let leases = LeaseService::new(node.clone());
    let dashboard = a.dashboard.then(|| {
        server::dashboard::collect::Collector::start(Arc::new(server::dashboard::MemberSource(
            node.clone(),
        )))
    });
    // Under `raftkv cluster` the member lives as long as its supervisor's pipe: a
    // supervisor killed outright must not leave members holding the cluster's ports.
    let supervisor = {
        let node = node.clone();
        let supervised = a.supervised;
        async move {
            if supervised {
                take_switch(node).await
            } else {
                std::future::pending().await
            }
        }
    };
    let peer_server = tls::serve(
        tonic::transport::Server::builder().add_service(RaftServer::new(raft_service)),
        peer_listener,
        peer_tls.acceptor,
        "peer",
    );
    // etcd serves /metrics, /health and /version on the client port beside gRPC: HTTP/1
    // is accepted for them (gRPC clients speak HTTP/2 from the first byte). The guard
    // (guard.rs) keeps HTTP/1 to those GET routes and gRPC to HTTP/2 with its content type,
    // and refuses cross-origin requests: no web page can write to the store.
    let routes = tonic::service::Routes::new(KvServer::new(services.clone()))
        .add_service(MaintenanceServer::new(MaintenanceService::new(
            node.clone(),
        )))
        .add_service(WatchServer::new(WatchService::new(node.clone())))
        .add_service(ClusterServer::new(services))
        .add_service(LeaseServer::new(leases.clone()))
        .add_service(LeaseForwardServer::new(leases))
        .add_service(LockServer::new(LockService::new(node.clone())))
        .add_service(ElectionServer::new(ElectionService::new(node.clone())))
        .into_axum_router()
        .merge(http_routes(&node, &dashboard));
    let client_router = tonic::transport::Server::builder()
        .accept_http1(true)
        .layer(GuardLayer {
            https: client_tls.acceptor.is_some(),
        })
        .layer(GrpcMetricsLayer(metrics.clone()))
        .add_routes(routes.into());
    let client_server = async move {
        if published.await.is_err() {
            return Ok(());
        }
        tracing::info!("published this member; ready to serve client requests");
        match client_tls.acceptor {
            None => client_router.serve_with_incoming(client_listener).await,
            Some(acceptor) => {
                let incoming = tls::incoming_of(client_listener, acceptor, "client");
                client_router.serve_with_incoming(incoming).await
            }
        }
    };
    for listener in metrics_listeners {
        let app = http_routes(&node, &dashboard).layer(GuardLayer { https: false });
        tokio::spawn(async move {
            if let Err(e) = axum::serve(listener, app).await {
                tracing::error!("metrics listener: {e}");
            }
        });
    }
    if !a.experimental_corrupt_check_time.is_zero() {
        tokio::spawn(corrupt::run(
            node.clone(),
            a.experimental_corrupt_check_time,
        ));
    }
    println!(
        "raftkv member {} ({me:016x}) of cluster {cluster_id:016x} serving peers on {}; clients on {} once it has published itself",
        a.name, a.listen_peer_urls, a.listen_client_urls
    );
    tokio::select! {
        r = peer_server => r.map_err(|e| format!("peer listener {peer_addr}: {e}"))?,
        r = client_server => r.map_err(|e| format!("client listener {client_addr}: {e}"))?,
        _ = tokio::signal::ctrl_c() => {}
        _ = terminated() => {}
        _ = supervisor => tracing::warn!("the supervisor is gone (its pipe closed): stopping"),
        r = task => return Err(match r {
            Ok(Err(why)) if why == node::REMOVED => {
                // Give the last messages (the handover to the next leader) a moment to
                // leave before the process exits.
                tokio::time::sleep(Duration::from_millis(300)).await;
                why
            }
            Ok(Err(why)) => format!("the member stopped: {why}"),
            _ => "the raft loop stopped (see the log above)".into(),
        }),
    }
    node.stop();
    Ok(())
}

/// What the client port and metrics URLs serve over HTTP/1: /metrics, /health, /version,
/// the member's dashboard state, and the page itself with `--dashboard`.
fn http_routes(
    node: &server::node::Node,
    dashboard: &Option<Arc<server::dashboard::collect::Collector>>,
) -> axum::Router {
    let mut r = health::router(node.clone()).merge(server::dashboard::state_routes(node.clone()));
    if let Some(c) = dashboard {
        r = r.merge(server::dashboard::page_routes(c.clone()));
    }
    r
}

/// Under `raftkv cluster`: apply the supervisor's network switch, a line at a time from
/// stdin (a pipe only the supervisor holds). A line that does not parse is logged and
/// ignored. Returns at the end of the pipe: the supervisor is gone.
async fn take_switch(node: server::node::Node) {
    use tokio::io::AsyncBufReadExt;
    let mut lines = tokio::io::BufReader::new(tokio::io::stdin()).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        match server::insight::parse_cut(&line) {
            Ok(cut) => {
                if node.cut(cut).await.is_err() {
                    // The member is stopping: its raft loop says why.
                    std::future::pending::<()>().await;
                }
            }
            Err(e) => tracing::warn!("supervisor: {e}"),
        }
    }
}

mod bench;
mod bench_lease;
mod bench_watch;
mod client;
mod h2call;
mod member_cli;
mod snapshot_cli;

/// A member's runtime. One thread by default: the raft loop is one task whatever the
/// thread count, and on a small machine shared by several members (or with the clients),
/// handing work between threads costs more than a second thread gains — measured with
/// `raftkv bench put --clients 256` on 2 cores: ~18k puts/s with tokio's default
/// multi-threaded runtime, ~25k with one thread. Storage syncs on a thread of its own.
fn serve_runtime(threads: usize) -> std::io::Result<tokio::runtime::Runtime> {
    if threads <= 1 {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(threads)
            .enable_all()
            .build()
    }
}

/// Logs go to stderr: one line per event that matters to an operator (elections, leader
/// changes, snapshots, compactions, membership changes, alarms, refused peers, a failed
/// disk); nothing per request.
fn init_logging(log: &LogArgs) {
    let b = tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_max_level(log.log_level)
        .with_target(false);
    if log.log_format == "json" {
        b.json().init();
    } else {
        b.init();
    }
}

fn main() {
    let cli = Cli::parse();
    match &cli.cmd {
        Cmd::Serve(a) => init_logging(&a.log),
        _ => init_logging(&LogArgs {
            log_level: tracing::Level::INFO,
            log_format: "text".into(),
        }),
    }
    let rt = match &cli.cmd {
        Cmd::Serve(a) => serve_runtime(a.worker_threads),
        _ => tokio::runtime::Runtime::new(),
    }
    .expect("start the tokio runtime");
    let result = rt.block_on(async {
        match cli.cmd {
            Cmd::Serve(a) => serve(*a).await,
            Cmd::Cluster(a) => cluster(a).await,
            Cmd::Put { key, value, c } => client::put(c.endpoints()?, key, value).await,
            Cmd::Get {
                key,
                prefix,
                serializable,
                c,
            } => client::get(c.endpoints()?, key, prefix, serializable).await,
            Cmd::Del { key, prefix, c } => client::del(c.endpoints()?, key, prefix).await,
            Cmd::Watch {
                key,
                prefix,
                rev,
                prev_kv,
                c,
            } => client::watch(c.endpoints()?, key, prefix, rev, prev_kv).await,
            Cmd::Status { c } => client::status(c.endpoints()?).await,
            Cmd::Member { cmd, c } => member_cli::run(c.endpoints()?, cmd).await,
            Cmd::MoveLeader { id, c } => member_cli::move_leader(c.endpoints()?, &id).await,
            Cmd::Snapshot { cmd, c } => snapshot_cli::run(c.endpoints()?, cmd).await,
            Cmd::Bench(a) => bench::run(a).await,
            Cmd::BenchWatch(a) => bench_watch::run(a).await,
            Cmd::BenchLease(a) => bench_lease::run(a).await,
        }
    });
    if let Err(e) = result {
        eprintln!("raftkv: {e}");
        std::process::exit(1);
    }
}
