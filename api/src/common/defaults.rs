//! Serde default functions, the default hook timeout and the schema functions of fields kept as
//! written. Each default also lands in the CRD schema, so the API server fills it in and
//! `kubectl get -o yaml` shows the value in force.

use schemars::{Schema, SchemaGenerator, json_schema};

use super::retention::GroupBy;

pub(crate) fn default_true() -> bool {
    true
}

pub(super) fn default_hook_timeout() -> String {
    DEFAULT_HOOK_TIMEOUT.to_owned()
}

pub(super) fn default_pushgateway_job_name() -> String {
    "backup".to_owned()
}

pub(super) fn default_ntfy_server_url() -> String {
    "https://ntfy.sh".to_owned()
}

pub(super) fn default_ntfy_priority() -> i32 {
    4
}

pub(super) fn default_ntfy_secret_key() -> String {
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
pub(super) fn free_form_object_list_schema(_: &mut SchemaGenerator) -> Schema {
    json_schema!({
        "type": "array",
        "items": {
            "type": "object",
            "x-kubernetes-preserve-unknown-fields": true,
        },
    })
}
