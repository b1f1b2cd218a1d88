//! Backup of one pod volume: resolve the volume, run one `restic backup` with the volume at its
//! stable path and a parent that is never another namespace's, and judge the result honestly.

use std::path::PathBuf;
use std::sync::Arc;

use restic_operator_args as args;
use restic_operator_proto::v1::{self as pb, FailureKind, Outcome, RunKind, run_event::Event};

use super::{
    check_common, check_tags, check_text, check_texts, execute, failed, failure_of, set_failed_paths,
};
use crate::exec::{Executor, Invocation, Output};
use crate::parents::Identity;
use crate::restic;
use crate::runs::Run;
use crate::sandbox::{Access, VolumeBind};
use crate::volumes;

/// A validated backup, ready to run.
pub struct Prepared {
    pub req: pb::BackupRequest,
    pub host_path: PathBuf,
    pub snapshot_path: PathBuf,
    /// Paths to back up, as restic sees them (under the snapshot path).
    pub paths: Vec<String>,
    /// The same paths relative to the volume (empty: the whole volume). They are resolved
    /// beneath the volume inside the sandbox, never on the host.
    pub subpaths: Vec<PathBuf>,
}

pub fn prepare(req: pb::BackupRequest, host_path: PathBuf) -> Result<Prepared, String> {
    check_common(&[args::Op::Backup], req.options.as_ref(), req.repository.as_ref())?;
    if req.host.trim().is_empty() {
        return Err(
            "host is required (the operator uses the ResticBackup's name and namespace by default)".into(),
        );
    }
    check_text("host", &req.host, 1024)?;
    check_tags(&req.tags)?;
    // The namespace tag keeps other namespaces' snapshots from being a parent; a second one
    // would let a snapshot of either namespace be chosen.
    if req
        .tags
        .iter()
        .filter(|t| t.starts_with(args::NAMESPACE_TAG_PREFIX))
        .count()
        > 1
    {
        return Err(format!(
            "tags hold more than one {}<namespace> tag",
            args::NAMESPACE_TAG_PREFIX
        ));
    }
    check_texts("paths", &req.paths, 1024, 4096)?;
    check_texts("excludes", &req.excludes, 1024, 4096)?;
    restic::check_excludes(&req.excludes)?;
    let snapshot_path = volumes::snapshot_path(&req.snapshot_path).map_err(|e| e.to_string())?;
    let mut subpaths: Vec<PathBuf> = Vec::new();
    for p in &req.paths {
        subpaths.push(volumes::relative(p).map_err(|e| e.to_string())?);
    }
    if subpaths.is_empty() || subpaths.iter().any(|p| p.as_os_str().is_empty()) {
        subpaths = vec![PathBuf::new()];
    }
    // Each path is mounted on its own; one inside another would be mounted through the first.
    for a in &subpaths {
        if let Some(b) = subpaths.iter().find(|b| *b != a && b.starts_with(a)) {
            return Err(format!(
                "paths /{} and /{} overlap; list only /{}",
                a.display(),
                b.display(),
                a.display()
            ));
        }
    }
    subpaths.sort();
    subpaths.dedup();
    let paths = subpaths
        .iter()
        // join("") would add a trailing slash, which --path filters do not match.
        .map(|rel| match rel.as_os_str().is_empty() {
            true => snapshot_path.display().to_string(),
            false => snapshot_path.join(rel).display().to_string(),
        })
        .collect();
    Ok(Prepared {
        req,
        host_path,
        snapshot_path,
        paths,
        subpaths,
    })
}

pub async fn run(exec: Arc<Executor>, run: Arc<Run>, p: Prepared) -> pb::Result {
    let req = &p.req;
    let repo = req.repository.as_ref().expect("checked in prepare");
    let options = req.options.as_ref().expect("checked in prepare");
    // One restic call: the parent is the snapshot this backup's identity made last on this
    // node, or else restic's own choice by host, paths and the whole tag set (see
    // `crate::parents`).
    let identity = Identity::new(&repo.url, &req.host, &req.tags, &p.paths);
    let mut parent = exec.parents.get(&identity);
    let mut out = match backup_once(&exec, &run, &p, parent.as_deref()).await {
        Ok(out) => out,
        Err(failure) => return failure,
    };
    if out.exit_code == Some(1)
        && out.summary.is_none()
        && parent
            .as_deref()
            .is_some_and(|id| restic::no_such_snapshot(&out.stderr, id))
    {
        // The recorded snapshot was forgotten since; restic stopped before reading anything.
        exec.parents.forget(&identity);
        parent = None;
        out = match backup_once(&exec, &run, &p, None).await {
            Ok(out) => out,
            Err(failure) => return failure,
        };
    }
    let dry_run = req.dry_run;
    // Exit 3: the snapshot was made but some files could not be read.
    let partial = out.exit_code == Some(3);
    if !(out.success() || partial) || out.cancelled {
        let mut r = failure_of(&out, "backup");
        set_failed_paths(&mut r, &out);
        return r;
    }
    // With --skip-if-unchanged, restic makes no snapshot when nothing changed since the parent:
    // the parent is then the volume's latest snapshot.
    let skip_if_unchanged = parent.is_some()
        && options
            .restic
            .as_ref()
            .is_some_and(|o| o.extra_args.iter().any(|a| a == "--skip-if-unchanged"));
    let skipped = !dry_run
        && skip_if_unchanged
        && out.success()
        && out.summary.as_ref().is_some_and(|s| {
            s.snapshot_id.as_deref().unwrap_or_default().is_empty()
                && s.files_new + s.files_changed + s.dirs_new + s.dirs_changed == 0
        });
    // A summary that does not name a well-formed snapshot (garbled, cut short) proves nothing;
    // a dry run makes none.
    let Some(summary) = out
        .summary
        .take()
        .filter(|s| dry_run || skipped || s.snapshot().is_some())
    else {
        return failed(
            FailureKind::Restic,
            "restic exited without a summary naming its snapshot",
        );
    };
    let backup = pb::BackupSummary {
        files_new: summary.files_new,
        files_changed: summary.files_changed,
        files_unmodified: summary.files_unmodified,
        dirs_new: summary.dirs_new,
        dirs_changed: summary.dirs_changed,
        dirs_unmodified: summary.dirs_unmodified,
        data_added: summary.data_added,
        data_added_packed: summary.data_added_packed,
        total_files_processed: summary.total_files_processed,
        total_bytes_processed: summary.total_bytes_processed,
        parent_snapshot_id: parent.unwrap_or_default(),
    };
    let mut result = pb::Result {
        outcome: Outcome::Succeeded as i32,
        snapshot_id: summary.snapshot().unwrap_or_default().to_owned(),
        backup: Some(backup),
        exit_code: out.exit_code.unwrap_or_default(),
        ..Default::default()
    };
    if skipped {
        // Only with a known parent (see `backup_once`).
        let parent = &result.backup.as_ref().expect("set above").parent_snapshot_id;
        result.reason = format!(
            "nothing changed since snapshot {}; restic made no new one (--skip-if-unchanged)",
            parent.get(..8).unwrap_or(parent)
        );
        result.snapshot_id = parent.clone();
        return result;
    }
    if summary.total_files_processed == 0 && volumes::any_entries(&p.host_path, &p.subpaths).await {
        result.outcome = Outcome::Failed as i32;
        result.failure = FailureKind::EmptySnapshot as i32;
        result.reason =
            "restic stored no files although the volume is not empty; the snapshot cannot be trusted".into();
        return result;
    }
    if !dry_run {
        exec.parents.set(&identity, &result.snapshot_id);
    }
    if partial {
        result.outcome = Outcome::PartiallyFailed as i32;
        set_failed_paths(&mut result, &out);
        result.reason = format!("{} file(s) could not be read", result.failed_paths_total.max(1));
    }
    result
}

/// Runs `restic backup` once, with `parent` if it is known and restic's choice otherwise.
async fn backup_once(
    exec: &Executor,
    run: &Run,
    p: &Prepared,
    parent: Option<&str>,
) -> Result<Output, pb::Result> {
    let req = &p.req;
    let repo = req.repository.as_ref().expect("checked in prepare");
    let options = req.options.as_ref().expect("checked in prepare");
    let mut args = vec!["backup".to_string(), "--host".into(), req.host.clone()];
    for t in &req.tags {
        args.extend(["--tag".into(), t.clone()]);
    }
    for e in &req.excludes {
        args.extend(["--exclude".into(), e.clone()]);
    }
    let has_namespace_tag = req.tags.iter().any(|t| t.starts_with(args::NAMESPACE_TAG_PREFIX));
    match parent {
        Some(id) => args.extend(["--parent".into(), id.to_owned()]),
        // The latest snapshot of this host that has all of this backup's paths and tags: the
        // namespace tag keeps every other namespace's snapshots out.
        None if has_namespace_tag => args.extend(["--group-by".into(), "host,paths,tags".into()]),
        // Without one (the debug CLI's backups), any namespace's snapshot could match: none.
        None => args.push("--force".into()),
    }
    if req.dry_run {
        args.push("--dry-run".into());
    }
    if let Some(o) = &options.restic {
        if o.read_concurrency > 0 {
            args.extend(["--read-concurrency".into(), o.read_concurrency.to_string()]);
        }
        // Without a known parent, a run that skipped an unchanged volume could not say which
        // snapshot holds it: this one makes a snapshot, and the next one knows its parent.
        args.extend(
            o.extra_args
                .iter()
                .filter(|a| parent.is_some() || *a != "--skip-if-unchanged")
                .cloned(),
        );
    }
    args.push("--".into());
    args.extend(p.paths.iter().cloned());
    run.emit(Event::Started(pb::Started {
        kind: RunKind::Backup as i32,
        command: display_command(&args),
    }));
    let volumes = p
        .subpaths
        .iter()
        .map(|rel| VolumeBind {
            source: p.host_path.clone(),
            subpath: rel.clone(),
            target: p.snapshot_path.join(rel),
            read_only: true,
            ..Default::default()
        })
        .collect();
    let inv = Invocation {
        run,
        repo,
        options,
        args,
        volumes,
        access: Access::ReadVolume,
        stream: true,
        step: "backup",
    };
    execute(exec, inv).await
}

/// The command line for people (never includes credentials: those are in the environment).
pub fn display_command(args: &[String]) -> Vec<String> {
    std::iter::once("restic".to_string())
        .chain(args.iter().cloned())
        .collect()
}
