//! `ResticRestore`: a one-shot restore of a snapshot (chosen by id or by selector) of a
//! ResticBackup's repository into an existing PVC or a new one, with a safe default restore mode
//! and pre/post hooks. Status follows the phases Pending → InProgress → Completed / Failed.

use k8s_openapi::apimachinery::pkg::{api::resource::Quantity, apis::meta::v1::Time};
use kube::{CustomResource, KubeSchema};
use restic_operator_args as args;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::common::{
    ActiveRun, Condition, Hook, LocalObjectReference, ObjectReference, Progress, RepositoryReference,
    default_true,
};

fn default_target_path() -> String {
    "/".to_owned()
}

fn default_access_modes() -> Vec<AccessMode> {
    vec![AccessMode::ReadWriteOnce]
}

/// A one-shot restore of a restic snapshot into a PVC: the snapshot is resolved and recorded in
/// status, the hooks run around the data movement, and the node agent of a pod that mounts the
/// claim (or of a short-lived holder pod) restores it. It runs once; a finished restore is final.
// Each `printcolumn(...)` repeats the keys `type_`, `priority`, ...; clippy reads that as
// duplicated attributes.
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[kube(
    group = "backup.resticbackup.io",
    version = "v1alpha1",
    kind = "ResticRestore",
    namespaced,
    status = "ResticRestoreStatus",
    shortname = "rrestore",
    category = "restic",
    doc = "A one-shot restore of a restic snapshot into an existing or a new PVC. It runs once; the spec cannot change once it has started.",
    printcolumn(
        name = "Phase",
        type_ = "string",
        json_path = ".status.phase",
        description = "Pending, InProgress, Completed or Failed"
    ),
    printcolumn(
        name = "Snapshot",
        type_ = "string",
        json_path = ".status.restoredSnapshot",
        description = "Snapshot being or that was restored"
    ),
    printcolumn(
        name = "Progress",
        type_ = "number",
        json_path = ".status.progress.percentDone",
        description = "Percent done"
    ),
    printcolumn(
        name = "Backup",
        type_ = "string",
        json_path = ".spec.backupRef.name",
        description = "ResticBackup restored from",
        priority = 1
    ),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp"),
    validation = Rule::new("!has(oldSelf.status) || !has(oldSelf.status.phase) || oldSelf.status.phase == 'Pending' || self.spec == oldSelf.spec")
        .message("a restore's spec cannot change once it has started; create a new ResticRestore")
)]
#[x_kube(
    validation = Rule::new("!(has(self.snapshotID) && has(self.snapshotSelector))")
        .message("set either snapshotID or snapshotSelector, not both"),
    validation = Rule::new("has(self.backupRef) != has(self.repositoryRef)")
        .message("set exactly one of backupRef or repositoryRef")
)]
#[serde(rename_all = "camelCase")]
pub struct ResticRestoreSpec {
    /// The ResticBackup (in this namespace) whose repository, hostname and tags the snapshot is
    /// looked up with.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backup_ref: Option<LocalObjectReference>,
    /// Restore from this repository directly, for when no ResticBackup exists (for example
    /// when rebuilding a cluster). Use instead of `backupRef`; `snapshotSelector.hostname` then
    /// picks the backup's snapshots.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub repository_ref: Option<RepositoryReference>,
    /// Id (full or short) of the snapshot to restore, or `latest`. Set this or
    /// `snapshotSelector`, not both. Default (neither set): the latest snapshot of the
    /// referenced backup (its hostname and tags).
    #[serde(default, skip_serializing_if = "Option::is_none", rename = "snapshotID")]
    pub snapshot_id: Option<String>,
    /// Choose the snapshot by its properties instead of by id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshot_selector: Option<SnapshotSelector>,
    /// Where to restore to. Exactly one of `pvc` or `newPVC`.
    pub target: RestoreTarget,
    /// Paths to restore, relative to the backed-up volume (as in the backup's `source.pvc.paths`),
    /// e.g. `/config`. Default: everything. Not together with `excludePaths`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64))]
    pub include_paths: Vec<String>,
    /// Patterns of paths not to restore (restic `--exclude`), e.g. `*.log`. restic restores
    /// with include or exclude patterns, not both: a restore that sets both fails with InvalidSpec.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64))]
    pub exclude_paths: Vec<String>,
    /// How to treat existing files in the target, and verification.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub options: Option<RestoreOptions>,
    /// Commands run before and after the restore (e.g. stop and start the application).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hooks: Option<RestoreHooks>,
}

/// Chooses a snapshot by its properties. All given properties must match.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SnapshotSelector {
    /// Take the newest matching snapshot. When false, exactly one snapshot must match, otherwise
    /// the restore fails. Default: true.
    #[serde(default = "default_true")]
    pub latest: bool,
    /// Only snapshots that have all of these tags. Default: the referenced backup's tags.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tags: Vec<String>,
    /// Only snapshots of this hostname. Default: the referenced backup's hostname.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hostname: Option<String>,
    /// Only snapshots taken before this time, e.g. `2024-01-15T00:00:00Z`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub before: Option<Time>,
}

/// Where a restore writes. Exactly one option must be set.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("(has(self.pvc) ? 1 : 0) + (has(self.newPVC) ? 1 : 0) == 1")
    .message("target must set exactly one of pvc or newPVC"))]
pub struct RestoreTarget {
    /// Restore into an existing PersistentVolumeClaim of this namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pvc: Option<TargetPvc>,
    /// Create a new PersistentVolumeClaim in this namespace and restore into it.
    #[serde(default, skip_serializing_if = "Option::is_none", rename = "newPVC")]
    pub new_pvc: Option<NewPvc>,
}

/// An existing PVC to restore into.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TargetPvc {
    /// Name of the PersistentVolumeClaim, in this namespace.
    #[schemars(length(min = 1))]
    pub claim_name: String,
    /// Directory within the volume to restore into; the backed-up volume's content lands below
    /// it. Set a subdirectory (e.g. `/restored`) to restore next to the live data instead of over
    /// it; the safety check of `options.mode: IfEmpty` then only looks at that directory.
    /// Default: `/` (the volume root).
    #[serde(default = "default_target_path")]
    pub path: String,
}

/// Access mode of a new PVC.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum AccessMode {
    // Read-write by a single node.
    ReadWriteOnce,
    // Read-only by many nodes.
    ReadOnlyMany,
    // Read-write by many nodes.
    ReadWriteMany,
    // Read-write by a single pod.
    ReadWriteOncePod,
}

/// A new PVC to create and restore into.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct NewPvc {
    /// Name of the PersistentVolumeClaim to create. The restore fails if it already exists.
    #[schemars(length(min = 1))]
    pub name: String,
    /// StorageClass of the new PVC. Default: the cluster's default StorageClass.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub storage_class_name: Option<String>,
    /// Access modes of the new PVC. Default: `[ReadWriteOnce]`.
    #[serde(default = "default_access_modes")]
    pub access_modes: Vec<AccessMode>,
    /// Requested size, e.g. `50Gi`.
    pub size: Quantity,
    /// Whether the new claim belongs to the restore: deleting the ResticRestore then deletes
    /// the claim and its data. Set false to keep the claim (and what was restored into it)
    /// whatever happens to the restore. Default: true.
    #[serde(default = "default_true")]
    pub owned_by_restore: bool,
}

/// What a restore does with files already in the target.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum RestoreMode {
    // Restore only into an empty target directory; refuse otherwise.
    #[default]
    IfEmpty,
    // Overwrite files that exist in the snapshot; keep other files.
    Overwrite,
    // Make the target an exact copy of the snapshot: overwrite, and delete files not in it.
    Mirror,
}

/// Restore options.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("!has(self.mode) || !has(self.overwrite) || self.overwrite == (self.mode != 'IfEmpty')")
    .message("options.overwrite and options.mode disagree: overwrite: true goes with mode Overwrite or Mirror, overwrite: false with mode IfEmpty; set only mode"))]
pub struct RestoreOptions {
    /// What to do with files already in the target directory: `IfEmpty` (restore only into an
    /// empty directory, refuse otherwise; the safe default), `Overwrite` (replace files that are
    /// in the snapshot, keep the others) or `Mirror` (make the directory an exact copy of the
    /// snapshot, deleting files that are not in it). To restore next to existing data, set
    /// `target.pvc.path` to a new subdirectory. Default: `Overwrite` when `overwrite` is true,
    /// otherwise `IfEmpty`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<RestoreMode>,
    /// Overwrite existing files: the specification's switch, the same as `mode: Overwrite`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub overwrite: Option<bool>,
    /// Verify the restored files against the snapshot after restoring (`restic restore
    /// --verify`). Default: false.
    #[serde(default)]
    pub verify: bool,
    /// Path inside the snapshot that corresponds to the target directory. Default: the
    /// referenced backup's `restic.snapshotPath`, or `/data` with `repositoryRef`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshot_path: Option<String>,
    /// Extra `restic restore` options, one per item as `--flag` or `--flag=value`, from an
    /// allow-list such as `--limit-download=<KiB/s>`, `--option=s3.connections=<n>` or
    /// `--verbose`. Anything else is refused by the API server and again by the node agent.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 32), inner(length(max = 1024)))]
    #[x_kube(validation = Rule::new(args::cel_rule(&[args::Op::Restore]))
        .message(Message::Expression(args::cel_message(&[args::Op::Restore]))))]
    pub extra_args: Vec<String>,
}

impl RestoreOptions {
    /// The restore mode in force: `mode` if set, else `Overwrite` for `overwrite: true`, else
    /// `IfEmpty`.
    pub fn effective_mode(&self) -> RestoreMode {
        match (self.mode, self.overwrite) {
            (Some(mode), _) => mode,
            (None, Some(true)) => RestoreMode::Overwrite,
            (None, _) => RestoreMode::IfEmpty,
        }
    }
}

/// Hooks of a restore.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RestoreHooks {
    /// Runs before restic restores (e.g. stop the application). If it fails, nothing is
    /// restored and the restore fails.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pre_restore: Option<Hook>,
    /// Runs after the restore, whether it succeeded or not (e.g. start the application again).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub post_restore: Option<Hook>,
}

/// Phase of a restore: `Pending`, `InProgress`, `Completed` or `Failed`.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum RestorePhase {
    // Accepted, not started yet.
    Pending,
    // Hooks or restic are running.
    InProgress,
    // Finished successfully.
    Completed,
    // Finished unsuccessfully; see the Complete condition.
    Failed,
}

impl RestorePhase {
    /// Whether the restore has ended (successfully or not).
    pub fn is_finished(self) -> bool {
        matches!(self, RestorePhase::Completed | RestorePhase::Failed)
    }
}

/// Observed state of a ResticRestore.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct ResticRestoreStatus {
    /// Conditions: `Complete` (True when done, False when failed), `RepositoryReady`,
    /// `Progressing`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["type".into()]))]
    pub conditions: Vec<Condition>,
    /// `metadata.generation` of the spec this status was computed from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// `Pending`, `InProgress`, `Completed` or `Failed`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<RestorePhase>,
    /// When the restore started.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_time: Option<Time>,
    /// When the restore finished.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub completion_time: Option<Time>,
    /// Id of the snapshot being or that was restored (set once the snapshot is resolved,
    /// before any data moves).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restored_snapshot: Option<String>,
    /// When the restored snapshot was taken.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshot_time: Option<Time>,
    /// Number of files restored.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restored_files: Option<i64>,
    /// Size of the restored data, for people, e.g. `2.3 GiB`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restored_size: Option<String>,
    /// Size of the restored data in bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restored_size_bytes: Option<i64>,
    /// Files deleted from the target because they were not in the snapshot (`mode: Mirror`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deleted_files: Option<i64>,
    /// Whether `options.verify` found the restored files identical to the snapshot.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub verified: Option<bool>,
    /// What happened, for a person (the error on failure).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// The pod doing the restore. The specification's operator made a Job; this one sends the
    /// restore to the node agent of the claim's node, and this names that agent's pod.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub job_ref: Option<ObjectReference>,
    /// The restore run in flight, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub active_run: Option<ActiveRun>,
    /// Live progress of the restore.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub progress: Option<Progress>,
}

impl ResticRestore {
    /// The restore mode in force (see [`RestoreOptions::effective_mode`]).
    pub fn effective_mode(&self) -> RestoreMode {
        self.spec
            .options
            .as_ref()
            .map(RestoreOptions::effective_mode)
            .unwrap_or_default()
    }

    /// Whether the restore has ended; a finished restore is never run again.
    pub fn is_finished(&self) -> bool {
        self.status
            .as_ref()
            .and_then(|s| s.phase)
            .is_some_and(RestorePhase::is_finished)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn options(mode: Option<RestoreMode>, overwrite: Option<bool>) -> RestoreOptions {
        RestoreOptions {
            mode,
            overwrite,
            ..Default::default()
        }
    }

    #[test]
    fn restores_refuse_non_empty_targets_unless_told_otherwise() {
        assert_eq!(options(None, None).effective_mode(), RestoreMode::IfEmpty);
        assert_eq!(options(None, Some(false)).effective_mode(), RestoreMode::IfEmpty);
    }

    #[test]
    fn overwrite_true_means_overwrite_mode_when_mode_is_unset() {
        assert_eq!(options(None, Some(true)).effective_mode(), RestoreMode::Overwrite);
    }

    #[test]
    fn an_explicit_mode_wins() {
        assert_eq!(
            options(Some(RestoreMode::Mirror), Some(true)).effective_mode(),
            RestoreMode::Mirror
        );
        assert_eq!(
            options(Some(RestoreMode::IfEmpty), None).effective_mode(),
            RestoreMode::IfEmpty
        );
    }

    #[test]
    fn a_restore_without_options_uses_if_empty() {
        let spec: ResticRestoreSpec =
            serde_yaml::from_str("backupRef: {name: b}\ntarget: {pvc: {claimName: data}}").unwrap();
        let restore = ResticRestore::new("r", spec);
        assert_eq!(restore.effective_mode(), RestoreMode::IfEmpty);
        assert_eq!(restore.spec.target.pvc.as_ref().unwrap().path, "/");
        assert!(!restore.is_finished());
    }
}
