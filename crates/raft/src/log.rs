//! The replicated log (§5.3) and the three cursors that move through it: what is durable,
//! what is committed, and what is applied.
//!
//! Invariants (checked by `debug_assert_invariants`):
//! - `applied <= applying <= committed`, and `applying <= persisted`: the application only
//!   applies entries that are committed *and* durable on this node, so a restart never finds
//!   its state machine ahead of its log;
//! - `persisted < unstable`: entries below `unstable` were handed to the application to
//!   persist, and `persisted` covers only entries acknowledged as durable;
//! - `committed <= last_index()`; entries at or below `committed` are never overwritten.

use crate::confchange::ConfEntry;
use crate::configs::Configs;
use crate::membership::Membership;
use crate::message::ConflictHint;
use crate::types::{Entry, EntryKind, Index, Term};

#[derive(Debug)]
pub(crate) struct RaftLog {
    /// Index and term of the entry just before `entries[0]` (the snapshot point, or 0/0).
    offset_index: Index,
    offset_term: Term,
    entries: Vec<Entry>,
    pub(crate) committed: Index,
    /// Highest index acknowledged durable by the application.
    pub(crate) persisted: Index,
    /// First index not yet handed out to be persisted.
    unstable: Index,
    /// Highest index handed out to be applied.
    applying: Index,
    pub(crate) applied: Index,
    /// The configurations of the snapshot point and of every configuration entry held.
    pub(crate) configs: Configs,
}

/// Outcome of the AppendEntries consistency check on a follower.
pub(crate) enum AppendOutcome {
    /// The log now matches the leader's up to this index.
    Matched(Index),
    Rejected(ConflictHint),
    /// The leader asked to overwrite a committed entry: a corrupt or forged message.
    Refused,
}

impl RaftLog {
    /// A log restored from durable state: `entries` follow the snapshot point directly.
    pub(crate) fn restore(
        offset_index: Index,
        offset_term: Term,
        base: Membership,
        entries: Vec<Entry>,
        committed: Index,
        applied: Index,
    ) -> Self {
        let last = offset_index + entries.len() as Index;
        let committed = committed.clamp(offset_index, last);
        let applied = applied.clamp(offset_index, committed);
        let mut configs = Configs::new(offset_index, base);
        note_configs(&mut configs, &entries);
        let log = RaftLog {
            configs,
            offset_index,
            offset_term,
            entries,
            committed,
            persisted: last,
            unstable: last + 1,
            applying: applied,
            applied,
        };
        log.debug_assert_invariants();
        log
    }

    /// The snapshot point: entries up to here exist only in the snapshot.
    pub(crate) fn snapshot_index(&self) -> Index {
        self.offset_index
    }

    /// Drop entries up to `index`, now covered by a snapshot the application took. The
    /// caller checked that `index` is applied (so committed and durable) and in the log.
    pub(crate) fn compact_to(&mut self, index: Index) {
        debug_assert!(index <= self.applied && index <= self.last_index());
        let term = self.term(index).expect("compaction point is in the log");
        self.entries.drain(..(index - self.offset_index) as usize);
        self.offset_index = index;
        self.offset_term = term;
        self.configs.compact_to(index);
    }

    /// Install a snapshot received from the leader (§7): if the log holds the snapshot's
    /// last entry, the entries after it stay; otherwise the whole log is replaced.
    pub(crate) fn install_snapshot(&mut self, index: Index, term: Term, m: Membership) {
        debug_assert!(index > self.committed);
        let keep_suffix = self.matches(index, term);
        self.configs.install(index, m, keep_suffix);
        // The snapshot is handed out with the next Ready and persisted before anything that
        // depends on it is sent; entries it replaced count as handled.
        if keep_suffix {
            self.entries.drain(..(index - self.offset_index) as usize);
            self.persisted = self.persisted.max(index);
            self.unstable = self.unstable.max(index + 1);
        } else {
            self.entries.clear();
            self.persisted = index;
            self.unstable = index + 1;
        }
        self.offset_index = index;
        self.offset_term = term;
        self.committed = index;
        self.applying = index;
    }

    pub(crate) fn last_index(&self) -> Index {
        self.offset_index + self.entries.len() as Index
    }

    pub(crate) fn last_term(&self) -> Term {
        self.entries.last().map_or(self.offset_term, |e| e.term)
    }

    /// The term of the entry at `index`, if the log still holds it (or it is the offset).
    pub(crate) fn term(&self, index: Index) -> Option<Term> {
        if index == self.offset_index {
            return Some(self.offset_term);
        }
        self.entry(index).map(|e| e.term)
    }

    fn entry(&self, index: Index) -> Option<&Entry> {
        if index <= self.offset_index {
            return None;
        }
        self.entries.get((index - self.offset_index - 1) as usize)
    }

    pub(crate) fn matches(&self, index: Index, term: Term) -> bool {
        self.term(index) == Some(term)
    }

    /// §5.4.1: a candidate's log is at least as up-to-date as ours if its last term is
    /// higher, or equal with a last index at least as high.
    pub(crate) fn is_up_to_date(&self, last_index: Index, last_term: Term) -> bool {
        last_term > self.last_term()
            || (last_term == self.last_term() && last_index >= self.last_index())
    }

    /// Leader path: append entries that directly follow the last one.
    pub(crate) fn append(&mut self, entries: &[Entry]) {
        debug_assert!(entries
            .first()
            .is_none_or(|e| e.index == self.last_index() + 1));
        note_configs(&mut self.configs, entries);
        self.entries.extend_from_slice(entries);
    }

    /// Follower path: the consistency check and the conflict rule of AppendEntries.
    pub(crate) fn try_append(
        &mut self,
        prev_index: Index,
        prev_term: Term,
        entries: &[Entry],
    ) -> AppendOutcome {
        if prev_index < self.offset_index {
            // Entries below our snapshot are committed and match; skip them.
            let skip = (self.offset_index - prev_index) as usize;
            if skip > entries.len() {
                return AppendOutcome::Matched(self.offset_index);
            }
            let (p, t) = (self.offset_index, self.offset_term);
            return self.try_append(p, t, &entries[skip..]);
        }
        if !self.matches(prev_index, prev_term) {
            return AppendOutcome::Rejected(self.conflict_hint(prev_index));
        }
        let last_new = prev_index + entries.len() as Index;
        // Skip entries we already hold; truncate from the first that differs (§5.3).
        let conflict = entries.iter().find(|e| !self.matches(e.index, e.term));
        if let Some(first) = conflict {
            if first.index <= self.committed {
                return AppendOutcome::Refused;
            }
            let start = (first.index - entries[0].index) as usize;
            self.truncate_from(first.index);
            note_configs(&mut self.configs, &entries[start..]);
            self.entries.extend_from_slice(&entries[start..]);
        }
        AppendOutcome::Matched(last_new)
    }

    /// Drop entries from `index` on; anything not yet durable or handed out is forgotten.
    fn truncate_from(&mut self, index: Index) {
        debug_assert!(index > self.committed && index > self.offset_index);
        self.entries
            .truncate((index - self.offset_index - 1) as usize);
        self.persisted = self.persisted.min(index - 1);
        self.unstable = self.unstable.min(index);
        self.configs.truncate_from(index);
    }

    /// Fast backtracking hint for a rejected `prev_index`.
    fn conflict_hint(&self, prev_index: Index) -> ConflictHint {
        if prev_index > self.last_index() {
            return ConflictHint {
                term: None,
                first_index: self.last_index() + 1,
            };
        }
        let term = self.term(prev_index).expect("prev_index is within the log");
        // Terms never decrease along the log, so the run of `term` can be found by search.
        let first = self.entries.partition_point(|e| e.term < term);
        ConflictHint {
            term: Some(term),
            first_index: (self.offset_index + 1 + first as Index).min(prev_index),
        }
    }

    /// The last index holding `term`, if any (leader side of fast backtracking).
    pub(crate) fn last_index_of_term(&self, term: Term) -> Option<Index> {
        let after = self.entries.partition_point(|e| e.term <= term);
        let index = self.offset_index + after as Index;
        (self.term(index) == Some(term)).then_some(index)
    }

    /// Entries from `lo` on, at most `max_bytes` of them but always at least one.
    pub(crate) fn entries_from(&self, lo: Index, max_bytes: u64) -> Vec<Entry> {
        if lo <= self.offset_index || lo > self.last_index() {
            return Vec::new();
        }
        let tail = &self.entries[(lo - self.offset_index - 1) as usize..];
        take_bytes(tail, max_bytes).to_vec()
    }

    /// Leader rule (§5.4.2): commit `index` only if it is from the current `term`.
    pub(crate) fn maybe_commit(&mut self, index: Index, term: Term) -> bool {
        if index > self.committed && self.term(index) == Some(term) {
            self.committed = index;
            return true;
        }
        false
    }

    /// Follower: the leader says `index` is committed and we match it up to there.
    pub(crate) fn commit_to(&mut self, index: Index) {
        if index > self.committed {
            debug_assert!(index <= self.last_index());
            self.committed = index.min(self.last_index());
        }
    }

    /// Entries to hand out for persisting; marks them handed out.
    pub(crate) fn take_unstable(&mut self) -> Vec<Entry> {
        if self.unstable > self.last_index() {
            return Vec::new();
        }
        let start = (self.unstable - self.offset_index - 1) as usize;
        self.unstable = self.last_index() + 1;
        self.entries[start..].to_vec()
    }

    pub(crate) fn has_unstable(&self) -> bool {
        self.unstable <= self.last_index()
    }

    /// The application made entries up to `index` (of `term`) durable. An acknowledgement
    /// for entries that were since overwritten is ignored: the term no longer matches.
    pub(crate) fn persisted_to(&mut self, index: Index, term: Term) -> bool {
        if index > self.persisted && index < self.unstable && self.matches(index, term) {
            self.persisted = index;
            return true;
        }
        false
    }

    /// Committed, durable entries not yet handed out for applying (bounded by `max_bytes`).
    pub(crate) fn take_committed(&mut self, max_bytes: u64) -> Vec<Entry> {
        let hi = self.committed.min(self.persisted);
        if hi <= self.applying {
            return Vec::new();
        }
        let lo = (self.applying - self.offset_index) as usize;
        let span = &self.entries[lo..(hi - self.offset_index) as usize];
        let out = take_bytes(span, max_bytes).to_vec();
        self.applying += out.len() as Index;
        out
    }

    pub(crate) fn has_committed_to_apply(&self) -> bool {
        self.committed.min(self.persisted) > self.applying
    }

    pub(crate) fn applied_to(&mut self, index: Index) {
        if index > self.applied && index <= self.applying {
            self.applied = index;
        }
    }

    /// Sum of entry sizes in `(lo, hi]`.
    pub(crate) fn bytes_between(&self, lo: Index, hi: Index) -> u64 {
        (lo + 1..=hi)
            .filter_map(|i| self.entry(i))
            .map(Entry::size)
            .sum()
    }

    pub(crate) fn debug_assert_invariants(&self) {
        debug_assert!(self.applied <= self.applying);
        debug_assert!(self.applying <= self.committed.min(self.persisted.max(self.applying)));
        debug_assert!(self.persisted < self.unstable);
        debug_assert!(self.committed <= self.last_index());
        debug_assert!(self
            .entries
            .iter()
            .enumerate()
            .all(|(i, e)| e.index == self.offset_index + 1 + i as Index));
    }
}

/// Record the configurations that `entries` (about to join the log) establish. Their data
/// was checked when it arrived (`validate.rs` for a peer's, `check_restore` for the disk's),
/// and the leader encodes its own; an undecodable one cannot get here.
fn note_configs(configs: &mut Configs, entries: &[Entry]) {
    for e in entries.iter().filter(|e| e.kind == EntryKind::ConfChange) {
        match ConfEntry::decode(&e.data) {
            Ok(c) => configs.push(e.index, c.membership),
            Err(err) => debug_assert!(false, "unchecked configuration entry {}: {err}", e.index),
        }
    }
}

/// The longest prefix of `entries` within `max_bytes`, but at least one entry.
fn take_bytes(entries: &[Entry], max_bytes: u64) -> &[Entry] {
    let mut total = 0;
    let n = entries
        .iter()
        .take_while(|e| {
            total += e.size();
            total <= max_bytes
        })
        .count();
    &entries[..n.max(1).min(entries.len())]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::types::EntryKind;

    fn ents(terms: &[Term]) -> Vec<Entry> {
        terms
            .iter()
            .enumerate()
            .map(|(i, &t)| Entry {
                term: t,
                index: i as Index + 1,
                kind: EntryKind::Normal,
                data: Default::default(),
            })
            .collect()
    }

    #[test]
    fn conflict_hint_names_first_index_of_conflicting_term() {
        let log = RaftLog::restore(0, 0, Membership::default(), ents(&[1, 1, 2, 2, 2, 3]), 0, 0);
        let h = log.conflict_hint(5);
        assert_eq!(h.term, Some(2));
        assert_eq!(h.first_index, 3);
        let h = log.conflict_hint(9);
        assert_eq!((h.term, h.first_index), (None, 7));
    }

    #[test]
    fn last_index_of_term_uses_sorted_terms() {
        let log = RaftLog::restore(0, 0, Membership::default(), ents(&[1, 1, 2, 2, 4]), 0, 0);
        assert_eq!(log.last_index_of_term(2), Some(4));
        assert_eq!(log.last_index_of_term(3), None);
        assert_eq!(log.last_index_of_term(4), Some(5));
    }

    #[test]
    fn try_append_truncates_only_the_conflicting_suffix() {
        let mut log = RaftLog::restore(0, 0, Membership::default(), ents(&[1, 1, 1, 1]), 2, 0);
        let mut new = ents(&[1, 1, 1, 2, 2]);
        new.drain(..2);
        match log.try_append(2, 1, &new) {
            AppendOutcome::Matched(i) => assert_eq!(i, 5),
            _ => panic!("expected a match"),
        }
        assert_eq!(log.last_index(), 5);
        assert_eq!(log.term(4), Some(2));
        assert_eq!(
            log.persisted, 3,
            "the overwritten suffix is no longer durable"
        );
    }

    #[test]
    fn try_append_refuses_to_overwrite_committed_entries() {
        let mut log = RaftLog::restore(0, 0, Membership::default(), ents(&[1, 1, 1]), 3, 0);
        let mut new = ents(&[1, 2]);
        new.drain(..1);
        assert!(matches!(log.try_append(1, 1, &new), AppendOutcome::Refused));
        assert_eq!(log.term(2), Some(1));
    }

    #[test]
    fn committed_entries_wait_for_durability() {
        let mut log = RaftLog::restore(0, 0, Membership::default(), vec![], 0, 0);
        log.append(&ents(&[1, 1]));
        log.commit_to(2);
        assert!(log.take_committed(u64::MAX).is_empty());
        assert_eq!(log.take_unstable().len(), 2);
        assert!(log.persisted_to(2, 1));
        assert_eq!(log.take_committed(u64::MAX).len(), 2);
    }

    #[test]
    fn stale_persist_ack_is_ignored_after_overwrite() {
        let mut log = RaftLog::restore(0, 0, Membership::default(), vec![], 0, 0);
        log.append(&ents(&[1, 1]));
        assert_eq!(log.take_unstable().len(), 2);
        let mut new = ents(&[1, 2]);
        new.drain(..1);
        assert!(matches!(
            log.try_append(1, 1, &new),
            AppendOutcome::Matched(2)
        ));
        assert!(!log.persisted_to(2, 1), "index 2 now holds term 2");
        assert_eq!(log.take_unstable().len(), 1);
        assert!(log.persisted_to(2, 2));
    }
}
