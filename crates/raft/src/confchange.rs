//! Configuration changes (§6): what an application may ask for, the pure function from the
//! configuration in force to the next one, and the encoding of a configuration entry.
//!
//! Three transitions:
//! - **simple**: at most one voter is added or removed, so every majority of the old
//!   voters overlaps every majority of the new ones and no joint phase is needed
//!   (dissertation §4.1); learners may change freely alongside;
//! - **joint**: enter C_old,new, in which decisions need a majority of both; the leader
//!   leaves it for C_new by itself once it commits (`auto_leave`), or when asked;
//! - **leave**: end a joint configuration.
//!
//! A configuration entry records the change *and* the configuration it establishes, so a
//! node that joins with an empty disk learns the whole configuration from the first entry
//! (or snapshot) it receives, without knowing the bootstrap configuration.

use crate::error::{Error, Result};
use crate::membership::{Membership, Reader};
use crate::types::NodeId;

/// One change to the membership.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Change {
    /// Make `id` a voter (a new node, or a learner promoted).
    AddVoter(NodeId),
    /// Make `id` a learner (a new node, or a voter demoted).
    AddLearner(NodeId),
    /// A learner becomes a voter; refused for a node that is not a learner.
    Promote(NodeId),
    /// `id` leaves the cluster; refused for a node that is not a member.
    Remove(NodeId),
}

impl Change {
    /// The node the change is about.
    pub fn id(&self) -> NodeId {
        match *self {
            Change::AddVoter(id)
            | Change::AddLearner(id)
            | Change::Promote(id)
            | Change::Remove(id) => id,
        }
    }
}

/// How a configuration change moves the cluster from C_old to C_new: directly, when the
/// two cannot disagree on a majority, or through the joint configuration C_old,new.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Transition {
    /// Apply at once; at most one voter may be added or removed.
    Simple,
    /// Enter the joint configuration C_old,new. With `auto_leave` the leader proposes the
    /// move to C_new itself as soon as C_old,new commits; otherwise it waits for a `Leave`.
    Joint {
        /// Leave C_old,new without being asked, as soon as it commits.
        auto_leave: bool,
    },
    /// Leave the joint configuration for C_new; takes no changes.
    Leave,
}

/// A configuration change as proposed: a transition and the changes it makes.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct ConfChange {
    /// Whether the change applies directly, enters a joint configuration or leaves one.
    pub transition: Transition,
    /// The membership changes, applied in order to the voters and learners in force; each
    /// node may appear once. Empty for [`Transition::Leave`].
    pub changes: Vec<Change>,
    /// The application's own bytes, carried in the entry untouched and ignored by the core
    /// (the server puts the new member's peer URLs and the request id here).
    pub context: bytes::Bytes,
}

impl ConfChange {
    /// One change applied directly, without a joint phase. [`apply`] refuses it if it adds or
    /// removes more than one voter (demoting a voter to learner counts as removing it).
    pub fn simple(change: Change) -> Self {
        ConfChange {
            transition: Transition::Simple,
            changes: vec![change],
            context: bytes::Bytes::new(),
        }
    }
    /// Any number of changes, made safely through C_old,new: until it is left, elections and
    /// commitment need a majority of the old voters *and* of the new ones.
    pub fn joint(changes: Vec<Change>, auto_leave: bool) -> Self {
        ConfChange {
            transition: Transition::Joint { auto_leave },
            changes,
            context: bytes::Bytes::new(),
        }
    }
    /// Move from the joint configuration in force to C_new; only needed when the joint
    /// change was proposed without `auto_leave`.
    pub fn leave_joint() -> Self {
        ConfChange {
            transition: Transition::Leave,
            changes: Vec::new(),
            context: bytes::Bytes::new(),
        }
    }

    /// The same change carrying the application's `context`.
    pub fn with_context(mut self, context: impl Into<bytes::Bytes>) -> Self {
        self.context = context.into();
        self
    }
}

/// The configuration that `cc` makes of `current`, or why it is refused. Pure: the same
/// inputs always give the same answer, on every node.
pub fn apply(current: &Membership, cc: &ConfChange) -> Result<Membership> {
    let refuse = |why: String| Err(Error::ConfChangeRefused(why));
    let mut seen = Vec::with_capacity(cc.changes.len());
    for c in &cc.changes {
        if c.id() == 0 {
            return refuse("node id 0 is reserved".into());
        }
        if seen.contains(&c.id()) {
            return refuse(format!("node {} is named twice in one change", c.id()));
        }
        seen.push(c.id());
    }
    let next = match cc.transition {
        Transition::Leave => {
            if !current.is_joint() {
                return refuse("not in a joint configuration, nothing to leave".into());
            }
            if !cc.changes.is_empty() {
                return refuse("leaving a joint configuration takes no changes".into());
            }
            leave(current)
        }
        Transition::Simple | Transition::Joint { .. } if current.is_joint() => {
            return refuse("a joint configuration is in force; leave it first".into());
        }
        Transition::Simple => {
            let next = change_all(current, &cc.changes, false)?;
            let moved = symmetric_difference(current.voters(), next.voters());
            if moved > 1 {
                return refuse(format!(
                    "a simple change may add or remove one voter, this one moves {moved}; \
                     use a joint change"
                ));
            }
            next
        }
        Transition::Joint { auto_leave } => {
            if cc.changes.is_empty() {
                return refuse("entering a joint configuration needs changes".into());
            }
            let mut next = change_all(current, &cc.changes, true)?;
            let (_, outgoing, _, _, al) = next.parts_mut();
            *outgoing = current.voters().to_vec();
            *al = auto_leave;
            next
        }
    };
    if next.voters().is_empty() {
        return refuse("the change would remove every voter".into());
    }
    if next == *current {
        return refuse("the change changes nothing".into());
    }
    next.check()
        .map_err(|e| Error::ConfChangeRefused(e.to_string()))?;
    Ok(next)
}

/// Apply each change to the incoming side. `joint`: voters leaving for the learners wait in
/// `learners_next` (they still vote in C_old).
fn change_all(current: &Membership, changes: &[Change], joint: bool) -> Result<Membership> {
    let mut next = current.clone();
    let outgoing_voters = current.voters().to_vec();
    let (voters, _, learners, learners_next, _) = next.parts_mut();
    for &c in changes {
        let id = c.id();
        match c {
            Change::AddVoter(_) => {
                remove(learners, id);
                remove(learners_next, id);
                insert(voters, id);
            }
            Change::Promote(_) => {
                if !learners.contains(&id) && !learners_next.contains(&id) {
                    return Err(Error::ConfChangeRefused(format!(
                        "node {id} is not a learner and cannot be promoted"
                    )));
                }
                remove(learners, id);
                remove(learners_next, id);
                insert(voters, id);
            }
            Change::AddLearner(_) => {
                remove(voters, id);
                if joint && outgoing_voters.contains(&id) {
                    insert(learners_next, id);
                } else {
                    insert(learners, id);
                }
            }
            Change::Remove(_) => {
                if !current.contains(id) {
                    return Err(Error::ConfChangeRefused(format!(
                        "node {id} is not a member"
                    )));
                }
                remove(voters, id);
                remove(learners, id);
                remove(learners_next, id);
            }
        }
    }
    Ok(next)
}

fn leave(current: &Membership) -> Membership {
    let mut next = current.clone();
    let (_, outgoing, learners, learners_next, auto_leave) = next.parts_mut();
    for id in std::mem::take(learners_next) {
        insert(learners, id);
    }
    outgoing.clear();
    *auto_leave = false;
    next
}

fn insert(ids: &mut Vec<NodeId>, id: NodeId) {
    if let Err(at) = ids.binary_search(&id) {
        ids.insert(at, id);
    }
}

fn remove(ids: &mut Vec<NodeId>, id: NodeId) {
    if let Ok(at) = ids.binary_search(&id) {
        ids.remove(at);
    }
}

fn symmetric_difference(a: &[NodeId], b: &[NodeId]) -> usize {
    a.iter().filter(|id| !b.contains(id)).count() + b.iter().filter(|id| !a.contains(id)).count()
}

/// What a configuration entry carries: the change as proposed and the configuration it
/// establishes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConfEntry {
    /// The change as the application proposed it, context included.
    pub change: ConfChange,
    /// The configuration in force once this entry is in a node's log: [`apply`] of the
    /// change to the configuration before it, computed once by the leader.
    pub membership: Membership,
}

/// Version 2 added the context; version 1 entries (none) still decode.
const CONF_ENTRY_VERSION: u8 = 2;

impl ConfEntry {
    /// Layout (little-endian): version u8; transition u8 (0 simple, 1 joint, 2 joint with
    /// auto-leave, 3 leave); change count u32, each (op u8, id u64); context length u32 and
    /// bytes; then the membership (`Membership::encode_into`) to the end.
    pub fn encode(&self) -> Vec<u8> {
        let mut b = vec![CONF_ENTRY_VERSION];
        b.push(match self.change.transition {
            Transition::Simple => 0,
            Transition::Joint { auto_leave: false } => 1,
            Transition::Joint { auto_leave: true } => 2,
            Transition::Leave => 3,
        });
        b.extend_from_slice(&(self.change.changes.len() as u32).to_le_bytes());
        for c in &self.change.changes {
            b.push(match c {
                Change::AddVoter(_) => 0,
                Change::AddLearner(_) => 1,
                Change::Promote(_) => 2,
                Change::Remove(_) => 3,
            });
            b.extend_from_slice(&c.id().to_le_bytes());
        }
        b.extend_from_slice(&(self.change.context.len() as u32).to_le_bytes());
        b.extend_from_slice(&self.change.context);
        self.membership.encode_into(&mut b);
        b
    }

    /// The inverse of `encode`; refuses anything else, including a configuration that
    /// breaks the membership's invariants.
    pub fn decode(data: &[u8]) -> Result<ConfEntry> {
        let bad = |why: &str| Error::InvalidConfig(format!("configuration entry: {why}"));
        let mut r = Reader(data);
        let version = r.u8()?;
        if version == 0 || version > CONF_ENTRY_VERSION {
            return Err(bad("unknown version"));
        }
        let transition = match r.u8()? {
            0 => Transition::Simple,
            1 => Transition::Joint { auto_leave: false },
            2 => Transition::Joint { auto_leave: true },
            3 => Transition::Leave,
            _ => return Err(bad("unknown transition")),
        };
        let n = r.len(9)?;
        let mut changes = Vec::with_capacity(n);
        for _ in 0..n {
            let op = r.u8()?;
            let id = r.u64()?;
            changes.push(match op {
                0 => Change::AddVoter(id),
                1 => Change::AddLearner(id),
                2 => Change::Promote(id),
                3 => Change::Remove(id),
                _ => return Err(bad("unknown change")),
            });
        }
        let context = if version >= 2 {
            let n = r.len(1)?;
            bytes::Bytes::copy_from_slice(r.take(n)?)
        } else {
            bytes::Bytes::new()
        };
        let membership = Membership::decode(r.rest())?;
        Ok(ConfEntry {
            change: ConfChange {
                transition,
                changes,
                context,
            },
            membership,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use Change::*;

    fn m(voters: &[NodeId], learners: &[NodeId]) -> Membership {
        Membership::from_parts(voters.to_vec(), vec![], learners.to_vec(), vec![], false).unwrap()
    }

    fn refused(r: Result<Membership>) -> String {
        match r {
            Err(Error::ConfChangeRefused(why)) => why,
            other => panic!("expected a refusal, got {other:?}"),
        }
    }

    #[test]
    fn simple_changes_move_at_most_one_voter() {
        let c = m(&[1, 2, 3], &[]);
        let grown = apply(&c, &ConfChange::simple(AddVoter(4))).unwrap();
        assert_eq!(grown.voters(), &[1, 2, 3, 4]);
        let learner = apply(&c, &ConfChange::simple(AddLearner(4))).unwrap();
        assert_eq!(learner.learners(), &[4]);
        let promoted = apply(&learner, &ConfChange::simple(Promote(4))).unwrap();
        assert_eq!(promoted, grown);
        let demoted = apply(&c, &ConfChange::simple(AddLearner(3))).unwrap();
        assert_eq!(
            (demoted.voters(), demoted.learners()),
            (&[1, 2][..], &[3][..])
        );
        let two = ConfChange {
            transition: Transition::Simple,
            changes: vec![AddVoter(4), Remove(1)],
            context: Default::default(),
        };
        assert!(refused(apply(&c, &two)).contains("joint"));
        // Learners move freely alongside one voter.
        let mixed = ConfChange {
            transition: Transition::Simple,
            changes: vec![AddVoter(4), AddLearner(5), AddLearner(6)],
            context: Default::default(),
        };
        assert_eq!(apply(&c, &mixed).unwrap().learners(), &[5, 6]);
    }

    #[test]
    fn unsafe_changes_are_refused_with_a_reason() {
        let c = m(&[1], &[2]);
        assert!(refused(apply(&c, &ConfChange::simple(Remove(1)))).contains("every voter"));
        assert!(refused(apply(&c, &ConfChange::simple(Promote(7)))).contains("not a learner"));
        assert!(refused(apply(&c, &ConfChange::simple(Remove(7)))).contains("not a member"));
        assert!(refused(apply(&c, &ConfChange::simple(AddVoter(0)))).contains("reserved"));
        assert!(refused(apply(&c, &ConfChange::simple(AddVoter(1)))).contains("nothing"));
        assert!(refused(apply(&c, &ConfChange::leave_joint())).contains("not in a joint"));
        let twice = ConfChange::joint(vec![AddVoter(3), Remove(3)], true);
        assert!(refused(apply(&c, &twice)).contains("twice"));
        let joint = apply(&c, &ConfChange::joint(vec![AddVoter(3)], false)).unwrap();
        assert!(
            refused(apply(&joint, &ConfChange::joint(vec![AddVoter(4)], false)))
                .contains("leave it first")
        );
        assert!(refused(apply(&joint, &ConfChange::simple(AddVoter(4)))).contains("leave it"));
        let empty = ConfChange::joint(vec![], false);
        assert!(refused(apply(&c, &empty)).contains("needs changes"));
    }

    #[test]
    fn a_joint_change_keeps_the_old_voters_until_it_is_left() {
        let c = m(&[1, 2, 3], &[]);
        // Swap 2 and 3 for 4 and 5, and keep 3 as a learner.
        let cc = ConfChange::joint(
            vec![AddVoter(4), AddVoter(5), Remove(2), AddLearner(3)],
            true,
        );
        let joint = apply(&c, &cc).unwrap();
        assert_eq!(joint.voters(), &[1, 4, 5]);
        assert_eq!(joint.outgoing(), &[1, 2, 3]);
        assert_eq!(joint.learners_next(), &[3], "3 still votes in C_old");
        assert!(joint.learners().is_empty() && joint.auto_leave());
        assert!(joint.is_voter(2) && joint.is_voter(3) && joint.is_voter(4));
        let left = apply(&joint, &ConfChange::leave_joint()).unwrap();
        assert_eq!(left, m(&[1, 4, 5], &[3]));
        assert!(!left.is_voter(2) && !left.contains(2));
    }

    #[test]
    fn configuration_entries_round_trip_and_garbage_is_refused() {
        let c = m(&[1, 2, 3], &[9]);
        let cc = ConfChange::joint(vec![AddVoter(4), AddLearner(3), Remove(9)], true)
            .with_context(&b"peer urls"[..]);
        let e = ConfEntry {
            membership: apply(&c, &cc).unwrap(),
            change: cc,
        };
        let bytes = e.encode();
        assert_eq!(ConfEntry::decode(&bytes).unwrap(), e);
        for cut in 0..bytes.len() {
            assert!(ConfEntry::decode(&bytes[..cut]).is_err(), "cut at {cut}");
        }
        let mut trailing = bytes.clone();
        trailing.push(0);
        assert!(ConfEntry::decode(&trailing).is_err());
        // Every single-byte corruption either decodes to a valid configuration or is
        // refused; none panics.
        for i in 0..bytes.len() {
            for bit in 0..8 {
                let mut b = bytes.clone();
                b[i] ^= 1 << bit;
                if let Ok(d) = ConfEntry::decode(&b) {
                    d.membership.check().unwrap();
                }
            }
        }
        let mut huge = vec![CONF_ENTRY_VERSION, 0];
        huge.extend_from_slice(&u32::MAX.to_le_bytes());
        assert!(ConfEntry::decode(&huge).is_err());
        let mut huge_context = vec![CONF_ENTRY_VERSION, 0, 0, 0, 0, 0];
        huge_context.extend_from_slice(&u32::MAX.to_le_bytes());
        assert!(ConfEntry::decode(&huge_context).is_err());
        // Version 1 entries (written before the context existed) still decode.
        let mut v1 = vec![1, 0];
        v1.extend_from_slice(&1u32.to_le_bytes());
        v1.push(0);
        v1.extend_from_slice(&4u64.to_le_bytes());
        m(&[1, 2, 3, 4], &[]).encode_into(&mut v1);
        let old = ConfEntry::decode(&v1).unwrap();
        assert_eq!(old.change, ConfChange::simple(AddVoter(4)));
        assert_eq!(old.membership.voters(), &[1, 2, 3, 4]);
    }
}
