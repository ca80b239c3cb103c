//! The kv store as the driver's state machine: log entries are etcd requests (see
//! `command.rs`), applied to the MVCC store with etcd's semantics, and membership changes,
//! applied to the member registry (`members.rs`).

use crate::member::command::{self, Decoded};
use crate::member::members::{self, Registry};
use crate::services::api;
use bytes::Bytes;
use driver::{RequestId, StateMachine};
use raft::{ConfEntry, Entry, EntryKind, Snapshot};
use std::collections::HashMap;
use tonic::Status;

/// A write's outcome and the store revision right after it (the response header's). A
/// membership change has no response of its own.
pub type Applied = Result<(Option<Output>, i64), Status>;

/// What an applied command answers.
#[derive(Clone, Debug, PartialEq)]
pub enum Output {
    Kv(kv::Response),
    /// The alarms an Alarm request raised, cleared or listed: (member, alarm type).
    Alarms(Vec<(raft::NodeId, i32)>),
}
/// A read's answer and the revision it was served at.
pub type Served = Result<(kv::RangeResponse, i64), Status>;

#[derive(Default)]
pub struct KvMachine {
    pub store: kv::Store,
    pub registry: Registry,
    /// Lease grants and revokes applied since the owner last took them: the leader's lease
    /// clock learns of them here (bounded by one round's entries).
    pub lease_changes: Vec<kv::LeaseResponse>,
    /// Test only (set by [`TEST_CORRUPT_ENV`]): this member applies every put with a value
    /// other than the one in the log, so its store silently diverges — what the consistency
    /// check must catch.
    pub corrupt_for_tests: bool,
    /// Values moving into the snapshot file last written, a step at a time.
    pub rehome: Option<Rehome>,
}

/// The environment variable that makes a member corrupt its own store (for the tests of the
/// consistency check; never set it on a real member).
pub const TEST_CORRUPT_ENV: &str = "RAFTKV_TEST_ONLY_CORRUPT_PUTS";

/// Values of at least this many bytes move into the snapshot file; a smaller one costs less
/// in memory than the key index's entry for it does.
const REHOME_MIN: usize = 128;

/// Keys looked at per step of a [`Rehome`]: a step is a short pause of the loop (about 3 ms
/// on the 2-core machine the README's figures come from), and a store of a million keys
/// moves in about 500 steps, between the loop's other work.
pub const REHOME_STEP: usize = 2048;

/// How much of a snapshot is read between releases of its pages while pairing values.
const RELEASE_EVERY: usize = 16 << 20;

/// The store's values, moving out of the heap into the snapshot file just written.
///
/// A value arrives as a slice of its log entry, which the log holds anyway until it is
/// compacted; from then on the value alone would keep that memory. A snapshot writes every
/// value to a file, mapped into memory: from there, the kernel keeps the pages that are
/// read in memory and can drop the others (and does, under a memory limit), so the member's
/// heap holds the key index and the log since the last snapshot — not its data. The values
/// a snapshot holds are paired with the store's (same order), and each value of the live
/// store that is one of them is pointed at its bytes in the file. The next snapshot moves
/// them again, into its own file; the older file goes when its last value does.
pub struct Rehome {
    /// The store the snapshot was written from, held until the move is done: its values
    /// keep their buffers, so no value written since can sit at an address in `to`.
    _frozen: kv::Store,
    /// Each value's (address, length) in the heap → the same bytes in the file.
    to: HashMap<(usize, usize), Bytes>,
    /// The last key done; `None` before the first step.
    after: Option<Bytes>,
    /// Bytes moved so far, in how many steps, since when.
    pub moved: u64,
    pub steps: u64,
    pub started: std::time::Instant,
}

fn place(v: &Bytes) -> (usize, usize) {
    (v.as_ptr() as usize, v.len())
}

/// Values moved out of the heap (a store restored, values rehomed) freed buffers scattered
/// among live allocations: glibc's allocator keeps such memory for reuse and does not hand
/// it back to the system by itself. Asking it to makes the member's resident memory what it
/// uses. It walks the whole heap: call it off the loop.
pub fn give_back_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only releases free memory; it is thread-safe.
    unsafe {
        libc::malloc_trim(0);
    }
}

impl Rehome {
    /// The move of `frozen`'s values into `data`, the snapshot written from it; `None` if
    /// they do not pair up (a snapshot in another format): the values then stay put. The
    /// pairing reads the whole snapshot, releasing its pages as it goes (they need not stay
    /// counted in memory: see [`storage::release_mapped`]).
    pub fn new(frozen: kv::Store, data: &Bytes) -> Option<Rehome> {
        let (_, store) = members::decode_snapshot(data).ok()?;
        let mut in_file = kv::Store::snapshot_values(&store).ok()?;
        let mut to = HashMap::new();
        let mut values = frozen.values();
        let mut released = 0;
        while let Some(new) = in_file.next() {
            let (new, old) = (new.ok()?, values.next()?);
            if old.len() != new.len() {
                return None;
            }
            if old.len() >= REHOME_MIN {
                to.insert(place(old), new);
            }
            let read = in_file.read();
            if read - released >= RELEASE_EVERY {
                storage::release_mapped(&store[released..read]);
                released = read;
            }
        }
        storage::release_mapped(&store[released..]);
        if values.next().is_some() {
            return None;
        }
        drop(values);
        Some(Rehome {
            _frozen: frozen,
            to,
            after: None,
            moved: 0,
            steps: 0,
            started: std::time::Instant::now(),
        })
    }

    /// Move the values of the next `REHOME_STEP` keys; true once every key is done.
    pub fn step(&mut self, store: &mut kv::Store) -> bool {
        let to = &self.to;
        let (moved, next) = store.rehome_values(
            self.after.as_ref(),
            REHOME_STEP,
            |v| to.contains_key(&place(v)),
            |v| to[&place(v)].clone(),
        );
        self.moved += moved;
        self.steps += 1;
        self.after = next;
        self.after.is_none()
    }
}

impl KvMachine {
    /// A machine at index 0 of a cluster bootstrapped with `registry`.
    pub fn new(registry: Registry) -> Self {
        KvMachine {
            registry,
            ..Default::default()
        }
    }

    fn apply_conf(&mut self, e: &Entry) -> Option<(RequestId, Applied)> {
        // The core checked the entry when it entered the log; an entry it could not decode
        // never gets here.
        let conf = match ConfEntry::decode(&e.data) {
            Ok(c) => c,
            Err(err) => {
                tracing::error!(index = e.index, error = %err, "undecodable configuration entry");
                return None;
            }
        };
        tracing::info!(
            index = e.index,
            changes = ?conf.change.changes,
            voters = ?conf.membership.voters(),
            "membership changed"
        );
        let id = self.registry.apply_conf(&conf)?;
        Some((id, Ok((None, self.store.revision()))))
    }

    fn apply_decoded(&mut self, r: Decoded) -> Applied {
        let revision = |m: &Self| m.store.revision();
        match r {
            Decoded::Kv(mut r) => {
                self.refuse_under_alarm(&r)?;
                if self.corrupt_for_tests {
                    if let kv::Request::Put(p) = &mut r {
                        p.value = bytes::Bytes::from(format!("corrupted {:?}", p.value));
                    }
                }
                let result = self.store.apply(&r);
                if let (kv::Request::Compact(rev), Ok(_)) = (&r, &result) {
                    tracing::info!(revision = rev, "compacted the store's history");
                }
                self.note_lease_change(&result);
                let result = result.map_err(|e| api::status(&e))?;
                Ok((Some(Output::Kv(result)), revision(self)))
            }
            Decoded::InSession(s, r) => {
                // A retry first: the command ran already, a retry adds nothing, so it gets
                // its first answer whatever alarm was raised since (refusing it would answer
                // a write that took effect with an error). Only a new command meets the
                // alarms, exactly as a write outside a session does.
                let retry = self
                    .store
                    .session_retry(s, &r)
                    .map_err(|e| api::status(&e))?;
                let remembered = match retry {
                    Some(remembered) => remembered,
                    None => {
                        self.refuse_under_alarm(&r)?;
                        self.store
                            .apply_in_session(s, &r)
                            .map_err(|e| api::status(&e))?
                    }
                };
                // A retry answers with the revision of the first run, not today's.
                let response = remembered.result.map_err(|e| api::status(&e))?;
                Ok((Some(Output::Kv(response)), remembered.revision))
            }
            Decoded::Publish(a) => {
                self.registry.publish(&a);
                Ok((None, revision(self)))
            }
            Decoded::Alarm(a) => {
                let touched = self.registry.alarm(a.action, a.member_id, a.alarm);
                for &(member, alarm) in &touched {
                    let name = alarm_name(alarm);
                    use crate::pb::etcdserverpb::alarm_request::AlarmAction;
                    match AlarmAction::try_from(a.action) {
                        Ok(AlarmAction::Activate) => {
                            tracing::warn!(member = %format!("{member:x}"), alarm = name, "alarm raised")
                        }
                        Ok(AlarmAction::Deactivate) => {
                            tracing::info!(member = %format!("{member:x}"), alarm = name, "alarm cleared")
                        }
                        _ => {}
                    }
                }
                Ok((Some(Output::Alarms(touched)), revision(self)))
            }
            Decoded::UpdatePeerUrls(u) => {
                if self.registry.update_peer_urls(&u) {
                    Ok((None, revision(self)))
                } else {
                    Err(Status::not_found("etcdserver: member not found"))
                }
            }
        }
    }

    /// etcd's behaviour under alarms, applied on every member at the same place of the log:
    /// while NOSPACE is raised, writes that add data (puts, transactions with a put, lease
    /// grants) are refused, while deletes, revokes and compactions — what frees space — go
    /// on; while CORRUPT is raised, every write is refused.
    fn refuse_under_alarm(&self, r: &kv::Request) -> Result<(), Status> {
        if self.registry.alarms.is_empty() {
            return Ok(());
        }
        if self.registry.has_alarm(CORRUPT) {
            return Err(api::corrupt());
        }
        if self.registry.has_alarm(NOSPACE) && adds_data(r) {
            return Err(api::no_space());
        }
        Ok(())
    }

    /// The leader's lease clock learns of grants and revokes from here.
    fn note_lease_change(&mut self, result: &kv::Result<kv::Response>) {
        if let Ok(kv::Response::Lease(change)) = result {
            if !matches!(change, kv::LeaseResponse::Checkpointed) {
                self.lease_changes.push(change.clone());
            }
        }
    }
}

/// etcd's `AlarmType` numbers.
pub const NOSPACE: i32 = 1;
pub const CORRUPT: i32 = 2;

/// The alarm's name as etcd prints it.
pub fn alarm_name(alarm: i32) -> &'static str {
    match alarm {
        NOSPACE => "NOSPACE",
        CORRUPT => "CORRUPT",
        _ => "NONE",
    }
}

/// Whether a request can grow the store (etcd's quota "cost" is above zero).
pub fn adds_data(r: &kv::Request) -> bool {
    match r {
        kv::Request::Put(_) | kv::Request::LeaseGrant { .. } => true,
        kv::Request::Txn(t) => txn_puts(t),
        _ => false,
    }
}

fn txn_puts(t: &kv::TxnRequest) -> bool {
    t.success.iter().chain(&t.failure).any(|op| match op {
        kv::RequestOp::Put(_) => true,
        kv::RequestOp::Txn(inner) => txn_puts(inner),
        _ => false,
    })
}

impl StateMachine for KvMachine {
    type Output = Applied;
    type Query = kv::RangeRequest;
    type Answer = Served;
    type Frozen = (kv::Store, Registry);

    fn apply(&mut self, e: &Entry) -> Result<Option<(RequestId, Applied)>, String> {
        if e.kind == EntryKind::ConfChange {
            return Ok(self.apply_conf(e));
        }
        // No-ops change nothing.
        if e.kind != EntryKind::Normal || e.data.is_empty() {
            return Ok(None);
        }
        let (id, request) = match command::decode(&e.data) {
            Ok(decoded) => decoded,
            Err(err) => {
                // Every member sees the same bytes and skips them the same way.
                tracing::error!(index = e.index, error = %err, "undecodable log entry skipped");
                return Ok(None);
            }
        };
        // A request etcd refuses (a compacted revision, a missing key in a txn's rules…) is
        // the client's answer, the same on every member: not a failure of the member.
        let applied = match request {
            Err(status) => Err(status),
            Ok(r) => self.apply_decoded(r),
        };
        Ok(Some((id, applied)))
    }

    fn query(&self, req: &kv::RangeRequest) -> Served {
        let revision = self.store.revision();
        self.store
            .range(req, revision)
            .map(|r| (r, revision))
            .map_err(|e| api::status(&e))
    }

    /// A clone shares the values; serializing it happens on a blocking thread.
    fn freeze(&self) -> (kv::Store, Registry) {
        (self.store.clone(), self.registry.clone())
    }

    fn restore(&mut self, s: &Snapshot) -> Result<(), String> {
        let (registry, store) = members::decode_snapshot(&s.data)?;
        self.store = kv::Store::restore(&store).map_err(|e| e.to_string())?;
        // A store restored from a snapshot is half-way through a move: its values are
        // slices of the snapshot already, and a move of older values would only meet none.
        self.rehome = None;
        // Decoding read every page; where the snapshot is a file (at start), the values stay
        // there and its pages need not stay counted against the member.
        storage::release_mapped(&s.data);
        // A snapshot from before the registry existed keeps the bootstrap one.
        if let Some(r) = registry {
            self.registry = r;
        }
        Ok(())
    }
}
