//! The configurations in the log. A configuration takes effect on each node as soon as its
//! entry is in that node's log, committed or not (§6, as the paper prescribes; not when
//! applied, as etcd does): so a node always uses the latest configuration in its log, and
//! a configuration whose entry is overwritten (it was never committed) is forgotten with it.
//!
//! Kept: the configuration at the snapshot point (from the snapshot, or the bootstrap one)
//! and one per configuration entry after it, in index order. Bounded by the log itself.

use crate::membership::Membership;
use crate::types::Index;

#[derive(Clone, Debug)]
pub(crate) struct Configs {
    base_index: Index,
    base: Membership,
    /// (index of the configuration entry, the configuration it establishes); ascending.
    changes: Vec<(Index, Membership)>,
}

impl Configs {
    pub(crate) fn new(base_index: Index, base: Membership) -> Self {
        Configs {
            base_index,
            base,
            changes: Vec::new(),
        }
    }

    /// The configuration in force: the latest in the log.
    pub(crate) fn latest(&self) -> &Membership {
        self.changes.last().map_or(&self.base, |(_, m)| m)
    }

    /// The index of the latest configuration entry (the snapshot point if none follows it).
    pub(crate) fn latest_index(&self) -> Index {
        self.changes.last().map_or(self.base_index, |(i, _)| *i)
    }

    /// The configuration in force at `index` (the latest one at or before it).
    pub(crate) fn at(&self, index: Index) -> &Membership {
        let after = self.changes.partition_point(|(i, _)| *i <= index);
        match after {
            0 => &self.base,
            n => &self.changes[n - 1].1,
        }
    }

    /// A configuration entry was appended at `index`.
    pub(crate) fn push(&mut self, index: Index, m: Membership) {
        debug_assert!(index > self.latest_index());
        self.changes.push((index, m));
    }

    /// Entries from `index` on were overwritten: so are their configurations.
    pub(crate) fn truncate_from(&mut self, index: Index) {
        let keep = self.changes.partition_point(|(i, _)| *i < index);
        self.changes.truncate(keep);
    }

    /// The log now starts after `index` (a snapshot covers it).
    pub(crate) fn compact_to(&mut self, index: Index) {
        self.base = self.at(index).clone();
        self.base_index = index;
        let drop = self.changes.partition_point(|(i, _)| *i <= index);
        self.changes.drain(..drop);
    }

    /// A snapshot at `index` carrying `m` was installed; `keep_suffix` says whether the log
    /// kept the entries after it (and so their configurations).
    pub(crate) fn install(&mut self, index: Index, m: Membership, keep_suffix: bool) {
        if keep_suffix {
            let drop = self.changes.partition_point(|(i, _)| *i <= index);
            self.changes.drain(..drop);
        } else {
            self.changes.clear();
        }
        self.base = m;
        self.base_index = index;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_latest_configuration_in_the_log_is_in_force() {
        let m = |v: &[u64]| Membership::new(v.to_vec());
        let mut c = Configs::new(0, m(&[1, 2, 3]));
        c.push(5, m(&[1, 2, 3, 4]));
        c.push(9, m(&[1, 2, 4]));
        assert_eq!(c.latest(), &m(&[1, 2, 4]));
        assert_eq!(c.at(4), &m(&[1, 2, 3]));
        assert_eq!(c.at(5), &m(&[1, 2, 3, 4]));
        assert_eq!(c.at(8), &m(&[1, 2, 3, 4]));
        c.truncate_from(9); // the entry at 9 was overwritten
        assert_eq!((c.latest(), c.latest_index()), (&m(&[1, 2, 3, 4]), 5));
        c.compact_to(7);
        assert_eq!((c.latest(), c.latest_index()), (&m(&[1, 2, 3, 4]), 7));
        c.push(8, m(&[1]));
        c.install(10, m(&[7]), false);
        assert_eq!((c.latest(), c.at(11)), (&m(&[7]), &m(&[7])));
    }
}
