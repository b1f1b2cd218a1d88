//! The ResticBackup controller: decides when a run is due (schedule, manual trigger,
//! concurrency policy, missed-run deadline), refuses what the repository does not allow,
//! records the run in status *before* it starts, and hands it to a runner task. The runner
//! (see `runner`) owns the run until its result is in status; a restarted coordinator finds
//! `status.activeRun` and re-attaches.

mod after;
mod attempt;
mod cancel;
mod finish;
pub mod lookup;
mod reattach;
pub mod request;
pub mod runner;
pub mod transition;

pub use after::RetentionError;

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use kube::runtime::controller::Action;
use kube::{Api, Resource, ResourceExt};
use restic_operator_api::backup::{ResticBackup, ResticBackupStatus};

use crate::context::Context;
use crate::error::Result;
use crate::plan::Scheduled;
pub use crate::plan::{Blocked, Decision, NewRun, Plan, events, gate, next_wake, not_ready};
use crate::repository::from_time;
use crate::resolve;
use crate::schedule::Schedule;

pub const CONTROLLER: &str = "resticbackup";

/// Decides what to do at `now` (pure): the tick due, a pending manual trigger, and when the
/// next tick is.
pub fn plan(backup: &ResticBackup, schedule: &Schedule, now: DateTime<Utc>, deadline: Duration) -> Plan {
    let status = backup.status.clone().unwrap_or_default();
    let uid = backup.uid().unwrap_or_default();
    let scheduled = Scheduled {
        prefix: RUN_PREFIX,
        uid: &uid,
        suspend: backup.spec.suspend,
        in_flight: status.active_run.is_some(),
        policy: backup
            .spec
            .job_config
            .as_ref()
            .map(|j| j.concurrency_policy)
            .unwrap_or_default(),
        last_schedule: status.last_schedule_time.as_ref().map(from_time),
        created: backup.metadata.creation_timestamp.as_ref().map(from_time),
        manual: backup.pending_manual_trigger(),
        generation: backup.metadata.generation.unwrap_or(0),
        last_run: status.last_backup.as_ref().and_then(|l| l.run_id.as_deref()),
    };
    crate::plan::plan(&scheduled, schedule, now, deadline)
}

/// The prefix of a backup's run ids.
pub const RUN_PREFIX: &str = "rb";

/// The run id of a scheduled run of a backup.
pub fn scheduled_run_id(uid: &str, scheduled: DateTime<Utc>) -> String {
    crate::plan::scheduled_run_id(RUN_PREFIX, uid, scheduled)
}

/// The run id of a manual run of a backup.
pub fn manual_run_id(uid: &str, trigger: &str, generation: i64) -> String {
    crate::plan::manual_run_id(RUN_PREFIX, uid, trigger, generation)
}

/// Writes what `decision` says into the status of `backup` (pure; see [`crate::plan::record`]).
pub fn record(
    status: &mut ResticBackupStatus,
    backup: &ResticBackup,
    decision: &Decision,
    blocked: Option<&Blocked>,
    generation: Option<i64>,
    now: DateTime<Utc>,
) {
    let suspend = backup.spec.suspend;
    crate::plan::record(status, suspend, decision, blocked, generation, now);
}

/// Decides at `now` what `backup` does, given whether its repository can take a run (pure;
/// see [`gate`]).
pub fn decide(
    backup: &ResticBackup,
    schedule: &Schedule,
    now: DateTime<Utc>,
    deadline: Duration,
    blocked: Option<&Blocked>,
) -> Decision {
    gate(plan(backup, schedule, now, deadline), blocked)
}

pub async fn reconcile(backup: Arc<ResticBackup>, ctx: Arc<Context>) -> Result<Action> {
    crate::context::observed(&ctx.metrics, CONTROLLER, reconcile_inner(&backup, &ctx)).await
}

/// Re-attach → validate → dereference → decide and record (under the status lock) → apply.
async fn reconcile_inner(backup: &ResticBackup, ctx: &Arc<Context>) -> Result<Action> {
    let ns = backup.namespace().unwrap_or_default();
    let name = backup.name_any();
    let api: Api<ResticBackup> = Api::namespaced(ctx.client.clone(), &ns);
    let now = ctx.now();

    // A run in flight without a runner (coordinator restart): re-attach first. The runner
    // reads the run from the live object, so a stale cache cannot start a finished run.
    if let Some(active) = backup.status.as_ref().and_then(|s| s.active_run.as_ref()) {
        runner::ensure_running(ctx, &ns, &name, &active.run_id);
    }
    let schedule = match Schedule::parse(&backup.spec.schedule, backup.spec.timezone.as_deref()) {
        Ok(s) => s,
        Err(e) => {
            let now = ctx.now();
            crate::status::write_invalid(&ctx.status, &api, backup, &e.to_string(), now).await?;
            return Ok(Action::await_change());
        }
    };
    let blocked = repository_blocked(ctx, backup).await?;

    // Decide on the object as read under the status lock, not on the (possibly older)
    // cached copy this reconcile started from: a run is recorded at most once.
    let (deadline, generation) = (ctx.config.starting_deadline, backup.meta().generation);
    let mut decided = None;
    let updated = ctx
        .status
        .update(&api, &name, |fresh, s| {
            let decision = decide(fresh, &schedule, now, deadline, blocked.as_ref());
            record(s, fresh, &decision, blocked.as_ref(), generation, now);
            decided = Some(decision);
        })
        .await?;
    let (Some(updated), Some(decision)) = (updated, decided) else {
        return Ok(Action::await_change());
    };
    apply(ctx, backup, &updated, &decision, blocked.as_ref()).await;
    let idle = decision.start.is_none() && updated.status.as_ref().is_none_or(|s| s.active_run.is_none());
    if idle && backup.spec.source.custom_source.is_some() {
        let uid = backup.uid().unwrap_or_default();
        crate::dump::sweep(&ctx.client, &ns, &name, &uid).await;
    }

    let key = crate::status::backoff_key(backup);
    let in_flight = updated.status.as_ref().is_some_and(|s| s.active_run.is_some());
    Ok(ctx.after_decision(&key, blocked.is_some(), in_flight, &decision))
}

/// Dereferences the repository and checks it may take a run from here. This only decides
/// whether to record a run; the runner resolves again from the live object, and what it
/// resolves is what it checks and sends. Only an API failure is an error.
async fn repository_blocked(ctx: &Context, backup: &ResticBackup) -> Result<Option<Blocked>> {
    let ns = backup.namespace().unwrap_or_default();
    Ok(resolve::blocked(&ctx.client, &ns, &backup.spec.repository_ref).await?)
}

/// The I/O of a decision: its events, the cancel of a replaced run, the runner of a new one.
async fn apply(
    ctx: &Arc<Context>,
    backup: &ResticBackup,
    updated: &ResticBackup,
    decision: &Decision,
    blocked: Option<&Blocked>,
) {
    for (type_, reason, note) in events(decision, blocked) {
        runner::publish(ctx, backup, type_, reason, note).await;
    }
    if decision.plan.cancel_active
        && let Some(active) = updated.status.as_ref().and_then(|s| s.active_run.as_ref())
    {
        cancel::cancel(ctx, active).await;
    }
    if let Some(run) = &decision.start {
        let ns = backup.namespace().unwrap_or_default();
        runner::ensure_running(ctx, &ns, &backup.name_any(), &run.run_id);
    }
}

#[cfg(test)]
mod tests {
    use kube::runtime::events::EventType;
    use restic_operator_api::common::{
        RunTrigger, condition_types as ct, event_reasons as er, find_condition, reasons,
    };

    use restic_operator_api::repository::ResticRepository;

    use super::*;
    use crate::repository::to_time;

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
        let blocked = not_ready(&access(&locked)).unwrap();
        assert_eq!(blocked.reason, reasons::REPOSITORY_NOT_READY);
        assert_eq!(
            blocked.message,
            "ResticRepository n/r is not ready (RepositoryLocked): held"
        );
        assert!(
            not_ready(&access(&repo("")))
                .unwrap()
                .message
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

    fn reason<'a>(s: &'a ResticBackupStatus, type_: &str) -> Option<&'a str> {
        find_condition(&s.conditions, type_)?.reason.as_deref()
    }

    fn not_ready_yet() -> Blocked {
        Blocked {
            reason: reasons::REPOSITORY_NOT_READY,
            message: "ResticRepository n/r has not been checked yet".into(),
        }
    }

    fn not_allowed() -> Blocked {
        Blocked {
            reason: reasons::NAMESPACE_NOT_ALLOWED,
            message: "ResticRepository o/r does not allow namespace n (spec.allowedNamespaces)".into(),
        }
    }

    #[test]
    fn a_started_run_is_recorded_before_it_runs() {
        let b = backup().status("lastScheduleTime: '2024-01-14T02:00:00Z'");
        let now = t("2024-01-15T02:00:01Z");
        let d = decide(&b, &schedule(), now, HOUR, None);
        let mut s = b.status.clone().unwrap();
        record(&mut s, &b, &d, None, b.meta().generation, now);
        let active = s.active_run.clone().unwrap();
        assert_eq!(Some(&active.run_id), d.start.as_ref().map(|r| &r.run_id));
        assert_eq!(active.start_time, Some(to_time(now)));
        assert_eq!(active.scheduled_time, Some(to_time(t("2024-01-15T02:00:00Z"))));
        assert!(find_condition(&s.conditions, ct::PROGRESSING).unwrap().is_true());
        assert_eq!(
            reason(&s, ct::REPOSITORY_READY),
            Some(reasons::REPOSITORY_ACCESSIBLE)
        );
        assert_eq!(reason(&s, ct::READY), Some(reasons::SCHEDULED));
        assert_eq!(s.last_schedule_time, Some(to_time(t("2024-01-15T02:00:00Z"))));
        assert!(events(&d, None).is_empty());
    }

    #[test]
    fn a_repository_not_ready_yet_delays_the_tick_without_consuming_it() {
        let b = backup().status("lastScheduleTime: '2024-01-14T02:00:00Z'");
        let now = t("2024-01-15T02:00:01Z");
        let blocked = not_ready_yet();
        let d = decide(&b, &schedule(), now, HOUR, Some(&blocked));
        assert!(d.start.is_none() && d.refused.is_none());
        let mut s = b.status.clone().unwrap();
        record(&mut s, &b, &d, Some(&blocked), b.meta().generation, now);
        assert!(s.active_run.is_none());
        assert_eq!(s.last_schedule_time, Some(to_time(t("2024-01-14T02:00:00Z"))));
        let c = find_condition(&s.conditions, ct::REPOSITORY_READY).unwrap();
        assert!(!c.is_true());
        assert_eq!(c.message.as_deref(), Some(blocked.message.as_str()));
        assert!(events(&d, Some(&blocked)).is_empty());
        // Once the repository is ready, within the deadline, the same tick runs.
        let later = decide(&b, &schedule(), t("2024-01-15T02:20:00Z"), HOUR, None);
        assert_eq!(later.start.unwrap().scheduled, t("2024-01-15T02:00:00Z"));
    }

    #[test]
    fn a_refused_manual_trigger_is_handled_and_reported_once() {
        let b = backup()
            .spec("manualTrigger: 'go'")
            .status("lastScheduleTime: '2024-01-15T02:00:00Z'");
        let now = t("2024-01-15T10:00:00Z");
        let blocked = not_allowed();
        let d = decide(&b, &schedule(), now, HOUR, Some(&blocked));
        assert!(d.start.is_none());
        assert_eq!(d.refused.as_ref().unwrap().manual.as_deref(), Some("go"));
        let mut s = b.status.clone().unwrap();
        record(&mut s, &b, &d, Some(&blocked), b.meta().generation, now);
        assert_eq!(s.last_manual_trigger.as_deref(), Some("go"));
        assert!(s.active_run.is_none());
        let events = events(&d, Some(&blocked));
        assert_eq!(events.len(), 1);
        assert_eq!(events[0].1, er::NAMESPACE_NOT_ALLOWED);
        assert!(
            events[0]
                .2
                .starts_with(&format!("Run {} refused: ", manual_run_id("u1", "go", 0)))
        );
        // The handled trigger does not run when the allow-list changes.
        let b = backup()
            .spec("manualTrigger: 'go'")
            .status("lastScheduleTime: '2024-01-15T02:00:00Z', lastManualTrigger: 'go'");
        assert!(decide(&b, &schedule(), now, HOUR, None).start.is_none());
    }

    #[test]
    fn an_accepted_manual_trigger_and_a_skipped_tick_are_reported() {
        let b = backup().spec("manualTrigger: 'go'").build();
        let d = decide(&b, &schedule(), t("2024-01-01T01:00:00Z"), HOUR, None);
        let accepted = events(&d, None);
        assert_eq!(accepted.len(), 1);
        assert_eq!(accepted[0].1, er::MANUAL_TRIGGER);
        let b = backup().status("lastScheduleTime: '2024-01-14T02:00:00Z', activeRun: {runID: x}");
        let d = decide(&b, &schedule(), t("2024-01-15T02:00:01Z"), HOUR, None);
        let events = events(&d, None);
        assert_eq!(events.len(), 1);
        assert_eq!(
            (events[0].0, events[0].1),
            (EventType::Warning, er::BACKUP_SKIPPED)
        );
    }

    #[test]
    fn suspend_and_a_fixed_spec_set_ready_again() {
        let b = backup()
            .spec("suspend: true")
            .status("conditions: [{type: Ready, status: 'False', reason: InvalidSpec}]");
        let now = t("2024-01-15T02:00:01Z");
        let d = decide(&b, &schedule(), now, HOUR, None);
        let mut s = b.status.clone().unwrap();
        record(&mut s, &b, &d, None, b.meta().generation, now);
        assert_eq!(reason(&s, ct::READY), Some(reasons::SUSPENDED));
        assert_eq!(s.next_backup, None);
        let b = backup().status("conditions: [{type: Ready, status: 'True', reason: Suspended}]");
        let mut s = b.status.clone().unwrap();
        record(
            &mut s,
            &b,
            &decide(&b, &schedule(), now, HOUR, None),
            None,
            b.meta().generation,
            now,
        );
        assert_eq!(reason(&s, ct::READY), Some(reasons::SCHEDULED));
    }

    #[test]
    fn the_next_wake_is_the_next_tick_or_a_minute_while_a_run_is_in_flight() {
        let now = t("2024-01-15T01:59:00Z");
        let plan = Plan {
            next_backup: Some(t("2024-01-15T02:00:00Z")),
            ..Default::default()
        };
        assert_eq!(next_wake(&plan, false, now), Duration::from_millis(60_050));
        let far = Plan {
            next_backup: Some(t("2024-01-16T02:00:00Z")),
            ..Default::default()
        };
        assert_eq!(next_wake(&far, false, now), HOUR);
        assert_eq!(next_wake(&far, true, now), Duration::from_secs(60));
        let replace = Plan {
            requeue: Some(Duration::from_secs(2)),
            ..far
        };
        assert_eq!(next_wake(&replace, true, now), Duration::from_secs(2));
    }
}
