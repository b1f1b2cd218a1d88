//! The generated CRDs on a real API server: every example of the specification (and the
//! alternatives it leaves commented out) is accepted unchanged, each invalid case is rejected
//! with its message, and `kubectl get restic` / `kubectl explain` tell the story.

use restic_operator_e2e::output_text as text;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail, ensure};
use restic_operator_e2e::{TestContext, install_crds};

fn samples() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../samples")
}

fn yaml_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_context(|| format!("read {}", dir.display()))?
        .map(|e| e.map(|e| e.path()))
        .collect::<std::io::Result<_>>()?;
    files.retain(|p| p.extension().is_some_and(|e| e == "yaml"));
    files.sort();
    ensure!(!files.is_empty(), "no samples in {}", dir.display());
    Ok(files)
}

// The samples name their namespaces (as the specification writes them), so this one test
// owns `backup-system` and `media` on the shared control plane.
#[tokio::test]
async fn the_specification_examples_apply_unchanged_and_invalid_specs_are_rejected_with_their_message()
-> Result<()> {
    let ctx = TestContext::new("crds").await?;
    install_crds(&ctx.client, &restic_operator_api::crds()).await?;
    for ns in ["backup-system", "media"] {
        let out = ctx.env.kubectl()?.args(["create", "namespace", ns]).output()?;
        ensure!(
            out.status.success() || text(&out).contains("AlreadyExists"),
            "{}",
            text(&out)
        );
    }

    let mut valid = Vec::new();
    for dir in ["spec", "alternatives", "additions"] {
        valid.extend(yaml_files(&samples().join(dir))?);
    }
    for file in &valid {
        // As users apply them: strict field validation, server side.
        let out = ctx
            .env
            .kubectl()?
            .args(["apply", "--server-side", "--validate=strict", "-f"])
            .arg(file)
            .output()?;
        ensure!(
            out.status.success(),
            "{} was rejected:\n{}",
            file.display(),
            text(&out)
        );
    }
    // The status blocks of the specification's examples fit the status schema too.
    for file in yaml_files(&samples().join("spec"))? {
        let out = ctx
            .env
            .kubectl()?
            .args(["replace", "--subresource=status", "--validate=strict", "-f"])
            .arg(&file)
            .output()?;
        ensure!(
            out.status.success(),
            "status of {} was rejected:\n{}",
            file.display(),
            text(&out)
        );
    }

    let mut failures = Vec::new();
    let invalid = yaml_files(&samples().join("invalid"))?;
    let mut expected = Vec::new();
    for file in &invalid {
        let content = std::fs::read_to_string(file)?;
        let expect = content
            .lines()
            .find_map(|l| l.strip_prefix("# expect: "))
            .with_context(|| format!("{} has no '# expect:' line", file.display()))?;
        expected.push(expect.to_owned());
        let out = ctx
            .env
            .kubectl()?
            .args(["apply", "--server-side", "--validate=strict", "-f"])
            .arg(file)
            .output()?;
        let said = text(&out);
        if out.status.success() {
            failures.push(format!("{} was accepted", file.display()));
        } else if !said.contains(expect) {
            failures.push(format!("{}: expected {expect:?} in:\n{said}", file.display()));
        } else if !names_a_field(expect) {
            failures.push(format!(
                "{}: the expected message {expect:?} names no field; the server said:\n{said}",
                file.display()
            ));
        }
    }
    // Every rule and every enum a create can break has a sample that breaks it.
    let refusals: Vec<(String, Refusal)> = expected.iter().filter_map(|e| refusal(e)).collect();
    for (path, what) in breakable(&restic_operator_api::crds()) {
        let covered = refusals.iter().any(|(at, r)| {
            *at == path
                && match (&what, r) {
                    (Breakable::Enum, Refusal::Unsupported) => true,
                    (Breakable::Rule(message), Refusal::Rule(said)) => {
                        message.is_empty() || message.starts_with(said.as_str())
                    }
                    _ => false,
                }
        });
        if !covered {
            failures.push(format!("no invalid sample breaks {what:?} at {path}"));
        }
    }
    if !failures.is_empty() {
        bail!(
            "{} problems with the {} invalid samples:\n{}",
            failures.len(),
            invalid.len(),
            failures.join("\n")
        );
    }

    // `kubectl get restic` lists all four kinds; printer columns are there.
    let out = ctx
        .env
        .kubectl()?
        .args(["get", "restic", "--all-namespaces"])
        .output()?;
    let listing = text(&out);
    ensure!(out.status.success(), "{listing}");
    for kind in [
        "resticrepository",
        "resticbackup",
        "resticrestore",
        "globalretentionpolicy",
    ] {
        ensure!(
            listing.contains(&format!("{kind}.backup.resticbackup.io/")),
            "{kind} missing from:\n{listing}"
        );
    }
    let out = ctx
        .env
        .kubectl()?
        .args(["get", "rbackup", "-n", "media"])
        .output()?;
    let header = text(&out);
    for column in [
        "SCHEDULE",
        "SUSPENDED",
        "LAST RESULT",
        "LAST BACKUP",
        "NEXT BACKUP",
        "AGE",
    ] {
        ensure!(header.contains(column), "column {column} missing:\n{header}");
    }
    // `kubectl explain` shows the field descriptions.
    let out = ctx
        .env
        .kubectl()?
        .args(["explain", "resticbackup.spec.restic.snapshotPath"])
        .output()?;
    let explained = text(&out);
    ensure!(
        out.status.success() && explained.contains("DESCRIPTION"),
        "{explained}"
    );
    ensure!(explained.to_lowercase().contains("snapshot"), "{explained}");
    ctx.cleanup().await
}

/// Whether an expected refusal starts with the field it is about (`spec.mode: ...`).
fn names_a_field(expect: &str) -> bool {
    expect.split_once(": ").is_some_and(|(path, _)| {
        path.starts_with("spec")
            && path
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || ".[]".contains(c))
    })
}

/// `spec.groupBy[0]` as `spec.groupBy[*]`, the form of schema paths.
fn index_free(message: &str) -> String {
    let mut out = String::with_capacity(message.len());
    let mut chars = message.chars().peekable();
    while let Some(c) = chars.next() {
        out.push(c);
        if c == '[' && chars.peek().is_some_and(char::is_ascii_digit) {
            while chars.peek().is_some_and(char::is_ascii_digit) {
                chars.next();
            }
            out.push('*');
        }
    }
    out
}

#[derive(Debug)]
enum Breakable {
    Enum,
    /// A CEL rule, by its message (empty for a computed one).
    Rule(String),
}

/// What an expected refusal is: a value outside an enum, or a broken CEL rule and the start
/// of its message.
enum Refusal {
    Unsupported,
    Rule(String),
}

/// `spec.a[0].b: Unsupported value: ...` or `spec.a: Invalid value: "object": message...` as
/// the schema path (`spec.a[*].b`) and what was refused; `None` for other refusals (bounds,
/// required fields).
fn refusal(expect: &str) -> Option<(String, Refusal)> {
    let (path, detail) = expect.split_once(": ")?;
    let path = index_free(path);
    if detail.starts_with("Unsupported value") {
        return Some((path, Refusal::Unsupported));
    }
    let rest = detail.strip_prefix("Invalid value: \"")?;
    let (kind, message) = rest.split_once("\": ")?;
    ["object", "string", "array", "integer"]
        .contains(&kind)
        .then(|| (path, Refusal::Rule(message.to_owned())))
}

/// The enums and CEL rules of the CRDs' specs that a create can break, by field path.
/// Status is not validated on create, and transition rules (`oldSelf`) need an update.
fn breakable(
    crds: &[k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition],
) -> Vec<(String, Breakable)> {
    fn walk(schema: &serde_json::Value, path: &str, out: &mut Vec<(String, Breakable)>) {
        if schema.get("enum").is_some() {
            out.push((path.to_owned(), Breakable::Enum));
        }
        for rule in schema["x-kubernetes-validations"]
            .as_array()
            .into_iter()
            .flatten()
        {
            if rule["rule"].as_str().is_some_and(|r| r.contains("oldSelf")) {
                continue;
            }
            let message = rule["message"].as_str().unwrap_or_default();
            let at = match rule["fieldPath"].as_str() {
                Some(f) => format!("{path}{f}"),
                None => path.to_owned(),
            };
            out.push((at, Breakable::Rule(message.to_owned())));
        }
        for (name, sub) in schema["properties"].as_object().into_iter().flatten() {
            walk(sub, &format!("{path}.{name}"), out);
        }
        if let Some(items) = schema.get("items") {
            walk(items, &format!("{path}[*]"), out);
        }
        if let Some(values) = schema.get("additionalProperties").filter(|v| v.is_object()) {
            walk(values, &format!("{path}[*]"), out);
        }
    }
    let mut out = Vec::new();
    for crd in crds {
        for version in &crd.spec.versions {
            let schema = version
                .schema
                .as_ref()
                .and_then(|s| s.open_api_v3_schema.as_ref())
                .map(serde_json::to_value)
                .and_then(Result::ok)
                .unwrap_or_default();
            walk(&schema["properties"]["spec"], "spec", &mut out);
        }
    }
    out
}
