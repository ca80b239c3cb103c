//! What the compat tests share, one file per concern, so that no test file keeps its own
//! copy: the servers as processes and their ports (`processes`), Debian's etcdctl
//! (`etcdctl`), taking out of outputs what differs between any two runs (`normalize`),
//! running a script against etcd and raftkv and comparing the transcripts (`compare`), and
//! waiting with a deadline (`wait`). Everything is re-exported here: a test says
//! `support::start`, not where it lives.
//!
//! Every test file includes this module (`mod support;`, or with `#[path]` from a test
//! that is a folder) and uses part of it.

// Each test file uses part of this: what one leaves unused (and the re-exports of it) is
// not a mistake there.
#![allow(dead_code, unused_imports)]

pub mod compare;
pub mod etcdctl;
pub mod normalize;
pub mod processes;
pub mod wait;

pub use compare::*;
pub use etcdctl::*;
pub use normalize::*;
pub use processes::*;
pub use wait::*;
