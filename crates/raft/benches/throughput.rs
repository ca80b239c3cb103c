//! The core alone: a 3-node cluster with free (in-memory, instant) message passing and
//! instant persistence commits proposals as fast as the protocol code allows. Reports
//! proposals per second and heap bytes allocated per committed entry.
//!
//! Run: `cargo bench -p raft --bench throughput` (add `-- 100000` for a shorter run).

use bytes::Bytes;
use raft::{Config, Message, Raft, RestoreState};
use std::alloc::{GlobalAlloc, Layout, System};
use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

struct Counting;
static ALLOCATED: AtomicU64 = AtomicU64::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCATED.fetch_add(layout.size() as u64, Ordering::Relaxed);
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        ALLOCATED.fetch_add(new_size as u64, Ordering::Relaxed);
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

struct Cluster {
    nodes: Vec<Raft>,
    wire: VecDeque<Message>,
    committed: u64,
}

impl Cluster {
    fn new() -> Self {
        let nodes = (1..=3)
            .map(|id| {
                let mut c = Config::new(id, vec![1, 2, 3]);
                c.max_inflight_msgs = 1024;
                Raft::new(c, RestoreState::default()).unwrap()
            })
            .collect();
        Cluster {
            nodes,
            wire: VecDeque::new(),
            committed: 0,
        }
    }

    /// Drain every node's output until nothing moves: persist instantly, deliver instantly.
    fn pump(&mut self) {
        loop {
            let mut moved = false;
            for i in 0..self.nodes.len() {
                while self.nodes[i].has_ready() {
                    moved = true;
                    let mut rd = self.nodes[i].ready();
                    self.wire.extend(rd.messages.drain(..));
                    self.wire.extend(rd.persisted_messages.drain(..));
                    if i == 0 {
                        self.committed += rd.committed_entries.len() as u64;
                    }
                    self.nodes[i].advance(&rd);
                }
            }
            while let Some(m) = self.wire.pop_front() {
                moved = true;
                let to = (m.to - 1) as usize;
                self.nodes[to].step(m).unwrap();
            }
            if !moved {
                return;
            }
        }
    }
}

fn run(total: u64, batch: u64) -> (f64, f64) {
    let mut c = Cluster::new();
    c.nodes[0].campaign();
    c.pump();
    assert!(c.nodes[0].is_leader());
    let payload = Bytes::from_static(b"0123456789abcdef");
    let start_commit = c.committed;
    let alloc0 = ALLOCATED.load(Ordering::Relaxed);
    let t0 = Instant::now();
    while c.committed - start_commit < total {
        for _ in 0..batch {
            c.nodes[0].propose(payload.clone()).unwrap();
        }
        c.pump();
    }
    let secs = t0.elapsed().as_secs_f64();
    let n = (c.committed - start_commit) as f64;
    let bytes = (ALLOCATED.load(Ordering::Relaxed) - alloc0) as f64;
    (n / secs, bytes / n)
}

fn main() {
    let total: u64 = std::env::args()
        .skip(1)
        .find_map(|a| a.parse().ok())
        .unwrap_or(1_000_000);
    println!("3-node cluster, in-memory transport, instant persistence, {total} proposals of 16 B");
    for batch in [1, 64, 1024] {
        let mut rates = Vec::new();
        let mut allocs = 0.0;
        for _ in 0..3 {
            let (rate, per_entry) = run(total, batch);
            rates.push(rate);
            allocs = per_entry;
        }
        rates.sort_by(|a, b| a.partial_cmp(b).unwrap());
        println!(
            "  {batch:>5} proposals per round: median {:>10.0} proposals/s (min {:.0}, max {:.0}), {:.0} bytes allocated per entry",
            rates[1], rates[0], rates[2], allocs
        );
    }
}
