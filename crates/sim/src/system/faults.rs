//! What happens to a member from outside: it boots from its disk (at the start, and after
//! every crash), crashes (losing what its disk had not made durable), restarts, pauses with
//! its clock running on, loses its links; a test may make its next disk write or snapshot
//! restore fail. `heal` ends every fault at once, for the checks at the end of a run.

use super::{Event, KvDriver, Shared, System};
use crate::io::SimIo;
use crate::machine::SimKv;
use crate::network::{Faults, Micros};
use crate::watchers;
use driver::{DriverConfig, Ids};
use kv::lessor::{Lessor, LessorConfig};
use raft::{Config, NodeId, Raft};
use rand::Rng;

impl System {
    /// Boot `id` from its disk, with a fresh boot nonce as a restarted server would draw.
    pub(super) fn start(&mut self, id: NodeId) {
        let (seed, boot) = (self.rng.gen::<u64>(), self.rng.gen::<u64>());
        let mut c = Config::new(id, self.ids());
        c.election_tick = self.cfg.election_tick;
        c.heartbeat_tick = self.cfg.heartbeat_tick;
        c.seed = seed;
        c.snapshot_timeout_tick = 3 * self.cfg.heartbeat_tick;
        let mut machine = SimKv::default();
        let m = self.member(id);
        let mut restored = Ok(());
        if let Some(s) = &m.disk.snapshot {
            match kv::Store::restore(&s.data) {
                Ok(store) => machine.store = store,
                Err(e) => restored = Err(format!("its snapshot does not decode: {e}")),
            }
            c.applied = s.meta.index;
        }
        let raft =
            restored.and_then(|()| Raft::new(c, m.disk.restore_state()).map_err(|e| e.to_string()));
        // A failure names the seed, as every other failure of the run does.
        let raft = match raft {
            Ok(raft) => raft,
            Err(e) => self.fail(&format!("member {id} cannot restart: {e}")),
        };
        let m = self.member(id);
        let io = Shared::default();
        m.io = io.clone();
        let dcfg = DriverConfig {
            snapshot_count: self.cfg.snapshot_count,
            max_pending_writes: 64,
            max_pending_reads: 64,
            ..DriverConfig::default()
        };
        let d = KvDriver::new(
            raft,
            machine,
            SimIo(io.clone()),
            SimIo(io),
            Ids::new(id, boot),
            dcfg,
        );
        let revision = d.machine().store.revision();
        self.hubs[id as usize - 1] = Some(watch::Hub::new(revision, watchers::limits()));
        let lessor = Lessor::new(LessorConfig {
            extend: self.lease_extend(),
            checkpoint_interval: self.cfg.checkpoint_interval,
            ..LessorConfig::default()
        });
        let now = self.now;
        let m = self.member(id);
        m.driver = Some(d);
        m.lessor = lessor;
        m.clock.boot = now;
        let inc = m.incarnation;
        let phase = self.rng.gen_range(1..=self.cfg.tick);
        self.schedule(self.now + phase, Event::Tick(id, inc));
        self.drain(id);
    }

    /// The next disk write of `id` fails.
    pub fn fail_next_write(&mut self, id: NodeId) {
        self.member(id).fail_next_write = true;
    }

    /// The next snapshot `id` is sent cannot be restored.
    pub fn fail_next_restore(&mut self, id: NodeId) {
        self.member(id).fail_next_restore = true;
    }

    /// `id`'s disk is busy for `d`: its next writes complete no earlier than that.
    pub fn stall_disk(&mut self, id: NodeId, d: Micros) {
        let until = self.now + d;
        let m = self.member(id);
        m.disk_busy_until = m.disk_busy_until.max(until);
    }

    /// `id` runs nothing for `d` (a SIGSTOP, a long GC pause, a starved VM): messages,
    /// ticks, disk completions and clients' requests wait; its clock runs on.
    pub fn pause(&mut self, id: NodeId, d: Micros) {
        let until = self.now + d;
        let m = self.member(id);
        m.paused_until = m.paused_until.max(until);
        self.pauses += 1;
    }

    /// `from`, which leads, hands leadership to `to` at once (etcd's move-leader): the
    /// tightest failover there is. Whether the transfer began.
    pub fn transfer(&mut self, from: NodeId, to: NodeId) -> bool {
        self.is_up(from)
            && self
                .with(from, |d| d.raft_mut().transfer_leader(to))
                .is_ok()
    }

    pub fn disconnect(&mut self, id: NodeId) {
        for other in self.ids() {
            if other != id {
                self.net.block(id, other);
                self.net.block(other, id);
            }
        }
    }

    pub fn crash(&mut self, id: NodeId) {
        let m = self.member(id);
        // Dropping the driver drops its waiting clients unanswered: their outcome is unknown.
        m.driver = None;
        m.disk.unsynced = None;
        m.incarnation += 1;
        m.paused_until = 0;
        self.hubs[id as usize - 1] = None;
        self.watch.crashed(id);
        let m = self.member(id);
        m.writes.clear();
        m.io = Shared::default();
    }

    pub fn restart(&mut self, id: NodeId) {
        if self.is_up(id) {
            self.crash(id);
        }
        self.start(id);
    }

    /// End every fault: the network, failing disks and snapshots; restart every member.
    pub fn heal(&mut self) {
        self.net.heal();
        self.net.faults = Faults::RELIABLE;
        self.cfg.disk_failure = 0.0;
        self.cfg.restore_failure = 0.0;
        for id in self.ids() {
            if !self.is_up(id) {
                self.restart(id);
            }
        }
    }
}
