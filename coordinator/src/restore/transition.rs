//! How a restore's status changes (pure): Pending when seen, InProgress once its snapshot is
//! resolved (the snapshot recorded before any data moves), the run recorded before it is
//! sent, and Completed or Failed at the end, which is final.

use chrono::{DateTime, Utc};
use restic_operator_api::common::{
    ActiveRun, Condition, condition_types as ct, format_bytes, reasons, set_condition,
};
use restic_operator_api::restore::{ResticRestoreStatus, RestorePhase};
use restic_operator_proto::v1 as pb;

use super::select::time_of;
use crate::repository::to_time;

/// How a restore ended.
#[derive(Clone, Debug, PartialEq)]
pub struct Outcome {
    pub completed: bool,
    /// The `Complete` condition's reason.
    pub reason: &'static str,
    pub message: String,
    /// The agent's result, when restic ran.
    pub result: Option<pb::Result>,
}

impl Outcome {
    pub fn failed(reason: &'static str, message: impl Into<String>) -> Self {
        Self {
            completed: false,
            reason,
            message: message.into(),
            result: None,
        }
    }

    /// The outcome of the agent's result (pure). A target that is not empty under `IfEmpty`
    /// has its own reason; so does a restore that wrote only some files.
    pub fn of_agent(result: pb::Result) -> Self {
        let outcome = pb::Outcome::try_from(result.outcome).unwrap_or(pb::Outcome::Unspecified);
        let (completed, reason, message) = match outcome {
            pb::Outcome::Succeeded => (true, reasons::RESTORE_SUCCEEDED, completed_message(&result)),
            pb::Outcome::PartiallyFailed => (
                false,
                reasons::RESTORE_FAILED,
                format!("{}: {}", result.reason, result.failed_paths.join(", ")),
            ),
            _ if result.failure == pb::FailureKind::InvalidRequest as i32
                && result.reason.contains("is not empty") =>
            {
                (false, reasons::TARGET_NOT_EMPTY, result.reason.clone())
            }
            _ => (
                false,
                reasons::RESTORE_FAILED,
                crate::run::describe_failure(&result),
            ),
        };
        Self {
            completed,
            reason,
            message,
            result: Some(result),
        }
    }

    /// With `more` (a post-restore hook's failure) added to the message.
    pub fn and(mut self, more: Option<String>) -> Self {
        if let Some(more) = more {
            self.message = format!("{}; {more}", self.message);
        }
        self
    }
}

fn completed_message(result: &pb::Result) -> String {
    let s = result.restore.unwrap_or_default();
    let mut m = format!(
        "Restored {} files ({}) from snapshot {}",
        s.files_restored,
        format_bytes(s.bytes_restored),
        short(&result.snapshot_id)
    );
    if s.files_deleted > 0 {
        m.push_str(&format!(", deleted {} files not in it", s.files_deleted));
    }
    m
}

fn short(id: &str) -> &str {
    &id[..id.len().min(8)]
}

fn condition(
    type_: &str,
    status: bool,
    reason: &str,
    message: &str,
    generation: Option<i64>,
    now: DateTime<Utc>,
) -> Condition {
    Condition::new(type_, status, reason, message, generation, to_time(now))
}

/// A restore seen for the first time: Pending.
pub fn pending(s: &mut ResticRestoreStatus, generation: Option<i64>, now: DateTime<Utc>) {
    if s.phase.is_some() {
        return;
    }
    s.phase = Some(RestorePhase::Pending);
    s.observed_generation = generation;
    let c = condition(
        ct::PROGRESSING,
        false,
        reasons::RESTORE_PENDING,
        "Waiting to start",
        generation,
        now,
    );
    set_condition(&mut s.conditions, c);
}

/// The snapshot is resolved: InProgress, with the snapshot and when it was taken, before any
/// data moves.
pub fn started(
    s: &mut ResticRestoreStatus,
    snapshot: &pb::Snapshot,
    claim: &str,
    generation: Option<i64>,
    now: DateTime<Utc>,
) {
    if s.phase.is_some_and(RestorePhase::is_finished) {
        return;
    }
    s.phase = Some(RestorePhase::InProgress);
    s.start_time.get_or_insert_with(|| to_time(now));
    s.restored_snapshot = Some(snapshot.id.clone());
    s.snapshot_time = Some(to_time(time_of(snapshot)));
    s.observed_generation = generation;
    let message = format!(
        "Restoring snapshot {} (taken {}) into claim {claim}",
        short(&snapshot.id),
        time_of(snapshot).format("%Y-%m-%dT%H:%M:%SZ")
    );
    s.message = Some(message.clone());
    let c = condition(
        ct::PROGRESSING,
        true,
        reasons::RESTORE_IN_PROGRESS,
        &message,
        generation,
        now,
    );
    set_condition(&mut s.conditions, c);
}

/// The run is about to be sent to the agent on `active.nodeName`: recorded first, so a
/// restarted coordinator attaches to it and never sends it again.
pub fn dispatched(s: &mut ResticRestoreStatus, active: &ActiveRun) {
    if s.phase == Some(RestorePhase::InProgress) {
        s.active_run = Some(active.clone());
        s.job_ref = active.agent_pod.clone();
    }
}

/// The end: Completed or Failed, with the counts, the `Complete` condition and no run in
/// flight. A restore that has ended is never changed again.
pub fn finish(s: &mut ResticRestoreStatus, outcome: &Outcome, generation: Option<i64>, now: DateTime<Utc>) {
    if s.phase.is_some_and(RestorePhase::is_finished) {
        return;
    }
    s.phase = Some(if outcome.completed {
        RestorePhase::Completed
    } else {
        RestorePhase::Failed
    });
    s.start_time.get_or_insert_with(|| to_time(now));
    s.completion_time = Some(to_time(now));
    s.active_run = None;
    s.progress = None;
    s.message = Some(outcome.message.clone());
    s.observed_generation = generation;
    if let Some(r) = &outcome.result {
        let summary = r.restore.unwrap_or_default();
        if r.restore.is_some() {
            s.restored_files = i64::try_from(summary.files_restored).ok();
            s.restored_size_bytes = i64::try_from(summary.bytes_restored).ok();
            s.restored_size = Some(format_bytes(summary.bytes_restored));
            s.deleted_files = i64::try_from(summary.files_deleted).ok();
        }
    }
    let message = &outcome.message;
    let complete = condition(
        ct::COMPLETE,
        outcome.completed,
        outcome.reason,
        message,
        generation,
        now,
    );
    set_condition(&mut s.conditions, complete);
    let done = condition(ct::PROGRESSING, false, outcome.reason, message, generation, now);
    set_condition(&mut s.conditions, done);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn now() -> DateTime<Utc> {
        "2026-11-26T10:00:00Z".parse().unwrap()
    }

    fn snapshot() -> pb::Snapshot {
        pb::Snapshot {
            id: "0123456789abcdef".into(),
            short_id: "01234567".into(),
            time_unix_ms: 1_780_000_000_000,
            ..Default::default()
        }
    }

    fn status(yaml: &str) -> ResticRestoreStatus {
        serde_yaml::from_str(yaml).unwrap()
    }

    #[test]
    fn the_snapshot_is_recorded_when_the_restore_starts() {
        let mut s = ResticRestoreStatus::default();
        pending(&mut s, Some(1), now());
        assert_eq!(s.phase, Some(RestorePhase::Pending));
        started(&mut s, &snapshot(), "data", Some(1), now());
        assert_eq!(s.phase, Some(RestorePhase::InProgress));
        assert_eq!(s.restored_snapshot.as_deref(), Some("0123456789abcdef"));
        assert_eq!(s.snapshot_time, Some(to_time(time_of(&snapshot()))));
        assert!(s.message.as_deref().unwrap().contains("into claim data"));
        let c = s.conditions.iter().find(|c| c.type_ == ct::PROGRESSING).unwrap();
        assert_eq!(
            (c.is_true(), c.reason.as_deref()),
            (true, Some(reasons::RESTORE_IN_PROGRESS))
        );
    }

    #[test]
    fn a_finished_restore_is_final() {
        let mut s = status("phase: InProgress\nactiveRun: {runID: r}\n");
        let result = pb::Result {
            outcome: pb::Outcome::Succeeded as i32,
            snapshot_id: "0123456789abcdef".into(),
            restore: Some(pb::RestoreSummary {
                files_restored: 5,
                bytes_restored: 3 << 20,
                files_deleted: 2,
                ..Default::default()
            }),
            ..Default::default()
        };
        let outcome = Outcome::of_agent(result);
        finish(&mut s, &outcome, Some(1), now());
        assert_eq!(s.phase, Some(RestorePhase::Completed));
        assert_eq!(s.active_run, None);
        assert_eq!((s.restored_files, s.deleted_files), (Some(5), Some(2)));
        assert_eq!(s.restored_size.as_deref(), Some("3.0 MiB"));
        assert_eq!(
            s.message.as_deref(),
            Some("Restored 5 files (3.0 MiB) from snapshot 01234567, deleted 2 files not in it")
        );
        let c = s.conditions.iter().find(|c| c.type_ == ct::COMPLETE).unwrap();
        assert_eq!(
            (c.is_true(), c.reason.as_deref()),
            (true, Some(reasons::RESTORE_SUCCEEDED))
        );
        let before = s.clone();
        finish(
            &mut s,
            &Outcome::failed(reasons::RESTORE_FAILED, "late"),
            Some(2),
            now(),
        );
        started(&mut s, &snapshot(), "x", Some(2), now());
        assert_eq!(s, before);
    }

    #[test]
    fn a_non_empty_target_has_its_own_reason() {
        let refused = Outcome::of_agent(pb::Result {
            outcome: pb::Outcome::Failed as i32,
            failure: pb::FailureKind::InvalidRequest as i32,
            reason: "restore refused: the target volume is not empty; choose mode Overwrite or Mirror".into(),
            ..Default::default()
        });
        assert_eq!(refused.reason, reasons::TARGET_NOT_EMPTY);
        assert!(!refused.completed);
        let mut s = status("phase: InProgress\n");
        finish(&mut s, &refused, None, now());
        assert_eq!(s.phase, Some(RestorePhase::Failed));
        assert_eq!(s.restored_files, None, "nothing was restored");
    }
}
