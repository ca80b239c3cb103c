//! Changing who is in the cluster: nodes join under new ids with empty disks, machines
//! are destroyed for good, and configuration changes are proposed and driven to completion
//! across leader changes. A destroyed node never restarts (a voter that lost its disk would
//! break Raft); whether any configuration, live or on a disk, still names a node tells when
//! destroying it is safe.

use super::Cluster;
use crate::network::{Micros, MS};
use crate::node::SimNode;
use raft::{Error, Index, NodeId};

impl Cluster {
    /// Start a new node with an empty disk and no configuration, under the next unused id;
    /// it waits for a leader to add it and send it the log or a snapshot.
    pub fn add_node(&mut self) -> NodeId {
        let id = self.nodes.len() as NodeId + 1;
        self.nodes.push(SimNode::new(id));
        if self.cfg.trace {
            self.trace(format_args!("add node {id}"));
        }
        // Cut off like the rest if the network is split; reachable otherwise.
        self.start(id);
        id
    }

    /// `id`'s machine is gone with its disk: it crashes and never comes back.
    pub fn destroy(&mut self, id: NodeId) {
        if self.is_up(id) {
            self.crash(id);
        }
        self.node_mut(id).disk = Default::default();
        if !self.destroyed.contains(&id) {
            self.destroyed.push(id);
        }
    }

    /// Whether the latest configuration of any node — in its live core, or on its disk (a
    /// down node comes back with it) — names `id`. Once none does and its removal is
    /// committed, `id` can never count again (every future leader holds the removal), and
    /// its machine may be destroyed.
    pub fn named_by_any_configuration(&self, id: NodeId) -> bool {
        let names = |m: &raft::Membership| m.contains(id) || m.is_learner(id);
        self.nodes.iter().any(|n| {
            let live = n
                .driver
                .as_ref()
                .is_some_and(|d| names(d.raft().membership()));
            let last_entry = n.disk.entries.iter().rev().find_map(|e| {
                (e.kind == raft::EntryKind::ConfChange)
                    .then(|| raft::ConfEntry::decode(&e.data).ok())
                    .flatten()
                    .map(|c| c.membership)
            });
            let on_disk = match (last_entry, &n.disk.snapshot) {
                (Some(m), _) => names(&m),
                (None, Some(s)) => names(&s.meta.membership),
                (None, None) => self.bootstrap.contains(&n.id) && self.bootstrap.contains(&id),
            };
            live || on_disk
        })
    }

    pub fn is_destroyed(&self, id: NodeId) -> bool {
        self.destroyed.contains(&id)
    }

    /// Propose `cc` at `id` straight to the core.
    pub fn propose_conf_change(
        &mut self,
        id: NodeId,
        cc: raft::ConfChange,
    ) -> Result<Index, Error> {
        if !self.is_up(id) {
            return Err(Error::NotLeader { leader: None });
        }
        if self.cfg.trace {
            self.trace(format_args!("propose at {id}: {cc:?}"));
        }
        self.with(id, |d| d.raft_mut().propose_conf_change(cc))
    }

    /// Make `cc` happen: propose it to whichever node leads (retrying across leader changes
    /// and while an earlier change is pending) and wait until the configuration it
    /// establishes — for an auto-leave joint change, the one after it — is committed at a
    /// stable leader. Returns that configuration; fails the run after `timeout`.
    pub fn change_membership(&mut self, cc: raft::ConfChange, timeout: Micros) -> raft::Membership {
        let deadline = self.now + timeout;
        let mut target: Option<raft::Membership> = None;
        let settled = |c: &Cluster, want: &raft::Membership| {
            c.stable_leader().is_some_and(|l| {
                let r = c.node(l).raft();
                r.membership() == want && r.commit_index() >= r.conf_index()
            })
        };
        while self.now < deadline {
            if let Some(want) = target.clone() {
                if settled(self, &want) {
                    return want;
                }
            }
            let Some(l) = self.stable_leader() else {
                self.run_for(50 * MS);
                continue;
            };
            let before = self.node(l).raft().membership().clone();
            let reached = target.as_ref() == Some(&before);
            let pending = self.node(l).raft().conf_index() > self.node(l).raft().commit_index();
            if !reached && !pending {
                match raft::apply_conf_change(&before, &cc) {
                    Ok(next) if target.is_none() || target.as_ref() == Some(&next) => {
                        if self.propose_conf_change(l, cc.clone()).is_ok() {
                            let auto = next.is_joint() && next.auto_leave();
                            target = Some(if auto {
                                raft::apply_conf_change(&next, &raft::ConfChange::leave_joint())
                                    .expect("a joint configuration can be left")
                            } else {
                                next
                            });
                        }
                    }
                    // Proposed already and a different configuration is in force: ours was
                    // lost with a leader and another change won; not expected in tests.
                    Ok(_) => self.fail(&format!("configuration change {cc:?} was overtaken")),
                    // Asked to leave a joint configuration that another leader's log never
                    // held (or already left): the cluster is where the caller wants it.
                    Err(_) if cc.transition == raft::Transition::Leave && !before.is_joint() => {
                        return before;
                    }
                    Err(e) if target.is_none() => {
                        self.fail(&format!("configuration change {cc:?} refused: {e}"))
                    }
                    Err(_) => {} // our joint change is in force, its leave not yet
                }
            }
            self.run_for(10 * MS);
        }
        self.fail(&format!(
            "configuration change {cc:?} did not complete in time"
        ))
    }

    /// The configuration in force at the current stable leader.
    pub fn membership(&self) -> Option<raft::Membership> {
        let l = self.stable_leader()?;
        Some(self.node(l).raft().membership().clone())
    }
}
