//! The checks on what the nodes did, as they do it: a leader's commit index is on the disks
//! of a majority of every configuration in force (the simulated disks, not the leader's
//! beliefs); entries apply in order, one by one, and alike on every node; a read reflects
//! every write acknowledged before it began. And, asked by a test, that every acknowledged
//! command is still applied, at its first index, on every live member.

use super::Cluster;
use crate::node::{command_id, ReadResult, RegisterEvent};
use driver::{Answered, Refusal};
use raft::{Index, NodeId};
use std::collections::HashMap;

impl Cluster {
    /// A leader's commit index is durable on a majority of every configuration in force at
    /// the leader (both, while joint): that is what lets any future leader hold it. Checked
    /// against the simulated disks, not the leader's beliefs. By log matching it is enough
    /// to check the highest index.
    pub(super) fn check_commit_durable(&mut self, id: NodeId) {
        let r = self.node(id).raft();
        let commit = r.commit_index();
        if !r.is_leader() || commit <= self.durable_checked {
            return;
        }
        let Some(term) = r.term_at(commit) else {
            return;
        };
        let m = r.membership().clone();
        let holds = |n: NodeId| {
            let Some(node) = self.nodes.get(n as usize - 1) else {
                return false;
            };
            let disk = &node.disk;
            let snap = disk.snapshot_index();
            commit <= snap
                || disk
                    .entries
                    .get((commit - snap - 1) as usize)
                    .is_some_and(|e| e.term == term && e.index == commit)
        };
        for voters in [m.voters(), m.outgoing()] {
            let have = voters.iter().filter(|&&v| holds(v)).count();
            if !voters.is_empty() && have <= voters.len() / 2 {
                self.fail(&format!(
                    "commit durability: leader {id} committed {commit} (term {term}) but only \
                     {have} of voters {voters:?} hold it on disk ({m})"
                ));
            }
        }
        self.checker.violations_checked += 1;
        self.durable_checked = commit;
    }

    /// Entries apply in order, one by one, and agree with every other node's; a snapshot
    /// from the leader only ever moves the state machine forward.
    pub(super) fn check_register(&mut self, id: NodeId, e: RegisterEvent) {
        match e {
            RegisterEvent::Applied { expected, entry } => {
                if entry.index != expected {
                    self.fail(&format!(
                        "node {id} was handed entry {} to apply, expected {expected}",
                        entry.index
                    ));
                }
                if let Err(v) = self.checker.on_apply(id, &entry) {
                    self.fail(&v);
                }
                if entry.kind == raft::EntryKind::Normal {
                    self.acked
                        .entry(command_id(&entry.data))
                        .or_insert(entry.index);
                    self.max_acked = self.max_acked.max(entry.index);
                }
            }
        }
    }

    /// A linearizable read was answered: its value must reflect every write acknowledged
    /// before the read was issued.
    pub(super) fn served(
        &mut self,
        id: NodeId,
        ctx: u64,
        r: Result<Answered<Option<(Index, u64)>>, Refusal>,
    ) {
        let min = self.pending_reads.remove(&ctx);
        let Ok(answer) = r else {
            return; // refused or dropped (leader change): the client retries
        };
        let value = answer.value;
        if let Some(min) = min {
            let seen = value.map_or(0, |v| v.0);
            if seen < min {
                self.fail(&format!(
                    "stale read: node {id} served read {ctx} with the write at index {seen}, \
                     but the write at index {min} was acknowledged before the read began"
                ));
            }
        }
        self.reads.push(ReadResult {
            node: id,
            ctx,
            index: answer.applied,
            value,
        });
    }

    /// Check that every command ever acknowledged is in the state machine of every live
    /// node, at the index it was first applied at.
    pub fn check_acked_durable(&self) {
        // Nodes removed from the cluster stop receiving the log; they are not checked.
        let members = self.membership();
        let member = |id| members.as_ref().is_none_or(|m| m.contains(id));
        for n in self.nodes.iter().filter(|n| n.is_up() && member(n.id)) {
            // A retried command may commit twice; what was acknowledged is its first copy.
            let mut have: HashMap<u64, Index> = HashMap::new();
            for (i, c) in n.applied() {
                have.entry(c).or_insert(i);
            }
            for (cmd, index) in &self.acked {
                if have.get(cmd) != Some(index) {
                    self.fail(&format!(
                        "acknowledged command {cmd} (index {index}) missing from node {}",
                        n.id
                    ));
                }
            }
        }
    }
}
