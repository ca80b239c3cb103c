//! Which watchers want a key: the range index of the synced watchers. A revision's events
//! are matched against it key by key, so dispatch costs the events and the watchers they
//! match, never a pass over every watcher.
//!
//! Single-key watchers (the common case) sit in a hash map. Ranges and prefixes sit in an
//! interval tree laid out over an array sorted by start key, each node holding the largest
//! end in its subtree: a point query visits O(log n) nodes plus those that match. The tree
//! is rebuilt lazily, on the first query after a change, so creating many watchers in a row
//! costs one rebuild.

use bytes::Bytes;
use std::collections::HashMap;
use std::hash::Hash;

/// The exclusive end of a range; `Unbounded` is past every key (etcd's `range_end = "\0"`).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum End {
    Key(Bytes),
    Unbounded,
}

impl End {
    fn after(&self, key: &[u8]) -> bool {
        match self {
            End::Key(end) => key < &end[..],
            End::Unbounded => true,
        }
    }
}

pub struct Index<W> {
    keys: HashMap<Bytes, Vec<W>>,
    /// Every range, by start key once `tree` is built.
    ranges: Vec<(Bytes, End, W)>,
    /// `max_end[i]`: the largest end in the subtree rooted at `i` (see `build`); `None`
    /// when `ranges` changed since the last build.
    max_end: Option<Vec<End>>,
}

impl<W> Default for Index<W> {
    fn default() -> Self {
        Index {
            keys: HashMap::new(),
            ranges: Vec::new(),
            max_end: Some(Vec::new()),
        }
    }
}

impl<W: Copy + Eq + Hash> Index<W> {
    /// Add `w` for the key `start` alone (`end == None`) or for `[start, end)`.
    pub fn insert(&mut self, start: &Bytes, end: Option<&End>, w: W) {
        match end {
            None => self.keys.entry(start.clone()).or_default().push(w),
            Some(end) => {
                self.ranges.push((start.clone(), end.clone(), w));
                self.max_end = None;
            }
        }
    }

    pub fn remove(&mut self, start: &Bytes, end: Option<&End>, w: W) {
        match end {
            None => {
                if let Some(ws) = self.keys.get_mut(start) {
                    ws.retain(|x| *x != w);
                    if ws.is_empty() {
                        self.keys.remove(start);
                    }
                }
            }
            Some(_) => {
                if let Some(i) = self.ranges.iter().position(|r| r.2 == w) {
                    self.ranges.swap_remove(i);
                    self.max_end = None;
                }
            }
        }
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty() && self.ranges.is_empty()
    }

    /// Call `f` once for every watcher whose key or range holds `key`.
    pub fn matches(&mut self, key: &[u8], mut f: impl FnMut(W)) {
        if let Some(ws) = self.keys.get(key) {
            ws.iter().for_each(|w| f(*w));
        }
        if self.ranges.is_empty() {
            return;
        }
        if self.max_end.is_none() {
            self.build();
        }
        let max_end = self.max_end.as_deref().unwrap_or_default();
        query(&self.ranges, max_end, 0, self.ranges.len(), key, &mut f);
    }

    fn build(&mut self) {
        self.ranges.sort_by(|a, b| a.0.cmp(&b.0));
        let mut max_end = vec![End::Key(Bytes::new()); self.ranges.len()];
        fill(&self.ranges, &mut max_end, 0, self.ranges.len());
        self.max_end = Some(max_end);
    }
}

/// The subtree over `ranges[lo..hi]` is rooted at its middle; returns its largest end.
fn fill<W>(ranges: &[(Bytes, End, W)], max_end: &mut [End], lo: usize, hi: usize) -> End {
    if lo >= hi {
        return End::Key(Bytes::new());
    }
    let mid = lo + (hi - lo) / 2;
    let left = fill(ranges, max_end, lo, mid);
    let right = fill(ranges, max_end, mid + 1, hi);
    let m = ranges[mid].1.clone().max(left).max(right);
    max_end[mid] = m.clone();
    m
}

fn query<W: Copy>(
    ranges: &[(Bytes, End, W)],
    max_end: &[End],
    lo: usize,
    hi: usize,
    key: &[u8],
    f: &mut impl FnMut(W),
) {
    if lo >= hi {
        return;
    }
    let mid = lo + (hi - lo) / 2;
    // No range in this subtree ends after the key: none holds it.
    if !max_end[mid].after(key) {
        return;
    }
    query(ranges, max_end, lo, mid, key, f);
    let (start, end, w) = &ranges[mid];
    // Everything right of `mid` starts at or after `start`.
    if &start[..] <= key {
        if end.after(key) {
            f(*w);
        }
        query(ranges, max_end, mid + 1, hi, key, f);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn naive(ranges: &[(Bytes, Option<End>, u32)], key: &[u8]) -> Vec<u32> {
        let mut v: Vec<u32> = ranges
            .iter()
            .filter(|(s, e, _)| match e {
                None => &s[..] == key,
                Some(e) => &s[..] <= key && e.after(key),
            })
            .map(|r| r.2)
            .collect();
        v.sort();
        v
    }

    fn word() -> impl Strategy<Value = Bytes> {
        prop::collection::vec(0u8..4, 0..3).prop_map(Bytes::from)
    }

    proptest! {
        /// The index answers as a scan of every watcher would, through inserts and removals.
        #[test]
        fn the_index_matches_what_a_scan_finds(
            ops in prop::collection::vec((word(), prop::option::of(prop::option::of(word())), any::<bool>()), 1..60),
            probes in prop::collection::vec(word(), 1..20),
        ) {
            let mut index = Index::default();
            let mut live: Vec<(Bytes, Option<End>, u32)> = Vec::new();
            for (i, (start, end, remove)) in ops.into_iter().enumerate() {
                if remove && !live.is_empty() {
                    let (s, e, w) = live.remove(i % live.len());
                    index.remove(&s, e.as_ref(), w);
                } else {
                    let end = end.map(|e| e.map_or(End::Unbounded, End::Key));
                    index.insert(&start, end.as_ref(), i as u32);
                    live.push((start, end, i as u32));
                }
                for p in &probes {
                    let mut got = Vec::new();
                    index.matches(p, |w| got.push(w));
                    got.sort();
                    prop_assert_eq!(got, naive(&live, p));
                }
            }
        }
    }
}
