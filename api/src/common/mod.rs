//! Types shared by the four kinds: object references, the restic retention policy (`KeepPolicy`),
//! hooks, notifications, settings of a backup's runs, conditions with their type and reason
//! constants, run results, live progress, and the small pure helpers the coordinator and the
//! agent both need (Go-style durations, human-readable sizes).
//!
//! What is where: `references` (references to other objects, label selectors), `retention`
//! (`KeepPolicy`, `GroupBy`), `hooks`, `notifications`, `pods` (`JobConfig`, network policy),
//! `conditions` (conditions and the constants of their types and reasons, event reasons),
//! `runs` (results, triggers, progress, the run in flight), `units` (the cron rule, durations,
//! sizes) and `defaults` (serde defaults and schema functions). Everything is re-exported here,
//! so paths such as `common::KeepPolicy` or `common::reasons` stay as they were.

mod conditions;
mod defaults;
mod hooks;
mod notifications;
mod pods;
mod references;
mod retention;
mod runs;
mod units;

pub use conditions::*;
pub use defaults::DEFAULT_HOOK_TIMEOUT;
pub(crate) use defaults::{default_group_by, default_true, pod_template_schema};
pub use hooks::*;
pub use notifications::*;
pub use pods::*;
pub use references::*;
pub use retention::*;
pub use runs::*;
pub(crate) use units::{SCHEDULE_MESSAGE, SCHEDULE_RULE};
pub use units::{format_bytes, format_duration, parse_duration};
