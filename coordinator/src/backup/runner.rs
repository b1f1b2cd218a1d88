//! One backup run, from pre-hook to final status: the repository resolved once (and refused
//! when the namespace may not use it), placement (a running pod, or a holder pod for a claim
//! no running pod mounts), dispatch to that node's agent, live progress, hooks, retention,
//! events and metrics. The run id and node are in `status.activeRun` before anything is
//! sent, so a restarted coordinator re-attaches with the same id and never starts a second
//! snapshot.

use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use kube::runtime::events::EventType;
use kube::{Api, Resource, ResourceExt};
use restic_operator_api::backup::ResticBackup;
use restic_operator_api::common::{
    ActiveRun, Condition, ObjectReference, RunResult, condition_types as ct, event_reasons as er,
    set_condition,
};
use restic_operator_proto::v1 as pb;

use crate::backup::lookup;
use crate::backup::progress::ProgressWriter;
use crate::backup::request;
use crate::backup::transition::{Finished, Outcome};
use crate::context::Context;
use crate::holder::Holder;
use crate::hooks::{self, Phase};
use crate::repository::to_time;
use crate::resolve::{self, ResolveError, Resolved};
use crate::retention;
use crate::run::{self, Ended};
use crate::sources::{self, Placement, PodVolume};

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

/// Asks the agent to cancel the run in flight (`concurrencyPolicy: Replace`).
pub async fn cancel(ctx: &Context, active: &ActiveRun) {
    let Some(address) = recorded_address(ctx, active) else {
        return;
    };
    if let Ok(mut client) = ctx.agents.client(&address) {
        let _ = client
            .cancel(pb::CancelRequest {
                run_id: active.run_id.clone(),
            })
            .await;
    }
}

/// A run given up on (its agent did not answer for `--agent-lost-timeout`) may still be
/// going on that agent: a network split, or an agent pod gone from the API while its process
/// runs. It is cancelled there as soon as the node's agent answers again, so it cannot
/// overlap the next run. Tried until the run's own timeout, after which the agent has stopped
/// it anyway.
fn cancel_abandoned(ctx: &Arc<Context>, node: &str, run_id: &str) {
    let (ctx2, node, run_id) = (Arc::clone(ctx), node.to_owned(), run_id.to_owned());
    ctx.tasks.spawn_once(
        &abandoned_key(&run_id),
        Box::pin(async move {
            let deadline = tokio::time::Instant::now() + ctx2.config.run_timeout;
            let mut wait = Duration::from_secs(1);
            while tokio::time::Instant::now() < deadline {
                let sent = match ctx2.agents.on_node(&node).and_then(|a| ctx2.agents.client(&a.address)) {
                    Ok(mut client) => client.cancel(pb::CancelRequest { run_id: run_id.clone() }).await,
                    Err(e) => Err(tonic::Status::unavailable(e)),
                };
                match sent {
                    Ok(r) => {
                        let cancelled = r.into_inner().cancelled;
                        tracing::info!(run_id, node, cancelled, "cancelled the abandoned run on its agent");
                        return;
                    }
                    Err(s) if s.code() == tonic::Code::NotFound => return,
                    Err(s) => tracing::debug!(run_id, node, error = %s, "the abandoned run's agent does not answer yet"),
                }
                tokio::time::sleep(wait).await;
                wait = (wait * 2).min(Duration::from_secs(30));
            }
        }),
    );
}

fn abandoned_key(run_id: &str) -> String {
    format!("abandoned/{run_id}")
}

/// Where a placed run went: the agent of the recorded node (holder runs too: the holder only
/// keeps the claim mounted on that node).
fn recorded_address(ctx: &Context, active: &ActiveRun) -> Option<String> {
    active.agent_pod.as_ref()?;
    ctx.agents
        .on_node(active.node_name.as_deref()?)
        .ok()
        .map(|a| a.address)
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
    let started = active.start_time.clone().unwrap_or_else(|| to_time(Utc::now()));
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

/// Hooks after the run: postBackup on success, onFailure otherwise; once per run, even when
/// its final status could not be written and it is finished again. Returns what goes into
/// the run's message.
async fn after_hooks(
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
    match hooks::run(&ctx.client, backup, phase, &hook, &active.run_id).await {
        Ok(_) if phase == Phase::OnFailure => vec!["onFailure hook ran".into()],
        Ok(_) => Vec::new(),
        Err(e) => {
            publish(ctx, backup, EventType::Warning, er::HOOK_FAILED, e.clone()).await;
            vec![e]
        }
    }
}

/// Retention after a run that made a snapshot, in the repository the run was sent to (after
/// a re-attach that is not known, so it is resolved, and checked, again into `resolved`).
/// `None` when the backup has no retention.
async fn retention_after(
    ctx: &Context,
    backup: &ResticBackup,
    active: &ActiveRun,
    resolved: &mut Option<Resolved>,
) -> Option<Result<pb::ForgetSummary, String>> {
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
        Err(e) => Err(format!("retention failed: {e}")),
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
        Err(e) => publish(ctx, backup, EventType::Warning, er::RETENTION_FAILED, e.clone()).await,
    }
    Some(r)
}

/// The holder goes only after the result is in status: until then a restarted coordinator
/// re-attaches to the run it serves. Only a pod that is ours is deleted.
async fn remove_holder(ctx: &Context, api: &Api<ResticBackup>, backup: &ResticBackup, run_id: &str) {
    let in_flight = api
        .get_opt(&backup.name_any())
        .await
        .ok()
        .flatten()
        .and_then(|b| b.status.and_then(|s| s.active_run))
        .is_some_and(|a| a.run_id == run_id);
    if !in_flight && let Some(pvc) = &backup.spec.source.pvc {
        Holder::for_backup(backup, run_id, &pvc.claim_name, &ctx.config.holder_image, true)
            .remove(&ctx.client)
            .await;
    }
}

/// Re-attach, or: resolve the repository, pre-hook, placement, dispatch; following the run to
/// its result.
async fn execute(
    ctx: &Arc<Context>,
    api: &Api<ResticBackup>,
    backup: &ResticBackup,
    active: &ActiveRun,
) -> Outcome {
    if let Some(outcome) = reattach(ctx, api, backup, active).await {
        return outcome;
    }

    // Dereference once: what is checked here is what the agent gets. A refusal comes before
    // any hook, holder or agent call.
    let resolved = match resolve::resolve(&ctx.client, backup).await {
        Ok(r) => r,
        Err(e) => return refuse(ctx, api, backup, active, e).await,
    };

    let hooks_spec = backup.spec.hooks.clone().unwrap_or_default();
    if let Some(h) = &hooks_spec.pre_backup
        && let Err(e) = hooks::run(&ctx.client, backup, Phase::PreBackup, h, &active.run_id).await
    {
        publish(ctx, backup, EventType::Warning, er::HOOK_FAILED, e.clone()).await;
        return Outcome::failed(e);
    }

    let source = match place(ctx, backup, active).await {
        Ok(s) => s,
        Err(outcome) => return outcome,
    };
    let agent = match ctx
        .agents
        .wait_on_node(&source.node, ctx.config.agent_lost_timeout)
        .await
    {
        Ok(agent) => agent,
        Err(e) => return Outcome::failed(format!("{e} (pod {} mounts the volume there)", source.pod)),
    };
    let node = source.node.clone();

    // Record where the run goes before sending it.
    let agent_ref = ObjectReference {
        kind: Some("Pod".into()),
        name: agent.pod.clone(),
        namespace: Some(agent.namespace.clone()),
    };
    let _ = ctx
        .status
        .update(api, &backup.name_any(), |_, s| {
            if let Some(a) = s.active_run.as_mut().filter(|a| a.run_id == active.run_id) {
                a.node_name = Some(node.clone());
                a.agent_pod = Some(agent_ref.clone());
            }
        })
        .await;

    let request = request::backup(ctx.config.run_timeout, backup, active, &resolved, &source);
    let _shared = ctx.locks.shared(&resolved.access().key()).await;
    publish(
        ctx,
        backup,
        EventType::Normal,
        er::BACKUP_STARTED,
        format!("Starting backup {} on node {node}", active.run_id),
    )
    .await;
    let mut progress = ProgressWriter::new(ctx, api, backup, active);
    let ended = ctx
        .dispatch(
            "backup",
            &agent.address,
            &active.run_id,
            |mut c| async move { c.backup(request).await },
            &mut |e| progress.on_event(e),
        )
        .await;
    progress.flush().await;
    let mut outcome = match ended {
        Ended::Result(r) => Outcome::of_agent(*r),
        Ended::Unavailable(e) => {
            cancel_abandoned(ctx, &node, &active.run_id);
            Outcome::failed(format!("agent on node {node} unavailable: {e}"))
        }
        Ended::Unknown => Outcome::failed(format!("the agent on node {node} lost run {}", active.run_id)),
    };
    outcome.resolved = Some(resolved);
    outcome
}

/// Re-attach: the run was placed before a coordinator restart. Once placed, a run is never
/// placed again (another node would not know its id): the recorded node's agent is retried
/// until `agent_lost_timeout`. An agent that answers "unknown run" was never sent it, or has
/// forgotten it: only when the repository holds no snapshot of it is it dispatched (see
/// `lookup`). `None` when the run is to be dispatched.
async fn reattach(
    ctx: &Arc<Context>,
    api: &Api<ResticBackup>,
    backup: &ResticBackup,
    active: &ActiveRun,
) -> Option<Outcome> {
    active.agent_pod.as_ref()?;
    let deadline = tokio::time::Instant::now() + ctx.config.agent_lost_timeout;
    let mut wait = Duration::from_millis(500);
    loop {
        let address = recorded_address(ctx, active);
        let ended = match &address {
            Some(address) => match ctx.agents.client(address) {
                Ok(mut client) => {
                    let mut progress = ProgressWriter::new(ctx, api, backup, active);
                    let ended = run::attach(&mut client, &active.run_id, &mut |e| progress.on_event(e)).await;
                    progress.flush().await;
                    ended
                }
                Err(e) => Ended::Unavailable(e),
            },
            None => Ended::Unavailable(format!(
                "no ready restic agent on node {}",
                active.node_name.as_deref().unwrap_or("(none recorded)")
            )),
        };
        match ended {
            Ended::Result(r) => {
                tracing::info!(run_id = %active.run_id, "re-attached to the run in flight");
                return Some(Outcome::of_agent(*r));
            }
            // Only an agent that answered says "unknown run", so the address is known here;
            // were it not, the run is failed rather than sent without a lookup.
            Ended::Unknown => {
                let Some(address) = address.as_deref() else {
                    return Some(Outcome::failed("the run's agent could not be asked about it"));
                };
                return forgotten(ctx, backup, active, address).await;
            }
            Ended::Unavailable(e) => {
                if tokio::time::Instant::now() > deadline {
                    if let Some(node) = &active.node_name {
                        cancel_abandoned(ctx, node, &active.run_id);
                    }
                    return Some(Outcome::failed(format!("lost the run in flight: {e}")));
                }
                tracing::info!(run_id = %active.run_id, error = %e, "re-attach failed; retrying");
                tokio::time::sleep(wait).await;
                wait = (wait * 2).min(Duration::from_secs(10));
            }
        }
    }
}

/// The recorded agent does not know the run. `None` (dispatch it) only when the repository
/// holds no snapshot of it; its snapshot, when there is one, is the run's result.
async fn forgotten(
    ctx: &Arc<Context>,
    backup: &ResticBackup,
    active: &ActiveRun,
    address: &str,
) -> Option<Outcome> {
    let since = active.start_time.as_ref().map(crate::repository::from_time);
    match lookup::find(ctx, address, backup, &active.run_id, since).await {
        Ok(None) => None,
        Ok(Some((snapshot, resolved))) => {
            tracing::info!(run_id = %active.run_id, snapshot = %snapshot.id, "the agent forgot the run; found its snapshot");
            let mut outcome = Outcome::of_agent(pb::Result {
                outcome: pb::Outcome::Succeeded as i32,
                snapshot_id: snapshot.id.clone(),
                ..Default::default()
            });
            outcome.message = format!(
                "the agent no longer knew run {} (it restarted or forgot it); its snapshot {} is in \
                 the repository, so the run was not sent again",
                active.run_id, snapshot.short_id
            );
            outcome.resolved = Some(resolved);
            Some(outcome)
        }
        Err(e) => Some(Outcome::failed(format!(
            "the agent no longer knew run {}, and the repository could not be searched for its \
             snapshot, so it was not sent again (the next run will be): {e}",
            active.run_id
        ))),
    }
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
                    to_time(Utc::now()),
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

/// The pod volume the run reads: a running pod's, or a holder's started for the claim.
async fn place(ctx: &Context, backup: &ResticBackup, active: &ActiveRun) -> Result<PodVolume, Outcome> {
    let placement = sources::resolve(&ctx.client, backup)
        .await
        .map_err(Outcome::failed)?;
    match placement {
        Placement::Pod(pv) => Ok(pv),
        Placement::Holder { claim, pv_name } => {
            let holder = Holder::for_backup(backup, &active.run_id, &claim, &ctx.config.holder_image, true);
            match holder.start(&ctx.client, ctx.config.holder_start_timeout).await {
                Ok(held) => Ok(PodVolume {
                    pod: held.pod,
                    pod_uid: held.uid,
                    node: held.node,
                    volume: crate::holder::VOLUME.into(),
                    pv_name,
                }),
                Err(e) => {
                    if e.reason() == crate::holder::HOLDER_POD_CONFLICT {
                        publish(ctx, backup, EventType::Warning, e.reason(), e.to_string()).await;
                    }
                    Err(Outcome::failed_because(e.reason(), e.to_string()))
                }
            }
        }
    }
}

/// Applies the backup's retention after a run that made a snapshot, holding the repository
/// exclusively.
async fn apply_retention(
    ctx: &Context,
    backup: &ResticBackup,
    spec: &restic_operator_api::backup::RetentionSpec,
    run_id: &str,
    resolved: &Resolved,
) -> Result<pb::ForgetSummary, String> {
    let forget_id = format!("{run_id}-forget");
    let request = retention::forget_request(
        run::options(&forget_id, ctx.config.maintenance_timeout),
        resolved.agent_repository(),
        &spec.effective_policy(),
        retention::Selection::of_backup(
            backup.effective_hostname(),
            backup.snapshot_tags(),
            &spec.group_by,
        ),
        spec.prune,
    );
    let agent = ctx.agents.any()?;
    let _exclusive = ctx.locks.exclusive(&resolved.access().key()).await;
    match ctx
        .dispatch(
            "forget",
            &agent.address,
            &forget_id,
            |mut c| async move { c.forget(request).await },
            &mut |_| {},
        )
        .await
    {
        Ended::Result(r) if r.outcome == pb::Outcome::Succeeded as i32 => Ok(r.forget.unwrap_or_default()),
        Ended::Result(r) => Err(format!("retention failed: {}", run::describe_failure(&r))),
        Ended::Unavailable(e) => Err(format!("retention failed: {e}")),
        Ended::Unknown => Err("retention failed: the agent lost the run".into()),
    }
}

/// Writes the final status (what `transition` decides), metrics and event, and clears
/// `activeRun`; false when the status could not be written after `--status-write-attempts`,
/// which leaves the run to be re-attached on the next reconcile.
async fn finish(
    ctx: &Context,
    api: &Api<ResticBackup>,
    backup: &ResticBackup,
    active: &ActiveRun,
    started: k8s_openapi::apimachinery::pkg::apis::meta::v1::Time,
    outcome: Outcome,
    retention: Option<Result<pb::ForgetSummary, String>>,
) -> bool {
    let ns = backup.namespace().unwrap_or_default();
    let name = backup.name_any();
    let finished = Finished {
        active,
        started,
        now: Utc::now(),
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
