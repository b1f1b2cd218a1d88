//! What follows a run's result: its after-hooks (once per run) and its retention, in the
//! repository the run went to.

use kube::runtime::events::EventType;
use restic_operator_api::backup::{ResticBackup, RetentionSpec};
use restic_operator_api::common::{ActiveRun, RunResult, event_reasons as er};
use restic_operator_proto::v1 as pb;

use super::request;
use super::runner::publish;
use super::transition::Outcome;
use crate::context::Context;
use crate::hooks::{self, Phase};
use crate::owner::Owner;
use crate::resolve::{self, ResolveError, Resolved};
use crate::run::CallError;

/// Why a backup's retention did not run or failed.
#[derive(Debug, thiserror::Error)]
pub enum RetentionError {
    #[error("retention failed: {0}")]
    Resolve(#[from] ResolveError),
    #[error("{0}")]
    NoAgent(String),
    #[error("retention failed: {0}")]
    Agent(#[from] CallError),
}

/// Hooks after the run: postBackup on success, onFailure otherwise; once per run, even when
/// its final status could not be written and it is finished again. Returns what goes into
/// the run's message.
pub(super) async fn after_hooks(
    ctx: &Context,
    backup: &ResticBackup,
    active: &ActiveRun,
    outcome: &Outcome,
) -> Vec<String> {
    let first_finish = ctx
        .hooks_ran
        .lock()
        .expect("hooks_ran")
        .insert(active.run_id.clone());
    if !first_finish {
        tracing::info!(run_id = %active.run_id, "after-hooks ran when this run first finished; not again");
    }
    let spec = match outcome.hooks && first_finish {
        true => backup.spec.hooks.clone().unwrap_or_default(),
        false => Default::default(),
    };
    let (phase, hook) = match outcome.result {
        RunResult::Failed => (Phase::OnFailure, spec.on_failure),
        _ => (Phase::PostBackup, spec.post_backup),
    };
    let Some(hook) = hook else {
        return Vec::new();
    };
    match hooks::run(&ctx.client, &Owner::backup(backup), phase, &hook, &active.run_id).await {
        Ok(_) if phase == Phase::OnFailure => vec!["onFailure hook ran".into()],
        Ok(_) => Vec::new(),
        Err(e) => {
            let e = e.to_string();
            publish(ctx, backup, EventType::Warning, er::HOOK_FAILED, e.clone()).await;
            vec![e]
        }
    }
}

/// Retention after a run that made a snapshot, in the repository the run was sent to (after
/// a re-attach that is not known, so it is resolved, and checked, again into `resolved`).
/// `None` when the backup has no retention.
pub(super) async fn retention_after(
    ctx: &Context,
    backup: &ResticBackup,
    active: &ActiveRun,
    resolved: &mut Option<Resolved>,
) -> Option<Result<pb::ForgetSummary, RetentionError>> {
    let spec = backup.active_retention()?;
    let repository = match resolved.take() {
        Some(r) => Ok(r),
        None => resolve::resolve(&ctx.client, backup).await,
    };
    let r = match repository {
        Ok(repository) => {
            let r = apply_retention(ctx, backup, spec, &active.run_id, &repository).await;
            *resolved = Some(repository);
            r
        }
        Err(e) => Err(e.into()),
    };
    match &r {
        Ok(summary) => {
            let note = format!(
                "Retention policy applied, removed {} snapshots ({} kept)",
                summary.removed.len(),
                summary.kept.len()
            );
            publish(ctx, backup, EventType::Normal, er::RETENTION_COMPLETED, note).await
        }
        Err(e) => {
            publish(
                ctx,
                backup,
                EventType::Warning,
                er::RETENTION_FAILED,
                e.to_string(),
            )
            .await
        }
    }
    Some(r)
}

/// Applies the backup's retention after a run that made a snapshot, holding the repository
/// exclusively.
async fn apply_retention(
    ctx: &Context,
    backup: &ResticBackup,
    spec: &RetentionSpec,
    run_id: &str,
    resolved: &Resolved,
) -> Result<pb::ForgetSummary, RetentionError> {
    let request = request::forget(ctx.config.maintenance_timeout, backup, spec, run_id, resolved);
    let forget_id = crate::run::id_of(&request.options);
    let agent = ctx
        .agents
        .any()
        .map_err(|e| RetentionError::NoAgent(e.to_string()))?;
    let _exclusive = ctx.locks.exclusive(&resolved.access().key()).await;
    let ended = ctx
        .dispatch(
            "forget",
            &agent.address,
            &forget_id,
            |mut c| async move { c.forget(request).await },
            &mut crate::run::Quiet,
        )
        .await;
    Ok(ended.succeeded()?.forget.unwrap_or_default())
}
