//! Running the event queue: one event at a time (ticks, deliveries, disk writes done,
//! snapshots taken, registers restored), each dropped if its node crashed since it was
//! scheduled, then everything the node's driver asked of the world carried out — messages
//! onto the network, writes onto the disk queue in order, snapshots and restores into
//! background jobs — and every check run on what it did.

use super::{Cluster, Event};
use crate::node::{Register, RegisterDriver};
use driver::Write;
use raft::{Error, Message, NodeId, Snapshot};
use rand::Rng;
use std::cmp::Reverse;

impl Cluster {
    /// Run one event. The queue never empties: every live node always has a tick pending.
    pub fn step(&mut self) {
        let Some(Reverse(s)) = self.queue.pop() else {
            self.fail("event queue empty")
        };
        debug_assert!(s.at >= self.now);
        self.now = s.at;
        self.events += 1;
        if self.cfg.trace {
            self.trace(format_args!("{:?}", s.event));
        }
        match s.event {
            Event::Tick(id, inc) => {
                let node = self.node(id);
                if node.incarnation != inc || !node.is_up() {
                    return;
                }
                let next = self.now + self.cfg.tick;
                self.schedule(next, Event::Tick(id, inc));
                self.with(id, |d| d.tick());
            }
            Event::Deliver(m) => {
                let to = m.to;
                if !self.node(to).is_up() || !self.net.connected(m.from, to) {
                    return;
                }
                // Stale messages are the core's to ignore. One it refuses as malformed was
                // sent by a correct core over the simulated network: a bug in one of them.
                let shown = self.cfg.trace.then(|| format!("{m:?}"));
                if let Err(Error::InvalidMessage(why)) = self.with(to, |d| d.step(m)) {
                    self.fail(&format!(
                        "node {to} refused a peer's message: {why} {shown:?}"
                    ));
                }
            }
            Event::PersistDone(id, inc) => {
                let node = self.node_mut(id);
                if node.incarnation != inc {
                    return;
                }
                let Some(w) = node.writes.pop_front() else {
                    return;
                };
                node.disk.write(w);
                self.note_log_size(id);
                self.with(id, |d| d.on_persisted(Ok(())));
            }
            Event::SnapshotTaken(id, inc, snapshot) => {
                if self.node(id).incarnation != inc {
                    return;
                }
                self.with(id, |d| d.on_snapshot(Ok(snapshot)));
                self.note_log_size(id);
            }
            Event::Restored(id, inc, register) => {
                if self.node(id).incarnation != inc {
                    return;
                }
                self.with(id, |d| d.on_restored(Ok(register)));
            }
        }
    }

    /// Hand `m` straight to its addressee, as if it had just arrived over the network (for
    /// tests that forge messages); returns what the core said of it.
    pub fn inject(&mut self, m: Message) -> Result<(), Error> {
        let to = m.to;
        let up = (1..=self.nodes.len() as NodeId).contains(&to) && self.node(to).is_up();
        if !up {
            return Err(Error::UnknownNode(to));
        }
        self.with(to, |d| d.step(m))
    }

    fn send(&mut self, m: Message) {
        if let Some(at) = self.net.send(&m, self.now, &mut self.rng) {
            self.schedule(at, Event::Deliver(m));
        }
    }

    /// Call into `id`'s driver, let it carry out what the core decided, then drain what it
    /// asked of the world and check everything.
    pub(super) fn with<T>(&mut self, id: NodeId, f: impl FnOnce(&mut RegisterDriver) -> T) -> T {
        let d = self.node_mut(id).driver.as_mut().expect("node is up");
        let out = f(d);
        d.process_ready();
        self.drain(id);
        out
    }

    /// Move the node's outbox into the world: messages onto the network, writes onto the
    /// disk queue, snapshots into background jobs; check what the register applied and the
    /// reads it served; check the core's invariants.
    pub(super) fn drain(&mut self, id: NodeId) {
        let io = self.node(id).io.clone();
        let mut out = std::mem::take(&mut *io.borrow_mut());
        for m in out.msgs.drain(..) {
            self.send(m);
        }
        for w in out.writes.drain(..) {
            if !w.entries.is_empty() {
                if let Err(v) = self.checker.on_append(id, w.prev_term, &w.entries) {
                    self.fail(&v);
                }
            }
            self.queue_write(id, w);
        }
        for (meta, data) in out.snapshots.drain(..) {
            let (lo, hi) = self.cfg.snapshot_delay;
            let at = self.now + self.rng.gen_range(lo..=hi);
            let inc = self.node(id).incarnation;
            self.schedule(at, Event::SnapshotTaken(id, inc, Snapshot { meta, data }));
        }
        for snap in out.restores.drain(..) {
            // A snapshot from the leader only moves the state machine forward, and holds
            // exactly the committed history up to its index.
            let before = self.node(id).applied_index();
            let index = snap.meta.index;
            if index <= before {
                self.fail(&format!(
                    "node {id} was handed a snapshot at {index} after applying {before}"
                ));
            }
            let mut register = Register::default();
            driver::StateMachine::restore(&mut register, &snap).expect("registers restore");
            if let Err(v) = self.checker.on_snapshot(id, index, &register.applied) {
                self.fail(&v);
            }
            // Built off the loop: other events reach the node meanwhile.
            let (lo, hi) = self.cfg.snapshot_delay;
            let at = self.now + self.rng.gen_range(lo..=hi);
            let inc = self.node(id).incarnation;
            self.schedule(at, Event::Restored(id, inc, register));
        }
        for s in out.compactions.drain(..) {
            // The snapshot is durable and covers only applied (hence durable) entries.
            let disk = &mut self.node_mut(id).disk;
            if s.meta.index > disk.snapshot_index() {
                disk.install(s);
            }
        }
        let events = match self.node_mut(id).driver.as_mut() {
            Some(d) => std::mem::take(&mut d.machine_mut().events),
            None => Vec::new(),
        };
        for e in events {
            self.check_register(id, e);
        }
        for (ctx, r) in out.reads.drain(..) {
            self.served(id, ctx as u64, r);
        }
        let Some(d) = self.nodes[id as usize - 1].driver.as_ref() else {
            return;
        };
        if let Some(why) = d.failure() {
            self.fail(&format!("node {id} stopped: {why}"));
        }
        if let Err(v) = self.checker.on_state(d.raft()) {
            self.fail(&v);
        }
        self.check_commit_durable(id);
    }

    fn queue_write(&mut self, id: NodeId, w: Write) {
        let (lo, hi) = self.cfg.disk_latency;
        // A batch with nothing to write only waits for the writes before it.
        let latency = if w.is_empty() {
            0
        } else {
            self.rng.gen_range(lo..=hi)
        };
        let now = self.now;
        let node = self.node_mut(id);
        let done = node.disk_busy_until.max(now) + latency;
        node.disk_busy_until = done;
        node.writes.push_back(w);
        let inc = node.incarnation;
        self.schedule(done, Event::PersistDone(id, inc));
    }

    fn note_log_size(&mut self, id: NodeId) {
        self.max_log_bytes = self.max_log_bytes.max(self.node(id).disk.log_bytes());
    }
}
