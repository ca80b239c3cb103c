//! The store as bytes, for raft snapshots. Layout (little endian):
//!
//! ```text
//! magic "RKVKV001" | revision i64 | compact_revision i64 | key count u64 |
//!   per key: key len u32 | key | version count u32 |
//!     per version: rev i64 | live u8 | if live: create i64 | version i64 | lease i64 |
//!                                              value len u32 | value
//! ```
//!
//! Integrity is the snapshot file's job (it carries a CRC); decoding still checks every
//! length and invariant, and never panics on bad bytes.

use crate::error::{Error, Result};
use crate::store::{cost, Store, Version};
use crate::types::KeyValue;
use bytes::{Buf, BufMut, Bytes, BytesMut};

const MAGIC: &[u8; 8] = b"RKVKV001";

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
        if r.take(8)? != MAGIC[..] {
            return Err(Error::BadSnapshot("not a kv snapshot"));
        }
        let mut store = Store {
            revision: r.i64()?,
            compact_revision: r.i64()?,
            ..Store::default()
        };
        let keys = r.u64()?;
        let mut prev_key: Option<Bytes> = None;
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
        Ok(store)
    }
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
