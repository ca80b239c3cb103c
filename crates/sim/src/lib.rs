//! # sim — a deterministic simulator for the raft core
//!
//! Whole clusters run in virtual time on one thread: a seeded generator decides every
//! latency, loss, reordering and timeout, so a seed replays a run exactly. Crashes lose
//! what was not yet durable; partitions cut directed links. The checker asserts Raft's
//! safety properties after every event, and any failure prints the seed and the command
//! that replays it. See `docs/simulator.md` for the fault model.

pub mod checker;
pub mod cluster;
pub mod io;
pub mod leases;
pub mod linearizability;
pub mod machine;
pub mod network;
pub mod node;
pub mod soak;
pub mod system;
pub mod watchers;

pub use cluster::{Cluster, SimConfig};
pub use network::{Faults, Micros, MS};
pub use node::{command, command_id};

/// The seed a test should use: `SIM_SEED` if set (to replay a failure), else `default`.
pub fn seed_or(default: u64) -> u64 {
    std::env::var("SIM_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default)
}
