//! Group commit: one thread owns the [`Storage`]; appends from anywhere queue up, and each
//! `fdatasync` covers every batch that arrived while the previous one ran.

use crate::{Result, Storage};
use raft::{Entry, HardState, Index, Snapshot, Term};
use std::sync::mpsc;
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;

/// Told on the storage thread whether a batch became durable.
pub type OnDurable = Box<dyn FnOnce(std::result::Result<(), String>) + Send>;

/// The queue into the storage thread; `None` once it is being stopped.
type Queue = Option<mpsc::Sender<(u64, Batch)>>;

/// One `Ready`'s worth of state to persist.
#[derive(Default)]
pub struct Batch {
    pub snapshot: Option<Snapshot>,
    pub hard_state: Option<HardState>,
    pub entries: Vec<Entry>,
    /// The application compacted its log with this snapshot (after the rest is written).
    pub compact: Option<Snapshot>,
    /// Written lazily: no fsync on this batch's account (a commit-index-only hard state).
    /// It becomes durable with the next batch that does sync.
    pub lazy: bool,
    /// Called on the storage thread once the batch is durable (or failed).
    pub on_durable: Option<OnDurable>,
}

/// What one round of group commit did, told to an [`Observer`] (the server's metrics):
/// how many batches and entries it wrote, and how long its fsync took (`None`: every batch
/// was lazy, so it did not sync).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CommitRound {
    pub batches: usize,
    pub entries: usize,
    pub sync: Option<std::time::Duration>,
}

/// Called on the storage thread after each round; it must be quick (it delays durability).
pub type Observer = Arc<dyn Fn(&CommitRound) + Send + Sync>;

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GroupStats {
    pub batches: u64,
    pub syncs: u64,
}

#[derive(Default)]
struct State {
    /// Every batch with a ticket up to this one is durable.
    durable_ticket: u64,
    /// The last entry known durable.
    durable_entry: Option<(Index, Term)>,
    failed: Option<String>,
    stats: GroupStats,
}

struct Shared {
    state: Mutex<State>,
    changed: Condvar,
}

pub struct GroupCommit {
    /// Holding this lock while taking a ticket and queueing keeps tickets in queue order.
    tx: Mutex<(u64, Queue)>,
    shared: Arc<Shared>,
    thread: Option<JoinHandle<Storage>>,
}

impl GroupCommit {
    pub fn start(storage: Storage) -> GroupCommit {
        GroupCommit::start_observed(storage, None)
    }

    /// Like [`GroupCommit::start`], telling `observer` what each round did.
    pub fn start_observed(storage: Storage, observer: Option<Observer>) -> GroupCommit {
        let (tx, rx) = mpsc::channel::<(u64, Batch)>();
        let shared = Arc::new(Shared {
            state: Mutex::new(State::default()),
            changed: Condvar::new(),
        });
        let worker = Arc::clone(&shared);
        let thread = std::thread::Builder::new()
            .name("raftkv-wal".into())
            .spawn(move || run(storage, rx, worker, observer))
            .expect("spawn the storage thread");
        GroupCommit {
            tx: Mutex::new((0, Some(tx))),
            shared,
            thread: Some(thread),
        }
    }

    /// Queue a batch; returns its ticket for [`GroupCommit::wait`].
    pub fn submit(&self, batch: Batch) -> u64 {
        let mut guard = self.tx.lock().unwrap();
        guard.0 += 1;
        let ticket = guard.0;
        if let Some(tx) = &guard.1 {
            // A send fails only if the thread stopped after an error, which `wait` reports.
            let _ = tx.send((ticket, batch));
        }
        ticket
    }

    /// Block until batch `ticket` (and every batch before it) is durable.
    pub fn wait(&self, ticket: u64) -> std::result::Result<(), String> {
        let mut s = self.shared.state.lock().unwrap();
        loop {
            if let Some(e) = &s.failed {
                return Err(e.clone());
            }
            if s.durable_ticket >= ticket {
                return Ok(());
            }
            s = self.shared.changed.wait(s).unwrap();
        }
    }

    /// The last entry known durable.
    pub fn durable_entry(&self) -> Option<(Index, Term)> {
        self.shared.state.lock().unwrap().durable_entry
    }

    pub fn stats(&self) -> GroupStats {
        self.shared.state.lock().unwrap().stats
    }

    /// Stop the thread after the queued batches are durable; returns the storage.
    pub fn stop(mut self) -> Storage {
        self.tx.lock().unwrap().1 = None;
        self.thread.take().unwrap().join().expect("storage thread")
    }
}

impl Drop for GroupCommit {
    fn drop(&mut self) {
        if let Some(thread) = self.thread.take() {
            self.tx.lock().unwrap().1 = None;
            let _ = thread.join();
        }
    }
}

fn run(
    mut storage: Storage,
    rx: mpsc::Receiver<(u64, Batch)>,
    shared: Arc<Shared>,
    observer: Option<Observer>,
) -> Storage {
    while let Ok(first) = rx.recv() {
        // Everything that queued up while the last sync ran joins this one.
        let mut group = vec![first];
        group.extend(rx.try_iter());
        let (result, sync) = write_group(&mut storage, &group);
        if let Some(observe) = &observer {
            observe(&CommitRound {
                batches: group.len(),
                entries: group.iter().map(|(_, b)| b.entries.len()).sum(),
                sync,
            });
        }
        let mut s = shared.state.lock().unwrap();
        s.stats.batches += group.len() as u64;
        s.stats.syncs += u64::from(!group.iter().all(|(_, b)| b.lazy));
        match &result {
            Ok(()) => {
                s.durable_ticket = group.last().unwrap().0;
                let last = group.iter().rev().find_map(|(_, b)| b.entries.last());
                if let Some(e) = last {
                    s.durable_entry = Some((e.index, e.term));
                }
            }
            Err(e) => s.failed = Some(e.to_string()),
        }
        drop(s);
        shared.changed.notify_all();
        let outcome = result.map_err(|e| e.to_string());
        for (_, batch) in group {
            if let Some(cb) = batch.on_durable {
                cb(outcome.clone());
            }
        }
        if outcome.is_err() {
            break; // a failed fsync leaves the file in an unknown state: stop writing
        }
    }
    storage
}

/// Write the group and sync it (unless every batch is lazy); with how long the sync took.
fn write_group(
    storage: &mut Storage,
    group: &[(u64, Batch)],
) -> (Result<()>, Option<std::time::Duration>) {
    for (_, b) in group {
        if let Err(e) = storage.save(b.snapshot.as_ref(), b.hard_state, &b.entries) {
            return (Err(e), None);
        }
        if let Some(s) = &b.compact {
            if let Err(e) = storage.compact(s) {
                return (Err(e), None);
            }
        }
    }
    if group.iter().all(|(_, b)| b.lazy) {
        return (Ok(()), None);
    }
    let started = std::time::Instant::now();
    let result = storage.sync();
    (result, Some(started.elapsed()))
}
