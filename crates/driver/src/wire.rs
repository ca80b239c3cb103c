//! A byte encoding of raft [`Message`]s, for a [`Transport`](crate::Transport) that moves
//! bytes (a TCP stream, say) and has no format of its own. The server speaks protobuf to its
//! peers instead; `examples/replicated_log.rs` uses this one.
//!
//! Layout, integers little-endian: a version byte (1); the sender, the receiver and the term
//! (u64 each); the body's kind (u8: 0 for `Append`, then [`Body`]'s variants in declaration
//! order); then the body's fields in declaration order. A number is a u64, a flag a u8 (0 or
//! 1), an optional value a flag and, if set, the value; bytes are a length (u64) and the
//! bytes, a list a count (u64) and the items. An entry is its term, its index, its kind (u8: normal,
//! no-op, configuration change) and its data; a snapshot's configuration is the bytes of
//! [`Membership::encode_into`](raft::Membership::encode_into).
//!
//! [`decode`] refuses anything [`encode`] would not write (truncated or trailing bytes, an
//! unknown kind, a flag other than 0 or 1, an invalid configuration), never panics, and never
//! allocates more than its input could fill. It checks the format, not the protocol's rules:
//! [`raft::Raft::step`] checks those.

use bytes::Bytes;
use raft::{Body, ConflictHint, Entry, EntryKind, Membership, Message, SnapshotMeta};
use std::fmt;

const VERSION: u8 = 1;
/// Entry kinds by their number on the wire.
const KINDS: [EntryKind; 3] = [EntryKind::Normal, EntryKind::Noop, EntryKind::ConfChange];

/// Why bytes are not an encoded message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Malformed(pub &'static str);

impl fmt::Display for Malformed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "malformed message: {}", self.0)
    }
}

impl std::error::Error for Malformed {}

/// The bytes of `m`, as laid out above.
pub fn encode(m: &Message) -> Vec<u8> {
    let mut w = Writer(vec![VERSION]);
    w.num(m.from).num(m.to).num(m.term);
    match &m.body {
        Body::Append {
            prev_index,
            prev_term,
            entries,
            commit,
        } => {
            w.kind(0).num(*prev_index).num(*prev_term);
            w.count(entries.len());
            for e in entries {
                let kind = match e.kind {
                    EntryKind::Normal => 0,
                    EntryKind::Noop => 1,
                    EntryKind::ConfChange => 2,
                };
                w.num(e.term).num(e.index).kind(kind).bytes(&e.data);
            }
            w.num(*commit);
        }
        Body::AppendResponse {
            reject,
            index,
            hint,
        } => {
            w.kind(1).flag(*reject).num(*index).flag(hint.is_some());
            if let Some(h) = hint {
                w.flag(h.term.is_some());
                if let Some(t) = h.term {
                    w.num(t);
                }
                w.num(h.first_index);
            }
        }
        Body::Heartbeat { commit, seq } => {
            w.kind(2).num(*commit).num(*seq);
        }
        Body::HeartbeatResponse { seq } => {
            w.kind(3).num(*seq);
        }
        Body::Vote {
            pre_vote,
            transfer,
            last_index,
            last_term,
        } => {
            w.kind(4).flag(*pre_vote).flag(*transfer);
            w.num(*last_index).num(*last_term);
        }
        Body::VoteResponse { pre_vote, granted } => {
            w.kind(5).flag(*pre_vote).flag(*granted);
        }
        Body::TimeoutNow => {
            w.kind(6);
        }
        Body::InstallSnapshot {
            meta,
            offset,
            total,
            data,
        } => {
            let mut membership = Vec::new();
            meta.membership.encode_into(&mut membership);
            w.kind(7).num(meta.index).num(meta.term).bytes(&membership);
            w.num(*offset).num(*total).bytes(data);
        }
        Body::SnapshotResponse {
            index,
            received,
            reject,
        } => {
            w.kind(8).num(*index).num(*received).flag(*reject);
        }
        Body::ReadIndex { ctx } => {
            w.kind(9).num(*ctx);
        }
        Body::ReadIndexResponse { ctx, index } => {
            w.kind(10).num(*ctx).num(*index);
        }
        Body::Propose { data } => {
            w.kind(11).count(data.len());
            for d in data {
                w.bytes(d);
            }
        }
        Body::Commit { commit } => {
            w.kind(12).num(*commit);
        }
    }
    w.0
}

/// The message `bytes` encode, or why they do not encode one.
pub fn decode(bytes: &[u8]) -> Result<Message, Malformed> {
    let mut r = Reader(bytes);
    if r.u8()? != VERSION {
        return Err(Malformed("unknown version"));
    }
    let (from, to, term) = (r.num()?, r.num()?, r.num()?);
    // Fields are read in the order they are written: a struct expression evaluates its
    // fields in the order they appear.
    let body = match r.u8()? {
        0 => Body::Append {
            prev_index: r.num()?,
            prev_term: r.num()?,
            entries: r.list(8 + 8 + 1 + 8, |r| {
                Ok(Entry {
                    term: r.num()?,
                    index: r.num()?,
                    kind: *KINDS
                        .get(r.u8()? as usize)
                        .ok_or(Malformed("unknown entry kind"))?,
                    data: r.bytes()?,
                })
            })?,
            commit: r.num()?,
        },
        1 => Body::AppendResponse {
            reject: r.flag()?,
            index: r.num()?,
            hint: match r.flag()? {
                false => None,
                true => Some(ConflictHint {
                    term: if r.flag()? { Some(r.num()?) } else { None },
                    first_index: r.num()?,
                }),
            },
        },
        2 => Body::Heartbeat {
            commit: r.num()?,
            seq: r.num()?,
        },
        3 => Body::HeartbeatResponse { seq: r.num()? },
        4 => Body::Vote {
            pre_vote: r.flag()?,
            transfer: r.flag()?,
            last_index: r.num()?,
            last_term: r.num()?,
        },
        5 => Body::VoteResponse {
            pre_vote: r.flag()?,
            granted: r.flag()?,
        },
        6 => Body::TimeoutNow,
        7 => Body::InstallSnapshot {
            meta: SnapshotMeta {
                index: r.num()?,
                term: r.num()?,
                membership: Membership::decode(&r.bytes()?)
                    .map_err(|_| Malformed("invalid configuration"))?,
            },
            offset: r.num()?,
            total: r.num()?,
            data: r.bytes()?,
        },
        8 => Body::SnapshotResponse {
            index: r.num()?,
            received: r.num()?,
            reject: r.flag()?,
        },
        9 => Body::ReadIndex { ctx: r.num()? },
        10 => Body::ReadIndexResponse {
            ctx: r.num()?,
            index: r.num()?,
        },
        11 => Body::Propose {
            data: r.list(8, Reader::bytes)?,
        },
        12 => Body::Commit { commit: r.num()? },
        _ => return Err(Malformed("unknown message kind")),
    };
    if !r.0.is_empty() {
        return Err(Malformed("trailing bytes"));
    }
    Ok(Message {
        from,
        to,
        term,
        body,
    })
}

struct Writer(Vec<u8>);

impl Writer {
    fn num(&mut self, n: u64) -> &mut Self {
        self.0.extend_from_slice(&n.to_le_bytes());
        self
    }
    fn kind(&mut self, k: u8) -> &mut Self {
        self.0.push(k);
        self
    }
    fn flag(&mut self, b: bool) -> &mut Self {
        self.kind(u8::from(b))
    }
    fn count(&mut self, n: usize) -> &mut Self {
        self.num(n as u64)
    }
    fn bytes(&mut self, b: &[u8]) -> &mut Self {
        self.count(b.len());
        self.0.extend_from_slice(b);
        self
    }
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], Malformed> {
        let (head, rest) = self.0.split_at_checked(n).ok_or(Malformed("truncated"))?;
        self.0 = rest;
        Ok(head)
    }
    fn u8(&mut self) -> Result<u8, Malformed> {
        Ok(self.take(1)?[0])
    }
    fn num(&mut self) -> Result<u64, Malformed> {
        Ok(u64::from_le_bytes(self.take(8)?.try_into().unwrap()))
    }
    fn flag(&mut self) -> Result<bool, Malformed> {
        match self.u8()? {
            0 => Ok(false),
            1 => Ok(true),
            _ => Err(Malformed("a flag other than 0 or 1")),
        }
    }
    /// A count of items at least `min` bytes each, refused if the bytes left cannot hold
    /// that many (so a forged count never makes us allocate).
    fn count(&mut self, min: usize) -> Result<usize, Malformed> {
        let n = self.num()?;
        if n > (self.0.len() / min.max(1)) as u64 {
            return Err(Malformed("a count beyond the bytes left"));
        }
        Ok(n as usize)
    }
    fn bytes(&mut self) -> Result<Bytes, Malformed> {
        let n = self.count(1)?;
        Ok(Bytes::copy_from_slice(self.take(n)?))
    }
    fn list<T>(
        &mut self,
        min: usize,
        item: impl Fn(&mut Self) -> Result<T, Malformed>,
    ) -> Result<Vec<T>, Malformed> {
        let n = self.count(min)?;
        (0..n).map(|_| item(self)).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn samples() -> Vec<Message> {
        let entry = |index, kind, data: &'static [u8]| Entry {
            term: 2,
            index,
            kind,
            data: Bytes::from_static(data),
        };
        let joint =
            Membership::from_parts(vec![1, 2, 4], vec![1, 2, 3], vec![5], vec![3], true).unwrap();
        let hint = |term, first_index| Some(ConflictHint { term, first_index });
        let bodies = vec![
            Body::Append {
                prev_index: 3,
                prev_term: 1,
                entries: vec![
                    entry(4, EntryKind::Noop, b""),
                    entry(5, EntryKind::Normal, b"x=1"),
                    entry(6, EntryKind::ConfChange, b"\x02\x00"),
                ],
                commit: 3,
            },
            Body::Append {
                prev_index: 0,
                prev_term: 0,
                entries: vec![],
                commit: 0,
            },
            Body::AppendResponse {
                reject: false,
                index: 9,
                hint: None,
            },
            Body::AppendResponse {
                reject: true,
                index: 9,
                hint: hint(None, 7),
            },
            Body::AppendResponse {
                reject: true,
                index: 9,
                hint: hint(Some(0), 1),
            },
            Body::Heartbeat { commit: 8, seq: 3 },
            Body::HeartbeatResponse { seq: u64::MAX },
            Body::Vote {
                pre_vote: true,
                transfer: false,
                last_index: 4,
                last_term: 2,
            },
            Body::VoteResponse {
                pre_vote: false,
                granted: true,
            },
            Body::TimeoutNow,
            Body::InstallSnapshot {
                meta: SnapshotMeta {
                    index: 20,
                    term: 2,
                    membership: joint,
                },
                offset: 5,
                total: 9,
                data: Bytes::from_static(b"abcd"),
            },
            Body::SnapshotResponse {
                index: 20,
                received: 9,
                reject: true,
            },
            Body::ReadIndex { ctx: 77 },
            Body::ReadIndexResponse { ctx: 77, index: 12 },
            Body::Propose {
                data: vec![Bytes::from_static(b"a"), Bytes::new()],
            },
            Body::Propose { data: vec![] },
            Body::Commit { commit: 11 },
        ];
        bodies
            .into_iter()
            .map(|body| Message {
                from: 1,
                to: 2,
                term: 2,
                body,
            })
            .collect()
    }

    #[test]
    fn every_kind_of_message_comes_back_as_it_went() {
        for m in samples() {
            assert_eq!(decode(&encode(&m)), Ok(m));
        }
    }

    #[test]
    fn anything_else_is_refused_without_a_panic() {
        for m in samples() {
            let bytes = encode(&m);
            for cut in 0..bytes.len() {
                assert!(decode(&bytes[..cut]).is_err(), "{m:?} cut at {cut}");
            }
            let mut longer = bytes.clone();
            longer.push(0);
            assert_eq!(decode(&longer), Err(Malformed("trailing bytes")));
            // Every single-byte change either is refused or decodes to some message.
            for at in 0..bytes.len() {
                let mut changed = bytes.clone();
                changed[at] ^= 0xff;
                let _ = decode(&changed);
            }
        }
        assert_eq!(decode(&[2]), Err(Malformed("unknown version")));
        // The entry count of an `Append` sits after the version, header, kind and two numbers.
        let forged_count = [&encode(&samples()[0])[..42], &[0xff; 8]].concat();
        assert_eq!(
            decode(&forged_count),
            Err(Malformed("a count beyond the bytes left"))
        );
    }
}
