//! The manifests under `samples/` against the generated CRDs, without an API server: the
//! OpenAPI part of each schema is checked by a small validator that words its errors like
//! kube-apiserver, and the CEL rules by kube's client-side CEL evaluator. Valid samples must
//! pass and deserialize into the Rust types; each invalid sample must fail with the message its
//! `# expect:` line names. The e2e suite applies the same files to a real kube-apiserver.

use std::{
    fs,
    path::{Path, PathBuf},
};

use kube::core::cel::{Validator, compile_schema};
use restic_operator_api::{GlobalRetentionPolicy, ResticBackup, ResticRepository, ResticRestore, crds};
use serde::Deserialize;
use serde_json::Value;

fn samples_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../samples")
}

fn yaml_files(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "yaml"))
        .collect();
    files.sort();
    files
}

fn documents(path: &Path) -> Vec<Value> {
    let text = fs::read_to_string(path).unwrap();
    serde_yaml::Deserializer::from_str(&text)
        .map(|doc| {
            let yaml = serde_yaml::Value::deserialize(doc).unwrap();
            serde_json::to_value(yaml).unwrap()
        })
        .filter(|v| !v.is_null())
        .collect()
}

fn schema_for(kind: &str) -> Value {
    let crd = crds()
        .into_iter()
        .find(|c| c.spec.names.kind == kind)
        .unwrap_or_else(|| panic!("kind {kind}"));
    restic_operator_api::openapi_schema(&crd)
}

/// Every error kube-apiserver would report for `object`, worded as it words them.
fn admission_errors(object: &Value) -> Vec<String> {
    let kind = object["kind"].as_str().expect("manifest has a kind");
    let schema = schema_for(kind);
    let mut errors = Vec::new();
    openapi_errors(&schema, object, "", &mut errors);
    if let Err(cel) = Validator::new().validate(&schema, object, None) {
        for e in cel.iter() {
            // As the API server prints it: the type of the value the rule is on.
            let kind = value_at(object, &e.field_path).map_or("object", type_name);
            errors.push(format!(
                "{}: Invalid value: \"{kind}\": {}",
                e.field_path, e.message
            ));
        }
    }
    errors
}

/// The value at a field path such as `spec.hooks.preBackup` or `spec.policies[0].retention`.
fn value_at<'a>(object: &'a Value, path: &str) -> Option<&'a Value> {
    let mut at = object;
    for part in path.split('.').filter(|p| !p.is_empty()) {
        let (name, index) = match part.split_once('[') {
            Some((name, rest)) => (name, rest.trim_end_matches(']').parse::<usize>().ok()),
            None => (part, None),
        };
        at = at.get(name)?;
        if let Some(i) = index {
            at = at.get(i)?;
        }
    }
    Some(at)
}

fn type_name(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(n) if n.is_i64() || n.is_u64() => "integer",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

/// The structural (OpenAPI) part of CRD validation: unknown fields (as strict field validation
/// reports them), types, required fields, enums, bounds.
fn openapi_errors(schema: &Value, value: &Value, path: &str, errors: &mut Vec<String>) {
    let at = path.trim_start_matches('.');
    if value.is_null() {
        if schema["nullable"] != Value::Bool(true) {
            errors.push(format!(
                "{at}: Invalid value: \"null\": {at} in body must not be null"
            ));
        }
        return;
    }
    if schema["x-kubernetes-int-or-string"] == Value::Bool(true) {
        if !(value.is_string() || value.is_i64() || value.is_u64()) {
            errors.push(format!("{at}: Invalid value: must be an integer or a string"));
        }
        return;
    }
    if let Some(expected) = schema["type"].as_str() {
        let actual = type_name(value);
        let ok = actual == expected || (expected == "number" && actual == "integer");
        if !ok {
            errors.push(format!(
                "{at}: Invalid value: \"{actual}\": {at} in body must be of type {expected}: \"{actual}\""
            ));
            return;
        }
    }
    if let Some(allowed) = schema["enum"].as_array()
        && !allowed.contains(value)
    {
        let list = allowed
            .iter()
            .map(|v| v.to_string())
            .collect::<Vec<_>>()
            .join(", ");
        errors.push(format!(
            "{at}: Unsupported value: {value}: supported values: {list}"
        ));
    }
    if let Some(n) = value.as_f64() {
        if let Some(min) = schema["minimum"].as_f64()
            && n < min
        {
            errors.push(format!(
                "{at}: Invalid value: {value}: {at} in body should be greater than or equal to {min}"
            ));
        }
        if let Some(max) = schema["maximum"].as_f64()
            && n > max
        {
            errors.push(format!(
                "{at}: Invalid value: {value}: {at} in body should be less than or equal to {max}"
            ));
        }
    }
    if let Some(s) = value.as_str() {
        let len = s.chars().count() as u64;
        if let Some(min) = schema["minLength"].as_u64()
            && len < min
        {
            errors.push(format!(
                "{at}: Invalid value: {value}: {at} in body should be at least {min} chars long"
            ));
        }
        if let Some(max) = schema["maxLength"].as_u64()
            && len > max
        {
            errors.push(format!("{at}: Too long: may not be more than {max} bytes"));
        }
        if schema["format"] == "date-time" && s.parse::<k8s_openapi::jiff::Timestamp>().is_err() {
            errors.push(format!(
                "{at}: Invalid value: {value}: {at} in body must be of type date-time"
            ));
        }
    }
    if let Some(items) = value.as_array() {
        if let Some(min) = schema["minItems"].as_u64()
            && (items.len() as u64) < min
        {
            errors.push(format!(
                "{at}: Invalid value: {}: {at} in body should have at least {min} items",
                items.len()
            ));
        }
        for (i, item) in items.iter().enumerate() {
            openapi_errors(&schema["items"], item, &format!("{path}[{i}]"), errors);
        }
    }
    if let Some(fields) = value.as_object() {
        let properties = schema["properties"].as_object();
        let preserve = schema["x-kubernetes-preserve-unknown-fields"] == Value::Bool(true);
        for (name, child) in fields {
            let child_path = format!("{path}.{name}");
            match (
                properties.and_then(|p| p.get(name)),
                schema.get("additionalProperties"),
            ) {
                (Some(child_schema), _) => openapi_errors(child_schema, child, &child_path, errors),
                (None, Some(additional)) => openapi_errors(additional, child, &child_path, errors),
                (None, None) if preserve || properties.is_none() => {}
                // The API server supplies these for every object.
                (None, None)
                    if path.is_empty() && matches!(name.as_str(), "apiVersion" | "kind" | "metadata") => {}
                (None, None) => errors.push(format!(
                    "unknown field \"{}\"",
                    child_path.trim_start_matches('.')
                )),
            }
        }
        for required in schema["required"].as_array().into_iter().flatten() {
            let name = required.as_str().unwrap();
            if !fields.contains_key(name) {
                errors.push(format!(
                    "{}: Required value",
                    format!("{path}.{name}").trim_start_matches('.')
                ));
            }
        }
    }
}

/// Valid samples must also be readable by the operator itself.
fn deserializes_into_rust_types(object: &Value) -> Result<(), String> {
    let result = match object["kind"].as_str().unwrap() {
        "ResticRepository" => serde_json::from_value::<ResticRepository>(object.clone()).map(drop),
        "ResticBackup" => serde_json::from_value::<ResticBackup>(object.clone()).map(drop),
        "ResticRestore" => serde_json::from_value::<ResticRestore>(object.clone()).map(drop),
        "GlobalRetentionPolicy" => serde_json::from_value::<GlobalRetentionPolicy>(object.clone()).map(drop),
        other => panic!("unexpected kind {other}"),
    };
    result.map_err(|e| e.to_string())
}

fn assert_all_valid(folder: &str) {
    let files = yaml_files(&samples_dir().join(folder));
    assert!(!files.is_empty(), "no samples in {folder}");
    let mut failures = Vec::new();
    for file in files {
        for doc in documents(&file) {
            let errors = admission_errors(&doc);
            if !errors.is_empty() {
                failures.push(format!("{}: {errors:#?}", file.display()));
            }
            if let Err(e) = deserializes_into_rust_types(&doc) {
                failures.push(format!("{}: does not deserialize: {e}", file.display()));
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn the_specification_examples_are_accepted_unchanged_including_status() {
    let names: Vec<String> = yaml_files(&samples_dir().join("spec"))
        .iter()
        .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names.len(), 5, "§3.1–3.4 and §7.3: {names:?}");
    assert_all_valid("spec");
}

#[test]
fn the_alternatives_the_specification_comments_out_are_accepted() {
    assert_all_valid("alternatives");
}

#[test]
fn the_examples_of_the_additions_are_accepted() {
    assert_all_valid("additions");
}

#[test]
fn every_invalid_sample_is_rejected_with_its_expected_message() {
    let files = yaml_files(&samples_dir().join("invalid"));
    assert!(files.len() >= 20, "expected the full list of invalid cases");
    let mut failures = Vec::new();
    for file in files {
        let text = fs::read_to_string(&file).unwrap();
        let expect = text
            .lines()
            .next()
            .and_then(|l| l.strip_prefix("# expect: "))
            .unwrap_or_else(|| panic!("{} must start with `# expect: <message>`", file.display()));
        let docs = documents(&file);
        assert_eq!(
            docs.len(),
            1,
            "{}: one manifest per invalid sample",
            file.display()
        );
        let errors = admission_errors(&docs[0]);
        if !errors.iter().any(|e| e.contains(expect)) {
            failures.push(format!(
                "{}: expected {expect:?}, got {errors:#?}",
                file.display()
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn every_cel_rule_compiles() {
    for crd in crds() {
        let schema = schema_for(&crd.spec.names.kind);
        let compiled = compile_schema(&schema);
        let errors: Vec<String> = compiled
            .compilation_errors()
            .iter()
            .map(|e| e.to_string())
            .collect();
        assert!(errors.is_empty(), "{}: {errors:#?}", crd.spec.names.kind);
    }
}
