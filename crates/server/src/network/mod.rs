//! How members and clients reach a member: raft messages on the wire (`peer`), the
//! long-lived peer streams that carry them (`transport`), TLS on both ports (`tls`), and
//! what the client port accepts before any route sees a request (`guard`).

pub mod guard;
pub mod peer;
pub mod tls;
pub mod transport;
