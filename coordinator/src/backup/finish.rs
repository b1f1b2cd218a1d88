//! Writing a finished run: its final status (what `transition` decides), retried; then its
//! metrics and event.

use std::time::Duration;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::{Api, Resource, ResourceExt};
use restic_operator_api::backup::ResticBackup;
use restic_operator_api::common::{ActiveRun, RunResult};
use restic_operator_proto::v1 as pb;

use super::after::RetentionError;
use super::runner::publish;
use super::transition::{Finished, Outcome};
use crate::context::Context;

/// Writes the final status (what `transition` decides), metrics and event, and clears
/// `activeRun`; false when the status could not be written after `--status-write-attempts`,
/// which leaves the run to be re-attached on the next reconcile.
pub(super) async fn finish(
    ctx: &Context,
    api: &Api<ResticBackup>,
    backup: &ResticBackup,
    active: &ActiveRun,
    started: Time,
    outcome: Outcome,
    retention: Option<Result<pb::ForgetSummary, RetentionError>>,
) -> bool {
    let ns = backup.namespace().unwrap_or_default();
    let name = backup.name_any();
    let finished = Finished {
        active,
        started,
        now: ctx.now(),
        outcome: &outcome,
        retention: retention.as_ref(),
    };
    let generation = backup.meta().generation;
    let mut wait = Duration::from_secs(1);
    let mut attempts = 0;
    let written = loop {
        let written = ctx
            .status
            .update(api, &name, |_, s| finished.apply(s, generation))
            .await;
        attempts += 1;
        match written {
            Err(e) if attempts < ctx.config.status_write_attempts => {
                tracing::warn!(backup = %name, error = %e, "could not write the final status; retrying");
                tokio::time::sleep(wait).await;
                wait = (wait * 2).min(Duration::from_secs(30));
            }
            other => break other,
        }
    };
    if let Err(e) = written {
        tracing::warn!(backup = %name, error = %e, "could not write the final status; the run is re-attached on the next reconcile");
        return false;
    }
    record_metrics(ctx, &name, &ns, &finished);
    let (type_, reason, note) = finished.event();
    publish(ctx, backup, type_, reason, note).await;
    true
}

fn record_metrics(ctx: &Context, name: &str, ns: &str, finished: &Finished<'_>) {
    let labels = [name, ns];
    let start = crate::repository::from_time(&finished.started);
    let m = &ctx.metrics;
    m.backup_duration
        .with_label_values(&labels)
        .set(finished.duration().as_secs_f64());
    m.backup_start
        .with_label_values(&labels)
        .set(start.timestamp() as f64);
    let outcome = finished.outcome;
    if outcome.result != RunResult::Failed
        && let Some(summary) = outcome.summary()
    {
        m.backup_size
            .with_label_values(&labels)
            .set(summary.total_bytes_processed as f64);
        m.backup_files
            .with_label_values(&labels)
            .set(summary.total_files_processed as f64);
    }
    let status = match outcome.result {
        RunResult::Succeeded => "success",
        RunResult::Failed => "failure",
        RunResult::PartiallyFailed => "partial",
    };
    m.set_backup_status(name, ns, status);
}
