//! The kv store as the driver's state machine: log entries are etcd requests (see
//! `command.rs`), applied to the MVCC store with etcd's semantics.

use crate::api;
use crate::command;
use driver::{RequestId, StateMachine};
use raft::{Entry, EntryKind, Snapshot};
use tonic::Status;

/// A write's outcome and the store revision right after it (the response header's).
pub type Applied = Result<(kv::Response, i64), Status>;
/// A read's answer and the revision it was served at.
pub type Served = Result<(kv::RangeResponse, i64), Status>;

#[derive(Default)]
pub struct KvMachine {
    pub store: kv::Store,
}

impl StateMachine for KvMachine {
    type Output = Applied;
    type Query = kv::RangeRequest;
    type Answer = Served;
    type Frozen = kv::Store;

    fn apply(&mut self, e: &Entry) -> Result<Option<(RequestId, Applied)>, String> {
        // No-ops and configuration changes (the core's own entries) change no keys.
        if e.kind != EntryKind::Normal || e.data.is_empty() {
            return Ok(None);
        }
        let (id, request) = match command::decode(&e.data) {
            Ok(decoded) => decoded,
            Err(err) => {
                // Every member sees the same bytes and skips them the same way.
                tracing::error!(index = e.index, error = %err, "undecodable log entry skipped");
                return Ok(None);
            }
        };
        // A request etcd refuses (a compacted revision, a missing key in a txn's rules…) is
        // the client's answer, the same on every member: not a failure of the member.
        let result = request.and_then(|r| self.store.apply(&r).map_err(|e| api::status(&e)));
        Ok(Some((id, result.map(|r| (r, self.store.revision())))))
    }

    fn query(&self, req: &kv::RangeRequest) -> Served {
        let revision = self.store.revision();
        self.store
            .range(req, revision)
            .map(|r| (r, revision))
            .map_err(|e| api::status(&e))
    }

    /// A clone shares the values; serializing it happens on a blocking thread.
    fn freeze(&self) -> kv::Store {
        self.store.clone()
    }

    fn restore(&mut self, s: &Snapshot) -> Result<(), String> {
        self.store = kv::Store::restore(&s.data).map_err(|e| e.to_string())?;
        Ok(())
    }
}
