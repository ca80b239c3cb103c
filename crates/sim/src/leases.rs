//! Leases and sessions in the whole-system simulation: the members' drifting clocks, the
//! lease clients, and the book their promises are checked against.
//!
//! Every member runs the production lease clock ([`kv::lessor::Lessor`]) as the server
//! does (see `System::keep_leases`), reading its own clock: zero at boot, running at a
//! rate within [`DRIFT_PPM`] of true time. Lease clients grant leases of 1–3 s (the
//! election timeout is 300–600 ms), attach keys to them, and either keep them alive —
//! a keep-alive every TTL/3 to the member they believe leads, moving on when it refuses —
//! or let them lapse, or revoke them. Some use their lease as a session: numbered puts of
//! a counter key, each retried with the same number until it is answered.
//!
//! What the book checks ([`Book`]):
//! - **A lease kept alive is never revoked.** A client counts on its lease for
//!   `TTL·(1 − DRIFT)` from the send time of its grant or of any keep-alive that was
//!   acknowledged (the shortest a TTL can last on a member's clock is `TTL/(1 + DRIFT)`,
//!   which is longer). A revoke that the lease clock proposed (an expiry) must not take
//!   effect — first apply anywhere — before that. A lease whose client asked to revoke it
//!   promises nothing more.
//! - **Each numbered command of a session answers one way**: every answer to the same
//!   number carries the same revision (that it ran once is checked on the store's history
//!   at the end, `System::check_sessions`).

use crate::machine::Applied;
use crate::network::{Micros, MS};
use kv::lessor::{Millis, Renewal};
use kv::{LeaseId, Revision, Session};
use raft::NodeId;
use rand::Rng;
use std::collections::BTreeMap;

/// The bound on every member's clock rate: within ±2% of true time (20,000 parts per
/// million), the rate chosen per member from the seed.
pub const DRIFT_PPM: i64 = 20_000;

/// Keys attached to leases, and sessions' counter keys, live above the checked history's.
pub const LEASED_KEYS: u64 = 1 << 40;
pub const SESSION_KEYS: u64 = 2 << 40;

/// The longest TTL a client asks for, in seconds.
pub const MAX_TTL: i64 = 3;

/// The `j`th key attached to lease `id`.
pub fn leased_key(id: LeaseId, j: u64) -> u64 {
    LEASED_KEYS + id as u64 * 4 + j
}

/// The counter key of the session living in lease `id`.
pub fn session_key(id: LeaseId) -> u64 {
    SESSION_KEYS + id as u64
}

/// A member's monotonic clock, as its lease clock reads it: zero when the member boots
/// (as the server's `Instant` is), then running `ppm` parts per million fast or slow.
#[derive(Clone, Copy, Debug, Default)]
pub struct Clock {
    pub boot: Micros,
    pub ppm: i64,
}

impl Clock {
    pub fn millis(&self, now: Micros) -> Millis {
        let elapsed = i128::from(now.saturating_sub(self.boot));
        (elapsed * i128::from(1_000_000 + self.ppm) / 1_000_000_000) as Millis
    }
}

/// A member's clock rate: often at either end of the bound (where drift bites), else
/// anywhere within it.
pub fn drift(rng: &mut impl Rng) -> i64 {
    match rng.gen_range(0..3) {
        0 => -DRIFT_PPM,
        1 => DRIFT_PPM,
        _ => rng.gen_range(-DRIFT_PPM..=DRIFT_PPM),
    }
}

/// How long a client may count on a lease of `ttl` seconds from the send time of its
/// grant or acknowledged keep-alive: `TTL·(1 − DRIFT)`.
pub fn promised(ttl: i64) -> Micros {
    let ttl = ttl.max(0) as u64 * 1_000 * MS;
    ttl * (1_000_000 - DRIFT_PPM as u64) / 1_000_000
}

/// What a lease client asks of a member.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ask {
    /// A lease with this id and TTL (seconds).
    Grant(LeaseId, i64),
    /// Put a key attached to the lease.
    Attach(LeaseId, u64),
    Revoke(LeaseId),
    KeepAlive(LeaseId),
    /// The session's numbered put of its counter key (the number as the value).
    Session(Session),
    /// A plain put (tests: the same command without a session).
    Put(u64, u64),
}

/// What a client heard back.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Heard {
    /// The command applied at the member asked, with this answer.
    Applied(Applied),
    /// A keep-alive's answer from the member's lease clock.
    Renewal(Renewal),
    /// Certainly not carried out; the member named the leader it knows, if any.
    Refused(Option<NodeId>),
    /// It may or may not have been carried out.
    Unknown,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// Keeps each lease alive a while, then lets it lapse.
    Keeper,
    /// Lets each lease lapse at once.
    Lapser,
    /// Keeps each lease alive a while, then revokes it.
    Revoker,
    /// Keeps each lease alive a while and runs numbered puts in it.
    Sessions,
}

/// A lease a client holds.
#[derive(Clone, Debug)]
struct Held {
    id: LeaseId,
    ttl: i64,
    /// Keep-alives until then (true time).
    keep_until: Micros,
    next_keep_alive: Micros,
    /// Keys still to attach.
    keys_left: u64,
    /// The session's next number.
    seq: u64,
}

#[derive(Clone, Debug)]
pub struct Client {
    pub role: Role,
    /// The member it believes leads.
    member: NodeId,
    held: Option<Held>,
    /// Its request in flight (keep-alives aside): number, send time, what.
    req: Option<(u64, Micros, Ask)>,
    /// Its keep-alive in flight: number, send time.
    keep_alive: Option<(u64, Micros)>,
    numbers: u64,
    /// It sends nothing new before this (a pause between leases, or before a retry).
    wait_until: Micros,
    /// Every lease id it was granted (acknowledged).
    pub granted: Vec<LeaseId>,
    /// A test's client: one lease, with this TTL and keep-alive span (else drawn per lease).
    fixed: Option<(i64, Micros)>,
    /// For the lease being granted: how long to keep it alive, how many keys to attach.
    plan: (Micros, u64),
}

/// A request a client sends: who, its number, to which member, what.
#[derive(Clone, Copy, Debug)]
pub struct Send {
    pub client: usize,
    pub number: u64,
    pub member: NodeId,
    pub ask: Ask,
    /// When it was sent (true time).
    pub sent: Micros,
}

#[derive(Default)]
pub struct LeaseClients {
    pub clients: Vec<Client>,
    pub book: Book,
    members: usize,
    /// Clients grant no new lease (the end of a run).
    closing: bool,
    /// Clients send nothing any more.
    stopped: bool,
}

/// A client gives up on a request after this long; its outcome is then unknown to it.
const GIVE_UP: Micros = 1_000 * MS;
/// A session client's pause between two numbered puts.
const SESSION_PACE: Micros = 30 * MS;

impl LeaseClients {
    /// `n` clients over `members` members, their roles in turn.
    pub fn new(n: usize, members: usize) -> LeaseClients {
        let roles = [Role::Keeper, Role::Sessions, Role::Lapser, Role::Revoker];
        let mut c = LeaseClients {
            members,
            ..LeaseClients::default()
        };
        for i in 0..n {
            c.add(roles[i % roles.len()], None);
        }
        c
    }

    /// A client of `role`. With `fixed` = (TTL, keep-alive span) it is a test's client: it
    /// takes one lease (after failed grants, until one is granted), with those.
    pub fn add(&mut self, role: Role, fixed: Option<(i64, Micros)>) -> usize {
        self.clients.push(Client {
            role,
            member: 1,
            held: None,
            req: None,
            keep_alive: None,
            numbers: 0,
            wait_until: 0,
            granted: Vec::new(),
            fixed,
            plan: (0, 0),
        });
        self.clients.len() - 1
    }

    /// No new leases; the leases held are kept alive from now on.
    pub fn close(&mut self) {
        self.closing = true;
        for c in &mut self.clients {
            if let Some(h) = &mut c.held {
                h.keep_until = Micros::MAX;
            }
        }
    }

    /// Nothing more is sent: every lease lapses.
    pub fn stop(&mut self) {
        self.stopped = true;
    }

    /// Whether client `c` holds a lease now, and which.
    pub fn holding(&self, c: usize) -> Option<LeaseId> {
        self.clients[c].held.as_ref().map(|h| h.id)
    }

    /// What the clients send now.
    pub fn turn(&mut self, now: Micros, rng: &mut impl Rng) -> Vec<Send> {
        if self.stopped {
            return Vec::new();
        }
        let mut out = Vec::new();
        for i in 0..self.clients.len() {
            self.give_up(i, now);
            if let Some(ask) = self.next_request(i, now, rng) {
                out.push(self.send(i, now, ask));
            }
            if let Some(id) = self.keep_alive_due(i, now) {
                let s = self.send(i, now, Ask::KeepAlive(id));
                self.clients[i].keep_alive = Some((s.number, now));
                out.push(s);
            }
        }
        out
    }

    fn send(&mut self, i: usize, now: Micros, ask: Ask) -> Send {
        let c = &mut self.clients[i];
        c.numbers += 1;
        if !matches!(ask, Ask::KeepAlive(_)) {
            c.req = Some((c.numbers, now, ask));
        }
        match ask {
            Ask::Grant(id, ttl) => self.book.asked_grant(id, ttl),
            Ask::Revoke(id) => self.book.asked_revoke(id),
            _ => {}
        }
        Send {
            client: i,
            number: self.clients[i].numbers,
            member: self.clients[i].member,
            ask,
            sent: now,
        }
    }

    /// Requests not answered in time: their outcome is unknown to the client.
    fn give_up(&mut self, i: usize, now: Micros) {
        let c = &self.clients[i];
        if let Some((n, sent, _)) = c.req {
            if now > sent + GIVE_UP {
                self.heard(i, n, Heard::Unknown, now);
            }
        }
        let c = &self.clients[i];
        if let (Some((n, sent)), Some(h)) = (c.keep_alive, &c.held) {
            if now > sent + ttl_micros(h.ttl) / 3 {
                self.heard(i, n, Heard::Unknown, now);
            }
        }
    }

    fn next_request(&mut self, i: usize, now: Micros, rng: &mut impl Rng) -> Option<Ask> {
        let closing = self.closing;
        let c = &mut self.clients[i];
        if c.req.is_some() || now < c.wait_until {
            return None;
        }
        let Some(h) = &mut c.held else {
            if closing || (c.fixed.is_some() && !c.granted.is_empty()) {
                return None;
            }
            let ttl = c.fixed.map_or_else(|| rng.gen_range(1..=MAX_TTL), |f| f.0);
            let keep_for = match (c.fixed, c.role) {
                (Some(f), _) => f.1,
                (None, Role::Lapser) => 0,
                (None, _) => rng.gen_range(1_000..8_000) * MS,
            };
            c.plan = (keep_for, rng.gen_range(1..=3));
            let id = self.book.next_id();
            return Some(Ask::Grant(id, ttl));
        };
        if h.keys_left > 0 {
            h.keys_left -= 1;
            return Some(Ask::Attach(h.id, leased_key(h.id, h.keys_left)));
        }
        if now < h.keep_until {
            return (c.role == Role::Sessions).then_some(Ask::Session(Session {
                lease: h.id,
                seq: h.seq,
            }));
        }
        // Done with this lease: revoke it, or let it lapse.
        let id = h.id;
        c.held = None;
        c.keep_alive = None;
        c.wait_until = now + rng.gen_range(50..500) * MS;
        (c.role == Role::Revoker).then_some(Ask::Revoke(id))
    }

    fn keep_alive_due(&self, i: usize, now: Micros) -> Option<LeaseId> {
        let c = &self.clients[i];
        let h = c.held.as_ref()?;
        let due = c.role != Role::Lapser
            && c.keep_alive.is_none()
            && now < h.keep_until
            && now >= h.next_keep_alive;
        due.then_some(h.id)
    }

    /// Client `i` heard back about its request `number`. Answers to requests it gave up
    /// on are ignored here (the book still takes acknowledgements of those).
    pub fn heard(&mut self, i: usize, number: u64, heard: Heard, now: Micros) {
        let c = &mut self.clients[i];
        if c.keep_alive.is_some_and(|k| k.0 == number) {
            let (_, sent) = c.keep_alive.take().unwrap();
            return self.keep_alive_heard(i, sent, heard, now);
        }
        let Some((n, sent, ask)) = c.req else {
            return;
        };
        if n != number {
            return;
        }
        c.req = None;
        match ask {
            Ask::Grant(id, ttl) => self.grant_heard(i, id, ttl, sent, heard, now),
            Ask::Session(_) => self.session_heard(i, heard, now),
            _ => {}
        }
    }

    fn grant_heard(
        &mut self,
        i: usize,
        id: LeaseId,
        ttl: i64,
        sent: Micros,
        heard: Heard,
        now: Micros,
    ) {
        let c = &mut self.clients[i];
        if !matches!(heard, Heard::Applied(Applied::Lease(Ok(_)))) {
            // Not granted, or not known to be: the client counts on nothing and takes
            // another id later (the lease, if it exists, lapses).
            c.member = next_member(&heard, c.member, self.members);
            c.wait_until = now + 100 * MS;
            return;
        }
        self.book.granted(id, sent);
        let (keep_for, keys) = c.plan;
        c.granted.push(id);
        c.held = Some(Held {
            id,
            ttl,
            keep_until: if self.closing {
                Micros::MAX
            } else {
                sent.saturating_add(keep_for)
            },
            next_keep_alive: sent + ttl_micros(ttl) / 3,
            keys_left: keys,
            seq: 1,
        });
    }

    fn session_heard(&mut self, i: usize, heard: Heard, now: Micros) {
        let c = &mut self.clients[i];
        let Some(h) = &mut c.held else {
            return;
        };
        match heard {
            Heard::Applied(Applied::Session(Ok(_))) => {
                h.seq += 1;
                c.wait_until = now + SESSION_PACE;
            }
            // Refused by the store (the lease is gone): the session is over.
            Heard::Applied(_) => h.keep_until = now,
            // The same number again, elsewhere, a little later.
            other => {
                c.member = next_member(&other, c.member, self.members);
                c.wait_until = now + 20 * MS;
            }
        }
    }

    fn keep_alive_heard(&mut self, i: usize, sent: Micros, heard: Heard, now: Micros) {
        let members = self.members;
        let c = &mut self.clients[i];
        let Some(h) = &mut c.held else {
            return;
        };
        match heard {
            Heard::Renewal(Renewal::Renewed { .. }) => {
                h.next_keep_alive = sent + ttl_micros(h.ttl) / 3;
            }
            // Gone: the client lets go.
            Heard::Renewal(Renewal::NotFound) => {
                c.held = None;
                c.req = None;
            }
            Heard::Renewal(Renewal::Expiring) => h.next_keep_alive = now + 50 * MS,
            other => {
                c.member = next_member(&other, c.member, members);
                h.next_keep_alive = now + 20 * MS;
            }
        }
    }
}

fn ttl_micros(ttl: i64) -> Micros {
    ttl.max(0) as Micros * 1_000 * MS
}

/// Where a client tries next: the leader the member named, else the next member.
fn next_member(heard: &Heard, member: NodeId, members: usize) -> NodeId {
    match heard {
        Heard::Refused(Some(l)) if *l != member => *l,
        _ => member % members as NodeId + 1,
    }
}

/// What is known of one lease.
#[derive(Clone, Debug, Default)]
pub struct Record {
    pub ttl: i64,
    /// The send time of its grant or of the last keep-alive acknowledged: its client counts
    /// on the lease until this + [`promised`]`(ttl)`.
    pub promised_from: Option<Micros>,
    /// When the last acknowledgement was given (true time).
    pub last_ack: Option<Micros>,
    /// Its client asked to revoke it: it promises nothing from then on.
    pub client_revoke: bool,
    /// When a revoke of it first applied anywhere, and whether the lease clock (not a
    /// client) proposed that one.
    pub revoked: Option<(Micros, bool)>,
}

/// Every lease and session answer, for the invariants.
#[derive(Default)]
pub struct Book {
    pub leases: BTreeMap<LeaseId, Record>,
    /// Per session (lease) and number: the revision its answers carried.
    pub sessions: BTreeMap<(LeaseId, u64), Revision>,
    /// Session answers to a number answered before (retries).
    pub session_retries: u64,
    pub acks: u64,
    pub expiries: u64,
}

impl Book {
    fn next_id(&self) -> LeaseId {
        self.leases.keys().next_back().map_or(1, |id| id + 1)
    }

    pub fn asked_grant(&mut self, id: LeaseId, ttl: i64) {
        self.leases.entry(id).or_default().ttl = ttl;
    }

    pub fn asked_revoke(&mut self, id: LeaseId) {
        self.leases.entry(id).or_default().client_revoke = true;
    }

    /// Its grant, sent at `sent`, was acknowledged.
    pub fn granted(&mut self, id: LeaseId, sent: Micros) {
        self.promise(id, sent, sent);
    }

    /// A keep-alive sent at `sent` was acknowledged at `now`.
    pub fn renewed(&mut self, id: LeaseId, sent: Micros, now: Micros) -> Result<(), String> {
        self.acks += 1;
        self.promise(id, sent, now);
        self.check(id)
    }

    fn promise(&mut self, id: LeaseId, sent: Micros, now: Micros) {
        let r = self.leases.entry(id).or_default();
        r.promised_from = r.promised_from.max(Some(sent));
        r.last_ack = r.last_ack.max(Some(now));
    }

    /// A revoke of `id` applied (first anywhere if it is the first reported).
    pub fn revoked(&mut self, id: LeaseId, now: Micros, expiry: bool) -> Result<(), String> {
        let r = self.leases.entry(id).or_default();
        if r.revoked.is_some() {
            return Ok(());
        }
        r.revoked = Some((now, expiry));
        self.expiries += u64::from(expiry);
        self.check(id)
    }

    /// The promise: an expiry takes effect no earlier than the promised time.
    fn check(&self, id: LeaseId) -> Result<(), String> {
        let r = &self.leases[&id];
        let (Some(from), Some((at, true))) = (r.promised_from, r.revoked) else {
            return Ok(());
        };
        let until = from + promised(r.ttl);
        if r.client_revoke || at >= until {
            return Ok(());
        }
        Err(format!(
            "lease {id} (TTL {} s) expired at {} ms, {} ms before its promise: the grant or \
             keep-alive acknowledged last was sent at {} ms, and a client counts on \
             TTL·(1 − {}%) from then",
            r.ttl,
            at / MS,
            (until - at) / MS,
            from / MS,
            DRIFT_PPM / 10_000
        ))
    }

    /// An answer to number `seq` of session `lease`: every answer to it carries the same
    /// revision.
    pub fn session_answered(
        &mut self,
        lease: LeaseId,
        seq: u64,
        rev: Revision,
    ) -> Result<(), String> {
        match self.sessions.get(&(lease, seq)) {
            None => {
                self.sessions.insert((lease, seq), rev);
                Ok(())
            }
            Some(&first) if first == rev => {
                self.session_retries += 1;
                Ok(())
            }
            Some(&first) => Err(format!(
                "session {lease} number {seq} answered with revision {first}, and again with {rev}"
            )),
        }
    }

    /// The leases `held` that were acknowledged since `since` must still be there: kept
    /// alive in a stable cluster, nothing revokes them.
    pub fn kept_since(&self, since: Micros, held: &[LeaseId]) -> Result<(), String> {
        for id in held {
            let r = &self.leases[id];
            if let (Some(ack), Some((at, _))) = (r.last_ack, r.revoked) {
                if ack >= since {
                    return Err(format!(
                        "lease {id} was kept alive since {} ms (acknowledged at {} ms), \
                         yet revoked at {} ms",
                        since / MS,
                        ack / MS,
                        at / MS
                    ));
                }
            }
        }
        Ok(())
    }
}
