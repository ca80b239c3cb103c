//! The cluster's members as replicated state: who they are (name), where to reach them (peer
//! and client URLs), and who was removed for good. Whether a member votes is the raft
//! configuration's business; this registry is what etcd's member API shows beside it.
//!
//! Every member reaches the same registry: it starts from the bootstrap members (the same
//! `--initial-cluster` on every founding member, copied by every newcomer from a peer), and
//! changes only by applying log entries — configuration entries (their context names the
//! added member's peer URLs) and two commands (a member publishing its name and client URLs;
//! MemberUpdate's new peer URLs). It is part of every snapshot, so a restarted member knows
//! every peer without flags.

use crate::pb::raftkvpb as pb;
use prost::Message;
use raft::{Change, ConfEntry, NodeId};
use std::collections::{BTreeMap, BTreeSet};

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MemberRecord {
    pub id: NodeId,
    /// Empty until the member has started and published itself (etcd shows it so).
    pub name: String,
    pub peer_urls: Vec<String>,
    pub client_urls: Vec<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Registry {
    pub members: BTreeMap<NodeId, MemberRecord>,
    /// Removed for good: their ids are never reused, and they are told so if they call.
    pub removed: BTreeSet<NodeId>,
    /// Raised alarms: (member, etcd's `AlarmType` number). Replicated, so every member
    /// refuses the same writes in the same place of the log.
    pub alarms: BTreeSet<(NodeId, i32)>,
}

/// The context a configuration entry proposed by the server carries.
pub fn conf_context(id: driver::RequestId, peer_urls: Vec<String>) -> bytes::Bytes {
    pb::ConfContext {
        request_id: id.seq,
        member: id.member,
        boot: id.boot,
        peer_urls,
    }
    .encode_to_vec()
    .into()
}

impl Registry {
    /// The registry of a cluster bootstrapped with these members (no client URLs yet: each
    /// member publishes its own once it runs).
    pub fn bootstrap(members: impl IntoIterator<Item = (NodeId, String, Vec<String>)>) -> Self {
        let members = members
            .into_iter()
            .map(|(id, name, peer_urls)| {
                let r = MemberRecord {
                    id,
                    name,
                    peer_urls,
                    client_urls: Vec::new(),
                };
                (id, r)
            })
            .collect();
        Registry {
            members,
            ..Default::default()
        }
    }

    /// Apply a configuration entry. Returns the request id its context names, if any, so the
    /// proposer can answer its client. A context that does not decode is treated as empty:
    /// every member sees the same bytes and does the same.
    pub fn apply_conf(&mut self, entry: &ConfEntry) -> Option<driver::RequestId> {
        let ctx = pb::ConfContext::decode(&entry.change.context[..]).unwrap_or_default();
        for c in &entry.change.changes {
            match *c {
                Change::AddVoter(id) | Change::AddLearner(id) => {
                    self.members.entry(id).or_insert_with(|| MemberRecord {
                        id,
                        peer_urls: ctx.peer_urls.clone(),
                        ..Default::default()
                    });
                }
                Change::Promote(_) => {}
                Change::Remove(id) => {
                    self.members.remove(&id);
                    self.removed.insert(id);
                }
            }
        }
        (ctx.member != 0).then_some(driver::RequestId {
            member: ctx.member,
            boot: ctx.boot,
            seq: ctx.request_id,
        })
    }

    /// A member announced its name and client URLs. Ignored for a member not (or no longer)
    /// in the registry.
    pub fn publish(&mut self, a: &pb::MemberAttributes) {
        if let Some(m) = self.members.get_mut(&a.id) {
            m.name = a.name.clone();
            m.client_urls = a.client_urls.clone();
        }
    }

    /// MemberUpdate: new peer URLs. False if the member is unknown.
    pub fn update_peer_urls(&mut self, u: &pb::MemberPeerUrls) -> bool {
        match self.members.get_mut(&u.id) {
            Some(m) => {
                m.peer_urls = u.peer_urls.clone();
                true
            }
            None => false,
        }
    }

    /// Apply Maintenance.Alarm as etcd does: activating raises the alarm for the member
    /// (activating NONE does nothing), deactivating clears exactly that member's alarm, and
    /// getting lists the alarms of the given type (every alarm for NONE). Returns the
    /// alarms the request touched or listed.
    pub fn alarm(&mut self, action: i32, member: NodeId, alarm: i32) -> Vec<(NodeId, i32)> {
        use crate::pb::etcdserverpb::alarm_request::AlarmAction;
        match AlarmAction::try_from(action) {
            Ok(AlarmAction::Activate) if alarm != 0 => {
                self.alarms.insert((member, alarm));
                vec![(member, alarm)]
            }
            Ok(AlarmAction::Deactivate) if self.alarms.remove(&(member, alarm)) => {
                vec![(member, alarm)]
            }
            Ok(AlarmAction::Get) => self
                .alarms
                .iter()
                .filter(|a| alarm == 0 || a.1 == alarm)
                .copied()
                .collect(),
            _ => Vec::new(),
        }
    }

    /// Whether an alarm of this type is raised for any member.
    pub fn has_alarm(&self, alarm: i32) -> bool {
        self.alarms.iter().any(|a| a.1 == alarm)
    }

    /// The member, if any, that already uses one of `urls` as a peer URL (other than
    /// `except`).
    pub fn peer_url_owner(&self, urls: &[String], except: NodeId) -> Option<NodeId> {
        self.members
            .values()
            .find(|m| m.id != except && m.peer_urls.iter().any(|u| urls.contains(u)))
            .map(|m| m.id)
    }

    pub fn to_pb(&self) -> pb::Registry {
        pb::Registry {
            members: self
                .members
                .values()
                .map(|m| pb::MemberRecord {
                    id: m.id,
                    name: m.name.clone(),
                    peer_urls: m.peer_urls.clone(),
                    client_urls: m.client_urls.clone(),
                })
                .collect(),
            removed: self.removed.iter().copied().collect(),
            alarms: self
                .alarms
                .iter()
                .map(|&(member, alarm)| pb::AlarmRecord { member, alarm })
                .collect(),
        }
    }

    pub fn from_pb(r: pb::Registry) -> Result<Registry, String> {
        let mut members = BTreeMap::new();
        for m in r.members {
            if m.id == 0 {
                return Err("a member with id 0".into());
            }
            let record = MemberRecord {
                id: m.id,
                name: m.name,
                peer_urls: m.peer_urls,
                client_urls: m.client_urls,
            };
            if members.insert(m.id, record).is_some() {
                return Err(format!("member {:x} listed twice", m.id));
            }
        }
        Ok(Registry {
            members,
            removed: r.removed.into_iter().collect(),
            alarms: r.alarms.iter().map(|a| (a.member, a.alarm)).collect(),
        })
    }

    pub fn encode(&self) -> Vec<u8> {
        self.to_pb().encode_to_vec()
    }

    pub fn decode(data: &[u8]) -> Result<Registry, String> {
        let r = pb::Registry::decode(data).map_err(|e| format!("member registry: {e}"))?;
        Registry::from_pb(r).map_err(|e| format!("member registry: {e}"))
    }
}

/// The state machine's snapshot: the registry, then the kv store's own snapshot bytes.
/// Layout: magic "RKVMEMB1", registry length u32 LE, registry (protobuf), store bytes. A
/// snapshot without the magic (written before the registry existed) is the store alone.
const SNAPSHOT_MAGIC: &[u8; 8] = b"RKVMEMB1";

pub fn encode_snapshot(registry: &Registry, store: &[u8]) -> bytes::Bytes {
    let mut b = snapshot_prefix(registry);
    b.extend_from_slice(store);
    b.into()
}

/// [`encode_snapshot`] in pieces of about `chunk` bytes, produced one at a time from a
/// frozen store (which is never serialized whole), with its total length: how snapshot
/// files and backups are written.
pub fn snapshot_chunks(
    registry: &Registry,
    store: kv::Store,
    chunk: usize,
) -> (u64, impl Iterator<Item = bytes::Bytes>) {
    let prefix = bytes::Bytes::from(snapshot_prefix(registry));
    let len = prefix.len() as u64 + store.snapshot_len();
    (
        len,
        std::iter::once(prefix).chain(store.snapshot_chunks(chunk)),
    )
}

/// What comes before the store's bytes in [`encode_snapshot`].
fn snapshot_prefix(registry: &Registry) -> Vec<u8> {
    let reg = registry.encode();
    let mut b = Vec::with_capacity(12 + reg.len());
    b.extend_from_slice(SNAPSHOT_MAGIC);
    b.extend_from_slice(&(reg.len() as u32).to_le_bytes());
    b.extend_from_slice(&reg);
    b
}

/// The registry (if the snapshot has one) and the store's bytes.
pub fn decode_snapshot(data: &bytes::Bytes) -> Result<(Option<Registry>, bytes::Bytes), String> {
    let Some(rest) = data.strip_prefix(&SNAPSHOT_MAGIC[..]) else {
        return Ok((None, data.clone()));
    };
    if rest.len() < 4 {
        return Err("snapshot truncated in its member registry".into());
    }
    let n = u32::from_le_bytes(rest[..4].try_into().unwrap()) as usize;
    if rest.len() - 4 < n {
        return Err("snapshot truncated in its member registry".into());
    }
    let registry = Registry::decode(&rest[4..4 + n])?;
    let start = SNAPSHOT_MAGIC.len() + 4 + n;
    Ok((Some(registry), data.slice(start..)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use raft::{ConfChange, Membership};

    /// etcd's alarm semantics: activating NONE does nothing, deactivating clears only the
    /// named member's alarm of that type, getting filters by type (NONE: all); alarms
    /// survive the registry's encoding (so snapshots keep them).
    #[test]
    fn alarms_are_raised_cleared_and_listed_as_etcd_does() {
        use crate::pb::etcdserverpb::alarm_request::AlarmAction::*;
        let mut r = Registry::default();
        assert!(r.alarm(Activate as i32, 1, 0).is_empty());
        assert_eq!(r.alarm(Activate as i32, 1, 1), vec![(1, 1)]);
        assert_eq!(r.alarm(Activate as i32, 2, 2), vec![(2, 2)]);
        assert_eq!(r.alarm(Get as i32, 0, 0), vec![(1, 1), (2, 2)]);
        assert_eq!(r.alarm(Get as i32, 0, 2), vec![(2, 2)]);
        assert!(r.has_alarm(1) && r.has_alarm(2));
        assert_eq!(Registry::decode(&r.encode()).unwrap(), r);
        assert!(r.alarm(Deactivate as i32, 2, 1).is_empty());
        assert_eq!(r.alarm(Deactivate as i32, 1, 1), vec![(1, 1)]);
        assert!(!r.has_alarm(1));
        assert_eq!(r.alarm(Get as i32, 0, 0), vec![(2, 2)]);
    }

    fn entry(change: Change, ctx: bytes::Bytes, voters: Vec<NodeId>) -> ConfEntry {
        ConfEntry {
            change: ConfChange::simple(change).with_context(ctx),
            membership: Membership::new(voters),
        }
    }

    #[test]
    fn configuration_entries_and_commands_change_the_registry_and_it_survives_a_snapshot() {
        let mut r = Registry::bootstrap([(1, "a".into(), vec!["http://a:2380".into()])]);
        let id = driver::RequestId {
            member: 1,
            boot: 7,
            seq: 9,
        };
        let ctx = conf_context(id, vec!["http://b:2380".into()]);
        assert_eq!(
            r.apply_conf(&entry(Change::AddLearner(2), ctx, vec![1])),
            Some(id)
        );
        assert_eq!(r.members[&2].peer_urls, vec!["http://b:2380".to_string()]);
        assert_eq!(r.members[&2].name, "", "not started yet");
        r.publish(&pb::MemberAttributes {
            id: 2,
            name: "b".into(),
            client_urls: vec!["http://b:2379".into()],
        });
        assert_eq!(r.members[&2].name, "b");
        assert_eq!(
            r.peer_url_owner(&["http://b:2380".into()], 0),
            Some(2),
            "peer URLs are found"
        );
        assert_eq!(r.peer_url_owner(&["http://b:2380".into()], 2), None);
        let empty = bytes::Bytes::new();
        assert_eq!(
            r.apply_conf(&entry(Change::Remove(1), empty, vec![2])),
            None
        );
        assert!(!r.members.contains_key(&1) && r.removed.contains(&1));
        // Publishing for a removed member changes nothing.
        r.publish(&pb::MemberAttributes {
            id: 1,
            name: "ghost".into(),
            client_urls: vec![],
        });
        assert!(!r.members.contains_key(&1));
        let store = bytes::Bytes::from_static(b"RKVKV001 store bytes");
        let snap = encode_snapshot(&r, &store);
        let (back, rest) = decode_snapshot(&snap).unwrap();
        assert_eq!(back, Some(r));
        assert_eq!(rest, store);
        // A snapshot from before the registry: the store alone.
        assert_eq!(decode_snapshot(&store).unwrap(), (None, store.clone()));
        for cut in SNAPSHOT_MAGIC.len()..SNAPSHOT_MAGIC.len() + 6 {
            assert!(decode_snapshot(&snap.slice(..cut)).is_err(), "cut at {cut}");
        }
    }
}
