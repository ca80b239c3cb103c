//! What a client does with the cluster: propose commands (straight to a core, or
//! forwarded by a follower), issue linearizable reads through a node's driver, and — the
//! paper's client loop — submit a command to whoever leads until enough nodes applied it.

use super::Cluster;
use crate::io::ReadReply;
use crate::network::MS;
use driver::Refusal;
use raft::{Error, Index, NodeId};

impl Cluster {
    /// Propose at `id` straight to the core (as a library user would), then let the driver
    /// carry out the result.
    pub fn propose(&mut self, id: NodeId, data: bytes::Bytes) -> Result<Index, Error> {
        if !self.is_up(id) {
            return Err(Error::NotLeader { leader: None });
        }
        self.with(id, |d| d.raft_mut().propose(data))
    }

    /// Propose at `id` wherever it stands: a follower forwards to its leader.
    pub fn propose_or_forward(
        &mut self,
        id: NodeId,
        data: bytes::Bytes,
    ) -> Result<raft::Proposal, Error> {
        let mut results = self.propose_all_or_forward(id, vec![data]);
        results.pop().expect("one result per command")
    }

    /// Several commands arriving at `id` together (one `ready` for all of them).
    pub fn propose_all_or_forward(
        &mut self,
        id: NodeId,
        data: Vec<bytes::Bytes>,
    ) -> Vec<Result<raft::Proposal, Error>> {
        if !self.is_up(id) {
            return vec![Err(Error::NoLeader); data.len()];
        }
        self.with(id, |d| {
            data.into_iter()
                .map(|x| d.raft_mut().propose_or_forward(x))
                .collect()
        })
    }

    /// Issue a linearizable read at `id` through the driver, as a server's client would;
    /// returns a number naming it in `reads`. The read is checked when served.
    pub fn read_index(&mut self, id: NodeId) -> Result<u64, Error> {
        self.next_ctx += 1;
        let ctx = self.next_ctx;
        if !self.is_up(id) {
            return Err(Error::NoLeader);
        }
        self.pending_reads.insert(ctx, self.max_acked);
        let io = self.node(id).io.clone();
        let d = self.node_mut(id).driver.as_mut().unwrap();
        d.read((), true, ReadReply(ctx as usize, io.clone()));
        // Refused at once (no leader, too many reads): say so, as the core's API did.
        let refused = {
            let mut out = io.borrow_mut();
            let at = out
                .reads
                .iter()
                .position(|(c, r)| *c == ctx as usize && r.is_err());
            at.map(|i| out.reads.remove(i).1)
        };
        if let Some(Err(why)) = refused {
            self.pending_reads.remove(&ctx);
            self.with(id, |_| ());
            return Err(match why {
                Refusal::TooManyRequests => Error::ReadQueueFull,
                _ => Error::NoLeader,
            });
        }
        self.with(id, |_| ());
        Ok(ctx)
    }

    /// How many live nodes have applied command `cmd`.
    pub fn applied_count(&self, cmd: u64) -> usize {
        self.nodes
            .iter()
            .filter(|n| {
                n.register()
                    .is_some_and(|r| r.applied.iter().rev().any(|&(_, c)| c == cmd))
            })
            .count()
    }

    /// Submit `cmd` to whichever node leads and wait until `expected` nodes applied it (0:
    /// every member of the stable leader's configuration), retrying on other leaders for up
    /// to 10 virtual seconds (the paper's client loop).
    pub fn one(&mut self, cmd: u64, size: usize, expected: usize) -> Index {
        let deadline = self.now + 10_000 * MS;
        while self.now < deadline {
            let leaders: Vec<NodeId> = self
                .ids()
                .into_iter()
                .filter(|&id| self.is_up(id) && self.node(id).raft().is_leader())
                .collect();
            for id in leaders {
                if self.propose(id, crate::node::command(cmd, size)).is_ok() {
                    // 0: every member of the stable leader's configuration, as it is then.
                    let want = |c: &Cluster| match expected {
                        0 => c.membership().map_or(usize::MAX, |m| m.ids().count()),
                        n => n,
                    };
                    let ok = self.run_until(2_000 * MS, |c| c.applied_count(cmd) >= want(c));
                    if ok {
                        return self.acked[&cmd];
                    }
                }
            }
            self.run_for(50 * MS);
        }
        self.fail(&format!(
            "command {cmd} was not applied by {expected} nodes in time"
        ))
    }
}
