//! # watch — etcd's change feed, sans-IO
//!
//! A [`Hub`] serves every watcher of one member from that member's applied state: after the
//! member applies entries it calls [`Hub::sync`] with its store, and the hub hands each
//! watcher the events of the new revisions that fall in its range. It owns no threads,
//! sockets or clock; a watch stream is a [`Sink`] (a bounded queue the caller drains: a
//! gRPC stream in the server, a simulated client in the simulator), and time moves only by
//! [`Hub::progress_tick`]. The server and the simulator run this same code.
//!
//! ## The promises (etcd's), and how they are kept
//! - **Ordered, unique, reliable.** Every watcher has one cursor, `next_rev`: the first
//!   revision it has not been given. Events leave only from the cursor, and the cursor moves
//!   only past what was queued, so nothing is skipped or given twice.
//! - **Atomic.** All of a revision's events for a watcher go in one response (or, for a
//!   watcher that asked for `fragment`, in consecutive fragments queued together).
//! - **Never blocking apply, never losing.** A watcher is *synced* while its stream keeps
//!   up: new revisions reach it through the range index (`index.rs`) as they apply. When its
//!   stream's queue is full it becomes *unsynced* — nothing dropped, its cursor where it
//!   was — and [`Hub::sync`] later replays it from the store's revision index in bounded
//!   slices, until it has caught up and rejoins the index.
//! - **Bookmarkable.** A progress response claims revision R only when every watcher of its
//!   stream is synced, so every event at or below R is already queued ahead of it.
//! - **Resumable.** A watch from revision R replays history from R (if not compacted: then
//!   it is canceled with the compact revision, as etcd does), so a client that reconnects
//!   with its last revision + 1 — to any member — gets exactly the rest.

pub mod check;
mod hub;
mod index;

pub use hub::{Full, Hub, Limits, Sink};
pub use index::End;

use bytes::Bytes;
pub use kv::{Event, EventKind, Revision};

/// A stream's id in its hub.
pub type StreamId = u64;
/// A watcher's id in its stream, as the client sees it.
pub type WatchId = i64;
/// Asking the hub to pick the id (etcd's `AutoWatchID`).
pub const AUTO_WATCH_ID: WatchId = 0;
/// The id of an answer that belongs to no watcher: a refused create, a progress response.
pub const INVALID_WATCH_ID: WatchId = -1;

/// etcd's refusals of a create, word for word.
pub const EMPTY_RANGE: &str = "mvcc: watcher range is empty";
pub const DUPLICATE_ID: &str = "mvcc: duplicate watch ID provided on the WatchStream";
/// The refusal of a create beyond [`Limits::watchers_per_stream`] (raftkv's own: etcd has
/// no such bound).
pub const TOO_MANY_WATCHERS: &str = "raftkv: too many watchers on this stream";
pub const COMPACTED: &str = "etcdserver: mvcc: required revision has been compacted";

/// `WatchCreateRequest`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CreateRequest {
    pub key: Bytes,
    pub range_end: Bytes,
    /// 0: from the next revision.
    pub start_revision: Revision,
    pub progress_notify: bool,
    pub no_put: bool,
    pub no_delete: bool,
    pub prev_kv: bool,
    /// [`AUTO_WATCH_ID`] or the client's choice.
    pub watch_id: WatchId,
    pub fragment: bool,
}

/// `WatchResponse`, without the member's ids and term (the server adds them).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Response {
    /// The header's revision.
    pub revision: Revision,
    pub watch_id: WatchId,
    pub created: bool,
    pub canceled: bool,
    pub compact_revision: Revision,
    pub cancel_reason: String,
    pub fragment: bool,
    pub events: Vec<Event>,
}

impl Response {
    /// A progress notification: events up to `revision` are all delivered.
    pub fn is_progress(&self) -> bool {
        self.events.is_empty()
            && !self.created
            && !self.canceled
            && !self.fragment
            && self.compact_revision == 0
    }
}
