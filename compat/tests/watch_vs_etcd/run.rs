//! The two sides in lockstep: a step (a KV or lease request, a watch, a cancel, an expiry)
//! applied to both and their answers compared, and a whole sequence run to its end, every
//! stream compared then.

use crate::answers::{same_answer, watch_response};
use crate::generate::{gen_action, Model, Rng};
use crate::requests::*;
use crate::side::{call, sides, Side};
use crate::streams::{compare_stream, describe};
use crate::{MEMBERS, SETTLE_TIMEOUT};
use etcd_client::LeaseTimeToLiveOptions;
use std::time::{Duration, Instant};

/// Run one KV request on both sides; their answers must match.
pub async fn both_kv(
    etcd: &mut Side,
    raftkv: &mut Side,
    req: &Req,
    step: usize,
    m: &mut Model,
) -> Result<(), String> {
    let ((a, ha), (b, _)) = tokio::join!(etcd.kv(req), raftkv.kv(req));
    if std::env::var_os("WATCH_VS_ETCD_TRACE").is_some() {
        println!("step {step}: {req:?}\n  {a}");
    }
    if !same_answer(&a, &b) {
        // What each side holds now, to read the difference by.
        let all = Req::Get {
            m: req.member(),
            span: span("\0", &[0]),
            opts: RangeOpts::default(),
        };
        let ((sa, _), (sb, _)) = tokio::join!(etcd.kv(&all), raftkv.kv(&all));
        return Err(format!(
            "step {step}: {req:?}\n  etcd:   {a}\n  raftkv: {b}\nafter it, etcd holds {sa}\n  \
             and raftkv {sb}"
        ));
    }
    if let Some(h) = ha {
        m.rev = m.rev.max(h);
    }
    if let (Req::Compact { revision, .. }, Some(_)) = (req, ha) {
        m.compact = *revision;
        m.from_past = false;
    }
    if let Some(leases) = &mut m.leases {
        match req {
            Req::LeaseGrant { id, .. } if ha.is_some() => {
                leases.insert(*id);
            }
            Req::LeaseRevoke { id, .. } if ha.is_some() => {
                leases.remove(id);
            }
            _ => {}
        }
    }
    Ok(())
}

pub async fn both<T, E: std::fmt::Display>(
    a: impl std::future::Future<Output = Result<T, E>>,
    b: impl std::future::Future<Output = Result<T, E>>,
) -> Result<(T, T), String> {
    let (a, b) = tokio::join!(a, b);
    Ok((a.map_err(|e| e.to_string())?, b.map_err(|e| e.to_string())?))
}

#[derive(Default)]
pub struct Counts {
    pub steps: usize,
    pub watchers: usize,
    pub events: usize,
    pub prev_kvs: usize,
    pub refused: usize,
    pub compacted: usize,
    pub canceled: usize,
    pub lease_requests: usize,
    pub expired: usize,
}

/// A step of a sequence.
#[derive(Clone, Debug)]
pub enum Action {
    Kv(Req),
    /// A create request on a new stream on `member` (`stream` None) or on an existing one.
    Watch {
        stream: Option<usize>,
        member: usize,
        spec: WatchSpec,
    },
    Cancel {
        stream: usize,
        id: i64,
    },
    /// A short lease granted on `member`, `attach` (writes putting keys on it) run, then
    /// nothing until it has expired on both sides: expiry is the one thing neither side
    /// does at a step of the sequence, so the sequence waits for it.
    Expire {
        member: usize,
        id: i64,
        ttl: i64,
        attach: Vec<Req>,
    },
}

/// The two sides in lockstep.
pub struct Run {
    pub etcd: Side,
    pub raftkv: Side,
    pub m: Model,
    pub watchers: usize,
    /// Lease requests, and leases that expired.
    pub lease_requests: usize,
    pub expired: usize,
    /// Differences in watch answers, when collected rather than ending the run.
    pub diffs: Option<Vec<String>>,
}

impl Run {
    /// Fresh clusters, one write (`a` = `first`), and the observer: every key from that
    /// write, with prev_kv, on member 0 — stream 0. `leases`: whether the sequence has
    /// lease steps.
    pub async fn new(members: u16, leases: bool) -> Result<Run, String> {
        let (etcd, raftkv, e0) = sides(members).await;
        let mut r = Run {
            etcd,
            raftkv,
            m: Model::new(e0, leases),
            watchers: 0,
            lease_requests: 0,
            expired: 0,
            diffs: None,
        };
        r.apply(0, &Action::Kv(put("a", "first"))).await?;
        let observer = WatchSpec {
            start: r.m.rev,
            prev_kv: true,
            ..watch_spec(span("\0", &[0]))
        };
        r.apply(
            0,
            &Action::Watch {
                stream: None,
                member: 0,
                spec: observer,
            },
        )
        .await?;
        Ok(r)
    }

    pub async fn apply(&mut self, step: usize, action: &Action) -> Result<(), String> {
        let (etcd, raftkv, m) = (&mut self.etcd, &mut self.raftkv, &mut self.m);
        match action {
            Action::Expire {
                member,
                id,
                ttl,
                attach,
            } => {
                let grant = Req::LeaseGrant {
                    m: *member,
                    id: *id,
                    ttl: *ttl,
                };
                both_kv(etcd, raftkv, &grant, step, m).await?;
                let granted = Instant::now();
                // The lease lives a second or two from here: a write or read the two sides
                // answer differently long after the grant may have met its expiry on one
                // side only (a machine too slow for the test, not a difference).
                let late = |e: String| {
                    let ms = granted.elapsed().as_millis();
                    if ms > 500 {
                        format!("{e}\n({ms} ms after the grant of lease {id}, ttl {ttl})")
                    } else {
                        e
                    }
                };
                for req in attach {
                    both_kv(etcd, raftkv, req, step, m).await.map_err(late)?;
                }
                // The keys on it, as both say (etcd's, to check the deletes by).
                let on_it = Req::LeaseTtl {
                    m: *member,
                    id: *id,
                    keys: true,
                };
                both_kv(etcd, raftkv, &on_it, step, m).await.map_err(late)?;
                let o = LeaseTimeToLiveOptions::new().with_keys();
                let mut keys = call(etcd.clients[0].lease_time_to_live(*id, Some(o)))
                    .await
                    .map_err(|e| format!("etcd: TimeToLive of lease {id}: {e}"))?
                    .keys()
                    .to_vec();
                keys.sort();
                let before = m.rev;
                both(etcd.expired(*id), raftkv.expired(*id)).await?;
                // Its keys went at one revision, the same on both, and every watcher sees
                // their deletes in one response. A side's TimeToLive may say "gone" a moment
                // before the member read from has applied the revoke (etcd answers it on
                // the leader): wait for the revision to get there, not past.
                let want = if keys.is_empty() { before } else { before + 1 };
                let deadline = Instant::now() + SETTLE_TIMEOUT;
                let (a, b) = loop {
                    let (a, b) = tokio::join!(etcd.revision(), raftkv.revision());
                    if (a >= want && b >= want) || Instant::now() > deadline {
                        break (a, b);
                    }
                    tokio::time::sleep(Duration::from_millis(20)).await;
                };
                if a != want || b != want {
                    return Err(format!(
                        "step {step}: lease {id} with keys {keys:?} expired at revision {before}; \
                         now etcd is at revision {a}, raftkv at {b}"
                    ));
                }
                m.rev = a;
                if !keys.is_empty() {
                    both(etcd.settle(a, Some(0)), raftkv.settle(a, Some(0))).await?;
                    for side in [&*etcd, &*raftkv] {
                        let (responses, events) = side.observed_at(a);
                        let deletes: Vec<(i32, Vec<u8>)> =
                            keys.iter().map(|k| (1, k.clone())).collect();
                        if responses != 1 || events != deletes {
                            return Err(format!(
                                "step {step}: lease {id} expired: {}'s observer has {events:?} \
                                 at revision {a} in {responses} responses, not the deletes of \
                                 {keys:?} in one",
                                side.name()
                            ));
                        }
                    }
                }
                if let Some(l) = &mut m.leases {
                    l.remove(id);
                }
                self.lease_requests += 2 + attach.len();
                self.expired += 1;
                let gone = Req::LeaseTtl {
                    m: *member,
                    id: *id,
                    keys: true,
                };
                both_kv(etcd, raftkv, &gone, step, m).await
            }
            Action::Kv(req) => {
                if matches!(req, Req::LeaseGrant { .. } | Req::LeaseRevoke { .. })
                    || req.reads_leases()
                {
                    self.lease_requests += 1;
                }
                if let Req::Compact { .. } = req {
                    // Every watcher has what it is due, and etcd's catching-up ones are
                    // synced (see main.rs's header).
                    both(etcd.settle(m.rev, None), raftkv.settle(m.rev, None)).await?;
                    if m.from_past {
                        etcd.etcd_synced().await?;
                    }
                }
                both_kv(etcd, raftkv, req, step, m).await
            }
            Action::Watch {
                stream,
                member,
                spec,
            } => {
                let on = stream.map_or(*member, |s| etcd.streams[s].member);
                both(etcd.caught_up(on, m.rev), raftkv.caught_up(on, m.rev)).await?;
                let (s, _) = both(
                    etcd.watch(*stream, on, spec, m.compact),
                    raftkv.watch(*stream, on, spec, m.compact),
                )
                .await?;
                let k = etcd.streams[s].creates.len() - 1;
                let (a, b) = both(etcd.created(s, k), raftkv.created(s, k)).await?;
                let (a, b) = (watch_response(&a), watch_response(&b));
                if a != b {
                    let d = format!(
                        "step {step}: stream {s} (member {on}) {}\n  etcd:   {a}\n  raftkv: {b}",
                        describe(spec)
                    );
                    match &mut self.diffs {
                        Some(diffs) => diffs.push(d),
                        None => return Err(d),
                    }
                }
                if spec.start != 0 && spec.start <= m.rev {
                    m.from_past = true;
                }
                self.watchers += 1;
                Ok(())
            }
            Action::Cancel { stream, id } => {
                let s = *stream;
                let live = etcd
                    .parsed(s)
                    .slots
                    .iter()
                    .enumerate()
                    .rev()
                    .find(|(_, x)| x.open() && x.id() == Some(*id))
                    .map(|(k, _)| k);
                let on = etcd.streams[s].member;
                // Its events first: etcd sends a cancel's answer and pending events in
                // either order.
                both(etcd.settle(m.rev, Some(s)), raftkv.settle(m.rev, Some(s))).await?;
                both(etcd.caught_up(on, m.rev), raftkv.caught_up(on, m.rev)).await?;
                both(
                    call(etcd.streams[s].tx.cancel(*id)),
                    call(raftkv.streams[s].tx.cancel(*id)),
                )
                .await?;
                if let Some(k) = live {
                    let (a, b) = both(etcd.canceled(s, k), raftkv.canceled(s, k)).await?;
                    let (a, b) = (watch_response(&a), watch_response(&b));
                    if a != b {
                        let d = format!(
                            "step {step}: cancel {id} on stream {s} (member {on})\n  \
                             etcd:   {a}\n  raftkv: {b}"
                        );
                        match &mut self.diffs {
                            Some(diffs) => diffs.push(d),
                            None => return Err(d),
                        }
                    }
                }
                Ok(())
            }
        }
    }

    /// Wait for every watcher to have what it is due, then a moment for anything that
    /// should not come; compare every stream (`batches`: how events were grouped into
    /// responses too).
    pub async fn finish(&mut self, batches: bool) -> Result<Counts, String> {
        let rev = self.m.rev;
        both(self.etcd.settle(rev, None), self.raftkv.settle(rev, None)).await?;
        tokio::time::sleep(Duration::from_millis(300)).await;
        let mut c = Counts {
            watchers: self.watchers,
            lease_requests: self.lease_requests,
            expired: self.expired,
            ..Counts::default()
        };
        for s in 0..self.etcd.streams.len() {
            let (a, b) = (self.etcd.parsed(s), self.raftkv.parsed(s));
            for x in &a.slots {
                c.events += x.events.len();
                c.refused += usize::from(x.refused());
                c.compacted += usize::from(x.compacted.is_some());
                c.canceled += usize::from(x.canceled.is_some());
                c.prev_kvs += x.events.iter().filter(|e| e.prev_kv.is_some()).count();
            }
            if let Some(d) = compare_stream(s, &self.etcd.streams[s].creates, &a, &b, batches) {
                let d = format!(
                    "at the end, stream {s} (member {}): {d}",
                    self.etcd.streams[s].member
                );
                match &mut self.diffs {
                    Some(diffs) => diffs.push(d),
                    None => return Err(d),
                }
            }
        }
        match &self.diffs {
            Some(diffs) if !diffs.is_empty() => Err(diffs.join("\n")),
            _ => Ok(c),
        }
    }
}

pub async fn run_seed(seed: u64, steps: usize, leases: bool) -> Result<Counts, String> {
    let mut run = Run::new(MEMBERS, leases).await?;
    let mut rng = Rng(seed);
    for step in 1..=steps {
        if let Some(a) = gen_action(&mut rng, &run) {
            if let Err(e) = run.apply(step, &a).await {
                // Most failures name their step; a call that failed outright does not.
                let e = if e.starts_with("step ") {
                    e
                } else {
                    let what: String = format!("{a:?}").chars().take(400).collect();
                    format!("step {step} ({what}): {e}")
                };
                let (de, dr) = (run.etcd.cluster.exited(), run.raftkv.cluster.exited());
                if de.is_empty() && dr.is_empty() {
                    return Err(e);
                }
                return Err(format!(
                    "{e}\n(members that exited: etcd's {de:?}, raftkv's {dr:?}; with nothing in \
                     their logs, signalled from outside the test)"
                ));
            }
        }
    }
    let mut c = run.finish(false).await?;
    c.steps = steps;
    Ok(c)
}

pub fn watch_on(stream: Option<usize>, spec: WatchSpec) -> Action {
    Action::Watch {
        stream,
        member: 0,
        spec,
    }
}

pub async fn run_actions(members: u16, actions: &[Action]) -> Result<Counts, String> {
    let mut run = Run::new(members, false).await?;
    for (i, a) in actions.iter().enumerate() {
        run.apply(i + 1, a).await?;
    }
    run.finish(true).await
}
