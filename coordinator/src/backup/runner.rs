//! One backup run, from pre-hook to final status: the repository resolved once (and refused
//! when the namespace may not use it), placement (a running pod, or a holder pod for a claim
//! no running pod mounts), dispatch to that node's agent, live progress, hooks, retention,
//! events and metrics. The run id and node are in `status.activeRun` before anything is
//! sent, so a restarted coordinator re-attaches with the same id and never starts a second
//! snapshot.

use std::sync::Arc;
use std::time::Duration;

use kube::runtime::events::EventType;
use kube::{Api, Resource, ResourceExt};
use restic_operator_api::backup::ResticBackup;
use restic_operator_api::common::{
    ActiveRun, Condition, RunResult, condition_types as ct, event_reasons as er, set_condition,
};

use super::after::{after_hooks, retention_after};
use super::attempt::{attempt, next_attempt};
use super::cancel::abandoned_key;
use super::finish::finish;
use super::reattach::reattach;
use super::transition::{Outcome, attempts_note, retry};
use crate::context::Context;
use crate::holder::Holder;
use crate::hooks::{self, Phase};
use crate::owner::Owner;
use crate::repository::to_time;
use crate::resolve::{self, ResolveError, Resolved};

/// Starts the runner of run `run_id` of a backup unless it runs already. The runner takes
/// the run from the live object's `status.activeRun`.
pub fn ensure_running(ctx: &Arc<Context>, ns: &str, name: &str, run_id: &str) {
    let key = format!("backup-run/{run_id}");
    // A run given up on that comes back (its failure could not be written) is no longer to
    // be cancelled.
    if !ctx.tasks.is_running(&key) {
        ctx.tasks.abort(&abandoned_key(run_id));
    }
    let ctx2 = Arc::clone(ctx);
    let (ns, name, run_id) = (ns.to_owned(), name.to_owned(), run_id.to_owned());
    ctx.tasks.spawn_once(
        &key,
        Box::pin(async move {
            run(ctx2, ns, name, run_id).await;
        }),
    );
}

pub async fn publish(ctx: &Context, backup: &ResticBackup, type_: EventType, reason: &str, note: String) {
    crate::context::publish(&ctx.backup_events, backup, type_, reason, note).await;
}

async fn run(ctx: Arc<Context>, ns: String, name: String, run_id: String) {
    let api: Api<ResticBackup> = Api::namespaced(ctx.client.clone(), &ns);
    let Some((backup, active)) = load(&api, &name, &run_id).await else {
        return;
    };
    tracing::info!(backup = %format!("{ns}/{name}"), run_id = %active.run_id, "run");
    let started = active.start_time.clone().unwrap_or_else(|| to_time(ctx.now()));
    let mut outcome = execute(&ctx, &api, &backup, &active).await;

    let notes = after_hooks(&ctx, &backup, &active, &outcome).await;
    let mut resolved = outcome.resolved.take();
    let retention = match outcome.result {
        RunResult::Failed => None,
        _ => retention_after(&ctx, &backup, &active, &mut resolved).await,
    };
    if !notes.is_empty() {
        outcome.message = [outcome.message.clone(), notes.join("; ")]
            .into_iter()
            .filter(|s| !s.is_empty())
            .collect::<Vec<_>>()
            .join("; ");
    }
    let made_snapshot = outcome.result != RunResult::Failed;
    if finish(&ctx, &api, &backup, &active, started, outcome, retention).await {
        ctx.hooks_ran.lock().expect("hooks_ran").remove(&run_id);
    }
    if made_snapshot && let Some(resolved) = &resolved {
        let repo = resolved.access().repository();
        crate::repository::refresh_soon(&ctx, &repo.namespace().unwrap_or_default(), &repo.name_any());
    }
    remove_holder(&ctx, &api, &backup, &run_id).await;
    ctx.forget_cancel(&run_id);
}

/// The backup and its run `run_id` as the live object records them; `None` when the backup is
/// gone or its status has moved on (another replica, or this run already finished).
async fn load(api: &Api<ResticBackup>, name: &str, run_id: &str) -> Option<(ResticBackup, ActiveRun)> {
    let mut wait = Duration::from_secs(1);
    let backup = loop {
        match api.get_opt(name).await {
            Ok(Some(b)) => break b,
            Ok(None) => return None,
            Err(e) => {
                tracing::warn!(backup = %name, error = %e, "could not read the backup; retrying");
                tokio::time::sleep(wait).await;
                wait = (wait * 2).min(Duration::from_secs(30));
            }
        }
    };
    let active = backup
        .status
        .as_ref()
        .and_then(|s| s.active_run.clone())
        .filter(|a| a.run_id == run_id)?;
    Some((backup, active))
}

/// The holder (or dump pod) goes only after the result is in status: until then a restarted
/// coordinator re-attaches to the run it serves. Only a pod that is ours is deleted.
async fn remove_holder(ctx: &Context, api: &Api<ResticBackup>, backup: &ResticBackup, run_id: &str) {
    let in_flight = api
        .get_opt(&backup.name_any())
        .await
        .ok()
        .flatten()
        .and_then(|b| b.status.and_then(|s| s.active_run))
        .is_some_and(|a| a.run_id == run_id);
    if !in_flight && let Some(pvc) = &backup.spec.source.pvc {
        Holder::new(
            &Owner::backup(backup),
            run_id,
            &pvc.claim_name,
            &ctx.config.holder_image,
            true,
        )
        .remove(&ctx.client)
        .await;
    }
    if !in_flight && backup.spec.source.custom_source.is_some() {
        let (ns, uid) = (
            backup.namespace().unwrap_or_default(),
            backup.uid().unwrap_or_default(),
        );
        let name = crate::dump::dump_name(&backup.name_any(), run_id);
        crate::dump::remove(&ctx.client, &ns, &name, &uid).await;
    }
}

/// Re-attach, or: resolve the repository, pre-hook, then attempts (placement, dispatch)
/// until one ends the run; following each to its result.
async fn execute(
    ctx: &Arc<Context>,
    api: &Api<ResticBackup>,
    backup: &ResticBackup,
    active: &ActiveRun,
) -> Outcome {
    let mut active = active.clone();
    let (mut outcome, mut resolved) = match reattach(ctx, api, backup, &active).await {
        Some(outcome) => (outcome, None),
        None => match prepare(ctx, api, backup, &active).await {
            Ok(resolved) => (
                attempt(ctx, api, backup, &active, &resolved).await,
                Some(resolved),
            ),
            Err(outcome) => return outcome,
        },
    };
    let limit = backup
        .spec
        .job_config
        .as_ref()
        .and_then(|j| j.backoff_limit)
        .unwrap_or(0);
    let mut earlier = Vec::new();
    let mut stopped = false;
    while retry(&outcome, active.attempt.unwrap_or(1), limit) {
        let failed = active.attempt.unwrap_or(1);
        earlier.push(format!("attempt {failed} failed: {}", outcome.message));
        active = match next_attempt(ctx, api, backup, &active, outcome, limit).await {
            Ok(next) => next,
            Err(ended) => {
                (outcome, stopped) = (ended, true);
                break;
            }
        };
        // After a re-attach the repository is not known yet: resolved, and checked, again.
        let repository = match resolved.take() {
            Some(r) => r,
            None => match resolve::resolve(&ctx.client, backup).await {
                Ok(r) => r,
                Err(e) => return refuse(ctx, api, backup, &active, e).await,
            },
        };
        outcome = attempt(ctx, api, backup, &active, &repository).await;
        resolved = Some(repository);
    }
    if !earlier.is_empty() {
        let note = match stopped {
            true => earlier.join("; "),
            false => attempts_note(active.attempt.unwrap_or(1), limit + 1, &earlier),
        };
        outcome.message = [outcome.message.clone(), note]
            .into_iter()
            .filter(|s| !s.is_empty())
            .collect::<Vec<_>>()
            .join("; ");
    }
    outcome.resolved = outcome.resolved.take().or(resolved);
    outcome
}

/// What comes once per run before its first attempt: the repository dereferenced (what is
/// checked here is what the agent gets; a refusal comes before any hook, holder or agent
/// call), then the preBackup hook.
async fn prepare(
    ctx: &Arc<Context>,
    api: &Api<ResticBackup>,
    backup: &ResticBackup,
    active: &ActiveRun,
) -> Result<Resolved, Outcome> {
    let resolved = match resolve::resolve(&ctx.client, backup).await {
        Ok(r) => r,
        Err(e) => return Err(refuse(ctx, api, backup, active, e).await),
    };
    // A later attempt (its run re-attached after a coordinator restart) had its preBackup.
    let first = active.attempt.unwrap_or(1) <= 1;
    if let Some(h) = backup.spec.hooks.as_ref().and_then(|h| h.pre_backup.as_ref())
        && first
        && let Err(e) = hooks::run(
            &ctx.client,
            &Owner::backup(backup),
            Phase::PreBackup,
            h,
            &active.run_id,
        )
        .await
    {
        let e = e.to_string();
        publish(ctx, backup, EventType::Warning, er::HOOK_FAILED, e.clone()).await;
        return Err(Outcome::failed(e));
    }
    Ok(resolved)
}

/// A run whose repository could not be resolved ends here, having sent nothing. A namespace
/// the repository does not allow gets the same condition and event as a refusal at
/// reconcile time.
async fn refuse(
    ctx: &Context,
    api: &Api<ResticBackup>,
    backup: &ResticBackup,
    active: &ActiveRun,
    e: ResolveError,
) -> Outcome {
    let message = e.to_string();
    // Refusals: what the namespace may not do with this repository. Other failures (a
    // missing Secret, the API server) are ordinary failed runs.
    let event_reason = match e {
        ResolveError::NamespaceNotAllowed { .. } => er::NAMESPACE_NOT_ALLOWED,
        _ => return Outcome::failed_because(e.reason(), message),
    };
    let reason = e.reason();
    let generation = backup.meta().generation;
    let _ = ctx
        .status
        .update(api, &backup.name_any(), |_, s| {
            set_condition(
                &mut s.conditions,
                Condition::new(
                    ct::REPOSITORY_READY,
                    false,
                    reason,
                    message.clone(),
                    generation,
                    to_time(ctx.now()),
                ),
            );
        })
        .await;
    publish(
        ctx,
        backup,
        EventType::Warning,
        event_reason,
        format!("Run {} refused: {message}", active.run_id),
    )
    .await;
    Outcome {
        hooks: false,
        ..Outcome::failed_because(reason, format!("refused: {message}"))
    }
}
