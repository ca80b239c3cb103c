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
        })
    }
}

impl std::error::Error for Error {}

pub type Result<T> = std::result::Result<T, Error>;
