//! The CEL rule on `spec.restic.extraArgs` and the node agent's check are one allow-list written
//! twice (a regex for the API server, Rust for the agent). This runs both over the same corpus
//! with kube's client-side CEL evaluator, so neither can drift from the other.

use kube::core::cel::Validator;
use restic_operator_api::crds;
use restic_operator_args::{Op, check_one};
use serde_json::{Value, json};

fn schema() -> Value {
    let crd = crds()
        .into_iter()
        .find(|c| c.spec.names.kind == "ResticBackup")
        .unwrap();
    restic_operator_api::openapi_schema(&crd)
}

fn backup(extra: &[&str]) -> Value {
    json!({
        "apiVersion": "backup.resticbackup.io/v1alpha1",
        "kind": "ResticBackup",
        "metadata": {"name": "b", "namespace": "n"},
        "spec": {
            "repositoryRef": {"name": "r"},
            "schedule": "@daily",
            "source": {"pvc": {"claimName": "data"}},
            "restic": {"extraArgs": extra}
        }
    })
}

const CORPUS: &[&str] = &[
    "--exclude-caches",
    "--one-file-system",
    "--limit-upload=512",
    "--limit-upload=",
    "--limit-upload",
    "--limit-upload=12a",
    "--limit-download=2048",
    "--compression=max",
    "--compression=zstd",
    "--pack-size=64",
    "--read-concurrency=4",
    "--exclude-if-present=.nobackup",
    "--exclude-if-present=a/b",
    "--exclude-larger-than=2G",
    "--exclude-larger-than=2X",
    "--skip-if-unchanged",
    "--skip-if-unchanged=true",
    "--exclude=*.tmp",
    "--exclude=/data/cache/**",
    "--exclude=a\tb",
    "--iexclude=*.LOG",
    "--option=s3.storage-class=STANDARD_IA",
    "--option=s3.connections=8",
    "--option=s3.region=eu-central-1",
    "--option=s3.region=eu central",
    "--option=s3.bucket-lookup=path",
    "--option=sftp.command=sh",
    "--option=rclone.program=/data/x",
    "--retry-lock=5m",
    "--retry-lock=1h30m",
    "--retry-lock=5",
    "--stuck-request-timeout=10m",
    "--cleanup-cache",
    "--verbose",
    "--stdin-from-command",
    "--files-from=/proc/1/root/etc/shadow",
    "--exclude-file=/etc/shadow",
    "-vr/tmp",
    "-r",
    "/bin/sh",
    "x.sh",
    "--",
    "-",
    "",
    "--repo=local:/",
    "--password-command=sh",
    "--insecure-tls",
    "--cacert=/etc/ssl/x",
    "--host=x",
    "--tag=x",
    "--parent=abc",
    "--force",
    "--no-lock",
    "--max-unused=5%",
    "--read-data-subset=1/5",
    "--sparse",
    "--exclude-caches --one-file-system",
];

#[test]
fn the_api_server_and_the_agent_accept_exactly_the_same_backup_arguments() {
    let schema = schema();
    let mut differ = Vec::new();
    for arg in CORPUS {
        let cel = Validator::new().validate(&schema, &backup(&[arg]), None).is_ok();
        let agent = check_one(Op::Backup, arg).is_ok();
        if cel != agent {
            differ.push(format!("{arg:?}: CEL {cel}, agent {agent}"));
        }
    }
    assert!(
        differ.is_empty(),
        "the two checks disagree:\n{}",
        differ.join("\n")
    );
    // Both halves of the corpus are exercised.
    assert!(CORPUS.iter().filter(|a| check_one(Op::Backup, a).is_ok()).count() >= 20);
    assert!(
        CORPUS
            .iter()
            .filter(|a| check_one(Op::Backup, a).is_err())
            .count()
            >= 25
    );
}

#[test]
fn the_api_server_names_the_refused_item() {
    let errors = Validator::new()
        .validate(&schema(), &backup(&["--exclude-caches", "/bin/sh"]), None)
        .unwrap_err();
    let text: Vec<String> = errors.iter().map(|e| e.message.clone()).collect();
    assert!(
        text.iter()
            .any(|m| m.contains("extraArgs item /bin/sh is not allowed")),
        "{text:?}"
    );
}
