//! Repository statistics (`restic stats`, which reads every snapshot): read after the probe
//! and after backups, with their own timeout; a failure is a warning event, never a change of
//! readiness.

use chrono::{DateTime, Utc};
use kube::runtime::events::EventType;
use kube::{Api, ResourceExt};
use restic_operator_api::common::{event_reasons as er, format_bytes};
use restic_operator_api::repository::{RepositoryStatistics, ResticRepository};
use restic_operator_proto::v1 as pb;

use super::probe::call;
use super::request::{self, Kind};
use super::{publish, to_time};
use crate::context::Context;

/// Reads a repository's statistics (`restic stats`, slow on large repositories) into
/// `status.statistics` and the metrics. A failure is a warning event; readiness is the
/// probe's alone.
pub(super) async fn statistics(repo: &ResticRepository, ctx: &Context, creds: &pb::Repository) {
    let ns = repo.namespace().unwrap_or_default();
    let name = repo.name_any();
    // Stats read the index; skipped while forget, prune or check hold the repository.
    let Some(_shared) = ctx.locks.try_shared(&format!("{ns}/{name}")) else {
        return;
    };
    let Ok(agent) = ctx.agents.any() else {
        return; // the probe reports a missing agent
    };
    let request = request::repository(Kind::Stats, repo, creds, ctx.now(), 0, ctx.config.stats_timeout);
    let stats = match call(ctx, &agent.address, Kind::Stats, request).await {
        Ok(r) => r.stats.unwrap_or_default(),
        Err(e) => return statistics_failed(ctx, repo, e.to_string()).await,
    };
    ctx.metrics
        .repository_size
        .with_label_values(&[&name, &ns])
        .set(stats.total_size as f64);
    ctx.metrics
        .repository_snapshots
        .with_label_values(&[&name, &ns])
        .set(stats.snapshots_count as f64);
    let api: Api<ResticRepository> = Api::namespaced(ctx.client.clone(), &ns);
    let now = ctx.now();
    let written = ctx
        .status
        .update(&api, &name, |_, s| {
            s.statistics = Some(statistics_of(&stats, now))
        })
        .await;
    if let Err(e) = written {
        tracing::warn!(repository = %name, error = %e, "status update failed");
    }
}

/// The status figures of the agent's statistics at `now` (pure).
pub fn statistics_of(stats: &pb::RepositoryStats, now: DateTime<Utc>) -> RepositoryStatistics {
    RepositoryStatistics {
        total_size: Some(format_bytes(stats.total_size)),
        total_size_bytes: i64::try_from(stats.total_size).ok(),
        total_file_count: i64::try_from(stats.total_file_count).ok(),
        snapshot_count: i64::try_from(stats.snapshots_count).ok(),
        update_time: Some(to_time(now)),
    }
}

pub(super) async fn statistics_failed(ctx: &Context, repo: &ResticRepository, why: String) {
    let note = format!("Repository statistics could not be read (the repository stays usable): {why}");
    publish(ctx, repo, EventType::Warning, er::STATISTICS_FAILED, note).await;
}
