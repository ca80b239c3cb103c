//! The data directory's identity: which format, cluster and node its data belongs to.
//! Checked at every start, so a node pointed at another cluster's data (or at data written
//! by a newer version) refuses to run instead of corrupting either.

use crate::error::{Error, Result};
use std::fs;
use std::io::Write;
use std::path::Path;

/// The on-disk format this build writes and reads.
pub const FORMAT_VERSION: u32 = 1;
const FILE: &str = "IDENTITY";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Identity {
    pub cluster_id: u64,
    pub node_id: u64,
}

impl Identity {
    fn render(&self, version: u32) -> String {
        let body = format!(
            "raftkv data directory\nformat {version}\ncluster {:016x}\nnode {}\n",
            self.cluster_id, self.node_id
        );
        format!("{body}crc {:08x}\n", crc32c::crc32c(body.as_bytes()))
    }
}

/// Check `dir`'s identity against `want`, writing it if the directory is new (`fresh`:
/// it holds no data yet).
pub(crate) fn check_or_create(dir: &Path, want: Identity, fresh: bool) -> Result<()> {
    let path = dir.join(FILE);
    match fs::read_to_string(&path) {
        Ok(text) => verify(&path, &text, want),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            if !fresh {
                return Err(Error::Identity(format!(
                    "{} holds raft data but no {FILE} file; refusing to guess whose it is",
                    dir.display()
                )));
            }
            let tmp = dir.join(format!("{FILE}.tmp"));
            let mut f = fs::File::create(&tmp).map_err(|e| Error::io(&tmp, e))?;
            f.write_all(want.render(FORMAT_VERSION).as_bytes())
                .and_then(|_| f.sync_all())
                .map_err(|e| Error::io(&tmp, e))?;
            fs::rename(&tmp, &path).map_err(|e| Error::io(&path, e))?;
            crate::sync_dir(dir)
        }
        Err(e) => Err(Error::io(&path, e)),
    }
}

fn verify(path: &Path, text: &str, want: Identity) -> Result<()> {
    let bad = |what: &str| Error::corrupt(path, 0, what.to_string());
    let (body, crc_line) = text
        .rsplit_once("crc ")
        .ok_or_else(|| bad("missing checksum line"))?;
    let crc = u32::from_str_radix(crc_line.trim(), 16).map_err(|_| bad("bad checksum line"))?;
    if crc != crc32c::crc32c(body.as_bytes()) {
        return Err(bad("checksum mismatch"));
    }
    let field = |name: &str| -> Result<&str> {
        body.lines()
            .find_map(|l| l.strip_prefix(name).and_then(|r| r.strip_prefix(' ')))
            .ok_or_else(|| bad(&format!("missing field '{name}'")))
    };
    let version: u32 = field("format")?.parse().map_err(|_| bad("bad format"))?;
    if version > FORMAT_VERSION {
        return Err(Error::Identity(format!(
            "{} was written in data format {version}, newer than this build reads \
             ({FORMAT_VERSION}); use a newer raftkv",
            path.display()
        )));
    }
    let cluster = u64::from_str_radix(field("cluster")?, 16).map_err(|_| bad("bad cluster"))?;
    let node: u64 = field("node")?.parse().map_err(|_| bad("bad node"))?;
    if cluster != want.cluster_id {
        return Err(Error::Identity(format!(
            "{} belongs to cluster {cluster:016x}, not {:016x}: this data directory is another \
             cluster's",
            path.display(),
            want.cluster_id
        )));
    }
    if node != want.node_id {
        return Err(Error::Identity(format!(
            "{} belongs to node {node} of this cluster, not node {}",
            path.display(),
            want.node_id
        )));
    }
    Ok(())
}

impl Identity {
    /// The identity a data directory holds, if it holds one (checked, as at start).
    pub fn read(dir: &Path) -> Result<Option<Identity>> {
        let path = dir.join(FILE);
        let text = match fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(Error::io(&path, e)),
        };
        let bad = |what: &str| Error::corrupt(&path, 0, what.to_string());
        let (body, _) = text
            .rsplit_once("crc ")
            .ok_or_else(|| bad("missing checksum line"))?;
        let field = |name: &str| -> Result<&str> {
            body.lines()
                .find_map(|l| l.strip_prefix(name).and_then(|r| r.strip_prefix(' ')))
                .ok_or_else(|| bad(&format!("missing field '{name}'")))
        };
        let want = Identity {
            cluster_id: u64::from_str_radix(field("cluster")?, 16)
                .map_err(|_| bad("bad cluster"))?,
            node_id: field("node")?.parse().map_err(|_| bad("bad node"))?,
        };
        // The full check: checksum and format version.
        verify(&path, &text, want)?;
        Ok(Some(want))
    }
}

/// Write a small file of the application's (the member registry a cluster started with)
/// into the data directory, whole or not at all: checksummed, written aside, synced, renamed.
pub fn write_small_file(dir: &Path, name: &str, data: &[u8]) -> Result<()> {
    fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let path = dir.join(name);
    let tmp = dir.join(format!("{name}.tmp"));
    let mut f = fs::File::create(&tmp).map_err(|e| Error::io(&tmp, e))?;
    f.write_all(data)
        .and_then(|_| f.write_all(&crc32c::crc32c(data).to_le_bytes()))
        .and_then(|_| f.sync_all())
        .map_err(|e| Error::io(&tmp, e))?;
    fs::rename(&tmp, &path).map_err(|e| Error::io(&path, e))?;
    crate::sync_dir(dir)
}

/// Read a file written by [`write_small_file`]; `None` if there is none. A damaged one is an
/// error that names it.
pub fn read_small_file(dir: &Path, name: &str) -> Result<Option<Vec<u8>>> {
    let path = dir.join(name);
    let mut data = match fs::read(&path) {
        Ok(d) => d,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(Error::io(&path, e)),
    };
    if data.len() < 4 {
        return Err(Error::corrupt(&path, 0, "truncated".to_string()));
    }
    let crc = u32::from_le_bytes(data[data.len() - 4..].try_into().unwrap());
    data.truncate(data.len() - 4);
    if crc != crc32c::crc32c(&data) {
        return Err(Error::corrupt(&path, 0, "checksum mismatch".to_string()));
    }
    Ok(Some(data))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identity_and_small_files_read_back_and_damage_is_named() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(Identity::read(dir.path()).unwrap(), None);
        let id = Identity {
            cluster_id: 0xabc,
            node_id: 7,
        };
        check_or_create(dir.path(), id, true).unwrap();
        assert_eq!(Identity::read(dir.path()).unwrap(), Some(id));
        assert_eq!(read_small_file(dir.path(), "M").unwrap(), None);
        write_small_file(dir.path(), "M", b"members").unwrap();
        assert_eq!(
            read_small_file(dir.path(), "M").unwrap().unwrap(),
            b"members"
        );
        let mut raw = fs::read(dir.path().join("M")).unwrap();
        raw[0] ^= 1;
        fs::write(dir.path().join("M"), &raw).unwrap();
        let err = read_small_file(dir.path(), "M").unwrap_err().to_string();
        assert!(err.contains("checksum"), "{err}");
    }
}
