//! HashKV: a hash of the MVCC history up to a revision, equal on every member that applied
//! the same log (the consistency check members run on each other, and what
//! `etcdctl endpoint hashkv` compares). It covers every retained version of every key at or
//! below the revision — its key, revisions, version, lease and value, or the tombstone — in
//! key order then revision order, so two stores agree only if their histories do. Which
//! versions are retained depends only on the compact revision, which is replicated too: the
//! answer carries it, and hashes are comparable only between equal compact revisions.

use crate::error::{Error, Result};
use crate::store::Store;
use crate::types::Revision;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KvHash {
    /// CRC-32C of the history up to `revision`.
    pub hash: u32,
    /// The revision hashed up to (the current one when asked for 0).
    pub revision: Revision,
    pub compact_revision: Revision,
}

impl Store {
    /// The hash of the history up to `rev` (0: the current revision). etcd's errors: a
    /// revision above the current one is in the future; one at or below the compact
    /// revision is compacted.
    pub fn hash_kv(&self, rev: Revision) -> Result<KvHash> {
        if rev > self.revision {
            return Err(Error::FutureRevision);
        }
        if rev > 0 && rev <= self.compact_revision {
            return Err(Error::Compacted);
        }
        let upto = if rev <= 0 { self.revision } else { rev };
        let mut crc = 0u32;
        for (key, history) in self.keys.iter() {
            for v in history.iter().take_while(|v| v.rev <= upto) {
                crc = crc32c::crc32c_append(crc, &(key.len() as u64).to_le_bytes());
                crc = crc32c::crc32c_append(crc, key);
                crc = crc32c::crc32c_append(crc, &v.rev.to_le_bytes());
                match &v.kv {
                    None => crc = crc32c::crc32c_append(crc, &[0]),
                    Some(kv) => {
                        crc = crc32c::crc32c_append(crc, &[1]);
                        for n in [kv.create_revision, kv.mod_revision, kv.version, kv.lease] {
                            crc = crc32c::crc32c_append(crc, &n.to_le_bytes());
                        }
                        crc = crc32c::crc32c_append(crc, &(kv.value.len() as u64).to_le_bytes());
                        crc = crc32c::crc32c_append(crc, &kv.value);
                    }
                }
            }
        }
        Ok(KvHash {
            hash: crc,
            revision: upto,
            compact_revision: self.compact_revision,
        })
    }
}
