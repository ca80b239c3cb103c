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
//! shares every value), so neither stalls the raft loop. Neither builds the serialized
//! store in memory: Hash feeds it chunk by chunk to the CRC, and Snapshot produces its
//! chunks as the client reads them (a few chunks ahead at most, see [`backup_chunks`]).
//! A frozen copy still pins what the store held when it was taken (writes since then copy
//! the paths they change), so at most [`MAX_SNAPSHOTS`] Snapshot calls and
//! [`MAX_HASHES`] Hash and HashKV calls run at once on a member; one more is refused at
//! once with etcd's "too many requests" (`ResourceExhausted`), which clients retry — a
//! refusal, not a queue, so that a crowd of slow readers holds nothing at all. The two
//! bounds are apart because a Snapshot lasts as long as its client takes to read it, while
//! a hash ends by itself: clients that stop reading their backups must not stop the
//! consistency check (which asks every member for HashKV) or anyone's Hash.

use crate::member::machine::alarm_name;
use crate::member::members;
use crate::member::node::{Frozen, Node};
use crate::pb::etcdserverpb::{self as pb, maintenance_server};
use crate::services::{timed_out, API_VERSION, REQUEST_TIMEOUT};
use sha2::Digest;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_stream::Stream;
use tonic::{Request, Response, Status};

/// Bytes of backup per Snapshot message.
const SNAPSHOT_CHUNK: usize = 256 << 10;

/// Most Snapshot calls served at once (see the module's doc).
pub const MAX_SNAPSHOTS: usize = 4;
/// Most Hash and HashKV calls served at once.
pub const MAX_HASHES: usize = 4;

/// Backup chunks produced ahead of the client's reading, per Snapshot call.
const CHUNKS_AHEAD: usize = 2;

#[derive(Clone)]
pub struct MaintenanceService {
    node: Node,
    /// One permit per backup being streamed.
    snapshots: Arc<Semaphore>,
    /// One permit per Hash or HashKV being computed.
    hashes: Arc<Semaphore>,
}

impl MaintenanceService {
    pub fn new(node: Node) -> Self {
        MaintenanceService {
            node,
            snapshots: Arc::new(Semaphore::new(MAX_SNAPSHOTS)),
            hashes: Arc::new(Semaphore::new(MAX_HASHES)),
        }
    }

    /// A permit to stream a backup, or etcd's "too many requests".
    fn snapshot_permit(&self) -> Result<OwnedSemaphorePermit, Status> {
        permit(&self.snapshots, MAX_SNAPSHOTS, "Snapshot")
    }

    /// A permit to hash a frozen copy, or etcd's "too many requests".
    fn hash_permit(&self) -> Result<OwnedSemaphorePermit, Status> {
        permit(&self.hashes, MAX_HASHES, "Hash and HashKV")
    }
}

fn permit(s: &Arc<Semaphore>, max: usize, what: &str) -> Result<OwnedSemaphorePermit, Status> {
    s.clone().try_acquire_owned().map_err(|_| {
        Status::resource_exhausted(format!(
            "etcdserver: too many requests (at most {max} {what} calls at once on a member)"
        ))
    })
}

/// Backups start with this.
const BACKUP_MAGIC: &[u8; 8] = b"RKVBACK1";

/// A backup as `Snapshot` streams it and `raftkv snapshot restore` reads it: the magic, the
/// length of the state machine's snapshot (u64 LE), that snapshot (member registry and
/// store), zeros up to a multiple of 512 bytes, then the SHA-256 of everything before it.
/// The padding is for `etcdctl snapshot save`, which takes a stream as complete only if
/// its length is a multiple of 512 plus the 32 bytes of the hash (etcd's database files
/// are whole pages). In one buffer: for tests and tools; a member streams
/// [`backup_chunks`].
pub fn backup_bytes(f: &Frozen) -> Vec<u8> {
    let (_, chunks) = backup_chunks(f, SNAPSHOT_CHUNK);
    chunks.flat_map(|c| c.to_vec()).collect()
}

/// The backup of [`backup_bytes`] in chunks of about `chunk` bytes, produced one at a time
/// from the frozen copy (the store is never serialized whole), with its total length.
pub fn backup_chunks(f: &Frozen, chunk: usize) -> (u64, impl Iterator<Item = bytes::Bytes>) {
    let (data_len, data) = members::snapshot_chunks(&f.registry, f.store.clone(), chunk);
    let unpadded = (BACKUP_MAGIC.len() + 8) as u64 + data_len;
    let padded = unpadded.div_ceil(512) * 512;
    let mut head = Vec::with_capacity(BACKUP_MAGIC.len() + 8);
    head.extend_from_slice(BACKUP_MAGIC);
    head.extend_from_slice(&data_len.to_le_bytes());
    let padding = vec![0u8; (padded - unpadded) as usize];
    let mut hasher = Some(sha2::Sha256::new());
    let body = std::iter::once(bytes::Bytes::from(head))
        .chain(data)
        .chain((!padding.is_empty()).then(|| bytes::Bytes::from(padding)));
    // Every piece goes through the hash on its way out; the hash itself comes last.
    let pieces = body
        .map(Some)
        .chain(std::iter::once(None))
        .map(move |piece| match piece {
            Some(b) => {
                if let Some(h) = hasher.as_mut() {
                    h.update(&b);
                }
                b
            }
            None => {
                let h = hasher
                    .take()
                    .map(|h| h.finalize().to_vec())
                    .unwrap_or_default();
                bytes::Bytes::from(h)
            }
        });
    (padded + 32, pieces)
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
        let permit = self.hash_permit()?;
        let f = self.node.freeze().await?;
        let revision = f.store.revision();
        // The CRC of the state machine's snapshot, fed chunk by chunk.
        let hash = blocking(move || {
            let _permit = permit;
            let (_, chunks) = members::snapshot_chunks(&f.registry, f.store, SNAPSHOT_CHUNK);
            chunks.fold(0, |crc, c| crc32c::crc32c_append(crc, &c))
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
        let permit = self.hash_permit()?;
        let f = self.node.freeze().await?;
        let current = f.store.revision();
        let h = blocking(move || {
            let _permit = permit;
            f.store.hash_kv(rev)
        })
        .await?
        .map_err(|e| crate::services::api::status(&e))?;
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
        let permit = self.snapshot_permit()?;
        let f = self.node.freeze().await?;
        let header = self.node.header(f.store.revision(), f.term);
        let (revision, applied) = (f.store.revision(), f.applied);
        // Chunks are produced on a blocking thread as the client reads them: the queue holds
        // `CHUNKS_AHEAD`, and the producer waits for room. It stops when the client goes
        // (the queue closes); the permit goes with the producer.
        let (tx, rx) =
            tokio::sync::mpsc::channel::<Result<pb::SnapshotResponse, Status>>(CHUNKS_AHEAD);
        tokio::task::spawn_blocking(move || {
            let _permit = permit;
            // Its length is a walk over the store: on this thread too.
            let (total, chunks) = backup_chunks(&f, SNAPSHOT_CHUNK);
            tracing::info!(
                revision,
                applied,
                bytes = total,
                "sending a snapshot (backup)"
            );
            let mut sent = 0u64;
            for blob in chunks {
                sent += blob.len() as u64;
                let msg = pb::SnapshotResponse {
                    header: Some(header),
                    remaining_bytes: total - sent,
                    blob,
                    version: API_VERSION.to_string(),
                };
                if tx.blocking_send(Ok(msg)).is_err() {
                    return;
                }
            }
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
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
    use crate::member::members::Registry;

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
