//! # kv — the replicated state machine
//!
//! An MVCC key-value store with etcd v3's semantics: one global revision, bumped by every
//! transaction that writes; per key a create revision, mod revision, version and lease;
//! Range (single key, range, prefix, limit, count, keys only, sort, past revisions), Put,
//! DeleteRange, Txn (compares on value, version, create and mod revision and lease; nested
//! transactions), Compact. Deterministic: the same requests applied in the same order give
//! the same state and answers on every node. [`Store::snapshot`] and [`Store::restore`]
//! carry the whole state for raft log compaction. [`Store::events_at`] reports what each
//! revision changed, as etcd's watch events. Leases (`lease.rs`) are replicated state; when
//! one expires is the leader's [`lessor::Lessor`]'s call, by its clock, made known through
//! the log. Sessions (`session.rs`) make a client's numbered writes run exactly once.

mod error;
mod events;
mod hash;
mod lease;
pub mod lessor;
mod session;
mod snapshot;
mod store;
mod types;

pub use error::{Error, Result};
pub use events::{Event, EventKind};
pub use hash::KvHash;
pub use lease::{Lease, LeaseId, LeaseResponse, MAX_LEASE_TTL};
pub use session::{Remembered, Session};
pub use snapshot::SnapshotValues;
pub use store::{Request, Response, Store, MAX_TXN_OPS};
pub use types::*;

/// The range end that selects every key starting with `prefix` (etcd's `--prefix`).
pub fn prefix_end(prefix: &[u8]) -> bytes::Bytes {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end.into();
        }
    }
    // All 0xff (or empty): every key from `prefix` on.
    bytes::Bytes::from_static(b"\0")
}
