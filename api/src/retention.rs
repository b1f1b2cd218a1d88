//! `GlobalRetentionPolicy`: repository-wide retention that runs on its own schedule, independent
//! of any ResticBackup: one `restic forget` per policy (snapshots selected by tags and hostname),
//! then optionally one `restic prune`. Status carries the last run, sizes before and after, and
//! the number of snapshots removed, in all and by policy.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::common::{
    ActiveRun, Condition, GroupBy, KeepPolicy, Notifications, RepositoryReference, RunResult,
    SCHEDULE_MESSAGE, SCHEDULE_RULE, default_group_by,
};

/// Repository-wide retention on a schedule: one `restic forget` per policy, then one
/// `restic prune` if asked, with the repository held alone (after its backups and checks).
// Each `printcolumn(...)` repeats the keys `type_`, `priority`, ...; clippy reads that as
// duplicated attributes.
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[kube(
    group = "backup.resticbackup.io",
    version = "v1alpha1",
    kind = "GlobalRetentionPolicy",
    namespaced,
    status = "GlobalRetentionPolicyStatus",
    shortname = "grp",
    category = "restic",
    doc = "Retention for a whole repository on its own schedule: restic forget per policy (snapshots selected by tags and hostname), then optionally prune.",
    printcolumn(
        name = "Schedule",
        type_ = "string",
        json_path = ".spec.schedule",
        description = "Cron schedule"
    ),
    printcolumn(
        name = "Last Result",
        type_ = "string",
        json_path = ".status.lastRunResult",
        description = "Result of the last run"
    ),
    printcolumn(
        name = "Last Run",
        type_ = "date",
        json_path = ".status.lastRun",
        description = "When the last run started",
        priority = 1
    ),
    printcolumn(
        name = "Removed",
        type_ = "integer",
        json_path = ".status.snapshotsRemoved",
        description = "Snapshots the last run removed",
        priority = 1
    ),
    printcolumn(
        name = "Next Run",
        type_ = "string",
        json_path = ".status.nextRun",
        description = "When the next scheduled run starts"
    ),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp")
)]
#[serde(rename_all = "camelCase")]
pub struct GlobalRetentionPolicySpec {
    /// The ResticRepository to apply retention to, in this policy's namespace: a policy acts on
    /// every snapshot of the repository, whichever namespace made it, so a repository in
    /// another namespace is refused (`NamespaceNotAllowed`) whatever its `allowedNamespaces`.
    pub repository_ref: RepositoryReference,
    /// When retention runs, as a five-field cron expression, e.g. `20 1 * * 0` (Sundays at
    /// 1:20 AM), or a macro such as `@weekly`.
    #[schemars(length(min = 1, max = 128))]
    #[x_kube(validation = Rule::new(SCHEDULE_RULE).message(SCHEDULE_MESSAGE))]
    pub schedule: String,
    /// IANA time zone the schedule is read in, e.g. `Europe/Berlin`. Default: UTC.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timezone: Option<String>,
    /// Retention rules, each applied with its own `restic forget` to the snapshots its selector
    /// matches. Snapshots no policy selects are left alone.
    #[schemars(length(min = 1))]
    pub policies: Vec<RetentionPolicyRule>,
    /// Snapshot properties each policy is applied per group of (`restic forget --group-by`):
    /// any of `host`, `paths`, `tags`. Default: `[host, tags]`. An empty list applies each
    /// policy to all the snapshots it selects at once (no grouping).
    #[serde(default = "default_group_by")]
    pub group_by: Vec<GroupBy>,
    /// Run `restic prune` after all forget operations to free space. Default: false.
    #[serde(default)]
    pub prune: bool,
    /// Where to report each run's outcome. Not sent yet: accepted and validated, for a later
    /// release (the run's result is in status and events).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub notifications: Option<Notifications>,
    /// Suspend scheduling. Manual triggers still run. Default: false.
    #[serde(default)]
    pub suspend: bool,
    /// Run retention now: set to any new value (a timestamp works well) and the operator runs
    /// once outside the schedule, then records the value in `status.lastManualTrigger`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub manual_trigger: Option<String>,
}

/// One retention rule: which snapshots, and how many of them to keep.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RetentionPolicyRule {
    /// Which snapshots this rule applies to. An empty selector selects every snapshot.
    #[serde(default)]
    pub selector: SnapshotFilter,
    /// How many of the selected snapshots to keep (restic forget `--keep-*`).
    pub retention: KeepPolicy,
}

/// What a retention run did with one policy.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PolicyRunResult {
    /// Position of the policy in `spec.policies`, from 1.
    pub policy: i32,
    /// The snapshots it selects, for people, e.g. `tags app=a, host db`.
    pub selector: String,
    /// Snapshots it removed (absent when its forget failed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshots_removed: Option<i64>,
    /// Selected snapshots it kept (absent when its forget failed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshots_kept: Option<i64>,
    /// Why its forget failed, if it did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// Selects snapshots by tags and hostname (restic `--tag` and `--host`).
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SnapshotFilter {
    /// Only snapshots that have all of these tags (an empty tag, or one with a comma, is
    /// refused).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tags: Vec<String>,
    /// Only snapshots of this hostname (an empty one is refused: leave it out for any host).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hostname: Option<String>,
}

/// Observed state of a GlobalRetentionPolicy.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct GlobalRetentionPolicyStatus {
    /// Conditions: `Ready` (last run succeeded), `RepositoryReady`, `Progressing` (a run is in
    /// flight), `Degraded` (last run failed).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["type".into()]))]
    pub conditions: Vec<Condition>,
    /// `metadata.generation` of the spec this status was computed from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// When the last run started.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_run: Option<Time>,
    /// Result of the last run: `Succeeded`, `Failed` or `PartiallyFailed` (some policies
    /// failed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_run_result: Option<RunResult>,
    /// How long the last run took, e.g. `15m30s`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_run_duration: Option<String>,
    /// What happened in the last run, for a person (the error on failure).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// Repository size before the last run, for people, e.g. `150.2 GiB`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub repository_size_before: Option<String>,
    /// Repository size before the last run, in bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub repository_size_before_bytes: Option<i64>,
    /// Repository size after the last run, for people, e.g. `142.8 GiB`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub repository_size_after: Option<String>,
    /// Repository size after the last run, in bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub repository_size_after_bytes: Option<i64>,
    /// Snapshots the last run removed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshots_removed: Option<i64>,
    /// What the last run did with each policy, in the order of `spec.policies`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub policies: Vec<PolicyRunResult>,
    /// Snapshots left in the repository after the last run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshots_after_retention: Option<i64>,
    /// When the next scheduled run starts (absent while suspended).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_run: Option<Time>,
    /// The scheduled time of the most recent scheduled run the operator started.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_schedule_time: Option<Time>,
    /// The `spec.manualTrigger` value the operator last acted on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_manual_trigger: Option<String>,
    /// The run in flight, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub active_run: Option<ActiveRun>,
}

impl GlobalRetentionPolicy {
    /// The `spec.manualTrigger` value that still has to be run, if any.
    pub fn pending_manual_trigger(&self) -> Option<&str> {
        let wanted = self.spec.manual_trigger.as_deref().filter(|t| !t.is_empty())?;
        let handled = self
            .status
            .as_ref()
            .and_then(|s| s.last_manual_trigger.as_deref());
        (handled != Some(wanted)).then_some(wanted)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn policies_keep_their_order_and_selectors_and_group_by_host_and_tags_by_default() {
        let spec: GlobalRetentionPolicySpec = serde_yaml::from_str(
            "
repositoryRef: {name: repo}
schedule: '20 1 * * 0'
policies:
  - selector: {tags: [emby]}
    retention: {keepDaily: 7, keepLast: 4, keepMonthly: 0}
  - selector: {tags: [a, b], hostname: mariadb}
    retention: {keepWeekly: 2}
",
        )
        .unwrap();
        let policy = GlobalRetentionPolicy::new("weekly-cleanup", spec);
        let rules = &policy.spec.policies;
        assert_eq!(rules[0].selector.tags, ["emby"]);
        assert_eq!(rules[0].retention.keep_daily, Some(7));
        assert_eq!(rules[1].selector.hostname.as_deref(), Some("mariadb"));
        assert_eq!(policy.spec.group_by, [GroupBy::Host, GroupBy::Tags]);
        assert!(!policy.spec.prune);
        assert_eq!(policy.pending_manual_trigger(), None);
    }
}
