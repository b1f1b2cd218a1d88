//! Backup of one pod volume: resolve the volume, choose the parent snapshot explicitly, run
//! `restic backup` with the volume at its stable path, and judge the result honestly.

use std::path::PathBuf;
use std::sync::Arc;

use restic_operator_args as args;
use restic_operator_proto::v1::{self as pb, FailureKind, Outcome, RunKind, run_event::Event};

use super::{
    check_common, check_tags, check_text, check_texts, execute, failed, failure_of, set_failed_paths,
};
use crate::exec::{Executor, Invocation};
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
    let binds: Vec<VolumeBind> = p
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

    // The parent: the latest snapshot of this host, tags and paths. restic would otherwise pick
    // by host and paths only, and a tagless lookup could pick another backup's snapshot. The
    // namespace tag is matched in `choose_parent`, so that snapshots made before it existed
    // (an old script's, continued) still count.
    let mut find = vec!["snapshots".to_string(), "--host".into(), req.host.clone()];
    let user_tags: Vec<&String> = req
        .tags
        .iter()
        .filter(|t| !t.starts_with(args::NAMESPACE_TAG_PREFIX))
        .collect();
    if !user_tags.is_empty() {
        let joined: Vec<&str> = user_tags.iter().map(|t| t.as_str()).collect();
        find.extend(["--tag".into(), joined.join(",")]);
    }
    for path in &p.paths {
        find.extend(["--path".into(), path.clone()]);
    }
    let inv = Invocation {
        run: &run,
        repo,
        options,
        args: find,
        volumes: vec![],
        access: Access::Repository,
        stream: false,
        step: "parent",
    };
    let out = match execute(&exec, inv).await {
        Ok(out) => out,
        Err(failure) => return failure,
    };
    if !out.success() {
        return failure_of(&out, "looking up the parent snapshot");
    }
    let namespace_tag = req
        .tags
        .iter()
        .find(|t| t.starts_with(args::NAMESPACE_TAG_PREFIX));
    let parent = serde_json::from_str::<Vec<restic::SnapshotJson>>(out.stdout.trim())
        .ok()
        .and_then(|found| choose_parent(&found, namespace_tag.map(String::as_str)));

    let mut args = vec!["backup".to_string(), "--host".into(), req.host.clone()];
    for t in &req.tags {
        args.extend(["--tag".into(), t.clone()]);
    }
    for e in &req.excludes {
        args.extend(["--exclude".into(), e.clone()]);
    }
    match &parent {
        Some(id) => args.extend(["--parent".into(), id.clone()]),
        // None: the first backup of this host, tags and paths. --force keeps restic from picking
        // a parent of its own by host and paths alone.
        None => args.push("--force".into()),
    }
    let dry_run = req.dry_run;
    if dry_run {
        args.push("--dry-run".into());
    }
    if let Some(o) = &options.restic {
        if o.read_concurrency > 0 {
            args.extend(["--read-concurrency".into(), o.read_concurrency.to_string()]);
        }
        args.extend(o.extra_args.iter().cloned());
    }
    args.push("--".into());
    args.extend(p.paths.iter().cloned());
    run.emit(Event::Started(pb::Started {
        kind: RunKind::Backup as i32,
        command: display_command(&args),
    }));

    let inv = Invocation {
        run: &run,
        repo,
        options,
        args,
        volumes: binds,
        access: Access::ReadVolume,
        stream: true,
        step: "backup",
    };
    let mut out = match execute(&exec, inv).await {
        Ok(out) => out,
        Err(failure) => return failure,
    };
    // Exit 3: the snapshot was made but some files could not be read.
    let partial = out.exit_code == Some(3);
    if !(out.success() || partial) || out.cancelled {
        let mut r = failure_of(&out, "backup");
        set_failed_paths(&mut r, &out);
        return r;
    }
    // A summary that does not name a well-formed snapshot (garbled, cut short) proves nothing;
    // a dry run makes none.
    let Some(summary) = out.summary.take().filter(|s| dry_run || s.snapshot().is_some()) else {
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
    if summary.total_files_processed == 0 && volumes::any_entries(&p.host_path, &p.subpaths).await {
        result.outcome = Outcome::Failed as i32;
        result.failure = FailureKind::EmptySnapshot as i32;
        result.reason =
            "restic stored no files although the volume is not empty; the snapshot cannot be trusted".into();
        return result;
    }
    if partial {
        result.outcome = Outcome::PartiallyFailed as i32;
        set_failed_paths(&mut result, &out);
        result.reason = format!("{} file(s) could not be read", result.failed_paths_total.max(1));
    }
    result
}

/// The latest of `found` (snapshots of the backup's host, tags and paths) that this namespace
/// made, or that no namespace did (made before the operator, e.g. by the script the backup
/// continues). Never another namespace's: restic trusts a parent's metadata, so a parent
/// chosen from another namespace's snapshot could lend its contents to unchanged-looking files.
pub fn choose_parent(found: &[restic::SnapshotJson], namespace_tag: Option<&str>) -> Option<String> {
    found
        .iter()
        .filter(|s| {
            let tags = s.tags.as_deref().unwrap_or_default();
            let theirs = tags.iter().find(|t| t.starts_with(args::NAMESPACE_TAG_PREFIX));
            match (namespace_tag, theirs) {
                (_, None) => true,
                (Some(ours), Some(theirs)) => theirs == ours,
                (None, Some(_)) => false,
            }
        })
        .max_by_key(|s| restic::parse_rfc3339_ms(&s.time).unwrap_or(0))
        .map(|s| s.id.clone())
}

/// The command line for people (never includes credentials: those are in the environment).
pub fn display_command(args: &[String]) -> Vec<String> {
    std::iter::once("restic".to_string())
        .chain(args.iter().cloned())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn snapshot(id: &str, time: &str, tags: &[&str]) -> restic::SnapshotJson {
        serde_json::from_value(serde_json::json!({
            "id": id, "time": time, "hostname": "db", "paths": ["/data"], "tags": tags
        }))
        .unwrap()
    }

    #[test]
    fn the_parent_is_never_another_namespaces_snapshot() {
        let ours = "restic-operator/namespace=team-a";
        let found = [
            snapshot("legacy", "2026-01-01T00:00:00Z", &["app"]),
            snapshot("ours", "2026-01-02T00:00:00+01:00", &["app", ours]),
            snapshot(
                "theirs",
                "2026-01-03T00:00:00Z",
                &["app", "restic-operator/namespace=team-b"],
            ),
        ];
        assert_eq!(choose_parent(&found, Some(ours)).as_deref(), Some("ours"));
        // Before this namespace's first snapshot, an old script's continues the history.
        assert_eq!(choose_parent(&found[..1], Some(ours)).as_deref(), Some("legacy"));
        assert_eq!(choose_parent(&found[2..], Some(ours)), None);
        // A request without a namespace tag (the debug CLI) takes no namespace's snapshot.
        assert_eq!(choose_parent(&found, None).as_deref(), Some("legacy"));
    }
}
