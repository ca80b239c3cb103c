//! What a scenario is made of: its context (the supervisor, the cast, the client's session)
//! and the steps it takes on the real cluster — cut, kill, write, wait and check — each
//! bounded in time and saying what it saw.

use super::*;
/// A running scenario's hands and eyes.
pub(super) struct Ctx {
    pub(super) sup: Arc<Supervisor>,
    pub(super) cast: Cast,
    pub(super) next: Arc<Notify>,
    pub(super) step: std::sync::atomic::AtomicUsize,
    pub(super) key: String,
}

pub(super) type Attempt = tokio::task::JoinHandle<Result<i64, String>>;

impl Ctx {
    /// Run the next step: wait for the user's Next (not for the first), act, report.
    pub(super) async fn step<F, T>(&self, f: F) -> Result<T, String>
    where
        F: std::future::Future<Output = Result<(T, Option<String>), String>>,
    {
        let i = self.step.fetch_add(1, Ordering::SeqCst);
        if i > 0 {
            self.next.notified().await;
        }
        self.sup.runner.set(i, "running", None);
        match f.await {
            Ok((v, outcome)) => {
                self.sup.runner.set(i, "done", outcome);
                Ok(v)
            }
            Err(e) => {
                self.sup.runner.set(i, "failed", Some(e.clone()));
                Err(e)
            }
        }
    }

    pub(super) fn view(&self) -> Arc<ClusterView> {
        self.sup.collector().latest()
    }

    /// Wait until `f` finds what it looks for in the latest view.
    pub(super) async fn until<T>(
        &self,
        what: &str,
        f: impl Fn(&ClusterView) -> Option<T>,
    ) -> Result<T, String> {
        let deadline = Instant::now() + STEP_TIMEOUT;
        loop {
            if let Some(v) = f(&self.view()) {
                return Ok(v);
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "did not see {what} within {}s ({})",
                    STEP_TIMEOUT.as_secs(),
                    summary(&self.view())
                ));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// A leader among `among` in a term above the cast's.
    pub(super) async fn new_leader(&self, among: &[&str]) -> Result<(String, u64), String> {
        let min = self.cast.term;
        self.until("a new leader", |v| {
            v.members
                .iter()
                .find(|m| {
                    m.reachable
                        && m.role == "leader"
                        && m.term > min
                        && among.contains(&m.name.as_str())
                })
                .map(|m| (m.name.clone(), m.term))
        })
        .await
    }

    pub(super) fn url(&self, name: &str) -> Result<String, String> {
        self.sup
            .client_url(name)
            .ok_or_else(|| format!("no member {name}"))
    }

    pub(super) async fn grant_session(&self, at: &str) -> Result<i64, String> {
        let ch = channel(&self.url(at)?)?;
        let resp = LeaseClient::new(ch)
            .lease_grant(LeaseGrantRequest { ttl: 600, id: 0 })
            .await
            .map_err(|e| format!("granting the session's lease: {}", e.message()))?;
        Ok(resp.into_inner().id)
    }

    /// Start a client's write at `url` in the background (it may never be answered).
    pub(super) fn attempt(
        &self,
        ch: tonic::transport::Channel,
        key: String,
        session: Option<(i64, u64)>,
    ) -> Attempt {
        tokio::spawn(async move { put_on(ch, key, session).await })
    }

    /// How a client's first attempt ended (waiting for its deadline if need be).
    pub(super) async fn first_attempt(attempt: Attempt) -> String {
        match attempt.await {
            Ok(Ok(rev)) => format!("the first attempt was answered (revision {rev})"),
            Ok(Err(e)) => format!("the first attempt failed: {e}"),
            Err(_) => "the first attempt was abandoned".into(),
        }
    }

    /// The key's (version, mod revision), read linearizably at `at`.
    pub(super) async fn read(&self, at: &str, key: &str) -> Result<Option<(i64, i64)>, String> {
        let ch = channel(&self.url(at)?)?;
        let resp = KvClient::new(ch)
            .range(RangeRequest {
                key: key.as_bytes().to_vec().into(),
                ..Default::default()
            })
            .await
            .map_err(|e| format!("reading {key}: {}", e.message()))?;
        Ok(resp
            .into_inner()
            .kvs
            .first()
            .map(|kv| (kv.version, kv.mod_revision)))
    }

    /// Check the key was applied once, by the write answered at `revision`.
    pub(super) async fn applied_once(
        &self,
        at: &str,
        key: &str,
        revision: i64,
    ) -> Result<String, String> {
        match self.read(at, key).await? {
            Some((1, rev)) if rev == revision => Ok(format!("{key}: version 1, revision {rev}")),
            Some((version, rev)) => Err(format!(
                "{key} has version {version} (revision {rev}); expected version 1 at revision {revision}"
            )),
            None => Err(format!("{key} is not in the store")),
        }
    }

    /// Wait for `name`'s entry `index` to be the one `leader` holds there (the repair).
    pub(super) async fn repaired(
        &self,
        name: &str,
        leader: &str,
        index: u64,
        old: u64,
    ) -> Result<String, String> {
        self.until("the old entry overwritten", |v| {
            let m = v.members.iter().find(|m| m.name == name && m.reachable)?;
            let l = v.members.iter().find(|m| m.name == leader && m.reachable)?;
            let mine = m.log.iter().find(|e| e.index == index)?.term;
            let theirs = l.log.iter().find(|e| e.index == index)?.term;
            (mine == theirs && mine != old).then(|| {
                format!("{name}'s entry {index}: term {old} → term {mine}, as on {leader}")
            })
        })
        .await
    }

    /// Cut `a` off and, at once, write `key` there (serial 1 of `session`): within an
    /// election timeout a cut-off leader steps down (CheckQuorum) and would refuse it. The
    /// client's attempt and the index of the entry only `a` holds.
    pub(super) async fn isolate_and_write(
        &self,
        a: &str,
        key: &str,
        session: i64,
    ) -> Result<((Attempt, u64), Option<String>), String> {
        let ch = channel(&self.url(a)?)?;
        let quiet = self.quiet().await?;
        self.sup.isolate(a).await?;
        let attempt = self.attempt(ch, key.to_string(), Some((session, 1)));
        let names = self.sup.names();
        let others: Vec<&str> = names
            .iter()
            .map(String::as_str)
            .filter(|m| *m != a)
            .collect();
        let held = self.held_now(&others).await?;
        let (i, t) = self.uncommitted_on(a, quiet.max(held)).await?;
        let v = self.view();
        if let Some(m) = v
            .members
            .iter()
            .find(|m| m.name != a && m.log.iter().any(|e| e.index == i && e.term == t))
        {
            return Err(format!(
                "entry {i} (term {t}) reached {} through the cut",
                m.name
            ));
        }
        Ok((
            (attempt, i),
            Some(format!("entry {i} (term {t}) is only in {a}'s log")),
        ))
    }

    /// The last index once every member holds it committed: writes still in flight (the
    /// load's, just stopped) must not be taken for the scenario's own.
    pub(super) async fn quiet(&self) -> Result<u64, String> {
        self.until("the cluster quiet", |v| {
            let last = v.members.first()?.last_index;
            v.members
                .iter()
                .all(|m| m.reachable && m.last_index == last && m.commit == last)
                .then_some(last)
        })
        .await
    }

    /// The highest last index among `names`, as they answer now. Asked once a cut has
    /// taken, it bounds what they got from a member cut off from them: an entry that
    /// member appended past it is one the cut kept to itself (not one proposed just
    /// before the cut, already sent).
    pub(super) async fn held_now(&self, names: &[&str]) -> Result<u64, String> {
        let mut held = 0;
        for name in names {
            held = held.max(self.sup.state_now(name).await?.last_index);
        }
        Ok(held)
    }

    /// `name`'s last entry, once it is past `after` and uncommitted there.
    pub(super) async fn uncommitted_on(
        &self,
        name: &str,
        after: u64,
    ) -> Result<(u64, u64), String> {
        self.until("an uncommitted entry", |v| {
            let m = v.members.iter().find(|m| m.name == name && m.reachable)?;
            let last = m.log.last()?;
            (last.index > after && m.last_index > m.commit).then_some((last.index, last.term))
        })
        .await
    }

    pub(super) async fn follows(&self, name: &str, term: u64) -> Result<String, String> {
        self.until("the member back as a follower", |v| {
            let m = v.members.iter().find(|m| m.name == name && m.reachable)?;
            (m.role == "follower" && m.term >= term && m.leader.is_some()).then(|| {
                format!(
                    "{name} follows {} in term {}",
                    m.leader.clone().unwrap_or_default(),
                    m.term
                )
            })
        })
        .await
    }
}

/// What each member showed when a step gave up: enough to tell a slow cluster from a stuck
/// one (role, term, leader, indexes, its last entries, its cuts).
pub(super) fn summary(v: &ClusterView) -> String {
    v.members
        .iter()
        .map(|m| {
            let tail: Vec<String> = m
                .log
                .iter()
                .rev()
                .take(4)
                .rev()
                .map(|e| format!("{}:{}", e.index, e.term))
                .collect();
            format!(
                "{} {}{} term {} leader {} last {} commit {} log [{}] cut from {:?}",
                m.name,
                m.role,
                if m.reachable { "" } else { " (unreachable)" },
                m.term,
                m.leader.as_deref().unwrap_or("none"),
                m.last_index,
                m.commit,
                tail.join(" "),
                m.cut_from
            )
        })
        .collect::<Vec<_>>()
        .join("; ")
}

pub(super) fn channel(url: &str) -> Result<tonic::transport::Channel, String> {
    let e = Endpoint::from_shared(url.to_string())
        .map_err(|e| format!("{url}: {e}"))?
        .connect_timeout(Duration::from_secs(1));
    Ok(server::network::tls::client_dialer().connect_lazy(e))
}

/// A put, tagged with a session and serial number if given; the revision it got.
pub(super) async fn put(
    url: &str,
    key: String,
    session: Option<(i64, u64)>,
) -> Result<i64, String> {
    put_on(channel(url)?, key, session).await
}

pub(super) async fn put_on(
    ch: tonic::transport::Channel,
    key: String,
    session: Option<(i64, u64)>,
) -> Result<i64, String> {
    let mut req = tonic::Request::new(PutRequest {
        key: key.into_bytes().into(),
        value: bytes::Bytes::from_static(b"written by a scenario"),
        ..Default::default()
    });
    req.set_timeout(CLIENT_DEADLINE);
    if let Some((lease, seq)) = session {
        let md = req.metadata_mut();
        md.insert(
            server::services::SESSION,
            lease.to_string().parse().expect("digits"),
        );
        md.insert(
            server::services::SEQ,
            seq.to_string().parse().expect("digits"),
        );
    }
    let resp = KvClient::new(ch)
        .put(req)
        .await
        .map_err(|e| e.message().to_string())?;
    Ok(resp.into_inner().header.map_or(0, |h| h.revision))
}
