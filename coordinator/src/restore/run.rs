//! One restore run: the source (backup, repository, credentials) and the snapshot resolved and
//! recorded, the target claim made or found, backups into it waited for, the pre-restore hook,
//! the placement (a running pod or a holder), the run recorded and sent to the node's agent
//! and followed, the post-restore hook, and the end recorded. A run re-entered after the
//! coordinator restarted with the restore already sent only attaches to the agent's run.

use std::sync::Arc;
use std::time::Duration;

use kube::runtime::events::EventType;
use kube::{Api, Resource, ResourceExt};
use restic_operator_api::backup::ResticBackup;
use restic_operator_api::common::{ActiveRun, ObjectReference, RunTrigger, event_reasons as er, reasons};
use restic_operator_api::restore::{ResticRestore, RestoreMode};
use restic_operator_proto::v1 as pb;

use super::transition::{self, Outcome};
use super::{claim_of, publish, select, subpath_of};
use crate::context::Context;
use crate::error::Class;
use crate::holder::Holder;
use crate::hooks::{self, Phase};
use crate::owner::Owner;
use crate::progress::ProgressWriter;
use crate::repository::{from_time, to_time};
use crate::resolve::{self, Resolved};
use crate::run::Ended;
use crate::sources::PodVolume;

/// How often a restore waiting for a backup of its claim looks again.
const WAIT_POLL: Duration = Duration::from_secs(2);

/// Why a run stopped without an end: it is tried again at the next reconcile.
#[derive(Debug)]
struct Retry(String);

/// What a run works with once its source is resolved.
struct Source {
    backup: Option<ResticBackup>,
    resolved: Resolved,
    owner: Owner,
    holder: Holder,
}

/// Starts the run of a restore unless it runs already.
pub fn ensure_running(ctx: &Arc<Context>, ns: &str, name: &str, run_id: &str) {
    let ctx2 = Arc::clone(ctx);
    let (ns, name, run_id) = (ns.to_owned(), name.to_owned(), run_id.to_owned());
    ctx.tasks.spawn_once(
        &format!("restore-run/{run_id}"),
        Box::pin(async move { run(ctx2, ns, name, run_id).await }),
    );
}

async fn run(ctx: Arc<Context>, ns: String, name: String, run_id: String) {
    let api: Api<ResticRestore> = Api::namespaced(ctx.client.clone(), &ns);
    let Ok(Some(restore)) = api.get_opt(&name).await else {
        return; // gone, or the API is down: the next reconcile starts the run again
    };
    if restore.is_finished() || super::run_id(&restore) != run_id {
        return;
    }
    tracing::info!(restore = %format!("{ns}/{name}"), run_id, "restore run");
    let source = match source(&ctx, &restore).await {
        Ok(s) => s,
        Err(Ok(outcome)) => return end(&ctx, &api, &restore, None, outcome).await,
        Err(Err(Retry(why))) => {
            tracing::warn!(restore = %name, why, "restore run stopped; tried again later");
            return;
        }
    };
    let outcome = match execute(&ctx, &api, &restore, &source).await {
        Ok(outcome) => outcome,
        Err(Retry(why)) => {
            tracing::warn!(restore = %name, why, "restore run stopped; tried again later");
            return;
        }
    };
    end(&ctx, &api, &restore, Some(&source), outcome).await;
}

/// Says in status why the run waits (it is tried again at the next reconcile).
async fn note(ctx: &Context, api: &Api<ResticRestore>, restore: &ResticRestore, why: &str) {
    let message = format!("Waiting: {why}; tried again within a minute");
    let _ = ctx
        .status
        .update(api, &restore.name_any(), |_, s| {
            if !s.phase.is_some_and(|p| p.is_finished()) {
                s.message = Some(message.clone());
            }
        })
        .await;
}

/// Records the end (final), publishes it, and removes the holder.
async fn end(
    ctx: &Context,
    api: &Api<ResticRestore>,
    restore: &ResticRestore,
    source: Option<&Source>,
    outcome: Outcome,
) {
    let (now, generation) = (ctx.now(), restore.meta().generation);
    let written = ctx
        .status
        .update(api, &restore.name_any(), |_, s| {
            transition::finish(s, &outcome, generation, now)
        })
        .await;
    if let Err(e) = written {
        tracing::warn!(restore = %restore.name_any(), error = %e, "could not record the end; the run is re-entered");
        return;
    }
    let (type_, reason) = if outcome.completed {
        (EventType::Normal, er::RESTORE_COMPLETED)
    } else {
        (EventType::Warning, er::RESTORE_FAILED)
    };
    publish(ctx, restore, type_, reason, outcome.message.clone()).await;
    if let Some(source) = source {
        source.holder.remove(&ctx.client).await;
    }
}

/// The backup (for `backupRef`), the repository the restore may use and its credentials.
async fn source(ctx: &Context, restore: &ResticRestore) -> Result<Source, Result<Outcome, Retry>> {
    if let Some(why) = super::invalid(restore) {
        return Err(Ok(Outcome::failed(reasons::INVALID_SPEC, why)));
    }
    let ns = restore.namespace().unwrap_or_default();
    let backup = match &restore.spec.backup_ref {
        Some(r) => match Api::<ResticBackup>::namespaced(ctx.client.clone(), &ns)
            .get_opt(&r.name)
            .await
        {
            Ok(Some(b)) => Some(b),
            Ok(None) => {
                let why = format!("ResticBackup {ns}/{} (backupRef) does not exist", r.name);
                return Err(Ok(Outcome::failed(reasons::INVALID_SPEC, why)));
            }
            Err(e) => return Err(Err(Retry(e.to_string()))),
        },
        None => None,
    };
    let repo_ref = super::repository_of(restore, backup.as_ref())
        .cloned()
        .unwrap_or_default();
    let resolved = match resolve::resolve_for(&ctx.client, &ns, &repo_ref).await {
        Ok(r) => r,
        Err(e) if e.class() == Class::Temporary => return Err(Err(Retry(e.to_string()))),
        Err(e) => return Err(Ok(Outcome::failed(e.reason(), e.to_string()))),
    };
    let owner = Owner::restore(restore, backup.as_ref());
    let image = &ctx.config.holder_image;
    let holder = Holder::new(&owner, &super::run_id(restore), &claim_of(restore), image, false);
    Ok(Source {
        backup,
        resolved,
        owner,
        holder,
    })
}

/// The run from where it stands: attached to if it was sent, else from its start.
async fn execute(
    ctx: &Arc<Context>,
    api: &Api<ResticRestore>,
    restore: &ResticRestore,
    source: &Source,
) -> Result<Outcome, Retry> {
    let status = restore.status.clone().unwrap_or_default();
    if let Some(active) = status.active_run.filter(|a| a.node_name.is_some()) {
        // Backups of the claim started since the restart wait until it is done.
        let _claim = claim_alone(ctx, restore).await;
        let restored = reattach(ctx, api, restore, &active).await;
        return Ok(after(ctx, restore, source, restored).await);
    }
    let snapshot = match status.restored_snapshot.clone() {
        Some(id) => pb::Snapshot {
            time_unix_ms: status
                .snapshot_time
                .as_ref()
                .map_or(0, |t| from_time(t).timestamp_millis()),
            short_id: id.chars().take(8).collect(),
            id,
            ..Default::default()
        },
        None => match snapshot(ctx, restore, source).await {
            Ok(s) => s,
            Err(Ok(outcome)) => return Ok(outcome),
            Err(Err(retry)) => {
                note(ctx, api, restore, &retry.0).await;
                return Err(retry);
            }
        },
    };
    let (now, generation) = (ctx.now(), restore.meta().generation);
    let claim = claim_of(restore);
    let mut changed = false;
    ctx.status
        .update(api, &restore.name_any(), |fresh, s| {
            // A spec changed while Pending runs as it is now, never as it was read.
            changed = fresh.meta().generation != generation;
            if !changed {
                transition::started(s, &snapshot, &claim, generation, now)
            }
        })
        .await
        .map_err(|e| Retry(e.to_string()))?;
    if changed {
        return Err(Retry(
            "the spec changed before the restore started; it starts again with the new one".into(),
        ));
    }
    if status.restored_snapshot.is_none() {
        let note = format!("Restoring snapshot {} into claim {claim}", snapshot.short_id);
        publish(ctx, restore, EventType::Normal, er::RESTORE_STARTED, note).await;
    }
    // Backups of the claim (from this coordinator) wait while the restore writes into it:
    // taken once the backups in flight have ended, as they would wait for it.
    let _claim = match prepare(ctx, restore).await {
        Ok(()) => claim_alone(ctx, restore).await,
        Err(outcome) => return Ok(after(ctx, restore, source, outcome).await),
    };
    if let Err(outcome) = pre_restore(ctx, restore, source).await {
        return Ok(after(ctx, restore, source, outcome).await);
    }
    let restored = restore_on_agent(ctx, api, restore, source, &snapshot.id).await;
    Ok(after(ctx, restore, source, restored).await)
}

/// The restore's claim, held alone (after the backups and restores of it that hold it now,
/// with an event when it has to wait).
async fn claim_alone(ctx: &Context, restore: &ResticRestore) -> tokio::sync::OwnedRwLockWriteGuard<()> {
    let key = crate::locks::claim_key(&restore.namespace().unwrap_or_default(), &claim_of(restore));
    if let Some(guard) = ctx.locks.try_exclusive(&key) {
        return guard;
    }
    let note = format!(
        "Waiting for the backups and restores of claim {} to finish",
        claim_of(restore)
    );
    publish(ctx, restore, EventType::Normal, er::RESTORE_WAITING, note).await;
    ctx.locks.exclusive(&key).await
}

/// Lists the repository's snapshots and picks the restore's. No agent, or a repository that
/// cannot be read now, is tried again later; only a definite answer ends the restore.
async fn snapshot(
    ctx: &Context,
    restore: &ResticRestore,
    source: &Source,
) -> Result<pb::Snapshot, Result<Outcome, Retry>> {
    let agent = ctx.agents.any().map_err(|e| Err(Retry(e.to_string())))?;
    // Listing is read-only: each try is a run of its own.
    let id = format!("{}-snapshots-{}", super::run_id(restore), ctx.now().timestamp());
    let request = pb::SnapshotsRequest {
        options: Some(crate::run::options(&id, ctx.config.stats_timeout)),
        repository: Some(source.resolved.agent_repository()),
        ..Default::default()
    };
    let ended = ctx
        .dispatch(
            "snapshots",
            &agent.address,
            &id,
            |mut c| async move { c.snapshots(request).await },
            &mut crate::run::Quiet,
        )
        .await;
    let listed = ended.succeeded().map_err(|e| {
        let why = format!("listing the repository's snapshots: {e}");
        let definite = matches!(
            e.failure(),
            Some(
                pb::FailureKind::WrongPassword
                    | pb::FailureKind::RepositoryNotFound
                    | pb::FailureKind::InvalidRequest
            )
        );
        if definite {
            Ok(Outcome::failed(reasons::RESTORE_FAILED, why))
        } else {
            Err(Retry(why))
        }
    })?;
    let repo_ns = source
        .resolved
        .access()
        .repository()
        .namespace()
        .unwrap_or_default();
    let criteria = super::criteria(restore, source.backup.as_ref(), &repo_ns);
    select::select(&listed.snapshots, &criteria)
        .cloned()
        .map_err(|e| Ok(Outcome::failed(reasons::SNAPSHOT_NOT_FOUND, e.0)))
}

/// Before any write: the new claim made, and the backups of the claim in flight waited for.
async fn prepare(ctx: &Context, restore: &ResticRestore) -> Result<(), Outcome> {
    if let Some(new) = &restore.spec.target.new_pvc {
        super::target::ensure_claim(&ctx.client, restore, new)
            .await
            .map_err(|e| Outcome::failed(e.reason(), e.to_string()))?;
    }
    wait_for_backups(ctx, restore).await
}

/// The pre-restore hook, once per run in this process; its failure ends the restore before
/// any write.
async fn pre_restore(ctx: &Context, restore: &ResticRestore, source: &Source) -> Result<(), Outcome> {
    let Some(hook) = restore.spec.hooks.as_ref().and_then(|h| h.pre_restore.as_ref()) else {
        return Ok(());
    };
    let key = format!("{}/pre", super::run_id(restore));
    if ctx.hooks_ran.lock().expect("hooks_ran").contains(&key) {
        return Ok(());
    }
    match hooks::run(
        &ctx.client,
        &source.owner,
        Phase::PreRestore,
        hook,
        &super::run_id(restore),
    )
    .await
    {
        Ok(_) => {
            ctx.hooks_ran.lock().expect("hooks_ran").insert(key);
            Ok(())
        }
        Err(e) => {
            let e = format!("{e}; nothing was restored");
            publish(ctx, restore, EventType::Warning, er::HOOK_FAILED, e.clone()).await;
            Err(Outcome::failed(reasons::HOOK_FAILED, e))
        }
    }
}

/// Waits while a backup of the restore's claim is in flight (its snapshot would mix old and
/// restored files), with one event saying so, for at most `--run-timeout`.
async fn wait_for_backups(ctx: &Context, restore: &ResticRestore) -> Result<(), Outcome> {
    let (ns, claim) = (restore.namespace().unwrap_or_default(), claim_of(restore));
    let mut told = false;
    let deadline = tokio::time::Instant::now() + ctx.config.run_timeout;
    loop {
        if tokio::time::Instant::now() > deadline {
            let why = format!(
                "a backup of claim {claim} was still in flight (or backups could not be listed) after {}s; \
                 nothing was restored",
                ctx.config.run_timeout.as_secs()
            );
            return Err(Outcome::failed(reasons::RESTORE_FAILED, why));
        }
        match super::target::backup_reading(&ctx.client, &ns, &claim).await {
            Ok(Some(backup)) => {
                if !told {
                    let note = format!("Waiting for backup {backup} of claim {claim} to finish");
                    publish(ctx, restore, EventType::Normal, er::RESTORE_WAITING, note).await;
                    told = true;
                }
                tokio::time::sleep(WAIT_POLL).await;
            }
            Ok(None) => return Ok(()),
            Err(e) => {
                tracing::warn!(error = %e, "listing backups of the restore's claim");
                tokio::time::sleep(WAIT_POLL).await;
            }
        }
    }
}

/// The placement, the node's agent, the run recorded and sent, followed to its end.
async fn restore_on_agent(
    ctx: &Context,
    api: &Api<ResticRestore>,
    restore: &ResticRestore,
    source: &Source,
    snapshot_id: &str,
) -> Outcome {
    let ns = restore.namespace().unwrap_or_default();
    let claim = claim_of(restore);
    let timeout = ctx.config.holder_start_timeout;
    let volume = match super::target::place(&ctx.client, &ns, &claim, &source.holder, timeout).await {
        Ok(v) => v,
        Err(e) => return Outcome::failed(e.reason(), e.to_string()),
    };
    let agent = match ctx
        .agents
        .wait_on_node(&volume.node, ctx.config.agent_lost_timeout)
        .await
    {
        Ok(a) => a,
        Err(e) => {
            let why = format!("{e} (pod {} mounts claim {claim} there)", volume.pod);
            return Outcome::failed(reasons::AGENT_UNAVAILABLE, why);
        }
    };
    let active = ActiveRun {
        run_id: super::run_id(restore),
        trigger: Some(RunTrigger::Once),
        start_time: restore
            .status
            .as_ref()
            .and_then(|s| s.start_time.clone())
            .or(Some(to_time(ctx.now()))),
        node_name: Some(volume.node.clone()),
        agent_pod: Some(ObjectReference {
            kind: Some("Pod".into()),
            name: agent.pod.clone(),
            namespace: Some(agent.namespace.clone()),
        }),
        ..Default::default()
    };
    // The repository's lock first: the run is recorded right before it is sent, so a
    // restarted coordinator that finds it recorded finds it on the agent.
    let key = source.resolved.access().key();
    let _shared = ctx.locks.shared(&key).await;
    let request = request(ctx, restore, source, &volume, snapshot_id);
    let recorded = ctx
        .status
        .update(api, &restore.name_any(), |_, s| {
            transition::dispatched(s, &active)
        })
        .await;
    if let Err(e) = recorded {
        return Outcome::failed(
            reasons::RESTORE_FAILED,
            format!("could not record the run before sending it: {e}"),
        );
    }
    let mut progress = ProgressWriter::new(ctx, api, restore, &active);
    let ended = ctx
        .dispatch(
            "restore",
            &agent.address,
            &active.run_id,
            |mut c| async move { c.restore(request).await },
            &mut progress,
        )
        .await;
    progress.flush().await;
    ended_outcome(ended, &volume.node)
}

/// A restore sent before the coordinator restarted: attached to on its node's agent.
async fn reattach(
    ctx: &Context,
    api: &Api<ResticRestore>,
    restore: &ResticRestore,
    active: &ActiveRun,
) -> Outcome {
    let node = active.node_name.clone().unwrap_or_default();
    let agent = match ctx
        .agents
        .wait_on_node(&node, ctx.config.agent_lost_timeout)
        .await
    {
        Ok(a) => a,
        Err(e) => {
            let why = format!("{e}; the restore was sent to it, so the claim may hold part of the snapshot");
            return Outcome::failed(reasons::AGENT_UNAVAILABLE, why);
        }
    };
    let mut progress = ProgressWriter::new(ctx, api, restore, active);
    let ended = match ctx.agents.client(&agent.address) {
        Ok(mut client) => crate::run::attach(&mut client, &active.run_id, &mut progress).await,
        Err(e) => Ended::Unavailable(e.to_string()),
    };
    progress.flush().await;
    ended_outcome(ended, &node)
}

fn ended_outcome(ended: Ended, node: &str) -> Outcome {
    let unsure = "the claim may hold part of the snapshot; check it, or restore again with mode Overwrite";
    match ended {
        Ended::Result(r) => Outcome::of_agent(*r),
        Ended::Unavailable(e) => Outcome::failed(
            reasons::AGENT_UNAVAILABLE,
            format!("agent on node {node} unavailable: {e}; {unsure}"),
        ),
        Ended::Unknown => Outcome::failed(
            reasons::RESTORE_FAILED,
            format!("the agent on node {node} no longer knows the restore (it restarted); {unsure}"),
        ),
    }
}

/// The agent's request (pure but for the configuration).
fn request(
    ctx: &Context,
    restore: &ResticRestore,
    source: &Source,
    volume: &PodVolume,
    snapshot_id: &str,
) -> pb::RestoreRequest {
    let mut options = crate::run::options(&super::run_id(restore), ctx.config.run_timeout);
    options.restic = Some(pb::ResticOptions {
        extra_args: restore
            .spec
            .options
            .as_ref()
            .map(|o| o.extra_args.clone())
            .unwrap_or_default(),
        use_cache: source.resolved.access().use_cache(),
        cache_size_bytes: source.resolved.access().cache_size_bytes(),
        ..Default::default()
    });
    let mode = match restore.effective_mode() {
        RestoreMode::IfEmpty => pb::RestoreMode::IfEmpty,
        RestoreMode::Overwrite => pb::RestoreMode::Overwrite,
        RestoreMode::Mirror => pb::RestoreMode::Mirror,
    };
    pb::RestoreRequest {
        options: Some(options),
        repository: Some(source.resolved.agent_repository()),
        volume: Some(pb::VolumeRef {
            pod_uid: volume.pod_uid.clone(),
            volume_name: volume.volume.clone(),
            pv_name: volume.pv_name.clone(),
        }),
        snapshot_id: snapshot_id.to_owned(),
        snapshot_path: super::snapshot_path_of(restore, source.backup.as_ref()),
        target_subpath: subpath_of(restore),
        include_paths: restore.spec.include_paths.clone(),
        exclude_paths: restore.spec.exclude_paths.clone(),
        mode: mode as i32,
        verify: restore.spec.options.as_ref().is_some_and(|o| o.verify),
        ..Default::default()
    }
}

/// The post-restore hook (whatever happened before it), its failure added to the outcome.
async fn after(ctx: &Context, restore: &ResticRestore, source: &Source, outcome: Outcome) -> Outcome {
    let Some(hook) = restore.spec.hooks.as_ref().and_then(|h| h.post_restore.as_ref()) else {
        return outcome;
    };
    match hooks::run(
        &ctx.client,
        &source.owner,
        Phase::PostRestore,
        hook,
        &super::run_id(restore),
    )
    .await
    {
        Ok(_) => outcome,
        Err(e) => {
            publish(ctx, restore, EventType::Warning, er::HOOK_FAILED, e.to_string()).await;
            let failed = Outcome {
                completed: false,
                reason: reasons::HOOK_FAILED,
                ..outcome
            };
            failed.and(Some(e.to_string()))
        }
    }
}
