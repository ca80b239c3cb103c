//! The background consistency check (etcd's `--experimental-corrupt-check-time`): every
//! period, the leader hashes its store's history at its current revision and asks every
//! other member for HashKV at that same revision. A member whose compact revision matches
//! but whose hash differs holds different data for the same log: the leader raises the
//! CORRUPT alarm for it (which stops writes cluster-wide until an operator acts) and logs
//! both hashes. A member that has not yet applied the revision, or compacted differently,
//! is skipped this round.

use crate::member::machine::CORRUPT;
use crate::member::node::Node;
use crate::pb::etcdserverpb::{
    alarm_request::AlarmAction, maintenance_client::MaintenanceClient, AlarmRequest, HashKvRequest,
};
use crate::services::channel_to;
use raft::NodeId;
use std::time::Duration;

/// How long one member may take to answer HashKV.
const ASK_TIMEOUT: Duration = Duration::from_secs(10);

pub async fn run(node: Node, every: Duration) {
    let mut ticker = tokio::time::interval(every);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    ticker.tick().await;
    loop {
        ticker.tick().await;
        if let Err(e) = check_once(&node).await {
            tracing::debug!("consistency check skipped: {e}");
        }
    }
}

/// One round; returns the members found to disagree with the leader.
pub async fn check_once(node: &Node) -> Result<Vec<NodeId>, String> {
    if node.leader() != Some(node.id()) {
        return Ok(Vec::new());
    }
    let frozen = node.freeze().await.map_err(|e| e.message().to_string())?;
    let rev = frozen.store.revision();
    let mine = tokio::task::spawn_blocking(move || frozen.store.hash_kv(rev))
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| e.to_string())?;
    let view = node.view();
    let mut disagree = Vec::new();
    for &peer in view.registry.members.keys().filter(|&&m| m != node.id()) {
        let Ok(channel) = channel_to(&view, peer) else {
            continue;
        };
        let mut client = MaintenanceClient::new(channel);
        let ask = client.hash_kv(HashKvRequest { revision: rev });
        let theirs = match tokio::time::timeout(ASK_TIMEOUT, ask).await {
            Ok(Ok(r)) => r.into_inner(),
            // Not there yet (a future revision), unreachable, compacted past it: next round.
            _ => continue,
        };
        if theirs.compact_revision != mine.compact_revision || theirs.hash == mine.hash {
            continue;
        }
        tracing::error!(
            revision = rev,
            leader = %format!("{:x}", node.id()),
            leader_hash = mine.hash,
            member = %format!("{peer:x}"),
            member_hash = theirs.hash,
            "the stores of two members differ at the same revision; raising CORRUPT"
        );
        disagree.push(peer);
        let raise = AlarmRequest {
            action: AlarmAction::Activate as i32,
            member_id: peer,
            alarm: CORRUPT,
        };
        node.alarm(raise)
            .await
            .map_err(|e| e.message().to_string())?;
    }
    Ok(disagree)
}
