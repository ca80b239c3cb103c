//! The store as bytes, for raft snapshots. Layout (little endian):
//!
//! ```text
//! magic "RKVKV002" | revision i64 | compact_revision i64 | key count u64 |
//!   per key: key len u32 | key | version count u32 |
//!     per version: rev i64 | sub u32 | live u8 | if live: create i64 | version i64 |
//!                                                    lease i64 | value len u32 | value
//! ```
//!
//! `sub` is the version's place among the writes of its revision (etcd's sub-revision),
//! from which the revision index that watchers replay is rebuilt. Version 1 ("RKVKV001")
//! had no `sub`; its writes of one revision are replayed in key order.
//!
//! Integrity is the snapshot file's job (it carries a CRC); decoding still checks every
//! length and invariant, and never panics on bad bytes.

use crate::error::{Error, Result};
use crate::store::{cost, Store, Version};
use crate::types::{KeyValue, Revision};
use bytes::{Buf, BufMut, Bytes, BytesMut};
use imbl::Vector;

const MAGIC: &[u8; 8] = b"RKVKV002";
const MAGIC_V1: &[u8; 8] = b"RKVKV001";

impl Store {
    pub fn snapshot(&self) -> Bytes {
        let mut b = BytesMut::new();
        b.put_slice(MAGIC);
        b.put_i64_le(self.revision);
        b.put_i64_le(self.compact_revision);
        b.put_u64_le(self.keys.len() as u64);
        for (key, history) in &self.keys {
            b.put_u32_le(key.len() as u32);
            b.put_slice(key);
            b.put_u32_le(history.len() as u32);
            for v in history {
                b.put_i64_le(v.rev);
                b.put_u32_le(self.sub_of(key, v.rev));
                match &v.kv {
                    None => b.put_u8(0),
                    Some(kv) => {
                        b.put_u8(1);
                        b.put_i64_le(kv.create_revision);
                        b.put_i64_le(kv.version);
                        b.put_i64_le(kv.lease);
                        b.put_u32_le(kv.value.len() as u32);
                        b.put_slice(&kv.value);
                    }
                }
            }
        }
        b.freeze()
    }

    /// Rebuild a store from [`Store::snapshot`]'s bytes.
    pub fn restore(data: &Bytes) -> Result<Store> {
        let mut r = Reader(data.clone());
        let v1 = match r.take(8)? {
            m if m == MAGIC[..] => false,
            m if m == MAGIC_V1[..] => true,
            _ => return Err(Error::BadSnapshot("not a kv snapshot")),
        };
        let mut store = Store {
            revision: r.i64()?,
            compact_revision: r.i64()?,
            ..Store::default()
        };
        if store.compact_revision < 0 || store.compact_revision > store.revision {
            return Err(Error::BadSnapshot("compact revision out of range"));
        }
        let keys = r.u64()?;
        let mut prev_key: Option<Bytes> = None;
        // (revision, sub-revision, key) of every indexed version.
        let mut writes: Vec<(Revision, u32, Bytes)> = Vec::new();
        let first = store.first_indexed();
        for _ in 0..keys {
            let len = r.u32()? as usize;
            let key = r.take(len)?;
            if prev_key.as_ref().is_some_and(|p| *p >= key) || key.is_empty() {
                return Err(Error::BadSnapshot("keys out of order"));
            }
            let n = r.u32()? as usize;
            let mut history: Vec<Version> = Vec::with_capacity(n.min(1024));
            for _ in 0..n {
                let rev = r.i64()?;
                if history.last().is_some_and(|v| v.rev >= rev) || rev > store.revision {
                    return Err(Error::BadSnapshot("revisions out of order"));
                }
                let sub = if v1 { 0 } else { r.u32()? };
                if rev >= first {
                    writes.push((rev, sub, key.clone()));
                }
                let kv = match r.u8()? {
                    0 => None,
                    1 => Some(KeyValue {
                        key: key.clone(),
                        create_revision: r.i64()?,
                        mod_revision: rev,
                        version: r.i64()?,
                        lease: r.i64()?,
                        value: {
                            let len = r.u32()? as usize;
                            r.take(len)?
                        },
                    }),
                    _ => return Err(Error::BadSnapshot("bad version tag")),
                };
                history.push(Version { rev, kv });
            }
            if history.is_empty() {
                return Err(Error::BadSnapshot("key without history"));
            }
            store.size += history.iter().map(|v| cost(&key, v)).sum::<u64>();
            store.keys.insert(key.clone(), history);
            prev_key = Some(key);
        }
        if r.0.has_remaining() {
            return Err(Error::BadSnapshot("trailing bytes"));
        }
        store.by_rev = index(writes, first, store.revision)?;
        Ok(store)
    }

    /// A version's place among its revision's writes (0 if the index no longer holds it).
    fn sub_of(&self, key: &Bytes, rev: Revision) -> u32 {
        let first = self.first_indexed();
        if rev < first {
            return 0;
        }
        self.by_rev
            .get((rev - first) as usize)
            .and_then(|w| w.iter().position(|k| k == key))
            .map_or(0, |p| p as u32)
    }
}

/// The revision index from each indexed version's (revision, sub-revision, key): every
/// revision from `first` to `last` must have written something, except `first` itself,
/// whose writes compaction may have removed.
fn index(
    mut writes: Vec<(Revision, u32, Bytes)>,
    first: Revision,
    last: Revision,
) -> Result<Vector<Vec<Bytes>>> {
    // Keys come in order, so equal sub-revisions (a version 1 snapshot) stay in key order.
    writes.sort_by_key(|w| (w.0, w.1));
    let mut by_rev: Vector<Vec<Bytes>> = Vector::new();
    let mut writes = writes.into_iter().peekable();
    for rev in first..=last {
        let mut written = Vec::new();
        while let Some((_, sub, key)) = writes.next_if(|w| w.0 == rev) {
            if sub as usize != written.len() && sub != 0 {
                return Err(Error::BadSnapshot("sub-revisions out of order"));
            }
            written.push(key);
        }
        if written.is_empty() && rev != first {
            return Err(Error::BadSnapshot("a revision without writes"));
        }
        by_rev.push_back(written);
    }
    Ok(by_rev)
}

struct Reader(Bytes);

impl Reader {
    fn take(&mut self, n: usize) -> Result<Bytes> {
        if self.0.remaining() < n {
            return Err(Error::BadSnapshot("truncated"));
        }
        Ok(self.0.split_to(n))
    }
    fn u8(&mut self) -> Result<u8> {
        Ok(self.take(1)?[0])
    }
    fn u32(&mut self) -> Result<u32> {
        Ok(u32::from_le_bytes(self.take(4)?[..].try_into().unwrap()))
    }
    fn u64(&mut self) -> Result<u64> {
        Ok(u64::from_le_bytes(self.take(8)?[..].try_into().unwrap()))
    }
    fn i64(&mut self) -> Result<i64> {
        Ok(i64::from_le_bytes(self.take(8)?[..].try_into().unwrap()))
    }
}
