//! Runs as the status records them: their result, what started them, their live progress and
//! the run in flight.

use std::fmt;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::references::ObjectReference;

/// Outcome of a backup or retention run.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum RunResult {
    // Everything was done.
    Succeeded,
    // Nothing usable was produced.
    Failed,
    // A snapshot was made, but some files could not be read.
    PartiallyFailed,
}

impl RunResult {
    /// The name used in the API.
    pub fn as_str(self) -> &'static str {
        match self {
            RunResult::Succeeded => "Succeeded",
            RunResult::Failed => "Failed",
            RunResult::PartiallyFailed => "PartiallyFailed",
        }
    }
}

impl fmt::Display for RunResult {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What started a run.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum RunTrigger {
    // The schedule.
    Schedule,
    // A change of `spec.manualTrigger`.
    Manual,
    // A one-shot resource (ResticRestore).
    Once,
}

/// Live progress of the run in flight, updated by the operator every few seconds while the run
/// moves (not while it waits, e.g. for an unreachable repository). Removed when the run ends.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Progress {
    /// Id of the run this progress belongs to (see `activeRun.runID`).
    #[serde(default, skip_serializing_if = "Option::is_none", rename = "runID")]
    pub run_id: Option<String>,
    /// When the run started.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_time: Option<Time>,
    /// When this progress was last updated.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub update_time: Option<Time>,
    /// Percentage done, 0 to 100.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub percent_done: Option<f64>,
    /// Bytes processed so far.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bytes_done: Option<i64>,
    /// Total bytes to process (known once restic has scanned the source).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub total_bytes: Option<i64>,
    /// Files processed so far.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub files_done: Option<i64>,
    /// Total files to process (known once restic has scanned the source).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub total_files: Option<i64>,
    /// Estimated seconds until restic has read everything; only while `reading` (restic cannot
    /// estimate the rest).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seconds_remaining: Option<i64>,
    /// Phase of the run: `Queued`, `Running` (until restic reports), then `scanning` (restic
    /// still counts the files), `reading` (with `secondsRemaining`), `uploading` (every byte
    /// is read, so `percentDone` is 100, and the last packs are uploaded and the snapshot saved;
    /// no estimate of the time left).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stage: Option<String>,
}

/// The run in flight. Every run has an id derived from the resource and its scheduled time;
/// the operator uses it to re-attach to the run after a restart instead of starting it twice.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ActiveRun {
    /// Id of the run.
    #[serde(rename = "runID")]
    pub run_id: String,
    /// What started the run: `Schedule`, `Manual` or `Once`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trigger: Option<RunTrigger>,
    /// The scheduled time the run belongs to (for manual runs: when the trigger was seen).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scheduled_time: Option<Time>,
    /// When the run started.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_time: Option<Time>,
    /// Node the run executes on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_name: Option<String>,
    /// The pod doing the work: the node agent (also for a claim mounted by a holder pod).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent_pod: Option<ObjectReference>,
    /// Attempt number of the run: 1, and one more for each retry of a failed ResticBackup
    /// run (see its `jobConfig.backoffLimit`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attempt: Option<i32>,
}
