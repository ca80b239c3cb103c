//! Exactly-once commands (the Raft paper's client sessions). A client numbers the writes it
//! makes in a session — a lease it holds — 1, 2, 3…, one at a time. The store remembers,
//! per session, the last number it applied and that command's answer. When a leader
//! crashes after committing a command and before answering, the client retries with the
//! same number wherever it can, and gets the remembered answer: the command ran once.
//!
//! The memory is replicated state like the rest of the store (it is in snapshots), so every
//! member answers a retry the same way, and it lives exactly as long as the lease: revoking
//! or expiring the lease frees it.

use crate::error::{Error, Result};
use crate::lease::LeaseId;
use crate::store::{Request, Response, Store};
use crate::types::Revision;

/// A command's place in its client's session.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Session {
    /// The lease the session lives in.
    pub lease: LeaseId,
    /// The command's number; 1 for the first, each next one greater.
    pub seq: u64,
}

/// What a session remembers of its last command.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Remembered {
    pub seq: u64,
    /// The command's answer, a refusal included: a retry is refused the same way.
    pub result: Result<Response>,
    /// The store's revision right after the command (its answer's header revision).
    pub revision: Revision,
}

impl Store {
    /// Apply a write once per sequence number of its session. Returns the answer and the
    /// revision after the command, from memory if this number was applied already. Refused
    /// (and not remembered): a session whose lease does not exist, number 0, a number older
    /// than the last applied, and requests that are not writes.
    pub fn apply_in_session(&mut self, s: Session, req: &Request) -> Result<Remembered> {
        if !matches!(
            req,
            Request::Put(_) | Request::DeleteRange(_) | Request::Txn(_)
        ) {
            return Err(Error::NotInSession);
        }
        if s.seq == 0 {
            return Err(Error::BadSequence);
        }
        if !self.leases.contains_key(&s.lease) {
            return Err(Error::LeaseNotFound);
        }
        if let Some(last) = self.sessions.get(&s.lease) {
            if s.seq == last.seq {
                return Ok(last.clone());
            }
            if s.seq < last.seq {
                return Err(Error::StaleSequence { last: last.seq });
            }
        }
        let result = self.apply(req);
        let remembered = Remembered {
            seq: s.seq,
            result,
            revision: self.revision,
        };
        self.sessions.insert(s.lease, remembered.clone());
        Ok(remembered)
    }

    /// What a session remembers (for tests and tools).
    pub fn session(&self, lease: LeaseId) -> Option<&Remembered> {
        self.sessions.get(&lease)
    }

    pub fn session_count(&self) -> usize {
        self.sessions.len()
    }
}
