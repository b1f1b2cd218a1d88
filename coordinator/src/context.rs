//! What every reconciler and run shares.

use std::sync::Arc;

use kube::runtime::controller::Action;
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::{Client, Resource};

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
    pub policy_events: Recorder,
    pub restore_events: Recorder,
    /// Consecutive failures per object, for backoff.
    pub failures: std::sync::Mutex<std::collections::HashMap<String, u32>>,
    /// Runs whose after-hooks ran but whose final status is not written yet: when such a
    /// run is finished again (re-attached), its hooks do not run a second time.
    pub hooks_ran: std::sync::Mutex<std::collections::HashSet<String>>,
    /// Runs asked to stop (`concurrencyPolicy: Replace`) that no agent may be running yet: a
    /// run between attempts, or being placed, ends before its next attempt is sent.
    cancels: std::sync::Mutex<std::collections::HashSet<String>>,
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
            policy_events: Recorder::new(client.clone(), reporter("retention")),
            restore_events: Recorder::new(client.clone(), reporter("restore")),
            client,
            config,
            agents,
            metrics,
            locks: RepositoryLocks::default(),
            tasks: Arc::new(Tasks::default()),
            status: Arc::new(StatusWriter::default()),
            pki: std::sync::RwLock::new(pki),
            failures: Default::default(),
            hooks_ran: Default::default(),
            cancels: Default::default(),
        }
    }

    /// Sends a run to the agent at `address` and follows it (re-attaching for up to
    /// `--agent-lost-timeout`), counting it in `restic_operator_dispatch_total{kind}`.
    pub async fn dispatch<F, Fut>(
        &self,
        kind: &str,
        address: &str,
        run_id: &str,
        start: F,
        on_event: &mut dyn crate::run::Follower,
    ) -> crate::run::Ended
    where
        F: FnOnce(restic_operator_proto::v1::agent_client::AgentClient<tonic::transport::Channel>) -> Fut,
        Fut: std::future::Future<
                Output = Result<
                    tonic::Response<tonic::Streaming<restic_operator_proto::v1::RunEvent>>,
                    tonic::Status,
                >,
            >,
    {
        self.metrics.dispatch_total.with_label_values(&[kind]).inc();
        crate::run::drive(
            &self.agents,
            address,
            run_id,
            self.config.agent_lost_timeout,
            start,
            on_event,
        )
        .await
    }

    /// The time now: the one reading of the wall clock by reconcilers and runs. The decisions
    /// they make are pure functions that take it as an argument.
    pub fn now(&self) -> chrono::DateTime<chrono::Utc> {
        chrono::Utc::now()
    }

    /// Asks run `run_id` to end before its next attempt is sent.
    pub fn request_cancel(&self, run_id: &str) {
        self.cancels.lock().expect("cancels").insert(run_id.to_owned());
    }

    pub fn cancel_requested(&self, run_id: &str) -> bool {
        self.cancels.lock().expect("cancels").contains(run_id)
    }

    /// Forgets a cancel request once its run has ended.
    pub fn forget_cancel(&self, run_id: &str) {
        self.cancels.lock().expect("cancels").remove(run_id);
    }

    /// When a scheduled kind's object `key` is looked at again after a decision: backing off
    /// while its repository cannot take a run, else at its plan's next wake-up. `in_flight`:
    /// the object as read before the decision's write had a run in flight (or it recorded one).
    pub fn after_decision(
        &self,
        key: &str,
        blocked: bool,
        in_flight: bool,
        decision: &crate::plan::Decision,
    ) -> Action {
        if blocked {
            let wait = crate::error::backoff(self.failed(key)).max(std::time::Duration::from_secs(10));
            return Action::requeue(wait);
        }
        self.succeeded(key);
        let in_flight = in_flight || decision.start.is_some();
        Action::requeue(crate::plan::next_wake(&decision.plan, in_flight, self.now()))
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

    /// What a controller does after a failed reconcile of the object `key`: a permanent error
    /// waits for a change, a temporary one backs off.
    pub fn on_error(&self, key: &str, error: &crate::error::Error) -> Action {
        tracing::warn!(object = %key, %error, "reconcile failed");
        match error.class() {
            crate::error::Class::Permanent => Action::await_change(),
            crate::error::Class::Temporary => Action::requeue(crate::error::backoff(self.failed(key))),
        }
    }
}

/// Publishes an event about `object` with `recorder` (the note is cut to 1,000 bytes); a
/// failure to publish is logged, never fatal.
pub async fn publish<K: Resource<DynamicType = ()>>(
    recorder: &Recorder,
    object: &K,
    type_: EventType,
    reason: &str,
    note: String,
) {
    let event = Event {
        type_,
        reason: reason.into(),
        note: Some(crate::run::truncate(&note, 1000)),
        action: reason.into(),
        secondary: None,
    };
    if let Err(e) = recorder.publish(&event, &object.object_ref(&())).await {
        tracing::warn!(error = %e, "could not publish an event");
    }
}

/// The error policy of every controller: a permanent error waits for a change, a temporary one
/// backs off by the object's consecutive failures.
pub fn error_policy<K: Resource<DynamicType = ()>>(
    object: Arc<K>,
    error: &crate::error::Error,
    ctx: Arc<Context>,
) -> Action {
    ctx.on_error(&crate::status::backoff_key(object.as_ref()), error)
}

/// Runs one reconciliation and records its result and duration under `controller`.
pub async fn observed(
    metrics: &Metrics,
    controller: &str,
    reconcile: impl std::future::Future<Output = crate::error::Result<Action>>,
) -> crate::error::Result<Action> {
    let started = std::time::Instant::now();
    let result = reconcile.await;
    let label = match &result {
        Ok(_) => "success",
        Err(e) => e.metric_label(),
    };
    metrics.reconciled(controller, label, started.elapsed().as_secs_f64());
    result
}
