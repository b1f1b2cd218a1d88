//! Per-repository locks: backups share a repository, exclusive operations (forget, prune,
//! check) wait for them and run alone. restic's own locks would make the loser fail; this
//! makes it wait instead, so the coordinator never fights its own runs. tokio's RwLock is
//! fair, so a waiting exclusive operation is not starved by a stream of backups.
//!
//! The same locks keyed by a claim ([`claim_key`]) keep restores and backups of one claim
//! apart: backups of it share it, a restore into it holds it alone. A claim's lock is always
//! taken before a repository's.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokio::sync::{OwnedRwLockReadGuard, OwnedRwLockWriteGuard, RwLock};

#[derive(Default)]
pub struct RepositoryLocks {
    locks: Mutex<HashMap<String, Arc<RwLock<()>>>>,
}

impl RepositoryLocks {
    fn lock(&self, key: &str) -> Arc<RwLock<()>> {
        self.locks
            .lock()
            .expect("locks")
            .entry(key.to_owned())
            .or_default()
            .clone()
    }

    /// For a backup (or stats): shared with other backups.
    pub async fn shared(&self, key: &str) -> OwnedRwLockReadGuard<()> {
        self.lock(key).read_owned().await
    }

    /// Shared access only if nothing exclusive runs or waits.
    pub fn try_shared(&self, key: &str) -> Option<OwnedRwLockReadGuard<()>> {
        self.lock(key).try_read_owned().ok()
    }

    /// Exclusive access only if nothing else runs or waits.
    pub fn try_exclusive(&self, key: &str) -> Option<OwnedRwLockWriteGuard<()>> {
        self.lock(key).try_write_owned().ok()
    }

    /// For forget, prune and check: alone.
    pub async fn exclusive(&self, key: &str) -> OwnedRwLockWriteGuard<()> {
        self.lock(key).write_owned().await
    }
}

/// The lock key of claim `claim` of namespace `ns`.
pub fn claim_key(ns: &str, claim: &str) -> String {
    format!("claim:{ns}/{claim}")
}

/// Background tasks by key, so a reconcile never starts a second runner for the same run.
#[derive(Default)]
pub struct Tasks {
    running: Mutex<HashMap<String, tokio::task::AbortHandle>>,
}

impl Tasks {
    pub fn is_running(&self, key: &str) -> bool {
        self.running
            .lock()
            .expect("tasks")
            .get(key)
            .is_some_and(|h| !h.is_finished())
    }

    /// Stops the task under `key`, if one runs.
    pub fn abort(&self, key: &str) {
        if let Some(h) = self.running.lock().expect("tasks").remove(key) {
            h.abort();
        }
    }

    /// Spawns `fut` under `key` unless a task with that key is still running; returns whether
    /// it was spawned.
    pub fn spawn_once<F>(self: &Arc<Self>, key: &str, fut: F) -> bool
    where
        F: std::future::Future<Output = ()> + Send + 'static,
    {
        let mut running = self.running.lock().expect("tasks");
        if running.get(key).is_some_and(|h| !h.is_finished()) {
            return false;
        }
        let me = Arc::clone(self);
        let k = key.to_owned();
        let handle = tokio::spawn(async move {
            fut.await;
            let mut running = me.running.lock().expect("tasks");
            if running
                .get(&k)
                .is_some_and(|h| h.is_finished() || h.id() == tokio::task::id())
            {
                running.remove(&k);
            }
        });
        running.insert(key.to_owned(), handle.abort_handle());
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn exclusive_waits_for_backups_and_blocks_new_ones() {
        let locks = RepositoryLocks::default();
        let backup = locks.shared("ns/repo").await;
        assert!(locks.try_shared("ns/repo").is_some(), "backups share");
        let locks = Arc::new(locks);
        let l = Arc::clone(&locks);
        let forget = tokio::spawn(async move {
            let _g = l.exclusive("ns/repo").await;
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!forget.is_finished(), "forget waits for the backup");
        assert!(
            locks.try_shared("ns/repo").is_none(),
            "a waiting forget is not starved"
        );
        assert!(
            locks.try_shared("ns/other").is_some(),
            "other repositories are independent"
        );
        drop(backup);
        forget.await.unwrap();
    }

    #[tokio::test]
    async fn a_key_runs_one_task_at_a_time() {
        let tasks = Arc::new(Tasks::default());
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        assert!(tasks.spawn_once("run-1", async move {
            let _ = rx.await;
        }));
        assert!(!tasks.spawn_once("run-1", async {}));
        assert!(tasks.is_running("run-1"));
        tx.send(()).unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!tasks.is_running("run-1"));
        assert!(tasks.spawn_once("run-1", async {}));
    }
}
