//! Input validation at the core's entry point. Every message is checked here before any role
//! acts on it, so the rest of the core may rely on the shapes the protocol promises: an
//! `Append`'s entries follow `prev_index` one by one with terms that never fall and never
//! exceed the sender's term, a snapshot chunk lies inside its snapshot, and so on.
//!
//! A message that fails is refused with [`Error::InvalidMessage`] and counted; it never
//! reaches the log, whose slicing assumes these shapes. A correct peer never sends one, so a
//! refusal means a bug, corruption on the wire that slipped past the transport's checks, or
//! a hostile sender.

use crate::confchange::ConfEntry;
use crate::error::{Error, Result};
use crate::message::{Body, Message};
use crate::types::{EntryKind, Index, Term};

/// Terms grow by one per election; no cluster gets near this. A term above it is forged or
/// corrupt, and adopting it would leave no room to campaign (`term + 1` would overflow).
pub(crate) const MAX_TERM: Term = 1 << 62;

/// Check `m`'s body against the protocol's rules.
pub(crate) fn check(m: &Message) -> Result<()> {
    if m.from == 0 || m.from == m.to {
        return bad("a message from nobody, or from the receiver itself");
    }
    if m.term > MAX_TERM {
        return bad("a term beyond any a cluster can reach");
    }
    match &m.body {
        Body::Append {
            prev_index,
            prev_term,
            entries,
            ..
        } => check_append(m.term, *prev_index, *prev_term, entries),
        Body::AppendResponse {
            reject: true,
            hint: Some(h),
            ..
        } if h.first_index == 0 => bad("a conflict hint names index 0"),
        Body::Vote { last_term, .. } if *last_term > m.term => {
            bad("a candidate's last log term is above the term it campaigns in")
        }
        Body::InstallSnapshot {
            meta,
            offset,
            total,
            data,
        } => {
            let end = offset.checked_add(data.len() as u64);
            if end.is_none_or(|end| end > *total) {
                return bad("a snapshot chunk lies outside its snapshot");
            }
            // Found by the fuzzer once snapshots of any membership were accepted: an index
            // of u64::MAX overflowed the log's `index + 1`. No log gets near 2^62 entries.
            if meta.index == 0 || meta.index > MAX_TERM || meta.term == 0 || meta.term > m.term {
                return bad("a snapshot's index or term is impossible");
            }
            if meta.membership.voters().is_empty() || meta.membership.check().is_err() {
                return bad("a snapshot's configuration is impossible");
            }
            Ok(())
        }
        Body::SnapshotResponse { index: 0, .. } => bad("a snapshot response for index 0"),
        _ => Ok(()),
    }
}

/// Entries must run contiguously from `prev_index + 1`, with terms never below the entry
/// before them (`prev_term` for the first) and never above the leader's term.
fn check_append(
    term: Term,
    prev_index: Index,
    prev_term: Term,
    entries: &[crate::types::Entry],
) -> Result<()> {
    // Index 0 is the empty prefix, of term 0; every real entry has a term of at least 1.
    if prev_term > term || (prev_index == 0) != (prev_term == 0) {
        return bad("an append's previous term is impossible");
    }
    let mut want_index = prev_index;
    let mut floor = prev_term;
    for e in entries {
        want_index = match want_index.checked_add(1) {
            Some(i) if i == e.index => i,
            _ => return bad("an append's entries do not follow prev_index one by one"),
        };
        if e.term < floor || e.term > term || e.term == 0 {
            return bad("an append's entry terms fall, or exceed the leader's term");
        }
        let conf = || ConfEntry::decode(&e.data);
        if e.kind == EntryKind::ConfChange
            && conf().map_or(true, |c| c.membership.voters().is_empty())
        {
            return bad("a configuration entry does not decode to a configuration");
        }
        floor = e.term;
    }
    Ok(())
}

fn bad(why: &'static str) -> Result<()> {
    Err(Error::InvalidMessage(why))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::membership::Membership;
    use crate::types::{Entry, EntryKind, NodeId, SnapshotMeta};

    fn append(term: Term, prev: (Index, Term), entries: &[(Index, Term)]) -> Message {
        let entries = entries
            .iter()
            .map(|&(index, term)| Entry {
                index,
                term,
                kind: EntryKind::Normal,
                data: Default::default(),
            })
            .collect();
        Message {
            from: 2,
            to: 1,
            term,
            body: Body::Append {
                prev_index: prev.0,
                prev_term: prev.1,
                entries,
                commit: 0,
            },
        }
    }

    #[test]
    fn appends_with_gaps_or_falling_terms_are_refused() {
        assert!(check(&append(3, (1, 1), &[(2, 1), (3, 3)])).is_ok());
        assert!(check(&append(1, (0, 0), &[])).is_ok());
        // The example: (2,1),(5,1) after prev 1.
        assert!(check(&append(1, (1, 1), &[(2, 1), (5, 1)])).is_err());
        assert!(check(&append(1, (1, 1), &[(1, 1)])).is_err());
        assert!(check(&append(3, (1, 2), &[(2, 1)])).is_err());
        assert!(check(&append(2, (1, 1), &[(2, 3)])).is_err());
        assert!(check(&append(1, (0, 1), &[])).is_err());
        assert!(check(&append(5, (u64::MAX, 1), &[(0, 1)])).is_err());
        // Found by the fuzzer: adopting term u64::MAX made the next campaign overflow.
        assert!(check(&append(u64::MAX, (0, 0), &[])).is_err());
        assert!(check(&append(MAX_TERM, (0, 0), &[])).is_ok());
    }

    #[test]
    fn snapshot_chunks_must_lie_inside_their_snapshot() {
        let chunk = |offset: u64, total: u64, voters: Vec<NodeId>| Message {
            from: 2,
            to: 1,
            term: 2,
            body: Body::InstallSnapshot {
                meta: SnapshotMeta {
                    index: 5,
                    term: 2,
                    membership: Membership::new(voters),
                },
                offset,
                total,
                data: vec![0; 10].into(),
            },
        };
        assert!(check(&chunk(0, 10, vec![3, 2, 1])).is_ok());
        assert!(check(&chunk(1, 10, vec![1, 2, 3])).is_err());
        assert!(check(&chunk(u64::MAX, u64::MAX, vec![1, 2, 3])).is_err());
        assert!(
            check(&chunk(0, 10, vec![])).is_err(),
            "a snapshot with no voters"
        );
        assert!(check(&chunk(0, 10, vec![0, 2])).is_err(), "node id 0");
    }
}
