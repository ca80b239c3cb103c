//! A throwaway certificate authority and certificates for a local cluster (`raftkv cluster
//! --tls`, and tests).

use super::*;
/// A throwaway certificate authority and certificates for a local cluster (`raftkv
/// cluster --tls`, and tests): PEM files in one directory.
#[derive(Clone, Debug)]
pub struct DevPki {
    pub dir: PathBuf,
}

impl DevPki {
    pub fn ca(&self) -> PathBuf {
        self.dir.join("ca.pem")
    }
    /// Member `name`'s certificate for its client URLs.
    pub fn server_cert(&self, name: &str) -> PathBuf {
        self.dir.join(format!("{name}-server.pem"))
    }
    pub fn server_key(&self, name: &str) -> PathBuf {
        self.dir.join(format!("{name}-server-key.pem"))
    }
    /// Member `name`'s certificate for its peer URLs.
    pub fn peer_cert(&self, name: &str) -> PathBuf {
        self.dir.join(format!("{name}-peer.pem"))
    }
    pub fn peer_key(&self, name: &str) -> PathBuf {
        self.dir.join(format!("{name}-peer-key.pem"))
    }
    /// A client's certificate (for etcdctl's `--cert`).
    pub fn client_cert(&self) -> PathBuf {
        self.dir.join("client.pem")
    }
    pub fn client_key(&self) -> PathBuf {
        self.dir.join("client-key.pem")
    }

    fn all_files(&self, members: &[String]) -> Vec<PathBuf> {
        let mut v = vec![self.ca(), self.client_cert(), self.client_key()];
        for m in members {
            v.extend([
                self.server_cert(m),
                self.server_key(m),
                self.peer_cert(m),
                self.peer_key(m),
            ]);
        }
        v
    }

    /// The certificates in `dir` for `members`, made now unless all are there already (a
    /// restarted cluster keeps its CA, so clients configured for it keep working). Member
    /// certificates name 127.0.0.1 and localhost, and serve as client certificates too (a
    /// member dials its peers and its leader with them).
    pub fn ensure(dir: &Path, members: &[String]) -> Result<DevPki, String> {
        let pki = DevPki {
            dir: dir.to_path_buf(),
        };
        if pki.all_files(members).iter().all(|p| p.is_file()) {
            return Ok(pki);
        }
        std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        let err = |e: rcgen::Error| format!("making certificates: {e}");
        use rcgen::{
            BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose as Eku, IsCa,
            KeyPair, KeyUsagePurpose,
        };
        let ca_key = KeyPair::generate().map_err(err)?;
        let mut ca = CertificateParams::new(Vec::<String>::new()).map_err(err)?;
        // Every client that connects is sent this name: nothing of this machine in it (a
        // path names users and directories), only a suffix from the CA's own public key to
        // tell one run's CA from another's.
        let suffix: String = {
            use sha2::Digest;
            let digest = sha2::Sha256::digest(ca_key.public_key_der());
            digest[..4].iter().map(|b| format!("{b:02x}")).collect()
        };
        ca.distinguished_name
            .push(DnType::CommonName, format!("raftkv cluster CA {suffix}"));
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let ca = ca.self_signed(&ca_key).map_err(err)?;
        let leaf = |cn: &str, ekus: Vec<Eku>| -> Result<(String, String), String> {
            let key = KeyPair::generate().map_err(err)?;
            let mut p = CertificateParams::new(vec!["127.0.0.1".to_string(), "localhost".into()])
                .map_err(err)?;
            p.distinguished_name.push(DnType::CommonName, cn);
            p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
            p.extended_key_usages = ekus;
            let cert = p.signed_by(&key, &ca, &ca_key).map_err(err)?;
            Ok((cert.pem(), key.serialize_pem()))
        };
        let write = |path: PathBuf, text: &str, secret: bool| -> Result<(), String> {
            use std::io::Write;
            use std::os::unix::fs::OpenOptionsExt;
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(if secret { 0o600 } else { 0o644 })
                .open(&path)
                .map_err(|e| format!("{}: {e}", path.display()))?;
            f.write_all(text.as_bytes())
                .map_err(|e| format!("{}: {e}", path.display()))
        };
        for m in members {
            let both = vec![Eku::ServerAuth, Eku::ClientAuth];
            let (cert, key) = leaf(m, both.clone())?;
            write(pki.server_cert(m), &cert, false)?;
            write(pki.server_key(m), &key, true)?;
            let (cert, key) = leaf(m, both)?;
            write(pki.peer_cert(m), &cert, false)?;
            write(pki.peer_key(m), &key, true)?;
        }
        let (cert, key) = leaf("client", vec![Eku::ClientAuth])?;
        write(pki.client_cert(), &cert, false)?;
        write(pki.client_key(), &key, true)?;
        // The CA last: its presence alone does not mean the set is complete (see above).
        write(pki.ca(), &ca.pem(), false)?;
        Ok(pki)
    }
}
