//! What the fault suite's binaries share: repeat counts, the slow backup they catch in
//! flight, and recording a row.
#![allow(dead_code)]

use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use restic_operator_api::backup::BackupRun;
use restic_operator_e2e::fixtures::pseudo_random;

use super::table::Row;
use crate::support::Node;

/// The repeat count of a row: `default`, or `FAULT_REPEATS` when set lower.
pub fn repeats(default: usize) -> usize {
    std::env::var("FAULT_REPEATS")
        .ok()
        .and_then(|v| v.parse().ok())
        .map_or(default, |n: usize| n.clamp(1, default))
}

pub fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

/// A backup of `db-0`'s volume slow enough to be caught in flight: 512 KiB/s upload.
pub const SLOW_BACKUP: &str = "apiVersion: backup.resticbackup.io/v1alpha1\nkind: ResticBackup\n\
    metadata: {name: db}\nspec:\n  repositoryRef: {name: main}\n  schedule: '@yearly'\n  \
    source: {podVolumeBackup: {selector: {matchLabels: {app: db}}, volumeName: data}}\n  \
    restic: {extraArgs: ['--limit-upload=512']}\n";

/// New data for repeat `i` (1.5 MiB, about 3 s to upload), in place of the last repeat's.
pub fn fresh_data(data: &Path, i: usize) -> Result<()> {
    let _ = std::fs::remove_file(data.join(format!("dump-{}.bin", i.wrapping_sub(1))));
    std::fs::write(
        data.join(format!("dump-{i}.bin")),
        pseudo_random(3 << 19, 1000 + i as u64),
    )?;
    Ok(())
}

/// Records the row, failing it with the error when the fault's run did not complete.
pub fn record(mut row: Row<'_>, outcome: Result<bool>) -> Result<()> {
    match outcome {
        Ok(held) => {
            row.held &= held;
            row.record();
            ensure!(row.held, "{}: {}", row.fault, row.measured);
            Ok(())
        }
        Err(e) => {
            row.held = false;
            row.measured = format!("{} — stopped: {e:#}", row.measured)
                .lines()
                .next()
                .unwrap_or_default()
                .to_owned();
            row.record();
            Err(e)
        }
    }
}

/// How run `run_id` of backup `db` ended, once `db` has finished more than `after_total` runs.
pub struct Ended {
    /// Its `lastBackup`, when that is not this run Succeeded.
    pub wrong: Option<BackupRun>,
    pub snapshot_id: Option<String>,
    /// How long after `since_ms` (a restart) or the run's end on the agent, whichever is later,
    /// the status said so.
    pub late: Duration,
}

pub async fn backup_ended(
    node: &Node,
    run_id: &str,
    after_total: usize,
    since_ms: i64,
    timeout: Duration,
) -> Result<Ended> {
    let done = node.wait_finished("db", after_total as i64, timeout).await?;
    let seen = now_ms();
    let last = done.status.and_then(|s| s.last_backup).context("no lastBackup")?;
    let ok = last.run_id.as_deref() == Some(run_id)
        && last.result.map(|r| r.to_string()).as_deref() == Some("Succeeded");
    let ended = node
        .agent_runs()
        .await?
        .into_iter()
        .find(|r| r.run_id == run_id)
        .map_or(seen, |r| r.finished_unix_ms);
    Ok(Ended {
        snapshot_id: last.snapshot_id.clone(),
        wrong: (!ok).then_some(last),
        late: Duration::from_millis((seen - since_ms.max(ended)).max(0) as u64),
    })
}
