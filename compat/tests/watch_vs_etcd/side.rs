//! One side of the differential: a cluster (etcd's or raftkv's), a client per member and
//! the watch streams opened on it; how a request is sent and its answer rendered, and the
//! waits that make a step deterministic (a member caught up, a watcher settled, a lease
//! expired, etcd's watchers synced).

use crate::answers::*;
use crate::requests::*;
use crate::streams::*;
use crate::support::{self, grpc_error, Cluster, Kind, Timing};
use crate::{CALL_TIMEOUT, INNER_HEADERS, LEASE_READ_HEADERS, PORTS, SETTLE_TIMEOUT};
use etcd_client::proto::{PbResponseHeader, PbWatchResponse};
use etcd_client::{
    Client, CompactionOptions, Error, GetOptions, LeaseGrantOptions, LeaseTimeToLiveOptions,
};
use std::fmt::Write as _;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub struct Side {
    pub kind: Kind,
    /// This side's revision + `off` is etcd's.
    pub off: i64,
    pub clients: Vec<Client>,
    pub streams: Vec<WStream>,
    pub cluster: Cluster,
}

pub async fn call<T>(f: impl std::future::Future<Output = Result<T, Error>>) -> Result<T, String> {
    match tokio::time::timeout(CALL_TIMEOUT, f).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(grpc_error(&e)),
        Err(_) => Err("timed out".into()),
    }
}

/// An etcd side and a raftkv side, `members` members each, and etcd's revision now: both
/// fresh, raftkv's revision numbering measured against etcd's (see main.rs's header).
pub async fn sides(members: u16) -> (Side, Side, i64) {
    let (e, r) = support::start_both(members, PORTS, Timing::QUICK).await;
    let (mut etcd, mut raftkv) = tokio::join!(Side::new(e), Side::new(r));
    let (e0, r0) = tokio::join!(etcd.revision(), raftkv.revision());
    raftkv.off = e0 - r0;
    (etcd, raftkv, e0)
}

impl Side {
    pub async fn new(cluster: Cluster) -> Side {
        let mut clients = Vec::new();
        for i in 0..cluster.endpoints.len() {
            clients.push(cluster.client(i).await);
        }
        Side {
            kind: cluster.kind,
            off: 0,
            clients,
            streams: Vec::new(),
            cluster,
        }
    }

    pub fn name(&self) -> &'static str {
        self.kind.name()
    }

    /// The store's revision as member 0 reports it (linearizable).
    pub async fn revision(&mut self) -> i64 {
        let r = call(self.clients[0].get("revision?", None)).await.unwrap();
        from_side(self.off, r.header().unwrap().revision())
    }

    /// Run a KV or lease request: the rendered answer, and etcd's header revision of it
    /// (for lease reads too: see `LEASE_READ_HEADERS`).
    pub async fn kv(&mut self, req: &Req) -> (String, Option<i64>) {
        self.kv_rendered(req, INNER_HEADERS, LEASE_READ_HEADERS)
            .await
    }

    /// `kv`, with the headers inside transactions and of lease reads, or without.
    pub async fn kv_rendered(
        &mut self,
        req: &Req,
        inner: bool,
        lease_headers: bool,
    ) -> (String, Option<i64>) {
        if req.reads_leases() {
            // Each member's lease state is what it has applied (etcd answers TimeToLive and
            // KeepAlive on the leader, LeaseLeases on any member, without a ReadIndex): a
            // linearizable read on every member first, so each has applied every lease
            // change answered so far.
            for c in &mut self.clients {
                if let Err(e) = call(c.get("applied?", None)).await {
                    return (e, None);
                }
            }
        }
        let off = self.off;
        let c = &mut self.clients[req.member()];
        let lease_header = |h: &Option<PbResponseHeader>| {
            if lease_headers {
                header(h)
            } else {
                "rev -".to_string()
            }
        };
        let rendered = match req {
            Req::Put {
                key,
                value,
                prev_kv,
                ignore_value,
                lease,
                ignore_lease,
                ..
            } => call(c.put(
                key.clone(),
                value.clone(),
                Some(put_options(*prev_kv, *ignore_value, *lease, *ignore_lease)),
            ))
            .await
            .map(|mut r| {
                fix_header(&mut r.0.header, off);
                if let Some(k) = &mut r.0.prev_kv {
                    fix_kv(k, off);
                }
                let h = r.0.header.as_ref().map(|h| h.revision);
                let s = format!(
                    "put {} prev {}",
                    header(&r.0.header),
                    r.0.prev_kv.as_ref().map_or("none".into(), kv)
                );
                (s, h)
            }),
            Req::Delete { span, prev_kv, .. } => {
                call(c.delete(span.key.clone(), Some(delete_options(span, *prev_kv))))
                    .await
                    .map(|mut r| {
                        fix_header(&mut r.0.header, off);
                        r.0.prev_kvs.iter_mut().for_each(|k| fix_kv(k, off));
                        let h = r.0.header.as_ref().map(|h| h.revision);
                        let s = format!(
                            "delete {} deleted {} prev [{}]",
                            header(&r.0.header),
                            r.0.deleted,
                            kvs(&r.0.prev_kvs)
                        );
                        (s, h)
                    })
            }
            Req::Get { span, opts, .. } => {
                call(c.get(span.key.clone(), Some(get_options(span, opts, off))))
                    .await
                    .map(|mut r| {
                        fix_header(&mut r.0.header, off);
                        r.0.kvs.iter_mut().for_each(|k| fix_kv(k, off));
                        let h = r.0.header.as_ref().map(|h| h.revision);
                        let s = format!(
                            "range {} count {} more {} [{}]",
                            header(&r.0.header),
                            r.0.count,
                            r.0.more,
                            kvs(&r.0.kvs)
                        );
                        (s, h)
                    })
            }
            Req::Txn { txn, .. } => call(c.txn(build_txn(txn, off))).await.map(|mut r| {
                fix_txn(&mut r.0, off);
                let h = r.0.header.as_ref().map(|h| h.revision);
                (format!("txn {}", render_txn(&r.0, 0, inner)), h)
            }),
            Req::Compact {
                revision, physical, ..
            } => {
                let o = physical.then(|| CompactionOptions::new().with_physical());
                call(c.compact(to_side(off, *revision), o))
                    .await
                    .map(|mut r| {
                        fix_header(&mut r.0.header, off);
                        let h = r.0.header.as_ref().map(|h| h.revision);
                        (format!("compact {}", header(&r.0.header)), h)
                    })
            }
            Req::LeaseGrant { id, ttl, .. } => {
                let o = LeaseGrantOptions::new().with_id(*id);
                call(c.lease_grant(*ttl, Some(o))).await.map(|mut r| {
                    fix_header(&mut r.0.header, off);
                    let h = r.0.header.as_ref().map(|h| h.revision);
                    let s = format!(
                        "lease grant {} id {} ttl {} error {:?}",
                        header(&r.0.header),
                        r.0.id,
                        r.0.ttl,
                        r.0.error
                    );
                    (s, h)
                })
            }
            Req::LeaseRevoke { id, .. } => call(c.lease_revoke(*id)).await.map(|mut r| {
                fix_header(&mut r.0.header, off);
                let h = r.0.header.as_ref().map(|h| h.revision);
                (format!("lease revoke {}", header(&r.0.header)), h)
            }),
            Req::LeaseTtl { id, keys, .. } => {
                let o = keys.then(|| LeaseTimeToLiveOptions::new().with_keys());
                call(c.lease_time_to_live(*id, o)).await.map(|mut r| {
                    fix_header(&mut r.0.header, off);
                    // etcd's keys come from a Go map: in no set order.
                    let mut keys: Vec<String> = r.0.keys.iter().map(|k| value(k)).collect();
                    keys.sort();
                    let s = format!(
                        "lease ttl {} id {} remaining {} granted {} keys [{}]",
                        lease_header(&r.0.header),
                        r.0.id,
                        remaining(r.0.ttl),
                        r.0.granted_ttl,
                        keys.join(", ")
                    );
                    (s, None)
                })
            }
            Req::LeaseLeases { .. } => call(c.leases()).await.map(|mut r| {
                fix_header(&mut r.0.header, off);
                // etcd's leader lists by expiry, a follower in no set order (see
                // main.rs's header).
                let mut ids: Vec<i64> = r.0.leases.iter().map(|l| l.id).collect();
                ids.sort_unstable();
                let s = format!("leases {} {ids:?}", lease_header(&r.0.header));
                (s, None)
            }),
            Req::LeaseKeepAlive { id, .. } => {
                // The crate reads the first answer itself (an error if its TTL is 0) and
                // keeps only the id: the answer compared is the second's.
                let once = async {
                    let (mut keeper, mut stream) = c.lease_keep_alive(*id).await?;
                    keeper.keep_alive().await?;
                    stream.message().await
                };
                call(once).await.map(|r| match r {
                    Some(mut r) => {
                        fix_header(&mut r.0.header, off);
                        let s = format!(
                            "keepalive {} id {} ttl {}",
                            lease_header(&r.0.header),
                            r.0.id,
                            r.0.ttl
                        );
                        (s, None)
                    }
                    None => ("keepalive stream ended".to_string(), None),
                })
            }
        };
        match rendered {
            Ok((s, h)) => (s, h),
            Err(e) => (e, None),
        }
    }

    /// Wait until member `m` has applied revision `rev` (a serializable read there shows
    /// it).
    pub async fn caught_up(&mut self, m: usize, rev: i64) -> Result<(), String> {
        let deadline = Instant::now() + SETTLE_TIMEOUT;
        loop {
            let r = call(
                self.clients[m].get("caught-up?", Some(GetOptions::new().with_serializable())),
            )
            .await?;
            let at = from_side(self.off, r.header().map_or(0, |h| h.revision()));
            if at >= rev {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "{} member {m} stayed at revision {at}, below {rev}",
                    self.name()
                ));
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }

    /// The observer's events at revision `rev` (type, key), and how many responses they
    /// came in.
    pub fn observed_at(&self, rev: i64) -> (usize, Vec<(i32, Vec<u8>)>) {
        let p = self.parsed(0);
        let slot = &p.slots[0];
        let responses = slot
            .batches
            .iter()
            .filter(|(_, revs, _)| revs.contains(&rev))
            .count();
        let mut events: Vec<(i32, Vec<u8>)> = slot
            .events
            .iter()
            .filter_map(|e| {
                let k = e.kv.as_ref()?;
                (k.mod_revision == rev).then(|| (e.r#type, k.key.clone()))
            })
            .collect();
        events.sort();
        (responses, events)
    }

    /// Wait until lease `id` is gone (TimeToLive answers -1 on member 0).
    pub async fn expired(&mut self, id: i64) -> Result<(), String> {
        let deadline = Instant::now() + SETTLE_TIMEOUT;
        loop {
            let r = call(self.clients[0].lease_time_to_live(id, None))
                .await
                .map_err(|e| format!("{}: TimeToLive of lease {id}: {e}", self.name()))?;
            if r.ttl() == -1 {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "{}: lease {id} still has {} s left after {SETTLE_TIMEOUT:?}",
                    self.name(),
                    r.ttl()
                ));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Send a create request: on a new stream on member `m` (`stream` None) or an
    /// existing one. Returns the stream's index.
    pub async fn watch(
        &mut self,
        stream: Option<usize>,
        m: usize,
        spec: &WatchSpec,
        compact: i64,
    ) -> Result<usize, String> {
        let o = watch_options(spec, self.off);
        match stream {
            Some(s) => {
                let st = &mut self.streams[s];
                call(st.tx.watch(spec.span.key.clone(), Some(o))).await?;
                st.creates.push((spec.clone(), compact));
                Ok(s)
            }
            None => {
                let ws = call(self.clients[m].watch(spec.span.key.clone(), Some(o))).await?;
                let (tx, mut rx) = ws.split();
                let log = Arc::new(Mutex::new(Log::default()));
                let (l, off) = (log.clone(), self.off);
                let reader = tokio::spawn(async move {
                    loop {
                        let r = rx.message().await;
                        let mut l = l.lock().unwrap();
                        match r {
                            Ok(Some(mut r)) => {
                                fix_watch(&mut r.0, off);
                                l.responses.push(r.0);
                            }
                            Ok(None) => {
                                l.end = Some("ended".into());
                                return;
                            }
                            Err(e) => {
                                l.end = Some(grpc_error(&e));
                                return;
                            }
                        }
                    }
                });
                self.streams.push(WStream {
                    member: m,
                    tx,
                    log,
                    reader,
                    creates: vec![(spec.clone(), compact)],
                });
                Ok(self.streams.len() - 1)
            }
        }
    }

    pub fn parsed(&self, s: usize) -> Parsed {
        let st = &self.streams[s];
        parse(&st.log.lock().unwrap(), st.creates.len())
    }

    /// Wait for the answer to stream `s`'s create request `k`.
    pub async fn created(&self, s: usize, k: usize) -> Result<PbWatchResponse, String> {
        let deadline = Instant::now() + SETTLE_TIMEOUT;
        loop {
            let p = self.parsed(s);
            if let Some(c) = &p.slots[k].created {
                return Ok(c.clone());
            }
            if p.end.is_some() || Instant::now() > deadline {
                return Err(format!(
                    "{}: no created response for create {k} of stream {s} (stream {:?})",
                    self.name(),
                    p.end
                ));
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }

    /// Wait for the cancel answer of stream `s`'s watcher `k`.
    pub async fn canceled(&self, s: usize, k: usize) -> Result<PbWatchResponse, String> {
        let deadline = Instant::now() + SETTLE_TIMEOUT;
        loop {
            let p = self.parsed(s);
            if let Some(c) = &p.slots[k].canceled {
                return Ok(c.clone());
            }
            if p.end.is_some() || Instant::now() > deadline {
                return Err(format!(
                    "{}: no cancel response for watcher {k} of stream {s} (stream {:?})",
                    self.name(),
                    p.end
                ));
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }

    /// Wait until etcd has no watcher catching up from history (unsynced, its "slow"
    /// watchers), on any member: its metrics say so.
    pub async fn etcd_synced(&self) -> Result<(), String> {
        let endpoints = self.cluster.endpoints.clone();
        tokio::task::spawn_blocking(move || {
            let deadline = Instant::now() + SETTLE_TIMEOUT;
            for e in &endpoints {
                loop {
                    let slow = metric(e, "etcd_debugging_mvcc_slow_watcher_total")?;
                    if slow == 0 {
                        break;
                    }
                    if Instant::now() > deadline {
                        return Err(format!("etcd {e} kept {slow} unsynced watchers"));
                    }
                    std::thread::sleep(Duration::from_millis(5));
                }
            }
            Ok(())
        })
        .await
        .unwrap()
    }

    /// A stream's create requests and responses, for a failure message.
    pub fn dump(&self, s: usize) -> String {
        let st = &self.streams[s];
        let mut out = format!("stream {s} on member {}, create requests:\n", st.member);
        for (k, (spec, compact)) in st.creates.iter().enumerate() {
            let _ = writeln!(out, "  {k}: {} (compacted at {compact})", describe(spec));
        }
        out.push_str("responses:\n");
        for r in &st.log.lock().unwrap().responses {
            let _ = writeln!(out, "  {}", watch_response(r));
        }
        out
    }

    /// Every event up to `rev`, from the observer (stream 0's first watcher): revision,
    /// type, key.
    pub fn history(&self) -> Vec<(i64, i32, Vec<u8>)> {
        self.parsed(0).slots[0]
            .events
            .iter()
            .filter_map(|e| {
                let k = e.kv.as_ref()?;
                Some((k.mod_revision, e.r#type, k.key.clone()))
            })
            .collect()
    }

    /// Wait until every watcher (of stream `only`, or of all streams) has received every
    /// event due to it up to `rev`, or its compaction cancel if it is due one.
    pub async fn settle(&self, rev: i64, only: Option<usize>) -> Result<(), String> {
        let deadline = Instant::now() + SETTLE_TIMEOUT;
        let history = loop {
            let h = self.history();
            if h.last().map_or(0, |e| e.0) >= rev {
                break h;
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "{}: the observer (every key from the first write) reached revision {}, \
                     not {rev}",
                    self.name(),
                    h.last().map_or(0, |e| e.0)
                ));
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        };
        let streams: Vec<usize> = match only {
            Some(s) => vec![s],
            None => (0..self.streams.len()).collect(),
        };
        for s in streams {
            loop {
                let p = self.parsed(s);
                let mut waiting = None;
                for (k, slot) in p.slots.iter().enumerate() {
                    let Some(c) = &slot.created else { continue };
                    if !slot.open() || slot.compacted.is_some() {
                        continue;
                    }
                    let (spec, compact) = &self.streams[s].creates[k];
                    if spec.start > 0 && spec.start < *compact {
                        waiting = Some((k, "its compaction cancel".to_string()));
                        break;
                    }
                    let from = if spec.start == 0 {
                        c.header.as_ref().map_or(0, |h| h.revision) + 1
                    } else {
                        spec.start
                    };
                    let due = history
                        .iter()
                        .filter(|(r, t, key)| {
                            *r >= from
                                && *r <= rev
                                && spec.span.holds(key)
                                && !(*t == 0 && spec.no_put)
                                && !(*t == 1 && spec.no_delete)
                        })
                        .map(|e| e.0)
                        .max();
                    if let Some(due) = due {
                        if slot.last_rev() < due {
                            waiting = Some((
                                k,
                                format!(
                                    "events up to revision {due} (has up to {})",
                                    slot.last_rev()
                                ),
                            ));
                            break;
                        }
                    }
                }
                let Some((k, what)) = waiting else { break };
                if p.end.is_some() || Instant::now() > deadline {
                    return Err(format!(
                        "{}: watcher {k} of stream {s} ({}) did not receive {what} within \
                         {SETTLE_TIMEOUT:?} (stream: {:?})\n{}",
                        self.name(),
                        describe(&self.streams[s].creates[k].0),
                        p.end,
                        self.dump(s)
                    ));
                }
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        }
        Ok(())
    }
}

/// A gauge from etcd's metrics (served on its client URL).
pub fn metric(endpoint: &str, name: &str) -> Result<i64, String> {
    let (_, body) = support::http_get(endpoint, "/metrics", CALL_TIMEOUT)?;
    body.lines()
        .find_map(|l| l.strip_prefix(name)?.trim().parse::<f64>().ok())
        .map(|v| v as i64)
        .ok_or_else(|| format!("no {name} in etcd's metrics"))
}
