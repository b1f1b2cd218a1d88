//! A run the agent no longer knows is looked up in the repository before it is ever sent
//! again. The agent keeps finished runs for `--keep-finished`, across its restarts, but a
//! coordinator that comes back later still finds the run unknown. Without this it would start
//! the run again and make a second snapshot; with it, one run id makes at most one snapshot.
//!
//! The run's snapshot is one of exactly this backup (its host, its whole tag set, paths below
//! its snapshot path) that is newer than the snapshot of the backup's previous run and taken no
//! earlier than the run's start, less `CLOCK_SKEW` (the snapshot's time is the node's clock,
//! the start the coordinator's). Runs of one backup never overlap, and the next starts only
//! after this one's result is written.

use chrono::{DateTime, Utc};
use restic_operator_api::backup::ResticBackup;
use restic_operator_proto::v1 as pb;

use crate::context::Context;
use crate::resolve::{self, ResolveError, Resolved};
use crate::run::{self, CallError};

/// How far a node's clock may be behind the coordinator's.
pub const CLOCK_SKEW: chrono::TimeDelta = chrono::TimeDelta::seconds(60);

/// What identifies a backup's snapshots.
#[derive(Clone, Debug, PartialEq)]
pub struct Identity {
    pub host: String,
    /// Sorted.
    pub tags: Vec<String>,
    pub snapshot_path: String,
}

impl Identity {
    pub fn of(backup: &ResticBackup) -> Self {
        let mut tags = backup.snapshot_tags();
        tags.sort();
        Self {
            host: backup.effective_hostname(),
            tags,
            snapshot_path: backup.snapshot_path().to_owned(),
        }
    }

    /// restic's filters select by a tag superset; this is the exact match.
    fn owns(&self, s: &pb::Snapshot) -> bool {
        let mut tags = s.tags.clone();
        tags.sort();
        let below = |p: &String| {
            p == &self.snapshot_path
                || p.strip_prefix(&self.snapshot_path)
                    .is_some_and(|rest| rest.starts_with('/') || self.snapshot_path == "/")
        };
        s.hostname == self.host && tags == self.tags && !s.paths.is_empty() && s.paths.iter().all(below)
    }
}

/// The snapshots request that finds the run's snapshot; `nonce` keeps the lookup's own run id
/// fresh (a reused id would attach to an earlier lookup's answer).
pub fn request(
    identity: &Identity,
    run_id: &str,
    nonce: i64,
    resolved: &Resolved,
    timeout: std::time::Duration,
) -> pb::SnapshotsRequest {
    pb::SnapshotsRequest {
        options: Some(run::options(&format!("{run_id}-lookup-{nonce}"), timeout)),
        repository: Some(resolved.agent_repository()),
        host: identity.host.clone(),
        tags: identity.tags.clone(),
        paths: vec![],
    }
}

/// The run's snapshot among `snapshots`: the earliest of `identity`'s that is newer than the
/// previous run's snapshot (`previous`, if any) and not older than `since` less `CLOCK_SKEW`.
pub fn snapshot_of_run<'a>(
    snapshots: &'a [pb::Snapshot],
    identity: &Identity,
    since: Option<DateTime<Utc>>,
    previous: Option<&str>,
) -> Option<&'a pb::Snapshot> {
    let ours: Vec<&pb::Snapshot> = snapshots.iter().filter(|s| identity.owns(s)).collect();
    let after_previous = previous
        .and_then(|id| ours.iter().find(|s| s.id == id))
        .map_or(i64::MIN, |s| s.time_unix_ms);
    let not_before = since.map_or(i64::MIN, |t| (t - CLOCK_SKEW).timestamp_millis());
    ours.into_iter()
        .filter(|s| Some(s.id.as_str()) != previous)
        .filter(|s| s.time_unix_ms > after_previous && s.time_unix_ms >= not_before)
        .min_by_key(|s| s.time_unix_ms)
}

/// Asks the agent at `address` for the run's snapshot. `Ok(None)`: the run made none, so it
/// may be sent; an error: it could not be told, so it must not be.
pub async fn find(
    ctx: &Context,
    address: &str,
    backup: &ResticBackup,
    run_id: &str,
    since: Option<DateTime<Utc>>,
) -> Result<Option<(pb::Snapshot, Resolved)>, LookupError> {
    let resolved = resolve::resolve(&ctx.client, backup).await?;
    let identity = Identity::of(backup);
    let request = request(
        &identity,
        run_id,
        ctx.now().timestamp_millis(),
        &resolved,
        ctx.config.maintenance_timeout,
    );
    let lookup_id = crate::run::id_of(&request.options);
    let ended = ctx
        .dispatch(
            "snapshots",
            address,
            &lookup_id,
            |mut c| async move { c.snapshots(request).await },
            &mut crate::run::Quiet,
        )
        .await;
    let previous = backup
        .status
        .as_ref()
        .and_then(|s| s.last_backup.as_ref())
        .and_then(|l| l.snapshot_id.clone());
    let found = match ended.succeeded() {
        Err(CallError::Lost) => return Err(LookupError::Lost),
        other => other?,
    };
    let snapshot = snapshot_of_run(&found.snapshots, &identity, since, previous.as_deref());
    Ok(snapshot.cloned().map(|s| (s, resolved)))
}

/// Why the repository could not be searched for a run's snapshot.
#[derive(Debug, thiserror::Error)]
pub enum LookupError {
    #[error(transparent)]
    Resolve(#[from] ResolveError),
    #[error(transparent)]
    Agent(#[from] CallError),
    #[error("the agent lost the lookup")]
    Lost,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn identity() -> Identity {
        Identity {
            host: "db".into(),
            tags: vec!["namespace=apps".into()],
            snapshot_path: "/data".into(),
        }
    }

    fn snapshot(id: &str, at: &str) -> pb::Snapshot {
        pb::Snapshot {
            id: id.into(),
            time_unix_ms: at.parse::<DateTime<Utc>>().unwrap().timestamp_millis(),
            hostname: "db".into(),
            tags: vec!["namespace=apps".into()],
            paths: vec!["/data".into()],
            ..Default::default()
        }
    }

    fn t(s: &str) -> Option<DateTime<Utc>> {
        Some(s.parse().unwrap())
    }

    #[test]
    fn the_runs_snapshot_is_the_first_of_this_backup_since_it_started() {
        let earlier = snapshot("earlier", "2026-11-26T01:00:00Z");
        let runs = snapshot("runs", "2026-11-26T02:00:03Z");
        let later = snapshot("later", "2026-11-26T03:00:00Z");
        let all = [later, earlier.clone(), runs.clone()];
        let found = snapshot_of_run(&all, &identity(), t("2026-11-26T02:00:00Z"), Some("earlier"));
        assert_eq!(found, Some(&runs));
        assert_eq!(
            snapshot_of_run(&[earlier], &identity(), t("2026-11-26T02:00:00Z"), None),
            None
        );
        assert_eq!(
            snapshot_of_run(&[], &identity(), t("2026-11-26T02:00:00Z"), None),
            None
        );
    }

    #[test]
    fn a_node_clock_a_little_behind_still_finds_it_but_never_the_previous_runs() {
        // The node's clock is 20 s behind: the snapshot looks older than the run.
        let runs = snapshot("runs", "2026-11-26T01:59:40Z");
        let since = t("2026-11-26T02:00:00Z");
        assert_eq!(
            snapshot_of_run(std::slice::from_ref(&runs), &identity(), since, None),
            Some(&runs)
        );
        // A short previous run, recorded in status, is never taken for this one...
        let previous = snapshot("previous", "2026-11-26T01:59:50Z");
        let both = [previous.clone(), runs.clone()];
        assert_eq!(snapshot_of_run(&both, &identity(), since, Some("previous")), None);
        // ...and neither is anything older than it.
        assert_eq!(
            snapshot_of_run(&[previous], &identity(), since, Some("previous")),
            None
        );
    }

    #[test]
    fn only_snapshots_of_exactly_this_backup_count() {
        let since = t("2026-11-26T02:00:00Z");
        let at = "2026-11-26T02:00:05Z";
        let extra_tag = pb::Snapshot {
            tags: vec!["namespace=apps".into(), "nightly".into()],
            ..snapshot("extra-tag", at)
        };
        let other_host = pb::Snapshot {
            hostname: "web".into(),
            ..snapshot("other-host", at)
        };
        let other_path = pb::Snapshot {
            paths: vec!["/config".into()],
            ..snapshot("other-path", at)
        };
        let lookalike_path = pb::Snapshot {
            paths: vec!["/database".into()],
            ..snapshot("lookalike", at)
        };
        let not_ours = [extra_tag, other_host, other_path, lookalike_path];
        assert_eq!(snapshot_of_run(&not_ours, &identity(), since, None), None);
        // Paths below the snapshot path (a backup of listed subpaths) are this backup's.
        let subpaths = pb::Snapshot {
            paths: vec!["/data/a".into(), "/data/b".into()],
            ..snapshot("subpaths", at)
        };
        assert_eq!(
            snapshot_of_run(std::slice::from_ref(&subpaths), &identity(), since, None),
            Some(&subpaths)
        );
    }
}
