//! Who this member is and which cluster it belongs to, decided once at its first start and
//! kept in its data directory ever after (as etcd does, the `--initial-*` flags matter only
//! for a member's first start):
//! - `--initial-cluster-state new`: the founding members derive the cluster id and their
//!   ids from the cluster token and the names in `--initial-cluster` (the same on each);
//! - `existing`: a newcomer asks the members it is given for the cluster (id, the registry it
//!   was bootstrapped with, its members now) and finds itself there by its peer URLs, as
//!   `member add` recorded them.
//!
//! The registry the cluster was bootstrapped with is written to the data directory
//! (`MEMBERS`): every member's replicated registry starts from it. A newcomer also writes
//! down the members the cluster named when it joined (`JOINED`): until its own log tells it
//! who the members are, those are the peers it admits and reaches. The bootstrap registry
//! alone would not do — after earlier replacements it names members long gone, possibly at
//! the newcomer's own peer URL, and none of the members that now run.

use crate::member::members::Registry;
use crate::member::node::Node;
use crate::pb::raftkvpb::{self as pb, raft_client::RaftClient};
use raft::NodeId;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

const MEMBERS_FILE: &str = "MEMBERS";
const JOINED_FILE: &str = "JOINED";

/// The flags a member's identity is decided from.
#[derive(Clone, Debug)]
pub struct Flags {
    pub name: String,
    /// `--initial-cluster`, as (name, peer URL) pairs.
    pub initial_cluster: Vec<(String, String)>,
    /// `--initial-cluster-state new` (true) or `existing`.
    pub new_cluster: bool,
    pub token: String,
    pub advertise_peer_urls: Vec<String>,
    pub data_dir: PathBuf,
    /// How to reach https:// peer URLs (the peer certificate and trusted CA).
    pub peer_dialer: crate::network::tls::Dialer,
}

/// What a member starts with.
#[derive(Clone, Debug)]
pub struct Plan {
    pub id: NodeId,
    pub cluster_id: u64,
    /// The voters the cluster was bootstrapped with, if this member was one of them (a
    /// member that joined later starts empty and learns its configuration from the log).
    pub voters: Vec<NodeId>,
    pub bootstrap: Registry,
    /// For a member that joined an existing cluster: the members the cluster named when it
    /// joined (id → peer URL), itself excluded. It admits and reaches them before its log
    /// says who the members are. Empty for a founding member.
    pub peers: HashMap<NodeId, String>,
}

/// FNV-1a: a stable hash for ids derived from names (the same on every node and release).
pub fn fnv(parts: &[&str]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for p in parts {
        for b in p.bytes().chain([0u8]) {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
    h.max(1)
}

impl Flags {
    /// The cluster a founding member describes: its id, and the registry it starts with.
    fn founding(&self) -> (u64, Registry) {
        let mut names: Vec<&str> = self
            .initial_cluster
            .iter()
            .map(|(n, _)| n.as_str())
            .collect();
        names.sort();
        names.dedup();
        let cluster_id = fnv(&[&[self.token.as_str()][..], &names[..]].concat());
        let mut by_name: Vec<(NodeId, String, Vec<String>)> = Vec::new();
        for (name, url) in &self.initial_cluster {
            let id = self.id_of(name);
            match by_name.iter_mut().find(|m| m.0 == id) {
                Some(m) => m.2.push(url.clone()),
                None => by_name.push((id, name.clone(), vec![url.clone()])),
            }
        }
        (cluster_id, Registry::bootstrap(by_name))
    }

    fn id_of(&self, name: &str) -> NodeId {
        fnv(&[&self.token, name])
    }
}

/// Decide who this member is (see the module's comment).
pub async fn plan(f: &Flags) -> Result<Plan, String> {
    let on_disk = storage::Identity::read(&f.data_dir).map_err(|e| e.to_string())?;
    let saved = storage::read_small_file(&f.data_dir, MEMBERS_FILE)
        .map_err(|e| e.to_string())?
        .map(|b| Registry::decode(&b))
        .transpose()?;
    match (on_disk, f.new_cluster) {
        // A founding member, first start or not: the flags name the cluster, and the data
        // directory must be that cluster's (storage checks the identity).
        (_, true) => {
            let (cluster_id, founding) = f.founding();
            let id = f.id_of(&f.name);
            if !founding.members.contains_key(&id) {
                return Err(format!(
                    "--initial-cluster has no member named {:?} (--name)",
                    f.name
                ));
            }
            let bootstrap = match (on_disk, saved) {
                (Some(_), Some(saved)) => saved,
                _ => {
                    save(&f.data_dir, &founding)?;
                    founding
                }
            };
            let voters = bootstrap.members.keys().copied().collect();
            Ok(Plan {
                id,
                cluster_id,
                voters,
                bootstrap,
                peers: HashMap::new(),
            })
        }
        // A member that joined earlier, restarting: everything is on its disk.
        (Some(ident), false) => {
            let bootstrap = saved.ok_or_else(|| {
                format!(
                    "{} has data but no {MEMBERS_FILE} file; it was not written by a member \
                     that joined with --initial-cluster-state existing",
                    f.data_dir.display()
                )
            })?;
            let voters = if bootstrap.members.contains_key(&ident.node_id) {
                bootstrap.members.keys().copied().collect()
            } else {
                Vec::new()
            };
            let joined = storage::read_small_file(&f.data_dir, JOINED_FILE)
                .map_err(|e| e.to_string())?
                .map(|b| Registry::decode(&b))
                .transpose()?;
            let peers = joined.map_or_else(HashMap::new, |r| peers_of(&r, ident.node_id, f));
            Ok(Plan {
                id: ident.node_id,
                cluster_id: ident.cluster_id,
                voters,
                bootstrap,
                peers,
            })
        }
        (None, false) => join(f).await,
    }
}

/// A new cluster's founding facts from its flags, for `raftkv snapshot restore` (which
/// builds a data directory the member will then start from as a founding member): the
/// cluster id, this member's id, and the registry the cluster starts with.
pub fn founding(f: &Flags) -> Result<(u64, NodeId, Registry), String> {
    let (cluster_id, registry) = f.founding();
    let id = f.id_of(&f.name);
    if !registry.members.contains_key(&id) {
        return Err(format!(
            "--initial-cluster has no member named {:?} (--name)",
            f.name
        ));
    }
    Ok((cluster_id, id, registry))
}

/// Record the registry a cluster was bootstrapped with in the data directory.
pub fn save(dir: &Path, r: &Registry) -> Result<(), String> {
    storage::write_small_file(dir, MEMBERS_FILE, &r.encode()).map_err(|e| e.to_string())
}

/// How long a newcomer keeps asking before it concludes that the cluster does not know it:
/// `member add` answers once its entry applied on the member that took it, and the member
/// asked may apply it a moment later.
const JOIN_PATIENCE: Duration = Duration::from_secs(3);

/// A newcomer's first start: ask the cluster who we are.
async fn join(f: &Flags) -> Result<Plan, String> {
    let mine = |u: &String| f.advertise_peer_urls.contains(u);
    let others: Vec<&String> = f
        .initial_cluster
        .iter()
        .map(|(_, u)| u)
        .filter(|u| !mine(u))
        .collect();
    if others.is_empty() {
        return Err(
            "--initial-cluster-state existing: --initial-cluster names no other member to join \
             through"
                .into(),
        );
    }
    let deadline = tokio::time::Instant::now() + JOIN_PATIENCE;
    loop {
        // Every member named is asked: one that answers without us may just be behind.
        let mut unreachable = None;
        let mut unknown = None;
        for url in &others {
            match ask(url, &f.peer_dialer).await {
                Ok(info) => match find_self(f, info)? {
                    Ok(plan) => return Ok(plan),
                    Err(why) => unknown = Some(why),
                },
                Err(e) => unreachable = Some(format!("{url}: {e}")),
            }
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(unknown.unwrap_or_else(|| {
                format!(
                    "--initial-cluster-state existing: could not reach any member of the \
                     cluster to join it ({})",
                    unreachable.unwrap_or_default()
                )
            }));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// This member in a cluster's answer: its plan, or (inner error) why the answer does not
/// name it; the outer error is final (the member runs elsewhere, a malformed answer).
fn find_self(f: &Flags, info: pb::ClusterInfo) -> Result<Result<Plan, String>, String> {
    let mine = |u: &String| f.advertise_peer_urls.contains(u);
    let current = Registry::from_pb(info.current.unwrap_or_default())?;
    let bootstrap = Registry::from_pb(info.bootstrap.unwrap_or_default())?;
    let Some(me) = current
        .members
        .values()
        .find(|m| m.peer_urls.iter().any(mine))
    else {
        return Ok(Err(format!(
            "cluster {:016x} has no member with peer URLs {}: add this member first \
             (etcdctl member add {} --peer-urls={}), then start it with \
             --initial-cluster-state existing",
            info.cluster_id,
            f.advertise_peer_urls.join(","),
            f.name,
            f.advertise_peer_urls.join(",")
        )));
    };
    if !me.name.is_empty() && me.name != f.name {
        return Err(format!(
            "the member with peer URLs {} already runs as {:?}; a new member needs its own \
             `member add`",
            f.advertise_peer_urls.join(","),
            me.name
        ));
    }
    let id = me.id;
    save(&f.data_dir, &bootstrap)?;
    storage::write_small_file(&f.data_dir, JOINED_FILE, &current.encode())
        .map_err(|e| e.to_string())?;
    let peers = peers_of(&current, id, f);
    Ok(Ok(Plan {
        id,
        cluster_id: info.cluster_id,
        voters: Vec::new(),
        bootstrap,
        peers,
    }))
}

/// The members of `r` other than this one, at their first peer URL; never this member's own
/// URLs (a removed predecessor may be listed there).
fn peers_of(r: &Registry, me: NodeId, f: &Flags) -> HashMap<NodeId, String> {
    r.members
        .values()
        .filter(|m| m.id != me)
        .filter_map(|m| Some((m.id, m.peer_urls.first()?.clone())))
        .filter(|(_, url)| !f.advertise_peer_urls.contains(url))
        .collect()
}

async fn ask(url: &str, dialer: &crate::network::tls::Dialer) -> Result<pb::ClusterInfo, String> {
    let endpoint = tonic::transport::Endpoint::from_shared(url.to_string())
        .map_err(|e| e.to_string())?
        .connect_timeout(Duration::from_secs(2))
        .timeout(Duration::from_secs(5));
    let channel = dialer.connect(endpoint).await.map_err(|e| {
        crate::network::tls::tls_failure(&e).map_or_else(|| e.to_string(), |t| format!("TLS: {t}"))
    })?;
    RaftClient::new(channel)
        .members(pb::Empty {})
        .await
        .map(|r| r.into_inner())
        .map_err(|s| {
            if let Some(t) = crate::network::tls::tls_failure(&s) {
                return format!("TLS: {t}");
            }
            // A peer that refuses our certificate just closes the connection once the
            // call goes out (TLS 1.3 lets the client finish its handshake first).
            let broken =
                std::error::Error::source(&s).is_some_and(|e| e.is::<tonic::transport::Error>());
            if broken && url.starts_with("https://") {
                format!(
                    "{} (if it refused this member's peer certificate, its log says why)",
                    s.message()
                )
            } else {
                s.message().to_string()
            }
        })
}

/// Announce this member's name and client URLs through the log once it can (it has a
/// leader, and has applied the entry that made it a member), as etcd members publish
/// themselves; until then `member list` shows it without a name. Retried until it holds.
pub async fn publish(node: Node, name: String, client_urls: Vec<String>) {
    loop {
        let v = node.view();
        let done = v
            .registry
            .members
            .get(&node.id())
            .map(|m| m.name == name && m.client_urls == client_urls);
        match (v.leader, done) {
            (_, Some(true)) => return,
            (Some(_), Some(false)) => {
                let publish = node.publish(&name, client_urls.clone());
                let _ = tokio::time::timeout(Duration::from_secs(5), publish).await;
            }
            _ => {}
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Keep the id derivation stable: data directories depend on it.
    #[test]
    fn member_ids_are_stable() {
        // Pinned: a member's id names its data on disk and in its peers' logs, so the
        // derivation may never change between releases. Values computed independently
        // (FNV-1a 64 over each part followed by a zero byte).
        assert_eq!(fnv(&["etcd-cluster", "n1"]), 0xbe63_250c_80ff_31df);
        assert_eq!(fnv(&["etcd-cluster", "n2"]), 0xbe58_f30c_80f6_8864);
        assert_eq!(fnv(&["other", "n1"]), 0xca4b_3bcb_8f40_7dd2);
        assert_eq!(fnv(&[]), 0xcbf2_9ce4_8422_2325);
    }
}
