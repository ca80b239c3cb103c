//! A member from start to stop, given its configuration: bind the ports, decide who it is
//! (`bootstrap`), start the raft loop, then serve peers on the peer port and etcd's API,
//! `/metrics`, `/health` and the dashboard on the client port. `raftkv serve` maps etcd's
//! flags onto a [`Config`]; a program embedding a member builds one itself.
//!
//! Errors name etcd's flags (`--listen-client-urls: …`): a [`Config`] is those flags,
//! typed, and the operator who gave a wrong one should be told which.

use super::bootstrap;
use super::corrupt;
use super::node::{self, Node, NodeConfig};
use crate::network::guard::GuardLayer;
use crate::network::tls;
use crate::network::transport::{Heard, PeerTransport, RaftService, MAX_FRAME_DECODE};
use crate::operations::dashboard;
use crate::operations::grpc_metrics::GrpcMetricsLayer;
use crate::operations::health;
use crate::operations::metrics::Metrics;
use crate::pb::etcdserverpb::{
    cluster_server::ClusterServer, kv_server::KvServer, lease_server::LeaseServer,
    maintenance_server::MaintenanceServer, watch_server::WatchServer,
};
use crate::pb::raftkvpb::{
    self, lease_forward_server::LeaseForwardServer, raft_server::RaftServer,
};
use crate::pb::v3electionpb::election_server::ElectionServer;
use crate::pb::v3lockpb::lock_server::LockServer;
use crate::services::election::ElectionService;
use crate::services::lease::LeaseService;
use crate::services::lock::LockService;
use crate::services::maintenance::MaintenanceService;
use crate::services::watch::WatchService;
use crate::services::Services;
use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::time::Duration;
use tonic::transport::server::TcpIncoming;

/// A member's configuration: etcd's flags, parsed.
#[derive(Debug, Clone)]
pub struct Config {
    /// This member's name; a new cluster's `initial_cluster` must name it.
    pub name: String,
    /// Where the member keeps its log and snapshots.
    pub data_dir: PathBuf,
    /// `--listen-client-urls`: the first URL is bound (http:// or https://).
    pub listen_client_urls: String,
    /// `--advertise-client-urls`: what other members and clients are told.
    pub advertise_client_urls: Vec<String>,
    /// `--listen-peer-urls`: the first URL is bound.
    pub listen_peer_urls: String,
    /// `--initial-advertise-peer-urls`.
    pub advertise_peer_urls: Vec<String>,
    /// `--initial-cluster`: every founding member as (name, peer URL).
    pub initial_cluster: Vec<(String, String)>,
    /// `--initial-cluster-state new` (true) or `existing`.
    pub new_cluster: bool,
    /// `--initial-cluster-token`.
    pub token: String,
    /// Entries applied between snapshots.
    pub snapshot_count: u64,
    /// The raft tick; the election timeout must be at least five of them.
    pub heartbeat: Duration,
    pub election_timeout: Duration,
    /// How often watchers that asked for progress notifications get one.
    pub watch_progress_interval: Duration,
    /// Certificates of the client port and of the peer port.
    pub client_tls: tls::Files,
    pub peer_tls: tls::Files,
    /// The store's quota in bytes (0: etcd's default).
    pub quota_bytes: u64,
    /// More plain-HTTP URLs serving `/metrics`, `/health` and `/version`.
    pub listen_metrics_urls: Vec<String>,
    /// How often the leader checks every member's HashKV (zero: never).
    pub corrupt_check: Duration,
    /// Serve the read-only dashboard page at `/dashboard/`.
    pub dashboard: bool,
}

/// A future a member runs until it ends.
type Task = Pin<Box<dyn Future<Output = Result<(), String>> + Send>>;

/// A started member: its raft loop running, its ports bound, serving once [`Member::run`]
/// is awaited.
pub struct Member {
    node: Node,
    servers: Task,
    task: tokio::task::JoinHandle<Result<(), String>>,
}

impl Member {
    /// Bind every port, recover or bootstrap the member's state and start its raft loop.
    /// Nothing is served until [`Member::run`].
    pub async fn start(c: Config) -> Result<Member, String> {
        if c.heartbeat.is_zero() || c.election_timeout < 5 * c.heartbeat {
            return Err("--election-timeout must be at least 5 times --heartbeat-interval".into());
        }
        // Checked before anything binds a port: a port clash must not hide a wrong name.
        if c.new_cluster && !c.initial_cluster.iter().any(|(n, _)| *n == c.name) {
            return Err(format!(
                "--initial-cluster has no member named {:?} (--name)",
                c.name
            ));
        }
        let (client_addr, client_https) = listen_addr(&c.listen_client_urls, "listen-client-urls")?;
        let (peer_addr, peer_https) = listen_addr(&c.listen_peer_urls, "listen-peer-urls")?;
        let client_tls = tls::Side::load(&c.client_tls, tls::CLIENT_FLAGS, client_https)?;
        let peer_tls = tls::Side::load(&c.peer_tls, tls::PEER_FLAGS, peer_https)?;
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
        let metrics_listeners = bind_metrics(&c.listen_metrics_urls).await?;
        let flags = bootstrap::Flags {
            name: c.name.clone(),
            initial_cluster: c.initial_cluster.clone(),
            new_cluster: c.new_cluster,
            token: c.token.clone(),
            advertise_peer_urls: c.advertise_peer_urls.clone(),
            data_dir: c.data_dir.clone(),
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
            data_dir: c.data_dir.clone(),
            tick: c.heartbeat,
            election_ticks: (c.election_timeout.as_millis() / c.heartbeat.as_millis().max(1))
                as u64,
            snapshot_count: c.snapshot_count.max(1),
            watch_progress_interval: c.watch_progress_interval,
            quota_bytes: match c.quota_bytes {
                0 => node::DEFAULT_QUOTA_BYTES,
                q => q,
            },
            metrics: metrics.clone(),
        };
        let cell = Arc::new(OnceLock::new());
        let hello = raftkvpb::Hello {
            cluster_id,
            member_id: me,
            client_urls: c.advertise_client_urls.clone(),
            peer_urls: c.advertise_peer_urls.clone(),
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
        // As etcd, a member serves clients only once it has published itself through the
        // log: it then has a leader and has applied at least the entry that made it a
        // member, so a newcomer never answers from the empty store it starts with.
        let published = tokio::spawn(bootstrap::publish(
            node.clone(),
            c.name.clone(),
            c.advertise_client_urls.clone(),
        ));
        let raft_service = RaftService::new(cell, cluster_id, plan.bootstrap, transport, heard);
        let page = c.dashboard.then(|| {
            dashboard::collect::Collector::start(Arc::new(dashboard::MemberSource(node.clone())))
        });
        let peer_server = tls::serve(
            tonic::transport::Server::builder().add_service(
                RaftServer::new(raft_service).max_decoding_message_size(MAX_FRAME_DECODE),
            ),
            peer_listener,
            peer_tls.acceptor,
            "peer",
        );
        let client_router = tonic::transport::Server::builder()
            .accept_http1(true)
            .layer(GuardLayer {
                https: client_tls.acceptor.is_some(),
            })
            .layer(GrpcMetricsLayer(metrics.clone()))
            .add_routes(client_routes(&node, &page).into());
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
            let app = http_routes(&node, &page).layer(GuardLayer { https: false });
            tokio::spawn(async move {
                if let Err(e) = axum::serve(listener, app).await {
                    tracing::error!("metrics listener: {e}");
                }
            });
        }
        if !c.corrupt_check.is_zero() {
            tokio::spawn(corrupt::run(node.clone(), c.corrupt_check));
        }
        println!(
            "raftkv member {} ({me:016x}) of cluster {cluster_id:016x} serving peers on {}; clients on {} once it has published itself",
            c.name, c.listen_peer_urls, c.listen_client_urls
        );
        let servers: Task = Box::pin(async move {
            tokio::select! {
                r = peer_server => r.map_err(|e| format!("peer listener {peer_addr}: {e}")),
                r = client_server => r.map_err(|e| format!("client listener {client_addr}: {e}")),
            }
        });
        Ok(Member {
            node,
            servers,
            task,
        })
    }

    /// The running member (for a supervisor's network switch, or an embedding program).
    pub fn node(&self) -> &Node {
        &self.node
    }

    /// Serve until `stop` completes (then stop cleanly), a listener fails, or the member
    /// stops on its own: removed from the cluster ([`node::REMOVED`]) or a failed disk.
    pub async fn run(self, stop: impl Future<Output = ()>) -> Result<(), String> {
        tokio::select! {
            r = self.servers => r?,
            _ = stop => {}
            r = self.task => return Err(match r {
                Ok(Err(why)) if why == node::REMOVED => {
                    // Give the last messages (the handover to the next leader) a moment
                    // to leave before the process exits.
                    tokio::time::sleep(Duration::from_millis(300)).await;
                    why
                }
                Ok(Err(why)) => format!("the member stopped: {why}"),
                _ => "the raft loop stopped (see the log above)".into(),
            }),
        }
        self.node.stop();
        Ok(())
    }
}

/// Everything the client port serves. etcd serves /metrics, /health and /version on the
/// client port beside gRPC: HTTP/1 is accepted for them (gRPC clients speak HTTP/2 from the
/// first byte). The guard (`network/guard.rs`) keeps HTTP/1 to those GET routes and gRPC to
/// HTTP/2 with its content type, and refuses cross-origin requests: no web page can write
/// to the store.
fn client_routes(node: &Node, page: &Option<Arc<dashboard::collect::Collector>>) -> axum::Router {
    let services = Services::new(node.clone());
    let leases = LeaseService::new(node.clone());
    tonic::service::Routes::new(KvServer::new(services.clone()))
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
        .merge(http_routes(node, page))
}

/// What the client port and metrics URLs serve over HTTP/1: /metrics, /health, /version,
/// the member's dashboard state, and the page itself with `--dashboard`.
fn http_routes(node: &Node, page: &Option<Arc<dashboard::collect::Collector>>) -> axum::Router {
    let mut r = health::router(node.clone()).merge(dashboard::state_routes(node.clone()));
    if let Some(c) = page {
        r = r.merge(dashboard::page_routes(c.clone()));
    }
    r
}

async fn bind_metrics(urls: &[String]) -> Result<Vec<tokio::net::TcpListener>, String> {
    let mut listeners = Vec::new();
    for url in urls {
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
        listeners.push(l);
    }
    Ok(listeners)
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
