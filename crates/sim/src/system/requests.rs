//! Clients' requests into the members' drivers, and their answers. Every request carries a
//! ticket saying who waits for its reply (an operation of the checked history, a lease
//! client, a keep-alive, or the member itself), and answers are routed back by it. A
//! request id a driver assigns must never be given twice (an entry with a reused id would
//! answer the wrong client), which is checked as it is proposed. An entry's first apply on
//! any member is when its write took effect, whatever its client heard.

use super::{Call, Event, System, Ticket};
use crate::io::{ReadReply, WriteReply};
use crate::leases::{Ask, Heard};
use crate::linearizability::{Input, Operation, Output};
use crate::machine::{encode, Applied, Op};
use crate::network::{Micros, MS};
use driver::{Outcome, Refusal};
use kv::LeaseResponse;
use raft::NodeId;

/// A client waits this long for an answer, then gives up: the operation's outcome is then
/// unknown to it (as with etcd clients' request timeouts).
pub const CLIENT_TIMEOUT: Micros = 1_000 * MS;

impl System {
    fn answered(&mut self, op: usize, r: Result<Output, Refusal>) {
        let now = self.now;
        let o = &mut self.history[op];
        if now > o.call + CLIENT_TIMEOUT {
            return; // the client gave up before the answer came: it never saw it
        }
        match r {
            Ok(out) => {
                o.ret = Some(now);
                o.output = out;
            }
            // Refused before it was proposed or read: it certainly did not happen.
            Err(
                Refusal::NoLeader
                | Refusal::TooManyRequests
                | Refusal::TooLarge
                | Refusal::ConfChange(_),
            ) => {
                o.ret = Some(now);
                self.refused[op] = true;
            }
            // It may still commit: the outcome stays unknown.
            Err(Refusal::LeaderChanged | Refusal::Stopped) => {}
        }
    }

    /// A client sends `input` to member `id`, through the driver as the server would.
    /// Returns the operation's number in `history`.
    pub fn invoke(&mut self, id: NodeId, client: u64, key: u64, input: Input) -> usize {
        let op = self.history.len();
        self.history.push(Operation {
            client,
            key,
            input: input.clone(),
            call: self.now,
            ret: None,
            output: Output::Ok,
        });
        self.refused.push(false);
        let ticket = self.ticket(Ticket::Checked(op));
        self.history_ticket.push(ticket);
        let call = match input {
            Input::Get => Call::Read(key),
            Input::Put(v) => Call::Propose(Op::Put(key, v)),
            Input::Delete => Call::Propose(Op::Delete(key)),
            Input::Cas { expect, new } => Call::Propose(Op::Cas(key, expect, new)),
        };
        self.call(id, ticket, call);
        op
    }

    /// What operation `op` returned: `None` while unknown, or if it was refused.
    pub fn outcome(&self, op: usize) -> Option<&Output> {
        let o = &self.history[op];
        (o.ret.is_some() && !self.refused[op]).then_some(&o.output)
    }

    pub(super) fn ticket(&mut self, t: Ticket) -> usize {
        self.tickets.push(t);
        self.tickets.len() - 1
    }

    /// Hand a client's request to member `id`'s driver: at once, or when it runs again if
    /// it is paused; refused if it is down.
    pub(super) fn call(&mut self, id: NodeId, ticket: usize, call: Call) {
        if !self.is_up(id) {
            return self.unreachable(ticket);
        }
        let until = self.members[id as usize - 1].paused_until;
        if self.now < until {
            return self.schedule(until, Event::Call(id, ticket, call));
        }
        let io = self.members[id as usize - 1].io.clone();
        match call {
            Call::Read(key) => self.with(id, |d| d.read(key, true, ReadReply(ticket, io))),
            Call::Propose(op) => self.propose(id, &op, ticket),
        }
    }

    /// A request whose member is down: certainly not carried out.
    fn unreachable(&mut self, ticket: usize) {
        match self.tickets[ticket] {
            Ticket::Checked(op) => {
                self.history[op].ret = Some(self.now);
                self.refused[op] = true;
            }
            Ticket::Client(send) => self.client_heard(send, Heard::Refused(None)),
            Ticket::KeepAlive(k) => self.keep_alive_heard(k, Heard::Refused(None)),
            Ticket::Own => {}
        }
    }

    pub(super) fn propose(&mut self, id: NodeId, op: &Op, ticket: usize) {
        self.submit_ticket(id, op, ticket);
        self.with(id, |_| ());
    }

    /// Propose `op` at `id` for a new ticket, without running the member's loop yet.
    pub(super) fn submit(&mut self, id: NodeId, op: &Op, t: Ticket) {
        let ticket = self.ticket(t);
        self.submit_ticket(id, op, ticket);
    }

    fn submit_ticket(&mut self, id: NodeId, op: &Op, ticket: usize) {
        let io = self.members[id as usize - 1].io.clone();
        let mut assigned = None;
        let d = self.member(id).driver.as_mut().expect("member is up");
        d.propose(
            |rid| {
                assigned = Some(rid);
                encode(rid, op)
            },
            WriteReply(ticket, io),
        );
        if let Some(rid) = assigned {
            // Ids must be unique across members and lives: an entry carrying a reused id
            // would answer the wrong client when it applies (issue 9, defect 2).
            if let Some(earlier) = self.proposed.insert(rid, ticket) {
                self.fail(&format!(
                    "request id {rid:?} was given to request {earlier} and again to {ticket}"
                ));
            }
        }
    }

    /// A write's answer reached member `id`'s reply handle.
    pub(super) fn write_answered(&mut self, id: NodeId, ticket: usize, r: Outcome<Applied>) {
        match self.tickets[ticket] {
            Ticket::Checked(op) => {
                let r = r.map(|a| match a.value {
                    Applied::Kv(out) => out,
                    other => self.fail(&format!("operation {op} answered {other:?}")),
                });
                self.answered(op, r);
            }
            Ticket::Client(send) => {
                let heard = match r {
                    Ok(a) => Heard::Applied(a.value),
                    Err(why) => self.refusal(id, &why),
                };
                self.client_heard(send, heard);
            }
            // The clear of a renewed lease's checkpoint: the keep-alive is answered now.
            Ticket::KeepAlive(k) => match r {
                Ok(a) if matches!(a.value, Applied::Lease(Ok(_))) => self.keep_alive_acked(k),
                Ok(_) => self.keep_alive_heard(k, Heard::Unknown),
                Err(why) => {
                    let heard = self.refusal(id, &why);
                    self.keep_alive_heard(k, heard);
                }
            },
            Ticket::Own => {}
        }
    }

    pub(super) fn read_answered(&mut self, id: NodeId, ticket: usize, r: Outcome<Option<u64>>) {
        match self.tickets[ticket] {
            Ticket::Checked(op) => self.answered(op, r.map(|a| Output::Value(a.value))),
            // A keep-alive's leadership check passed: back to the member's loop.
            Ticket::KeepAlive(k) => match r {
                Ok(_) => {
                    let inc = self.members[id as usize - 1].incarnation;
                    self.schedule(self.now, Event::Confirmed(id, inc, k));
                }
                Err(why) => {
                    let heard = self.refusal(id, &why);
                    self.keep_alive_heard(k, heard);
                }
            },
            other => self.fail(&format!("a read answered {other:?}")),
        }
    }

    /// What a client makes of a refusal from member `id`.
    fn refusal(&self, id: NodeId, why: &Refusal) -> Heard {
        match why {
            Refusal::LeaderChanged | Refusal::Stopped => Heard::Unknown,
            _ => Heard::Refused(self.driver(id).and_then(|d| d.raft().leader())),
        }
    }

    /// The first apply anywhere of a ticket's entry: a revoke ends its lease then.
    pub(super) fn first_apply(&mut self, ticket: usize, output: &Applied) {
        if let Applied::Lease(_) = output {
            let t = self.tickets[ticket];
            self.note(|| format!("first applied: {output:?} ({t:?})"));
        }
        if let (Ticket::Client(send), Applied::Session(Ok(_))) = (self.tickets[ticket], output) {
            if let Ask::Session(s) = send.ask {
                // A later request with the same number was answered from the session's
                // memory (that it did not run again, `check_sessions` checks).
                let first = *self.session_first.entry((s.lease, s.seq)).or_insert(ticket);
                self.session_dedups += u64::from(first != ticket);
            }
        }
        if let Applied::Lease(Ok(LeaseResponse::Revoked { id, .. })) = output {
            let expiry = matches!(self.tickets[ticket], Ticket::Own);
            if let Err(why) = self.leases.book.revoked(*id, self.now, expiry) {
                self.fail(&why);
            }
        }
    }
}
