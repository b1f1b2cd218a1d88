//! When a scheduled kind runs, decided without I/O: the tick due (run, skip, or wait), a
//! pending manual trigger, the concurrency policy towards a run in flight, the next tick, and
//! the run's id. ResticBackup and GlobalRetentionPolicy both plan here, each from a
//! [`Scheduled`] view of its object.

use std::time::Duration;

use chrono::{DateTime, Utc};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::runtime::events::EventType;
use restic_operator_api::backup::ResticBackupStatus;
use restic_operator_api::common::{
    ActiveRun, ConcurrencyPolicy, Condition, RunTrigger, condition_types as ct, event_reasons as er,
    find_condition, reasons, set_condition,
};
use restic_operator_api::retention::GlobalRetentionPolicyStatus;

use crate::holder::fnv;
use crate::repository::to_time;
use crate::resolve::{Access, ResolveError};
use crate::schedule::{Due, Schedule, due};

/// A run to start.
#[derive(Clone, Debug, PartialEq)]
pub struct NewRun {
    pub run_id: String,
    pub trigger: RunTrigger,
    pub scheduled: DateTime<Utc>,
    pub manual: Option<String>,
}

/// What reconcile decided (pure).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Plan {
    pub start: Option<NewRun>,
    /// A scheduled time handled without a run, and why (for an event).
    pub skipped: Option<(DateTime<Utc>, String)>,
    /// New `status.lastScheduleTime`.
    pub last_schedule: Option<DateTime<Utc>>,
    /// The next tick (`status.nextBackup`, `status.nextRun`); none while suspended.
    pub next_backup: Option<DateTime<Utc>>,
    /// Cancel the run in flight (`Replace`).
    pub cancel_active: bool,
    pub requeue: Option<Duration>,
}

/// What planning needs to know of an object.
#[derive(Clone, Debug)]
pub struct Scheduled<'a> {
    /// The kind's run id prefix (`rb`, `grp`).
    pub prefix: &'static str,
    pub uid: &'a str,
    pub suspend: bool,
    /// A run is in flight (`status.activeRun`).
    pub in_flight: bool,
    pub policy: ConcurrencyPolicy,
    /// `status.lastScheduleTime`.
    pub last_schedule: Option<DateTime<Utc>>,
    /// `metadata.creationTimestamp`: no tick before it runs.
    pub created: Option<DateTime<Utc>>,
    /// The manual trigger still to run.
    pub manual: Option<&'a str>,
    pub generation: i64,
    /// The id of the last finished run, if the kind records it: never started again.
    pub last_run: Option<&'a str>,
}

/// The run id of a scheduled run: the object's UID and the scheduled time, so the same tick
/// always has the same id.
pub fn scheduled_run_id(prefix: &str, uid: &str, scheduled: DateTime<Utc>) -> String {
    format!("{prefix}-{uid}-{}", scheduled.timestamp())
}

/// The run id of a manual run: the trigger value and the generation that set it (setting
/// `a`, `b`, then `a` again is three runs).
pub fn manual_run_id(prefix: &str, uid: &str, trigger: &str, generation: i64) -> String {
    format!("{prefix}-{uid}-m{:08x}-g{generation}", fnv(trigger))
}

/// Decides what to do at `now` (pure): the tick due, a pending manual trigger, and when the
/// next tick is.
pub fn plan(object: &Scheduled<'_>, schedule: &Schedule, now: DateTime<Utc>, deadline: Duration) -> Plan {
    let base = object.last_schedule.or(object.created).unwrap_or(now);
    let deadline = chrono::Duration::from_std(deadline).unwrap_or(chrono::Duration::hours(1));
    let due_now = match object.suspend {
        true => Due::Wait(None),
        false => due(schedule, base, now, deadline),
    };
    let mut plan = on_tick(object, &due_now);
    if !object.in_flight
        && plan.start.is_none()
        && let Some(trigger) = object.manual
    {
        // A tick due right now is served by this run.
        if let Due::Run { time, .. } = due_now {
            plan.last_schedule = Some(time);
        }
        plan.start = Some(NewRun {
            run_id: manual_run_id(object.prefix, object.uid, trigger, object.generation),
            trigger: RunTrigger::Manual,
            scheduled: now,
            manual: Some(trigger.to_owned()),
        });
    }
    // A run that already finished (its id is the last run's) is never started again.
    if plan
        .start
        .as_ref()
        .is_some_and(|r| Some(r.run_id.as_str()) == object.last_run)
    {
        plan.start = None;
    }
    if !object.suspend {
        let after = plan.last_schedule.map_or(now, |l| l.max(now));
        plan.next_backup = schedule.next_after(after);
    }
    plan
}

/// What the schedule alone asks for (pure): a tick to run, to skip, or to wait for.
fn on_tick(object: &Scheduled<'_>, due_now: &Due) -> Plan {
    let mut plan = Plan::default();
    match *due_now {
        Due::Wait(_) => {}
        Due::TooLate { time } => {
            plan.last_schedule = Some(time);
            let why = format!(
                "missed the run scheduled at {} by more than the starting deadline; waiting for the next one",
                time.to_rfc3339()
            );
            plan.skipped = Some((time, why));
        }
        Due::Run { time, .. } if object.in_flight => plan = while_in_flight(object.policy, time),
        // A pending manual trigger takes the tick (see `plan`).
        Due::Run { .. } if object.manual.is_some() => {}
        Due::Run { time, missed } => {
            plan.start = Some(NewRun {
                run_id: scheduled_run_id(object.prefix, object.uid, time),
                trigger: RunTrigger::Schedule,
                scheduled: time,
                manual: None,
            });
            plan.last_schedule = Some(time);
            if missed > 0 {
                let why = format!("{missed} earlier scheduled run(s) were missed; running once now");
                plan.skipped = Some((time, why));
            }
        }
    }
    plan
}

/// A tick due at `time` while a run is in flight, by `concurrencyPolicy` (pure).
fn while_in_flight(policy: ConcurrencyPolicy, time: DateTime<Utc>) -> Plan {
    match policy {
        ConcurrencyPolicy::Forbid => Plan {
            last_schedule: Some(time),
            skipped: Some((
                time,
                format!(
                    "skipped the run scheduled at {}: the previous run is still in flight (concurrencyPolicy Forbid)",
                    time.to_rfc3339()
                ),
            )),
            ..Default::default()
        },
        // Allow: the tick waits for the run in flight and then runs (within the deadline).
        ConcurrencyPolicy::Allow => Plan {
            requeue: Some(Duration::from_secs(5)),
            ..Default::default()
        },
        // Replace: the run in flight is cancelled first.
        ConcurrencyPolicy::Replace => Plan {
            cancel_active: true,
            requeue: Some(Duration::from_secs(2)),
            ..Default::default()
        },
    }
}

/// Why the repository cannot take a run now: its `RepositoryReady` condition.
#[derive(Clone, Debug, PartialEq)]
pub struct Blocked {
    pub reason: &'static str,
    pub message: String,
}

impl Blocked {
    pub fn of(e: &ResolveError) -> Self {
        Self {
            reason: e.reason(),
            message: e.to_string(),
        }
    }

    /// The event of a refusal: what the namespace may not do with the repository (as opposed
    /// to a repository that is not ready yet, which only delays runs).
    fn refusal_event(&self) -> Option<&'static str> {
        (self.reason == reasons::NAMESPACE_NOT_ALLOWED).then_some(er::NAMESPACE_NOT_ALLOWED)
    }
}

/// What one reconcile decided, on the object as read under the status lock (pure).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Decision {
    pub plan: Plan,
    /// The run to record in status and start.
    pub start: Option<NewRun>,
    /// A run refused because the namespace may not use the repository.
    pub refused: Option<NewRun>,
}

/// What a plan becomes when the repository may not take a run (pure). A run due while the
/// repository is only not ready is not started and its tick is not consumed: it runs when the
/// repository recovers within the starting deadline. A refused run is consumed: it never runs
/// later by surprise.
pub fn gate(mut plan: Plan, blocked: Option<&Blocked>) -> Decision {
    let Some(blocked) = blocked else {
        let start = plan.start.clone();
        return Decision {
            plan,
            start,
            refused: None,
        };
    };
    let refused = plan.start.clone().filter(|_| blocked.refusal_event().is_some());
    if refused.is_none() {
        plan.last_schedule = None;
    }
    Decision {
        plan,
        start: None,
        refused,
    }
}

/// The events of `decision` (pure): a skipped tick, a refused run, an accepted manual trigger.
/// A tick skipped because the repository is only not ready yet is not reported: it runs later.
pub fn events(decision: &Decision, blocked: Option<&Blocked>) -> Vec<(EventType, &'static str, String)> {
    let mut events = Vec::new();
    if let Some((_, why)) = &decision.plan.skipped
        && (blocked.is_none() || decision.refused.is_some())
    {
        events.push((EventType::Warning, er::BACKUP_SKIPPED, why.clone()));
    }
    if let (Some(run), Some(b)) = (&decision.refused, blocked) {
        let reason = b.refusal_event().unwrap_or(er::NAMESPACE_NOT_ALLOWED);
        let note = format!("Run {} refused: {}", run.run_id, b.message);
        events.push((EventType::Warning, reason, note));
    }
    if let Some(m) = decision.start.as_ref().and_then(|r| r.manual.as_ref()) {
        let note = format!("Manual trigger {m:?} accepted");
        events.push((EventType::Normal, er::MANUAL_TRIGGER, note));
    }
    events
}

/// When to look at the object again (pure): at the next tick, sooner when the plan asks, every
/// minute while a run is in flight (should its runner have given up, the API server
/// unreachable for minutes, the next reconcile re-attaches), and at least hourly.
pub fn next_wake(plan: &Plan, in_flight: bool, now: DateTime<Utc>) -> Duration {
    let until_next = plan
        .next_backup
        .map(|n| (n - now).to_std().unwrap_or_default() + Duration::from_millis(50));
    let watch_run = in_flight.then_some(Duration::from_secs(60));
    [until_next, plan.requeue, watch_run]
        .into_iter()
        .flatten()
        .fold(Duration::from_secs(3600), Duration::min)
        .max(Duration::from_millis(100))
}

/// Why a repository the object may use cannot take a run yet (pure): its `Ready` condition.
pub fn not_ready(access: &Access) -> Option<Blocked> {
    let repo = access.repository();
    let key = crate::status::key_of(repo);
    let message = match repo
        .status
        .as_ref()
        .and_then(|s| find_condition(&s.conditions, ct::READY))
    {
        Some(c) if c.is_true() => return None,
        Some(c) => format!(
            "ResticRepository {key} is not ready ({}): {}",
            c.reason.clone().unwrap_or_default(),
            c.message.clone().unwrap_or_default()
        ),
        None => format!("ResticRepository {key} has not been checked yet"),
    };
    Some(Blocked {
        reason: reasons::REPOSITORY_NOT_READY,
        message,
    })
}

/// The status fields planning writes, for each scheduled kind.
pub trait ScheduleStatus {
    fn conditions(&mut self) -> &mut Vec<Condition>;
    fn observed_generation(&mut self) -> &mut Option<i64>;
    /// `status.nextBackup`, `status.nextRun`.
    fn next_run(&mut self) -> &mut Option<Time>;
    fn last_schedule_time(&mut self) -> &mut Option<Time>;
    fn last_manual_trigger(&mut self) -> &mut Option<String>;
    fn active_run(&mut self) -> &mut Option<ActiveRun>;
    /// Clears the live progress of an earlier run, for kinds that report it.
    fn clear_progress(&mut self) {}
    /// The `Progressing` reason of a run in flight.
    fn running_reason(&self) -> &'static str;
}

/// Writes what `decision` says into a status (pure): the schedule times, the
/// `RepositoryReady` and `Ready` conditions, the run started, the manual trigger handled.
/// `generation` is that of the spec the schedule was read from.
pub fn record<S: ScheduleStatus>(
    status: &mut S,
    suspend: bool,
    decision: &Decision,
    blocked: Option<&Blocked>,
    generation: Option<i64>,
    now: DateTime<Utc>,
) {
    let set = |s: &mut S, type_: &str, ok: bool, reason: &str, message: String| {
        let c = Condition::new(type_, ok, reason, message, generation, to_time(now));
        set_condition(s.conditions(), c)
    };
    *status.observed_generation() = generation;
    *status.next_run() = decision.plan.next_backup.map(to_time);
    if let Some(t) = decision.plan.last_schedule {
        *status.last_schedule_time() = Some(to_time(t));
    }
    match blocked {
        Some(b) => set(status, ct::REPOSITORY_READY, false, b.reason, b.message.clone()),
        None => {
            let message = "Repository is accessible".into();
            set(
                status,
                ct::REPOSITORY_READY,
                true,
                reasons::REPOSITORY_ACCESSIBLE,
                message,
            )
        }
    }
    if let Some(m) = decision.refused.as_ref().and_then(|r| r.manual.clone()) {
        *status.last_manual_trigger() = Some(m);
    }
    if let Some(run) = &decision.start {
        *status.active_run() = Some(ActiveRun {
            run_id: run.run_id.clone(),
            trigger: Some(run.trigger),
            scheduled_time: Some(to_time(run.scheduled)),
            start_time: Some(to_time(now)),
            node_name: None,
            agent_pod: None,
            attempt: Some(1),
        });
        if let Some(m) = &run.manual {
            *status.last_manual_trigger() = Some(m.clone());
        }
        status.clear_progress();
        let message = format!("Run {} started", run.run_id);
        let reason = status.running_reason();
        set(status, ct::PROGRESSING, true, reason, message);
    }
    scheduling(status, suspend, generation, now);
}

/// `Ready` while no run says otherwise (pure): `Suspended`, or `Scheduled` once the schedule
/// is active again (a valid spec, no longer suspended). A run's result is left alone.
fn scheduling<S: ScheduleStatus>(status: &mut S, suspend: bool, generation: Option<i64>, now: DateTime<Utc>) {
    let ready_reason = find_condition(status.conditions(), ct::READY).and_then(|c| c.reason.clone());
    let (reason, message) = if suspend {
        (reasons::SUSPENDED, "Scheduling is suspended")
    } else if ready_reason
        .as_deref()
        .is_none_or(|r| r == reasons::SUSPENDED || r == reasons::INVALID_SPEC)
    {
        (reasons::SCHEDULED, "Waiting for the next scheduled run")
    } else {
        return;
    };
    let c = Condition::new(ct::READY, true, reason, message, generation, to_time(now));
    set_condition(status.conditions(), c);
}

/// A spec whose schedule cannot be read (pure): `Ready=False` with `InvalidSpec`, no next run.
pub fn invalid<S: ScheduleStatus>(
    status: &mut S,
    message: &str,
    generation: Option<i64>,
    now: DateTime<Utc>,
) {
    let c = Condition::new(
        ct::READY,
        false,
        reasons::INVALID_SPEC,
        message,
        generation,
        to_time(now),
    );
    set_condition(status.conditions(), c);
    *status.next_run() = None;
    *status.observed_generation() = generation;
}

/// Implements [`ScheduleStatus`] for a kind's status: the field that holds the next run, the
/// `Progressing` reason of a run in flight, and the live-progress field if the kind has one.
macro_rules! schedule_status {
    ($status:ty, $next:ident, $running:expr $(, $progress:ident)?) => {
        impl ScheduleStatus for $status {
            fn conditions(&mut self) -> &mut Vec<Condition> {
                &mut self.conditions
            }
            fn observed_generation(&mut self) -> &mut Option<i64> {
                &mut self.observed_generation
            }
            fn next_run(&mut self) -> &mut Option<Time> {
                &mut self.$next
            }
            fn last_schedule_time(&mut self) -> &mut Option<Time> {
                &mut self.last_schedule_time
            }
            fn last_manual_trigger(&mut self) -> &mut Option<String> {
                &mut self.last_manual_trigger
            }
            fn active_run(&mut self) -> &mut Option<ActiveRun> {
                &mut self.active_run
            }
            $(fn clear_progress(&mut self) {
                self.$progress = None;
            })?
            fn running_reason(&self) -> &'static str {
                $running
            }
        }
    };
}

schedule_status!(ResticBackupStatus, next_backup, reasons::BACKUP_RUNNING, progress);
schedule_status!(GlobalRetentionPolicyStatus, next_run, reasons::RETENTION_RUNNING);
