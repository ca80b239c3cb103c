//! etcd's Maintenance service: Status, alarms, HashKV and Hash, Snapshot (backups),
//! Defragment and MoveLeader.
//!
//! What each means here:
//! - **Alarms** are replicated state (in the member registry), raised and cleared through
//!   the log as etcd's are, so every member refuses the same writes at the same place in
//!   the log (see `machine.rs`).
//! - **HashKV** hashes the MVCC history up to a revision (see `kv::Store::hash_kv`): members
//!   that applied the same log agree, which is what the consistency check compares.
//! - **Snapshot** streams a backup (see [`backup_bytes`]) ending with the SHA-256 of what
//!   came before, as etcd ends its stream; `raftkv snapshot restore` checks that hash
//!   before building anything from the file.
//! - **Defragment** compacts the write-ahead log into a fresh snapshot: what raftkv keeps
//!   on disk beyond the live store is log, so this is what gives the space back.
//!
//! Hashing and serializing run on a blocking thread from a copy of the store (a clone
//! shares every value), so neither stalls the raft loop.

use crate::grpc::{timed_out, API_VERSION, REQUEST_TIMEOUT};
use crate::machine::alarm_name;
use crate::members;
use crate::node::{Frozen, Node};
use crate::pb::etcdserverpb::{self as pb, maintenance_server};
use sha2::Digest;
use std::pin::Pin;
use std::time::Duration;
use tokio_stream::Stream;
use tonic::{Request, Response, Status};

/// Bytes of backup per Snapshot message.
const SNAPSHOT_CHUNK: usize = 256 << 10;

#[derive(Clone)]
pub struct MaintenanceService {
    node: Node,
}

impl MaintenanceService {
    pub fn new(node: Node) -> Self {
        MaintenanceService { node }
    }
}

/// Backups start with this.
const BACKUP_MAGIC: &[u8; 8] = b"RKVBACK1";

/// A backup as `Snapshot` streams it and `raftkv snapshot restore` reads it: the magic, the
/// length of the state machine's snapshot (u64 LE), that snapshot (member registry and
/// store), zeros up to a multiple of 512 bytes, then the SHA-256 of everything before it.
/// The padding is for `etcdctl snapshot save`, which takes a stream as complete only if
/// its length is a multiple of 512 plus the 32 bytes of the hash (etcd's database files
/// are whole pages).
pub fn backup_bytes(f: &Frozen) -> Vec<u8> {
    let data = members::encode_snapshot(&f.registry, &f.store.snapshot());
    let mut out = Vec::with_capacity(data.len() + 512 + 32);
    out.extend_from_slice(BACKUP_MAGIC);
    out.extend_from_slice(&(data.len() as u64).to_le_bytes());
    out.extend_from_slice(&data);
    out.resize(out.len().div_ceil(512) * 512, 0);
    let hash = sha2::Sha256::digest(&out);
    out.extend_from_slice(&hash);
    out
}

/// The state machine's snapshot inside a backup, once its hash and layout are checked.
pub fn check_backup(file: &[u8]) -> Result<bytes::Bytes, String> {
    if file.len() < BACKUP_MAGIC.len() + 8 + 32 {
        return Err("the file is too short to be a raftkv snapshot".into());
    }
    let (body, hash) = file.split_at(file.len() - 32);
    if sha2::Sha256::digest(body).as_slice() != hash {
        return Err(
            "the snapshot's SHA-256 does not match its contents (truncated or corrupt)".into(),
        );
    }
    let Some(rest) = body.strip_prefix(&BACKUP_MAGIC[..]) else {
        return Err("not a raftkv snapshot (an etcd snapshot cannot be restored here)".into());
    };
    let len = u64::from_le_bytes(rest[..8].try_into().expect("8 bytes")) as usize;
    let data = rest[8..]
        .get(..len)
        .ok_or("the snapshot's length runs past its end")?;
    Ok(bytes::Bytes::copy_from_slice(data))
}

/// Bytes the member's data directory holds on disk (log segments and snapshot files).
pub fn disk_usage(dir: &std::path::Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .flatten()
        .map(|e| match e.metadata() {
            Ok(m) if m.is_dir() => disk_usage(&e.path()),
            Ok(m) => m.len(),
            Err(_) => 0,
        })
        .sum()
}

/// An alarm as etcd's Status lists it in `errors`.
pub fn alarm_error(member: u64, alarm: i32) -> String {
    format!("memberID:{member} alarm:{} ", alarm_name(alarm))
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> Result<T, Status> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| Status::internal(format!("etcdserver: {e}")))
}

type SnapshotStream = Pin<Box<dyn Stream<Item = Result<pb::SnapshotResponse, Status>> + Send>>;

#[tonic::async_trait]
impl maintenance_server::Maintenance for MaintenanceService {
    async fn alarm(
        &self,
        req: Request<pb::AlarmRequest>,
    ) -> Result<Response<pb::AlarmResponse>, Status> {
        let (alarms, header) =
            tokio::time::timeout(REQUEST_TIMEOUT, self.node.alarm(req.into_inner()))
                .await
                .map_err(|_| timed_out())??;
        Ok(Response::new(pb::AlarmResponse {
            header: Some(header),
            alarms: alarms
                .into_iter()
                .map(|(member_id, alarm)| pb::AlarmMember { member_id, alarm })
                .collect(),
        }))
    }

    async fn status(
        &self,
        _: Request<pb::StatusRequest>,
    ) -> Result<Response<pb::StatusResponse>, Status> {
        let s = self.node.status().await?;
        let dir = self.node.data_dir().to_path_buf();
        let on_disk = blocking(move || disk_usage(&dir)).await?;
        Ok(Response::new(pb::StatusResponse {
            header: Some(self.node.header(s.revision, s.term)),
            version: API_VERSION.to_string(),
            db_size: on_disk as i64,
            leader: s.leader.unwrap_or(0),
            raft_index: s.commit,
            raft_term: s.term,
            raft_applied_index: s.applied,
            errors: s.alarms.iter().map(|&(m, a)| alarm_error(m, a)).collect(),
            db_size_in_use: s.db_size as i64,
            is_learner: self.node.view().is_learner(self.node.id()),
        }))
    }

    async fn defragment(
        &self,
        _: Request<pb::DefragmentRequest>,
    ) -> Result<Response<pb::DefragmentResponse>, Status> {
        let dir = self.node.data_dir().to_path_buf();
        let before = disk_usage(&dir);
        // A large store takes a while to serialize: allow more than a request's timeout.
        tokio::time::timeout(Duration::from_secs(300), self.node.compact_log())
            .await
            .map_err(|_| timed_out())??;
        let after = disk_usage(&dir);
        tracing::info!(before, after, "defragmented: log compacted into a snapshot");
        Ok(Response::new(pb::DefragmentResponse {
            header: Some(self.node.current_header()),
        }))
    }

    async fn hash(
        &self,
        _: Request<pb::HashRequest>,
    ) -> Result<Response<pb::HashResponse>, Status> {
        let f = self.node.freeze().await?;
        let revision = f.store.revision();
        let hash = blocking(move || {
            crc32c::crc32c(&members::encode_snapshot(&f.registry, &f.store.snapshot()))
        })
        .await?;
        Ok(Response::new(pb::HashResponse {
            header: Some(self.node.header(revision, self.node.view().term)),
            hash,
        }))
    }

    async fn hash_kv(
        &self,
        req: Request<pb::HashKvRequest>,
    ) -> Result<Response<pb::HashKvResponse>, Status> {
        let rev = req.into_inner().revision;
        let f = self.node.freeze().await?;
        let current = f.store.revision();
        let h = blocking(move || f.store.hash_kv(rev))
            .await?
            .map_err(|e| crate::api::status(&e))?;
        Ok(Response::new(pb::HashKvResponse {
            header: Some(self.node.header(current, self.node.view().term)),
            hash: h.hash,
            compact_revision: h.compact_revision,
            hash_revision: h.revision,
        }))
    }

    type SnapshotStream = SnapshotStream;

    async fn snapshot(
        &self,
        _: Request<pb::SnapshotRequest>,
    ) -> Result<Response<SnapshotStream>, Status> {
        let f = self.node.freeze().await?;
        let header = self.node.header(f.store.revision(), f.term);
        let (revision, applied) = (f.store.revision(), f.applied);
        let backup = blocking(move || backup_bytes(&f)).await?;
        tracing::info!(
            revision,
            applied,
            bytes = backup.len(),
            "sending a snapshot (backup)"
        );
        let total = backup.len();
        let backup = bytes::Bytes::from(backup);
        let chunks = (0..total.div_ceil(SNAPSHOT_CHUNK)).map(move |i| {
            let end = ((i + 1) * SNAPSHOT_CHUNK).min(total);
            Ok(pb::SnapshotResponse {
                header: Some(header),
                remaining_bytes: (total - end) as u64,
                blob: backup.slice(i * SNAPSHOT_CHUNK..end),
                version: API_VERSION.to_string(),
            })
        });
        Ok(Response::new(Box::pin(tokio_stream::iter(chunks))))
    }

    /// Hand leadership to another voter (etcdctl move-leader sends this to the leader), and
    /// answer once it leads.
    async fn move_leader(
        &self,
        req: Request<pb::MoveLeaderRequest>,
    ) -> Result<Response<pb::MoveLeaderResponse>, Status> {
        let target = req.into_inner().target_id;
        self.node.transfer_leader(target).await?;
        let deadline = tokio::time::Instant::now() + REQUEST_TIMEOUT;
        loop {
            let v = self.node.view();
            if v.leader == Some(target) {
                return Ok(Response::new(pb::MoveLeaderResponse {
                    header: Some(self.node.header(0, v.term)),
                }));
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(Status::deadline_exceeded(
                    "etcdserver: request timed out, leader transfer took too long",
                ));
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::members::Registry;

    fn frozen() -> Frozen {
        let mut store = kv::Store::new();
        for i in 0..20 {
            let put = kv::PutRequest {
                key: format!("k{i}").into(),
                value: vec![b'v'; i * 10].into(),
                ..Default::default()
            };
            store.apply(&kv::Request::Put(put)).unwrap();
        }
        let registry =
            Registry::bootstrap([(7, "a".to_string(), vec!["http://a:2380".to_string()])]);
        Frozen {
            store,
            registry,
            applied: 21,
            term: 2,
        }
    }

    /// `etcdctl snapshot save` takes a stream as whole only if its length is a multiple of
    /// 512 plus a 32-byte hash; what comes back out is the snapshot that went in.
    #[test]
    fn a_backup_has_etcds_shape_and_gives_back_its_snapshot() {
        let f = frozen();
        let b = backup_bytes(&f);
        assert_eq!(b.len() % 512, 32);
        let data = check_backup(&b).unwrap();
        let (registry, store) = members::decode_snapshot(&data).unwrap();
        assert_eq!(registry.unwrap(), f.registry);
        assert_eq!(kv::Store::restore(&store).unwrap(), f.store);
    }

    #[test]
    fn a_damaged_or_foreign_backup_is_refused() {
        let b = backup_bytes(&frozen());
        for cut in [0, 1, 31, 32, b.len() / 2, b.len() - 1] {
            assert!(check_backup(&b[..cut]).is_err(), "truncated at {cut}");
        }
        for at in [0, 9, 100, b.len() - 40, b.len() - 1] {
            let mut d = b.clone();
            d[at] ^= 1;
            assert!(check_backup(&d).is_err(), "flipped byte {at}");
        }
        // A file with a valid hash but another layout (an etcd database, say).
        let mut foreign = vec![0u8; 512];
        foreign.extend_from_slice(&sha2::Sha256::digest(&foreign));
        let e = check_backup(&foreign).unwrap_err();
        assert!(e.contains("not a raftkv snapshot"), "{e}");
    }
}
