//! `raftkv`: a strongly consistent key-value store speaking etcd's v3 API.
//!
//! `raftkv serve` takes etcd's flag names with etcd's meanings, so whoever can start an etcd
//! cluster can start raftkv the same way.

use clap::{Parser, Subcommand};
use server::grpc::{Member, Services};
use server::node::{Node, NodeConfig};
use server::pb::etcdserverpb::{
    cluster_server::ClusterServer, kv_server::KvServer, maintenance_server::MaintenanceServer,
};
use server::pb::raftkvpb::raft_server::RaftServer;
use server::transport::{PeerTransport, RaftService};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

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
    Serve(ServeArgs),
}

#[derive(Parser, Debug)]
struct ServeArgs {
    /// Human-readable name of this member; must appear in --initial-cluster.
    #[arg(long, default_value = "default")]
    name: String,
    /// Where this member keeps its log and snapshots.
    #[arg(long)]
    data_dir: Option<PathBuf>,
    #[arg(long, default_value = "http://127.0.0.1:2379")]
    listen_client_urls: String,
    #[arg(long, default_value = "http://127.0.0.1:2379")]
    advertise_client_urls: String,
    #[arg(long, default_value = "http://127.0.0.1:2380")]
    listen_peer_urls: String,
    #[arg(long, default_value = "http://127.0.0.1:2380")]
    initial_advertise_peer_urls: String,
    /// Every member as name=peer-url, comma separated.
    #[arg(long, default_value = "default=http://127.0.0.1:2380")]
    initial_cluster: String,
    /// "new" or "existing".
    #[arg(long, default_value = "new")]
    initial_cluster_state: String,
    /// Distinguishes clusters: members of different clusters refuse each other's data.
    #[arg(long, default_value = "etcd-cluster")]
    initial_cluster_token: String,
    /// Entries applied between snapshots (log compactions).
    #[arg(long, default_value_t = 100_000)]
    snapshot_count: u64,
    /// Heartbeat interval in milliseconds.
    #[arg(long, default_value_t = 100)]
    heartbeat_interval: u64,
    /// Election timeout in milliseconds.
    #[arg(long, default_value_t = 1000)]
    election_timeout: u64,
}

/// FNV-1a: a stable hash for ids derived from names (the same on every node and release).
fn fnv(parts: &[&str]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for p in parts {
        for b in p.bytes().chain([0u8]) {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
    h.max(1)
}

fn listen_addr(urls: &str, flag: &str) -> Result<SocketAddr, String> {
    let first = urls.split(',').next().unwrap_or_default();
    let hostport = first.strip_prefix("http://").ok_or_else(|| {
        format!("--{flag}: {first:?} must start with http:// (TLS is not supported yet)")
    })?;
    hostport
        .parse()
        .map_err(|_| format!("--{flag}: {first:?} is not an http://IP:port address"))
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
    cluster.sort();
    if !cluster.iter().any(|(n, _)| *n == a.name) {
        return Err(format!(
            "--initial-cluster has no member named {:?} (--name)",
            a.name
        ));
    }
    let token = a.initial_cluster_token.as_str();
    let names: Vec<&str> = cluster.iter().map(|(n, _)| n.as_str()).collect();
    let cluster_id = fnv(&[&[token][..], &names[..]].concat());
    let id_of = |name: &str| fnv(&[token, name]);
    let me = id_of(&a.name);
    let members: Vec<Member> = cluster
        .iter()
        .map(|(name, url)| Member {
            id: id_of(name),
            name: name.clone(),
            peer_urls: vec![url.clone()],
            client_urls: if *name == a.name {
                a.advertise_client_urls
                    .split(',')
                    .map(str::to_string)
                    .collect()
            } else {
                Vec::new()
            },
        })
        .collect();
    let peers: HashMap<u64, String> = members
        .iter()
        .filter(|m| m.id != me)
        .map(|m| (m.id, m.peer_urls[0].clone()))
        .collect();
    let client_addr = listen_addr(&a.listen_client_urls, "listen-client-urls")?;
    let peer_addr = listen_addr(&a.listen_peer_urls, "listen-peer-urls")?;
    let data_dir = a
        .data_dir
        .clone()
        .unwrap_or_else(|| PathBuf::from(format!("{}.raftkv", a.name)));
    let cfg = NodeConfig {
        id: me,
        voters: members.iter().map(|m| m.id).collect(),
        cluster_id,
        data_dir,
        tick: Duration::from_millis(a.heartbeat_interval),
        election_ticks: a.election_timeout / a.heartbeat_interval,
        snapshot_count: a.snapshot_count.max(1),
    };
    let cell = Arc::new(OnceLock::new());
    let transport = PeerTransport::start(peers);
    let (node, task) = Node::start(cfg, Arc::new(transport))?;
    let _ = cell.set(node.clone());
    let services = Services::new(node.clone(), members, cluster_id, me);
    let peer_server = tonic::transport::Server::builder()
        .add_service(RaftServer::new(RaftService::new(cell)))
        .add_service(KvServer::new(services.clone()))
        .serve(peer_addr);
    let client_server = tonic::transport::Server::builder()
        .add_service(KvServer::new(services.clone()))
        .add_service(MaintenanceServer::new(services.clone()))
        .add_service(ClusterServer::new(services))
        .serve(client_addr);
    println!(
        "raftkv member {} ({me:016x}) of cluster {cluster_id:016x} serving clients on {} and peers on {}",
        a.name, a.listen_client_urls, a.listen_peer_urls
    );
    tokio::select! {
        r = peer_server => r.map_err(|e| format!("peer listener {peer_addr}: {e}"))?,
        r = client_server => r.map_err(|e| format!("client listener {client_addr}: {e}"))?,
        _ = tokio::signal::ctrl_c() => {}
        _ = task => return Err("the raft loop stopped (see the log above)".into()),
    }
    node.stop();
    Ok(())
}

fn main() {
    let cli = Cli::parse();
    let rt = tokio::runtime::Runtime::new().expect("start the tokio runtime");
    let result = rt.block_on(async {
        match cli.cmd {
            Cmd::Serve(a) => serve(a).await,
        }
    });
    if let Err(e) = result {
        eprintln!("raftkv: {e}");
        std::process::exit(1);
    }
}

/// Keep the id derivation stable: data directories depend on it.
#[cfg(test)]
mod tests {
    #[test]
    fn member_ids_are_stable() {
        assert_eq!(
            super::fnv(&["etcd-cluster", "n1"]),
            super::fnv(&["etcd-cluster", "n1"])
        );
        assert_ne!(
            super::fnv(&["etcd-cluster", "n1"]),
            super::fnv(&["other", "n1"])
        );
    }
}
