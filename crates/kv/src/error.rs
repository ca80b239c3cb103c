//! Errors, with etcd's messages: clients match on them.

use std::fmt;

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Error {
    /// The revision asked for was compacted away.
    Compacted,
    /// The revision asked for does not exist yet.
    FutureRevision,
    /// `ignore_value` / `ignore_lease` on a key that does not exist.
    KeyNotFound,
    /// A transaction writes the same key twice.
    DuplicateKey,
    /// A transaction has more operations than allowed.
    TooManyOps,
    /// An empty key where one is required.
    EmptyKey,
    /// A snapshot that cannot be decoded.
    BadSnapshot(&'static str),
    /// A lease named by a request does not exist (or no longer does).
    LeaseNotFound,
    /// A grant of an id already taken.
    LeaseExists,
    /// A TTL above [`crate::MAX_LEASE_TTL`].
    LeaseTtlTooLarge,
    /// A session's sequence number older than the last one it applied.
    StaleSequence { last: u64 },
    /// Sequence number 0 (numbers start at 1).
    BadSequence,
    /// Only puts, deletes and transactions run in a session.
    NotInSession,
    /// A retry of a session's last number whose command differs from the one applied.
    SessionMismatch { seq: u64 },
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Error::Compacted => "etcdserver: mvcc: required revision has been compacted",
            Error::FutureRevision => "etcdserver: mvcc: required revision is a future revision",
            Error::KeyNotFound => "etcdserver: key not found",
            Error::DuplicateKey => "etcdserver: duplicate key given in txn request",
            Error::TooManyOps => "etcdserver: too many operations in txn request",
            Error::EmptyKey => "etcdserver: key is not provided",
            Error::BadSnapshot(why) => return write!(f, "kv snapshot: {why}"),
            Error::LeaseNotFound => "etcdserver: requested lease not found",
            Error::LeaseExists => "etcdserver: lease already exists",
            Error::LeaseTtlTooLarge => "etcdserver: too large lease TTL",
            Error::StaleSequence { last } => {
                return write!(
                    f,
                    "raftkv: session sequence number is older than the last applied ({last})"
                )
            }
            Error::BadSequence => "raftkv: session sequence numbers start at 1",
            Error::NotInSession => "raftkv: only puts, deletes and txns run in a session",
            Error::SessionMismatch { seq } => {
                return write!(
                    f,
                    "raftkv: session sequence number {seq} was applied to a different request \
                     (a retry must resend the same request)"
                )
            }
        })
    }
}

impl std::error::Error for Error {}

pub type Result<T> = std::result::Result<T, Error>;
