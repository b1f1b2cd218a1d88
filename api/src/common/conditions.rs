//! Conditions in the shape of Kubernetes' `metav1.Condition`, the functions that set and find
//! them, and the constants of condition types, condition reasons and event reasons.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Status of a condition: `True`, `False` or `Unknown`.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum ConditionStatus {
    // The condition holds.
    True,
    // The condition does not hold.
    False,
    // The operator cannot tell.
    #[default]
    Unknown,
}

impl From<bool> for ConditionStatus {
    fn from(holds: bool) -> Self {
        if holds {
            ConditionStatus::True
        } else {
            ConditionStatus::False
        }
    }
}

/// One aspect of the object's state, in the shape of Kubernetes' `metav1.Condition`. Unlike
/// that type, only `type` and `status` are required, so conditions written by hand (as in the
/// specification's examples) are accepted.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Condition {
    /// Type of the condition, e.g. `Ready`, `RepositoryReady`, `Progressing`, `Degraded`.
    #[serde(rename = "type")]
    pub type_: String,
    /// Status of the condition: `True`, `False` or `Unknown`.
    pub status: ConditionStatus,
    /// When the status last changed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_transition_time: Option<Time>,
    /// Machine-readable reason for the status, in PascalCase (e.g. `BackupSucceeded`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Explanation for a person.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// `metadata.generation` the condition was computed from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
}

impl Condition {
    /// A condition with every field set.
    pub fn new(
        type_: &str,
        status: impl Into<ConditionStatus>,
        reason: &str,
        message: impl Into<String>,
        observed_generation: Option<i64>,
        now: Time,
    ) -> Self {
        Self {
            type_: type_.to_owned(),
            status: status.into(),
            last_transition_time: Some(now),
            reason: Some(reason.to_owned()),
            message: Some(message.into()),
            observed_generation,
        }
    }

    /// Whether this condition's status is `True`.
    pub fn is_true(&self) -> bool {
        self.status == ConditionStatus::True
    }
}

/// Puts `new` into `conditions`, replacing the condition of the same type. The previous
/// `lastTransitionTime` is kept unless the status changes, so the time says when the status
/// flipped rather than when the operator last looked.
pub fn set_condition(conditions: &mut Vec<Condition>, mut new: Condition) {
    match conditions.iter_mut().find(|c| c.type_ == new.type_) {
        Some(old) => {
            if old.status == new.status && old.last_transition_time.is_some() {
                new.last_transition_time = old.last_transition_time.clone();
            }
            *old = new;
        }
        None => conditions.push(new),
    }
}

/// The condition of the given type, if present.
pub fn find_condition<'a>(conditions: &'a [Condition], type_: &str) -> Option<&'a Condition> {
    conditions.iter().find(|c| c.type_ == type_)
}

/// Condition types.
pub mod condition_types {
    /// The resource is ready and operating normally.
    pub const READY: &str = "Ready";
    /// The referenced repository is accessible.
    pub const REPOSITORY_READY: &str = "RepositoryReady";
    /// A run (backup, restore, retention, check) is in progress.
    pub const PROGRESSING: &str = "Progressing";
    /// The resource is operational but experiencing issues (e.g. the last run failed).
    pub const DEGRADED: &str = "Degraded";
    /// The last repository integrity check passed.
    pub const INTEGRITY_CHECK_SUCCEEDED: &str = "IntegrityCheckSucceeded";
    /// The last repository integrity check found errors.
    pub const INTEGRITY_CHECK_FAILED: &str = "IntegrityCheckFailed";
    /// A restore has finished (status True) or given up (status False).
    pub const COMPLETE: &str = "Complete";
}

/// Condition reasons (PascalCase, as the specification writes them).
pub mod reasons {
    // Repository
    /// The repository exists (or was just initialized) and is accessible.
    pub const REPOSITORY_INITIALIZED: &str = "RepositoryInitialized";
    /// The referenced repository is accessible.
    pub const REPOSITORY_ACCESSIBLE: &str = "RepositoryAccessible";
    /// The repository could not be reached or opened.
    pub const REPOSITORY_UNREACHABLE: &str = "RepositoryUnreachable";
    /// The referenced ResticRepository does not exist.
    pub const REPOSITORY_NOT_FOUND: &str = "RepositoryNotFound";
    /// The referenced ResticRepository exists but is not Ready.
    pub const REPOSITORY_NOT_READY: &str = "RepositoryNotReady";
    /// The referenced repository does not allow this namespace (`spec.allowedNamespaces`).
    pub const NAMESPACE_NOT_ALLOWED: &str = "NamespaceNotAllowed";
    /// A live restic lock held by another process blocks an exclusive operation.
    pub const REPOSITORY_LOCKED: &str = "RepositoryLocked";
    /// The credentials Secret is missing.
    pub const SECRET_NOT_FOUND: &str = "SecretNotFound";
    /// The credentials Secret exists but lacks a required key (`RESTIC_PASSWORD`).
    pub const SECRET_KEY_MISSING: &str = "SecretKeyMissing";
    /// No repository exists at the URL and initializing one failed.
    pub const REPOSITORY_NOT_INITIALIZED: &str = "RepositoryNotInitialized";
    /// The wrong password or credentials were rejected by the repository.
    pub const AUTHENTICATION_FAILED: &str = "AuthenticationFailed";
    /// The last integrity check passed.
    pub const INTEGRITY_CHECK_PASSED: &str = "IntegrityCheckPassed";
    /// The last integrity check found errors.
    pub const INTEGRITY_CHECK_FAILED: &str = "IntegrityCheckFailed";

    // Backup
    /// The last backup succeeded.
    pub const BACKUP_SUCCEEDED: &str = "BackupSucceeded";
    /// The last backup failed.
    pub const BACKUP_FAILED: &str = "BackupFailed";
    /// The last backup made a snapshot but could not read some files.
    pub const BACKUP_PARTIALLY_FAILED: &str = "BackupPartiallyFailed";
    /// A backup is running.
    pub const BACKUP_RUNNING: &str = "BackupRunning";
    /// The resource is valid and waiting for its first scheduled run.
    pub const SCHEDULED: &str = "Scheduled";
    /// Scheduling is suspended (`spec.suspend: true`).
    pub const SUSPENDED: &str = "Suspended";
    /// The source (PVC, pod volume) could not be found or is not usable.
    pub const SOURCE_NOT_FOUND: &str = "SourceNotFound";
    /// A hook failed.
    pub const HOOK_FAILED: &str = "HookFailed";
    /// No node agent is available to run the work.
    pub const AGENT_UNAVAILABLE: &str = "AgentUnavailable";

    // Restore
    /// The restore is waiting to start.
    pub const RESTORE_PENDING: &str = "RestorePending";
    /// The restore is running.
    pub const RESTORE_IN_PROGRESS: &str = "RestoreInProgress";
    /// The restore finished successfully.
    pub const RESTORE_SUCCEEDED: &str = "RestoreSucceeded";
    /// The restore failed.
    pub const RESTORE_FAILED: &str = "RestoreFailed";
    /// No snapshot matches `snapshotID` / `snapshotSelector`.
    pub const SNAPSHOT_NOT_FOUND: &str = "SnapshotNotFound";
    /// The target holds files and `options.mode` is `IfEmpty`.
    pub const TARGET_NOT_EMPTY: &str = "TargetNotEmpty";

    // Retention
    /// The last retention run succeeded.
    pub const LAST_RUN_SUCCEEDED: &str = "LastRunSucceeded";
    /// The last retention run failed.
    pub const LAST_RUN_FAILED: &str = "LastRunFailed";
    /// Retention is running.
    pub const RETENTION_RUNNING: &str = "RetentionRunning";

    // Any kind
    /// The spec cannot be acted on; the message says why. Fixed by changing the spec.
    pub const INVALID_SPEC: &str = "InvalidSpec";
}

/// Event reasons (PascalCase, as in the specification's §5.2).
pub mod event_reasons {
    /// A backup run started.
    pub const BACKUP_STARTED: &str = "BackupStarted";
    /// A backup run completed.
    pub const BACKUP_COMPLETED: &str = "BackupCompleted";
    /// A backup run failed.
    pub const BACKUP_FAILED: &str = "BackupFailed";
    /// A run waits for its repository: retention for the repository's backups and checks, or
    /// a backup for retention, a prune or a check that holds the repository.
    pub const REPOSITORY_BUSY: &str = "RepositoryBusy";
    /// An attempt of a backup run failed and is tried again (`jobConfig.backoffLimit`).
    pub const BACKUP_RETRYING: &str = "BackupRetrying";
    /// A backup run made a snapshot but could not read some files.
    pub const BACKUP_PARTIALLY_FAILED: &str = "BackupPartiallyFailed";
    /// A retention run (forget, prune) completed.
    pub const RETENTION_COMPLETED: &str = "RetentionCompleted";
    /// A retention run failed.
    pub const RETENTION_FAILED: &str = "RetentionFailed";
    /// A repository integrity check failed.
    pub const REPOSITORY_UNHEALTHY: &str = "RepositoryUnhealthy";
    /// A repository integrity check passed.
    pub const INTEGRITY_CHECK_PASSED: &str = "IntegrityCheckPassed";
    /// A repository was initialized (`restic init`).
    pub const REPOSITORY_INITIALIZED: &str = "RepositoryInitialized";
    /// A restore started.
    pub const RESTORE_STARTED: &str = "RestoreStarted";
    /// A restore completed.
    pub const RESTORE_COMPLETED: &str = "RestoreCompleted";
    /// A restore failed.
    pub const RESTORE_FAILED: &str = "RestoreFailed";
    /// A restore waits for a backup of its target claim (or another restore into it) to
    /// finish.
    pub const RESTORE_WAITING: &str = "RestoreWaiting";
    /// A backup of a claim waits for a restore into that claim to finish.
    pub const CLAIM_BUSY: &str = "ClaimBusy";
    /// A manual trigger was accepted.
    pub const MANUAL_TRIGGER: &str = "ManualTrigger";
    /// A scheduled run was skipped (a run was still in flight, or it was missed by more than
    /// the starting deadline).
    pub const BACKUP_SKIPPED: &str = "BackupSkipped";
    /// A backup or restore was refused because the repository does not allow the namespace.
    pub const NAMESPACE_NOT_ALLOWED: &str = "NamespaceNotAllowed";
    /// A hook failed.
    pub const HOOK_FAILED: &str = "HookFailed";
    /// Keys of a repository's credentials Secret that are not restic backend settings were
    /// left out (the note names them).
    pub const SECRET_KEYS_IGNORED: &str = "SecretKeysIgnored";
    /// An integrity check started.
    pub const INTEGRITY_CHECK_STARTED: &str = "IntegrityCheckStarted";
    /// Repository statistics could not be read (the repository's readiness is not affected).
    pub const STATISTICS_FAILED: &str = "StatisticsFailed";
}

#[cfg(test)]
mod tests {
    use super::*;

    fn time(s: &str) -> Time {
        Time(s.parse().unwrap())
    }

    #[test]
    fn a_new_condition_is_appended() {
        let mut conditions = Vec::new();
        let c = Condition::new(
            "Ready",
            true,
            "BackupSucceeded",
            "ok",
            Some(1),
            time("2024-01-15T02:00:00Z"),
        );
        set_condition(&mut conditions, c.clone());
        assert_eq!(conditions, vec![c]);
    }

    #[test]
    fn a_condition_keeps_its_transition_time_while_the_status_stays() {
        let mut conditions = vec![Condition::new(
            "Ready",
            true,
            "A",
            "a",
            Some(1),
            time("2024-01-15T02:00:00Z"),
        )];
        set_condition(
            &mut conditions,
            Condition::new("Ready", true, "B", "b", Some(2), time("2024-01-16T02:00:00Z")),
        );
        assert_eq!(conditions.len(), 1);
        assert_eq!(conditions[0].reason.as_deref(), Some("B"));
        assert_eq!(conditions[0].observed_generation, Some(2));
        assert_eq!(
            conditions[0].last_transition_time,
            Some(time("2024-01-15T02:00:00Z"))
        );
    }

    #[test]
    fn a_condition_gets_a_new_transition_time_when_the_status_flips() {
        let mut conditions = vec![Condition::new(
            "Ready",
            true,
            "A",
            "a",
            None,
            time("2024-01-15T02:00:00Z"),
        )];
        set_condition(
            &mut conditions,
            Condition::new("Ready", false, "B", "b", None, time("2024-01-16T02:00:00Z")),
        );
        assert_eq!(
            conditions[0].last_transition_time,
            Some(time("2024-01-16T02:00:00Z"))
        );
        assert!(!find_condition(&conditions, "Ready").unwrap().is_true());
    }
}
