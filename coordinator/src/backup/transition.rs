//! What a finished run changes, decided without I/O: the run's record (`status.lastBackup`),
//! the rest of the status (statistics, conditions, retention figures) and the event to
//! publish. The runner writes what these return; the tests feed them fixtures.

use chrono::{DateTime, Utc};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::runtime::events::EventType;
use restic_operator_api::backup::{BackupRun, BackupStatistics, ResticBackupStatus};
use restic_operator_api::common::{
    ActiveRun, Condition, RunResult, condition_types as ct, event_reasons as er, format_bytes,
    format_duration, reasons, set_condition,
};
use restic_operator_proto::v1 as pb;

use super::RetentionError;
use crate::repository::{from_time, to_time};
use crate::resolve::Resolved;
use crate::run;

/// How a run ended, before hooks and retention.
pub struct Outcome {
    pub result: RunResult,
    /// The `Ready` condition's reason when the run failed.
    pub reason: &'static str,
    pub message: String,
    /// The agent's result (none for a run that failed before or without the agent).
    pub agent: Option<pb::Result>,
    /// False for a run refused before anything of it ran: no hook runs after it either.
    pub hooks: bool,
    /// What the run was sent with (not known after a re-attach).
    pub resolved: Option<Resolved>,
    /// The run may still be going on its agent, or may have made a snapshot nobody saw: its
    /// agent stopped answering, lost it, or could not be asked. Never retried.
    pub uncertain: bool,
    /// No other attempt can change this failure (a hostPath volume, say).
    pub permanent: bool,
}

impl Outcome {
    pub fn failed(message: impl Into<String>) -> Self {
        Self {
            result: RunResult::Failed,
            reason: reasons::BACKUP_FAILED,
            message: message.into(),
            agent: None,
            hooks: true,
            resolved: None,
            uncertain: false,
            permanent: false,
        }
    }

    /// A failure after which the run may still be going on, or have made a snapshot.
    pub fn uncertain(message: impl Into<String>) -> Self {
        Self {
            uncertain: true,
            ..Self::failed(message)
        }
    }

    pub fn failed_because(reason: &'static str, message: impl Into<String>) -> Self {
        Self {
            reason,
            ..Self::failed(message)
        }
    }

    /// The outcome the agent's result says.
    pub fn of_agent(r: pb::Result) -> Self {
        let (result, message) = match pb::Outcome::try_from(r.outcome).unwrap_or(pb::Outcome::Unspecified) {
            pb::Outcome::Succeeded => (RunResult::Succeeded, String::new()),
            pb::Outcome::PartiallyFailed => (
                RunResult::PartiallyFailed,
                format!("{} file(s) could not be read", failed_count(&r)),
            ),
            _ => (RunResult::Failed, run::describe_failure(&r)),
        };
        Self {
            result,
            message,
            agent: Some(r),
            ..Self::failed("")
        }
    }

    fn made_snapshot(&self) -> bool {
        self.result != RunResult::Failed
    }

    /// The agent's summary of the backup (a run found in the repository has none).
    pub fn summary(&self) -> Option<&pb::BackupSummary> {
        self.agent.as_ref().and_then(|r| r.backup.as_ref())
    }

    fn snapshot_id(&self) -> &str {
        self.agent.as_ref().map_or("", |r| r.snapshot_id.as_str())
    }
}

impl Outcome {
    /// Whether another attempt can succeed where this one failed, without a second snapshot:
    /// either nothing was sent (no pod mounts the volume yet, the holder pod did not start, no
    /// agent serves the node), or restic itself ended failed (the repository unreachable, a
    /// lock, restic's own error, out of memory, the volume not found). Never a run that may
    /// still be going on or may have made a snapshot (its agent stopped answering, lost it, or
    /// restarted during it), a refused run, a wrong password, a missing repository, an invalid
    /// request, a cancelled run, an empty snapshot, or a backup stopped at its deadline while
    /// it was still working.
    pub fn retryable(&self) -> bool {
        if self.result != RunResult::Failed || !self.hooks || self.uncertain || self.permanent {
            return false;
        }
        let Some(r) = &self.agent else {
            return matches!(
                self.reason,
                reasons::BACKUP_FAILED | reasons::SOURCE_NOT_FOUND | crate::holder::HOLDER_NOT_STARTED
            );
        };
        use pb::FailureKind as K;
        match K::try_from(r.failure).unwrap_or(K::Unspecified) {
            K::RepositoryUnreachable => true,
            _ if r.timed_out => false,
            kind => matches!(
                kind,
                K::Locked | K::Restic | K::Unspecified | K::OutOfMemory | K::VolumeNotFound
            ),
        }
    }
}

/// Whether attempt `attempt` of a run, which ended in `outcome`, is tried again (pure):
/// `jobConfig.backoffLimit` allows `backoff_limit` retries of what a retry can fix.
pub fn retry(outcome: &Outcome, attempt: i32, backoff_limit: i32) -> bool {
    attempt <= backoff_limit && outcome.retryable()
}

/// How long to wait before attempt `next` (pure): 10 s before the second, doubling after
/// each, at most 5 minutes.
pub fn retry_delay(next: i32) -> std::time::Duration {
    let doublings = u32::try_from(next - 2).unwrap_or(0).min(5);
    std::time::Duration::from_secs((10u64 << doublings).min(300))
}

/// What the run's message says of its attempts (pure): which attempt ended it, of how many
/// allowed, and why the earlier ones failed.
pub fn attempts_note(attempt: i32, allowed: i32, earlier: &[String]) -> String {
    let allowed = allowed.max(attempt);
    format!("attempt {attempt} of {allowed}; {}", earlier.join("; "))
}

fn failed_count(r: &pb::Result) -> u64 {
    r.failed_paths_total.max(r.failed_paths.len() as u64)
}

/// A finished run: how it ended, and the retention applied after it.
pub struct Finished<'a> {
    pub active: &'a ActiveRun,
    pub started: Time,
    pub now: DateTime<Utc>,
    pub outcome: &'a Outcome,
    pub retention: Option<&'a Result<pb::ForgetSummary, RetentionError>>,
}

impl Finished<'_> {
    /// How long the run took.
    pub fn duration(&self) -> std::time::Duration {
        (self.now - from_time(&self.started)).to_std().unwrap_or_default()
    }

    /// The run's record, `status.lastBackup`.
    pub fn record(&self) -> BackupRun {
        let o = self.outcome;
        let summary = o.summary();
        let snapshot = o.snapshot_id();
        BackupRun {
            run_id: Some(self.active.run_id.clone()),
            trigger: self.active.trigger,
            start_time: Some(self.started.clone()),
            completion_time: Some(to_time(self.now)),
            duration: Some(format_duration(self.duration())),
            snapshot_id: Some(snapshot.to_owned()).filter(|s| !s.is_empty()),
            short_snapshot_id: Some(snapshot.chars().take(8).collect::<String>()).filter(|s| !s.is_empty()),
            parent_snapshot_id: summary
                .map(|s| s.parent_snapshot_id.clone())
                .filter(|s| !s.is_empty()),
            result: Some(o.result),
            message: Some(o.message.clone()).filter(|m| !m.is_empty()),
            failed_paths: o
                .agent
                .as_ref()
                .map(|r| r.failed_paths.clone())
                .unwrap_or_default(),
            files_new: summary.map(|s| s.files_new as i64),
            files_changed: summary.map(|s| s.files_changed as i64),
            files_unmodified: summary.map(|s| s.files_unmodified as i64),
            data_added: summary.map(|s| format_bytes(s.data_added)),
            data_added_bytes: summary.map(|s| s.data_added as i64),
        }
    }

    /// Applies the finished run to `status`: clears `activeRun` and progress, records the run,
    /// counts it, and sets `Ready`, `Progressing` and `Degraded`. A status whose `activeRun`
    /// is another run (already finished by someone else) is left alone.
    pub fn apply(&self, status: &mut ResticBackupStatus, generation: Option<i64>) {
        if status.active_run.as_ref().map(|a| &a.run_id) != Some(&self.active.run_id) {
            return;
        }
        let o = self.outcome;
        status.active_run = None;
        status.progress = None;
        status.last_backup = Some(self.record());
        count(status.statistics.get_or_insert_with(BackupStatistics::default), o);
        if o.result == RunResult::Succeeded {
            status.last_successful_backup = Some(self.started.clone());
        }
        if let Some(Ok(f)) = self.retention {
            status.last_retention_run = Some(to_time(self.now));
            status.snapshots_after_retention = i64::try_from(f.kept.len()).ok();
            status.snapshots_removed_by_retention = i64::try_from(f.removed.len()).ok();
        }
        let t = to_time(self.now);
        let mut set = |type_: &str, ok: bool, reason: &str, message: String| {
            let c = Condition::new(type_, ok, reason, message, generation, t.clone());
            set_condition(&mut status.conditions, c);
        };
        let (ok, reason, message) = match o.result {
            RunResult::Succeeded => (
                true,
                reasons::BACKUP_SUCCEEDED,
                "Last backup completed successfully".to_owned(),
            ),
            RunResult::PartiallyFailed => (true, reasons::BACKUP_PARTIALLY_FAILED, o.message.clone()),
            RunResult::Failed => (false, o.reason, o.message.clone()),
        };
        set(ct::READY, ok, reason, message.clone());
        let finished = format!("Run {} finished", self.active.run_id);
        set(ct::PROGRESSING, false, reason, finished);
        match (o.result, self.retention) {
            (_, Some(Err(e))) => set(ct::DEGRADED, true, reason, e.to_string()),
            (RunResult::PartiallyFailed, _) => set(ct::DEGRADED, true, reason, message),
            _ => set(ct::DEGRADED, false, reasons::BACKUP_SUCCEEDED, String::new()),
        }
    }

    /// The event that tells people how the run ended.
    pub fn event(&self) -> (EventType, &'static str, String) {
        let o = self.outcome;
        let snapshot = o.snapshot_id();
        match o.result {
            RunResult::Succeeded => (
                EventType::Normal,
                er::BACKUP_COMPLETED,
                format!("Backup completed successfully (snapshot: {snapshot})"),
            ),
            RunResult::PartiallyFailed => {
                let r = o.agent.clone().unwrap_or_default();
                let shown: Vec<&str> = r.failed_paths.iter().take(10).map(String::as_str).collect();
                let more = if failed_count(&r) > 10 { ", ..." } else { "" };
                (
                    EventType::Warning,
                    er::BACKUP_PARTIALLY_FAILED,
                    format!(
                        "Backup completed with {} unreadable file(s) (snapshot: {snapshot}): {}{more}",
                        failed_count(&r),
                        shown.join(", ")
                    ),
                )
            }
            RunResult::Failed => (
                EventType::Warning,
                er::BACKUP_FAILED,
                format!("Backup failed: {}", o.message),
            ),
        }
    }
}

/// Counts the run in the backup's statistics.
fn count(stats: &mut BackupStatistics, o: &Outcome) {
    let add = |n: &mut Option<i64>| *n = Some(n.unwrap_or(0) + 1);
    add(&mut stats.total_backups);
    match o.result {
        RunResult::Succeeded => add(&mut stats.successful_backups),
        RunResult::Failed => add(&mut stats.failed_backups),
        RunResult::PartiallyFailed => add(&mut stats.partially_failed_backups),
    }
    if o.made_snapshot()
        && let Some(summary) = o.summary()
    {
        stats.last_backup_size = Some(format_bytes(summary.total_bytes_processed));
        stats.last_backup_size_bytes = i64::try_from(summary.total_bytes_processed).ok();
        stats.last_backup_files = i64::try_from(summary.total_files_processed).ok();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use restic_operator_api::common::find_condition;

    fn status(yaml: &str) -> ResticBackupStatus {
        serde_yaml::from_str(yaml).unwrap()
    }

    /// A backup's status with run `r1` in flight and one earlier success.
    const IN_FLIGHT: &str = "
activeRun: {runID: r1, trigger: Manual, startTime: '2026-11-26T02:00:00Z', nodeName: n1}
progress: {runID: r1, percentDone: 40}
statistics: {totalBackups: 1, successfulBackups: 1}
";

    fn active() -> ActiveRun {
        status(IN_FLIGHT).active_run.unwrap()
    }

    fn agent(yaml: &str) -> pb::Result {
        let v: serde_json::Value = serde_yaml::from_str(yaml).unwrap();
        let mut r = pb::Result {
            outcome: pb::Outcome::Succeeded as i32,
            snapshot_id: v["snapshot"].as_str().unwrap_or_default().into(),
            ..Default::default()
        };
        if let Some(files) = v["failed"].as_array() {
            r.outcome = pb::Outcome::PartiallyFailed as i32;
            r.failed_paths = files.iter().map(|f| f.as_str().unwrap().to_owned()).collect();
            r.failed_paths_total = v["failedTotal"].as_u64().unwrap_or(r.failed_paths.len() as u64);
        }
        if v["summary"].is_object() {
            r.backup = Some(pb::BackupSummary {
                files_new: v["summary"]["filesNew"].as_u64().unwrap_or(0),
                total_bytes_processed: v["summary"]["bytes"].as_u64().unwrap_or(0),
                parent_snapshot_id: v["summary"]["parent"].as_str().unwrap_or_default().into(),
                ..Default::default()
            });
        }
        r
    }

    fn finish(
        outcome: &Outcome,
        retention: Option<&Result<pb::ForgetSummary, RetentionError>>,
    ) -> (ResticBackupStatus, (EventType, &'static str, String)) {
        let active = active();
        let finished = Finished {
            active: &active,
            started: active.start_time.clone().unwrap(),
            now: "2026-11-26T02:01:30Z".parse().unwrap(),
            outcome,
            retention,
        };
        let mut s = status(IN_FLIGHT);
        finished.apply(&mut s, Some(3));
        (s, finished.event())
    }

    fn condition<'a>(s: &'a ResticBackupStatus, type_: &str) -> &'a Condition {
        find_condition(&s.conditions, type_).unwrap()
    }

    #[test]
    fn a_success_is_recorded_counted_and_clears_the_run_in_flight() {
        let outcome = Outcome::of_agent(agent(
            "{snapshot: 0123456789abcdef, summary: {filesNew: 3, bytes: 2048, parent: fedcba}}",
        ));
        let (s, (type_, reason, note)) = finish(&outcome, None);
        assert!(s.active_run.is_none() && s.progress.is_none());
        let last = s.last_backup.clone().unwrap();
        assert_eq!(last.run_id.as_deref(), Some("r1"));
        assert_eq!(last.duration.as_deref(), Some("1m30s"));
        assert_eq!(last.short_snapshot_id.as_deref(), Some("01234567"));
        assert_eq!(
            (last.files_new, last.parent_snapshot_id.as_deref()),
            (Some(3), Some("fedcba"))
        );
        let stats = s.statistics.clone().unwrap();
        assert_eq!(
            (stats.total_backups, stats.successful_backups),
            (Some(2), Some(2))
        );
        assert_eq!(stats.last_backup_size_bytes, Some(2048));
        assert_eq!(
            s.last_successful_backup.as_ref().unwrap().0.to_string(),
            "2026-11-26T02:00:00Z"
        );
        let ready = condition(&s, ct::READY);
        assert!(ready.is_true() && ready.observed_generation == Some(3));
        assert!(!condition(&s, ct::DEGRADED).is_true());
        assert_eq!((type_, reason), (EventType::Normal, er::BACKUP_COMPLETED));
        assert!(note.contains("0123456789abcdef"), "{note}");
    }

    #[test]
    fn a_partial_failure_is_ready_but_degraded_and_names_some_of_the_files() {
        let outcome = Outcome::of_agent(agent(
            "{snapshot: abc, failed: [/data/a, /data/b], failedTotal: 12, summary: {bytes: 1}}",
        ));
        let (s, (type_, reason, note)) = finish(&outcome, None);
        assert!(condition(&s, ct::READY).is_true());
        assert!(condition(&s, ct::DEGRADED).is_true());
        assert_eq!(s.statistics.as_ref().unwrap().partially_failed_backups, Some(1));
        assert_eq!((type_, reason), (EventType::Warning, er::BACKUP_PARTIALLY_FAILED));
        assert!(
            note.contains("12 unreadable") && note.contains("/data/a, /data/b, ..."),
            "{note}"
        );
        assert_eq!(
            s.last_backup.as_ref().unwrap().message.as_deref(),
            Some("12 file(s) could not be read")
        );
    }

    #[test]
    fn a_failure_is_not_ready_with_its_reason_and_counts_no_size() {
        let outcome = Outcome::failed_because(reasons::REPOSITORY_NOT_READY, "the repository is not ready");
        let (s, (type_, reason, note)) = finish(&outcome, None);
        let ready = condition(&s, ct::READY);
        assert!(!ready.is_true());
        assert_eq!(ready.reason.as_deref(), Some(reasons::REPOSITORY_NOT_READY));
        let stats = s.statistics.clone().unwrap();
        assert_eq!((stats.failed_backups, stats.last_backup_size), (Some(1), None));
        assert!(s.last_successful_backup.is_none());
        assert_eq!((type_, reason), (EventType::Warning, er::BACKUP_FAILED));
        assert_eq!(note, "Backup failed: the repository is not ready");
    }

    #[test]
    fn a_failed_retention_degrades_a_successful_run_and_a_good_one_is_recorded() {
        let outcome = Outcome::of_agent(agent("{snapshot: abc}"));
        let failed = Err(RetentionError::NoAgent("locked".to_owned()));
        let (s, _) = finish(&outcome, Some(&failed));
        let degraded = condition(&s, ct::DEGRADED);
        assert!(
            degraded.is_true() && degraded.message.as_deref().unwrap_or_default().contains("locked"),
            "{degraded:?}"
        );
        assert!(s.last_retention_run.is_none());

        let kept = Ok(pb::ForgetSummary {
            kept: vec!["a".into(), "b".into()],
            removed: vec!["c".into()],
        });
        let (s, _) = finish(&outcome, Some(&kept));
        assert_eq!(
            (s.snapshots_after_retention, s.snapshots_removed_by_retention),
            (Some(2), Some(1))
        );
        assert!(!condition(&s, ct::DEGRADED).is_true());
    }

    #[test]
    fn a_run_found_in_the_repository_has_its_snapshot_but_no_counts() {
        let mut outcome = Outcome::of_agent(agent("{snapshot: abc}"));
        outcome.message = "found in the repository".into();
        let (s, _) = finish(&outcome, None);
        let last = s.last_backup.unwrap();
        assert_eq!(last.snapshot_id.as_deref(), Some("abc"));
        assert_eq!((last.files_new, last.data_added_bytes), (None, None));
    }

    #[test]
    fn a_status_whose_run_in_flight_is_another_is_left_alone() {
        let outcome = Outcome::of_agent(agent("{snapshot: abc}"));
        let active = active();
        let finished = Finished {
            active: &active,
            started: active.start_time.clone().unwrap(),
            now: "2026-11-26T02:01:30Z".parse().unwrap(),
            outcome: &outcome,
            retention: None,
        };
        let mut s = status("activeRun: {runID: r2}");
        let before = s.clone();
        finished.apply(&mut s, Some(1));
        assert_eq!(s, before);
    }

    fn failed_with(kind: pb::FailureKind) -> Outcome {
        Outcome::of_agent(pb::Result {
            outcome: pb::Outcome::Failed as i32,
            failure: kind as i32,
            ..Default::default()
        })
    }

    #[test]
    fn what_a_retry_can_fix_is_retried_within_the_backoff_limit() {
        let locked = failed_with(pb::FailureKind::Locked);
        assert!(!retry(&locked, 1, 0), "backoffLimit 0: no retry");
        assert!(retry(&locked, 1, 2) && retry(&locked, 2, 2));
        assert!(
            !retry(&locked, 3, 2),
            "the third attempt is the last of backoffLimit 2"
        );
        for kind in [
            pb::FailureKind::RepositoryUnreachable,
            pb::FailureKind::Restic,
            pb::FailureKind::OutOfMemory,
            pb::FailureKind::VolumeNotFound,
        ] {
            assert!(retry(&failed_with(kind), 1, 1), "{kind:?}");
        }
        for kind in [
            pb::FailureKind::AgentRestarted,
            pb::FailureKind::WrongPassword,
            pb::FailureKind::RepositoryNotFound,
            pb::FailureKind::InvalidRequest,
            pb::FailureKind::Cancelled,
            pb::FailureKind::EmptySnapshot,
        ] {
            assert!(!retry(&failed_with(kind), 1, 1), "{kind:?}");
        }
        // Nothing was sent: retried.
        assert!(retry(&Outcome::failed("no ready restic agent on node n1"), 1, 1));
        let no_pod = Outcome::failed_because(reasons::SOURCE_NOT_FOUND, "no pod");
        assert!(retry(&no_pod, 1, 1));
        let holder = Outcome::failed_because(crate::holder::HOLDER_NOT_STARTED, "not running");
        assert!(retry(&holder, 1, 1));
        // Sent, then the agent stopped answering or lost it: the run may still go on, or have
        // made a snapshot. Never retried.
        assert!(!retry(&Outcome::uncertain("agent on node n1 unavailable"), 1, 1));
        // Stopped at its deadline while working: another attempt would take as long.
        let timed_out = |kind: pb::FailureKind| {
            let mut o = failed_with(kind);
            o.agent.as_mut().unwrap().timed_out = true;
            o
        };
        assert!(!retry(&timed_out(pb::FailureKind::Restic), 1, 1));
        assert!(retry(&timed_out(pb::FailureKind::RepositoryUnreachable), 1, 1));
        let refused = Outcome {
            hooks: false,
            ..Outcome::failed_because(reasons::NAMESPACE_NOT_ALLOWED, "refused")
        };
        assert!(!retry(&refused, 1, 1));
        let conflict = Outcome::failed_because(crate::holder::HOLDER_POD_CONFLICT, "not ours");
        assert!(!retry(&conflict, 1, 1));
        let host_path = crate::sources::SourceError::HostPath {
            pv_name: "pv".into(),
            claim: "n/data".into(),
        };
        let host_path = Outcome {
            permanent: !host_path.retryable(),
            ..Outcome::failed_because(host_path.reason(), host_path.to_string())
        };
        assert!(
            !retry(&host_path, 1, 1),
            "no retry makes a hostPath volume readable"
        );
        let partial = Outcome::of_agent(agent("{snapshot: abc, failed: [a]}"));
        assert!(!retry(&partial, 1, 1), "a snapshot was made");
    }

    #[test]
    fn retries_back_off_and_the_message_says_why_earlier_attempts_failed() {
        let secs = |n| retry_delay(n).as_secs();
        assert_eq!(
            (secs(2), secs(3), secs(4), secs(7), secs(30)),
            (10, 20, 40, 300, 300)
        );
        let earlier = ["attempt 1 failed: repository locked".to_owned()];
        assert_eq!(
            attempts_note(2, 3, &earlier),
            "attempt 2 of 3; attempt 1 failed: repository locked"
        );
        assert!(
            attempts_note(3, 2, &earlier).starts_with("attempt 3 of 3;"),
            "a lowered limit"
        );
    }
}
