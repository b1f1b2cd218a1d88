//! The ResticRestore controller. A restore runs once: its reconcile marks it Pending and
//! starts its run (see [`run`]), which resolves the snapshot (recorded before any data moves),
//! prepares the target claim, runs the hooks around the agent's `restic restore` and records
//! how it ended. A run re-entered after a coordinator restart attaches to the agent's run
//! instead of sending it again; an ended restore is final.

pub mod run;
pub mod select;
pub mod target;
pub mod transition;

use std::sync::Arc;
use std::time::Duration;

use kube::runtime::controller::Action;
use kube::runtime::events::EventType;
use kube::{Api, Resource, ResourceExt};
use restic_operator_api::backup::ResticBackup;
use restic_operator_api::common::RepositoryReference;
use restic_operator_api::restore::ResticRestore;

use crate::context::Context;
use crate::error::Result;
use select::Criteria;

pub const CONTROLLER: &str = "resticrestore";

/// Where the volume is in a snapshot when neither the restore nor a backup says.
const DEFAULT_SNAPSHOT_PATH: &str = "/data";

/// The id of a restore's run: one per restore object, so it can never run twice.
pub fn run_id(restore: &ResticRestore) -> String {
    format!("restore-{}", restore.uid().unwrap_or_default())
}

/// The claim the restore writes into.
pub fn claim_of(restore: &ResticRestore) -> String {
    let target = &restore.spec.target;
    match (&target.pvc, &target.new_pvc) {
        (Some(p), _) => p.claim_name.clone(),
        (_, Some(n)) => n.name.clone(),
        _ => String::new(),
    }
}

/// The directory inside the claim the restore writes into, relative (`""` for its root).
pub fn subpath_of(restore: &ResticRestore) -> String {
    let path = restore.spec.target.pvc.as_ref().map_or("/", |p| p.path.as_str());
    path.trim_matches('/').to_owned()
}

/// The repository the restore reads: the backup's, or its own `repositoryRef`.
pub fn repository_of<'a>(
    restore: &'a ResticRestore,
    backup: Option<&'a ResticBackup>,
) -> Option<&'a RepositoryReference> {
    restore
        .spec
        .repository_ref
        .as_ref()
        .or(backup.map(|b| &b.spec.repository_ref))
}

/// Where the volume is inside the snapshot: `options.snapshotPath`, else the backup's.
pub fn snapshot_path_of(restore: &ResticRestore, backup: Option<&ResticBackup>) -> String {
    restore
        .spec
        .options
        .as_ref()
        .and_then(|o| o.snapshot_path.clone())
        .or_else(|| backup.map(|b| b.snapshot_path().to_owned()))
        .unwrap_or_else(|| DEFAULT_SNAPSHOT_PATH.to_owned())
}

/// What the snapshot must be (pure): the id, or the selector with the backup's hostname and
/// tags as defaults. A restore outside its repository's namespace sees only snapshots of its
/// own namespace.
pub fn criteria(
    restore: &ResticRestore,
    backup: Option<&ResticBackup>,
    repository_namespace: &str,
) -> Criteria {
    let ns = restore.namespace().unwrap_or_default();
    let confined_to =
        (ns != repository_namespace).then(|| format!("{}{ns}", restic_operator_args::NAMESPACE_TAG_PREFIX));
    let host = backup.map(ResticBackup::effective_hostname);
    let tags = backup.map(ResticBackup::snapshot_tags).unwrap_or_default();
    let spec = &restore.spec;
    if let Some(id) = spec.snapshot_id.as_ref().filter(|id| id.as_str() != "latest") {
        return Criteria {
            id: Some(id.clone()),
            confined_to,
            ..Default::default()
        };
    }
    match &spec.snapshot_selector {
        Some(sel) => Criteria {
            host: sel.hostname.clone().or(host),
            tags: if sel.tags.is_empty() {
                tags
            } else {
                sel.tags.clone()
            },
            before: sel.before.as_ref().map(crate::repository::from_time),
            latest: sel.latest,
            confined_to,
            id: None,
        },
        None => Criteria {
            host,
            tags,
            latest: true,
            confined_to,
            ..Default::default()
        },
    }
}

/// Why the spec cannot run as it is (pure). The API server's schema checks the shape; this
/// checks the strings restic and the agent would read.
pub fn invalid(restore: &ResticRestore) -> Option<String> {
    let spec = &restore.spec;
    if let Some(id) = &spec.snapshot_id
        && id != "latest"
        && (id.len() < 4 || id.len() > 64 || !id.chars().all(|c| c.is_ascii_hexdigit()))
    {
        return Some(format!(
            "snapshotID {id:?} is neither a snapshot id (4 to 64 hexadecimal digits) nor \"latest\""
        ));
    }
    if let Some(sel) = &spec.snapshot_selector {
        if sel.hostname.as_deref().is_some_and(|h| h.trim().is_empty()) {
            return Some("snapshotSelector.hostname is empty; leave it out to use the backup's".into());
        }
        if sel.tags.iter().any(|t| t.trim().is_empty() || t.contains(',')) {
            return Some("snapshotSelector.tags holds an empty tag or one with a comma".into());
        }
    }
    if spec.backup_ref.is_none() && spec.repository_ref.is_none() {
        return Some("set backupRef or repositoryRef".into());
    }
    // Without a backup there are no default hostname and tags: the newest snapshot of the
    // repository could be any application's.
    let named = spec.snapshot_id.as_deref().is_some_and(|id| id != "latest")
        || spec
            .snapshot_selector
            .as_ref()
            .is_some_and(|s| s.hostname.is_some() || !s.tags.is_empty());
    if spec.backup_ref.is_none() && !named {
        return Some(
            "with repositoryRef, say which snapshots: snapshotID, or snapshotSelector.hostname or tags              (the newest snapshot of the repository could be any application's)"
                .into(),
        );
    }
    if !spec.include_paths.is_empty() && !spec.exclude_paths.is_empty() {
        return Some(
            "set includePaths or excludePaths, not both: restic restore takes one or the other".into(),
        );
    }
    if claim_of(restore).is_empty() {
        return Some("target must set pvc or newPVC".into());
    }
    if let Some(p) = &spec.target.pvc
        && let Err(e) = relative_path("target.pvc.path", &p.path)
    {
        return Some(e);
    }
    if let Some(p) = spec.options.as_ref().and_then(|o| o.snapshot_path.as_ref())
        && (!p.starts_with('/') || relative_path("options.snapshotPath", p).is_err())
    {
        return Some(format!(
            "options.snapshotPath {p:?} must be an absolute path without . or .. components"
        ));
    }
    spec.include_paths
        .iter()
        .find_map(|p| {
            (!p.starts_with('/'))
                .then(|| {
                    format!("includePaths item {p:?} must start with / (a path in the backed-up volume)")
                })
                .or_else(|| relative_path("includePaths", p).err())
        })
        .or_else(|| {
            spec.exclude_paths
                .iter()
                .any(|p| p.trim().is_empty())
                .then(|| "excludePaths holds an empty pattern".to_owned())
        })
}

/// Checks a path of the volume: no `.` or `..` components, no NUL.
fn relative_path(field: &str, path: &str) -> Result<(), String> {
    let bad = path.contains('\0') || path.split('/').any(|c| c == ".." || c == ".");
    if bad {
        Err(format!("{field} {path:?} must not have . or .. components"))
    } else {
        Ok(())
    }
}

pub async fn reconcile(restore: Arc<ResticRestore>, ctx: Arc<Context>) -> Result<Action> {
    crate::context::observed(&ctx.metrics, CONTROLLER, reconcile_inner(&restore, &ctx)).await
}

/// Finished → nothing; else Pending recorded → the run started (once per process).
async fn reconcile_inner(restore: &ResticRestore, ctx: &Arc<Context>) -> Result<Action> {
    if restore.is_finished() {
        return Ok(Action::await_change());
    }
    let (ns, name) = (restore.namespace().unwrap_or_default(), restore.name_any());
    let api: Api<ResticRestore> = Api::namespaced(ctx.client.clone(), &ns);
    let (now, generation) = (ctx.now(), restore.meta().generation);
    ctx.status
        .update(&api, &name, |_, s| transition::pending(s, generation, now))
        .await?;
    run::ensure_running(ctx, &ns, &name, &run_id(restore));
    // The run is in this process's memory: looking again now and then starts it again after
    // a failure that ended it early (the API server gone, say).
    Ok(Action::requeue(Duration::from_secs(60)))
}

pub async fn publish(ctx: &Context, restore: &ResticRestore, type_: EventType, reason: &str, note: String) {
    crate::context::publish(&ctx.restore_events, restore, type_, reason, note).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn restore(ns: &str, spec: &str) -> ResticRestore {
        serde_yaml::from_str(&format!(
            "apiVersion: backup.resticbackup.io/v1alpha1\nkind: ResticRestore\n\
             metadata: {{name: r, namespace: {ns}, uid: u1}}\nspec: {{{spec}}}\n"
        ))
        .unwrap()
    }

    fn backup() -> ResticBackup {
        serde_yaml::from_str(
            "apiVersion: backup.resticbackup.io/v1alpha1\nkind: ResticBackup\n\
             metadata: {name: db, namespace: app}\n\
             spec: {repositoryRef: {name: r, namespace: infra}, schedule: '@daily', source: {pvc: {claimName: data}},\n\
                    restic: {tags: [daily], snapshotPath: /pg}}\n",
        )
        .unwrap()
    }

    #[test]
    fn a_backup_restore_takes_the_backups_latest_snapshot_of_its_own_namespace() {
        let r = restore("app", "backupRef: {name: db}, target: {pvc: {claimName: data}}");
        let b = backup();
        let c = criteria(&r, Some(&b), "infra");
        assert_eq!(c.host.as_deref(), Some("db.app"));
        assert_eq!(
            c.tags,
            vec!["daily".to_owned(), "restic-operator/namespace=app".to_owned()]
        );
        assert_eq!(c.confined_to.as_deref(), Some("restic-operator/namespace=app"));
        assert!(c.latest && c.id.is_none());
        assert_eq!(repository_of(&r, Some(&b)).unwrap().name, "r");
        assert_eq!(snapshot_path_of(&r, Some(&b)), "/pg");
        assert_eq!((claim_of(&r), subpath_of(&r)), ("data".to_owned(), String::new()));
    }

    #[test]
    fn a_selector_overrides_the_backups_host_and_tags() {
        let r = restore(
            "infra",
            "repositoryRef: {name: r}, target: {newPVC: {name: n, size: 1Gi}}, \
             snapshotSelector: {hostname: web, tags: [x], before: '2026-01-01T00:00:00Z', latest: false}",
        );
        let c = criteria(&r, None, "infra");
        assert_eq!(
            (c.host.as_deref(), c.tags.clone()),
            (Some("web"), vec!["x".to_owned()])
        );
        assert!(!c.latest && c.before.is_some());
        assert_eq!(
            c.confined_to, None,
            "the repository's own namespace sees everything"
        );
        assert_eq!(snapshot_path_of(&r, None), "/data");
        let by_id = restore(
            "infra",
            "repositoryRef: {name: r}, snapshotID: abcd1234, target: {pvc: {claimName: d}}",
        );
        assert_eq!(criteria(&by_id, None, "infra").id.as_deref(), Some("abcd1234"));
    }

    #[test]
    fn strings_restic_would_misread_are_refused() {
        let ok = restore(
            "a",
            "backupRef: {name: b}, target: {pvc: {claimName: d, path: /restored}}, includePaths: [/config]",
        );
        assert_eq!(invalid(&ok), None);
        assert_eq!(subpath_of(&ok), "restored");
        for (spec, says) in [
            (
                "backupRef: {name: b}, snapshotID: 'xyz!', target: {pvc: {claimName: d}}",
                "neither a snapshot id",
            ),
            (
                "backupRef: {name: b}, target: {pvc: {claimName: d, path: /../etc}}",
                "must not have . or ..",
            ),
            (
                "backupRef: {name: b}, target: {pvc: {claimName: d}}, includePaths: [config]",
                "must start with /",
            ),
            (
                "backupRef: {name: b}, target: {pvc: {claimName: d}}, includePaths: [/a/../../b]",
                "must not have",
            ),
            (
                "backupRef: {name: b}, target: {pvc: {claimName: d}}, excludePaths: ['']",
                "empty pattern",
            ),
            (
                "backupRef: {name: b}, target: {pvc: {claimName: d}}, snapshotSelector: {hostname: ''}",
                "hostname is empty",
            ),
            (
                "backupRef: {name: b}, target: {pvc: {claimName: d}}, options: {snapshotPath: data}",
                "absolute path",
            ),
            (
                "repositoryRef: {name: r}, target: {pvc: {claimName: d}}",
                "say which snapshots",
            ),
            (
                "repositoryRef: {name: r}, snapshotID: latest, target: {pvc: {claimName: d}}",
                "say which snapshots",
            ),
        ] {
            let e = invalid(&restore("a", spec)).unwrap_or_default();
            assert!(e.contains(says), "{spec}: {e}");
        }
    }
}
