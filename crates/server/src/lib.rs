//! # server — a raftkv member as a library
//!
//! A member of an etcd-compatible cluster: etcd's v3 gRPC API served over the raft core
//! (`raft`, run by `driver`), the write-ahead log (`storage`) and the MVCC store (`kv`).
//! Four folders, by concern:
//!
//! - [`services`] — etcd's gRPC services, one file each, and the mapping of etcd's
//!   messages and errors onto the store (`services::api`);
//! - [`member`] — the running member: [`member::Member::start`] from a
//!   [`member::Config`], who it is at start (`bootstrap`), the raft loop (`node`), the
//!   apply path (`machine`), log entries (`command`), the member registry and the rules a
//!   membership change must pass;
//! - [`network`] — raft messages on the wire, the peer transport, TLS, and what the client
//!   port accepts at all;
//! - [`operations`] — metrics, health, and what a member shows the dashboard.
//!
//! `pb` holds the wire formats, compiled from `proto/` at build time by a pure-Rust protobuf
//! compiler. Everything that comes off the wire is validated. The `raftkv` program (its
//! flags, `raftkv cluster`, the client and the load generators) is the `raftkv` crate.

pub mod member;
pub mod network;
pub mod operations;
pub mod services;

/// Generated protobuf types and gRPC services.
pub mod pb {
    pub mod mvccpb {
        tonic::include_proto!("mvccpb");
    }
    pub mod etcdserverpb {
        tonic::include_proto!("etcdserverpb");
    }
    pub mod raftkvpb {
        tonic::include_proto!("raftkvpb");
    }
    pub mod v3lockpb {
        tonic::include_proto!("v3lockpb");
    }
    pub mod v3electionpb {
        tonic::include_proto!("v3electionpb");
    }
}
