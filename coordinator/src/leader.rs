//! Leader election on a `coordination.k8s.io/v1` Lease, so that of several coordinator
//! replicas exactly one dispatches runs. Optimistic concurrency (the Lease's
//! resourceVersion) decides races; a leader that cannot renew in time exits the process
//! rather than risk two leaders.

use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use k8s_openapi::jiff::Timestamp;
use kube::api::{ObjectMeta, PostParams};
use kube::{Api, Client};

pub struct Elector {
    api: Api<Lease>,
    name: String,
    identity: String,
    duration: Duration,
    /// The other holder's lease record as last seen, and when (local clock): expiry is
    /// measured from when the record last changed here, as client-go does, so clock skew
    /// between nodes cannot make two leaders.
    observed: std::sync::Mutex<Option<(String, std::time::Instant)>>,
}

/// What one attempt found.
#[derive(Debug, PartialEq, Eq)]
pub enum Attempt {
    Leading,
    /// Someone else holds an unexpired lease.
    Following(String),
}

impl Elector {
    pub fn new(client: Client, namespace: &str, name: &str, identity: &str, duration: Duration) -> Self {
        Self {
            api: Api::namespaced(client, namespace),
            name: name.into(),
            identity: identity.into(),
            duration,
            observed: std::sync::Mutex::new(None),
        }
    }

    fn spec(&self, now: Timestamp, acquire: Option<MicroTime>, transitions: i32) -> LeaseSpec {
        LeaseSpec {
            holder_identity: Some(self.identity.clone()),
            lease_duration_seconds: Some(self.duration.as_secs().max(1) as i32),
            acquire_time: Some(acquire.unwrap_or(MicroTime(now))),
            renew_time: Some(MicroTime(now)),
            lease_transitions: Some(transitions),
            ..Default::default()
        }
    }

    /// Takes or renews the lease if it is free, expired or ours.
    pub async fn try_acquire(&self) -> Result<Attempt, kube::Error> {
        let now = Timestamp::now();
        let Some(mut lease) = self.api.get_opt(&self.name).await? else {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(self.name.clone()),
                    ..Default::default()
                },
                spec: Some(self.spec(now, None, 0)),
            };
            return match self.api.create(&PostParams::default(), &lease).await {
                Ok(_) => Ok(Attempt::Leading),
                Err(kube::Error::Api(e)) if e.code == 409 => Ok(Attempt::Following("(racing)".into())),
                Err(e) => Err(e),
            };
        };
        let spec = lease.spec.clone().unwrap_or_default();
        let holder = spec.holder_identity.clone().unwrap_or_default();
        let ours = holder == self.identity;
        let record = format!(
            "{holder}@{}",
            lease.metadata.resource_version.clone().unwrap_or_default()
        );
        let expired = {
            let mut observed = self.observed.lock().expect("observed lease");
            match observed.as_ref() {
                Some((seen, at)) if *seen == record => {
                    let secs = u64::try_from(spec.lease_duration_seconds.unwrap_or(15)).unwrap_or(15);
                    at.elapsed() > Duration::from_secs(secs)
                }
                _ => {
                    *observed = Some((record, std::time::Instant::now()));
                    holder.is_empty()
                }
            }
        };
        if !ours && !holder.is_empty() && !expired {
            return Ok(Attempt::Following(holder));
        }
        let transitions = spec.lease_transitions.unwrap_or(0) + i32::from(!ours);
        let acquire = if ours { spec.acquire_time } else { None };
        lease.spec = Some(self.spec(now, acquire, transitions));
        match self.api.replace(&self.name, &PostParams::default(), &lease).await {
            Ok(_) => Ok(Attempt::Leading),
            // Another replica wrote first; it wins this round.
            Err(kube::Error::Api(e)) if e.code == 409 => Ok(Attempt::Following("(racing)".into())),
            Err(e) => Err(e),
        }
    }

    /// Waits until this replica leads.
    pub async fn acquire(&self, retry: Duration) {
        let mut last_holder = String::new();
        loop {
            match self.try_acquire().await {
                Ok(Attempt::Leading) => {
                    tracing::info!(identity = %self.identity, lease = %self.name, "became the leader");
                    return;
                }
                Ok(Attempt::Following(holder)) => {
                    if holder != last_holder {
                        tracing::info!(leader = %holder, "waiting for leadership; another replica leads");
                        last_holder = holder;
                    }
                }
                Err(e) => tracing::warn!(error = %e, "leader election"),
            }
            tokio::time::sleep(retry).await;
        }
    }

    /// Renews the lease every `interval`; returns when the lease is lost or could not be
    /// renewed in time. Each attempt is timed from before its request, and a hanging request
    /// counts as a failure, so this replica stops before another may take over.
    pub async fn hold(&self, interval: Duration) {
        let mut last_renewed = tokio::time::Instant::now();
        loop {
            tokio::time::sleep(interval).await;
            let attempt_started = tokio::time::Instant::now();
            let budget = self
                .duration
                .saturating_sub(last_renewed.elapsed())
                .saturating_sub(interval);
            match tokio::time::timeout(budget.max(Duration::from_millis(100)), self.try_acquire()).await {
                Ok(Ok(Attempt::Leading)) => last_renewed = attempt_started,
                Ok(Ok(Attempt::Following(holder))) => {
                    tracing::error!(leader = %holder, "lost the leader lease");
                    return;
                }
                Ok(Err(e)) => tracing::warn!(error = %e, "could not renew the leader lease"),
                Err(_) => tracing::warn!("renewing the leader lease timed out"),
            }
            if last_renewed.elapsed() + interval >= self.duration {
                tracing::error!("the leader lease is about to expire unrenewed");
                return;
            }
        }
    }
}
