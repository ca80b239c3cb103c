//! A running member: who it is (`bootstrap`), the raft loop that drives the core and the
//! disk (`node`), the state machine it applies committed entries to (`machine`, with the
//! log's entry format in `command`), the member registry (`members`) and the rules a
//! membership change must pass (`reconfig`), and the background consistency check
//! (`corrupt`). `serve` starts all of it from a [`Config`], as `raftkv serve` does.

pub mod bootstrap;
pub mod command;
pub mod corrupt;
pub mod machine;
pub mod members;
pub mod node;
pub mod reconfig;
pub mod serve;

pub use serve::{Config, Member};
