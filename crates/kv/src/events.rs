//! What each revision did, as etcd's watch events (`mvccpb.Event`). The store keeps, per
//! revision since its compact revision, the keys that revision wrote in the order it wrote
//! them; an event is that key's version of the revision, with the version before it as the
//! previous value. Watchers read the newest revision's events as it applies and replay older
//! revisions from the same index when they fall behind or start in the past.

use crate::store::{Store, Version};
use crate::types::{KeyRange, KeyValue, Revision};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EventKind {
    Put,
    Delete,
}

/// One change of one key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Event {
    pub kind: EventKind,
    /// A put's new key-value; for a delete, the key with the deleting revision as its
    /// `mod_revision` and nothing else (as etcd reports a tombstone).
    pub kv: KeyValue,
    /// The key's value before this change, if it had one (not yet compacted away).
    pub prev_kv: Option<KeyValue>,
}

impl Event {
    fn of(key: &bytes::Bytes, history: &[Version], rev: Revision) -> Option<Event> {
        let i = history.binary_search_by_key(&rev, |v| v.rev).ok()?;
        let prev_kv = i.checked_sub(1).and_then(|p| history[p].kv.clone());
        Some(match &history[i].kv {
            Some(kv) => Event {
                kind: EventKind::Put,
                kv: kv.clone(),
                prev_kv,
            },
            None => Event {
                kind: EventKind::Delete,
                kv: KeyValue {
                    key: key.clone(),
                    mod_revision: rev,
                    ..KeyValue::default()
                },
                prev_kv,
            },
        })
    }
}

impl Store {
    /// The oldest revision whose events the store can still give: a watch may start here
    /// or later. Before it, history is compacted.
    pub fn first_event_revision(&self) -> Revision {
        self.first_indexed()
    }

    /// The events of revision `rev` on keys in `range` (every key if `None`), in the order
    /// the revision made them. Empty for a revision the store does not hold (compacted, or
    /// not yet written). Costs what the revision wrote, whatever the size of the keyspace.
    pub fn events_at(&self, rev: Revision, range: Option<&KeyRange>) -> Vec<Event> {
        let first = self.first_indexed();
        if rev < first || rev > self.revision {
            return Vec::new();
        }
        let Some(written) = self.by_rev.get((rev - first) as usize) else {
            return Vec::new();
        };
        written
            .iter()
            .filter(|k| range.is_none_or(|r| r.contains(k)))
            .filter_map(|k| Event::of(k, self.keys.get(k)?, rev))
            .collect()
    }

    /// How many keys revision `rev` wrote (0 if not held): a cheap size bound for callers
    /// that batch revisions.
    pub fn writes_at(&self, rev: Revision) -> usize {
        let first = self.first_indexed();
        if rev < first {
            return 0;
        }
        self.by_rev
            .get((rev - first) as usize)
            .map_or(0, |w| w.len())
    }
}
