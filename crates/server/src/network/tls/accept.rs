//! The listening side: the listener's connections through the TLS handshake, each bounded
//! in time, and every refusal logged (who, why), at most once per interval per cause.

use super::*;
pub type Accepted = io::Result<tokio_rustls::server::TlsStream<TcpStream>>;

/// The listener's connections once through TLS, for a server built by the caller (the
/// client port's, whose router carries the metrics layer, is not a plain `Router`).
pub fn incoming_of(
    listener: TcpIncoming,
    acceptor: Acceptor,
    side: &'static str,
) -> tokio_stream::wrappers::ReceiverStream<Accepted> {
    incoming(listener, acceptor.0, side)
}

/// The listener's connections once their handshakes succeed. Each handshake runs in a
/// task of its own, so a slow or silent client holds up nobody; a refused one is logged.
pub(super) fn incoming(
    mut listener: TcpIncoming,
    acceptor: TlsAcceptor,
    side: &'static str,
) -> tokio_stream::wrappers::ReceiverStream<Accepted> {
    let (tx, rx) = tokio::sync::mpsc::channel::<Accepted>(64);
    tokio::spawn(async move {
        loop {
            let next = tokio::select! {
                next = listener.next() => next,
                // The server is gone.
                _ = tx.closed() => return,
            };
            let tcp = match next {
                None => return,
                Some(Ok(tcp)) => tcp,
                // Accept errors go to the server, as on a plaintext listener.
                Some(Err(e)) => {
                    if tx.send(Err(e)).await.is_err() {
                        return;
                    }
                    continue;
                }
            };
            let (tx, acceptor) = (tx.clone(), acceptor.clone());
            tokio::spawn(async move {
                let from = tcp.peer_addr().ok();
                match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                    Ok(Ok(tls)) => {
                        let _ = tx.send(Ok(tls)).await;
                    }
                    Ok(Err(e)) => refused(side, from, &handshake_error(&e)),
                    Err(_) => refused(side, from, "no TLS handshake in time"),
                }
            });
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(rx)
}

/// Why a handshake failed, in words.
pub(super) fn handshake_error(e: &io::Error) -> String {
    match e.get_ref().and_then(|e| e.downcast_ref::<rustls::Error>()) {
        Some(rustls::Error::InvalidMessage(rustls::InvalidMessage::InvalidContentType)) => {
            "it does not speak TLS (a plaintext client?)".into()
        }
        Some(rustls::Error::NoCertificatesPresented) => "it presented no certificate".into(),
        Some(rustls::Error::InvalidCertificate(why)) => {
            format!("its certificate is not acceptable: {why:?}")
        }
        Some(e) => e.to_string(),
        None => e.to_string(),
    }
}

pub(super) fn refused(side: &str, from: Option<SocketAddr>, why: &str) {
    let who = from.map_or_else(|| "an unknown address".to_string(), |a| a.to_string());
    // Keyed by IP, not port: a retrying peer comes from a new port each time.
    let key = format!(
        "{side} {}",
        from.map_or_else(String::new, |a| a.ip().to_string())
    );
    if let Some(more) = throttle(&key) {
        tracing::warn!(
            "refused a {side} connection from {who}: {why}{}",
            suppressed(more)
        );
    }
}

pub(super) fn suppressed(more: u64) -> String {
    if more == 0 {
        String::new()
    } else {
        format!(" ({more} more refused from there since the last report)")
    }
}

/// Whether a warning under `key` may be logged now: Some(how many were held back since the
/// last one) at most once per [`REFUSAL_LOG_INTERVAL`].
pub(super) fn throttle(key: &str) -> Option<u64> {
    static LAST: OnceLock<Mutex<HashMap<String, (Instant, u64)>>> = OnceLock::new();
    let mut last = LAST.get_or_init(Default::default).lock().unwrap();
    let now = Instant::now();
    if last.len() > 1024 {
        last.retain(|_, (at, _)| now.duration_since(*at) < REFUSAL_LOG_INTERVAL);
    }
    match last.get_mut(key) {
        Some((at, held)) if now.duration_since(*at) < REFUSAL_LOG_INTERVAL => {
            *held += 1;
            None
        }
        Some((at, held)) => {
            let more = *held;
            *at = now;
            *held = 0;
            Some(more)
        }
        None => {
            last.insert(key.to_string(), (now, 0));
            Some(0)
        }
    }
}
