//! Locks that killed restic processes leave in repositories.
//!
//! restic removes its lock when it exits, even on SIGTERM, but a SIGKILL (an OOM kill, the
//! grace period running out, the agent itself killed with its runs) leaves it behind. An
//! exclusive operation (forget, prune, check) refuses to start beside any lock, and restic's own
//! `unlock` judges a lock of another host by its age only, so such a lock would block the
//! repository's retention and checks for 30 minutes.
//!
//! So every restic process has a host name of its own ([`fresh_host`]) and is PID 2 in its PID
//! namespace. Before it starts, the process is recorded on the state disk with its repository
//! and host name; the record goes when restic exits by itself (it removed its lock then). What
//! is left is a process killed, or one of an agent that stopped (restic ends with its agent,
//! see `crate::sandbox`). The next time the agent talks to that repository it runs `restic
//! unlock` under the dead process's host name with PID 2 unused (see
//! [`crate::sandbox::Spec::spare_pids`]): to restic that is a lock of this host whose process is
//! gone, which its own rule removes. A host name is never used twice, and the agent skips the
//! processes it is running, so a live lock is never touched.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Records older than this are dropped: their process died before the record was last
/// written, so restic's own 30-minute rule has made their locks stale by then.
const EXPIRY: Duration = Duration::from_secs(3600);

/// A host name never used before for a restic process: the node's host name (cut to 40
/// characters) and 16 hex digits, `<node>-<hex>`.
pub fn fresh_host() -> String {
    use std::hash::{BuildHasher, Hasher};
    use std::sync::atomic::{AtomicU64, Ordering};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let node = nix::unistd::gethostname()
        .map(|h| h.to_string_lossy().into_owned())
        .unwrap_or_default();
    let node: String = node
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.'))
        .take(40)
        .collect();
    let node = if node.is_empty() { "node".to_string() } else { node };
    // Randomly keyed, with the time, the process and a counter: unique across restarts too.
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos(),
    );
    h.write_u32(std::process::id());
    h.write_u64(COUNTER.fetch_add(1, Ordering::Relaxed));
    format!("{node}-{:016x}", h.finish())
}

/// A restic process that may hold a lock.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Holder {
    pub run_id: String,
    pub repository_url: String,
    /// The host name its locks carry.
    pub hostname: String,
}

/// The restic processes that may hold locks, one file each under `<state>/dead-locks`: those
/// running now (the executor knows which) and dead ones whose locks are not removed yet.
pub struct Holders {
    dir: PathBuf,
}

impl Holders {
    pub fn new(state_dir: &Path) -> Self {
        Self {
            dir: state_dir.join("dead-locks"),
        }
    }

    fn file(&self, hostname: &str) -> PathBuf {
        self.dir.join(format!("{hostname}.json"))
    }

    /// Records `holder` (again, to say when it was last known alive); written aside and
    /// renamed, so a crash never leaves half a record.
    pub fn record(&self, holder: &Holder) -> std::io::Result<()> {
        let path = self.file(&holder.hostname);
        let partial = path.with_extension("partial");
        std::fs::create_dir_all(&self.dir)?;
        std::fs::write(&partial, serde_json::to_vec(holder).unwrap_or_default())?;
        std::fs::rename(&partial, &path)
    }

    /// Writes every record again: at start-up, the processes of the agent before are dead, and
    /// died no earlier than now as far as anyone knows.
    pub fn refresh(&self) {
        for holder in self.all() {
            let _ = self.record(&holder);
        }
    }

    /// Every record, dropping expired and unreadable ones.
    fn all(&self) -> Vec<Holder> {
        let Ok(entries) = std::fs::read_dir(&self.dir) else {
            return Vec::new();
        };
        let mut holders = Vec::new();
        for entry in entries.flatten() {
            let path = entry.path();
            if path.extension().is_none_or(|x| x != "json") {
                continue;
            }
            let expired = entry
                .metadata()
                .and_then(|m| m.modified())
                .ok()
                .and_then(|t| t.elapsed().ok())
                .is_some_and(|age| age > EXPIRY);
            let holder = std::fs::read(&path)
                .ok()
                .and_then(|bytes| serde_json::from_slice::<Holder>(&bytes).ok())
                .filter(|h| crate::sandbox::valid_hostname(&h.hostname));
            match holder {
                Some(holder) if !expired => holders.push(holder),
                _ => {
                    let _ = std::fs::remove_file(&path);
                }
            }
        }
        holders.sort_by(|a, b| a.hostname.cmp(&b.hostname));
        holders
    }

    /// The recorded processes of the repository at `url`.
    pub fn of_repository(&self, url: &str) -> Vec<Holder> {
        self.all()
            .into_iter()
            .filter(|h| h.repository_url == url)
            .collect()
    }

    /// Forgets a process that holds no lock any more.
    pub fn cleared(&self, hostname: &str) {
        let _ = std::fs::remove_file(self.file(hostname));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_process_has_a_plain_host_name_never_used_before() {
        let a = fresh_host();
        assert_ne!(a, fresh_host());
        assert!(crate::sandbox::valid_hostname(&a), "{a}");
        assert!(a.len() <= 57, "{a}");
    }

    #[test]
    fn holders_are_kept_per_repository_until_cleared_or_expired() {
        let dir = std::env::temp_dir().join(format!("lock-holders-{}", std::process::id()));
        let store = Holders::new(&dir);
        for (id, url) in [
            ("r1", "s3:http://s3/a"),
            ("r2", "s3:http://s3/b"),
            ("r3", "s3:http://s3/a"),
        ] {
            let holder = Holder {
                run_id: id.into(),
                repository_url: url.into(),
                hostname: format!("node-{id}"),
            };
            store.record(&holder).unwrap();
        }
        let ids =
            |url: &str| -> Vec<String> { store.of_repository(url).into_iter().map(|h| h.run_id).collect() };
        assert_eq!(ids("s3:http://s3/a"), ["r1", "r3"]);
        store.cleared("node-r1");
        assert_eq!(ids("s3:http://s3/a"), ["r3"]);
        assert!(ids("s3:http://s3/c").is_empty());
        // An old record is dropped: restic's own rule covers its locks.
        let old = store.file("node-r3");
        let file = std::fs::File::options().write(true).open(&old).unwrap();
        file.set_modified(std::time::SystemTime::now() - 2 * EXPIRY)
            .unwrap();
        assert!(ids("s3:http://s3/a").is_empty());
        assert!(!old.exists());
        let _ = std::fs::remove_dir_all(dir);
    }
}
