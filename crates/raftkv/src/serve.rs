//! `raftkv serve`: one member, started with etcd's flags (and their `ETCD_*` environment
//! variables) with etcd's meanings, so whoever can start an etcd cluster can start raftkv
//! the same way. This file only maps the flags onto [`server::member::Config`]; the
//! member itself is the server library's.

use clap::Parser;
use server::member::{node::Node, Config, Member};
use server::network::tls;
use std::path::PathBuf;
use std::time::Duration;

/// etcd's flags, each also taken from its environment variable as etcd does
/// (`ETCD_NAME`, `ETCD_INITIAL_CLUSTER`, …: what `etcdctl member add` prints); a flag given
/// on the command line wins.
#[derive(Parser, Debug)]
pub struct ServeArgs {
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
    pub worker_threads: usize,
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
    pub log: LogArgs,
}

/// How the process logs (to stderr).
#[derive(Parser, Debug, Clone)]
pub struct LogArgs {
    /// debug, info, warn or error.
    #[arg(long, default_value = "info", value_parser = parse_log_level, env = "ETCD_LOG_LEVEL")]
    pub log_level: tracing::Level,
    /// text (one human-readable line per event) or json (one JSON object per line).
    #[arg(long, default_value = "text", value_parser = ["text", "json"], env = "ETCD_LOG_FORMAT")]
    pub log_format: String,
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

impl ServeArgs {
    /// The member's configuration, or which flag is wrong.
    fn config(&self) -> Result<Config, String> {
        let a = self;
        if a.initial_cluster_state != "new" && a.initial_cluster_state != "existing" {
            return Err(format!(
                "--initial-cluster-state must be \"new\" or \"existing\", not {:?}",
                a.initial_cluster_state
            ));
        }
        let initial_cluster = initial_cluster(&a.initial_cluster)?;
        let urls = |s: &str| -> Vec<String> {
            s.split(',')
                .filter(|u| !u.is_empty())
                .map(str::to_string)
                .collect()
        };
        Ok(Config {
            name: a.name.clone(),
            data_dir: a
                .data_dir
                .clone()
                .unwrap_or_else(|| PathBuf::from(format!("{}.raftkv", a.name))),
            listen_client_urls: a.listen_client_urls.clone(),
            advertise_client_urls: urls(&a.advertise_client_urls),
            listen_peer_urls: a.listen_peer_urls.clone(),
            advertise_peer_urls: urls(&a.initial_advertise_peer_urls),
            initial_cluster,
            new_cluster: a.initial_cluster_state == "new",
            token: a.initial_cluster_token.clone(),
            snapshot_count: a.snapshot_count,
            heartbeat: Duration::from_millis(a.heartbeat_interval),
            election_timeout: Duration::from_millis(a.election_timeout),
            watch_progress_interval: a.experimental_watch_progress_notify_interval,
            client_tls: tls::Files {
                cert: a.cert_file.clone(),
                key: a.key_file.clone(),
                trusted_ca: a.trusted_ca_file.clone(),
                cert_auth: a.client_cert_auth,
            },
            peer_tls: tls::Files {
                cert: a.peer_cert_file.clone(),
                key: a.peer_key_file.clone(),
                trusted_ca: a.peer_trusted_ca_file.clone(),
                cert_auth: a.peer_client_cert_auth,
            },
            quota_bytes: a.quota_backend_bytes,
            listen_metrics_urls: urls(&a.listen_metrics_urls),
            corrupt_check: a.experimental_corrupt_check_time,
            dashboard: a.dashboard,
        })
    }
}

/// `--initial-cluster`: name=peer-url pairs, comma separated.
pub fn initial_cluster(flag: &str) -> Result<Vec<(String, String)>, String> {
    let mut members = Vec::new();
    for part in flag.split(',').filter(|p| !p.is_empty()) {
        let (name, url) = part
            .split_once('=')
            .ok_or_else(|| format!("--initial-cluster: {part:?} is not name=url"))?;
        members.push((name.to_string(), url.to_string()));
    }
    Ok(members)
}

/// Run the member until Ctrl-C or SIGTERM (or, under `raftkv cluster`, until the
/// supervisor's pipe closes).
pub async fn run(a: ServeArgs) -> Result<(), String> {
    let member = Member::start(a.config()?).await?;
    // Under `raftkv cluster` the member lives as long as its supervisor's pipe: a
    // supervisor killed outright must not leave members holding the cluster's ports.
    let node = member.node().clone();
    let supervised = a.supervised;
    let supervisor = async move {
        if supervised {
            take_switch(node).await
        } else {
            std::future::pending().await
        }
    };
    let stop = async move {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = crate::terminated() => {}
            _ = supervisor => tracing::warn!("the supervisor is gone (its pipe closed): stopping"),
        }
    };
    member.run(stop).await
}

/// Under `raftkv cluster`: apply the supervisor's network switch, a line at a time from
/// stdin (a pipe only the supervisor holds). A line that does not parse is logged and
/// ignored. Returns at the end of the pipe: the supervisor is gone.
async fn take_switch(node: Node) {
    use tokio::io::AsyncBufReadExt;
    let mut lines = tokio::io::BufReader::new(tokio::io::stdin()).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        match server::operations::insight::parse_cut(&line) {
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
