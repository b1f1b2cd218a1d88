//! Locks that killed restic processes leave in repositories.
//!
//! restic removes its lock when it exits, even on SIGTERM, but a SIGKILL (an OOM kill, the
//! grace period running out, the agent itself killed with its runs) leaves it behind. An
//! exclusive operation (forget, prune, check) refuses to start beside any lock, and restic's own
//! `unlock` judges a lock of another host by its age only, so such a lock would block the
//! repository's retention and checks for 30 minutes.
//!
//! So every run's restic has a host name of its own ([`host_of`]) and is PID 2 in its PID
//! namespace. Whenever a run's restic may have died holding a lock (it was killed, or the
//! agent stopped while the run was in flight), the run is recorded here, on the state disk,
//! with its repository. The next time the agent talks to that repository it runs
//! `restic unlock` under the dead run's host name with PID 2 unused (see
//! [`crate::sandbox::Spec::spare_pids`]): to restic that is a lock of this host whose process
//! is gone, which its own rule removes. Locks of live processes have other host names, so
//! they are never touched.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// The host name of run `run_id`'s restic processes: the node's host name (cut to 40
/// characters) and a stable hash of the run id, `<node>-<16 hex digits>`.
pub fn host_of(run_id: &str) -> String {
    let node = nix::unistd::gethostname()
        .map(|h| h.to_string_lossy().into_owned())
        .unwrap_or_default();
    let node: String = node
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.'))
        .take(40)
        .collect();
    let node = if node.is_empty() { "node".to_string() } else { node };
    format!("{node}-{:016x}", fnv1a(run_id.as_bytes()))
}

/// FNV-1a: stable across Rust versions, unlike `DefaultHasher`, so an upgraded agent computes
/// the same names as the one before it.
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// A run whose restic may have left a lock.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct DeadRun {
    pub run_id: String,
    pub repository_url: String,
    /// The host name its locks carry.
    pub hostname: String,
}

/// The dead runs not yet cleaned up, one file each under `<state>/dead-locks`.
pub struct DeadRuns {
    dir: PathBuf,
}

impl DeadRuns {
    pub fn new(state_dir: &Path) -> Self {
        Self {
            dir: state_dir.join("dead-locks"),
        }
    }

    fn file(&self, hostname: &str) -> PathBuf {
        self.dir.join(format!("{hostname}.json"))
    }

    /// Records `run`; written aside and renamed, so a crash never leaves half a record.
    pub fn record(&self, run: &DeadRun) {
        let path = self.file(&run.hostname);
        let partial = path.with_extension("partial");
        let written = std::fs::create_dir_all(&self.dir)
            .and_then(|()| std::fs::write(&partial, serde_json::to_vec(run).unwrap_or_default()))
            .and_then(|()| std::fs::rename(&partial, &path));
        match written {
            Ok(()) => {
                tracing::info!(run_id = %run.run_id, host = %run.hostname, "restic of this run was killed; its locks will be removed at the next call to its repository")
            }
            Err(e) => {
                tracing::warn!(run_id = %run.run_id, error = %e, "cannot record a killed run; its locks will only expire after 30 minutes")
            }
        }
    }

    /// The dead runs of the repository at `url`.
    pub fn of_repository(&self, url: &str) -> Vec<DeadRun> {
        let Ok(entries) = std::fs::read_dir(&self.dir) else {
            return Vec::new();
        };
        let mut runs: Vec<DeadRun> = entries
            .flatten()
            .filter(|e| e.path().extension().is_some_and(|x| x == "json"))
            .filter_map(|e| std::fs::read(e.path()).ok())
            .filter_map(|bytes| serde_json::from_slice::<DeadRun>(&bytes).ok())
            .filter(|r| r.repository_url == url && crate::sandbox::valid_hostname(&r.hostname))
            .collect();
        runs.sort_by(|a, b| a.hostname.cmp(&b.hostname));
        runs
    }

    /// Forgets a dead run whose locks are gone.
    pub fn cleared(&self, hostname: &str) {
        let _ = std::fs::remove_file(self.file(hostname));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_run_has_one_stable_plain_host_name_of_its_own() {
        let a = host_of("backup-1700000000-a1");
        assert_eq!(a, host_of("backup-1700000000-a1"), "stable");
        assert_ne!(a, host_of("backup-1700000000-a2"));
        assert!(crate::sandbox::valid_hostname(&a), "{a}");
        assert!(a.len() <= 57, "{a}");
        // The hash is FNV-1a, fixed for good: records written by an older agent stay valid.
        assert_eq!(fnv1a(b"a"), 0xaf63_dc4c_8601_ec8c);
    }

    #[test]
    fn dead_runs_are_kept_per_repository_until_cleared() {
        let dir = std::env::temp_dir().join(format!("dead-runs-{}", std::process::id()));
        let store = DeadRuns::new(&dir);
        let run = |id: &str, url: &str| DeadRun {
            run_id: id.into(),
            repository_url: url.into(),
            hostname: host_of(id),
        };
        store.record(&run("r1", "s3:http://s3/a"));
        store.record(&run("r2", "s3:http://s3/b"));
        store.record(&run("r3", "s3:http://s3/a"));
        let mut of_a: Vec<_> = store
            .of_repository("s3:http://s3/a")
            .into_iter()
            .map(|r| r.run_id)
            .collect();
        of_a.sort();
        assert_eq!(of_a, ["r1", "r3"]);
        store.cleared(&host_of("r1"));
        let of_a: Vec<_> = store
            .of_repository("s3:http://s3/a")
            .into_iter()
            .map(|r| r.run_id)
            .collect();
        assert_eq!(of_a, ["r3"]);
        assert_eq!(store.of_repository("s3:http://s3/c"), Vec::new());
        let _ = std::fs::remove_dir_all(dir);
    }
}
