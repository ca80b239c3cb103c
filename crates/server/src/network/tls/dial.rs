//! The dialing side: how this member reaches `https://` URLs (peers, other members' client
//! URLs), presenting its certificate and checking theirs, with the handshake bounded; and
//! what a failed dial says.

use super::*;
/// How this process connects to `https://` URLs of one side. The default has no
/// certificate and trusts the system's roots; `http://` URLs are dialed as tonic always
/// does, whatever the dialer.
#[derive(Clone, Default)]
pub struct Dialer {
    config: Option<Arc<ClientConfig>>,
    client_cert: bool,
}

impl std::fmt::Debug for Dialer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Dialer {{ configured: {} }}", self.config.is_some())
    }
}

impl Dialer {
    pub(super) fn new(
        ident: Option<Identity>,
        roots: Option<Arc<RootCertStore>>,
        names: FlagNames,
    ) -> Result<Dialer, String> {
        let builder = ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?
            .with_root_certificates(roots.unwrap_or_else(system_roots));
        let client_cert = ident.is_some();
        let mut config = match ident {
            Some((chain, key)) => builder.with_client_auth_cert(chain, key).map_err(|e| {
                format!(
                    "--{} / --{}: cannot use this certificate and key: {e}",
                    names.cert, names.key
                )
            })?,
            None => builder.with_no_client_auth(),
        };
        config.alpn_protocols = vec![b"h2".to_vec()];
        Ok(Dialer {
            config: Some(Arc::new(config)),
            client_cert,
        })
    }

    /// A client's dialer from its CA, certificate and key (etcdctl's `--cacert`, `--cert`
    /// and `--key`).
    pub fn from_files(files: &Files) -> Result<Dialer, String> {
        if files.is_empty() {
            return Ok(Dialer::default());
        }
        let ident = identity(files, CLI_FLAGS)?;
        let roots = match &files.trusted_ca {
            Some(p) => Some(roots(p, CLI_FLAGS.trusted_ca)?),
            None => None,
        };
        Dialer::new(ident, roots, CLI_FLAGS)
    }

    /// Whether TLS files were given (a client command then dials bare `host:port`
    /// endpoints with TLS, as etcdctl does).
    pub fn configured(&self) -> bool {
        self.config.is_some()
    }

    /// Whether it presents a certificate.
    pub fn has_client_cert(&self) -> bool {
        self.client_cert
    }

    fn connector(&self) -> Connector {
        let config = self.config.clone().unwrap_or_else(|| {
            static DEFAULT: OnceLock<Arc<ClientConfig>> = OnceLock::new();
            DEFAULT
                .get_or_init(|| {
                    let mut c = ClientConfig::builder_with_provider(provider())
                        .with_safe_default_protocol_versions()
                        .expect("ring supports the default protocol versions")
                        .with_root_certificates(system_roots())
                        .with_no_client_auth();
                    c.alpn_protocols = vec![b"h2".to_vec()];
                    Arc::new(c)
                })
                .clone()
        });
        Connector { config }
    }

    /// Connect to `endpoint` now (with TLS if its URL is `https://`).
    pub async fn connect(&self, endpoint: Endpoint) -> Result<Channel, tonic::transport::Error> {
        if is_https(&endpoint) {
            endpoint.connect_with_connector(self.connector()).await
        } else {
            endpoint.connect().await
        }
    }

    /// TLS over `tcp` to `host` for HTTP/1.1 (the dashboard's polls): the same identity
    /// and roots, without the gRPC dialer's `h2` protocol offer.
    pub async fn connect_http1(
        &self,
        host: &str,
        tcp: TcpStream,
    ) -> io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
        let mut config = (*self.connector().config).clone();
        config.alpn_protocols.clear();
        let name = ServerName::try_from(host.to_string()).map_err(|_| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{host:?} is not a host"),
            )
        })?;
        tokio::time::timeout(
            HANDSHAKE_TIMEOUT,
            TlsConnector::from(Arc::new(config)).connect(name, tcp),
        )
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "no TLS handshake in time"))?
    }

    /// A channel to `endpoint` that connects on first use.
    pub fn connect_lazy(&self, endpoint: Endpoint) -> Channel {
        if is_https(&endpoint) {
            endpoint.connect_with_connector_lazy(self.connector())
        } else {
            endpoint.connect_lazy()
        }
    }
}

pub(super) fn is_https(endpoint: &Endpoint) -> bool {
    endpoint.uri().scheme_str() == Some("https")
}

/// The dialer for other members' client URLs (and, in the client commands, for the
/// endpoints): one per process, set once at start. A member has one client identity,
/// as an etcd member has, and its services reach the leader from many places (the
/// Cluster and Lease services, the lock and election recipes built on them).
pub(super) static CLIENT_DIALER: OnceLock<Dialer> = OnceLock::new();

/// Set the process's client dialer (once; later calls are ignored).
pub fn set_client_dialer(d: Dialer) {
    let _ = CLIENT_DIALER.set(d);
}

pub fn client_dialer() -> &'static Dialer {
    static PLAIN: Dialer = Dialer {
        config: None,
        client_cert: false,
    };
    CLIENT_DIALER.get().unwrap_or(&PLAIN)
}

/// TCP, then a TLS handshake checking the server's certificate against the host in the URL
/// (a DNS name or an IP address, either of which the certificate must name).
#[derive(Clone)]
pub(super) struct Connector {
    config: Arc<ClientConfig>,
}

pub(super) type Connecting = Pin<
    Box<
        dyn Future<
                Output = io::Result<
                    hyper_util::rt::TokioIo<tokio_rustls::client::TlsStream<TcpStream>>,
                >,
            > + Send,
    >,
>;

impl tower_service::Service<http::Uri> for Connector {
    type Response = hyper_util::rt::TokioIo<tokio_rustls::client::TlsStream<TcpStream>>;
    type Error = io::Error;
    type Future = Connecting;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: http::Uri) -> Connecting {
        let config = self.config.clone();
        Box::pin(async move {
            let invalid = |why: String| io::Error::new(io::ErrorKind::InvalidInput, why);
            let host = uri
                .host()
                .ok_or_else(|| invalid(format!("{uri}: no host")))?;
            let host = host
                .trim_start_matches('[')
                .trim_end_matches(']')
                .to_string();
            let port = uri.port_u16().unwrap_or(443);
            let name = ServerName::try_from(host.clone())
                .map_err(|_| invalid(format!("{host:?} is not a host name or IP address")))?;
            let tcp = TcpStream::connect((host.as_str(), port)).await?;
            tcp.set_nodelay(true)?;
            let tls = tokio::time::timeout(
                HANDSHAKE_TIMEOUT,
                TlsConnector::from(config).connect(name, tcp),
            )
            .await
            .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "no TLS handshake in time"))??;
            Ok(hyper_util::rt::TokioIo::new(tls))
        })
    }
}

/// Serve `router` on `listener`: as it is when `tls` is None, else behind TLS handshakes.
pub async fn serve(
    router: tonic::transport::server::Router,
    listener: TcpIncoming,
    tls: Option<Acceptor>,
    side: &'static str,
) -> Result<(), tonic::transport::Error> {
    match tls {
        None => router.serve_with_incoming(listener).await,
        Some(Acceptor(acceptor)) => {
            router
                .serve_with_incoming(incoming(listener, acceptor, side))
                .await
        }
    }
}

/// If `err` (or what caused it) is a TLS failure, say which; for a dialing member to warn
/// that a peer's certificate is refused, or refuses ours, rather than retry in silence.
pub fn tls_failure(err: &(dyn std::error::Error + 'static)) -> Option<String> {
    let mut cur = Some(err);
    while let Some(e) = cur {
        if let Some(t) = e.downcast_ref::<rustls::Error>() {
            return Some(t.to_string());
        }
        if let Some(t) = e
            .downcast_ref::<io::Error>()
            .and_then(|io| io.get_ref())
            .and_then(|inner| inner.downcast_ref::<rustls::Error>())
        {
            return Some(t.to_string());
        }
        cur = e.source();
    }
    None
}

/// Warn (at most once per [`REFUSAL_LOG_INTERVAL`] per peer) that dialing `url` failed on TLS.
pub fn warn_dial_refused(url: &str, why: &str) {
    if let Some(more) = throttle(&format!("dial {url}")) {
        tracing::warn!(
            peer = %url,
            "TLS with the peer failed: {why}{}",
            if more == 0 { String::new() } else { format!(" ({more} more times since the last report)") }
        );
    }
}
