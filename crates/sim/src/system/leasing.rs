//! Leases in the system: every member runs the production lease clock as the server's loop
//! does, on its own drifting clock, and lease clients (and tests) grant, attach, revoke,
//! keep alive and run sessions through it. A keep-alive is renewed only after a leadership
//! check begun after it arrived, dated from its arrival; what each client was promised is
//! recorded in the lease book, which checks the promises as they are made.

use super::{Call, Event, System, Ticket};
use crate::io::ReadReply;
use crate::leases::{self, Ask, Heard, LeaseClients, Send};
use crate::machine::{Applied, Op};
use crate::network::{Micros, MS};
use kv::lessor::{Millis, Renewal};
use kv::LeaseId;
use raft::{NodeId, Raft, Role};
use rand::Rng;

/// A keep-alive on its way through a member.
pub(super) struct KeepAlive {
    send: Send,
    lease: LeaseId,
    /// When it arrived, on the member's clock.
    received: Millis,
    /// The lease clock's answer once confirmed.
    renewal: Option<Renewal>,
}

/// The client number of a test's requests ([`System::request`]).
const TEST: usize = usize::MAX;

/// Slack on top of TTL + extension for an expired lease's revoke to be proposed, committed
/// and applied once it is due (a tick to notice, a round trip, a disk write).
pub const LAPSE_SLACK: Micros = 200 * MS;

impl System {
    /// The server's `Loop::keep_leases`: tell the lease clock what applied, poll it (it
    /// counts time only while `leading`), and propose what it found as the member's own
    /// writes: revokes of expired leases, checkpoints of long ones.
    pub(super) fn keep_leases(&mut self, id: NodeId) {
        let now = self.now;
        let m = &mut self.members[id as usize - 1];
        let Some(d) = m.driver.as_mut() else {
            return;
        };
        let local = m.clock.millis(now);
        for change in std::mem::take(&mut d.machine_mut().lease_changes) {
            m.lessor.changed(&change, local);
        }
        let work = m.lessor.poll(local, leading(d.raft()), &d.machine().store);
        let mut own: Vec<Op> = work.revoke.into_iter().map(Op::Revoke).collect();
        if !work.checkpoint.is_empty() {
            own.push(Op::Checkpoint(work.checkpoint));
        }
        if own.is_empty() {
            return;
        }
        for op in &own {
            self.note(|| format!("member {id} at local {local} ms proposes {op:?}"));
            self.submit(id, op, Ticket::Own);
        }
        if let Some(d) = self.member(id).driver.as_mut() {
            d.process_ready();
        }
    }

    /// Whether `id`'s lease clock counts time (it leads, as far as it knows, and has applied
    /// an entry of its term).
    pub fn lease_clock_runs(&self, id: NodeId) -> bool {
        self.is_up(id) && self.members[id as usize - 1].lessor.is_primary()
    }

    /// The lease clock's extension for a new leader: an election timeout, the server's rule.
    pub fn lease_extend(&self) -> Millis {
        self.cfg.election_tick * self.cfg.tick / MS
    }

    /// The longest a lease of `ttl` seconds that nobody keeps alive may live once a leader
    /// leads stably from `t` on (or from the lease's last acknowledgement, if later): its
    /// TTL and the extension, on a clock up to [`leases::DRIFT_PPM`] slow, then
    /// [`LAPSE_SLACK`] to revoke it.
    pub fn lapse_bound(&self, ttl: i64) -> Micros {
        let local = (ttl as Micros * 1_000 + self.lease_extend()) * MS;
        local * 1_000_000 / (1_000_000 - leases::DRIFT_PPM as Micros) + LAPSE_SLACK
    }

    /// Start `n` lease clients (they grant their first leases on the next turn).
    pub fn add_lease_clients(&mut self, n: usize) {
        self.leases = LeaseClients::new(n, self.cfg.nodes);
    }

    /// The lease clients send what is due.
    pub fn lease_turn(&mut self) {
        for send in self.leases.turn(self.now, &mut self.lease_rng) {
            self.dispatch(send);
        }
    }

    /// Run for `d`, the lease clients taking a turn every 10 ms.
    pub fn run_with_leases(&mut self, d: Micros) {
        let end = self.now + d;
        while self.now < end {
            self.lease_turn();
            self.run_for((10 * MS).min(end - self.now));
        }
    }

    /// Send `ask` to member `id` as a test's client. Returns the number its answer is
    /// kept under ([`System::heard`]).
    pub fn request(&mut self, id: NodeId, ask: Ask) -> u64 {
        self.test_numbers += 1;
        match ask {
            Ask::Grant(lease, ttl) => self.leases.book.asked_grant(lease, ttl),
            Ask::Revoke(lease) => self.leases.book.asked_revoke(lease),
            _ => {}
        }
        let send = Send {
            client: TEST,
            number: self.test_numbers,
            member: id,
            ask,
            sent: self.now,
        };
        self.dispatch(send);
        send.number
    }

    /// What a test's request heard (its first answer), if anything yet.
    pub fn heard(&self, number: u64) -> Option<&Heard> {
        self.test_answers.get(&number)
    }

    /// What a test's write returned where its entry first applied, if it applied.
    pub fn first_applied(&self, number: u64) -> Option<&Applied> {
        let ticket = self.test_tickets.get(&number)?;
        self.first_applied.get(ticket).map(|(_, a)| a)
    }

    fn dispatch(&mut self, send: Send) {
        let op = match send.ask {
            Ask::KeepAlive(lease) => {
                self.keep_alives.push(KeepAlive {
                    send,
                    lease,
                    received: 0,
                    renewal: None,
                });
                // A client's keep-alive takes a little while to reach its member; a test's
                // arrives at once (a test times it).
                let delay = match send.client {
                    TEST => 0,
                    _ => self.lease_rng.gen_range(0..=5 * MS),
                };
                let at = self.now + delay;
                let k = self.keep_alives.len() - 1;
                return self.schedule(at, Event::KeepAlive(send.member, k));
            }
            Ask::Grant(lease, ttl) => Op::Grant(lease, ttl),
            Ask::Attach(lease, k) => Op::PutLeased(k, k, lease),
            Ask::Revoke(lease) => Op::Revoke(lease),
            Ask::Session(s) => Op::InSession(s, leases::session_key(s.lease), s.seq),
            Ask::Put(k, v) => Op::Put(k, v),
        };
        let ticket = self.ticket(Ticket::Client(send));
        if send.client == TEST {
            self.test_tickets.insert(send.number, ticket);
        }
        self.call(send.member, ticket, Call::Propose(op));
    }

    pub(super) fn client_heard(&mut self, send: Send, heard: Heard) {
        if let (Ask::Session(s), Heard::Applied(Applied::Session(Ok(rev)))) = (send.ask, &heard) {
            if let Err(why) = self.leases.book.session_answered(s.lease, s.seq, *rev) {
                self.fail(&why);
            }
        }
        if send.client != TEST {
            return self.leases.heard(send.client, send.number, heard, self.now);
        }
        if let (Ask::Grant(lease, _), Heard::Applied(Applied::Lease(Ok(_)))) = (send.ask, &heard) {
            self.leases.book.granted(lease, send.sent);
        }
        self.test_answers.entry(send.number).or_insert(heard);
    }

    /// The server's `Loop::renew`: only the lease clock of a member that leads takes a
    /// keep-alive, and it renews only once a ReadIndex round begun after the arrival has
    /// confirmed the leadership — dated from the arrival.
    pub(super) fn keep_alive_arrives(&mut self, id: NodeId, k: usize) {
        let Some(d) = self.driver(id) else {
            return self.keep_alive_heard(k, Heard::Refused(None));
        };
        let m = &self.members[id as usize - 1];
        if !m.lessor.is_primary() {
            let leader = d.raft().leader();
            return self.keep_alive_heard(k, Heard::Refused(leader));
        }
        self.keep_alives[k].received = m.clock.millis(self.now);
        self.probes += 1;
        let io = m.io.clone();
        let ticket = self.ticket(Ticket::KeepAlive(k));
        self.with(id, |d| d.read(0, true, ReadReply(ticket, io)));
    }

    /// Keep-alive `k`'s leadership check passed at `id`: the lease clock answers, and a
    /// renewal of a checkpointed lease clears the checkpoint through the log before the
    /// client is told (as the server's lease service does).
    pub(super) fn confirmed(&mut self, id: NodeId, inc: u64, k: usize) {
        let m = &mut self.members[id as usize - 1];
        let Some(d) = m.driver.as_ref().filter(|_| m.incarnation == inc) else {
            return self.keep_alive_heard(k, Heard::Unknown);
        };
        let (lease, received) = (self.keep_alives[k].lease, self.keep_alives[k].received);
        let renewal = m.lessor.renew(lease, received, &d.machine().store);
        let leader = d.raft().leader();
        let left = m.lessor.remaining(lease, m.clock.millis(self.now));
        let sent = self.keep_alives[k].send.sent / MS;
        self.note(|| {
            format!(
                "member {id}: keep-alive {k} of lease {lease} (sent at {sent} ms, arrived at \
                 local {received} ms): {renewal:?}, {left:?} ms left"
            )
        });
        self.keep_alives[k].renewal = Some(renewal);
        match renewal {
            Renewal::Renewed {
                clear_checkpoint: true,
                ..
            } => {
                let ticket = self.ticket(Ticket::KeepAlive(k));
                self.propose(id, &Op::Checkpoint(vec![(lease, 0)]), ticket);
            }
            Renewal::Renewed { .. } => self.keep_alive_acked(k),
            Renewal::NotLeader => self.keep_alive_heard(k, Heard::Refused(leader)),
            other => self.keep_alive_heard(k, Heard::Renewal(other)),
        }
    }

    /// Keep-alive `k` is acknowledged: its client may count on the lease from its send time.
    pub(super) fn keep_alive_acked(&mut self, k: usize) {
        let ka = &self.keep_alives[k];
        let (send, lease, renewal) = (ka.send, ka.lease, ka.renewal);
        if let Err(why) = self.leases.book.renewed(lease, send.sent, self.now) {
            self.fail(&why);
        }
        let renewal = renewal.expect("an acknowledged keep-alive was renewed");
        self.client_heard(send, Heard::Renewal(renewal));
    }

    pub(super) fn keep_alive_heard(&mut self, k: usize, heard: Heard) {
        let send = self.keep_alives[k].send;
        self.client_heard(send, heard);
    }
}

/// The server's `Loop::leading`: a member's lease clock runs while it leads and has applied
/// an entry of its own term, so that its store holds every lease the cluster granted.
fn leading(r: &Raft) -> bool {
    r.role() == Role::Leader && r.term_at(r.applied()) == Some(r.term())
}
