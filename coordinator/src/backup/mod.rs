//! The ResticBackup controller: decides when a run is due (schedule, manual trigger,
//! concurrency policy, missed-run deadline), refuses what the repository does not allow,
//! records the run in status *before* it starts, and hands it to a runner task. The runner
//! (see `runner`) owns the run until its result is in status; a restarted coordinator finds
//! `status.activeRun` and re-attaches.

pub mod lookup;
pub mod progress;
pub mod request;
pub mod runner;
pub mod transition;

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use kube::runtime::controller::Action;
use kube::runtime::events::EventType;
use kube::{Api, Resource, ResourceExt};
use restic_operator_api::backup::{ResticBackup, ResticBackupStatus};
use restic_operator_api::common::{
    ActiveRun, ConcurrencyPolicy, Condition, RunTrigger, condition_types as ct, event_reasons as er,
    find_condition, reasons, set_condition,
};
use restic_operator_api::repository::ResticRepository;

use crate::context::Context;
use crate::error::{Error, Result, backoff};
use crate::holder::fnv;
use crate::repository::{from_time, to_time};
use crate::resolve::{self, Access, ResolveError};
use crate::schedule::{Due, Schedule, due};

pub const CONTROLLER: &str = "resticbackup";

/// A run to start.
#[derive(Clone, Debug, PartialEq)]
pub struct NewRun {
    pub run_id: String,
    pub trigger: RunTrigger,
    pub scheduled: DateTime<Utc>,
    pub manual: Option<String>,
}

/// The plan, the run it starts, and a run refused for its namespace (with why).
type Decision = (Plan, Option<NewRun>, Option<(NewRun, &'static str, String)>);

/// What reconcile decided (pure).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Plan {
    pub start: Option<NewRun>,
    /// A scheduled time handled without a run, and why (for an event).
    pub skipped: Option<(DateTime<Utc>, String)>,
    /// New `status.lastScheduleTime`.
    pub last_schedule: Option<DateTime<Utc>>,
    pub next_backup: Option<DateTime<Utc>>,
    /// Cancel the run in flight (`Replace`).
    pub cancel_active: bool,
    pub requeue: Option<Duration>,
}

/// The run id of a scheduled run: the object's UID and the scheduled time, so the same tick
/// always has the same id.
pub fn scheduled_run_id(uid: &str, scheduled: DateTime<Utc>) -> String {
    format!("rb-{uid}-{}", scheduled.timestamp())
}

/// The run id of a manual run: the trigger value and the generation that set it (setting
/// `a`, `b`, then `a` again is three runs).
pub fn manual_run_id(uid: &str, trigger: &str, generation: i64) -> String {
    format!("rb-{uid}-m{:08x}-g{generation}", fnv(trigger))
}

/// Decides what to do at `now` (pure).
pub fn plan(backup: &ResticBackup, schedule: &Schedule, now: DateTime<Utc>, deadline: Duration) -> Plan {
    let status = backup.status.clone().unwrap_or_default();
    let uid = backup.uid().unwrap_or_default();
    let in_flight = status.active_run.is_some();
    let policy = backup
        .spec
        .job_config
        .as_ref()
        .map(|j| j.concurrency_policy)
        .unwrap_or_default();
    let base = status
        .last_schedule_time
        .as_ref()
        .map(from_time)
        .or_else(|| backup.metadata.creation_timestamp.as_ref().map(from_time))
        .unwrap_or(now);
    let deadline = chrono::Duration::from_std(deadline).unwrap_or(chrono::Duration::hours(1));
    let mut plan = Plan::default();

    let due_now = if backup.spec.suspend {
        Due::Wait(None)
    } else {
        due(schedule, base, now, deadline)
    };
    match due_now.clone() {
        Due::Wait(_) => {}
        Due::TooLate { time } => {
            plan.last_schedule = Some(time);
            plan.skipped = Some((
                time,
                format!(
                    "missed the run scheduled at {} by more than the starting deadline; waiting for the next one",
                    time.to_rfc3339()
                ),
            ));
        }
        Due::Run { time, missed } => {
            if !in_flight {
                if backup.pending_manual_trigger().is_none() {
                    plan.start = Some(NewRun {
                        run_id: scheduled_run_id(&uid, time),
                        trigger: RunTrigger::Schedule,
                        scheduled: time,
                        manual: None,
                    });
                    plan.last_schedule = Some(time);
                    if missed > 0 {
                        plan.skipped = Some((
                            time,
                            format!("{missed} earlier scheduled run(s) were missed; running once now"),
                        ));
                    }
                }
            } else {
                match policy {
                    ConcurrencyPolicy::Forbid => {
                        plan.last_schedule = Some(time);
                        plan.skipped = Some((
                            time,
                            format!(
                                "skipped the run scheduled at {}: the previous run is still in flight (concurrencyPolicy Forbid)",
                                time.to_rfc3339()
                            ),
                        ));
                    }
                    // Allow: the tick waits for the run in flight and then runs (within the
                    // deadline). Replace: the run in flight is cancelled first.
                    ConcurrencyPolicy::Allow => plan.requeue = Some(Duration::from_secs(5)),
                    ConcurrencyPolicy::Replace => {
                        plan.cancel_active = true;
                        plan.requeue = Some(Duration::from_secs(2));
                    }
                }
            }
        }
    }
    if !in_flight
        && plan.start.is_none()
        && let Some(trigger) = backup.pending_manual_trigger()
    {
        // A tick due right now is served by this run.
        if let Due::Run { time, .. } = due_now {
            plan.last_schedule = Some(time);
        }
        plan.start = Some(NewRun {
            run_id: manual_run_id(&uid, trigger, backup.metadata.generation.unwrap_or(0)),
            trigger: RunTrigger::Manual,
            scheduled: now,
            manual: Some(trigger.to_owned()),
        });
    }
    // A run that already finished (its id is the last run's) is never started again.
    let last_run = status.last_backup.as_ref().and_then(|l| l.run_id.as_deref());
    if plan
        .start
        .as_ref()
        .is_some_and(|r| Some(r.run_id.as_str()) == last_run)
    {
        plan.start = None;
    }
    if !backup.spec.suspend {
        let after = plan.last_schedule.map_or(now, |l| l.max(now));
        plan.next_backup = schedule.next_after(after);
    }
    plan
}

/// The event of a refusal: what the namespace may not do with the repository (as opposed to
/// a repository that is not ready yet, which only delays runs).
fn refusal_event(reason: &str) -> Option<&'static str> {
    match reason {
        reasons::NAMESPACE_NOT_ALLOWED => Some(er::NAMESPACE_NOT_ALLOWED),
        _ => None,
    }
}

/// Why a repository the backup may use cannot take a run yet (pure): its `Ready` condition.
pub fn not_ready(access: &Access) -> Option<(&'static str, String)> {
    let repo = access.repository();
    let key = crate::status::key_of(repo);
    match repo
        .status
        .as_ref()
        .and_then(|s| find_condition(&s.conditions, ct::READY))
    {
        Some(c) if c.is_true() => None,
        Some(c) => Some((
            reasons::REPOSITORY_NOT_READY,
            format!(
                "ResticRepository {key} is not ready ({}): {}",
                c.reason.clone().unwrap_or_default(),
                c.message.clone().unwrap_or_default()
            ),
        )),
        None => Some((
            reasons::REPOSITORY_NOT_READY,
            format!("ResticRepository {key} has not been checked yet"),
        )),
    }
}

fn condition(
    status: &mut ResticBackupStatus,
    type_: &str,
    ok: bool,
    reason: &str,
    message: impl Into<String>,
    generation: Option<i64>,
) {
    set_condition(
        &mut status.conditions,
        Condition::new(type_, ok, reason, message, generation, to_time(Utc::now())),
    );
}

pub async fn reconcile(backup: Arc<ResticBackup>, ctx: Arc<Context>) -> Result<Action> {
    crate::context::observed(&ctx.metrics, CONTROLLER, reconcile_inner(&backup, &ctx)).await
}

async fn reconcile_inner(backup: &ResticBackup, ctx: &Arc<Context>) -> Result<Action> {
    let ns = backup.namespace().unwrap_or_default();
    let name = backup.name_any();
    let key = format!("backup/{ns}/{name}");
    let api: Api<ResticBackup> = Api::namespaced(ctx.client.clone(), &ns);
    let generation = backup.meta().generation;
    let now = Utc::now();

    // A run in flight without a runner (coordinator restart): re-attach first. The runner
    // reads the run from the live object, so a stale cache cannot start a finished run.
    if let Some(active) = backup.status.as_ref().and_then(|s| s.active_run.as_ref()) {
        runner::ensure_running(ctx, &ns, &name, &active.run_id);
    }

    // Validate (pure).
    let schedule = match Schedule::parse(&backup.spec.schedule, backup.spec.timezone.as_deref()) {
        Ok(s) => s,
        Err(e) => {
            ctx.status
                .update(&api, &name, |_, s| {
                    condition(s, ct::READY, false, reasons::INVALID_SPEC, e.clone(), generation);
                    s.next_backup = None;
                    s.observed_generation = generation;
                })
                .await?;
            return Ok(Action::await_change());
        }
    };

    // Dereference the repository and check it may be used from here. This only decides
    // whether to record a run; the runner resolves again from the live object, and what it
    // resolves is what it checks and sends.
    let repo_problem = match resolve::access(&ctx.client, backup).await {
        Ok(access) => not_ready(&access),
        Err(ResolveError::Api { source, .. }) => return Err(source.into()),
        Err(e) => Some((e.reason(), e.to_string())),
    };

    let blocked = repo_problem.is_some();
    // Decide on the object as read under the status lock, not on the (possibly older)
    // cached copy this reconcile started from: a run is recorded at most once.
    let deadline = ctx.config.starting_deadline;
    let mut decided: Option<Decision> = None;
    let updated = ctx
        .status
        .update(&api, &name, |fresh, s| {
            let mut plan = plan(fresh, &schedule, now, deadline);
            let refuse_event = match (&repo_problem, &plan.start) {
                (Some((reason, message)), Some(run)) if refusal_event(reason).is_some() => {
                    Some((run.clone(), *reason, message.clone()))
                }
                _ => None,
            };
            let start = if blocked { None } else { plan.start.clone() };
            if blocked && refuse_event.is_none() {
                // A tick is not consumed while the repository is not usable; it runs when the
                // repository recovers within the starting deadline.
                plan.last_schedule = None;
            }
            s.observed_generation = generation;
            s.next_backup = plan.next_backup.map(to_time);
            if let Some(t) = plan.last_schedule {
                s.last_schedule_time = Some(to_time(t));
            }
            match &repo_problem {
                Some((reason, message)) => {
                    condition(
                        s,
                        ct::REPOSITORY_READY,
                        false,
                        reason,
                        message.clone(),
                        generation,
                    );
                    // A refused manual trigger is recorded as handled: it will not run later
                    // by surprise when the repository's allow-list changes.
                    if let Some((run, _, _)) = &refuse_event
                        && let Some(m) = &run.manual
                    {
                        s.last_manual_trigger = Some(m.clone());
                    }
                }
                None => condition(
                    s,
                    ct::REPOSITORY_READY,
                    true,
                    reasons::REPOSITORY_ACCESSIBLE,
                    "Repository is accessible",
                    generation,
                ),
            }
            if let Some(run) = &start {
                s.active_run = Some(ActiveRun {
                    run_id: run.run_id.clone(),
                    trigger: Some(run.trigger),
                    scheduled_time: Some(to_time(run.scheduled)),
                    start_time: Some(to_time(Utc::now())),
                    node_name: None,
                    agent_pod: None,
                    attempt: Some(1),
                });
                if let Some(m) = &run.manual {
                    s.last_manual_trigger = Some(m.clone());
                }
                s.progress = None;
                condition(
                    s,
                    ct::PROGRESSING,
                    true,
                    reasons::BACKUP_RUNNING,
                    format!("Run {} started", run.run_id),
                    generation,
                );
            }
            let ready_reason = find_condition(&s.conditions, ct::READY).and_then(|c| c.reason.clone());
            if fresh.spec.suspend {
                condition(
                    s,
                    ct::READY,
                    true,
                    reasons::SUSPENDED,
                    "Scheduling is suspended",
                    generation,
                );
            } else if ready_reason.is_none()
                || ready_reason.as_deref() == Some(reasons::SUSPENDED)
                || ready_reason.as_deref() == Some(reasons::INVALID_SPEC)
            {
                condition(
                    s,
                    ct::READY,
                    true,
                    reasons::SCHEDULED,
                    "Waiting for the next scheduled run",
                    generation,
                );
            }
            decided = Some((plan, start, refuse_event));
        })
        .await?;
    let (Some(updated), Some((plan, start, refuse_event))) = (updated, decided) else {
        return Ok(Action::await_change());
    };

    if let Some((_, why)) = &plan.skipped
        && (!blocked || refuse_event.is_some())
    {
        runner::publish(ctx, backup, EventType::Warning, er::BACKUP_SKIPPED, why.clone()).await;
    }
    if let Some((run, reason, message)) = refuse_event {
        runner::publish(
            ctx,
            backup,
            EventType::Warning,
            refusal_event(reason).unwrap_or(er::NAMESPACE_NOT_ALLOWED),
            format!("Run {} refused: {message}", run.run_id),
        )
        .await;
    }
    if plan.cancel_active
        && let Some(active) = updated.status.as_ref().and_then(|s| s.active_run.clone())
    {
        runner::cancel(ctx, &active).await;
    }
    let start_recorded = start.is_some();
    if let Some(run) = start {
        if let Some(m) = &run.manual {
            runner::publish(
                ctx,
                backup,
                EventType::Normal,
                er::MANUAL_TRIGGER,
                format!("Manual trigger {m:?} accepted"),
            )
            .await;
        }
        runner::ensure_running(ctx, &ns, &name, &run.run_id);
    }

    if blocked {
        return Ok(Action::requeue(
            backoff(ctx.failed(&key)).max(Duration::from_secs(10)),
        ));
    }
    ctx.succeeded(&key);
    let until_next = plan
        .next_backup
        .map(|n| (n - Utc::now()).to_std().unwrap_or_default() + Duration::from_millis(50));
    // While a run is in flight, look again every minute: should its runner have given up
    // (the API server unreachable for minutes), the next reconcile re-attaches.
    let in_flight = updated.status.as_ref().is_some_and(|s| s.active_run.is_some()) || start_recorded;
    let watch_run = in_flight.then_some(Duration::from_secs(60));
    let requeue = [
        until_next,
        plan.requeue,
        watch_run,
        Some(Duration::from_secs(3600)),
    ]
    .into_iter()
    .flatten()
    .min()
    .unwrap_or(Duration::from_secs(3600));
    Ok(Action::requeue(requeue.max(Duration::from_millis(100))))
}

pub fn error_policy(backup: Arc<ResticBackup>, error: &Error, ctx: Arc<Context>) -> Action {
    let key = format!("backup/{}", crate::status::key_of(backup.as_ref()));
    tracing::warn!(backup = %key, %error, "reconcile failed");
    match error.class() {
        crate::error::Class::Permanent => Action::await_change(),
        crate::error::Class::Temporary => Action::requeue(backoff(ctx.failed(&key))),
    }
}

/// The ResticBackups that reference `repo` (for the repository watch).
pub fn referencing(
    backups: &[Arc<ResticBackup>],
    repo: &ResticRepository,
) -> Vec<kube::runtime::reflector::ObjectRef<ResticBackup>> {
    let repo_ns = repo.namespace().unwrap_or_default();
    backups
        .iter()
        .filter(|b| {
            let ns = b.namespace().unwrap_or_default();
            b.spec.repository_ref.name == repo.name_any()
                && b.spec.repository_ref.namespace_or(&ns) == repo_ns
        })
        .map(|b| kube::runtime::reflector::ObjectRef::from_obj(b.as_ref()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(s: &str) -> DateTime<Utc> {
        s.parse().unwrap()
    }

    struct B(String);

    fn backup() -> B {
        B(
            "apiVersion: backup.resticbackup.io/v1alpha1\nkind: ResticBackup\n\
           metadata: {name: b, namespace: n, uid: u1, creationTimestamp: '2024-01-01T00:00:00Z'}\n\
           spec: {repositoryRef: {name: r}, schedule: '0 2 * * *', source: {pvc: {claimName: data}}"
                .into(),
        )
    }

    impl B {
        fn spec(mut self, extra: &str) -> Self {
            self.0.push_str(", ");
            self.0.push_str(extra);
            self
        }
        fn status(self, status: &str) -> ResticBackup {
            let mut y = self.0;
            y.push_str("}\n");
            if !status.is_empty() {
                y.push_str(&format!("status: {{{status}}}\n"));
            }
            serde_yaml::from_str(&y).unwrap()
        }
        fn build(self) -> ResticBackup {
            self.status("")
        }
    }

    fn schedule() -> Schedule {
        Schedule::parse("0 2 * * *", None).unwrap()
    }

    const HOUR: Duration = Duration::from_secs(3600);

    #[test]
    fn a_due_tick_starts_a_run_with_an_id_from_uid_and_time() {
        let b = backup().status("lastScheduleTime: '2024-01-14T02:00:00Z'");
        let p = plan(&b, &schedule(), t("2024-01-15T02:00:01Z"), HOUR);
        let run = p.start.unwrap();
        assert_eq!(
            run.run_id,
            format!("rb-u1-{}", t("2024-01-15T02:00:00Z").timestamp())
        );
        assert_eq!(run.trigger, RunTrigger::Schedule);
        assert_eq!(p.last_schedule, Some(t("2024-01-15T02:00:00Z")));
        assert_eq!(p.next_backup, Some(t("2024-01-16T02:00:00Z")));
    }

    #[test]
    fn forbid_skips_a_tick_while_a_run_is_in_flight() {
        let b = backup().status("lastScheduleTime: '2024-01-14T02:00:00Z', activeRun: {runID: x}");
        let p = plan(&b, &schedule(), t("2024-01-15T02:00:01Z"), HOUR);
        assert!(p.start.is_none());
        assert_eq!(p.last_schedule, Some(t("2024-01-15T02:00:00Z")));
        assert!(p.skipped.unwrap().1.contains("Forbid"));
    }

    #[test]
    fn allow_waits_for_the_run_in_flight_and_replace_cancels_it() {
        let b = backup()
            .spec("jobConfig: {concurrencyPolicy: Allow}")
            .status("lastScheduleTime: '2024-01-14T02:00:00Z', activeRun: {runID: x}");
        let p = plan(&b, &schedule(), t("2024-01-15T02:00:01Z"), HOUR);
        assert!(p.start.is_none() && p.last_schedule.is_none() && !p.cancel_active);
        let b = backup()
            .spec("jobConfig: {concurrencyPolicy: Replace}")
            .status("lastScheduleTime: '2024-01-14T02:00:00Z', activeRun: {runID: x}");
        assert!(plan(&b, &schedule(), t("2024-01-15T02:00:01Z"), HOUR).cancel_active);
    }

    #[test]
    fn manual_trigger_runs_once_with_a_stable_id() {
        let b = backup()
            .spec("manualTrigger: 'now-1'")
            .status("lastScheduleTime: '2024-01-15T02:00:00Z'");
        let p = plan(&b, &schedule(), t("2024-01-15T10:00:00Z"), HOUR);
        let run = p.start.unwrap();
        assert_eq!(run.trigger, RunTrigger::Manual);
        assert_eq!(run.manual.as_deref(), Some("now-1"));
        assert_eq!(run.run_id, manual_run_id("u1", "now-1", 0));
        let handled = backup()
            .spec("manualTrigger: 'now-1'")
            .status("lastScheduleTime: '2024-01-15T02:00:00Z', lastManualTrigger: 'now-1'");
        assert!(
            plan(&handled, &schedule(), t("2024-01-15T10:00:00Z"), HOUR)
                .start
                .is_none()
        );
    }

    #[test]
    fn suspend_stops_the_schedule_but_not_a_manual_trigger() {
        let b = backup()
            .spec("suspend: true")
            .status("lastScheduleTime: '2024-01-14T02:00:00Z'");
        let p = plan(&b, &schedule(), t("2024-01-15T02:00:01Z"), HOUR);
        assert!(p.start.is_none() && p.next_backup.is_none());
        let b = backup().spec("suspend: true, manualTrigger: go").build();
        assert_eq!(
            plan(&b, &schedule(), t("2024-01-15T02:00:01Z"), HOUR)
                .start
                .unwrap()
                .trigger,
            RunTrigger::Manual
        );
    }

    #[test]
    fn after_an_outage_one_run_starts_within_the_deadline_and_none_after_it() {
        let b = backup().status("lastScheduleTime: '2024-01-10T02:00:00Z'");
        let p = plan(&b, &schedule(), t("2024-01-15T02:30:00Z"), HOUR);
        assert_eq!(p.start.unwrap().scheduled, t("2024-01-15T02:00:00Z"));
        assert!(p.skipped.unwrap().1.contains("4 earlier"));
        let p = plan(&b, &schedule(), t("2024-01-15T04:00:00Z"), HOUR);
        assert!(p.start.is_none());
        assert_eq!(p.last_schedule, Some(t("2024-01-15T02:00:00Z")));
    }

    #[test]
    fn only_a_ready_repository_takes_runs() {
        let repo = |status: &str| -> ResticRepository {
            serde_yaml::from_str(&format!(
                "apiVersion: backup.resticbackup.io/v1alpha1\nkind: ResticRepository\n\
                 metadata: {{name: r, namespace: n}}\n\
                 spec: {{repositoryURL: 's3:host/bucket', credentialsSecretRef: {{name: c}}}}\n{status}"
            ))
            .unwrap()
        };
        let access = |r: &ResticRepository| resolve::check_namespace(r, "n", &Default::default()).unwrap();
        let ready =
            repo("status: {conditions: [{type: Ready, status: 'True', reason: RepositoryInitialized}]}");
        assert_eq!(not_ready(&access(&ready)), None);
        let locked = repo(
            "status: {conditions: [{type: Ready, status: 'False', reason: RepositoryLocked, message: held}]}",
        );
        let (reason, message) = not_ready(&access(&locked)).unwrap();
        assert_eq!(reason, reasons::REPOSITORY_NOT_READY);
        assert_eq!(
            message,
            "ResticRepository n/r is not ready (RepositoryLocked): held"
        );
        assert!(
            not_ready(&access(&repo("")))
                .unwrap()
                .1
                .contains("not been checked yet")
        );
    }

    #[test]
    fn a_new_backup_does_not_run_slots_before_its_creation() {
        let b = backup().build();
        let p = plan(&b, &schedule(), t("2024-01-01T01:00:00Z"), HOUR);
        assert!(p.start.is_none());
        assert_eq!(p.next_backup, Some(t("2024-01-01T02:00:00Z")));
    }
}
