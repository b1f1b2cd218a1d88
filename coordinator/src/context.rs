//! What every reconciler and run shares.

use std::sync::Arc;

use kube::Client;
use kube::runtime::events::{Recorder, Reporter};

use crate::agents::Agents;
use crate::config::Config;
use crate::locks::{RepositoryLocks, Tasks};
use crate::metrics::Metrics;
use crate::pki::Pki;
use crate::status::StatusWriter;

pub struct Context {
    pub client: Client,
    pub config: Config,
    pub agents: Agents,
    pub metrics: Arc<Metrics>,
    pub locks: RepositoryLocks,
    pub tasks: Arc<Tasks>,
    pub status: Arc<StatusWriter>,
    /// The CA and this process's client certificate.
    pub pki: std::sync::RwLock<Pki>,
    /// Event recorders, one per controller.
    pub backup_events: Recorder,
    pub repository_events: Recorder,
    /// Consecutive failures per object, for backoff.
    pub failures: std::sync::Mutex<std::collections::HashMap<String, u32>>,
}

impl Context {
    pub fn new(client: Client, config: Config, agents: Agents, metrics: Arc<Metrics>, pki: Pki) -> Self {
        let reporter = |controller: &str| Reporter {
            controller: format!("restic-operator-{controller}"),
            instance: config.identity.clone(),
        };
        Self {
            backup_events: Recorder::new(client.clone(), reporter("backup")),
            repository_events: Recorder::new(client.clone(), reporter("repository")),
            client,
            config,
            agents,
            metrics,
            locks: RepositoryLocks::default(),
            tasks: Arc::new(Tasks::default()),
            status: Arc::new(StatusWriter::default()),
            pki: std::sync::RwLock::new(pki),
            failures: Default::default(),
        }
    }

    pub fn pki(&self) -> Pki {
        self.pki.read().expect("pki lock").clone()
    }

    /// Counts one more failure of `key` and returns how many there were before.
    pub fn failed(&self, key: &str) -> u32 {
        let mut f = self.failures.lock().expect("failures");
        let n = f.entry(key.to_owned()).or_insert(0);
        *n += 1;
        *n - 1
    }

    pub fn succeeded(&self, key: &str) {
        self.failures.lock().expect("failures").remove(key);
    }
}
