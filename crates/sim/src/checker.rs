//! Raft's safety properties (Figure 3), checked as the simulation runs. Each check is
//! incremental, so they can run after every event.

use raft::{Entry, EntryKind, Index, NodeId, Raft, Role, Term};
use std::collections::hash_map::DefaultHasher;
use std::collections::HashMap;
use std::hash::{Hash, Hasher};

#[derive(Debug, Default)]
pub struct Checker {
    /// Election Safety: the one leader of each term.
    leaders: HashMap<Term, NodeId>,
    /// Log Matching, by induction: an (index, term) pair determines both the entry and the
    /// term of the entry before it, so two logs that share a pair share the whole prefix.
    entries: HashMap<(Index, Term), (Term, u64)>,
    /// State Machine Safety: what was applied at each index, by any node, ever.
    applied: Vec<(Term, u64)>,
    /// For each index: (term of the leader that first committed it, the entry's term).
    /// Leader Completeness binds leaders of terms after the commit term.
    commits: Vec<(Term, Term)>,
    /// Every command applied, in index order: what any snapshot must contain a prefix of.
    history: Vec<(Index, u64)>,
    /// Leader Append-Only: (term, last index, last term) of each node last seen leading.
    leader_tail: HashMap<NodeId, (Term, Index, Term)>,
    pub violations_checked: u64,
}

pub type Violation = String;

fn digest(e: &Entry) -> u64 {
    let mut h = DefaultHasher::new();
    e.kind.hash(&mut h);
    e.data.hash(&mut h);
    h.finish()
}

impl Checker {
    /// `entries` were just appended to `node`'s log, after an entry of `prev_term`.
    pub fn on_append(
        &mut self,
        node: NodeId,
        prev_term: Term,
        entries: &[Entry],
    ) -> Result<(), Violation> {
        let mut prev = prev_term;
        for e in entries {
            let seen = *self
                .entries
                .entry((e.index, e.term))
                .or_insert((prev, digest(e)));
            self.violations_checked += 1;
            if seen != (prev, digest(e)) {
                return Err(format!(
                    "log matching: node {node} holds a different entry at index {} term {} \
                     (or a different predecessor term {prev} vs {})",
                    e.index, e.term, seen.0
                ));
            }
            prev = e.term;
        }
        Ok(())
    }

    /// `node` applied `e`. Every node must apply the same entry at each index.
    pub fn on_apply(&mut self, node: NodeId, e: &Entry) -> Result<(), Violation> {
        let i = e.index as usize;
        self.violations_checked += 1;
        if i <= self.applied.len() {
            let (term, d) = self.applied[i - 1];
            if (term, d) != (e.term, digest(e)) {
                return Err(format!(
                    "state machine safety: node {node} applied term {} at index {i}, \
                     another node applied term {term} there",
                    e.term
                ));
            }
            return Ok(());
        }
        if i != self.applied.len() + 1 {
            return Err(format!(
                "node {node} applied index {i} before index {}",
                self.applied.len() + 1
            ));
        }
        self.applied.push((e.term, digest(e)));
        if e.kind == EntryKind::Normal {
            self.history
                .push((e.index, crate::node::command_id(&e.data)));
        }
        Ok(())
    }

    /// `node` installed a snapshot holding `commands`: it must be exactly the committed
    /// history up to the snapshot's index.
    pub fn on_snapshot(
        &mut self,
        node: NodeId,
        index: Index,
        commands: &[(Index, u64)],
    ) -> Result<(), Violation> {
        self.violations_checked += 1;
        if index > self.applied.len() as Index {
            return Err(format!(
                "node {node} installed a snapshot at {index}, past anything committed ({})",
                self.applied.len()
            ));
        }
        let n = self.history.partition_point(|&(i, _)| i <= index);
        if commands != &self.history[..n] {
            return Err(format!(
                "state machine safety: node {node}'s snapshot at {index} differs from the committed history"
            ));
        }
        Ok(())
    }

    /// The highest index known committed anywhere (it was applied by some node).
    pub fn committed(&self) -> (Index, Term) {
        let i = self.applied.len();
        (i as Index, self.applied.last().map_or(0, |a| a.0))
    }

    /// How many terms have had a leader so far.
    pub fn terms_with_leader(&self) -> usize {
        self.leaders.len()
    }

    /// Called after `raft` handled an event: the leader-related properties.
    pub fn on_state(&mut self, raft: &Raft) -> Result<(), Violation> {
        let id = raft.id();
        if raft.role() != Role::Leader {
            self.leader_tail.remove(&id);
            return Ok(());
        }
        let term = raft.term();
        self.violations_checked += 1;
        match self.leaders.get(&term) {
            Some(&other) if other != id => {
                return Err(format!(
                    "election safety: nodes {other} and {id} both lead term {term}"
                ))
            }
            Some(_) => {}
            None => {
                self.leaders.insert(term, id);
                self.check_completeness(raft)?;
            }
        }
        self.record_commits(raft);
        let (last, last_term) = (
            raft.last_index(),
            raft.term_at(raft.last_index()).unwrap_or(0),
        );
        if let Some(&(t, old_last, old_term)) = self.leader_tail.get(&id) {
            let compacted = old_last <= raft.snapshot_index();
            if t == term
                && !compacted
                && (last < old_last || raft.term_at(old_last) != Some(old_term))
            {
                return Err(format!(
                    "leader append-only: leader {id} of term {term} lost or changed entry {old_last}"
                ));
            }
        }
        self.leader_tail.insert(id, (term, last, last_term));
        Ok(())
    }

    /// Leader Completeness (§5.4): an entry committed in term T is in the log of every
    /// leader of a term after T. By log matching it is enough to check the highest such
    /// entry. (A leader of an older term can still be elected late, from delayed votes; it
    /// is bound only by what was committed before its term.)
    fn check_completeness(&self, raft: &Raft) -> Result<(), Violation> {
        let term = raft.term();
        let k = self
            .commits
            .partition_point(|&(committed_in, _)| committed_in < term);
        let index = k as Index;
        if index <= raft.snapshot_index() {
            return Ok(()); // covered by its snapshot, which held only committed state
        }
        let entry_term = self.commits[k - 1].1;
        if raft.term_at(index) != Some(entry_term) {
            return Err(format!(
                "leader completeness: node {} leads term {term} without entry {index} \
                 (term {entry_term}) committed in an earlier term",
                raft.id()
            ));
        }
        Ok(())
    }

    /// A leader's commit index advanced: note in which term each index was committed.
    fn record_commits(&mut self, raft: &Raft) {
        for index in self.commits.len() as Index + 1..=raft.commit_index() {
            let Some(entry_term) = raft.term_at(index) else {
                return;
            };
            self.commits.push((raft.term(), entry_term));
        }
    }
}
