//! A run the agent no longer knows is looked up in the repository before it is ever sent
//! again. The agent keeps finished runs for `--keep-finished`, across its restarts, but a
//! coordinator that comes back later still finds the run unknown. Without this it would start
//! the run again and make a second snapshot; with it, one run id makes at most one snapshot.
//!
//! The run's snapshot is the one of this backup's host, tags and path taken at or after the
//! run's start: runs of one backup never overlap, and the next one starts after this one's
//! result is written.

use chrono::{DateTime, Utc};
use restic_operator_api::backup::ResticBackup;
use restic_operator_proto::v1 as pb;

use crate::context::Context;
use crate::resolve::{self, Resolved};
use crate::run::{self, Ended};

/// The snapshots request that finds the run's snapshot; `nonce` keeps the lookup's own run id
/// fresh (a reused id would attach to an earlier lookup's answer).
pub fn request(
    backup: &ResticBackup,
    run_id: &str,
    nonce: i64,
    resolved: &Resolved,
    timeout: std::time::Duration,
) -> pb::SnapshotsRequest {
    pb::SnapshotsRequest {
        options: Some(run::options(&format!("{run_id}-lookup-{nonce}"), timeout)),
        repository: Some(resolved.agent_repository()),
        host: backup.effective_hostname(),
        tags: backup.snapshot_tags(),
        paths: vec![backup.snapshot_path().to_owned()],
    }
}

/// The earliest of `snapshots` taken at or after `since`: the run's, if it made one.
pub fn snapshot_of_run(snapshots: &[pb::Snapshot], since: DateTime<Utc>) -> Option<&pb::Snapshot> {
    snapshots
        .iter()
        .filter(|s| s.time_unix_ms >= since.timestamp_millis())
        .min_by_key(|s| s.time_unix_ms)
}

/// Asks the agent at `address` for the run's snapshot. `Ok(None)`: the run made none, so it
/// may be sent; an error: it could not be told, so it must not be.
pub async fn find(
    ctx: &Context,
    address: &str,
    backup: &ResticBackup,
    run_id: &str,
    since: DateTime<Utc>,
) -> Result<Option<(pb::Snapshot, Resolved)>, String> {
    let resolved = resolve::resolve(&ctx.client, backup)
        .await
        .map_err(|e| e.to_string())?;
    let request = request(
        backup,
        run_id,
        Utc::now().timestamp_millis(),
        &resolved,
        ctx.config.maintenance_timeout,
    );
    let lookup_id = request
        .options
        .as_ref()
        .map(|o| o.run_id.clone())
        .unwrap_or_default();
    let ended = ctx
        .dispatch(
            "snapshots",
            address,
            &lookup_id,
            |mut c| async move { c.snapshots(request).await },
            &mut |_| {},
        )
        .await;
    match ended {
        Ended::Result(r) if r.outcome == pb::Outcome::Succeeded as i32 => {
            Ok(snapshot_of_run(&r.snapshots, since)
                .cloned()
                .map(|s| (s, resolved)))
        }
        Ended::Result(r) => Err(run::describe_failure(&r)),
        Ended::Unavailable(e) => Err(e),
        Ended::Unknown => Err("the agent lost the lookup".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn snapshot(id: &str, at: &str) -> pb::Snapshot {
        pb::Snapshot {
            id: id.into(),
            time_unix_ms: at.parse::<DateTime<Utc>>().unwrap().timestamp_millis(),
            ..Default::default()
        }
    }

    #[test]
    fn the_runs_snapshot_is_the_first_taken_since_it_started() {
        let since: DateTime<Utc> = "2026-11-26T02:00:00Z".parse().unwrap();
        let earlier = snapshot("earlier", "2026-11-26T01:59:59Z");
        let runs = snapshot("runs", "2026-11-26T02:00:03Z");
        let later = snapshot("later", "2026-11-26T03:00:00Z");
        let all = [later.clone(), earlier.clone(), runs.clone()];
        assert_eq!(snapshot_of_run(&all, since), Some(&runs));
        assert_eq!(snapshot_of_run(&[earlier], since), None);
        assert_eq!(snapshot_of_run(&[], since), None);
    }
}
