//! Settings of the pods and processes that do a backup's work (the specification's `jobConfig`,
//! with its `ConcurrencyPolicy`) and of its network policy.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{Affinity, PodSecurityContext, ResourceRequirements, Toleration};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::defaults::{default_true, free_form_object_list_schema};

/// What happens when a run is due while the previous one is still running.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum ConcurrencyPolicy {
    // Wait for the running run to end, then start the new one (if still within the starting
    // deadline; otherwise that run is skipped). Runs never overlap.
    Allow,
    // Skip the new run; the running one continues (the default).
    #[default]
    Forbid,
    // Stop the running run and start the new one.
    Replace,
}

/// How the operator runs the work of a backup. The operator runs restic in its per-node agent
/// rather than in CronJobs; these settings keep the specification's names. They apply to the
/// restic process of a backup (`activeDeadlineSeconds`, `resources.limits.memory`,
/// `securityContext.runAsUser` and `runAsGroup`) and to holder pods, which only keep mounted a
/// claim no running pod mounts so that a node agent can read it (`nodeSelector`,
/// `tolerations`, `affinity`). Hook Job pods do not use them.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct JobConfig {
    /// What happens when a run is due while the previous one still runs. Runs never overlap.
    /// `Allow`: the new run waits and starts when the running one ends, if that is within the
    /// starting deadline (otherwise it is skipped). `Forbid`: the new run is skipped.
    /// `Replace`: the running one is cancelled and the new one starts. Default: `Forbid`.
    #[serde(default)]
    pub concurrency_policy: ConcurrencyPolicy,
    /// Not used. Holder pods are deleted after each run, hook Jobs 24 hours after they finish;
    /// the record of the last run is `status.lastBackup`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0))]
    pub successful_jobs_history_limit: Option<i32>,
    /// Not used. Holder pods are deleted after each run, hook Jobs 24 hours after they finish;
    /// the record of the last run is `status.lastBackup`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0))]
    pub failed_jobs_history_limit: Option<i32>,
    /// Maximum duration of the restic backup of one attempt of a run, in seconds; a backup still
    /// going after that is stopped and counted as failed (and not retried). Default: the
    /// coordinator's `--run-timeout` (24h).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub active_deadline_seconds: Option<i64>,
    /// How many times the backup of a failed run is tried again before the run counts as
    /// failed. Default: 0, no retry. A retry finds the source again (the running pod, or the
    /// run's holder pod) and sends the backup after 10 s, 20 s, 40 s ... (at most 5 min), in the
    /// same run; hooks run once per run, `preBackup` before the first attempt and `postBackup`
    /// or `onFailure` after the last. Retried: nothing could be sent (no pod mounts the volume
    /// yet, the holder pod did not start, no agent serves the node), or restic ended failed
    /// (the repository unreachable or locked, restic's own error, out of memory). Never
    /// retried, so that a run makes at most one snapshot: a run whose agent stopped answering
    /// or lost it (it may still be going on there), or restarted during it. Not retried either:
    /// a refused run, a failed hook, a wrong password, a missing repository, an invalid
    /// request, a cancelled run, an empty snapshot of a non-empty volume, a hostPath volume, a
    /// backup stopped at `activeDeadlineSeconds` while it was still working.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0))]
    pub backoff_limit: Option<i32>,
    /// Only `runAsUser` and `runAsGroup` are used: the restic process of a backup runs as that
    /// user and group inside the node agent's sandbox. Unset: restic runs as root in the
    /// sandbox. Holder pods always run as 65535 with every capability dropped; hook Job pods do
    /// not use this.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub security_context: Option<PodSecurityContext>,
    /// Only `limits.memory` is used: it caps the memory of the restic process of a backup (its
    /// cgroup on the node). Holder pods have small fixed requests and limits.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceRequirements>,
    /// Node selector of the holder pods of this backup. (Runs on volumes mounted by a running
    /// pod happen on that pod's node.)
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_selector: Option<BTreeMap<String, String>>,
    /// Tolerations of the holder pods of this backup.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tolerations: Option<Vec<Toleration>>,
    /// Affinity of the holder pods of this backup.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub affinity: Option<Affinity>,
    /// Not used. No ServiceAccount is created; holder pods mount no service-account token.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service_account_name: Option<String>,
}

/// Not implemented yet: no network policy is created for a backup. The Helm chart's own
/// `networkPolicy` values restrict the operator's pods (coordinator and node agents, which run
/// restic).
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct NetworkPolicyConfig {
    /// Not implemented yet: no policy is created.
    #[serde(default = "default_true")]
    pub enabled: bool,
    /// Further CiliumNetworkPolicy egress rules (objects of `spec.egress`). Not implemented yet:
    /// accepted and not used.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(schema_with = "free_form_object_list_schema")]
    pub additional_egress: Vec<serde_json::Value>,
}
