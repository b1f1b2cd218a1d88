//! `ResticBackup`: a scheduled backup of one source (a PVC, a volume of running pods, or what a
//! pod writes, such as a database dump) into a ResticRepository, with
//! restic options, hooks, retention applied after each backup, notifications (not sent yet),
//! and settings for the restic process and holder pods. Status carries the last run,
//! statistics, retention results and live progress.

use k8s_openapi::{
    api::core::v1::PodTemplateSpec,
    apimachinery::pkg::apis::meta::v1::{LabelSelector, Time},
};
use kube::{CustomResource, KubeSchema, ResourceExt};
use restic_operator_args as args;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::common::{
    ActiveRun, Condition, GroupBy, Hook, JobConfig, KeepPolicy, NetworkPolicyConfig, Notifications,
    ObjectReference, Progress, RepositoryReference, RunResult, RunTrigger, SCHEDULE_MESSAGE, SCHEDULE_RULE,
    default_group_by, default_true, pod_template_schema,
};

/// Where the volume appears inside snapshots when `restic.snapshotPath` is not set.
pub const DEFAULT_SNAPSHOT_PATH: &str = "/data";

fn default_snapshot_path() -> String {
    DEFAULT_SNAPSHOT_PATH.to_owned()
}

fn default_paths() -> Vec<String> {
    vec!["/".to_owned()]
}

/// A scheduled backup of one source into a restic repository.
// Each `printcolumn(...)` repeats the keys `type_`, `priority`, ...; clippy reads that as
// duplicated attributes.
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[kube(
    group = "backup.resticbackup.io",
    version = "v1alpha1",
    kind = "ResticBackup",
    namespaced,
    status = "ResticBackupStatus",
    shortname = "rbackup",
    category = "restic",
    doc = "A scheduled restic backup of a PVC, a volume of running pods or what a pod writes (a database dump), with hooks and retention. (Notifications are accepted but not acted on yet.)",
    printcolumn(
        name = "Schedule",
        type_ = "string",
        json_path = ".spec.schedule",
        description = "Cron schedule"
    ),
    printcolumn(
        name = "Suspended",
        type_ = "boolean",
        json_path = ".spec.suspend",
        description = "Whether scheduling is suspended"
    ),
    printcolumn(
        name = "Last Result",
        type_ = "string",
        json_path = ".status.lastBackup.result",
        description = "Result of the last backup"
    ),
    printcolumn(
        name = "Last Backup",
        type_ = "date",
        json_path = ".status.lastBackup.startTime",
        description = "When the last backup started"
    ),
    printcolumn(
        name = "Next Backup",
        type_ = "string",
        json_path = ".status.nextBackup",
        description = "When the next scheduled backup starts"
    ),
    printcolumn(
        name = "Progress",
        type_ = "number",
        json_path = ".status.progress.percentDone",
        description = "Percent done of the backup in flight",
        priority = 1
    ),
    printcolumn(
        name = "Stage",
        type_ = "string",
        json_path = ".status.progress.stage",
        description = "Phase of the backup in flight",
        priority = 1
    ),
    printcolumn(
        name = "Snapshot",
        type_ = "string",
        json_path = ".status.lastBackup.shortSnapshotID",
        description = "Short id of the snapshot made by the last backup",
        priority = 1
    ),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp")
)]
#[serde(rename_all = "camelCase")]
pub struct ResticBackupSpec {
    /// The ResticRepository to write snapshots to. It may be in another namespace if it allows
    /// this one (`spec.allowedNamespaces` of the repository).
    pub repository_ref: RepositoryReference,
    /// When backups run, as a five-field cron expression (minute hour day-of-month month
    /// day-of-week), e.g. `0 2 * * *` for 2 AM daily, or a macro such as `@daily`.
    #[schemars(length(min = 1, max = 128))]
    #[x_kube(validation = Rule::new(SCHEDULE_RULE).message(SCHEDULE_MESSAGE))]
    pub schedule: String,
    /// IANA time zone the schedule is read in, e.g. `Europe/Berlin`. Default: UTC.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timezone: Option<String>,
    /// What to back up. Exactly one of `pvc`, `podVolumeBackup` or `customSource`.
    pub source: BackupSource,
    /// restic options: snapshot hostname, tags, extra arguments, in-snapshot path.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restic: Option<ResticOptions>,
    /// Commands run before a backup, after a successful one, and after a failed one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hooks: Option<BackupHooks>,
    /// `restic forget` (and optionally `prune`) after each successful backup, limited to this
    /// backup's snapshots (its hostname and tags). Leave it out, or set `enabled: false`, when a
    /// GlobalRetentionPolicy takes care of retention.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retention: Option<RetentionSpec>,
    /// Where to report each run's outcome. Not sent yet: accepted and validated, for a later
    /// release.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub notifications: Option<Notifications>,
    /// How runs are executed: concurrency, the run timeout, and settings of the restic process
    /// and of holder pods.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub job_config: Option<JobConfig>,
    /// Not implemented yet: no network policy is created for a backup. The Helm chart's own
    /// `networkPolicy` values restrict the operator's pods.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network_policy: Option<NetworkPolicyConfig>,
    /// Suspend scheduling (useful for maintenance). A run in flight finishes; manual triggers
    /// still run. Default: false.
    #[serde(default)]
    pub suspend: bool,
    /// Run a backup now: set to any new value (a timestamp works well) and the operator runs
    /// one backup outside the schedule, then records the value in `status.lastManualTrigger`.
    /// Setting the same value again does nothing; removing the field does nothing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub manual_trigger: Option<String>,
}

/// What a backup reads. Exactly one option must be set.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new(
    "(has(self.pvc) ? 1 : 0) + (has(self.podVolumeBackup) ? 1 : 0) + (has(self.customSource) ? 1 : 0) == 1"
).message("source must set exactly one of pvc, podVolumeBackup or customSource"))]
pub struct BackupSource {
    /// Back up a PersistentVolumeClaim of this namespace. When a running pod mounts it, the
    /// node agent reads it in place on that pod's node; otherwise the operator starts a short
    /// lived pod that mounts it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pvc: Option<PvcSource>,
    /// Back up a volume of running pods chosen by label (any volume type, including emptyDir).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_volume_backup: Option<PodVolumeSource>,
    /// Run a pod that writes the data to back up (e.g. a database dump) and back up what it
    /// wrote: the operator runs the template's containers, one after another, each with an
    /// empty volume at `backupPath`; when all have exited 0 the node agent backs that volume up
    /// (at `restic.snapshotPath`, like any source) and the pod is deleted. A container that
    /// fails fails the backup, with the end of its log in the reason.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub custom_source: Option<CustomSource>,
}

/// A PersistentVolumeClaim to back up.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PvcSource {
    /// Name of the PersistentVolumeClaim, in this namespace.
    #[schemars(length(min = 1))]
    pub claim_name: String,
    /// Paths within the volume to back up, relative to its root (`/config` and `config` both
    /// mean the volume's `config` directory). In snapshots they appear below
    /// `restic.snapshotPath`. Default: `/` (the whole volume).
    #[serde(default = "default_paths")]
    pub paths: Vec<String>,
    /// Exclude patterns (restic `--exclude`), e.g. `*.log` or `cache/**`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub excludes: Vec<String>,
}

/// A volume of running pods to back up.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PodVolumeSource {
    /// Selects the pods (labels, in this namespace). The oldest running pod that matches is used.
    pub selector: LabelSelector,
    /// Name of the volume in the pod spec (`spec.volumes[].name`).
    #[schemars(length(min = 1))]
    pub volume_name: String,
    /// Only consider pods with a container of this name that mounts the volume. Default: any
    /// container.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub container: Option<String>,
    /// Paths within the volume to back up, relative to its root. Default: `/` (the whole
    /// volume).
    #[serde(default = "default_paths")]
    pub paths: Vec<String>,
    /// Exclude patterns (restic `--exclude`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub excludes: Vec<String>,
}

/// A pod that produces the data to back up. It gets no repository credential and no
/// service-account token; host namespaces, hostPath volumes, privileged containers and added
/// capabilities are refused (InvalidSpec), as the operator, not the user, creates the pod.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct CustomSource {
    /// Template of the pod that writes the data (a Kubernetes PodTemplateSpec: `metadata` and
    /// `spec`). The operator mounts an empty volume at `backupPath` into every container and
    /// runs the containers one after another (as init containers of its pod); the backup
    /// runs when all have exited 0.
    #[schemars(schema_with = "pod_template_schema")]
    pub pod_template: PodTemplateSpec,
    /// Absolute path in the pod where the data is written, e.g. `/backup`.
    #[schemars(length(min = 1))]
    pub backup_path: String,
}

/// restic options of a backup.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct ResticOptions {
    /// Hostname recorded in snapshots (`restic backup --host`). Retention and "latest snapshot"
    /// lookups group by it. Default: `<name>.<namespace>` of this ResticBackup, so same-named
    /// backups of two namespaces sharing a repository never thin each other's snapshots. To
    /// continue the snapshot history of an old backup script, use the hostname it used.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hostname: Option<String>,
    /// Tags added to every snapshot (`restic backup --tag`). Each snapshot also carries
    /// `restic-operator/namespace=<namespace>`: the parent of a backup and what its retention
    /// removes are always snapshots of this namespace, whatever hostname and tags are set (so
    /// the first backup that continues an old script's history reads every file once).
    /// Tags hold no commas or white space and may not start with `restic-operator/`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 32), inner(length(min = 1, max = 128)))]
    #[x_kube(validation = Rule::new("self.all(t, t.matches('^[^,[:space:][:cntrl:]]+$') && !t.startsWith('restic-operator/'))")
        .message("tags may not contain commas or white space, nor start with restic-operator/ (the operator's own tags)"))]
    pub tags: Vec<String>,
    /// Further `restic backup` options, each one item written as `--flag` or `--flag=value`
    /// (`--limit-upload=512`, not two items). Allowed: `--exclude-caches`, `--one-file-system`,
    /// `--exclude-if-present=<file>`, `--exclude-larger-than=<size>`, `--exclude=<pattern>`,
    /// `--iexclude=<pattern>`, `--skip-if-unchanged`, `--read-concurrency=<n>`, `--no-scan`,
    /// `--ignore-ctime`, `--ignore-inode`, `--with-atime`, `--limit-upload=<KiB/s>`,
    /// `--limit-download=<KiB/s>`, `--pack-size=<MiB>`, `--compression=auto|off|max`,
    /// `--retry-lock=<duration>`, `--stuck-request-timeout=<duration>`, `--cleanup-cache`,
    /// `--verbose`, and backend tuning such as `--option=s3.connections=<n>`,
    /// `--option=s3.storage-class=<class>` or `--option=s3.region=<region>`. Anything else is
    /// refused by the API server and again by the node agent: positional arguments, short
    /// options, and options that run a command, read a file from the node, or change the
    /// repository, host, tags or parent.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 32), inner(length(max = 1024)))]
    #[x_kube(validation = Rule::new(args::cel_rule(&[args::Op::Backup]))
        .message(Message::Expression(args::cel_message(&[args::Op::Backup]))))]
    pub extra_args: Vec<String>,
    /// restic container image the specification's CronJobs would use. This operator runs
    /// restic inside its node agents, which ship restic 0.18; the field is kept for
    /// compatibility and is not used to pick a binary.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    /// Absolute path at which the backed-up volume appears inside snapshots. restic only
    /// recognises unchanged files at the same path as in the parent snapshot, so the operator
    /// always presents the volume at this path, whatever node or pod it is read from. To
    /// continue the incremental history of an old script that backed up a volume mounted at
    /// `/config`, set `/config` (and keep its hostname and tags). Default: `/data`.
    #[serde(default = "default_snapshot_path")]
    #[schemars(length(max = 4096))]
    #[x_kube(validation = Rule::new("self.startsWith('/') && self != '/'")
        .message("snapshotPath must be an absolute path other than /, such as /data"))]
    pub snapshot_path: String,
}

impl Default for ResticOptions {
    fn default() -> Self {
        Self {
            hostname: None,
            tags: Vec::new(),
            extra_args: Vec::new(),
            image: None,
            snapshot_path: default_snapshot_path(),
        }
    }
}

/// Hooks of a backup.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct BackupHooks {
    /// Runs before restic starts (e.g. to flush or pause an application). If it fails, the
    /// backup does not run and counts as failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pre_backup: Option<Hook>,
    /// Runs after a successful (or partially failed) backup, e.g. to resume an application.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub post_backup: Option<Hook>,
    /// Runs after a failed backup (including a failed preBackup hook).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub on_failure: Option<Hook>,
}

/// Retention applied after each successful backup.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RetentionSpec {
    /// Apply retention after each successful backup. Default: true.
    #[serde(default = "default_true")]
    pub enabled: bool,
    /// How many snapshots to keep (restic forget `--keep-*`). Default when left out: the old
    /// scripts' policy, keepLast 1, keepHourly 24, keepDaily 7, keepWeekly 4, keepMonthly 12.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy: Option<KeepPolicy>,
    /// Run `restic prune` after forget to free space (expensive on large repositories).
    /// Default: false.
    #[serde(default)]
    pub prune: bool,
    /// Snapshot properties the policy is applied per group of (`restic forget --group-by`):
    /// any of `host`, `paths`, `tags`. Default: `[host, tags]`. A backup's retention always
    /// groups by host and tags, so it never counts another backup's snapshots; list `paths` to
    /// group by paths too.
    #[serde(default = "default_group_by")]
    pub group_by: Vec<GroupBy>,
}

impl Default for RetentionSpec {
    fn default() -> Self {
        Self {
            enabled: true,
            policy: None,
            prune: false,
            group_by: default_group_by(),
        }
    }
}

impl RetentionSpec {
    /// The keep policy in force (the old scripts' policy when none is given).
    pub fn effective_policy(&self) -> KeepPolicy {
        self.policy.clone().unwrap_or_else(KeepPolicy::legacy_default)
    }
}

/// Observed state of a ResticBackup.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct ResticBackupStatus {
    /// Conditions: `Ready` (last backup succeeded and the schedule is active),
    /// `RepositoryReady`, `Progressing` (a backup runs), `Degraded` (last backup failed or
    /// partially failed).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["type".into()]))]
    pub conditions: Vec<Condition>,
    /// `metadata.generation` of the spec this status was computed from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// The most recent finished backup.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_backup: Option<BackupRun>,
    /// When the last successful backup started.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_successful_backup: Option<Time>,
    /// When the next scheduled backup starts (absent while suspended).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_backup: Option<Time>,
    /// The scheduled time of the most recent scheduled run the operator started; runs due
    /// before it are never started again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_schedule_time: Option<Time>,
    /// Counters over all runs of this ResticBackup.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub statistics: Option<BackupStatistics>,
    /// When retention (`spec.retention`) last ran.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_retention_run: Option<Time>,
    /// Snapshots of this backup left after the last retention run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshots_after_retention: Option<i64>,
    /// Snapshots the last retention run removed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshots_removed_by_retention: Option<i64>,
    /// The object doing this backup's work. The specification's operator made a CronJob; this
    /// one dispatches runs to its node agents, so this refers to the pod that runs (or last
    /// ran) the work: the node agent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cron_job_ref: Option<ObjectReference>,
    /// The `spec.manualTrigger` value the operator last acted on. When it equals the spec's
    /// value, the manual backup has been started.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_manual_trigger: Option<String>,
    /// The backup in flight, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub active_run: Option<ActiveRun>,
    /// Live progress of the backup in flight.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub progress: Option<Progress>,
}

/// One finished backup run.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct BackupRun {
    /// Id of the run.
    #[serde(default, skip_serializing_if = "Option::is_none", rename = "runID")]
    pub run_id: Option<String>,
    /// What started the run: `Schedule` or `Manual`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trigger: Option<RunTrigger>,
    /// When the run started.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_time: Option<Time>,
    /// When the run finished.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub completion_time: Option<Time>,
    /// How long the run took, e.g. `5m30s`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub duration: Option<String>,
    /// Id of the snapshot the run made.
    #[serde(default, skip_serializing_if = "Option::is_none", rename = "snapshotID")]
    pub snapshot_id: Option<String>,
    /// The snapshot's short id, as restic prints it (its first 8 characters), which restic
    /// commands accept in place of the full id.
    #[serde(default, skip_serializing_if = "Option::is_none", rename = "shortSnapshotID")]
    pub short_snapshot_id: Option<String>,
    /// Id of the snapshot restic compared against: the snapshot this backup last made on the
    /// same node. Empty when restic chose it itself (the first backup on a node, or after the
    /// node's record was lost): then the latest snapshot with this backup's host, paths and
    /// tags, or none.
    #[serde(default, skip_serializing_if = "Option::is_none", rename = "parentSnapshotID")]
    pub parent_snapshot_id: Option<String>,
    /// `Succeeded`, `Failed`, or `PartiallyFailed` (a snapshot was made but some files could not
    /// be read; see `failedPaths`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result: Option<RunResult>,
    /// What happened, for a person (the error on failure).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// Files restic could not read (the first 100; the message says how many in all).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub failed_paths: Vec<String>,
    /// Files new in this snapshot.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub files_new: Option<i64>,
    /// Files changed since the parent snapshot.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub files_changed: Option<i64>,
    /// Files unchanged since the parent snapshot.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub files_unmodified: Option<i64>,
    /// Data added to the repository by this run, for people, e.g. `12.5 MiB`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data_added: Option<String>,
    /// Data added to the repository by this run, in bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data_added_bytes: Option<i64>,
}

/// Counters over all runs of a ResticBackup.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct BackupStatistics {
    /// Runs finished, whatever their result.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub total_backups: Option<i64>,
    /// Runs that succeeded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub successful_backups: Option<i64>,
    /// Runs that failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failed_backups: Option<i64>,
    /// Runs that made a snapshot but could not read some files.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub partially_failed_backups: Option<i64>,
    /// Size of the data the last backup covered, for people, e.g. `2.3 GiB`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_backup_size: Option<String>,
    /// Size of the data the last backup covered, in bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_backup_size_bytes: Option<i64>,
    /// Number of files the last backup covered.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_backup_files: Option<i64>,
}

impl ResticBackup {
    /// Hostname recorded in snapshots: `spec.restic.hostname`, or `<name>.<namespace>`.
    /// Namespaces hold no dots, so the last dot always separates the two.
    pub fn effective_hostname(&self) -> String {
        self.spec
            .restic
            .as_ref()
            .and_then(|r| r.hostname.clone())
            .filter(|h| !h.is_empty())
            .unwrap_or_else(|| format!("{}.{}", self.name_any(), self.namespace().unwrap_or_default()))
    }

    /// Tags recorded in snapshots: `spec.restic.tags` and the namespace tag
    /// (`restic-operator/namespace=<namespace>`), which parent selection and retention require.
    pub fn snapshot_tags(&self) -> Vec<String> {
        let mut tags = self
            .spec
            .restic
            .as_ref()
            .map(|r| r.tags.clone())
            .unwrap_or_default();
        tags.push(format!(
            "{}{}",
            restic_operator_args::NAMESPACE_TAG_PREFIX,
            self.namespace().unwrap_or_default()
        ));
        tags
    }

    /// Absolute path at which the volume appears inside snapshots.
    pub fn snapshot_path(&self) -> &str {
        self.spec
            .restic
            .as_ref()
            .map_or(DEFAULT_SNAPSHOT_PATH, |r| r.snapshot_path.as_str())
    }

    /// Retention to apply after each backup, if enabled.
    pub fn active_retention(&self) -> Option<&RetentionSpec> {
        self.spec.retention.as_ref().filter(|r| r.enabled)
    }

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

    fn backup(spec_yaml: &str) -> ResticBackup {
        let mut b = ResticBackup::new("emby-config", serde_yaml::from_str(spec_yaml).unwrap());
        b.metadata.namespace = Some("media".into());
        b
    }

    const MINIMAL: &str = "
repositoryRef: {name: repo}
schedule: '0 2 * * *'
source: {pvc: {claimName: data}}
";

    #[test]
    fn hostname_defaults_to_the_resource_name_and_namespace() {
        assert_eq!(backup(MINIMAL).effective_hostname(), "emby-config.media");
    }

    #[test]
    fn every_snapshot_carries_the_namespace_tag_after_the_users_tags() {
        let b = backup(&format!("{MINIMAL}restic: {{tags: [emby, media]}}"));
        assert_eq!(
            b.snapshot_tags(),
            ["emby", "media", "restic-operator/namespace=media"]
        );
    }

    #[test]
    fn hostname_comes_from_restic_options_when_set() {
        let b = backup(&format!("{MINIMAL}restic: {{hostname: emby}}"));
        assert_eq!(b.effective_hostname(), "emby");
    }

    #[test]
    fn snapshot_path_defaults_to_data() {
        assert_eq!(backup(MINIMAL).snapshot_path(), "/data");
        assert_eq!(
            backup(&format!("{MINIMAL}restic: {{tags: [a]}}")).snapshot_path(),
            "/data"
        );
        assert_eq!(
            backup(&format!("{MINIMAL}restic: {{snapshotPath: /config}}")).snapshot_path(),
            "/config"
        );
    }

    #[test]
    fn pvc_paths_default_to_the_whole_volume() {
        let b = backup(MINIMAL);
        assert_eq!(b.spec.source.pvc.unwrap().paths, ["/"]);
    }

    #[test]
    fn retention_defaults_to_the_old_scripts_policy_grouped_by_host_and_tags() {
        let b = backup(&format!("{MINIMAL}retention: {{}}"));
        let retention = b.active_retention().unwrap();
        assert!(!retention.prune);
        assert_eq!(retention.effective_policy(), KeepPolicy::legacy_default());
        assert_eq!(retention.group_by, [GroupBy::Host, GroupBy::Tags]);
    }

    #[test]
    fn disabled_retention_is_not_active() {
        let b = backup(&format!("{MINIMAL}retention: {{enabled: false}}"));
        assert!(b.active_retention().is_none());
        assert!(backup(MINIMAL).active_retention().is_none());
    }

    #[test]
    fn a_new_manual_trigger_is_pending_until_recorded_in_status() {
        let mut b = backup(&format!("{MINIMAL}manualTrigger: '2024-01-15T12:00:00Z'"));
        assert_eq!(b.pending_manual_trigger(), Some("2024-01-15T12:00:00Z"));
        b.status = Some(ResticBackupStatus {
            last_manual_trigger: Some("2024-01-15T12:00:00Z".into()),
            ..Default::default()
        });
        assert_eq!(b.pending_manual_trigger(), None);
        assert_eq!(backup(MINIMAL).pending_manual_trigger(), None);
    }

    #[test]
    fn concurrency_policy_defaults_to_forbid() {
        let b = backup(&format!("{MINIMAL}jobConfig: {{backoffLimit: 1}}"));
        assert_eq!(
            b.spec.job_config.unwrap().concurrency_policy,
            crate::ConcurrencyPolicy::Forbid
        );
    }
}
