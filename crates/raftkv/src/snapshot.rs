//! `raftkv snapshot save|status|restore`: backups, as etcd's tools take them.
//!
//! `save` streams a member's Snapshot into a file (what `etcdctl snapshot save` also does
//! against raftkv); `status` checks a file and says what it holds; `restore` builds a new
//! member's data directory from a file, for a new cluster described by the same flags the
//! member will be started with (etcd's restore flow: restore once per member, with its own
//! `--name`, then start every member with `--initial-cluster-state new`). The restored
//! cluster holds the backup's keys, revisions, leases and sessions; the membership is the
//! new one, and alarms are cleared.

use crate::client::first;
use raft::{HardState, Membership, Snapshot, SnapshotMeta};
use server::member::bootstrap::{self, Flags};
use server::member::members;
use server::pb::etcdserverpb::{maintenance_client::MaintenanceClient, SnapshotRequest};
use server::services::maintenance::check_backup;
use std::io::Write;
use std::path::{Path, PathBuf};

#[derive(clap::Subcommand, Debug)]
pub enum SnapshotCmd {
    /// Stream a member's snapshot into FILE (written to FILE.part, then renamed).
    Save { file: PathBuf },
    /// Check FILE's hash and print its revision, keys, leases and size.
    Status { file: PathBuf },
    /// Build a new member's data directory from FILE.
    Restore(RestoreArgs),
}

#[derive(clap::Args, Debug)]
pub struct RestoreArgs {
    file: PathBuf,
    /// The member's name; must appear in --initial-cluster.
    #[arg(long, default_value = "default")]
    name: String,
    /// Every member of the new cluster as name=peer-url, comma separated.
    #[arg(long, default_value = "default=http://127.0.0.1:2380")]
    initial_cluster: String,
    #[arg(long, default_value = "etcd-cluster")]
    initial_cluster_token: String,
    #[arg(long, default_value = "http://127.0.0.1:2380")]
    initial_advertise_peer_urls: String,
    /// Where to build it (must not exist, or be empty); default NAME.raftkv.
    #[arg(long)]
    data_dir: Option<PathBuf>,
}

pub async fn run(endpoints: &str, cmd: SnapshotCmd) -> Result<(), String> {
    match cmd {
        SnapshotCmd::Save { file } => save(endpoints, &file).await,
        SnapshotCmd::Status { file } => status(&file),
        SnapshotCmd::Restore(a) => restore(a),
    }
}

async fn save(endpoints: &str, file: &Path) -> Result<(), String> {
    let part = file.with_extension("part");
    let mut out = std::fs::File::create(&part).map_err(|e| format!("{}: {e}", part.display()))?;
    let mut stream = first(endpoints, |ch| async move {
        MaintenanceClient::new(ch)
            .max_decoding_message_size(64 << 20)
            .snapshot(SnapshotRequest {})
            .await
    })
    .await?
    .into_inner();
    let mut total = 0usize;
    while let Some(msg) = stream
        .message()
        .await
        .map_err(|e| e.message().to_string())?
    {
        out.write_all(&msg.blob)
            .map_err(|e| format!("{}: {e}", part.display()))?;
        total += msg.blob.len();
    }
    out.sync_all()
        .map_err(|e| format!("{}: {e}", part.display()))?;
    let body = std::fs::read(&part).map_err(|e| format!("{}: {e}", part.display()))?;
    check_backup(&body).map_err(|e| format!("the received snapshot is unusable: {e}"))?;
    std::fs::rename(&part, file).map_err(|e| format!("{}: {e}", file.display()))?;
    println!("Snapshot saved at {} ({total} bytes)", file.display());
    Ok(())
}

/// The store inside a backup file.
fn read_backup(file: &Path) -> Result<(kv::Store, bytes::Bytes), String> {
    let bytes = std::fs::read(file).map_err(|e| format!("{}: {e}", file.display()))?;
    let data = check_backup(&bytes).map_err(|e| format!("{}: {e}", file.display()))?;
    let (_, store_bytes) = members::decode_snapshot(&data)?;
    let store = kv::Store::restore(&store_bytes)
        .map_err(|e| format!("{}: the store in it is unreadable: {e}", file.display()))?;
    Ok((store, store_bytes))
}

fn status(file: &Path) -> Result<(), String> {
    let (store, bytes) = read_backup(file)?;
    let h = store
        .hash_kv(0)
        .map_err(|e| format!("hashing the store: {e}"))?;
    println!("revision:         {}", store.revision());
    println!("compact revision: {}", store.compact_revision());
    println!("hashkv:           {}", h.hash);
    println!("leases:           {}", store.lease_count());
    println!("store bytes:      {}", bytes.len());
    Ok(())
}

fn restore(a: RestoreArgs) -> Result<(), String> {
    let (store, _) = read_backup(&a.file)?;
    let data_dir = a
        .data_dir
        .clone()
        .unwrap_or_else(|| PathBuf::from(format!("{}.raftkv", a.name)));
    if std::fs::read_dir(&data_dir).is_ok_and(|mut d| d.next().is_some()) {
        return Err(format!(
            "--data-dir {} exists and is not empty: restore builds a new member",
            data_dir.display()
        ));
    }
    let initial_cluster = crate::serve::initial_cluster(&a.initial_cluster)?;
    let flags = Flags {
        name: a.name.clone(),
        initial_cluster,
        new_cluster: true,
        token: a.initial_cluster_token.clone(),
        advertise_peer_urls: a
            .initial_advertise_peer_urls
            .split(',')
            .map(str::to_string)
            .collect(),
        data_dir: data_dir.clone(),
        // Restoring talks to nobody.
        peer_dialer: Default::default(),
    };
    let (cluster_id, id, registry) = bootstrap::founding(&flags)?;
    std::fs::create_dir_all(&data_dir).map_err(|e| format!("{}: {e}", data_dir.display()))?;
    bootstrap::save(&data_dir, &registry)?;
    let identity = storage::Identity {
        cluster_id,
        node_id: id,
    };
    let (mut disk, _) = storage::Storage::open(&data_dir, identity, storage::Options::default())
        .map_err(|e| e.to_string())?;
    // The whole backup becomes the new cluster's first snapshot, at index 1 of term 1, with
    // the new members as its configuration: every member restored from the same file with
    // the same flags starts from the same state, and their logs continue from there.
    let voters: Vec<u64> = registry.members.keys().copied().collect();
    let snapshot = Snapshot {
        meta: SnapshotMeta {
            index: 1,
            term: 1,
            membership: Membership::new(voters),
        },
        data: members::encode_snapshot(&registry, &store.snapshot()),
    };
    let hard_state = HardState {
        term: 1,
        vote: None,
        commit: 1,
    };
    disk.save(Some(&snapshot), Some(hard_state), &[])
        .and_then(|_| disk.sync())
        .map_err(|e| e.to_string())?;
    println!(
        "restored {} (revision {}) into {} as member {} ({id:016x}) of cluster {cluster_id:016x}",
        a.file.display(),
        store.revision(),
        data_dir.display(),
        a.name
    );
    Ok(())
}
