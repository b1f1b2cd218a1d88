//! The restic retention policy: how many snapshots of each kind `restic forget` keeps
//! (`KeepPolicy`) and what it groups snapshots by (`GroupBy`).

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// How many snapshots of each kind `restic forget` keeps (its `--keep-*` options). An unset
/// count is not passed to restic; `0` keeps none of that kind. A policy with no count above 0
/// removes nothing.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct KeepPolicy {
    /// Keep the last N snapshots (`restic forget --keep-last`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0))]
    pub keep_last: Option<i32>,
    /// Keep the last N hourly snapshots (`--keep-hourly`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0))]
    pub keep_hourly: Option<i32>,
    /// Keep the last N daily snapshots (`--keep-daily`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0))]
    pub keep_daily: Option<i32>,
    /// Keep the last N weekly snapshots (`--keep-weekly`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0))]
    pub keep_weekly: Option<i32>,
    /// Keep the last N monthly snapshots (`--keep-monthly`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0))]
    pub keep_monthly: Option<i32>,
    /// Keep the last N yearly snapshots (`--keep-yearly`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0))]
    pub keep_yearly: Option<i32>,
}

impl KeepPolicy {
    /// The policy the shell scripts this operator replaces applied when nothing was configured
    /// (`KEEP_LAST=1 KEEP_HOURLY=24 KEEP_DAILY=7 KEEP_WEEKLY=4 KEEP_MONTHLY=12 KEEP_YEARLY=0`).
    pub fn legacy_default() -> Self {
        Self {
            keep_last: Some(1),
            keep_hourly: Some(24),
            keep_daily: Some(7),
            keep_weekly: Some(4),
            keep_monthly: Some(12),
            keep_yearly: Some(0),
        }
    }
}

/// A snapshot property `restic forget --group-by` groups by: `host`, `paths` or `tags`.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum GroupBy {
    // Group by the snapshot's hostname.
    Host,
    // Group by the snapshot's set of backed-up paths.
    Paths,
    // Group by the snapshot's set of tags.
    Tags,
}

impl GroupBy {
    /// The name restic uses for this grouping.
    pub fn as_str(self) -> &'static str {
        match self {
            GroupBy::Host => "host",
            GroupBy::Paths => "paths",
            GroupBy::Tags => "tags",
        }
    }
}
