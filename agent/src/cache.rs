//! restic's cache on the node: one directory per repository (and per user restic runs as)
//! under the agent's state directory, kept across runs and agent restarts.
//!
//! restic writes each cache file once, under a temporary name and then renamed, and reads
//! from the repository what it does not find in the cache, so runs of one repository may share
//! a cache. A run marks its cache as in use ([`InUse`]) before restic starts; when the last run
//! using a cache ends, the agent keeps it within its size limit (`cache.size` of the
//! ResticRepository) by removing the oldest files first. Caches no run has used for
//! [`UNUSED_FOR`] are moved aside under the in-use lock (so no run can start on them meanwhile)
//! and removed. Nothing is trimmed or removed while restic may be writing to it.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

/// A repository's cache that no run used for this long is removed.
pub const UNUSED_FOR: Duration = Duration::from_secs(30 * 24 * 3600);

/// A directory name for a repository's cache that does not show the URL (it may hold
/// credentials), one per user restic runs as: restic makes its cache readable by its own user
/// only, so runs of one repository as different users (`runAsUser`) would otherwise take it
/// from each other. Stable across agent versions, so an upgrade keeps the caches.
pub fn key(url: &str, user: Option<(u32, u32)>) -> String {
    let digest = ring::digest::digest(&ring::digest::SHA256, url.as_bytes());
    let hash: String = digest
        .as_ref()
        .iter()
        .take(8)
        .map(|b| format!("{b:02x}"))
        .collect();
    match user {
        Some((uid, gid)) => format!("repo-{hash}-{uid}-{gid}"),
        None => format!("repo-{hash}"),
    }
}

/// What [`trim`] did.
#[derive(Debug, Default, PartialEq)]
pub struct Trimmed {
    pub bytes_before: u64,
    pub bytes_after: u64,
    pub files_removed: usize,
}

/// Removes the oldest files of the cache `dir` until it holds at most `limit` bytes.
pub fn trim(dir: &Path, limit: u64) -> std::io::Result<Trimmed> {
    let mut files = Vec::new();
    collect(dir, &mut files)?;
    // The tag counts towards the size but is kept: it tells backup tools to skip the cache.
    let before: u64 = files.iter().map(|f| f.size).sum();
    files.retain(|f| f.path.file_name().is_none_or(|n| n != "CACHEDIR.TAG"));
    let mut trimmed = Trimmed {
        bytes_before: before,
        bytes_after: before,
        files_removed: 0,
    };
    if before <= limit {
        return Ok(trimmed);
    }
    files.sort_by_key(|f| f.modified);
    for f in files {
        if trimmed.bytes_after <= limit {
            break;
        }
        // Gone already (another run's trim): counted as removed all the same.
        match std::fs::remove_file(&f.path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        trimmed.bytes_after -= f.size;
        trimmed.files_removed += 1;
    }
    Ok(trimmed)
}

/// Marks the cache `dir` as used now, so [`sweep`] keeps it.
pub fn touch(dir: &Path) {
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.set_modified(SystemTime::now());
    }
}

/// The caches runs are using now, by directory, with how many runs use each.
#[derive(Default)]
pub struct InUse(std::sync::Mutex<std::collections::HashMap<PathBuf, usize>>);

impl InUse {
    /// Marks `dir` as used by one more run, and as used now (see [`sweep`]).
    pub fn enter(&self, dir: &Path) {
        let mut map = self.0.lock().expect("in use");
        *map.entry(dir.to_path_buf()).or_default() += 1;
        touch(dir);
    }

    /// One run less uses `dir`; whether it was the last.
    pub fn leave(&self, dir: &Path) -> bool {
        let mut map = self.0.lock().expect("in use");
        match map.get_mut(dir) {
            Some(n) if *n > 1 => {
                *n -= 1;
                false
            }
            _ => {
                map.remove(dir);
                true
            }
        }
    }
}

/// Moves the caches under `root` that no run used for `unused_for`, and no run uses now, aside
/// (under `in_use`'s lock, so that no run starts on one meanwhile). Returns their names and
/// where they are now, for [`remove_moved`].
pub fn sweep(root: &Path, unused_for: Duration, in_use: &InUse) -> Vec<(String, PathBuf)> {
    let Ok(entries) = std::fs::read_dir(root) else {
        return Vec::new();
    };
    let map = in_use.0.lock().expect("in use");
    let mut moved = Vec::new();
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Ok(meta) = entry.path().symlink_metadata() else {
            continue;
        };
        // Left by an earlier sweep that did not finish.
        if name.starts_with(".removed-") {
            moved.push((name, entry.path()));
            continue;
        }
        let unused = meta
            .modified()
            .ok()
            .and_then(|m| m.elapsed().ok())
            .is_some_and(|age| age > unused_for);
        if meta.is_dir() && name.starts_with("repo-") && unused && !map.contains_key(&entry.path()) {
            let aside = root.join(format!(".removed-{name}"));
            if std::fs::rename(entry.path(), &aside).is_ok() {
                moved.push((name, aside));
            }
        }
    }
    moved
}

/// Removes what [`sweep`] moved aside.
pub fn remove_moved(moved: &[(String, PathBuf)]) {
    for (_, path) in moved {
        let _ = std::fs::remove_dir_all(path);
    }
}

/// How many regular files are below `dir` (never following a symlink).
pub fn count_files(dir: &Path) -> usize {
    let mut files = Vec::new();
    let _ = collect(dir, &mut files);
    files.len()
}

struct File {
    path: PathBuf,
    size: u64,
    modified: SystemTime,
}

/// The regular files below `dir`, never following a symlink. What disappears during the walk
/// is not there.
fn collect(dir: &Path, files: &mut Vec<File>) -> std::io::Result<()> {
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    for entry in entries {
        let entry = entry?;
        let meta = match entry.path().symlink_metadata() {
            Ok(m) => m,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e),
        };
        if meta.is_dir() {
            collect(&entry.path(), files)?;
        } else if meta.is_file() {
            files.push(File {
                path: entry.path(),
                size: meta.len(),
                modified: meta.modified().unwrap_or(SystemTime::UNIX_EPOCH),
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_user_restic_runs_as_has_a_cache_of_its_own_named_without_the_url() {
        let url = "s3:https://key:secret@s3.example/bucket";
        let root = key(url, None);
        let user = key(url, Some((1000, 1000)));
        let other = key(url, Some((1001, 1001)));
        // Stable: the same name in every agent version, so an upgrade keeps the caches.
        assert_eq!(root, key(url, None));
        assert_eq!(key("s3:http://s3/a", None), "repo-23c5fce8060f5a11");
        assert!(root != user && user != other, "{root} {user} {other}");
        for k in [root, user, other] {
            assert!(!k.contains("secret") && !k.contains('/'), "{k}");
        }
    }

    fn write(path: &Path, bytes: usize, age: Duration) {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, vec![7u8; bytes]).unwrap();
        let t = std::fs::File::options().write(true).open(path).unwrap();
        t.set_modified(SystemTime::now() - age).unwrap();
    }

    #[test]
    fn trimming_removes_the_oldest_files_until_the_cache_fits() {
        let dir = tempfile::tempdir().unwrap();
        let repo = dir.path().join("0123abcd");
        write(&repo.join("CACHEDIR.TAG"), 100, Duration::from_secs(9000));
        write(&repo.join("index/old"), 1000, Duration::from_secs(3000));
        write(&repo.join("data/ab/older"), 1000, Duration::from_secs(2000));
        write(&repo.join("snapshots/new"), 1000, Duration::from_secs(10));
        // Within the limit: nothing goes. The tag counts towards the size.
        let t = trim(dir.path(), 3100).unwrap();
        assert_eq!((t.bytes_before, t.files_removed), (3100, 0));
        let t = trim(dir.path(), 1500).unwrap();
        assert_eq!(
            t,
            Trimmed {
                bytes_before: 3100,
                bytes_after: 1100,
                files_removed: 2
            }
        );
        assert!(repo.join("snapshots/new").exists() && repo.join("CACHEDIR.TAG").exists());
        assert!(!repo.join("index/old").exists() && !repo.join("data/ab/older").exists());
        // Below what the tag alone holds: everything else goes, the tag stays.
        let t = trim(dir.path(), 50).unwrap();
        assert_eq!((t.bytes_after, t.files_removed), (100, 1));
        assert!(repo.join("CACHEDIR.TAG").exists() && !repo.join("snapshots/new").exists());
    }

    #[test]
    fn trimming_never_follows_a_symlink_out_of_the_cache() {
        let dir = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        write(&outside.path().join("precious"), 5000, Duration::from_secs(9000));
        std::os::unix::fs::symlink(outside.path(), dir.path().join("data")).unwrap();
        write(&dir.path().join("index/x"), 10, Duration::from_secs(1));
        let t = trim(dir.path(), 0).unwrap();
        assert_eq!(t.files_removed, 1);
        assert!(outside.path().join("precious").exists());
    }

    #[test]
    fn caches_no_run_used_for_a_month_are_swept() {
        let root = tempfile::tempdir().unwrap();
        for name in ["repo-old", "repo-new", "not-a-cache"] {
            std::fs::create_dir_all(root.path().join(name).join("index")).unwrap();
        }
        let month_ago = SystemTime::now() - UNUSED_FOR - Duration::from_secs(60);
        for name in ["repo-old", "not-a-cache"] {
            std::fs::File::open(root.path().join(name))
                .unwrap()
                .set_modified(month_ago)
                .unwrap();
        }
        let in_use = InUse::default();
        let moved = sweep(root.path(), UNUSED_FOR, &in_use);
        assert_eq!(
            moved.iter().map(|m| m.0.as_str()).collect::<Vec<_>>(),
            ["repo-old"]
        );
        remove_moved(&moved);
        assert!(!root.path().join("repo-old").exists() && !root.path().join(".removed-repo-old").exists());
        assert!(root.path().join("repo-new").exists() && root.path().join("not-a-cache").exists());
        // A run starting marks its cache as used now.
        let new = root.path().join("repo-new");
        std::fs::File::open(&new)
            .unwrap()
            .set_modified(month_ago)
            .unwrap();
        in_use.enter(&new);
        assert!(sweep(root.path(), UNUSED_FOR, &in_use).is_empty());
        // And a cache in use is never swept, however old it looks (a monthly backup whose
        // run outlives another run's sweep).
        std::fs::File::open(&new)
            .unwrap()
            .set_modified(month_ago)
            .unwrap();
        assert!(sweep(root.path(), UNUSED_FOR, &in_use).is_empty());
        in_use.enter(&new);
        assert!(!in_use.leave(&new), "another run still uses it");
        assert!(in_use.leave(&new), "the last run left");
        std::fs::File::open(&new)
            .unwrap()
            .set_modified(month_ago)
            .unwrap();
        assert_eq!(sweep(root.path(), UNUSED_FOR, &in_use).len(), 1);
    }
}
