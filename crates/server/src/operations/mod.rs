//! What an operator sees of a member: Prometheus metrics under etcd's names (`metrics`,
//! `grpc_metrics`), `/health` and `/version` (`health`), the state a member shows the
//! dashboard (`insight`) and the dashboard page itself (`dashboard`).

pub mod dashboard;
pub mod grpc_metrics;
pub mod health;
pub mod insight;
pub mod metrics;
