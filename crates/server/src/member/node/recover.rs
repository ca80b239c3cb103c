//! A member's start: what it finds on its disk, and the nonce of this life.

use super::*;
/// What a member finds on its disk: the log, the core restored from it, and the store
/// restored from the latest snapshot.
pub(super) fn recover(cfg: &NodeConfig) -> Result<(Storage, Raft, KvMachine, u64), String> {
    let id = Identity {
        cluster_id: cfg.cluster_id,
        node_id: cfg.id,
    };
    if cfg.data_dir.join(REMOVED_MARKER).exists() {
        return Err(format!(
            "{REMOVED}: the data directory {} belongs to a removed member and cannot serve \
             again (start a new member with an empty data directory)",
            cfg.data_dir.display()
        ));
    }
    let (storage, state) =
        Storage::open(&cfg.data_dir, id, Options::default()).map_err(|e| e.to_string())?;
    let mut machine = KvMachine::new(cfg.bootstrap.clone());
    machine.corrupt_for_tests =
        std::env::var_os(crate::member::machine::TEST_CORRUPT_ENV).is_some();
    let mut rc = raft::Config::new(cfg.id, cfg.voters.clone());
    if let Some(s) = &state.snapshot {
        machine.restore_at_start(s)?;
        crate::member::machine::give_back_freed_memory();
        rc.applied = s.meta.index;
    }
    rc.heartbeat_tick = 1;
    rc.election_tick = cfg.election_ticks;
    let boot = boot_nonce(cfg.id);
    rc.seed = boot;
    let raft = Raft::new(rc, state).map_err(|e| e.to_string())?;
    Ok((storage, raft, machine, boot))
}

impl KvMachine {
    pub(super) fn restore_at_start(&mut self, s: &Snapshot) -> Result<(), String> {
        driver::StateMachine::restore(self, s)
            .map_err(|e| format!("the snapshot at index {} is unreadable: {e}", s.meta.index))
    }
}

/// A nonce for this life of the member: request ids and read contexts carry it, so answers
/// meant for an earlier life never match a request of this one. From the OS's randomness
/// (through std's hasher keys), mixed with the clock and process id.
pub(super) fn boot_nonce(id: NodeId) -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    h.write_u128(nanos);
    h.write_u32(std::process::id());
    h.write_u64(id);
    h.finish()
}
