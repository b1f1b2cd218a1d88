//! The custom resources of restic-operator, API group `backup.resticbackup.io`, version
//! `v1alpha1`: [`ResticRepository`], [`ResticBackup`], [`ResticRestore`] and
//! [`GlobalRetentionPolicy`]. Both the coordinator and the agent depend on this crate; it holds
//! types and pure helpers only, no client code. The CRD manifests in `crds/` are generated from
//! these types by `cargo run -p restic-operator-api --bin crdgen`.

pub mod backup;
pub mod common;
pub mod repository;
pub mod restore;
pub mod retention;

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::CustomResourceExt;

pub use backup::{
    BackupHooks, BackupRun, BackupSource, BackupStatistics, CustomSource, DEFAULT_SNAPSHOT_PATH,
    PodVolumeSource, PvcSource, ResticBackup, ResticBackupSpec, ResticBackupStatus, ResticOptions,
    RetentionSpec,
};
pub use common::{
    ActiveRun, ConcurrencyPolicy, Condition, ConditionStatus, EmailNotification, ExecHook, GroupBy, Hook,
    JobConfig, JobHook, KeepPolicy, LocalObjectReference, NetworkPolicyConfig, Notifications,
    NtfyNotification, ObjectReference, Progress, PushgatewayNotification, RepositoryReference, RunResult,
    RunTrigger, SecretKeyReference, SecretReference, condition_types, event_reasons, reasons,
};
pub use repository::{
    AllowedNamespaces, CacheConfig, IntegrityCheck, IntegrityCheckResult, RepositoryStatistics,
    ResticRepository, ResticRepositorySpec, ResticRepositoryStatus,
};
pub use restore::{
    AccessMode, NewPvc, ResticRestore, ResticRestoreSpec, ResticRestoreStatus, RestoreHooks, RestoreMode,
    RestoreOptions, RestorePhase, RestoreTarget, SnapshotSelector, TargetPvc,
};
pub use retention::{
    GlobalRetentionPolicy, GlobalRetentionPolicySpec, GlobalRetentionPolicyStatus, RetentionPolicyRule,
    SnapshotFilter,
};

/// API group of every kind in this crate.
pub const GROUP: &str = "backup.resticbackup.io";
/// API version of every kind in this crate.
pub const VERSION: &str = "v1alpha1";
/// `apiVersion` of objects of this crate's kinds.
pub const API_VERSION: &str = "backup.resticbackup.io/v1alpha1";

/// The CustomResourceDefinitions of all four kinds.
pub fn crds() -> Vec<CustomResourceDefinition> {
    [
        ResticRepository::crd(),
        ResticBackup::crd(),
        ResticRestore::crd(),
        GlobalRetentionPolicy::crd(),
    ]
    .into_iter()
    .map(unwrap_descriptions)
    .collect()
}

/// Doc comments are wrapped at the source's line width; `kubectl explain` wraps text itself, so
/// the descriptions are joined into single lines (paragraph breaks stay).
fn unwrap_descriptions(crd: CustomResourceDefinition) -> CustomResourceDefinition {
    fn walk(value: &mut serde_json::Value) {
        match value {
            serde_json::Value::Object(map) => {
                for (key, child) in map.iter_mut() {
                    match child {
                        serde_json::Value::String(text) if key == "description" => *text = unwrap(text),
                        _ => walk(child),
                    }
                }
            }
            serde_json::Value::Array(items) => items.iter_mut().for_each(walk),
            _ => {}
        }
    }
    fn unwrap(text: &str) -> String {
        text.split("\n\n")
            .map(|paragraph| paragraph.split('\n').map(str::trim).collect::<Vec<_>>().join(" "))
            .collect::<Vec<_>>()
            .join("\n\n")
    }
    let mut value = serde_json::to_value(&crd).expect("a CRD serializes to JSON");
    walk(&mut value);
    serde_json::from_value(value).expect("a CRD with rewritten descriptions deserializes")
}

/// The OpenAPI v3 schema of a CRD's (only) version, as JSON: what the API server validates
/// objects against, and what the tests and client-side validators read.
pub fn openapi_schema(crd: &CustomResourceDefinition) -> serde_json::Value {
    let schema = crd.spec.versions[0]
        .schema
        .as_ref()
        .and_then(|s| s.open_api_v3_schema.as_ref())
        .expect("every CRD of this crate has a schema");
    serde_json::to_value(schema).expect("a schema serializes to JSON")
}

/// File name a CRD is written to in `crds/`: `<plural>.<group>.yaml`.
pub fn crd_file_name(crd: &CustomResourceDefinition) -> String {
    format!("{}.yaml", crd.metadata.name.as_deref().unwrap_or_default())
}

/// A CRD as the YAML committed in `crds/`, with a header saying where it comes from.
pub fn crd_yaml(crd: &CustomResourceDefinition) -> Result<String, serde_yaml::Error> {
    let body = serde_yaml::to_string(crd)?;
    Ok(format!(
        "# Generated from the Rust types in api/ by `cargo run -p restic-operator-api --bin crdgen`.\n\
         # Do not edit by hand.\n---\n{body}"
    ))
}
