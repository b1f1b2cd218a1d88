//! Restore of a snapshot into one pod volume: safe by default (an empty target), or overwrite,
//! or mirror (delete what the snapshot does not have), optionally into a subdirectory.

use std::path::PathBuf;
use std::sync::Arc;

use restic_operator_args as args;
use restic_operator_proto::v1::{self as pb, Outcome, RestoreMode, RunKind, run_event::Event};

use super::backup::display_command;
use super::{check_common, check_tags, check_text, check_texts, execute, failure_of, set_failed_paths};
use crate::exec::{Executor, Invocation};
use crate::runs::Run;
use crate::sandbox::{Access, VolumeBind};
use crate::volumes;

/// Where the target volume appears inside the sandbox.
const TARGET_IN_SANDBOX: &str = "/.restic/target";

pub struct Prepared {
    pub req: pb::RestoreRequest,
    pub host_path: PathBuf,
    /// The directory inside the volume to restore into, relative.
    pub subpath: PathBuf,
    pub snapshot_path: PathBuf,
}

pub fn prepare(req: pb::RestoreRequest, host_path: PathBuf) -> Result<Prepared, String> {
    check_common(
        &[args::Op::Restore],
        req.options.as_ref(),
        req.repository.as_ref(),
    )?;
    let subpath = volumes::relative(&req.target_subpath).map_err(|e| e.to_string())?;
    let snapshot_path = volumes::snapshot_path(&req.snapshot_path).map_err(|e| e.to_string())?;
    check_text("host", &req.host, 1024)?;
    check_tags(&req.tags)?;
    check_texts("include_paths", &req.include_paths, 1024, 4096)?;
    check_texts("exclude_paths", &req.exclude_paths, 1024, 4096)?;
    if req.snapshot_id.len() > 64 {
        return Err("snapshot_id is longer than a snapshot id (64 hex digits)".into());
    }
    if req.snapshot_id.is_empty() {
        return Err("snapshot_id is required (an id, or \"latest\" with host/tags)".into());
    }
    if !req.snapshot_id.chars().all(|c| c.is_ascii_hexdigit()) && req.snapshot_id != "latest" {
        return Err(format!(
            "snapshot_id {:?} is neither a snapshot id nor \"latest\"",
            req.snapshot_id
        ));
    }
    RestoreMode::try_from(req.mode).map_err(|_| format!("unknown restore mode {}", req.mode))?;
    Ok(Prepared {
        req,
        host_path,
        subpath,
        snapshot_path,
    })
}

pub async fn run(exec: Arc<Executor>, run: Arc<Run>, p: Prepared) -> pb::Result {
    let req = &p.req;
    let repo = req.repository.as_ref().expect("checked in prepare");
    let options = req.options.as_ref().expect("checked in prepare");
    let mode = RestoreMode::try_from(req.mode).unwrap_or(RestoreMode::IfEmpty);
    // The target directory is opened beneath the volume and created inside the sandbox, and
    // only it is mounted: a symlink in the volume cannot send a write anywhere else, and the
    // IfEmpty check looks at exactly the directory restic writes into.
    let target = VolumeBind {
        source: p.host_path.clone(),
        subpath: p.subpath.clone(),
        target: TARGET_IN_SANDBOX.into(),
        read_only: false,
        create: true,
        require_empty: mode == RestoreMode::IfEmpty,
    };
    let target_in = PathBuf::from(TARGET_IN_SANDBOX);
    // Runs of zeros are written as holes, so a sparse file comes back sparse.
    let mut args = vec![
        "restore".to_string(),
        format!("{}:{}", req.snapshot_id, p.snapshot_path.display()),
        "--target".into(),
        target_in.display().to_string(),
        "--sparse".into(),
    ];
    if req.snapshot_id == "latest" {
        if !req.host.is_empty() {
            args.extend(["--host".into(), req.host.clone()]);
        }
        if !req.tags.is_empty() {
            args.extend(["--tag".into(), req.tags.join(",")]);
        }
    }
    for i in &req.include_paths {
        args.extend(["--include".into(), i.clone()]);
    }
    for e in &req.exclude_paths {
        args.extend(["--exclude".into(), e.clone()]);
    }
    match mode {
        RestoreMode::IfEmpty => {}
        RestoreMode::Overwrite => args.extend(["--overwrite".into(), "always".into()]),
        RestoreMode::Mirror => args.extend(["--overwrite".into(), "always".into(), "--delete".into()]),
    }
    if req.verify {
        args.push("--verify".into());
    }
    if let Some(o) = &options.restic {
        args.extend(o.extra_args.iter().cloned());
    }
    run.emit(Event::Started(pb::Started {
        kind: RunKind::Restore as i32,
        command: display_command(&args),
    }));
    let inv = Invocation {
        run: &run,
        repo,
        options,
        args,
        volumes: vec![target],
        access: Access::WriteVolume,
        stream: true,
        step: "restore",
    };
    let mut out = match execute(&exec, inv).await {
        Ok(out) => out,
        Err(failure) => return failure,
    };
    if !out.success() || out.cancelled {
        let mut r = failure_of(&out, "restore");
        set_failed_paths(&mut r, &out);
        return r;
    }
    let s = out.summary.take().unwrap_or_default();
    let mut result = pb::Result {
        outcome: Outcome::Succeeded as i32,
        snapshot_id: req.snapshot_id.clone(),
        restore: Some(pb::RestoreSummary {
            files_restored: s.files_restored,
            files_skipped: s.files_skipped,
            files_deleted: s.files_deleted,
            bytes_restored: s.bytes_restored,
            total_files: s.total_files,
            total_bytes: s.total_bytes,
        }),
        ..Default::default()
    };
    if out.error_total > 0 {
        result.outcome = Outcome::PartiallyFailed as i32;
        set_failed_paths(&mut result, &out);
        result.reason = format!(
            "{} file(s) could not be restored",
            result.failed_paths_total.max(1)
        );
    }
    result
}
