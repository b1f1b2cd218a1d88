//! `ResticRepository`: where snapshots live (a restic repository URL and the Secret with its
//! password and storage credentials), how often its integrity is checked, the cache the agents
//! keep for it, and which namespaces may back up into it. Status carries readiness, integrity
//! check results and repository statistics.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::{
    api::resource::Quantity,
    apis::meta::v1::{LabelSelector, Time},
};
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::common::{
    ActiveRun, Condition, SCHEDULE_MESSAGE, SCHEDULE_RULE, SecretReference, default_true,
    label_selector_matches,
};

/// A restic repository that ResticBackups, ResticRestores and GlobalRetentionPolicies use.
// Each `printcolumn(...)` repeats the keys `type_`, `priority`, ...; clippy reads that as
// duplicated attributes.
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[kube(
    group = "backup.resticbackup.io",
    version = "v1alpha1",
    kind = "ResticRepository",
    namespaced,
    status = "ResticRepositoryStatus",
    shortname = "rrepo",
    category = "restic",
    doc = "A restic repository (S3, SFTP, REST server, ...) that backups write snapshots to. The operator initializes it when it is empty, checks its integrity on a schedule and reports its statistics.",
    printcolumn(
        name = "Ready",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].status",
        description = "Whether the repository is initialized and accessible"
    ),
    printcolumn(
        name = "Snapshots",
        type_ = "integer",
        json_path = ".status.statistics.snapshotCount",
        description = "Number of snapshots in the repository"
    ),
    printcolumn(
        name = "Size",
        type_ = "string",
        json_path = ".status.statistics.totalSize",
        description = "Size of the repository's data"
    ),
    printcolumn(
        name = "Last Check",
        type_ = "string",
        json_path = ".status.lastIntegrityCheckResult",
        description = "Result of the last integrity check",
        priority = 1
    ),
    printcolumn(
        name = "URL",
        type_ = "string",
        json_path = ".spec.repositoryURL",
        description = "Repository URL",
        priority = 1
    ),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp")
)]
#[serde(rename_all = "camelCase")]
pub struct ResticRepositorySpec {
    /// restic repository URL, as given to `restic -r`: `s3:<host>/<bucket>[/<prefix>]`,
    /// `rest:https://host/`, `b2:`, `azure:`, `gs:` or `swift:`. `sftp:user@host:/path` and
    /// `rclone:remote:path` run ssh or rclone on the node, and node agents refuse them unless
    /// started with `--allow-program-backends`; `local:/path` is refused unless the path is below
    /// a directory the agents allow with `--allow-local-repository-dir`.
    #[serde(rename = "repositoryURL")]
    #[schemars(length(min = 1, max = 2048))]
    #[x_kube(validation = Rule::new("self.matches('^(s3|rest|b2|azure|gs|swift|sftp|rclone|local):[^[:cntrl:]]+$')")
        .message("repositoryURL must name a restic backend (s3:, rest:, b2:, azure:, gs:, swift:, sftp:, rclone: or local:) and hold no control characters"))]
    pub repository_url: String,
    /// Secret (in this namespace) with the repository credentials: `RESTIC_PASSWORD` (required),
    /// and what the backend needs as environment variables, e.g. `AWS_ACCESS_KEY_ID` and
    /// `AWS_SECRET_ACCESS_KEY` for S3, plus proxy variables. Keys that are not restic backend
    /// settings, or that name a file or a program (`*_FILE`, `*_COMMAND`,
    /// `GOOGLE_APPLICATION_CREDENTIALS`, ...), are left out with a `SecretKeysIgnored` warning
    /// event; `RESTIC_REPOSITORY`, if present, must equal `repositoryURL`.
    pub credentials_secret_ref: SecretReference,
    /// Periodic `restic check` of the repository.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub integrity_check: Option<IntegrityCheck>,
    /// restic cache the node agents keep for this repository.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache: Option<CacheConfig>,
    /// Namespaces whose ResticBackups, ResticRestores and GlobalRetentionPolicies may use this
    /// repository, besides its own namespace (which always may). A namespace is allowed when it
    /// is in `names` or its labels match `selector`. Default: only the repository's namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allowed_namespaces: Option<AllowedNamespaces>,
}

/// Periodic repository integrity check (`restic check`).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("!self.enabled || has(self.schedule)")
    .message("integrityCheck.schedule is required when integrity checks are enabled"))]
pub struct IntegrityCheck {
    /// Whether checks run on the schedule. Default: true (remove the block or set false to stop).
    #[serde(default = "default_true")]
    pub enabled: bool,
    /// When checks run, as a five-field cron expression (e.g. `0 3 * * 0`: Sundays at 3 AM).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 128))]
    #[x_kube(validation = Rule::new(SCHEDULE_RULE).message(SCHEDULE_MESSAGE))]
    pub schedule: Option<String>,
    /// IANA time zone the schedule is read in, e.g. `Europe/Berlin`. Default: UTC.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timezone: Option<String>,
    /// Also read and verify this share of the pack files (`restic check --read-data-subset`),
    /// e.g. `5%`, `1/10` or `2G`. Default: only the structure is checked.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub read_data_subset: Option<String>,
    /// Run a check now: set to any new value (a timestamp works well) and the operator runs one
    /// check, then records the value in `status.lastManualTrigger`. Works even when `enabled`
    /// is false.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub manual_trigger: Option<String>,
}

/// restic cache settings.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct CacheConfig {
    /// Whether backups and restores use restic's local cache of repository metadata, kept by
    /// each node agent in its state directory across runs (much faster runs on large
    /// repositories). When false, restic runs with `--no-cache`. A restore reads the cache but
    /// never changes it: what restic fetches besides goes to a layer of the restore's own,
    /// removed with it. Maintenance (forget, check, stats) runs without it. A cache no run
    /// used for 30 days is removed. Default: true.
    #[serde(default = "default_true")]
    pub enabled: bool,
    /// Size limit of the cache on each node, e.g. `5Gi` (suffixes k, M, G, T, P, Ki, Mi, Gi,
    /// Ti, Pi). After each run that used the cache, the agent removes its oldest files until
    /// it fits; restic fetches what it misses from the repository. Unset: no limit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size: Option<Quantity>,
    /// StorageClass of a cache volume. Not used yet: the cache lives in the node agent's state
    /// directory.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub storage_class_name: Option<String>,
}

/// Namespaces allowed to use a repository besides its own.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AllowedNamespaces {
    /// Names of allowed namespaces.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub names: Vec<String>,
    /// Label selector over namespaces; matching namespaces are allowed. An empty selector (`{}`)
    /// allows every namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<LabelSelector>,
}

/// Result of a repository integrity check: `Passed` or `Failed`.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum IntegrityCheckResult {
    // restic check found no errors.
    Passed,
    // restic check found errors (or could not run).
    Failed,
}

/// Observed state of a ResticRepository.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct ResticRepositoryStatus {
    /// Conditions: `Ready` (initialized and accessible), `IntegrityCheckSucceeded`,
    /// `IntegrityCheckFailed`, `Progressing` (a check runs), `Degraded`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["type".into()]))]
    pub conditions: Vec<Condition>,
    /// `metadata.generation` of the spec this status was computed from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// When the last integrity check ran.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_integrity_check: Option<Time>,
    /// Result of the last integrity check: `Passed` or `Failed`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_integrity_check_result: Option<IntegrityCheckResult>,
    /// When the last integrity check that passed ran.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_successful_integrity_check: Option<Time>,
    /// When the next scheduled integrity check runs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_integrity_check: Option<Time>,
    /// Repository statistics (from `restic stats` and `restic snapshots`), refreshed about
    /// hourly and after each run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub statistics: Option<RepositoryStatistics>,
    /// The `spec.integrityCheck.manualTrigger` value the operator last acted on. When it equals
    /// the spec's value, the manual check has been started.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_manual_trigger: Option<String>,
    /// The integrity check in flight, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub active_run: Option<ActiveRun>,
}

/// Repository statistics.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RepositoryStatistics {
    /// Size of the repository's data for people, e.g. `125.6 GiB`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub total_size: Option<String>,
    /// Size of the repository's data in bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub total_size_bytes: Option<i64>,
    /// Number of files across all snapshots (`restic stats` file count).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub total_file_count: Option<i64>,
    /// Number of snapshots in the repository.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshot_count: Option<i64>,
    /// When these statistics were gathered.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub update_time: Option<Time>,
}

impl ResticRepository {
    /// Whether an object in `namespace` (whose labels are `namespace_labels`) may use this
    /// repository: its own namespace always may; others only when `spec.allowedNamespaces`
    /// lists them by name or selects them by label.
    pub fn allows_namespace(&self, namespace: &str, namespace_labels: &BTreeMap<String, String>) -> bool {
        if self.metadata.namespace.as_deref() == Some(namespace) {
            return true;
        }
        let Some(allowed) = &self.spec.allowed_namespaces else {
            return false;
        };
        allowed.names.iter().any(|n| n == namespace)
            || allowed
                .selector
                .as_ref()
                .is_some_and(|s| label_selector_matches(s, namespace_labels))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

    fn repository(allowed: Option<AllowedNamespaces>) -> ResticRepository {
        ResticRepository {
            metadata: ObjectMeta {
                name: Some("repo".into()),
                namespace: Some("backup-system".into()),
                ..Default::default()
            },
            spec: ResticRepositorySpec {
                repository_url: "s3:example/bucket".into(),
                credentials_secret_ref: SecretReference { name: "creds".into() },
                integrity_check: None,
                cache: None,
                allowed_namespaces: allowed,
            },
            status: None,
        }
    }

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn by_default_only_the_repository_namespace_may_use_it() {
        let repo = repository(None);
        assert!(repo.allows_namespace("backup-system", &labels(&[])));
        assert!(!repo.allows_namespace("media", &labels(&[])));
    }

    #[test]
    fn listed_namespaces_may_use_the_repository() {
        let repo = repository(Some(AllowedNamespaces {
            names: vec!["media".into()],
            selector: None,
        }));
        assert!(repo.allows_namespace("media", &labels(&[])));
        assert!(!repo.allows_namespace("games", &labels(&[])));
    }

    #[test]
    fn namespaces_selected_by_label_may_use_the_repository() {
        let selector = LabelSelector {
            match_labels: Some(labels(&[("backup", "enabled")])),
            ..Default::default()
        };
        let repo = repository(Some(AllowedNamespaces {
            names: vec![],
            selector: Some(selector),
        }));
        assert!(repo.allows_namespace("media", &labels(&[("backup", "enabled")])));
        assert!(!repo.allows_namespace("games", &labels(&[("backup", "disabled")])));
    }

    #[test]
    fn an_empty_selector_allows_every_namespace() {
        let repo = repository(Some(AllowedNamespaces {
            names: vec![],
            selector: Some(LabelSelector::default()),
        }));
        assert!(repo.allows_namespace("anything", &labels(&[])));
    }
}
