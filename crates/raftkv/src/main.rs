//! `raftkv`: a strongly consistent key-value store speaking etcd's v3 API.
//!
//! The command-line program: `serve` runs a member (`serve.rs`, etcd's flags onto the
//! server library's configuration), `cluster` a local cluster with its dashboard
//! (`cluster/`), `put`/`get`/`del`/`watch`/`status` are a small client (`client.rs`),
//! `member` and `move-leader` change membership (`member.rs`), `snapshot` takes and
//! restores backups (`snapshot.rs`), and `bench…` are load generators (`bench/`).

mod bench;
mod client;
mod cluster;
mod member;
mod serve;
mod snapshot;

use clap::{Parser, Subcommand};
use std::path::PathBuf;

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
    Serve(Box<serve::ServeArgs>),
    /// Run a local cluster of child processes on loopback; Ctrl-C stops it, and running it
    /// again brings it back with its data.
    Cluster(cluster::ClusterArgs),
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
        cmd: member::MemberCmd,
        #[command(flatten)]
        c: ClientArgs,
    },
    /// Backups: save a member's snapshot, check a file, restore a new cluster from one.
    Snapshot {
        #[command(subcommand)]
        cmd: snapshot::SnapshotCmd,
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
    BenchWatch(bench::watch::WatchArgs),
    /// Benchmark leases: grant many, keep them all alive, let others lapse; reports grants
    /// and keep-alives per second, how late expired leases are revoked, memory per lease
    BenchLease(bench::lease::LeaseArgs),
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
        let files = server::network::tls::Files {
            cert: self.cert.clone(),
            key: self.cert_key.clone(),
            trusted_ca: self.cacert.clone(),
            cert_auth: false,
        };
        server::network::tls::set_client_dialer(server::network::tls::Dialer::from_files(&files)?);
        Ok(&self.endpoints)
    }
}

/// SIGTERM, as sent by service managers and `kill`.
pub(crate) async fn terminated() {
    match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(mut s) => {
            s.recv().await;
        }
        Err(_) => std::future::pending().await,
    }
}

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
fn init_logging(log: &serve::LogArgs) {
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
        _ => init_logging(&serve::LogArgs {
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
            Cmd::Serve(a) => serve::run(*a).await,
            Cmd::Cluster(a) => cluster::run(a).await,
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
            Cmd::Member { cmd, c } => member::run(c.endpoints()?, cmd).await,
            Cmd::MoveLeader { id, c } => member::move_leader(c.endpoints()?, &id).await,
            Cmd::Snapshot { cmd, c } => snapshot::run(c.endpoints()?, cmd).await,
            Cmd::Bench(a) => bench::run(a).await,
            Cmd::BenchWatch(a) => bench::watch::run(a).await,
            Cmd::BenchLease(a) => bench::lease::run(a).await,
        }
    });
    if let Err(e) = result {
        eprintln!("raftkv: {e}");
        std::process::exit(1);
    }
}
