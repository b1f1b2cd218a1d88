//! The generated CRDs: the committed `crds/*.yaml` must match the generator, and the CRDs must
//! keep the properties `kubectl` users rely on (names, categories, printer columns, descriptions).

use std::{fs, path::PathBuf};

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use restic_operator_api::{crd_file_name, crd_yaml, crds};
use serde_json::Value;

fn crds_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../crds")
}

fn crd(plural: &str) -> CustomResourceDefinition {
    crds()
        .into_iter()
        .find(|c| c.spec.names.plural == plural)
        .expect("CRD exists")
}

fn schema(crd: &CustomResourceDefinition) -> Value {
    restic_operator_api::openapi_schema(crd)
}

#[test]
fn committed_crds_match_the_generator() {
    let mut stale = Vec::new();
    for crd in crds() {
        let path = crds_dir().join(crd_file_name(&crd));
        let committed = fs::read_to_string(&path).unwrap_or_default();
        if committed != crd_yaml(&crd).unwrap() {
            stale.push(path.display().to_string());
        }
    }
    assert!(
        stale.is_empty(),
        "these CRD files differ from the Rust types: {stale:?}\n\
         run `cargo run -p restic-operator-api --bin crdgen` at the workspace root and commit crds/"
    );
}

#[test]
fn there_is_one_crd_file_per_kind_and_no_other() {
    let mut files: Vec<String> = fs::read_dir(crds_dir())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|name| name.ends_with(".yaml"))
        .collect();
    files.sort();
    let mut expected: Vec<String> = crds().iter().map(crd_file_name).collect();
    expected.sort();
    assert_eq!(files, expected, "crds/ holds files the generator does not write");
}

#[test]
fn every_crd_is_small_enough_for_client_side_kubectl_apply() {
    // kubectl's last-applied annotation and etcd's request limit both bite well before 1 MiB;
    // the annotation is capped at 256 KiB.
    for crd in crds() {
        let size = crd_yaml(&crd).unwrap().len();
        assert!(size < 250_000, "{} is {size} bytes", crd.spec.names.kind);
    }
}

#[test]
fn all_kinds_are_namespaced_in_the_restic_category_with_short_names() {
    let expected = [
        ("resticrepositories", "ResticRepository", "rrepo"),
        ("resticbackups", "ResticBackup", "rbackup"),
        ("resticrestores", "ResticRestore", "rrestore"),
        ("globalretentionpolicies", "GlobalRetentionPolicy", "grp"),
    ];
    for (plural, kind, short) in expected {
        let crd = crd(plural);
        assert_eq!(
            crd.metadata.name.as_deref(),
            Some(format!("{plural}.backup.resticbackup.io").as_str())
        );
        assert_eq!(crd.spec.group, "backup.resticbackup.io");
        assert_eq!(crd.spec.scope, "Namespaced");
        assert_eq!(crd.spec.names.kind, kind);
        assert_eq!(
            crd.spec.names.short_names.as_deref(),
            Some(&[short.to_owned()][..])
        );
        assert_eq!(
            crd.spec.names.categories.as_deref(),
            Some(&["restic".to_owned()][..])
        );
        assert_eq!(crd.spec.versions[0].name, "v1alpha1");
        assert!(
            crd.spec.versions[0]
                .subresources
                .as_ref()
                .unwrap()
                .status
                .is_some()
        );
    }
}

#[test]
fn printer_columns_tell_the_story() {
    let columns = |plural: &str| -> Vec<String> {
        crd(plural).spec.versions[0]
            .additional_printer_columns
            .iter()
            .flatten()
            .filter(|c| c.priority.unwrap_or(0) == 0)
            .map(|c| c.name.clone())
            .collect()
    };
    assert_eq!(
        columns("resticbackups"),
        [
            "Schedule",
            "Suspended",
            "Last Result",
            "Last Backup",
            "Next Backup",
            "Age"
        ]
    );
    assert_eq!(
        columns("resticrestores"),
        ["Phase", "Snapshot", "Progress", "Age"]
    );
    assert_eq!(
        columns("resticrepositories"),
        ["Ready", "Snapshots", "Size", "Age"]
    );
    assert_eq!(
        columns("globalretentionpolicies"),
        ["Schedule", "Last Result", "Next Run", "Age"]
    );
}

#[test]
fn conditions_are_a_list_keyed_by_type() {
    for crd in crds() {
        let conditions = &schema(&crd)["properties"]["status"]["properties"]["conditions"];
        assert_eq!(
            conditions["x-kubernetes-list-type"], "map",
            "{}",
            crd.spec.names.kind
        );
        assert_eq!(
            conditions["x-kubernetes-list-map-keys"],
            serde_json::json!(["type"])
        );
        assert_eq!(
            conditions["items"]["required"],
            serde_json::json!(["status", "type"])
        );
    }
}

#[test]
fn every_field_has_a_description_for_kubectl_explain() {
    fn walk(schema: &Value, path: &str, missing: &mut Vec<String>) {
        if let Some(props) = schema.get("properties").and_then(Value::as_object) {
            for (name, prop) in props {
                let here = format!("{path}.{name}");
                let described = prop
                    .get("description")
                    .and_then(Value::as_str)
                    .is_some_and(|d| !d.is_empty());
                // apiVersion/kind/metadata of the root come from Kubernetes itself.
                if !described && !matches!(here.as_str(), ".apiVersion" | ".kind" | ".metadata") {
                    missing.push(here.clone());
                }
                walk(prop, &here, missing);
            }
        }
        if let Some(items) = schema.get("items") {
            walk(items, &format!("{path}[]"), missing);
        }
    }
    for crd in crds() {
        let mut missing = Vec::new();
        walk(&schema(&crd), "", &mut missing);
        assert!(
            missing.is_empty(),
            "{}: fields without a description: {missing:?}",
            crd.spec.names.kind
        );
    }
}

#[test]
fn descriptions_are_single_lines_for_kubectl_to_wrap() {
    for crd in crds() {
        let text = serde_json::to_string(&schema(&crd)).unwrap();
        let value: Value = serde_json::from_str(&text).unwrap();
        let mut stack = vec![&value];
        while let Some(v) = stack.pop() {
            match v {
                Value::Object(map) => {
                    if let Some(Value::String(d)) = map.get("description") {
                        assert!(
                            !d.replace("\n\n", "").contains('\n'),
                            "wrapped description: {d:?}"
                        );
                    }
                    stack.extend(map.values());
                }
                Value::Array(items) => stack.extend(items),
                _ => {}
            }
        }
    }
}
