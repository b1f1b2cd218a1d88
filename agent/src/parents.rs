//! The parent of a backup, known without asking the repository.
//!
//! A backup's parent is the snapshot restic compares files against, so that unchanged files are
//! not read again. Looking it up in the repository costs a whole restic process (the key
//! derivation alone takes about half a second), so each backup that made a snapshot leaves a
//! record here: the snapshot's id under the backup's identity (repository, host, tags and
//! paths). The next backup with that identity on this node names it with `--parent`, in the
//! single `restic backup` call, and reports it as its parent.
//!
//! Without a record (the first backup of the identity on this node, after a pod moved here, or
//! after the recorded snapshot was forgotten), restic chooses with `--group-by host,paths,tags`:
//! the latest snapshot of the same host that holds all of the backup's tags, namespace tag
//! included, and all of its paths. Either way another namespace's snapshot is never a parent.
//! The records live on the agent's state disk, which tenants cannot write.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// What a backup's snapshots have in common, and so what its parent must share.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Identity {
    /// A hash of the repository's URL (which may hold credentials).
    pub repository: String,
    pub host: String,
    /// Sorted.
    pub tags: Vec<String>,
    /// Sorted.
    pub paths: Vec<String>,
}

impl Identity {
    pub fn new(repository_url: &str, host: &str, tags: &[String], paths: &[String]) -> Self {
        let mut tags = tags.to_vec();
        tags.sort();
        let mut paths = paths.to_vec();
        paths.sort();
        let digest = ring::digest::digest(&ring::digest::SHA256, repository_url.as_bytes());
        Self {
            repository: hex(digest.as_ref()),
            host: host.to_owned(),
            tags,
            paths,
        }
    }

    /// A file name for the identity that does not show the URL (it may hold credentials).
    fn key(&self) -> String {
        let json = serde_json::to_vec(self).expect("identity serializes");
        let digest = ring::digest::digest(&ring::digest::SHA256, &json);
        hex(&digest.as_ref()[..16])
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[derive(Serialize, Deserialize)]
struct Record {
    identity: Identity,
    snapshot: String,
}

/// The records, one file per identity.
pub struct Parents {
    dir: PathBuf,
}

impl Parents {
    pub fn new(state_dir: &Path) -> Self {
        Self {
            dir: state_dir.join("parents"),
        }
    }

    /// The snapshot the last backup of `identity` on this node made, if it is known.
    pub fn get(&self, identity: &Identity) -> Option<String> {
        let text = std::fs::read(self.dir.join(identity.key())).ok()?;
        let record: Record = serde_json::from_slice(&text).ok()?;
        // The file name is a hash: the record itself says whose it is.
        (record.identity == *identity && is_snapshot_id(&record.snapshot)).then_some(record.snapshot)
    }

    /// Remembers `snapshot` as the parent of the next backup of `identity`. A record that cannot
    /// be written only costs the next backup a parent chosen by restic.
    pub fn set(&self, identity: &Identity, snapshot: &str) {
        if let Err(e) = self.write(identity, snapshot) {
            tracing::warn!(error = %e, "cannot record a backup's snapshot as the next one's parent");
        }
    }

    /// Forgets the record of `identity` (its snapshot is gone from the repository).
    pub fn forget(&self, identity: &Identity) {
        let _ = std::fs::remove_file(self.dir.join(identity.key()));
    }

    fn write(&self, identity: &Identity, snapshot: &str) -> std::io::Result<()> {
        std::fs::create_dir_all(&self.dir)?;
        let record = Record {
            identity: identity.clone(),
            snapshot: snapshot.to_owned(),
        };
        static WRITES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let path = self.dir.join(identity.key());
        // Its own temporary name: overlapping runs of one identity never share one.
        let n = WRITES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let tmp = self.dir.join(format!(".{}-{n}.tmp", identity.key()));
        std::fs::write(&tmp, serde_json::to_vec(&record)?)?;
        std::fs::rename(tmp, path)
    }
}

/// A full restic snapshot id: 64 lower-case hex digits.
pub fn is_snapshot_id(id: &str) -> bool {
    id.len() == 64 && id.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    fn identity(host: &str, tags: &[&str]) -> Identity {
        let tags: Vec<String> = tags.iter().map(|t| t.to_string()).collect();
        Identity::new("s3:http://key:secret@s3/bucket", host, &tags, &["/data/a".into()])
    }

    #[test]
    fn a_record_is_found_only_by_its_own_identity() {
        let dir = tempfile::tempdir().unwrap();
        let parents = Parents::new(dir.path());
        let ours = identity("db", &["restic-operator/namespace=a", "app"]);
        assert_eq!(parents.get(&ours), None);
        parents.set(&ours, ID);
        // Tag order does not matter; any other host, tag set or path does.
        assert_eq!(
            parents
                .get(&identity("db", &["app", "restic-operator/namespace=a"]))
                .as_deref(),
            Some(ID)
        );
        assert_eq!(
            parents.get(&identity("db", &["restic-operator/namespace=b", "app"])),
            None
        );
        assert_eq!(
            parents.get(&identity("web", &["restic-operator/namespace=a", "app"])),
            None
        );
        let mut other_paths = ours.clone();
        other_paths.paths = vec!["/data/b".into()];
        assert_eq!(parents.get(&other_paths), None);
        parents.forget(&ours);
        assert_eq!(parents.get(&ours), None);
        // Neither the file names nor the records show the URL's credentials.
        parents.set(&ours, ID);
        for entry in std::fs::read_dir(dir.path().join("parents")).unwrap() {
            let entry = entry.unwrap();
            let name = entry.file_name().into_string().unwrap();
            assert!(!name.contains("secret") && name.len() == 32, "{name}");
            let text = std::fs::read_to_string(entry.path()).unwrap();
            assert!(!text.contains("secret") && !text.contains("s3:"), "{text}");
        }
    }

    #[test]
    fn a_damaged_or_foreign_record_is_no_parent() {
        let dir = tempfile::tempdir().unwrap();
        let parents = Parents::new(dir.path());
        let ours = identity("db", &["x"]);
        parents.set(&ours, "not-an-id --and-an-option");
        assert_eq!(parents.get(&ours), None);
        std::fs::write(dir.path().join("parents").join(ours.key()), b"{garbled").unwrap();
        assert_eq!(parents.get(&ours), None);
        // Another identity's record under our name (a collision, or a copied file).
        let theirs = identity("web", &["x"]);
        let record = Record {
            identity: theirs,
            snapshot: ID.into(),
        };
        std::fs::write(
            dir.path().join("parents").join(ours.key()),
            serde_json::to_vec(&record).unwrap(),
        )
        .unwrap();
        assert_eq!(parents.get(&ours), None);
    }
}
