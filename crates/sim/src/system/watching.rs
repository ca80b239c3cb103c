//! Watches in the system: each member runs a watch hub over its store, fed after every
//! event with what it applied, and watch clients stream from the hubs, moving to another
//! member when theirs crashes. Every state a member reaches is also recorded in one
//! history, which checks that all members applied the same revisions.

use super::System;
use crate::network::MS;
use crate::watchers::WatchClients;
use raft::NodeId;

impl System {
    /// Hand what `id` applied to its watch hub, and to the history the watchers are checked
    /// against (which also checks that every member applied the same revisions).
    pub(super) fn sync_watchers(&mut self, id: NodeId) {
        let m = &mut self.members[id as usize - 1];
        let Some(d) = m.driver.as_ref() else {
            return;
        };
        let store = &d.machine().store;
        // Each state a member reaches is recorded (and compared) once: most calls come
        // after events that applied nothing.
        let state = (m.incarnation, d.raft().applied());
        let mut recorded = Ok(());
        if m.recorded != Some(state) {
            m.recorded = Some(state);
            recorded = self.watch.history.record(store);
        }
        if let Some(hub) = self.hubs[id as usize - 1].as_mut() {
            hub.sync(store);
        }
        if let Err(e) = recorded {
            self.fail(&format!("member {id}: {e}"));
        }
    }

    /// Start `n` watch clients (they open their streams on the next turn).
    pub fn add_watchers(&mut self, n: usize) {
        self.watch = WatchClients::new(n, &mut self.watch_rng);
    }

    /// The watch clients read, and those without a stream open one.
    pub fn watch_turn(&mut self) {
        match self.watch.turn(&mut self.watch_rng, &mut self.hubs) {
            Ok(touched) => {
                for id in touched {
                    self.sync_watchers(id);
                }
            }
            Err(e) => self.fail(&format!("watch: {e}")),
        }
    }

    /// After convergence: let the watch clients read until each has every revision, then
    /// check what they got against the history.
    pub fn check_watchers(&mut self) {
        // Requests still in flight may apply meanwhile: compare with the history as it is.
        for _ in 0..2_000 {
            self.watch_turn();
            if self.watch.complete(self.watch.history.last()).is_ok() {
                break;
            }
            self.run_for(MS);
        }
        if let Err(e) = self.watch.complete(self.watch.history.last()) {
            self.fail(&format!("watch: {e}"));
        }
    }
}
