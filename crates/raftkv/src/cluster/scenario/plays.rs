//! The four guided scenarios, a step per Next press, and the relay that loses a leader's
//! answers.

use super::*;
pub(super) async fn before_replicating(ctx: Ctx) -> Result<(), String> {
    let Cast { a, b, c, term } = ctx.cast.clone();
    let key = ctx.key.clone();
    let session = ctx.grant_session(&a).await?;
    let sup = ctx.sup.clone();
    // Cut and write at once: within an election timeout the cut-off leader steps down
    // (CheckQuorum) and would refuse the write.
    let (attempt, index) = ctx.step(ctx.isolate_and_write(&a, &key, session)).await?;
    ctx.step(async { sup.kill(&a).map(|_| ((), None)) }).await?;
    let (leader, new_term) = ctx
        .step(async {
            sup.heal().await?;
            let (l, t) = ctx.new_leader(&[&b, &c]).await?;
            Ok(((l.clone(), t), Some(format!("{l} leads term {t}"))))
        })
        .await?;
    let revision = ctx
        .step(async {
            let first = Ctx::first_attempt(attempt).await;
            let rev = put(&ctx.url(&leader)?, key.clone(), Some((session, 1))).await?;
            Ok((
                rev,
                Some(format!("{first}; the retry applied at revision {rev}")),
            ))
        })
        .await?;
    ctx.step(async {
        sup.restart(&a).await?;
        ctx.follows(&a, new_term).await?;
        let r = ctx.repaired(&a, &leader, index, term).await?;
        Ok(((), Some(r)))
    })
    .await?;
    ctx.step(async {
        let r = ctx.applied_once(&leader, &key, revision).await?;
        Ok(((), Some(r)))
    })
    .await
}

pub(super) async fn after_replicating(ctx: Ctx) -> Result<(), String> {
    let Cast { a, b, c, term } = ctx.cast.clone();
    let key = ctx.key.clone();
    let session = ctx.grant_session(&a).await?;
    let sup = ctx.sup.clone();
    // One step: a leader that hears no answers steps down within an election timeout
    // (CheckQuorum), and then its follower would campaign on its own.
    let (attempt, index) = ctx
        .step(async {
            let ch = channel(&ctx.url(&a)?)?;
            let quiet = ctx.quiet().await?;
            sup.cut_directed(&[(&b, &a), (&a, &c), (&c, &a)]).await?;
            let attempt = ctx.attempt(ch, key.clone(), Some((session, 1)));
            let held = ctx.held_now(&[&c]).await?;
            let (i, t) = ctx.uncommitted_on(&a, quiet.max(held)).await?;
            ctx.until("the entry on the follower", |v| {
                let m = v.members.iter().find(|m| m.name == b)?;
                m.log
                    .iter()
                    .any(|e| e.index == i && e.term == t)
                    .then_some(())
            })
            .await?;
            sup.kill(&a)?;
            let seen = format!("entry {i} (term {t}) is on {a} and {b}, uncommitted; {a} killed");
            Ok(((attempt, i), Some(seen)))
        })
        .await?;
    let (leader, new_term) = ctx
        .step(async {
            sup.heal().await?;
            let (l, t) = ctx.new_leader(&[&b, &c]).await?;
            if l != b {
                return Err(format!("{l} won, but its log lacked entry {index}"));
            }
            Ok(((l.clone(), t), Some(format!("{l} leads term {t}"))))
        })
        .await?;
    ctx.step(async {
        let commit = ctx
            .until("the entry committed", |v| {
                let m = v.members.iter().find(|m| m.name == leader)?;
                let t = m.log.iter().find(|e| e.index == index)?.term;
                (m.commit >= index && t == term).then_some(m.commit)
            })
            .await?;
        Ok((
            (),
            Some(format!(
                "entry {index} kept its term {term}; commit index {commit}"
            )),
        ))
    })
    .await?;
    ctx.step(async {
        let first = Ctx::first_attempt(attempt).await;
        let rev = put(&ctx.url(&leader)?, key.clone(), Some((session, 1))).await?;
        let once = ctx.applied_once(&leader, &key, rev).await?;
        Ok((
            (),
            Some(format!("{first}; the retry got revision {rev}; {once}")),
        ))
    })
    .await?;
    ctx.step(async {
        sup.restart(&a).await?;
        Ok(((), Some(ctx.follows(&a, new_term).await?)))
    })
    .await
}

pub(super) async fn before_answering(ctx: Ctx) -> Result<(), String> {
    let Cast { a, b, c, .. } = ctx.cast.clone();
    let key = ctx.key.clone();
    let session = ctx.grant_session(&a).await?;
    let sup = ctx.sup.clone();
    let (relay, ch) = ctx
        .step(async {
            let r = Relay::start(&ctx.url(&a)?).await?;
            // The client's connection opens (TLS, HTTP/2 settings) before answers are lost.
            let ch = channel(&r.url())?;
            KvClient::new(ch.clone())
                .range(RangeRequest {
                    key: key.clone().into_bytes().into(),
                    ..Default::default()
                })
                .await
                .map_err(|e| format!("through the relay: {}", e.message()))?;
            r.lose.store(true, Ordering::Relaxed);
            Ok(((r, ch), None))
        })
        .await?;
    let attempt = ctx
        .step(async {
            let before = ctx.quiet().await?;
            let attempt = ctx.attempt(ch, key.clone(), Some((session, 1)));
            let index = ctx
                .until("the write applied everywhere", |v| {
                    let m = v.members.iter().find(|m| m.name == a)?;
                    let all = v.members.iter().all(|o| o.commit > before);
                    (m.applied > before && all).then_some(m.applied)
                })
                .await?;
            let seen = format!("applied at index {index}; committed on every member");
            Ok((attempt, Some(seen)))
        })
        .await?;
    ctx.step(async { sup.kill(&a).map(|_| ((), None)) }).await?;
    let (leader, new_term) = ctx
        .step(async {
            let (l, t) = ctx.new_leader(&[&b, &c]).await?;
            Ok(((l.clone(), t), Some(format!("{l} leads term {t}"))))
        })
        .await?;
    ctx.step(async {
        let first = Ctx::first_attempt(attempt).await;
        let rev = put(&ctx.url(&leader)?, key.clone(), Some((session, 1))).await?;
        let once = ctx.applied_once(&leader, &key, rev).await?;
        Ok((
            (),
            Some(format!("{first}; the retry got revision {rev}; {once}")),
        ))
    })
    .await?;
    drop(relay);
    ctx.step(async {
        sup.restart(&a).await?;
        Ok(((), Some(ctx.follows(&a, new_term).await?)))
    })
    .await
}

pub(super) async fn split_brain(ctx: Ctx) -> Result<(), String> {
    let Cast { a, b, c, term } = ctx.cast.clone();
    let key = ctx.key.clone();
    let key2 = format!("{key}-majority");
    let session = ctx.grant_session(&a).await?;
    let sup = ctx.sup.clone();
    let (attempt, index) = ctx.step(ctx.isolate_and_write(&a, &key, session)).await?;
    let leader = ctx
        .step(async {
            let (l, t) = ctx.new_leader(&[&b, &c]).await?;
            Ok((l.clone(), Some(format!("{l} leads term {t}"))))
        })
        .await?;
    ctx.step(async {
        let rev = put(&ctx.url(&leader)?, key2.clone(), None).await?;
        Ok(((), Some(format!("{key2} committed at revision {rev}"))))
    })
    .await?;
    ctx.step(async {
        let r = ctx
            .until("the old leader stepping down", |v| {
                let m = v.members.iter().find(|m| m.name == a && m.reachable)?;
                (m.role != "leader").then(|| format!("{a} is a {} of term {}", m.role, m.term))
            })
            .await?;
        Ok(((), Some(r)))
    })
    .await?;
    ctx.step(async {
        sup.heal().await?;
        Ok(((), Some(ctx.repaired(&a, &leader, index, term).await?)))
    })
    .await?;
    ctx.step(async {
        let first = Ctx::first_attempt(attempt).await;
        let rev = put(&ctx.url(&leader)?, key.clone(), Some((session, 1))).await?;
        let once = ctx.applied_once(&leader, &key, rev).await?;
        match ctx.read(&leader, &key2).await? {
            Some((1, _)) => {}
            other => return Err(format!("{key2}: expected version 1, found {other:?}")),
        }
        Ok((
            (),
            Some(format!("{first}; the retry got revision {rev}; {once}")),
        ))
    })
    .await
}

/// A TCP relay to a member's client port that can lose the member's answers: the
/// requests go through, the bytes coming back are dropped.
pub(super) struct Relay {
    addr: std::net::SocketAddr,
    scheme: &'static str,
    lose: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

impl Relay {
    async fn start(target: &str) -> Result<Relay, String> {
        let uri: http::Uri = target.parse().map_err(|e| format!("{target}: {e}"))?;
        let scheme = if uri.scheme_str() == Some("https") {
            "https"
        } else {
            "http"
        };
        let upstream = uri
            .authority()
            .ok_or_else(|| format!("{target} has no address"))?
            .to_string();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .map_err(|e| format!("relay: {e}"))?;
        let addr = listener.local_addr().map_err(|e| e.to_string())?;
        let lose = Arc::new(AtomicBool::new(false));
        let lose2 = lose.clone();
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let upstream = upstream.clone();
                let lose = lose2.clone();
                tokio::spawn(async move {
                    let Ok(server) = tokio::net::TcpStream::connect(&upstream).await else {
                        return;
                    };
                    let (mut cr, mut cw) = client.into_split();
                    let (mut sr, mut sw) = server.into_split();
                    let up = tokio::io::copy(&mut cr, &mut sw);
                    let down = async {
                        use tokio::io::{AsyncReadExt, AsyncWriteExt};
                        let mut buf = vec![0u8; 16 * 1024];
                        loop {
                            let n = match sr.read(&mut buf).await {
                                Ok(0) | Err(_) => break,
                                Ok(n) => n,
                            };
                            if !lose.load(Ordering::Relaxed)
                                && cw.write_all(&buf[..n]).await.is_err()
                            {
                                break;
                            }
                        }
                    };
                    tokio::select! {
                        _ = up => {}
                        _ = down => {}
                    }
                });
            }
        });
        Ok(Relay {
            addr,
            scheme,
            lose,
            task,
        })
    }

    fn url(&self) -> String {
        format!("{}://{}", self.scheme, self.addr)
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.task.abort();
    }
}
