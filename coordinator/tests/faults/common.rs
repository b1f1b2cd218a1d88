//! What the fault suite's binaries share: repeat counts, the slow backup they catch in
//! flight, and recording a row.
#![allow(dead_code)]

use std::path::Path;

use anyhow::{Result, ensure};
use restic_operator_e2e::fixtures::pseudo_random;

use super::table::Row;

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
