//! A replicated log of strings: three nodes in one process, each embedding the `raft` core
//! through the `driver` crate, with TCP on 127.0.0.1 between them and the `storage` crate's
//! write-ahead log on disk. It writes, kills the leader, keeps writing through the other two,
//! restarts the killed node from its data directory and checks that all three agree. Run it
//! with `cargo run -p driver --example replicated_log`.
//!
//! An application supplies a [`StateMachine`], a [`Storage`], a [`Transport`] and a loop
//! that feeds the driver ticks, messages and proposals; the driver does the rest in the
//! order Raft requires: messages that promise nothing about this node's disk leave at once,
//! votes and acknowledgements only once storage reports the write durable, and committed
//! entries are applied, and their clients answered, in log order.

use bytes::Bytes;
use driver::{wire, Transport, Write};
use driver::{Driver, DriverConfig, Ids, Outcome, Reply, RequestId, StateMachine, Storage};
use raft::{Config, Entry, EntryKind, Message, NodeId, Raft, Role, Snapshot, SnapshotMeta};
use std::collections::{BTreeMap, HashMap};
use std::hash::{BuildHasher, RandomState};
use std::io::{Read, Write as _};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::sync::mpsc::{self, Receiver, Sender, SyncSender};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant, SystemTime};

/// One tick of raft time: elections take 10 to 20 ticks, heartbeats go every tick.
const TICK: Duration = Duration::from_millis(10);
const VOTERS: [NodeId; 3] = [1, 2, 3];
/// Small, so that the leader compacts its log while a node is down and the restarted node
/// is brought up to date by a snapshot sent over TCP, not by log entries.
const SNAPSHOT_EVERY: u64 = 10;
type Res<T = ()> = Result<T, Box<dyn std::error::Error>>;

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
        // The id the driver gave the request lets the node whose client proposed it answer.
        let (n, b) = unframe(&e.data).unwrap_or_default();
        let (&[member, boot, seq], [text]) = (&n[..], &b[..]) else {
            return Err(format!("entry {} is not a command", e.index));
        };
        let text = String::from_utf8(text.to_vec()).map_err(|_| "not UTF-8")?;
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

/// Each write is on disk (fsynced, unless lazy) before `persist` returns, so writes complete
/// in submission order, as the driver requires. Storage cannot call the driver that owns it:
/// it queues the call (`on_persisted` and the like) for the loop to make.
struct Disk {
    log: storage::Storage,
    done: Vec<Done>,
}
type Done = Box<dyn FnOnce(&mut Node)>;

impl Storage<Strings> for Disk {
    fn persist(&mut self, w: Write) {
        let log = &mut self.log;
        let r = log.save(w.snapshot.as_ref(), w.hard_state, &w.entries);
        let r = r.and_then(|()| if w.lazy { Ok(()) } else { log.sync() });
        let r = r.map_err(|e| e.to_string());
        self.done.push(Box::new(|node| node.on_persisted(r)));
    }
    fn snapshot(&mut self, meta: SnapshotMeta, frozen: Vec<String>) {
        let strings: Vec<&[u8]> = frozen.iter().map(|s| s.as_bytes()).collect();
        let data = frame(&[], &strings).into();
        let s = Snapshot { meta, data };
        let r = self.log.snapshot_writer().write(&s).map(|()| s);
        let r = r.map_err(|e| e.to_string());
        self.done.push(Box::new(|node| node.on_snapshot(r)));
    }
    fn compact(&mut self, s: Snapshot) {
        let _ = self.log.compact(&s); // on failure the log just keeps its segments
    }
    fn restore(&mut self, s: Snapshot) {
        let mut m = Strings::default();
        let r = m.restore(&s).map(|()| m);
        self.done.push(Box::new(|node| node.on_restored(r)));
    }
}

// --- Transport: raft messages over TCP, encoded by `driver::wire`. ------------------------

/// Where each node listens now: it binds port 0 and publishes the port it got, so that two
/// runs never collide; a restarted node publishes its new address.
type Directory = Arc<Mutex<HashMap<NodeId, SocketAddr>>>;

/// `send` never blocks: each peer has a bounded queue that a writer thread empties, and a
/// full queue or a peer that is down loses messages (raft retransmits what matters). Each
/// connection accepted on `port` gets a reader thread that feeds `inbox`.
struct Tcp {
    peers: HashMap<NodeId, SyncSender<Message>>,
    port: TcpListener,
    inbox: (Sender<Message>, Receiver<Message>),
}

impl Transport for Tcp {
    fn send(&mut self, msgs: Vec<Message>) {
        for m in msgs {
            let _ = self.peers.get(&m.to).map(|queue| queue.try_send(m));
        }
    }
}

impl Tcp {
    fn new(id: NodeId, net: &Directory) -> Res<Tcp> {
        let port = TcpListener::bind("127.0.0.1:0")?;
        port.set_nonblocking(true)?;
        net.lock().unwrap().insert(id, port.local_addr()?);
        let mut peers = HashMap::new();
        for peer in VOTERS.into_iter().filter(|&p| p != id) {
            let (queue, rx) = mpsc::sync_channel(4096);
            let net = net.clone();
            thread::spawn(move || write_to(peer, net, rx));
            peers.insert(peer, queue);
        }
        let inbox = mpsc::channel();
        Ok(Tcp { peers, port, inbox })
    }

    /// Take in new connections, and the messages that arrived since the last call.
    fn received(&mut self) -> Vec<Message> {
        while let Ok((stream, _)) = self.port.accept() {
            let inbox = self.inbox.0.clone();
            thread::spawn(move || read_from(stream, inbox));
        }
        self.inbox.1.try_iter().collect()
    }
}

/// Writes each message as a frame, its length (u32) then its bytes, and connects again after
/// an error (on loopback a connection is made or refused at once).
fn write_to(peer: NodeId, net: Directory, queue: Receiver<Message>) {
    let mut conn: Option<TcpStream> = None;
    for m in queue {
        let addr = net.lock().unwrap().get(&peer).copied();
        conn = conn.or_else(|| TcpStream::connect(addr?).ok());
        let body = wire::encode(&m);
        let frame = [&(body.len() as u32).to_le_bytes()[..], &body].concat();
        if conn.as_mut().is_some_and(|c| c.write_all(&frame).is_err()) {
            conn = None; // the peer went away: this message is lost, the next reconnects
        }
    }
}

/// Ends when the node is gone, the peer hangs up or sends something that does not decode.
fn read_from(mut s: TcpStream, inbox: Sender<Message>) {
    let _ = s.set_nonblocking(false); // on some systems it inherits the listener's mode
    let mut len = [0u8; 4];
    while s.read_exact(&mut len).is_ok() {
        let mut body = vec![0; u32::from_le_bytes(len).min(64 << 20) as usize]; // bounded
        let read = s.read_exact(&mut body);
        let m = read.ok().and_then(|()| wire::decode(&body).ok());
        if m.is_none_or(|m| inbox.send(m).is_err()) {
            return;
        }
    }
}

// --- The cluster: one loop drives every node's driver. --------------------------------------

/// A client waiting for its write: the driver answers it once the entry is applied here.
struct Client<T>(Sender<Outcome<T>>);
impl<T> Reply<T> for Client<T> {
    fn send(self, result: Outcome<T>) {
        let _ = self.0.send(result);
    }
}

type Node = Driver<Strings, Disk, Tcp, Client<usize>, Client<()>>;

#[derive(Default)]
struct Cluster {
    net: Directory,
    nodes: BTreeMap<NodeId, Node>,
    ticked: Option<Instant>,
    /// Every string a client was told committed, with the position it was told.
    acked: Vec<(usize, String)>,
}

impl Cluster {
    /// Start node `id` from its data directory: empty the first time, what it left
    /// otherwise. Returns what it recovered: its snapshot's index and its last log index.
    fn start(&mut self, id: NodeId, dir: &Path) -> Res<(u64, u64)> {
        let ident = storage::Identity {
            cluster_id: 7,
            node_id: id,
        };
        let dir = dir.join(id.to_string());
        let (log, state) = storage::Storage::open(&dir, ident, Default::default())?;
        // The state machine lives in memory: rebuild it from the snapshot; the core hands
        // out the committed entries after it again.
        let mut machine = Strings::default();
        state.snapshot.iter().try_for_each(|s| machine.restore(s))?;
        let snapshot = state.snapshot.as_ref().map_or(0, |s| s.meta.index);
        let last = state.entries.last().map_or(snapshot, |e| e.index);
        // A fresh nonce each life: a late answer meant for an earlier life matches no request.
        let boot = RandomState::new().hash_one(SystemTime::now());
        let mut cfg = Config::new(id, VOTERS.to_vec());
        cfg.seed = boot; // election timeouts differ between nodes and between lives
        let raft = Raft::new(cfg, state)?;
        let (disk, tcp) = (Disk { log, done: vec![] }, Tcp::new(id, &self.net)?);
        let cfg = DriverConfig {
            snapshot_count: SNAPSHOT_EVERY,
            ..Default::default()
        };
        let node = Driver::new(raft, machine, disk, tcp, Ids::new(id, boot), cfg);
        self.nodes.insert(id, node);
        Ok((snapshot, last))
    }

    /// Run the cluster until `f` finds what it waits for, for at most `secs` seconds: hand
    /// each node what arrived, tick it on time, and let its driver carry out what the core
    /// decided. (A server would wait on its sockets; polling keeps this example short.)
    fn until<T>(&mut self, secs: u64, what: &str, f: impl FnMut(&mut Self) -> Option<T>) -> Res<T> {
        let (deadline, mut f) = (Instant::now() + Duration::from_secs(secs), f);
        while Instant::now() < deadline {
            if let Some(v) = f(self) {
                return Ok(v);
            }
            let tick = self.ticked.is_none_or(|t| t.elapsed() >= TICK);
            if tick {
                self.ticked = Some(Instant::now()); // after a stall, no burst of ticks
            }
            for (id, node) in &mut self.nodes {
                let arrived = node.transport_mut().received();
                arrived.into_iter().for_each(|m| drop(node.step(m))); // the core counts refusals
                if tick {
                    node.tick();
                }
                // Carry out what the core decided, then report what storage finished, until
                // neither has anything left: a completion may release messages and more.
                node.process_ready();
                while !node.storage().done.is_empty() {
                    let done = std::mem::take(&mut node.storage_mut().done);
                    done.into_iter().for_each(|report| report(node));
                    node.process_ready();
                }
                if let Some(why) = node.failure() {
                    return Err(format!("node {id} stopped: {why}").into()); // fail-stop
                }
            }
            thread::sleep(Duration::from_millis(1));
        }
        Err(format!("gave up after {secs} s waiting for {what}").into())
    }

    /// Commit `count` strings `{name}-1`, `{name}-2`… proposed through each of `via` in
    /// turn (a follower forwards to its leader). A proposal refused or unanswered is made
    /// again, so a string may commit twice: every client of a replicated log must allow it.
    fn write(&mut self, via: &[NodeId], name: &str, count: usize) -> Res {
        for i in 1..=count {
            let (text, via) = (format!("{name}-{i}"), via[i % via.len()]);
            let command = |id: RequestId| frame(&[id.member, id.boot, id.seq], &[text.as_bytes()]);
            let at = self.until(10, &format!("{text:?} to commit"), |c| {
                let (tx, rx) = mpsc::channel();
                let node = c.nodes.get_mut(&via)?;
                node.propose(|id| command(id).into(), Client(tx));
                let answer = c.until(2, "an answer", |_| rx.try_recv().ok());
                answer.ok()?.ok().map(|a| a.value)
            })?;
            self.acked.push((at, text));
        }
        Ok(())
    }
}

fn leader(c: &mut Cluster) -> Option<NodeId> {
    let mut nodes = c.nodes.values().map(|n| n.status());
    nodes.find(|s| s.role == Role::Leader).map(|s| s.id)
}

// --- Commands and snapshots as bytes. -----------------------------------------------------

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

// --- The scenario. ------------------------------------------------------------------------

fn main() {
    if let Err(why) = scenario() {
        eprintln!("replicated_log FAILED: {why}");
        std::process::exit(1);
    }
}

fn scenario() -> Res {
    let (began, scratch, mut c) = (Instant::now(), tempfile::tempdir()?, Cluster::default());
    for id in VOTERS {
        c.start(id, scratch.path())?;
    }
    let first = c.until(10, "a leader", leader)?;
    c.write(&VOTERS, "before", 20)?;
    println!("ok: three nodes elected node {first}; 20 strings committed, proposed via each");

    // Kill the leader: the two others must elect one of themselves and go on committing.
    // Dropped, it loses all it held in memory, as in a crash; its data directory stays.
    let had = c.nodes.remove(&first).ok_or("gone")?.raft().applied();
    let second = c.until(10, "a new leader", leader)?;
    let up: Vec<NodeId> = c.nodes.keys().copied().collect();
    c.write(&up, "while-down", 30)?;
    let compacted = c.nodes[&second].status().snapshot_index;
    println!("ok: killed node {first} (applied to {had}); node {second} took over");
    println!("ok: 30 strings committed by two nodes of three; the leader compacted to {compacted}");

    // Restart it from its data directory: it must find all it had applied, then catch up.
    let (snapshot, last) = c.start(first, scratch.path())?;
    if last < had {
        return Err(format!("node {first} recovered only up to {last}").into());
    }
    println!("ok: restarted node {first}: its disk held snapshot {snapshot} and log to {last}");
    c.write(&[first], "after", 10)?;
    // The leader's log starts after `compacted`: only a snapshot can bring the node there.
    let by = if compacted > last { "snapshot" } else { "log" };
    println!("ok: 10 strings committed through node {first}, caught up from the leader's {by}");

    // All three must reach the same applied index, with nothing committed left to apply,
    // and hold the same list; every acknowledged string must be where its client was told.
    let (applied, list) = c.until(15, "all three nodes to agree", |c| {
        let mut views = c.nodes.values().map(|n| (n.status(), &n.machine().0));
        let (s, list) = views.next()?;
        let same = views.all(|(t, l)| t.applied == s.applied && l == list);
        let all = same && c.nodes.len() == VOTERS.len();
        (all && s.commit == s.applied).then(|| (s.applied, list.clone()))
    })?;
    let wrong = c.acked.iter().find(|(at, s)| list.get(at - 1) != Some(s));
    if let Some((at, text)) = wrong {
        return Err(format!("{text:?} was acknowledged at position {at} but is not there").into());
    }
    let (strings, acked) = (list.len(), c.acked.len());
    println!("ok: all three applied to {applied} and hold the same {strings} strings");
    println!("ok: each of the {acked} acknowledged strings is where its client was told");
    println!("ok: verified in {:.1?}", began.elapsed());
    Ok(())
}
