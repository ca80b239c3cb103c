//! The raft loop: one task owns the driver and feeds it ticks, peer messages, client
//! requests and storage completions, then publishes what changed (the view, leases,
//! watchers). Everything here runs on that one task.

use super::*;
/// The loop's state: the driver, and what the rest of the member sees of it.
pub(super) struct Loop {
    pub(super) d: KvDriver,
    pub(super) view: Arc<RwLock<View>>,
    pub(super) transport: Arc<dyn Transport>,
    pub(super) data_dir: PathBuf,
    pub(super) added: Added,
    /// Membership changes answered once their entry is durable here rather than applied
    /// (index, term of the entry; the client).
    pub(super) early: Vec<(Index, Term, Waiter<Applied>)>,
    pub(super) watchers: Watchers,
    /// Ticks between periodic progress notifications, and ticks since the last one.
    pub(super) progress_ticks: u64,
    pub(super) ticks: u64,
    /// The lease clock: it counts only while this member leads.
    pub(super) lessor: Lessor,
    pub(super) clock: std::time::Instant,
    /// The loop's own queue, for keep-alives coming back from their leadership check (weak:
    /// the loop must still end when every handle is gone).
    pub(super) inputs: mpsc::WeakSender<Input>,
    pub(super) revision: Arc<std::sync::atomic::AtomicI64>,
    pub(super) in_use: Arc<AtomicU64>,
    pub(super) metrics: Arc<Metrics>,
    /// The leader and role as of the last round (leader changes are counted and logged).
    pub(super) leader: Option<NodeId>,
    pub(super) role: Role,
    /// What the dashboard shows of this member's history (shared with the transport,
    /// which sees the votes and snapshots leave).
    pub(super) chronicle: SharedChronicle,
    pub(super) cluster_id: u64,
    /// See [`NodeConfig::introduced`]; emptied once the applied configuration holds this
    /// member.
    pub(super) introduced: BTreeSet<NodeId>,
}

impl Loop {
    /// The loop. Returns the reason if the member had to stop.
    pub(super) async fn run(
        mut self,
        tick: Duration,
        mut rx: mpsc::Receiver<Input>,
        mut done: mpsc::UnboundedReceiver<Done>,
    ) -> Result<(), String> {
        let mut ticker = tokio::time::interval(tick);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut backlog = false;
        loop {
            if let Some(why) = self.removed() {
                return Err(why);
            }
            tokio::select! {
                _ = ticker.tick() => self.on_tick(),
                _ = self.watchers.wake.notified() => {}
                _ = tokio::time::sleep(CATCH_UP_PAUSE), if backlog => {}
                _ = tokio::task::yield_now(), if self.d.machine().rehome.is_some() => {}
                Some(first) = done.recv() => {
                    self.on_done(first);
                    while let Ok(next) = done.try_recv() {
                        self.on_done(next);
                    }
                }
                input = rx.recv() => {
                    let Some(input) = input else { break };
                    let mut stop = !self.handle(input);
                    for _ in 0..MAX_INPUTS_PER_ROUND {
                        if stop {
                            break;
                        }
                        match rx.try_recv() {
                            Ok(input) => stop = !self.handle(input),
                            Err(_) => break,
                        }
                    }
                    if stop {
                        self.d.shutdown("the member is stopping");
                        return Ok(());
                    }
                }
            }
            self.d.process_ready();
            if let Some(why) = self.d.failure() {
                return Err(why.to_string());
            }
            self.refresh_view();
            self.keep_leases();
            self.rehome_step();
            backlog = self.sync_watchers();
        }
        self.d.shutdown("the member is stopping");
        Ok(())
    }

    /// A step of moving the store's values into the last snapshot's file, if one is
    /// under way: a short pause per turn of the loop, between its other work.
    fn rehome_step(&mut self) {
        let m = self.d.machine_mut();
        let Some(rehome) = m.rehome.as_mut() else {
            return;
        };
        if rehome.step(&mut m.store) {
            tracing::info!(
                bytes = rehome.moved,
                steps = rehome.steps,
                ms = rehome.started.elapsed().as_millis() as u64,
                "values moved into the snapshot file"
            );
            m.rehome = None;
            tokio::task::spawn_blocking(crate::member::machine::give_back_freed_memory);
        }
    }

    fn on_tick(&mut self) {
        self.d.tick();
        self.ticks += 1;
        if self.ticks >= self.progress_ticks {
            self.ticks = 0;
            self.watchers.hub.lock().unwrap().progress_tick();
        }
    }

    /// Hand the revisions applied this round to the watchers, and replay a bounded slice
    /// of history to those behind. Returns whether some are still behind (the loop comes
    /// back soon). Without watchers this is a few comparisons under an uncontended lock.
    fn sync_watchers(&mut self) -> bool {
        let store = &self.d.machine().store;
        self.watchers.hub.lock().unwrap().sync(store)
    }

    fn now(&self) -> kv::lessor::Millis {
        self.clock.elapsed().as_millis() as u64
    }

    /// Whether this member's lease clock runs: it leads and has applied its own term's
    /// first entry, so its store holds every lease the cluster granted.
    fn leading(&self) -> bool {
        let r = self.d.raft();
        r.role() == Role::Leader && r.term_at(r.applied()) == Some(r.term())
    }

    /// Tell the lease clock what applied, and propose what it found: revokes of expired
    /// leases, and checkpoints of long ones. Without leases this is a few comparisons.
    fn keep_leases(&mut self) {
        let revision = self.d.machine().store.revision();
        self.revision
            .store(revision, std::sync::atomic::Ordering::Relaxed);
        self.in_use
            .store(self.d.machine().store.size_bytes(), Ordering::Relaxed);
        let now = self.now();
        for change in std::mem::take(&mut self.d.machine_mut().lease_changes) {
            self.lessor.changed(&change, now);
        }
        let leading = self.leading();
        let work = self.lessor.poll(now, leading, &self.d.machine().store);
        for id in work.revoke {
            tracing::debug!(lease = id, "lease expired; revoking");
            self.propose_own(Write::LeaseRevoke(id));
        }
        if !work.checkpoint.is_empty() {
            self.propose_own(Write::LeaseCheckpoint(work.checkpoint));
        }
    }

    fn propose_own(&mut self, w: Write) {
        self.d
            .propose(|id| command::encode(id, w), Waiter::detached());
    }

    /// Publish what changed of the member's view of its cluster, and reconnect peers if the
    /// registry changed. Cheap when nothing did: a few comparisons of small values.
    pub(super) fn refresh_view(&mut self) {
        self.answer_early();
        self.note_role();
        let r = self.d.raft();
        let (leader, term) = (r.leader(), r.term());
        self.watchers
            .term
            .store(term, std::sync::atomic::Ordering::Relaxed);
        let registry = &self.d.machine().registry;
        let applied = self.d.membership();
        let latest = r.membership();
        if applied.is_some_and(|m| m.contains(r.id())) {
            self.introduced.clear();
        }
        let mut added = self.added.lock().unwrap();
        // Forget what applied, or what the log no longer holds.
        added.retain(|id, _| latest.contains(*id) && !registry.members.contains_key(id));
        let changed = {
            let v = self.view.read().unwrap();
            v.leader != leader
                || v.term != term
                || v.registry != *registry
                || v.applied.as_ref() != applied
                || v.latest.as_ref() != Some(latest)
                || v.pending != *added
                || v.introduced != self.introduced
        };
        if !changed {
            return;
        }
        // Copied only when something changed: this runs after every round of the loop.
        let pending = added.clone();
        drop(added);
        let next = View {
            registry: registry.clone(),
            applied: applied.cloned(),
            latest: Some(latest.clone()),
            pending,
            leader,
            term,
            introduced: self.introduced.clone(),
        };
        let mut v = self.view.write().unwrap();
        if v.registry != next.registry {
            self.transport.set_members(r.id(), &next.registry);
        }
        chronicle_changes(&self.chronicle, &v, &next);
        *v = next;
    }

    /// Count and log leader changes and this member's elections (one line each: what an
    /// operator greps for when a cluster misbehaves).
    fn note_role(&mut self) {
        let r = self.d.raft();
        let (leader, role, term) = (r.leader(), r.role(), r.term());
        let mut events: Vec<(&'static str, String)> = Vec::new();
        if role != self.role {
            match role {
                Role::Leader => {
                    tracing::info!(term, "elected leader");
                    events.push(("election", format!("won the election for term {term}")));
                }
                Role::Candidate => {
                    tracing::info!(term, "campaigning for leadership");
                    events.push(("election", format!("campaigning for term {term}")));
                }
                Role::PreCandidate => {
                    tracing::info!(term, "starting a pre-vote");
                    let next = term + 1;
                    events.push(("election", format!("asking for pre-votes for term {next}")));
                }
                _ if matches!(self.role, Role::Candidate | Role::PreCandidate) => {
                    tracing::info!(term, leader = ?leader.map(|l| format!("{l:x}")), "lost the election");
                    events.push(("election", format!("did not win (term {term})")));
                }
                Role::Follower if self.role == Role::Leader => {
                    tracing::warn!(term, "stepped down from leadership");
                    events.push(("step-down", format!("stepped down in term {term}")));
                }
                _ => {}
            }
            self.role = role;
        }
        if leader != self.leader {
            if let Some(l) = leader {
                self.metrics.leader_changes.inc();
                tracing::info!(term, leader = %format!("{l:x}"), "leader changed");
                let text = format!("the leader is {} (term {term})", insight::hex(l));
                events.push(("leader", text));
            } else {
                tracing::info!(term, "lost the leader");
                events.push(("leader", format!("no leader known (term {term})")));
            }
            self.leader = leader;
        }
        if !events.is_empty() {
            let mut c = self.chronicle.lock().unwrap();
            for (kind, text) in events {
                c.push(kind, text);
            }
        }
    }

    /// This member's state as the dashboard shows it (the request counts are the handle's).
    fn inspect(&self, since: u64) -> MemberState {
        let r = self.d.raft();
        let me = r.id();
        let registry = &self.d.machine().registry;
        let name = |id: NodeId| registry.members.get(&id).map(|m| m.name.clone());
        let last = r.last_index();
        let first = last.saturating_sub(insight::LOG_STRIP - 1).max(1);
        let log = (first..=last)
            .filter_map(|i| r.term_at(i).map(|t| (i, t)))
            .collect();
        let membership = r.membership();
        let members = registry
            .members
            .values()
            .map(|m| insight::MemberInfo {
                id: insight::hex(m.id),
                name: m.name.clone(),
                client_urls: m.client_urls.clone(),
                learner: membership.is_learner(m.id),
            })
            .collect();
        let links = &self.d.transport().links;
        let (events, next_event) = self.chronicle.lock().unwrap().since(since);
        let alarms: Vec<String> = registry
            .alarms
            .iter()
            .map(|(id, kind)| format!("{} on {}", insight::alarm_name(*kind), insight::hex(*id)))
            .collect();
        MemberState {
            id: insight::hex(me),
            name: name(me).unwrap_or_default(),
            cluster_id: insight::hex(self.cluster_id),
            role: insight::role_name(r.role()).to_string(),
            learner: membership.is_learner(me),
            term: r.term(),
            leader: r.leader().map(insight::hex),
            last_index: last,
            commit: r.commit_index(),
            applied: r.applied(),
            snapshot_index: r.snapshot_index(),
            revision: self.d.machine().store.revision(),
            wal_bytes: 0,
            healthy: r.leader().is_some() && alarms.is_empty(),
            alarms,
            members,
            log,
            links: links
                .traffic
                .iter()
                .map(|(id, t)| (insight::hex(*id), *t))
                .collect(),
            cut_from: links.cut.from.iter().map(|id| insight::hex(*id)).collect(),
            cut_to: links.cut.to.iter().map(|id| insight::hex(*id)).collect(),
            writes: Vec::new(),
            reads: Vec::new(),
            events,
            next_event,
        }
    }

    /// Answer the membership changes waiting for their entry to be durable here; one whose
    /// entry the log no longer holds was lost to a leader change.
    fn answer_early(&mut self) {
        if self.early.is_empty() {
            return;
        }
        let r = self.d.raft();
        let (persisted, now, applied) = (r.persisted_index(), r.term(), r.applied());
        let revision = self.d.machine().store.revision();
        let mut waiting = Vec::new();
        for (index, term, reply) in std::mem::take(&mut self.early) {
            // Lost: the log holds another entry there, or none and no snapshot covers it.
            let held = r.term_at(index);
            let lost = match held {
                Some(t) => t != term,
                None => index > r.snapshot_index(),
            };
            if lost {
                reply.send(Err(Refusal::LeaderChanged));
            } else if held.is_none() || index <= persisted {
                // Durable here (compacted entries are committed, so durable too).
                reply.send(Ok(Answered {
                    value: Ok((None, revision)),
                    term: now,
                    applied,
                }));
            } else {
                waiting.push((index, term, reply));
            }
        }
        self.early = waiting;
    }

    /// If this member was removed from the cluster: mark its data directory so that it never
    /// serves again, and say why it stops.
    fn removed(&mut self) -> Option<String> {
        let id = self.d.raft().id();
        if !self.d.machine().registry.removed.contains(&id) {
            return None;
        }
        Some(self.stop_removed())
    }

    fn stop_removed(&mut self) -> String {
        let marker = self.data_dir.join(REMOVED_MARKER);
        if let Err(e) = std::fs::write(&marker, format!("{REMOVED}\n")) {
            tracing::error!("cannot write {}: {e}", marker.display());
        }
        self.d.shutdown(REMOVED);
        REMOVED.to_string()
    }

    fn on_done(&mut self, done: Done) {
        match done {
            Done::Persisted(result) => self.d.on_persisted(result),
            Done::Snapshotted(result, rehome) => {
                self.d.on_snapshot(result);
                // A move still under way for an older snapshot gives way to this one, which
                // holds every value the older one did. If a leader's snapshot replaced the
                // machine meanwhile, none of its values sits at a paired address (the frozen
                // store keeps those buffers alive), so the move changes nothing.
                self.d.machine_mut().rehome = rehome.map(|r| *r);
            }
            Done::Restored(result) => {
                self.d.on_restored(result.map(|m| *m));
                let index = self.d.raft().snapshot_index();
                let text = format!("installed the leader's snapshot (up to index {index})");
                self.chronicle.lock().unwrap().push("snapshot", text);
            }
        }
    }

    /// Returns false when the node must stop.
    fn handle(&mut self, input: Input) -> bool {
        let d = &mut self.d;
        match input {
            // Messages from strangers, or that break the protocol's rules, are the core's to
            // refuse (and count).
            Input::Step(m) => {
                if d.transport_mut().heard(&m) {
                    let _ = d.step(m);
                }
            }
            Input::Write(w, reply) => d.propose(|id| command::encode(id, w), reply),
            Input::Read(req, linearizable, reply) => d.read(req, linearizable, reply),
            Input::Status(reply) => {
                let s = d.status();
                let store = &d.machine().store;
                let _ = reply.send(NodeStatus {
                    id: s.id,
                    role: s.role,
                    leader: s.leader,
                    term: s.term,
                    commit: s.commit,
                    applied: s.applied,
                    revision: store.revision(),
                    snapshot_index: s.snapshot_index,
                    db_size: store.size_bytes(),
                    pending: s.pending_writes,
                    alarms: d.machine().registry.alarms.iter().copied().collect(),
                });
            }
            Input::Freeze(reply) => {
                let m = d.machine();
                let _ = reply.send(Frozen {
                    store: m.store.clone(),
                    registry: m.registry.clone(),
                    applied: d.raft().applied(),
                    term: d.raft().term(),
                });
            }
            Input::IsRetry(session, reply) => {
                let store = &d.machine().store;
                let last = store.session(session.lease).map(|m| m.seq);
                let _ = reply.send(last == Some(session.seq));
            }
            Input::SnapshotNow(reply) => {
                let _ = reply.send(d.snapshot_now());
            }
            Input::Member(op, reply) => self.change_membership(op, reply),
            Input::Transfer(to, reply) => {
                let _ = reply.send(self.transfer(to));
            }
            Input::Renew(id, reply) => self.renew(id, reply),
            Input::Confirmed(id, received, reply) => {
                let store = &self.d.machine().store;
                let _ = reply.send(self.lessor.renew(id, received, store));
            }
            Input::TimeToLive(id, reply) => {
                let _ = reply.send(self.time_to_live(id));
            }
            Input::Leases(reply) => {
                let store = &self.d.machine().store;
                let _ = reply.send(store.leases().map(|l| l.id).collect());
            }
            Input::Inspect(since, reply) => {
                let _ = reply.send(self.inspect(since));
            }
            Input::Cut(peers) => {
                let ids = |s: &HashSet<NodeId>| {
                    let v: Vec<String> = s.iter().map(|p| insight::hex(*p)).collect();
                    v.join(", ")
                };
                let text = match peers.is_empty() {
                    true => "peer links healed".to_string(),
                    false => format!(
                        "peer links cut: hears nothing from [{}], reaches nothing of [{}]",
                        ids(&peers.from),
                        ids(&peers.to)
                    ),
                };
                tracing::warn!("{text} (by the supervisor)");
                self.chronicle.lock().unwrap().push("fault", text);
                d.transport_mut().links.cut = peers;
            }
            Input::Removed => {
                let why = self.stop_removed();
                tracing::error!("{why}");
                return false;
            }
            Input::Stop => return false,
        }
        true
    }

    /// Check a membership change as etcd does, then propose it as one configuration change
    /// whose context carries the request id (and a new member's peer URLs).
    fn change_membership(&mut self, op: MemberOp, reply: Waiter<Applied>) {
        let r = self.d.raft();
        if r.role() != Role::Leader {
            return reply.send(Err(Refusal::NoLeader));
        }
        let progress = r.progress();
        let matched = |id| progress.iter().find(|p| p.0 == id).map(|p| p.1);
        let transport = self.transport.clone();
        let active = move |id| transport.active(id);
        let facts = reconfig::Facts {
            me: r.id(),
            registry: &self.d.machine().registry,
            membership: r.membership(),
            leader_index: r.last_index(),
            matched: &matched,
            active: &active,
        };
        let change = match reconfig::check(&op, &facts) {
            Ok(c) => c,
            Err(status) => {
                let (term, applied) = (r.term(), r.applied());
                return reply.send(Ok(Answered {
                    value: Err(status),
                    term,
                    applied,
                }));
            }
        };
        let peer_urls = match op {
            MemberOp::Add { peer_urls, .. } => peer_urls,
            _ => Vec::new(),
        };
        let build =
            |id| ConfChange::simple(change).with_context(members::conf_context(id, peer_urls));
        // A lone voter taking a second one cannot commit the change without the newcomer's
        // acknowledgement (a configuration counts from the moment it enters the log), and the
        // newcomer is started only once `member add` has answered. So that answer comes once
        // the entry is durable here, the one log that counts until the newcomer runs — as
        // etcd, whose lone member commits such a change alone, answers at once.
        let lone =
            matches!(change, raft::Change::AddVoter(_)) && r.membership().voters().len() == 1;
        if lone {
            let term = r.term();
            match self.d.propose_conf_change_at(build) {
                Ok(index) => self.early.push((index, term, reply)),
                Err(why) => reply.send(Err(why)),
            }
            return;
        }
        self.d.propose_conf_change(build, reply);
    }

    /// A keep-alive counts only once a quorum has confirmed this member still leads (a
    /// ReadIndex round begun after it arrived). A leader paused (SIGSTOP, a long GC, a
    /// starved VM) while another was elected would otherwise renew on its own stale word,
    /// and the client would count on a lease the real leader is about to expire. The
    /// renewal is then dated from the keep-alive's arrival, never later.
    fn renew(&mut self, id: i64, reply: oneshot::Sender<Renewal>) {
        if !self.lessor.is_primary() {
            let _ = reply.send(Renewal::NotLeader);
            return;
        }
        let received = self.now();
        let (tx, rx) = oneshot::channel();
        let probe = kv::RangeRequest::default();
        self.d.read(probe, true, Waiter(tx));
        let back = self.inputs.clone();
        tokio::spawn(async move {
            let confirmed = matches!(rx.await, Ok(Ok(_)));
            match back.upgrade() {
                Some(back) if confirmed => {
                    if let Err(e) = back.send(Input::Confirmed(id, received, reply)).await {
                        if let Input::Confirmed(_, _, reply) = e.0 {
                            let _ = reply.send(Renewal::NotLeader);
                        }
                    }
                }
                _ => {
                    let _ = reply.send(Renewal::NotLeader);
                }
            }
        });
    }

    fn time_to_live(&self, id: i64) -> Result<Option<LeaseInfo>, Status> {
        if !self.lessor.is_primary() {
            return Err(not_leader());
        }
        let Some(lease) = self.d.machine().store.lease(id) else {
            return Ok(None);
        };
        Ok(Some(LeaseInfo {
            remaining: self.lessor.remaining(id, self.now()).unwrap_or(0),
            granted_ttl: lease.ttl,
            keys: lease.keys.iter().cloned().collect(),
        }))
    }

    fn transfer(&mut self, to: NodeId) -> Result<(), Status> {
        let r = self.d.raft_mut();
        if r.role() != Role::Leader {
            return Err(Status::failed_precondition("etcdserver: not leader"));
        }
        if !r.membership().is_voter(to) {
            return Err(Status::failed_precondition(
                "etcdserver: bad leader transferee",
            ));
        }
        if to == r.id() {
            return Ok(());
        }
        r.transfer_leader(to)
            .map_err(|e| Status::unavailable(format!("etcdserver: leader transfer failed: {e}")))
    }
}

/// Note in the chronicle what changed between two views: the configuration, alarms.
fn chronicle_changes(c: &SharedChronicle, old: &View, new: &View) {
    let mut c = c.lock().unwrap();
    if old.latest != new.latest {
        if let Some(m) = &new.latest {
            let ids = |ids: &[NodeId]| {
                ids.iter()
                    .map(|id| insight::hex(*id))
                    .collect::<Vec<_>>()
                    .join(", ")
            };
            let mut text = format!("configuration: voters {}", ids(m.voters()));
            if !m.learners().is_empty() {
                text += &format!("; learners {}", ids(m.learners()));
            }
            if old.latest.is_some() {
                c.push("membership", text);
            }
        }
    }
    let (was, is) = (&old.registry.alarms, &new.registry.alarms);
    for (id, kind) in is.difference(was) {
        let text = format!(
            "alarm {} raised on {}",
            insight::alarm_name(*kind),
            insight::hex(*id)
        );
        c.push("alarm", text);
    }
    for (id, kind) in was.difference(is) {
        let text = format!(
            "alarm {} cleared on {}",
            insight::alarm_name(*kind),
            insight::hex(*id)
        );
        c.push("alarm", text);
    }
}
