//! What tests and the soak do to nodes from outside: a node boots from its disk (at the
//! start, after every crash) with a fresh core and driver, crashes losing what was not
//! durable, and restarts; a node is cut off and reconnected, or the cluster split into
//! groups, and healed; the network's faults change; an election or a leadership hand-off is
//! forced.

use super::{Cluster, Event};
use crate::io::{Mailbox, SimIo};
use crate::network::{Counters, Faults};
use crate::node::{Register, RegisterDriver};
use driver::{DriverConfig, Ids};
use raft::{Config, Error, NodeId, Raft};
use rand::Rng;

impl Cluster {
    fn raft_config(&self, id: NodeId, incarnation: u64) -> Config {
        // Nodes added later start with no configuration and learn it from the leader.
        let voters = if self.bootstrap.contains(&id) {
            self.bootstrap.clone()
        } else {
            Vec::new()
        };
        let mut c = Config::new(id, voters);
        c.election_tick = self.cfg.election_tick;
        c.heartbeat_tick = self.cfg.heartbeat_tick;
        c.seed = self.cfg.seed ^ (id << 32) ^ incarnation.wrapping_mul(0x9e37_79b9);
        c.pre_vote = self.cfg.pre_vote;
        c.check_quorum = self.cfg.check_quorum;
        c.read_mode = self.cfg.read_mode;
        c.max_size_per_msg = self.cfg.max_size_per_msg;
        c.max_inflight_msgs = self.cfg.max_inflight_msgs;
        c.snapshot_chunk_bytes = self.cfg.snapshot_chunk_bytes;
        c.snapshot_timeout_tick = 3 * self.cfg.heartbeat_tick;
        c
    }

    /// Boot `id` from its disk: the production driver around a fresh core and register.
    pub(super) fn start(&mut self, id: NodeId) {
        let inc = self.node(id).incarnation;
        let mut cfg = self.raft_config(id, inc);
        // The state machine comes back from the snapshot; the log replays the rest.
        let mut register = Register::default();
        if let Some(s) = &self.node(id).disk.snapshot {
            driver::StateMachine::restore(&mut register, s).expect("registers restore");
            cfg.applied = s.meta.index;
        }
        let boot = cfg.seed.rotate_left(17) ^ 0x6a09_e667_f3bc_c909;
        let state = self.node(id).disk.restore_state();
        let raft = Raft::new(cfg, state)
            .unwrap_or_else(|e| self.fail(&format!("node {id} cannot restart: {e}")));
        let dcfg = DriverConfig {
            snapshot_count: self.cfg.snapshot_threshold.unwrap_or(0),
            ..DriverConfig::default()
        };
        // A fresh boot nonce per life, as a restarted server draws one (derived, not drawn
        // from the run's generator, so the schedule of a seed does not depend on it).
        let ids = Ids::new(id, boot);
        let io: Mailbox<Register> = Default::default();
        let node = self.node_mut(id);
        node.io = io.clone();
        let d = RegisterDriver::new(raft, register, SimIo(io.clone()), SimIo(io), ids, dcfg);
        node.driver = Some(d);
        let phase = self.rng.gen_range(0..self.cfg.tick);
        self.schedule(self.now + phase + 1, Event::Tick(id, inc));
        self.drain(id);
    }

    pub fn crash(&mut self, id: NodeId) {
        if self.cfg.trace {
            self.trace(format_args!("crash {id}"));
        }
        self.node_mut(id).crash();
    }

    pub fn restart(&mut self, id: NodeId) {
        if self.destroyed.contains(&id) {
            return;
        }
        if self.is_up(id) {
            self.crash(id);
        }
        if self.cfg.trace {
            self.trace(format_args!("restart {id}"));
        }
        self.start(id);
    }

    /// Cut `id` off from everyone, both directions.
    pub fn disconnect(&mut self, id: NodeId) {
        self.node_mut(id).connected = false;
        for other in self.ids() {
            if other != id {
                self.net.block(id, other);
                self.net.block(other, id);
            }
        }
    }

    /// Reconnect `id` to every node that is itself connected (not to disconnected ones).
    pub fn connect(&mut self, id: NodeId) {
        self.node_mut(id).connected = true;
        for other in self.ids() {
            if other != id && self.node(other).connected {
                self.net.unblock(id, other);
                self.net.unblock(other, id);
            }
        }
    }

    /// Split the cluster: nodes talk only within their own group.
    pub fn partition(&mut self, groups: &[&[NodeId]]) {
        self.heal();
        for a in self.ids() {
            for b in self.ids() {
                let same = groups.iter().any(|g| g.contains(&a) && g.contains(&b));
                if !same {
                    self.net.block(a, b);
                }
            }
        }
    }

    pub fn heal(&mut self) {
        self.net.heal();
        for n in &mut self.nodes {
            n.connected = true;
        }
    }

    pub fn set_faults(&mut self, faults: Faults) {
        self.net.faults = faults;
    }

    pub fn counters(&self, id: NodeId) -> Counters {
        self.net.counters.get(&id).cloned().unwrap_or_default()
    }

    /// Make `id` start an election now.
    pub fn campaign(&mut self, id: NodeId) {
        self.with(id, |d| d.raft_mut().campaign());
    }

    pub fn transfer_leader(&mut self, from: NodeId, to: NodeId) -> Result<(), Error> {
        self.with(from, |d| d.raft_mut().transfer_leader(to))
    }
}
