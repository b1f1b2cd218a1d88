//! Hooks: commands run before or after the work, in a running pod (`ExecHook`) or in a pod of
//! their own (`JobHook`), and the rule their timeouts must follow.

use std::time::Duration;

use k8s_openapi::api::core::v1::PodTemplateSpec;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use kube::KubeSchema;
use serde::{Deserialize, Serialize};

use super::defaults::{default_hook_timeout, pod_template_schema};
use super::units::parse_duration;

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
