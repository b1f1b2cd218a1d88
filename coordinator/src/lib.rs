//! The restic-operator coordinator: reconciles ResticRepository, ResticBackup, ResticRestore
//! and GlobalRetentionPolicy objects, decides where each run goes, and drives the node agents over
//! mutual-TLS gRPC. It never runs restic and never reads volume data; the agents do.

#![forbid(unsafe_code)]

pub mod agents;
pub mod backup;
pub mod config;
pub mod context;
pub mod debugcerts;
pub mod dump;
pub mod error;
pub mod holder;
pub mod hooks;
pub mod leader;
pub mod locks;
pub mod metrics;
pub mod owner;
pub mod pki;
pub mod plan;
pub mod policy;
pub mod progress;
pub mod repository;
pub mod resolve;
pub mod restore;
pub mod retention;
pub mod run;
pub mod schedule;
pub mod serve;
pub mod sources;
pub mod status;

/// Field manager of every write the coordinator makes (status through server-side apply).
pub const FIELD_MANAGER: &str = "restic-operator";

/// Label put on objects the coordinator creates for a ResticBackup (hook Jobs, holder pods).
pub const BACKUP_LABEL: &str = "backup.resticbackup.io/backup";

/// Label put on objects the coordinator creates for a ResticRestore (hook Jobs, holder pods,
/// new claims).
pub const RESTORE_LABEL: &str = "backup.resticbackup.io/restore";
