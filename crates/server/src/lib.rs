//! # server — the raftkv node
//!
//! So far: the wire formats. `pb` holds the etcd v3 API (`etcdserverpb`, `mvccpb`) and
//! raftkv's own messages (`raftkvpb`), compiled from `proto/` at build time by a pure-Rust
//! protobuf compiler. `api` maps the etcd API onto the `kv` store (and `kv` errors onto
//! etcd's gRPC codes and messages), `command` turns client writes into log entries and back,
//! and `peer` carries raft messages between nodes. Everything that comes off the wire is
//! validated.

pub mod api;
pub mod bootstrap;
pub mod command;
pub mod corrupt;
pub mod dashboard;
pub mod election;
pub mod grpc;
pub mod grpc_metrics;
pub mod guard;
pub mod health;
pub mod insight;
pub mod lease;
pub mod lock;
pub mod machine;
pub mod maintenance;
pub mod members;
pub mod metrics;
pub mod node;
pub mod peer;
pub mod recipe;
pub mod reconfig;
pub mod tls;
pub mod transport;
pub mod watch;

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
