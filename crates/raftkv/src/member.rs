//! `raftkv member add|remove|promote|update|list` and `raftkv move-leader`: membership over
//! etcd's Cluster service, printing what a newcomer needs to start (as `etcdctl member add`
//! does). Any member takes the request; followers pass it to the leader.

use crate::client::first;
use server::pb::etcdserverpb::{
    cluster_client::ClusterClient, maintenance_client::MaintenanceClient, Member, MemberAddRequest,
    MemberListRequest, MemberPromoteRequest, MemberRemoveRequest, MemberUpdateRequest,
    MoveLeaderRequest, StatusRequest,
};

#[derive(clap::Subcommand, Debug)]
pub enum MemberCmd {
    /// Add a member; prints the flags to start it with.
    Add {
        /// The new member's name (its --name).
        name: String,
        /// Its peer URLs, comma separated.
        #[arg(long)]
        peer_urls: String,
        /// Add it as a learner (non-voting until promoted): the safe way to add a member.
        #[arg(long)]
        learner: bool,
    },
    /// Remove a member (hex id, as `member list` shows it).
    Remove { id: String },
    /// Make a learner a voter, once it has caught up.
    Promote { id: String },
    /// Change a member's peer URLs.
    Update {
        id: String,
        #[arg(long)]
        peer_urls: String,
    },
    /// List the members.
    List,
}

fn parse_id(id: &str) -> Result<u64, String> {
    u64::from_str_radix(id.trim_start_matches("0x"), 16)
        .map_err(|_| format!("{id:?} is not a member id (hex, as `raftkv member list` shows)"))
}

fn split(urls: &str) -> Vec<String> {
    urls.split(',')
        .filter(|u| !u.is_empty())
        .map(str::to_string)
        .collect()
}

fn print_members(members: &[Member]) {
    println!(
        "{:<16}  {:<9}  {:<8}  {:<7}  PEER URLS / CLIENT URLS",
        "ID", "STATUS", "NAME", "LEARNER"
    );
    for m in members {
        let status = if m.name.is_empty() {
            "unstarted"
        } else {
            "started"
        };
        println!(
            "{:016x}  {status:<9}  {:<8}  {:<7}  {} / {}",
            m.id,
            m.name,
            m.is_learner,
            m.peer_ur_ls.join(","),
            m.client_ur_ls.join(",")
        );
    }
}

pub async fn run(endpoints: &str, cmd: MemberCmd) -> Result<(), String> {
    match cmd {
        MemberCmd::Add {
            name,
            peer_urls,
            learner,
        } => {
            let req = MemberAddRequest {
                peer_ur_ls: split(&peer_urls),
                is_learner: learner,
            };
            let r = first(endpoints, |ch| {
                let req = req.clone();
                async move { ClusterClient::new(ch).member_add(req).await }
            })
            .await?
            .into_inner();
            let id = r.member.as_ref().map_or(0, |m| m.id);
            let cluster = r.header.map_or(0, |h| h.cluster_id);
            let initial: Vec<String> = r
                .members
                .iter()
                .flat_map(|m| {
                    let n = if m.id == id {
                        name.clone()
                    } else {
                        m.name.clone()
                    };
                    m.peer_ur_ls.iter().map(move |u| format!("{n}={u}"))
                })
                .collect();
            println!("Member {id:016x} added to cluster {cluster:016x}; start it with:\n");
            println!(
                "  raftkv serve --name={name} --initial-advertise-peer-urls={peer_urls} \
                 --listen-peer-urls={peer_urls} --initial-cluster={} \
                 --initial-cluster-state=existing --listen-client-urls=... \
                 --advertise-client-urls=...",
                initial.join(",")
            );
            if learner {
                println!("\nthen, once it has caught up: raftkv member promote {id:016x}");
            }
        }
        MemberCmd::Remove { id } => {
            let id = parse_id(&id)?;
            let r = first(endpoints, |ch| async move {
                ClusterClient::new(ch)
                    .member_remove(MemberRemoveRequest { id })
                    .await
            })
            .await?;
            let cluster = r.into_inner().header.map_or(0, |h| h.cluster_id);
            println!("Member {id:016x} removed from cluster {cluster:016x}");
        }
        MemberCmd::Promote { id } => {
            let id = parse_id(&id)?;
            first(endpoints, |ch| async move {
                ClusterClient::new(ch)
                    .member_promote(MemberPromoteRequest { id })
                    .await
            })
            .await?;
            println!("Member {id:016x} promoted");
        }
        MemberCmd::Update { id, peer_urls } => {
            let id = parse_id(&id)?;
            let req = MemberUpdateRequest {
                id,
                peer_ur_ls: split(&peer_urls),
            };
            first(endpoints, |ch| {
                let req = req.clone();
                async move { ClusterClient::new(ch).member_update(req).await }
            })
            .await?;
            println!("Member {id:016x} updated");
        }
        MemberCmd::List => {
            let r = first(endpoints, |ch| async move {
                ClusterClient::new(ch)
                    .member_list(MemberListRequest { linearizable: true })
                    .await
            })
            .await?;
            print_members(&r.into_inner().members);
        }
    }
    Ok(())
}

/// Hand leadership to member `id`: finds the leader among the endpoints (by their status)
/// and asks it.
pub async fn move_leader(endpoints: &str, id: &str) -> Result<(), String> {
    let target = parse_id(id)?;
    for url in crate::client::urls(endpoints) {
        let Ok(ch) = crate::client::channel(&url).await else {
            continue;
        };
        let mut m = MaintenanceClient::new(ch);
        let Ok(s) = m.status(StatusRequest {}).await else {
            continue;
        };
        let s = s.into_inner();
        let me = s.header.map_or(0, |h| h.member_id);
        if me == 0 || s.leader != me {
            continue;
        }
        m.move_leader(MoveLeaderRequest { target_id: target })
            .await
            .map_err(|e| format!("{url}: {}", e.message()))?;
        println!("Leadership transferred from {me:016x} to {target:016x}");
        return Ok(());
    }
    Err("no endpoint given is the leader; list the leader's among --endpoints".into())
}
