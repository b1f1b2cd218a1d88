//! Types shared by the four kinds: object references, the restic retention policy (`KeepPolicy`),
//! hooks, notifications, settings of a backup's runs, conditions with their type and reason
//! constants, run results, live progress, and the small pure helpers the coordinator and the
//! agent both need (Go-style durations, human-readable sizes).

use std::{collections::BTreeMap, fmt, time::Duration};

use k8s_openapi::{
    api::core::v1::{Affinity, PodSecurityContext, PodTemplateSpec, ResourceRequirements, Toleration},
    apimachinery::pkg::apis::meta::v1::{LabelSelector, Time},
};
use kube::KubeSchema;
use schemars::{JsonSchema, Schema, SchemaGenerator, json_schema};
use serde::{Deserialize, Serialize};

// ---------------------------------------------------------------------------------------------
// Serde defaults. Each default also lands in the CRD schema, so the API server fills it in and
// `kubectl get -o yaml` shows the value in force.
// ---------------------------------------------------------------------------------------------

pub(crate) fn default_true() -> bool {
    true
}

pub(crate) fn default_hook_timeout() -> String {
    DEFAULT_HOOK_TIMEOUT.to_owned()
}

fn default_pushgateway_job_name() -> String {
    "backup".to_owned()
}

fn default_ntfy_server_url() -> String {
    "https://ntfy.sh".to_owned()
}

fn default_ntfy_priority() -> i32 {
    4
}

fn default_ntfy_secret_key() -> String {
    "auth-header".to_owned()
}

pub(crate) fn default_group_by() -> Vec<GroupBy> {
    vec![GroupBy::Host, GroupBy::Tags]
}

/// Timeout of a hook when `timeout` is not set.
pub const DEFAULT_HOOK_TIMEOUT: &str = "5m";

/// Schema of `podTemplate` fields: a full PodTemplateSpec schema would multiply the CRD size, so
/// the API server keeps the object as written and the coordinator validates it when it builds
/// the pod (a bad template surfaces as a condition).
pub(crate) fn pod_template_schema(_: &mut SchemaGenerator) -> Schema {
    json_schema!({
        "type": "object",
        "x-kubernetes-preserve-unknown-fields": true,
    })
}

/// Schema of free-form objects (for example CiliumNetworkPolicy egress rules) kept as written.
pub(crate) fn free_form_object_list_schema(_: &mut SchemaGenerator) -> Schema {
    json_schema!({
        "type": "array",
        "items": {
            "type": "object",
            "x-kubernetes-preserve-unknown-fields": true,
        },
    })
}

// ---------------------------------------------------------------------------------------------
// References
// ---------------------------------------------------------------------------------------------

/// Reference to a ResticRepository, possibly in another namespace.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RepositoryReference {
    /// Name of the ResticRepository.
    #[schemars(length(min = 1))]
    pub name: String,
    /// Namespace of the ResticRepository. Default: the namespace of the referring object. A
    /// repository in another namespace must list this namespace in its `spec.allowedNamespaces`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
}

impl RepositoryReference {
    /// The namespace the repository lives in, given the namespace of the referring object.
    pub fn namespace_or<'a>(&'a self, own_namespace: &'a str) -> &'a str {
        self.namespace
            .as_deref()
            .filter(|ns| !ns.is_empty())
            .unwrap_or(own_namespace)
    }
}

/// Reference to an object in the same namespace.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct LocalObjectReference {
    /// Name of the object, in the namespace of the referring object.
    #[schemars(length(min = 1))]
    pub name: String,
}

/// Reference to an object the operator created or used, written to status.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ObjectReference {
    /// Kind of the object, e.g. `Pod`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    /// Name of the object.
    pub name: String,
    /// Namespace of the object.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
}

/// Reference to a Secret in the namespace of the referring object.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SecretReference {
    /// Name of the Secret, in the namespace of the referring object.
    #[schemars(length(min = 1))]
    pub name: String,
}

/// Reference to one key of a Secret in the namespace of the referring object.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SecretKeyReference {
    /// Name of the Secret, in the namespace of the referring object.
    #[schemars(length(min = 1))]
    pub name: String,
    /// Key within the Secret. Default: `auth-header`.
    #[serde(default = "default_ntfy_secret_key")]
    #[schemars(length(min = 1))]
    pub key: String,
}

/// Whether `labels` match a Kubernetes label selector (`matchLabels` and `matchExpressions` with
/// `In`, `NotIn`, `Exists`, `DoesNotExist`). An empty selector matches everything; an unknown
/// operator matches nothing.
pub fn label_selector_matches(selector: &LabelSelector, labels: &BTreeMap<String, String>) -> bool {
    let labels_match = selector
        .match_labels
        .iter()
        .flatten()
        .all(|(key, value)| labels.get(key) == Some(value));
    let expressions_match = selector.match_expressions.iter().flatten().all(|req| {
        let value = labels.get(&req.key);
        let values = req.values.as_deref().unwrap_or_default();
        match req.operator.as_str() {
            "In" => value.is_some_and(|v| values.contains(v)),
            "NotIn" => value.is_none_or(|v| !values.contains(v)),
            "Exists" => value.is_some(),
            "DoesNotExist" => value.is_none(),
            _ => false,
        }
    });
    labels_match && expressions_match
}

// ---------------------------------------------------------------------------------------------
// Retention
// ---------------------------------------------------------------------------------------------

/// How many snapshots of each kind `restic forget` keeps (its `--keep-*` options). An unset
/// count is not passed to restic; `0` keeps none of that kind. A policy with no count above 0
/// removes nothing.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct KeepPolicy {
    /// Keep the last N snapshots (`restic forget --keep-last`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0))]
    pub keep_last: Option<i32>,
    /// Keep the last N hourly snapshots (`--keep-hourly`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0))]
    pub keep_hourly: Option<i32>,
    /// Keep the last N daily snapshots (`--keep-daily`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0))]
    pub keep_daily: Option<i32>,
    /// Keep the last N weekly snapshots (`--keep-weekly`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0))]
    pub keep_weekly: Option<i32>,
    /// Keep the last N monthly snapshots (`--keep-monthly`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0))]
    pub keep_monthly: Option<i32>,
    /// Keep the last N yearly snapshots (`--keep-yearly`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0))]
    pub keep_yearly: Option<i32>,
}

impl KeepPolicy {
    /// The policy the shell scripts this operator replaces applied when nothing was configured
    /// (`KEEP_LAST=1 KEEP_HOURLY=24 KEEP_DAILY=7 KEEP_WEEKLY=4 KEEP_MONTHLY=12 KEEP_YEARLY=0`).
    pub fn legacy_default() -> Self {
        Self {
            keep_last: Some(1),
            keep_hourly: Some(24),
            keep_daily: Some(7),
            keep_weekly: Some(4),
            keep_monthly: Some(12),
            keep_yearly: Some(0),
        }
    }
}

/// A snapshot property `restic forget --group-by` groups by: `host`, `paths` or `tags`.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum GroupBy {
    // Group by the snapshot's hostname.
    Host,
    // Group by the snapshot's set of backed-up paths.
    Paths,
    // Group by the snapshot's set of tags.
    Tags,
}

impl GroupBy {
    /// The name restic uses for this grouping.
    pub fn as_str(self) -> &'static str {
        match self {
            GroupBy::Host => "host",
            GroupBy::Paths => "paths",
            GroupBy::Tags => "tags",
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Hooks
// ---------------------------------------------------------------------------------------------

/// A command run before or after the work, either in a running pod (`exec`) or in a pod of its
/// own (`job`). Exactly one of the two must be set.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("(has(self.exec) ? 1 : 0) + (has(self.job) ? 1 : 0) == 1")
    .message("a hook must set exactly one of exec or job"))]
pub struct Hook {
    /// Run a command in a container of a running pod (like `kubectl exec`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exec: Option<ExecHook>,
    /// Run a pod built from a template and wait for it to finish.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub job: Option<JobHook>,
}

/// Duration fields (hook timeouts) accept Go duration strings such as `30s`, `5m` or `1h30m`.
const DURATION_RULE: &str = "self.matches('^([0-9]+([.][0-9]+)?(ns|us|µs|ms|s|m|h))+$')";
const DURATION_MESSAGE: &str = "must be a duration such as 30s, 5m or 1h30m";

/// Run a command in a running pod of the namespace.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct ExecHook {
    /// Selects the pod to run the command in (labels in the namespace of this resource). When
    /// several running pods match, the oldest one is used; when none matches, the hook fails.
    pub pod_selector: LabelSelector,
    /// Container to run the command in. Default: the pod's first container.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub container: Option<String>,
    /// Command and arguments, run without a shell (use `["/bin/sh", "-c", "..."]` for one).
    #[schemars(length(min = 1))]
    pub command: Vec<String>,
    /// How long the command may run before it is stopped and the hook fails, as a duration such
    /// as `60s` or `5m`. Default: `5m`.
    #[serde(default = "default_hook_timeout")]
    #[schemars(length(max = 32))]
    #[x_kube(validation = Rule::new(DURATION_RULE).message(DURATION_MESSAGE))]
    pub timeout: String,
}

impl ExecHook {
    /// The timeout as a `Duration`; `None` when it does not parse (the CRD rejects that).
    pub fn timeout_duration(&self) -> Option<Duration> {
        parse_duration(&self.timeout)
    }
}

/// Run a pod built from a template and wait for it to finish.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct JobHook {
    /// Template of the pod to run (a Kubernetes PodTemplateSpec: `metadata` and `spec`). The hook
    /// succeeds when every container exits 0. `restartPolicy` defaults to `Never`.
    #[schemars(schema_with = "pod_template_schema")]
    pub pod_template: PodTemplateSpec,
    /// How long the pod may run before it is stopped and the hook fails, as a duration such as
    /// `10m`. Default: `5m`.
    #[serde(default = "default_hook_timeout")]
    #[schemars(length(max = 32))]
    #[x_kube(validation = Rule::new(DURATION_RULE).message(DURATION_MESSAGE))]
    pub timeout: String,
}

// ---------------------------------------------------------------------------------------------
// Notifications
// ---------------------------------------------------------------------------------------------

/// Where to report the outcome of each run. Not sent yet: accepted and validated, for a later
/// release.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Notifications {
    /// Prometheus Pushgateway to push run metrics to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pushgateway: Option<PushgatewayNotification>,
    /// ntfy server to publish a push notification to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ntfy: Option<NtfyNotification>,
    /// SMTP server and addresses of an email report.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub email: Option<EmailNotification>,
}

/// Prometheus Pushgateway settings.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("!self.enabled || has(self.url)")
    .message("pushgateway.url is required when the pushgateway is enabled"))]
pub struct PushgatewayNotification {
    /// Whether this block is switched on; false keeps the settings without using them.
    /// Default: true.
    #[serde(default = "default_true")]
    pub enabled: bool,
    /// Base URL of the Pushgateway, e.g. `http://prometheus-pushgateway.monitoring.svc:9091`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    /// Job name the metrics are grouped under in the Pushgateway. Default: `backup`.
    #[serde(default = "default_pushgateway_job_name")]
    pub job_name: String,
}

/// ntfy (https://ntfy.sh) push notification settings.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("!self.enabled || has(self.topic)")
    .message("ntfy.topic is required when ntfy is enabled"))]
pub struct NtfyNotification {
    /// Whether this block is switched on; false keeps the settings without using them.
    /// Default: true.
    #[serde(default = "default_true")]
    pub enabled: bool,
    /// Base URL of the ntfy server. Default: `https://ntfy.sh`.
    #[serde(default = "default_ntfy_server_url", rename = "serverURL")]
    pub server_url: String,
    /// Topic to publish to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub topic: Option<String>,
    /// Secret key holding the credentials for the ntfy server. Its value is sent as the HTTP
    /// `Authorization` header (`Bearer tk_...` or `Basic ...`); a value of the form
    /// `user:password` is sent as basic authentication. Default key: `auth-header`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credentials_secret_ref: Option<SecretKeyReference>,
    /// Notify only when a run fails or partially fails. Default: true.
    #[serde(default = "default_true")]
    pub only_on_failure: bool,
    /// ntfy message priority, 1 (min) to 5 (max). Default: 4.
    #[serde(default = "default_ntfy_priority")]
    #[schemars(range(min = 1, max = 5))]
    pub priority: i32,
    /// ntfy tags (emoji short codes or labels) added to the message, e.g. `warning`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tags: Vec<String>,
    /// Message title. Default: `<hostname> - Backup failed` on failure and
    /// `<hostname> - Backup succeeded` otherwise (`Retention` instead of `Backup` for retention
    /// runs).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub title: Option<String>,
}

/// Email report settings.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("!self.enabled || has(self.to) || has(self.recipient)")
    .message("email needs a recipient: set email.to (or email.recipient)"))]
pub struct EmailNotification {
    /// Whether this block is switched on; false keeps the settings without using them.
    /// Default: true.
    #[serde(default = "default_true")]
    pub enabled: bool,
    /// SMTP server as `host:port`, e.g. `postfix.mail.svc:25`. Mail is sent without
    /// authentication, with STARTTLS when the server offers it.
    #[schemars(length(min = 1))]
    pub smtp_server: String,
    /// Sender address, e.g. `Restic Operator <no-reply@example.com>`. Default:
    /// `restic-operator@<SMTP server host>`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from: Option<String>,
    /// Recipient address; several addresses may be separated by commas. Same as `recipient`;
    /// when both are set, both receive the mail.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to: Option<String>,
    /// Recipient address (the name an earlier version of the specification used for `to`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub recipient: Option<String>,
    /// Subject line. Default: `<name> - <result>` of the run, e.g. `emby - Backup failed`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subject: Option<String>,
}

impl EmailNotification {
    /// All recipient addresses from `to` and `recipient`, split at commas, trimmed, without
    /// duplicates, in the order written.
    pub fn recipients(&self) -> Vec<String> {
        let mut out: Vec<String> = Vec::new();
        for list in [&self.to, &self.recipient].into_iter().flatten() {
            for addr in list.split(',').map(str::trim).filter(|a| !a.is_empty()) {
                if !out.iter().any(|known| known == addr) {
                    out.push(addr.to_owned());
                }
            }
        }
        out
    }
}

// ---------------------------------------------------------------------------------------------
// Pod settings (the specification's jobConfig) and network policy
// ---------------------------------------------------------------------------------------------

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
    /// Maximum duration of the restic backup of one run, in seconds; a backup still going after
    /// that is stopped and counted as failed. Default: the coordinator's `--run-timeout` (24h).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub active_deadline_seconds: Option<i64>,
    /// Not used yet. A failed run is not retried; the next scheduled run (or a new
    /// `manualTrigger`) is the retry.
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

// ---------------------------------------------------------------------------------------------
// Status building blocks
// ---------------------------------------------------------------------------------------------

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

/// Outcome of a backup or retention run.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum RunResult {
    // Everything was done.
    Succeeded,
    // Nothing usable was produced.
    Failed,
    // A snapshot was made, but some files could not be read.
    PartiallyFailed,
}

impl RunResult {
    /// The name used in the API.
    pub fn as_str(self) -> &'static str {
        match self {
            RunResult::Succeeded => "Succeeded",
            RunResult::Failed => "Failed",
            RunResult::PartiallyFailed => "PartiallyFailed",
        }
    }
}

impl fmt::Display for RunResult {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What started a run.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum RunTrigger {
    // The schedule.
    Schedule,
    // A change of `spec.manualTrigger`.
    Manual,
    // A one-shot resource (ResticRestore).
    Once,
}

/// Live progress of the run in flight, updated by the operator a few times a minute while the
/// run lasts. Removed when the run ends.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Progress {
    /// Id of the run this progress belongs to (see `activeRun.runID`).
    #[serde(default, skip_serializing_if = "Option::is_none", rename = "runID")]
    pub run_id: Option<String>,
    /// When the run started.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_time: Option<Time>,
    /// When this progress was last updated.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub update_time: Option<Time>,
    /// Percentage done, 0 to 100.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub percent_done: Option<f64>,
    /// Bytes processed so far.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bytes_done: Option<i64>,
    /// Total bytes to process (known once restic has scanned the source).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub total_bytes: Option<i64>,
    /// Files processed so far.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub files_done: Option<i64>,
    /// Total files to process (known once restic has scanned the source).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub total_files: Option<i64>,
    /// Estimated seconds until restic has read everything; only while `reading` (restic cannot
    /// estimate the rest).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seconds_remaining: Option<i64>,
    /// Phase of the run: `Queued`, `Running` (until restic reports), then `scanning` (restic
    /// still counts the files), `reading` (with `secondsRemaining`), `uploading` (every byte
    /// is read, so `percentDone` is 100, and the last packs are uploaded and the snapshot saved;
    /// no estimate of the time left).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stage: Option<String>,
}

/// The run in flight. Every run has an id derived from the resource and its scheduled time;
/// the operator uses it to re-attach to the run after a restart instead of starting it twice.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ActiveRun {
    /// Id of the run.
    #[serde(rename = "runID")]
    pub run_id: String,
    /// What started the run: `Schedule`, `Manual` or `Once`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trigger: Option<RunTrigger>,
    /// The scheduled time the run belongs to (for manual runs: when the trigger was seen).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scheduled_time: Option<Time>,
    /// When the run started.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_time: Option<Time>,
    /// Node the run executes on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_name: Option<String>,
    /// The pod doing the work: the node agent (also for a claim mounted by a holder pod).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent_pod: Option<ObjectReference>,
    /// Attempt number of the run. Always 1 for now: failed runs are not retried (see
    /// `jobConfig.backoffLimit`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attempt: Option<i32>,
}

/// Cron schedules: five fields (minute hour day-of-month month day-of-week) or a macro.
pub(crate) const SCHEDULE_RULE: &str =
    "self.matches('^ *(@(yearly|annually|monthly|weekly|daily|midnight|hourly)|[^ ]+( +[^ ]+){4}) *$')";
pub(crate) const SCHEDULE_MESSAGE: &str = "schedule must be a cron expression with five fields \
     (minute hour day-of-month month day-of-week), such as \"0 2 * * *\", or a macro such as @daily";

// ---------------------------------------------------------------------------------------------
// Durations and sizes as the status writes them
// ---------------------------------------------------------------------------------------------

/// Parses a Go-style duration (`300ms`, `60s`, `5m`, `1h30m`, `1.5h`); `None` when malformed.
pub fn parse_duration(text: &str) -> Option<Duration> {
    let mut rest = text.trim();
    if rest.is_empty() {
        return None;
    }
    let mut total = 0f64;
    while !rest.is_empty() {
        let number_len = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(rest.len());
        if number_len == 0 {
            return None;
        }
        let value: f64 = rest[..number_len].parse().ok()?;
        rest = &rest[number_len..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let seconds_per_unit = match &rest[..unit_len] {
            "ns" => 1e-9,
            "us" | "µs" => 1e-6,
            "ms" => 1e-3,
            "s" => 1.0,
            "m" => 60.0,
            "h" => 3600.0,
            _ => return None,
        };
        rest = &rest[unit_len..];
        total += value * seconds_per_unit;
    }
    Duration::try_from_secs_f64(total).ok()
}

/// Formats a duration the way the status writes it: `5m30s`, `2h0m5s`, `45s` (whole seconds).
pub fn format_duration(duration: Duration) -> String {
    let secs = duration.as_secs();
    let (h, m, s) = (secs / 3600, (secs % 3600) / 60, secs % 60);
    match (h, m) {
        (0, 0) => format!("{s}s"),
        (0, _) => format!("{m}m{s}s"),
        _ => format!("{h}h{m}m{s}s"),
    }
}

/// Formats a byte count the way the status writes sizes: `2.3 GiB`, `512 B`, `125.6 GiB`.
pub fn format_bytes(bytes: u64) -> String {
    const UNITS: [&str; 6] = ["KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];
    if bytes < 1024 {
        return format!("{bytes} B");
    }
    let mut value = bytes as f64 / 1024.0;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    format!("{value:.1} {}", UNITS[unit])
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

    #[test]
    fn go_durations_parse_like_kubernetes_writes_them() {
        assert_eq!(parse_duration("60s"), Some(Duration::from_secs(60)));
        assert_eq!(parse_duration("5m"), Some(Duration::from_secs(300)));
        assert_eq!(parse_duration("1h30m"), Some(Duration::from_secs(5400)));
        assert_eq!(parse_duration("1.5h"), Some(Duration::from_secs(5400)));
        assert_eq!(parse_duration("250ms"), Some(Duration::from_millis(250)));
        assert_eq!(parse_duration(""), None);
        assert_eq!(parse_duration("60"), None);
        assert_eq!(parse_duration("soon"), None);
        assert_eq!(parse_duration("5 minutes"), None);
    }

    #[test]
    fn durations_format_like_the_specification_status() {
        assert_eq!(format_duration(Duration::from_secs(330)), "5m30s");
        assert_eq!(format_duration(Duration::from_secs(930)), "15m30s");
        assert_eq!(format_duration(Duration::from_secs(45)), "45s");
        assert_eq!(format_duration(Duration::from_secs(7205)), "2h0m5s");
    }

    #[test]
    fn sizes_format_like_the_specification_status() {
        assert_eq!(format_bytes(2_469_606_195), "2.3 GiB");
        assert_eq!(format_bytes(134_839_066_624), "125.6 GiB");
        assert_eq!(format_bytes(512), "512 B");
        assert_eq!(format_bytes(1536), "1.5 KiB");
    }

    #[test]
    fn email_recipients_merge_to_and_recipient() {
        let email = EmailNotification {
            enabled: true,
            smtp_server: "postfix:25".into(),
            from: None,
            to: Some("a@example.com, b@example.com".into()),
            recipient: Some("b@example.com".into()),
            subject: None,
        };
        assert_eq!(email.recipients(), ["a@example.com", "b@example.com"]);
    }

    #[test]
    fn label_selectors_match_labels_and_expressions() {
        use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelectorRequirement;
        let labels: BTreeMap<String, String> = [("app", "emby"), ("tier", "media")]
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .into();
        let requirement = |key: &str, operator: &str, values: &[&str]| LabelSelectorRequirement {
            key: key.into(),
            operator: operator.into(),
            values: Some(values.iter().map(|v| v.to_string()).collect()),
        };
        let selector = |reqs: Vec<LabelSelectorRequirement>| LabelSelector {
            match_labels: Some([("app".to_owned(), "emby".to_owned())].into()),
            match_expressions: Some(reqs),
        };
        assert!(label_selector_matches(&LabelSelector::default(), &labels));
        assert!(label_selector_matches(
            &selector(vec![requirement("tier", "In", &["media"])]),
            &labels
        ));
        assert!(!label_selector_matches(
            &selector(vec![requirement("tier", "NotIn", &["media"])]),
            &labels
        ));
        assert!(label_selector_matches(
            &selector(vec![requirement("zone", "DoesNotExist", &[])]),
            &labels
        ));
        assert!(!label_selector_matches(
            &selector(vec![requirement("zone", "Exists", &[])]),
            &labels
        ));
        assert!(!label_selector_matches(
            &selector(vec![requirement("tier", "Near", &["media"])]),
            &labels
        ));
    }

    #[test]
    fn repository_reference_defaults_to_the_referring_namespace() {
        let local = RepositoryReference {
            name: "repo".into(),
            namespace: None,
        };
        assert_eq!(local.namespace_or("media"), "media");
        let remote = RepositoryReference {
            name: "repo".into(),
            namespace: Some("backup-system".into()),
        };
        assert_eq!(remote.namespace_or("media"), "backup-system");
    }
}
