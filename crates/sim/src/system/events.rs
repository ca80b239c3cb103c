//! Running the event queue: one event at a time, each handled by the member it is for
//! (unless that member is paused, when it waits), then everything the member's driver asked
//! of the world carried out — messages onto the network, writes onto the disk queue,
//! snapshots and restores into background jobs — and the invariants checked after it: the
//! Raft checker's, and that an entry returns the same result on every member that applies
//! it. A member whose driver failed stops here (fail-stop), losing what was not durable.

use super::{Event, KvDriver, System};
use crate::machine::SimKv;
use crate::network::MS;
use driver::StateMachine;
use raft::{NodeId, Snapshot};
use rand::Rng;
use std::cmp::Reverse;

impl System {
    /// Run one event.
    pub(super) fn step(&mut self) -> bool {
        let Some(Reverse((at, _, slot))) = self.queue.pop() else {
            return false;
        };
        self.now = at;
        let event = self.events[slot].take().expect("each event runs once");
        // A paused member handles nothing until it runs again, in the order things came.
        let until = self.members[event.member() as usize - 1].paused_until;
        if at < until {
            self.schedule(until, event);
            return true;
        }
        if self.cfg.trace {
            println!("{:>10.3}ms {event:?}", at as f64 / MS as f64);
        }
        match event {
            Event::Tick(id, inc) => {
                if self.members[id as usize - 1].incarnation != inc || !self.is_up(id) {
                    return true;
                }
                self.with(id, |d| d.tick());
                let next = self.now + self.cfg.tick;
                self.schedule(next, Event::Tick(id, inc));
            }
            Event::Deliver(m) => {
                let (from, to) = (m.from, m.to);
                if !self.is_up(to) || !self.net.connected(from, to) {
                    return true;
                }
                if let Err(raft::Error::InvalidMessage(why)) = self.with(to, |d| d.step(m)) {
                    self.fail(&format!("member {to} refused a peer's message: {why}"));
                }
            }
            Event::Persisted(id, inc) => {
                if self.members[id as usize - 1].incarnation != inc {
                    return true;
                }
                let fails = self.rng.gen_bool(self.cfg.disk_failure)
                    || std::mem::take(&mut self.member(id).fail_next_write);
                let m = self.member(id);
                let w = m.writes.pop_front().expect("a write is in flight");
                if fails {
                    // The write did not reach the disk; the member must stop.
                    self.with(id, |d| d.on_persisted(Err("injected: fsync failed".into())));
                } else {
                    m.disk.write(w);
                    self.with(id, |d| d.on_persisted(Ok(())));
                }
            }
            Event::Snapshotted(id, inc, s) => {
                if self.members[id as usize - 1].incarnation != inc {
                    return true;
                }
                self.with(id, |d| d.on_snapshot(Ok(s)));
            }
            Event::Restored(id, inc, machine) => {
                if self.members[id as usize - 1].incarnation != inc {
                    return true;
                }
                self.with(id, |d| d.on_restored(machine));
            }
            Event::KeepAlive(id, k) => self.keep_alive_arrives(id, k),
            Event::Confirmed(id, inc, k) => self.confirmed(id, inc, k),
            Event::Call(id, ticket, call) => self.call(id, ticket, call),
        }
        true
    }

    /// Call into a member's driver, then run its lease clock (as the server's loop does
    /// after every round), then carry out what it asked for.
    pub(super) fn with<T>(&mut self, id: NodeId, f: impl FnOnce(&mut KvDriver) -> T) -> T {
        let d = self.member(id).driver.as_mut().expect("member is up");
        let out = f(d);
        d.process_ready();
        self.keep_leases(id);
        self.drain(id);
        out
    }

    /// Move a member's outbox into the event queue, check invariants, and record answers.
    pub(super) fn drain(&mut self, id: NodeId) {
        let io = self.members[id as usize - 1].io.clone();
        let mut out = std::mem::take(&mut *io.borrow_mut());
        let failed = self.driver(id).and_then(|d| d.failure()).is_some();
        if failed && !out.writes.is_empty() {
            self.fail(&format!("member {id} wrote to its log after it failed"));
        }
        for m in out.msgs.drain(..) {
            if let Some(at) = self.net.send(&m, self.now, &mut self.rng) {
                self.schedule(at, Event::Deliver(m));
            }
        }
        for w in out.writes.drain(..) {
            if !w.entries.is_empty() {
                if let Err(v) = self.checker.on_append(id, w.prev_term, &w.entries) {
                    self.fail(&v);
                }
            }
            let (lo, hi) = self.cfg.disk_latency;
            let latency = if w.is_empty() {
                0
            } else {
                self.rng.gen_range(lo..=hi)
            };
            let now = self.now;
            let m = self.member(id);
            let at = m.disk_busy_until.max(now) + latency;
            m.disk_busy_until = at;
            m.writes.push_back(w);
            let inc = m.incarnation;
            self.schedule(at, Event::Persisted(id, inc));
        }
        for (meta, store) in out.snapshots.drain(..) {
            let s = Snapshot {
                meta,
                data: store.snapshot(),
            };
            let delay = self.rng.gen_range(0..20 * MS);
            let inc = self.members[id as usize - 1].incarnation;
            self.schedule(self.now + delay, Event::Snapshotted(id, inc, s));
        }
        for snap in out.restores.drain(..) {
            // Decoding takes a while, off the loop: other events (ticks, messages, clients)
            // reach the member meanwhile. Sometimes the snapshot cannot be read back.
            let fails = self.rng.gen_bool(self.cfg.restore_failure)
                || std::mem::take(&mut self.member(id).fail_next_restore);
            let machine = if fails {
                Err("injected: the snapshot could not be read back".to_string())
            } else {
                let mut m = SimKv::default();
                m.restore(&snap).map(|_| m)
            };
            let delay = self.rng.gen_range(0..20 * MS);
            let inc = self.members[id as usize - 1].incarnation;
            self.schedule(self.now + delay, Event::Restored(id, inc, machine));
        }
        for s in out.compactions.drain(..) {
            // Written durably before the driver was told; entries it covers may go.
            self.member(id).disk.install(s);
        }
        let applied = match self.member(id).driver.as_mut() {
            Some(d) => std::mem::take(&mut d.machine_mut().applied),
            None => Vec::new(),
        };
        for (rid, output) in applied {
            let Some(&ticket) = self.proposed.get(&rid) else {
                self.fail(&format!(
                    "member {id} applied a request nobody proposed: {rid:?}"
                ));
            };
            let now = self.now;
            if let Some((at, first)) = self.first_applied.get(&ticket) {
                if *first != output {
                    self.fail(&format!(
                        "request {ticket} returned {output:?} on member {id} but {first:?} at {at}"
                    ));
                }
            } else {
                self.first_applied.insert(ticket, (now, output.clone()));
                self.first_apply(ticket, &output);
            }
        }
        let broken = match self.member(id).driver.as_mut() {
            Some(d) => std::mem::take(&mut d.machine_mut().broken),
            None => Vec::new(),
        };
        if let Some(why) = broken.first() {
            self.fail(&format!("member {id}: {why}"));
        }
        for (ticket, r) in out.answers.drain(..) {
            self.write_answered(id, ticket, r);
        }
        for (ticket, r) in out.reads.drain(..) {
            self.read_answered(id, ticket, r);
        }
        if let Some(d) = self.members[id as usize - 1].driver.as_ref() {
            if let Some(why) = d.failure() {
                // Fail-stop: the process exits. What it had not made durable is lost.
                let why = why.to_string();
                if self.cfg.trace {
                    println!("member {id} stopped: {why}");
                }
                self.fail_stops += 1;
                self.crash(id);
                return;
            }
            if let Err(v) = self.checker.on_state(d.raft()) {
                self.fail(&v);
            }
            self.sync_watchers(id);
        }
    }
}
