//! `raftkv put/get/del/status`: a small command-line client over the etcd v3 API. Each
//! request goes to the first endpoint that answers. Writes run exactly once: they are
//! tagged with a session (a short lease granted for the purpose) and sequence number, so
//! when an endpoint fails after the write committed but before it answered, the retry on
//! the next endpoint gets the first answer instead of writing again.

use bytes::Bytes;
use server::pb::etcdserverpb::{
    kv_client::KvClient, lease_client::LeaseClient, maintenance_client::MaintenanceClient,
    DeleteRangeRequest, LeaseGrantRequest, LeaseRevokeRequest, PutRequest, RangeRequest,
    StatusRequest,
};
use std::time::Duration;
use tonic::transport::{Channel, Endpoint};

/// `host:port`, `http://host:port` or `https://host:port`, comma separated, as URLs. A
/// bare `host:port` is dialed with TLS if --cacert, --cert or --key is given (etcdctl's
/// rule).
pub fn urls(endpoints: &str) -> Vec<String> {
    let scheme = if server::network::tls::client_dialer().configured() {
        "https"
    } else {
        "http"
    };
    endpoints
        .split(',')
        .filter(|e| !e.is_empty())
        .map(|e| {
            if e.starts_with("http://") || e.starts_with("https://") {
                e.to_string()
            } else {
                format!("{scheme}://{e}")
            }
        })
        .collect()
}

pub async fn channel(url: &str) -> Result<Channel, String> {
    let endpoint = Endpoint::from_shared(url.to_string())
        .map_err(|e| format!("{url}: {e}"))?
        .connect_timeout(Duration::from_secs(2))
        .timeout(Duration::from_secs(10));
    server::network::tls::client_dialer()
        .connect(endpoint)
        .await
        .map_err(|e| match server::network::tls::tls_failure(&e) {
            Some(why) => format!("{url}: TLS: {why}"),
            None => format!("{url}: {e}"),
        })
}

/// A failed call in words. A member that refuses this client's certificate (or its lack of
/// one) closes the connection once the first call goes out (TLS 1.3 lets the client finish
/// its handshake first), and the call fails as if the connection broke: say what is likely.
pub fn why(s: &tonic::Status) -> String {
    use std::error::Error;
    if let Some(t) = server::network::tls::tls_failure(s) {
        return format!("TLS: {t}");
    }
    let dialer = server::network::tls::client_dialer();
    let broken = s
        .source()
        .is_some_and(|e| e.is::<tonic::transport::Error>());
    if broken && dialer.configured() && !dialer.has_client_cert() {
        return format!(
            "{} (a member started with --client-cert-auth refuses clients without --cert \
             and --key)",
            s.message()
        );
    }
    s.message().to_string()
}

/// Run `f` against each endpoint in turn until one answers.
pub async fn first<T, F, Fut>(endpoints: &str, f: F) -> Result<T, String>
where
    F: Fn(Channel) -> Fut,
    Fut: std::future::Future<Output = Result<T, tonic::Status>>,
{
    let mut errors = Vec::new();
    for url in urls(endpoints) {
        match channel(&url).await {
            Ok(ch) => match f(ch).await {
                Ok(v) => return Ok(v),
                Err(s) => errors.push(format!("{url}: {}", why(&s))),
            },
            Err(e) => errors.push(e),
        }
    }
    if errors.is_empty() {
        return Err("no endpoints given".into());
    }
    // Every endpoint's answer: the one that matters (the leader's) may not be the last.
    Err(errors.join("; "))
}

fn range_end(key: &str, prefix: bool) -> Bytes {
    if prefix {
        kv::prefix_end(key.as_bytes())
    } else {
        Bytes::new()
    }
}

/// A session for one command: a lease of the cluster's minimum TTL. It ends by itself if
/// the client dies before revoking it.
struct OneShot {
    lease: i64,
}

impl OneShot {
    async fn open(endpoints: &str) -> Result<OneShot, String> {
        let lease = first(endpoints, |ch| async move {
            let req = LeaseGrantRequest { ttl: 0, id: 0 };
            LeaseClient::new(ch).lease_grant(req).await
        })
        .await?
        .into_inner()
        .id;
        Ok(OneShot { lease })
    }

    /// The request tagged as the session's first (and only) command.
    fn tag<T>(&self, msg: T) -> tonic::Request<T> {
        let mut req = tonic::Request::new(msg);
        let md = req.metadata_mut();
        md.insert(server::services::SESSION, self.lease.into());
        md.insert(server::services::SEQ, 1u64.into());
        req
    }

    /// Free the session's memory now rather than at its expiry (best effort).
    async fn close(self, endpoints: &str) {
        let id = self.lease;
        let _ = first(endpoints, |ch| async move {
            LeaseClient::new(ch)
                .lease_revoke(LeaseRevokeRequest { id })
                .await
        })
        .await;
    }
}

pub async fn put(endpoints: &str, key: String, value: String) -> Result<(), String> {
    let req = PutRequest {
        key: key.into(),
        value: value.into(),
        ..Default::default()
    };
    let session = OneShot::open(endpoints).await?;
    let resp = first(endpoints, |ch| {
        let req = session.tag(req.clone());
        async move { KvClient::new(ch).put(req).await }
    })
    .await;
    session.close(endpoints).await;
    let rev = resp?.into_inner().header.map_or(0, |h| h.revision);
    println!("OK (revision {rev})");
    Ok(())
}

pub async fn get(
    endpoints: &str,
    key: String,
    prefix: bool,
    serializable: bool,
) -> Result<(), String> {
    let req = RangeRequest {
        range_end: range_end(&key, prefix),
        key: key.into(),
        serializable,
        ..Default::default()
    };
    let resp = first(endpoints, |ch| {
        let req = req.clone();
        async move { KvClient::new(ch).range(req).await }
    })
    .await?
    .into_inner();
    for kv in resp.kvs {
        println!("{}", String::from_utf8_lossy(&kv.key));
        println!("{}", String::from_utf8_lossy(&kv.value));
    }
    Ok(())
}

pub async fn del(endpoints: &str, key: String, prefix: bool) -> Result<(), String> {
    let req = DeleteRangeRequest {
        range_end: range_end(&key, prefix),
        key: key.into(),
        ..Default::default()
    };
    let session = OneShot::open(endpoints).await?;
    let resp = first(endpoints, |ch| {
        let req = session.tag(req.clone());
        async move { KvClient::new(ch).delete_range(req).await }
    })
    .await;
    session.close(endpoints).await;
    println!("{}", resp?.into_inner().deleted);
    Ok(())
}

pub async fn status(endpoints: &str) -> Result<(), String> {
    println!(
        "{:<24} {:>16} {:>16} {:>6} {:>10} {:>10} {:>10}",
        "ENDPOINT", "MEMBER", "LEADER", "TERM", "INDEX", "APPLIED", "DB SIZE"
    );
    let mut reached = 0;
    for url in urls(endpoints) {
        let result = match channel(&url).await {
            Ok(ch) => MaintenanceClient::new(ch)
                .status(StatusRequest {})
                .await
                .map_err(|s| why(&s)),
            Err(e) => Err(e),
        };
        match result {
            Ok(s) => {
                let s = s.into_inner();
                let member = s.header.map_or(0, |h| h.member_id);
                println!(
                    "{:<24} {:016x} {:016x} {:>6} {:>10} {:>10} {:>10}",
                    url,
                    member,
                    s.leader,
                    s.raft_term,
                    s.raft_index,
                    s.raft_applied_index,
                    s.db_size
                );
                reached += 1;
            }
            Err(e) => println!("{url:<24} unreachable: {e}"),
        }
    }
    if reached == 0 {
        return Err("no endpoint answered".into());
    }
    Ok(())
}

/// `raftkv watch`: print every change of a key (or prefix) as etcdctl does — the event
/// type, the key and the value, one per line (with `--prev-kv`, the previous key and value
/// before the new ones). If the stream breaks, it resumes on the next endpoint from the
/// revision after the last one printed: no change is missed or printed twice.
pub async fn watch(
    endpoints: &str,
    key: String,
    prefix: bool,
    rev: i64,
    prev_kv: bool,
) -> Result<(), String> {
    use server::pb::etcdserverpb::{
        watch_client::WatchClient, watch_request::RequestUnion, WatchCreateRequest, WatchRequest,
    };
    let urls = urls(endpoints);
    if urls.is_empty() {
        return Err("no endpoints given".into());
    }
    let mut next = rev;
    let mut failures = 0;
    for url in urls.iter().cycle() {
        let create = WatchRequest {
            request_union: Some(RequestUnion::CreateRequest(WatchCreateRequest {
                range_end: range_end(&key, prefix),
                key: key.clone().into(),
                start_revision: next,
                prev_kv,
                ..Default::default()
            })),
        };
        // The request stream stays open (ending it would not end the watch, but keeping it
        // is what a client that may cancel later does).
        let (tx, rx) = tokio::sync::mpsc::channel(1);
        let _ = tx.send(create).await;
        let requests = tokio_stream::wrappers::ReceiverStream::new(rx);
        let stream = match channel(url).await {
            Ok(ch) => WatchClient::new(ch).watch(requests).await,
            Err(e) => Err(tonic::Status::unavailable(e)),
        };
        let mut stream = match stream {
            Ok(s) => s.into_inner(),
            Err(e) => {
                failures += 1;
                if failures >= 3 * urls.len() {
                    return Err(format!("{url}: {}", e.message()));
                }
                tokio::time::sleep(Duration::from_millis(300)).await;
                continue;
            }
        };
        while let Ok(Some(resp)) = stream.message().await {
            failures = 0;
            if resp.compact_revision != 0 {
                return Err(format!(
                    "watch canceled: revision {next} was compacted (the oldest kept is {})",
                    resp.compact_revision
                ));
            }
            if resp.canceled {
                return Err(format!("watch canceled: {}", resp.cancel_reason));
            }
            for e in resp.events {
                let kind = if e.r#type == 1 { "DELETE" } else { "PUT" };
                println!("{kind}");
                for kv in e.prev_kv.iter().chain(e.kv.iter()) {
                    println!("{}", String::from_utf8_lossy(&kv.key));
                    println!("{}", String::from_utf8_lossy(&kv.value));
                }
                if let Some(kv) = &e.kv {
                    next = kv.mod_revision + 1;
                }
            }
            if next == 0 {
                // A watch from now: resume after the revision it started at.
                next = resp.header.map_or(0, |h| h.revision + 1);
            }
        }
        drop(tx);
        eprintln!("raftkv watch: the stream from {url} ended; resuming at revision {next}");
    }
    Ok(())
}
