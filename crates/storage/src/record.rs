//! WAL record framing. Each record is
//!
//! ```text
//! | len: u32 | type: u8 | crc: u32 | header_crc: u32 | payload: len bytes |
//! ```
//!
//! `crc` is CRC32C over the type byte and the payload; `header_crc` covers the first nine
//! header bytes. The header checksum makes the length trustworthy: without it, a flipped
//! bit in a length would look like a record running off the end of the file — a torn
//! write — and recovery would drop every record after it. All integers are little endian.
//! The decoder never panics, whatever the bytes (it is fuzzed).

use raft::{Entry, EntryKind, HardState, Index, Term};

pub const HEADER_LEN: usize = 13;
/// No record is larger; a length beyond it is corruption, not a reason to allocate.
pub const MAX_PAYLOAD: usize = 256 << 20;
/// First bytes of every segment's header record.
pub const SEGMENT_MAGIC: &[u8; 8] = b"RKVWAL\0\x01";

const T_SEGMENT: u8 = 1;
const T_ENTRY: u8 = 2;
const T_HARD_STATE: u8 = 3;
const T_SNAPSHOT_MARK: u8 = 4;

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Record {
    /// First record of every segment.
    Segment {
        seq: u64,
        first_index: Index,
    },
    Entry(Entry),
    HardState(HardState),
    /// A snapshot at (index, term) now covers the log: on replay, entries up to it are
    /// dropped — and all of them unless `keep_suffix`, which records §7's decision (did the
    /// log hold the snapshot's last entry?) as taken when the log was whole.
    SnapshotMark {
        index: Index,
        term: Term,
        keep_suffix: bool,
    },
}

#[derive(Debug, PartialEq, Eq)]
pub enum Decoded {
    /// A record and the bytes it took.
    Record(Record, usize),
    /// The buffer ends inside the record: a write cut short.
    Incomplete,
    /// The header is intact but the payload is not a valid record.
    Corrupt(&'static str),
    /// The header itself is damaged, so not even the record's length is known.
    BadHeader,
}

pub fn encode(rec: &Record, out: &mut Vec<u8>) {
    let start = out.len();
    out.extend_from_slice(&[0; HEADER_LEN]);
    let ty = match rec {
        Record::Segment { seq, first_index } => {
            out.extend_from_slice(SEGMENT_MAGIC);
            out.extend_from_slice(&seq.to_le_bytes());
            out.extend_from_slice(&first_index.to_le_bytes());
            T_SEGMENT
        }
        Record::Entry(e) => {
            out.extend_from_slice(&e.index.to_le_bytes());
            out.extend_from_slice(&e.term.to_le_bytes());
            out.push(match e.kind {
                EntryKind::Normal => 0,
                EntryKind::Noop => 1,
                // Added with membership change; logs written before hold only 0 and 1.
                EntryKind::ConfChange => 2,
            });
            out.extend_from_slice(&e.data);
            T_ENTRY
        }
        Record::HardState(hs) => {
            out.extend_from_slice(&hs.term.to_le_bytes());
            out.extend_from_slice(&hs.vote.unwrap_or(0).to_le_bytes());
            out.extend_from_slice(&hs.commit.to_le_bytes());
            T_HARD_STATE
        }
        Record::SnapshotMark {
            index,
            term,
            keep_suffix,
        } => {
            out.extend_from_slice(&index.to_le_bytes());
            out.extend_from_slice(&term.to_le_bytes());
            out.push(u8::from(*keep_suffix));
            T_SNAPSHOT_MARK
        }
    };
    let len = (out.len() - start - HEADER_LEN) as u32;
    let mut crc = crc32c::crc32c(&[ty]);
    crc = crc32c::crc32c_append(crc, &out[start + HEADER_LEN..]);
    out[start..start + 4].copy_from_slice(&len.to_le_bytes());
    out[start + 4] = ty;
    out[start + 5..start + 9].copy_from_slice(&crc.to_le_bytes());
    let header_crc = crc32c::crc32c(&out[start..start + 9]);
    out[start + 9..start + 13].copy_from_slice(&header_crc.to_le_bytes());
}

/// The payload length a record header claims, if the header is intact.
pub fn claimed_len(buf: &[u8]) -> Option<usize> {
    let header = buf.get(..HEADER_LEN)?;
    let header_crc = u32::from_le_bytes(header[9..13].try_into().unwrap());
    (crc32c::crc32c(&header[..9]) == header_crc)
        .then(|| u32::from_le_bytes(header[0..4].try_into().unwrap()) as usize)
}

/// Decode the record at the start of `buf`.
pub fn decode(buf: &[u8]) -> Decoded {
    if buf.len() < HEADER_LEN {
        return Decoded::Incomplete;
    }
    let Some(len) = claimed_len(buf) else {
        return Decoded::BadHeader;
    };
    let ty = buf[4];
    let crc = u32::from_le_bytes(buf[5..9].try_into().unwrap());
    if len > MAX_PAYLOAD {
        return Decoded::Corrupt("record length out of range");
    }
    let Some(payload) = buf.get(HEADER_LEN..HEADER_LEN + len) else {
        return Decoded::Incomplete;
    };
    if crc32c::crc32c_append(crc32c::crc32c(&[ty]), payload) != crc {
        return Decoded::Corrupt("checksum mismatch");
    }
    match parse(ty, payload) {
        Some(rec) => Decoded::Record(rec, HEADER_LEN + len),
        None => Decoded::Corrupt("malformed record payload"),
    }
}

fn parse(ty: u8, p: &[u8]) -> Option<Record> {
    let u64_at = |at: usize| -> Option<u64> {
        Some(u64::from_le_bytes(p.get(at..at + 8)?.try_into().ok()?))
    };
    Some(match ty {
        T_SEGMENT if p.len() == 24 && &p[..8] == SEGMENT_MAGIC => Record::Segment {
            seq: u64_at(8)?,
            first_index: u64_at(16)?,
        },
        T_ENTRY if p.len() >= 17 => Record::Entry(Entry {
            index: u64_at(0)?,
            term: u64_at(8)?,
            kind: match p[16] {
                0 => EntryKind::Normal,
                1 => EntryKind::Noop,
                2 => EntryKind::ConfChange,
                _ => return None,
            },
            data: bytes::Bytes::copy_from_slice(&p[17..]),
        }),
        T_HARD_STATE if p.len() == 24 => Record::HardState(HardState {
            term: u64_at(0)?,
            vote: Some(u64_at(8)?).filter(|&v| v != 0),
            commit: u64_at(16)?,
        }),
        T_SNAPSHOT_MARK if p.len() == 17 && p[16] <= 1 => Record::SnapshotMark {
            index: u64_at(0)?,
            term: u64_at(8)?,
            keep_suffix: p[16] == 1,
        },
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn roundtrip(rec: Record) {
        let mut buf = Vec::new();
        encode(&rec, &mut buf);
        assert_eq!(decode(&buf), Decoded::Record(rec, buf.len()));
        // Every strict prefix is incomplete, never a wrong record.
        for cut in 0..buf.len() {
            assert_eq!(decode(&buf[..cut]), Decoded::Incomplete, "cut at {cut}");
        }
    }

    #[test]
    fn records_roundtrip_and_prefixes_are_incomplete() {
        roundtrip(Record::Segment {
            seq: 7,
            first_index: 100,
        });
        roundtrip(Record::Entry(Entry {
            index: 5,
            term: 2,
            kind: EntryKind::Normal,
            data: bytes::Bytes::from_static(b"hello"),
        }));
        roundtrip(Record::HardState(HardState {
            term: 3,
            vote: Some(2),
            commit: 9,
        }));
        roundtrip(Record::SnapshotMark {
            index: 9,
            term: 3,
            keep_suffix: true,
        });
    }

    #[test]
    fn any_flipped_bit_is_detected() {
        let mut buf = Vec::new();
        encode(&Record::HardState(HardState::default()), &mut buf);
        for bit in 0..buf.len() * 8 {
            let mut b = buf.clone();
            b[bit / 8] ^= 1 << (bit % 8);
            assert!(
                !matches!(decode(&b), Decoded::Record(Record::HardState(h), _) if h == HardState::default()),
                "bit {bit} flipped unnoticed"
            );
        }
    }
}
