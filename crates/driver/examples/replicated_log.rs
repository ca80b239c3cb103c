//! A replicated log of strings: three nodes in one process, each embedding the `raft` core
//! through the `driver` crate, with TCP on 127.0.0.1 between them and the `storage` crate's
//! write-ahead log on disk. It writes, kills the leader, keeps writing through the two that
//! are left, restarts the killed node from its data directory, and checks that all three
//! hold the same list. Run it with `cargo run -p driver --example replicated_log`.
//!
//! What an application supplies is small: a [`StateMachine`] (here a `Vec<String>`), a
//! [`Storage`] (a durable log), a [`Transport`] (fire and forget) and a loop that feeds the
//! driver ticks, messages and proposals. The driver keeps the Ready contract's order:
//! 1. messages that promise nothing about this node's disk leave at once;
//! 2. the hard state and entries are persisted; only once storage reports them durable
//!    (`on_persisted`) do the votes and acknowledgements that promise them leave;
//! 3. committed entries are applied, and waiting clients answered, in log order.

use bytes::Bytes;
use driver::{Driver, DriverConfig, Ids, Outcome, Reply, RequestId, StateMachine, Status};
use driver::{Storage, Transport, Write};
use raft::{Body, Config, ConflictHint, Entry, EntryKind, Membership, Message, NodeId, Raft};
use raft::{Role, Snapshot, SnapshotMeta};
use std::collections::{BTreeMap, HashMap};
use std::hash::{BuildHasher, RandomState};
use std::io::{Read, Write as _};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::process::ExitCode;
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender, SyncSender};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant, SystemTime};

/// One tick of raft time. With the core's defaults (an election timeout of 10 to 20 ticks,
/// a heartbeat every tick) a leader is elected in 100 to 200 ms.
const TICK: Duration = Duration::from_millis(10);
const VOTERS: [NodeId; 3] = [1, 2, 3];
/// Small on purpose: the leader compacts its log while a node is down, so the restarted
/// node is brought up to date by a snapshot sent over TCP, not by log entries.
const SNAPSHOT_EVERY: u64 = 10;

/// Errors, as the driver reports them: a sentence.
type Res<T = ()> = Result<T, String>;
fn msg(e: impl std::fmt::Display) -> String {
    e.to_string()
}

// --- The state machine: an append-only list of strings. ----------------------------------

/// Applying must be deterministic: every node applies the same entries in the same order.
#[derive(Default)]
struct Strings(Vec<String>);

impl StateMachine for Strings {
    type Output = usize; // where the string landed, from 1
    type Query = ();
    type Answer = ();
    type Frozen = Vec<String>; // a copy, for storage to write

    fn apply(&mut self, e: &Entry) -> Result<Option<(RequestId, usize)>, String> {
        if e.kind != EntryKind::Normal {
            return Ok(None); // a new leader's no-op changes nothing
        }
        // A command carries the id the driver gave its request, so that the node whose
        // client proposed it can answer that client, whichever node was leader.
        let (n, b) = unframe(&e.data).unwrap_or_default();
        let (&[member, boot, seq], [text]) = (&n[..], &b[..]) else {
            return Err(format!("entry {} is not a command", e.index));
        };
        let text = String::from_utf8(text.to_vec()).map_err(msg)?;
        self.0.push(text);
        Ok(Some((RequestId { member, boot, seq }, self.0.len())))
    }
    fn query(&self, _: &()) {}
    fn freeze(&self) -> Vec<String> {
        self.0.clone()
    }
    fn restore(&mut self, s: &Snapshot) -> Result<(), String> {
        let (_, strings) = unframe(&s.data).ok_or("damaged snapshot")?;
        let strings = strings.iter().map(|b| String::from_utf8(b.to_vec()).ok());
        self.0 = strings.collect::<Option<_>>().ok_or("damaged snapshot")?;
        Ok(())
    }
}

// --- Storage: the library's write-ahead log, used synchronously. ---------------------------

/// Each write is on disk (fsynced, unless the driver marked it lazy) before `persist`
/// returns, and its completion is queued for the loop to report (`on_persisted`). The
/// driver needs completions in submission order, which a synchronous disk gives trivially;
/// the server gets them from a group-commit thread that shares one fsync among many writes.
struct Disk {
    log: storage::Storage,
    done: Vec<Done>,
}

enum Done {
    Persisted(Result<(), String>),
    Snapshot(Result<Snapshot, String>),
    Restored(Result<Strings, String>),
}

impl Storage<Strings> for Disk {
    fn persist(&mut self, w: Write) {
        let log = &mut self.log;
        let r = log.save(w.snapshot.as_ref(), w.hard_state, &w.entries);
        let r = r.and_then(|()| if w.lazy { Ok(()) } else { log.sync() });
        self.done.push(Done::Persisted(r.map_err(msg)));
    }
    fn snapshot(&mut self, meta: SnapshotMeta, frozen: Vec<String>) {
        let strings: Vec<&[u8]> = frozen.iter().map(|s| s.as_bytes()).collect();
        let data = frame(&[], &strings).into();
        let s = Snapshot { meta, data };
        let r = self.log.snapshot_writer().write(&s).map(|()| s);
        self.done.push(Done::Snapshot(r.map_err(msg)));
    }
    fn compact(&mut self, s: Snapshot) {
        if let Err(e) = self.log.compact(&s) {
            eprintln!("compaction failed, so the log keeps its segments: {e}");
        }
    }
    fn restore(&mut self, s: Snapshot) {
        let mut m = Strings::default();
        self.done.push(Done::Restored(m.restore(&s).map(|()| m)));
    }
}

// --- Transport: frames over TCP. -----------------------------------------------------------

/// Where each node listens now. Nodes bind port 0 and publish the port the OS gave them, so
/// that two runs on one machine never collide; a restarted node publishes its new address.
type Directory = Arc<Mutex<HashMap<NodeId, SocketAddr>>>;

/// A bounded queue per peer, emptied by a writer thread. `send` never blocks: a full queue
/// or a peer that is down loses messages, and raft retransmits what matters.
struct Tcp(HashMap<NodeId, SyncSender<Message>>);

impl Transport for Tcp {
    fn send(&mut self, msgs: Vec<Message>) {
        for m in msgs {
            let _ = self.0.get(&m.to).map(|queue| queue.try_send(m));
        }
    }
}

/// A frame is its length (u32) and a message. Ends once the node's transport is dropped.
fn write_to(peer: NodeId, directory: Directory, queue: Receiver<Message>) {
    let (mut conn, mut retry_at) = (None::<TcpStream>, Instant::now());
    for m in queue {
        if conn.is_none() && Instant::now() >= retry_at {
            retry_at = Instant::now() + Duration::from_millis(50);
            let addr = directory.lock().unwrap().get(&peer).copied();
            conn = addr.and_then(|a| TcpStream::connect_timeout(&a, Duration::from_secs(1)).ok());
            let timeout = Some(Duration::from_secs(1));
            let _ = conn.as_ref().map(|c| c.set_write_timeout(timeout));
        }
        let body = encode(&m);
        let frame = [&(body.len() as u32).to_le_bytes()[..], &body].concat();
        if conn.as_mut().is_some_and(|c| c.write_all(&frame).is_err()) {
            conn = None; // the peer went away: reconnect for a later message
        }
    }
}

/// Feeds one peer's frames to the node; ends when the node is gone, the peer hangs up or
/// sends something that does not decode.
fn read_from(mut s: TcpStream, inbox: Sender<Event>) {
    let _ = s.set_nonblocking(false);
    let mut len = [0u8; 4];
    while s.read_exact(&mut len).is_ok() {
        let mut body = vec![0; u32::from_le_bytes(len).min(64 << 20) as usize]; // bounded
        let m = s.read_exact(&mut body).ok().and_then(|()| decode(&body));
        if m.is_none_or(|m| inbox.send(Event::Peer(m)).is_err()) {
            return;
        }
    }
}

// --- The node: one thread owns the driver and the listener; all else goes through its inbox.

enum Event {
    Peer(Message),
    Propose(String, Sender<Outcome<usize>>),
    Inspect(Sender<(Status, Vec<String>)>),
    Stop,
}

/// A client waiting for its write: the driver answers it once the entry is applied here.
struct Client<T>(Sender<Outcome<T>>);
impl<T> Reply<T> for Client<T> {
    fn send(self, result: Outcome<T>) {
        let _ = self.0.send(result);
    }
}

type Node = Driver<Strings, Disk, Tcp, Client<usize>, Client<()>>;

struct Handle {
    inbox: Sender<Event>,
    thread: JoinHandle<Res>,
}

/// Start node `id` from its data directory: empty the first time, what it left otherwise.
/// Also returns what it recovered from disk: its snapshot's index and its last log index.
fn start(id: NodeId, dir: &Path, net: &Directory) -> Res<(Handle, u64, u64)> {
    let ident = storage::Identity {
        cluster_id: 7,
        node_id: id,
    };
    let (log, state) = storage::Storage::open(dir, ident, Default::default())
        .map_err(|e| format!("node {id}: cannot open its data directory: {e}"))?;
    // The state machine lives in memory: rebuild it from the latest snapshot, and the core
    // hands out the committed entries after it again.
    let mut machine = Strings::default();
    state.snapshot.iter().try_for_each(|s| machine.restore(s))?;
    let snapshot = state.snapshot.as_ref().map_or(0, |s| s.meta.index);
    let last = state.entries.last().map_or(snapshot, |e| e.index);
    // A fresh nonce each life: a late answer meant for an earlier life matches no request.
    let boot = RandomState::new().hash_one(SystemTime::now());
    let mut cfg = Config::new(id, VOTERS.to_vec());
    cfg.seed = boot; // election timeouts differ between nodes and between lives
    let raft = Raft::new(cfg, state).map_err(|e| format!("node {id}: {e}"))?;

    let listener = TcpListener::bind("127.0.0.1:0").map_err(|e| format!("node {id}: {e}"))?;
    let addr = listener.local_addr().map_err(msg)?;
    net.lock().unwrap().insert(id, addr);
    let mut peers = HashMap::new();
    for peer in VOTERS.into_iter().filter(|&p| p != id) {
        let (queue, rx) = mpsc::sync_channel(4096);
        let net = net.clone();
        thread::spawn(move || write_to(peer, net, rx));
        peers.insert(peer, queue);
    }
    let disk = Disk { log, done: vec![] };
    let cfg = DriverConfig {
        snapshot_count: SNAPSHOT_EVERY,
        ..Default::default()
    };
    let node = Driver::new(raft, machine, disk, Tcp(peers), Ids::new(id, boot), cfg);
    let (inbox, events) = mpsc::channel();
    let tx = inbox.clone();
    let thread = thread::spawn(move || run(node, listener, tx, events));
    Ok((Handle { inbox, thread }, snapshot, last))
}

/// The loop: take in connections, messages and requests, tick on time, and after each
/// input let the driver carry out what the core decided.
fn run(mut node: Node, l: TcpListener, tx: Sender<Event>, rx: Receiver<Event>) -> Res {
    l.set_nonblocking(true).map_err(msg)?;
    let mut next_tick = Instant::now() + TICK;
    loop {
        pump(&mut node);
        if let Some(why) = node.failure() {
            return Err(why.to_string()); // fail-stop: a disk error, an entry that won't apply
        }
        while let Ok((stream, _)) = l.accept() {
            let tx = tx.clone();
            thread::spawn(move || read_from(stream, tx));
        }
        if Instant::now() >= next_tick {
            node.tick();
            next_tick = Instant::now() + TICK; // after a stall, no burst of ticks
            continue;
        }
        match rx.recv_timeout(next_tick.saturating_duration_since(Instant::now())) {
            // A refused message (a stranger, a broken rule) is counted by the core; go on.
            Ok(Event::Peer(m)) => drop(node.step(m)),
            Ok(Event::Propose(text, reply)) => {
                let command =
                    |id: RequestId| frame(&[id.member, id.boot, id.seq], &[text.as_bytes()]);
                node.propose(|id| command(id).into(), Client(reply))
            }
            Ok(Event::Inspect(r)) => drop(r.send((node.status(), node.machine().0.clone()))),
            // Returning drops the driver, the listener and the peer queues, as a crash
            // would; nothing acknowledged is lost, since it was synced first.
            Ok(Event::Stop) | Err(RecvTimeoutError::Disconnected) => return Ok(()),
            Err(RecvTimeoutError::Timeout) => {}
        }
    }
}

/// Carry out what the core decided, then report storage's completions, until neither has
/// anything left: a completion may release messages and let the core decide more.
fn pump(node: &mut Node) {
    loop {
        node.process_ready();
        let done: Vec<Done> = node.storage_mut().done.drain(..).collect();
        if done.is_empty() {
            return;
        }
        for d in done {
            match d {
                Done::Persisted(r) => node.on_persisted(r),
                Done::Snapshot(r) => node.on_snapshot(r),
                Done::Restored(r) => node.on_restored(r),
            }
        }
    }
}

// --- One binary format for commands, snapshots and messages. -------------------------------

/// A count of numbers, the numbers, then byte strings each after its length: all u64,
/// little-endian.
fn frame(nums: &[u64], blobs: &[&[u8]]) -> Vec<u8> {
    let mut out = (nums.len() as u64).to_le_bytes().to_vec();
    nums.iter().for_each(|n| out.extend(n.to_le_bytes()));
    for b in blobs {
        out.extend((b.len() as u64).to_le_bytes());
        out.extend_from_slice(b);
    }
    out
}

fn unframe(mut buf: &[u8]) -> Option<(Vec<u64>, Vec<Bytes>)> {
    fn word(buf: &mut &[u8]) -> Option<u64> {
        let (head, rest) = buf.split_first_chunk::<8>()?;
        *buf = rest;
        Some(u64::from_le_bytes(*head))
    }
    let count = word(&mut buf)?;
    let nums = (0..count).map(|_| word(&mut buf)).collect::<Option<_>>()?;
    let mut blobs = Vec::new();
    while !buf.is_empty() {
        let len = word(&mut buf)? as usize;
        let (blob, rest) = buf.split_at_checked(len)?;
        blobs.push(Bytes::copy_from_slice(blob));
        buf = rest;
    }
    Some((nums, blobs))
}

const KINDS: [EntryKind; 3] = [EntryKind::Normal, EntryKind::Noop, EntryKind::ConfChange];

/// A message as numbers (sender, receiver, term, which body, its fields) and byte strings
/// (entries' data, a snapshot's configuration and chunk, forwarded commands).
#[rustfmt::skip] // a table, one line per kind of message, reads best unwrapped
fn encode(m: &Message) -> Vec<u8> {
    let (mut n, mut members) = (vec![m.from, m.to, m.term], Vec::new());
    let mut b: Vec<&[u8]> = Vec::new();
    match &m.body {
        Body::Append { prev_index, prev_term, entries, commit } => {
            n.extend([0, *prev_index, *prev_term, *commit]);
            for e in entries {
                n.extend([e.term, e.index, KINDS.iter().position(|k| *k == e.kind).unwrap_or(0) as u64]);
                b.push(&e.data);
            }
        }
        Body::AppendResponse { reject, index, hint: None } => n.extend([1, *reject as u64, *index]),
        Body::AppendResponse { reject, index, hint: Some(h) } => {
            n.extend([1, *reject as u64, *index, h.term.is_some() as u64, h.term.unwrap_or(0), h.first_index]);
        }
        Body::Heartbeat { commit, seq } => n.extend([2, *commit, *seq]),
        Body::HeartbeatResponse { seq } => n.extend([3, *seq]),
        Body::Vote { pre_vote, transfer, last_index, last_term } => n.extend([4, *pre_vote as u64, *transfer as u64, *last_index, *last_term]),
        Body::VoteResponse { pre_vote, granted } => n.extend([5, *pre_vote as u64, *granted as u64]),
        Body::TimeoutNow => n.push(6),
        Body::InstallSnapshot { meta, offset, total, data } => {
            meta.membership.encode_into(&mut members);
            n.extend([7, meta.index, meta.term, *offset, *total]);
            b.extend([&members[..], data]);
        }
        Body::SnapshotResponse { index, received, reject } => n.extend([8, *index, *received, *reject as u64]),
        Body::ReadIndex { ctx } => n.extend([9, *ctx]),
        Body::ReadIndexResponse { ctx, index } => n.extend([10, *ctx, *index]),
        Body::Propose { data } => { n.push(11); b.extend(data.iter().map(|d| &d[..])); }
        Body::Commit { commit } => n.extend([12, *commit]),
    }
    frame(&n, &b)
}

/// The inverse of `encode`; `None` for anything `encode` does not write.
#[rustfmt::skip]
fn decode(buf: &[u8]) -> Option<Message> {
    let (n, blobs) = unframe(buf)?;
    let mut b = blobs.into_iter();
    let [from, to, term, ..] = n[..] else { return None };
    let body = match n[3..] {
        [0, prev_index, prev_term, commit, ref rest @ ..] if rest.len() % 3 == 0 => {
            let entry = |c: &[u64], data| Some(Entry { term: c[0], index: c[1], kind: *KINDS.get(c[2] as usize)?, data });
            let entries = rest.chunks(3).map(|c| entry(c, b.next()?)).collect::<Option<_>>()?;
            Body::Append { prev_index, prev_term, entries, commit }
        }
        [1, reject, index] => Body::AppendResponse { reject: reject == 1, index, hint: None },
        [1, reject, index, has_term, t, first_index] => {
            let hint = Some(ConflictHint { term: (has_term == 1).then_some(t), first_index });
            Body::AppendResponse { reject: reject == 1, index, hint }
        }
        [2, commit, seq] => Body::Heartbeat { commit, seq },
        [3, seq] => Body::HeartbeatResponse { seq },
        [4, pre, tr, last_index, last_term] => Body::Vote { pre_vote: pre == 1, transfer: tr == 1, last_index, last_term },
        [5, pre, granted] => Body::VoteResponse { pre_vote: pre == 1, granted: granted == 1 },
        [6] => Body::TimeoutNow,
        [7, index, snap_term, offset, total] => {
            let membership = Membership::decode(&b.next()?).ok()?;
            let meta = SnapshotMeta { index, term: snap_term, membership };
            Body::InstallSnapshot { meta, offset, total, data: b.next()? }
        }
        [8, index, received, reject] => Body::SnapshotResponse { index, received, reject: reject == 1 },
        [9, ctx] => Body::ReadIndex { ctx },
        [10, ctx, index] => Body::ReadIndexResponse { ctx, index },
        [11] => Body::Propose { data: b.by_ref().collect() },
        [12, commit] => Body::Commit { commit },
        _ => return None,
    };
    b.next().is_none().then_some(Message { from, to, term, body })
}

// --- The scenario. ------------------------------------------------------------------------

type Nodes = BTreeMap<NodeId, Handle>;

/// Poll `f` every 20 ms until it gives a value, for at most `secs` seconds.
fn within<T>(secs: u64, what: &str, mut f: impl FnMut() -> Option<T>) -> Res<T> {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while Instant::now() < deadline {
        if let Some(v) = f() {
            return Ok(v);
        }
        thread::sleep(Duration::from_millis(20));
    }
    Err(format!("gave up after {secs} s waiting for {what}"))
}

fn inspect(nodes: &Nodes, id: NodeId) -> Option<(Status, Vec<String>)> {
    let (tx, rx) = mpsc::channel();
    nodes.get(&id)?.inbox.send(Event::Inspect(tx)).ok()?;
    rx.recv_timeout(Duration::from_secs(2)).ok()
}

fn leader(nodes: &Nodes) -> Res<Status> {
    within(10, "a leader", || {
        let mut up = nodes.keys().filter_map(|&id| inspect(nodes, id));
        up.find(|(s, _)| s.role == Role::Leader).map(|(s, _)| s)
    })
}

/// Stop the node's thread, dropping all it held in memory; its data directory stays.
fn kill(nodes: &mut Nodes, id: NodeId) -> Res {
    let node = nodes.remove(&id).ok_or("no such node")?;
    let _ = node.inbox.send(Event::Stop);
    let stopped = || node.thread.is_finished().then_some(());
    within(5, "a node to stop", stopped)?;
    let joined = node.thread.join();
    joined.map_err(|_| format!("node {id} panicked"))?
}

/// Propose through `via` (a follower forwards to its leader) until told the string
/// committed; returns where it landed. A retry after a timeout or a leader change may
/// commit it twice: the ambiguity every client of a replicated log must handle.
fn write(nodes: &Nodes, via: NodeId, text: String) -> Res<(usize, String)> {
    let at = within(10, &format!("{text:?} to commit"), || {
        let (tx, rx) = mpsc::channel();
        let inbox = &nodes[&via].inbox;
        inbox.send(Event::Propose(text.clone(), tx)).ok()?;
        let answer = rx.recv_timeout(Duration::from_secs(2)).ok()?;
        answer.ok().map(|a| a.value)
    })?;
    Ok((at, text))
}

fn scenario(dir: &Path) -> Res {
    let (net, mut nodes, mut acked) = (Directory::default(), Nodes::new(), Vec::new());
    let launch = |nodes: &mut Nodes, id: NodeId| {
        let (handle, snapshot, last) = start(id, &dir.join(id.to_string()), &net)?;
        nodes.insert(id, handle);
        Ok::<_, String>((snapshot, last))
    };
    for id in VOTERS {
        launch(&mut nodes, id)?;
    }
    let first = leader(&nodes)?.id;
    for i in 1..=20 {
        acked.push(write(&nodes, VOTERS[i % 3], format!("before-{i}"))?);
    }
    println!("ok: three nodes elected node {first}; 20 strings committed, proposed via each");

    // Kill the leader: the two others must elect one of themselves and go on committing.
    let (had, _) = inspect(&nodes, first).ok_or("the leader does not answer")?;
    kill(&mut nodes, first)?;
    let second = leader(&nodes)?.id;
    let up: Vec<NodeId> = nodes.keys().copied().collect();
    for i in 1..=30 {
        acked.push(write(&nodes, up[i % 2], format!("while-down-{i}"))?);
    }
    let compacted = leader(&nodes)?.snapshot_index;
    let had = had.applied;
    println!("ok: killed node {first} (applied to {had}); node {second} took over");
    println!("ok: 30 strings committed by two nodes of three; the leader compacted to {compacted}");

    // Restart it from its data directory: it must find all it had applied, then catch up.
    let (snapshot, last) = launch(&mut nodes, first)?;
    if last < had {
        return Err(format!("node {first} recovered only up to {last}"));
    }
    println!("ok: restarted node {first}: its disk held snapshot {snapshot} and log to {last}");
    for i in 1..=10 {
        acked.push(write(&nodes, first, format!("after-{i}"))?);
    }
    // The leader's log starts after `compacted`: only a snapshot can bring the node there.
    let how = if compacted > last {
        "a snapshot"
    } else {
        "log entries"
    };
    println!("ok: 10 strings committed through node {first}, which caught up by {how}");

    // All three must reach the same applied index, with nothing committed left to apply,
    // and hold the same list; every acknowledged string must be where its client was told.
    let (applied, list) = within(15, "all three nodes to agree", || {
        let views = VOTERS.map(|id| inspect(&nodes, id));
        let (s, list) = views[0].clone()?;
        let same = |(t, l): &(Status, Vec<String>)| t.applied == s.applied && *l == list;
        let all = views.iter().all(|v| v.as_ref().is_some_and(same));
        (all && s.commit == s.applied).then_some((s.applied, list))
    })?;
    let misplaced = acked
        .iter()
        .find(|(at, text)| list.get(at - 1) != Some(text));
    if let Some((at, text)) = misplaced {
        return Err(format!(
            "{text:?} was acknowledged at position {at} but is not there"
        ));
    }
    let (strings, acked) = (list.len(), acked.len());
    println!("ok: all three applied to {applied} and hold the same {strings} strings");
    println!("ok: each of the {acked} acknowledged strings is where its client was told");
    VOTERS.into_iter().try_for_each(|id| kill(&mut nodes, id))
}

fn main() -> ExitCode {
    let began = Instant::now();
    let scratch = tempfile::tempdir().map_err(|e| format!("no scratch directory: {e}"));
    if let Err(why) = scratch.and_then(|dir| scenario(dir.path())) {
        eprintln!("replicated_log FAILED: {why}");
        return ExitCode::FAILURE;
    }
    println!("ok: verified in {:.1?}", began.elapsed());
    ExitCode::SUCCESS
}
