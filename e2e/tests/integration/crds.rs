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
    for file in &invalid {
        let content = std::fs::read_to_string(file)?;
        let expect = content
            .lines()
            .find_map(|l| l.strip_prefix("# expect: "))
            .with_context(|| format!("{} has no '# expect:' line", file.display()))?;
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
        }
    }
    if !failures.is_empty() {
        bail!(
            "{} of {} invalid samples misbehaved:\n{}",
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
