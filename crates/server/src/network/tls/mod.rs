//! TLS for the client and peer URLs, with etcd's flags and meanings (rustls, ring).
//!
//! Each side — clients (`--cert-file`, `--key-file`, `--trusted-ca-file`,
//! `--client-cert-auth`) and peers (the same with `--peer-`) — gives:
//! - an acceptor for its listener when the listen URL is `https://`: it presents the side's
//!   certificate and, with `…-cert-auth`, demands one signed by the side's trusted CA;
//! - a [`Dialer`] for the connections this member opens to `https://` URLs of that side
//!   (peers, or other members' client URLs when passing a request to the leader): it
//!   presents the same certificate, as etcd does, and checks the other end's against the
//!   trusted CA (the system's roots if none is given, as Go's TLS does).
//!
//! The handshake runs here rather than inside tonic so that a refused connection is
//! logged: who it came from and why. Nothing in this module runs for `http://` URLs: the
//! plaintext listener and connections are tonic's own, unchanged.

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, Mutex, OnceLock};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};
use tokio::net::TcpStream;
use tokio_rustls::rustls::{
    self,
    pki_types::{pem::PemObject, CertificateDer, PrivateKeyDer, ServerName},
    server::WebPkiClientVerifier,
    ClientConfig, RootCertStore, ServerConfig,
};
use tokio_rustls::{TlsAcceptor, TlsConnector};
use tokio_stream::StreamExt;
use tonic::transport::server::TcpIncoming;
use tonic::transport::{Channel, Endpoint};

mod accept;
mod dev_pki;
mod dial;

pub use accept::*;
pub use dev_pki::*;
pub use dial::*;

/// How long a connection may take to finish its handshake, either way. Without a bound, a
/// peer that accepts TCP but never answers (a member still starting) would hold a dial
/// forever, and a client that never speaks would hold a task on the listener.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
/// A refusal is logged at most this often per side and remote address (a peer retries
/// every second or faster; its first refusal says all there is to say).
const REFUSAL_LOG_INTERVAL: Duration = Duration::from_secs(10);

/// The names of one side's flags, for error messages.
#[derive(Clone, Copy, Debug)]
pub struct FlagNames {
    pub cert: &'static str,
    pub key: &'static str,
    pub trusted_ca: &'static str,
    pub cert_auth: &'static str,
    pub listen: &'static str,
    /// The side's listener also serves HTTP/1.1 (the client port's `/metrics`, `/health`).
    pub http1: bool,
}

pub const CLIENT_FLAGS: FlagNames = FlagNames {
    cert: "cert-file",
    key: "key-file",
    trusted_ca: "trusted-ca-file",
    cert_auth: "client-cert-auth",
    listen: "listen-client-urls",
    http1: true,
};

pub const PEER_FLAGS: FlagNames = FlagNames {
    cert: "peer-cert-file",
    key: "peer-key-file",
    trusted_ca: "peer-trusted-ca-file",
    cert_auth: "peer-client-cert-auth",
    listen: "listen-peer-urls",
    http1: false,
};

/// etcdctl's names, which the `raftkv` client commands take.
pub const CLI_FLAGS: FlagNames = FlagNames {
    cert: "cert",
    key: "key",
    trusted_ca: "cacert",
    cert_auth: "",
    listen: "",
    http1: false,
};

/// One side's files, as its flags give them.
#[derive(Clone, Debug, Default)]
pub struct Files {
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    pub trusted_ca: Option<PathBuf>,
    /// Refuse connections without a certificate signed by `trusted_ca`.
    pub cert_auth: bool,
}

impl Files {
    pub fn is_empty(&self) -> bool {
        self.cert.is_none() && self.key.is_none() && self.trusted_ca.is_none() && !self.cert_auth
    }
}

/// Everything TLS is done with: ring, whatever provider another crate may have installed
/// process-wide.
fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn certs(path: &Path, flag: &str) -> Result<Vec<CertificateDer<'static>>, String> {
    let bad = |e: &dyn std::fmt::Display| format!("--{flag} {}: {e}", path.display());
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| bad(&e))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| bad(&e))?;
    if certs.is_empty() {
        return Err(bad(&"no PEM certificate (BEGIN CERTIFICATE) in the file"));
    }
    Ok(certs)
}

fn key(path: &Path, flag: &str) -> Result<PrivateKeyDer<'static>, String> {
    PrivateKeyDer::from_pem_file(path).map_err(|e| {
        let why = match e {
            rustls::pki_types::pem::Error::NoItemsFound => {
                "no PEM private key (BEGIN PRIVATE KEY, EC or RSA PRIVATE KEY) in the file"
                    .to_string()
            }
            e => e.to_string(),
        };
        format!("--{flag} {}: {why}", path.display())
    })
}

fn roots(path: &Path, flag: &str) -> Result<Arc<RootCertStore>, String> {
    let mut store = RootCertStore::empty();
    for cert in certs(path, flag)? {
        store
            .add(cert)
            .map_err(|e| format!("--{flag} {}: not a CA certificate: {e}", path.display()))?;
    }
    Ok(Arc::new(store))
}

/// The system's trusted roots, for https URLs when no CA file is given (loaded once, and
/// only when such a URL is dialed).
fn system_roots() -> Arc<RootCertStore> {
    static ROOTS: OnceLock<Arc<RootCertStore>> = OnceLock::new();
    ROOTS
        .get_or_init(|| {
            let mut store = RootCertStore::empty();
            let found = rustls_native_certs::load_native_certs();
            let (added, _) = store.add_parsable_certificates(found.certs);
            if added == 0 {
                tracing::warn!("no trusted CA certificates found on this system");
            }
            Arc::new(store)
        })
        .clone()
}

/// A certificate with its key, checked to belong together.
type Identity = (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>);

/// The side's certificate and key: both or neither.
fn identity(files: &Files, names: FlagNames) -> Result<Option<Identity>, String> {
    match (&files.cert, &files.key) {
        (None, None) => Ok(None),
        (Some(_), None) => Err(format!("--{} is given without --{}", names.cert, names.key)),
        (None, Some(_)) => Err(format!("--{} is given without --{}", names.key, names.cert)),
        (Some(c), Some(k)) => Ok(Some((certs(c, names.cert)?, key(k, names.key)?))),
    }
}

/// One side's TLS: what its listener accepts and how this member dials that side.
#[derive(Clone, Debug, Default)]
pub struct Side {
    pub acceptor: Option<Acceptor>,
    pub dialer: Dialer,
}

/// A TLS acceptor (a newtype for Debug).
#[derive(Clone)]
pub struct Acceptor(TlsAcceptor);

impl std::fmt::Debug for Acceptor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Acceptor")
    }
}

impl Side {
    /// Load one side's files. `listen_https`: the side's listen URL is `https://` (then a
    /// certificate and key are required, as etcd requires them).
    pub fn load(files: &Files, names: FlagNames, listen_https: bool) -> Result<Side, String> {
        let ident = identity(files, names)?;
        if files.cert_auth && files.trusted_ca.is_none() {
            return Err(format!(
                "--{} needs --{} (the CA whose certificates are accepted)",
                names.cert_auth, names.trusted_ca
            ));
        }
        let roots = match &files.trusted_ca {
            Some(p) => Some(roots(p, names.trusted_ca)?),
            None => None,
        };
        if let Some(warning) = ignored_cert_auth(files, names, listen_https) {
            tracing::warn!("{warning}");
        }
        let acceptor = match (&ident, listen_https) {
            (None, true) => {
                return Err(format!(
                    "--{} is https:// but --{} and --{} are not given",
                    names.listen, names.cert, names.key
                ))
            }
            (Some(ident), true) => Some(server_config(ident, roots.as_ref(), files, names)?),
            (Some(_), false) => {
                tracing::warn!(
                    "--{} is http://: it is served without TLS (--{} is used only to connect \
                     to https:// URLs)",
                    names.listen,
                    names.cert
                );
                None
            }
            (None, false) => None,
        };
        let dialer = if ident.is_none() && roots.is_none() {
            Dialer::default()
        } else {
            Dialer::new(ident, roots, names)?
        };
        Ok(Side { acceptor, dialer })
    }
}

/// What to say when `…-cert-auth` is given for a plaintext listener: nothing can be checked
/// there, and etcd 3.4 then serves it unauthenticated with a warning ("The scheme of client
/// url http://… is HTTP while client cert auth (--client-cert-auth) is enabled. Ignored
/// client cert auth for this url."). raftkv does the same, so etcd's flags start the same
/// cluster, and says so rather than let the operator believe clients are checked.
fn ignored_cert_auth(files: &Files, names: FlagNames, listen_https: bool) -> Option<String> {
    (files.cert_auth && !listen_https).then(|| {
        format!(
            "--{} is http:// while client cert auth (--{}) is enabled: client cert auth is \
             ignored for it, and it serves without authentication (as etcd does); use \
             https:// URLs to require client certificates",
            names.listen, names.cert_auth
        )
    })
}

fn server_config(
    (chain, key): &Identity,
    roots: Option<&Arc<RootCertStore>>,
    files: &Files,
    names: FlagNames,
) -> Result<Acceptor, String> {
    let builder = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?;
    let builder = match (files.cert_auth, roots) {
        (true, Some(roots)) => {
            let verifier = WebPkiClientVerifier::builder_with_provider(roots.clone(), provider())
                .build()
                .map_err(|e| format!("--{}: {e}", names.trusted_ca))?;
            builder.with_client_cert_verifier(verifier)
        }
        // As etcd: without the cert-auth flag, no certificate is asked for.
        _ => builder.with_no_client_auth(),
    };
    let mut config = builder
        .with_single_cert(chain.clone(), key.clone_key())
        .map_err(|e| {
            format!(
                "--{} / --{}: cannot serve with this certificate and key: {e}",
                names.cert, names.key
            )
        })?;
    // gRPC is HTTP/2; clients that negotiate (Go's do) must be told so.
    // gRPC is h2. The client port also serves /metrics, /health and /version to clients
    // that speak only HTTP/1.1 (curl --http1.1, urllib3), as etcd does: they offer just
    // `http/1.1` and a server offering only `h2` would fail their handshake. The guard
    // (guard.rs) still keeps gRPC off HTTP/1.1. Peers speak only gRPC.
    config.alpn_protocols = match names.http1 {
        true => vec![b"h2".to_vec(), b"http/1.1".to_vec()],
        false => vec![b"h2".to_vec()],
    };
    Ok(Acceptor(TlsAcceptor::from(Arc::new(config))))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn files(dir: &Path, cert: &str, key: &str, ca: Option<&str>, auth: bool) -> Files {
        Files {
            cert: Some(dir.join(cert)),
            key: Some(dir.join(key)),
            trusted_ca: ca.map(|c| dir.join(c)),
            cert_auth: auth,
        }
    }

    fn err(f: &Files, https: bool) -> String {
        match Side::load(f, CLIENT_FLAGS, https) {
            Ok(_) => panic!("{f:?} was accepted"),
            Err(e) => e,
        }
    }

    #[test]
    fn bad_flags_and_files_are_refused_naming_the_flag_and_the_path() {
        let dir = tempfile::tempdir().unwrap();
        let pki = DevPki::ensure(dir.path(), &["a".to_string()]).unwrap();
        let d = &pki.dir;
        std::fs::write(d.join("junk.pem"), "not pem at all\n").unwrap();
        let good = files(d, "a-server.pem", "a-server-key.pem", Some("ca.pem"), true);
        assert!(Side::load(&good, CLIENT_FLAGS, true)
            .unwrap()
            .acceptor
            .is_some());

        let no_tls = Files::default();
        assert_eq!(
            err(&no_tls, true),
            "--listen-client-urls is https:// but --cert-file and --key-file are not given"
        );
        let mut no_key = good.clone();
        no_key.key = None;
        assert_eq!(
            err(&no_key, true),
            "--cert-file is given without --key-file"
        );
        let mut no_ca = good.clone();
        no_ca.trusted_ca = None;
        assert!(err(&no_ca, true).starts_with("--client-cert-auth needs --trusted-ca-file"));
        let missing = files(d, "nope.pem", "a-server-key.pem", None, false);
        let e = err(&missing, true);
        assert!(
            e.starts_with(&format!("--cert-file {}", d.join("nope.pem").display())),
            "{e}"
        );
        let junk_cert = files(d, "junk.pem", "a-server-key.pem", None, false);
        assert!(err(&junk_cert, true).contains("no PEM certificate"));
        let junk_key = files(d, "a-server.pem", "junk.pem", None, false);
        assert!(err(&junk_key, true).contains("no PEM private key"));
        let key_as_ca = files(
            d,
            "a-server.pem",
            "a-server-key.pem",
            Some("a-server-key.pem"),
            true,
        );
        assert!(err(&key_as_ca, true).starts_with("--trusted-ca-file"));
        let mismatched = files(d, "a-server.pem", "a-peer-key.pem", None, false);
        assert!(err(&mismatched, true).starts_with("--cert-file / --key-file"));
        // The peer side names its own flags.
        let e = Side::load(&no_key, PEER_FLAGS, true).unwrap_err();
        assert_eq!(e, "--peer-cert-file is given without --peer-key-file");
    }

    #[test]
    fn certificates_are_reused_when_all_are_there() {
        let dir = tempfile::tempdir().unwrap();
        let names = ["n0".to_string(), "n1".to_string()];
        let first = DevPki::ensure(dir.path(), &names).unwrap();
        let ca = std::fs::read(first.ca()).unwrap();
        let again = DevPki::ensure(dir.path(), &names).unwrap();
        assert_eq!(std::fs::read(again.ca()).unwrap(), ca);
        // A member more: a new set (the CA's key is not kept to sign with).
        let more = DevPki::ensure(
            dir.path(),
            &[names[0].clone(), names[1].clone(), "n2".into()],
        )
        .unwrap();
        assert_ne!(std::fs::read(more.ca()).unwrap(), ca);
        assert!(more.peer_cert("n2").is_file());
    }

    #[test]
    fn the_throwaway_ca_names_no_directory() {
        let dir = tempfile::tempdir().unwrap();
        let pki = DevPki::ensure(dir.path(), &["n0".to_string()]).unwrap();
        let path = dir.path().display().to_string();
        for file in [pki.ca(), pki.server_cert("n0"), pki.client_cert()] {
            let der = CertificateDer::from_pem_file(&file).unwrap();
            let der: &[u8] = der.as_ref();
            let has = |needle: &[u8]| der.windows(needle.len()).any(|w| w == needle);
            assert!(has(b"raftkv cluster CA "), "{}", file.display());
            assert!(!has(path.as_bytes()), "{} names {path}", file.display());
            assert!(!has(b"/tmp"), "{} names a path", file.display());
        }
    }

    #[test]
    fn cert_auth_on_a_plaintext_listener_is_said_to_be_ignored_as_etcd_says() {
        let dir = tempfile::tempdir().unwrap();
        let pki = DevPki::ensure(dir.path(), &["a".to_string()]).unwrap();
        let f = Files {
            cert: None,
            key: None,
            trusted_ca: Some(pki.ca()),
            cert_auth: true,
        };
        // etcd 3.4 starts and serves the http:// URL without authentication: so does raftkv.
        assert!(Side::load(&f, CLIENT_FLAGS, false).is_ok());
        let w = ignored_cert_auth(&f, CLIENT_FLAGS, false).expect("a warning");
        assert!(w.contains("--listen-client-urls is http://"), "{w}");
        assert!(
            w.contains("(--client-cert-auth)") && w.contains("ignored"),
            "{w}"
        );
        let w = ignored_cert_auth(&f, PEER_FLAGS, false).expect("a warning");
        assert!(w.contains("--listen-peer-urls") && w.contains("--peer-client-cert-auth"));
        assert_eq!(ignored_cert_auth(&f, CLIENT_FLAGS, true), None);
        let no_auth = Files {
            cert_auth: false,
            ..f
        };
        assert_eq!(ignored_cert_auth(&no_auth, CLIENT_FLAGS, false), None);
    }

    #[test]
    fn refusals_from_one_address_are_logged_once_per_interval() {
        let key = "test 192.0.2.1";
        assert_eq!(throttle(key), Some(0));
        assert_eq!(throttle(key), None);
        assert_eq!(throttle(key), None);
        assert_eq!(throttle("test 192.0.2.2"), Some(0));
    }
}
