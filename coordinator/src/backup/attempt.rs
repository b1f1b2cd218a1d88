//! One attempt of a run: placement (a running pod, or a holder pod for a claim no running pod
//! mounts), the node's agent, the placement recorded in `status.activeRun`, and the backup
//! sent and followed to its result; and the step to the next attempt when
//! `jobConfig.backoffLimit` allows one.

use std::sync::Arc;
use std::time::Duration;

use kube::runtime::events::EventType;
use kube::{Api, ResourceExt};
use restic_operator_api::backup::ResticBackup;
use restic_operator_api::common::{ActiveRun, ObjectReference, event_reasons as er, reasons};
use restic_operator_api::repository::ResticRepository;
use restic_operator_proto::v1 as pb;

use super::cancel::cancel_abandoned;
use super::request;
use super::runner::publish;
use super::transition::{Outcome, retry_delay};
use crate::agents::AgentEndpoint;
use crate::context::Context;
use crate::holder::Holder;
use crate::owner::Owner;
use crate::progress::ProgressWriter;
use crate::resolve::Resolved;
use crate::run::Ended;
use crate::sources::{self, Placement, PodVolume};

/// One attempt: placement, the node's agent, the placement recorded, the backup sent and
/// followed to its result.
pub(super) async fn attempt(
    ctx: &Arc<Context>,
    api: &Api<ResticBackup>,
    backup: &ResticBackup,
    active: &ActiveRun,
    resolved: &Resolved,
) -> Outcome {
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
    if let Some(cancelled) = cancelled(ctx, active) {
        return cancelled;
    }
    let _claim = claim_shared(ctx, backup, active).await;
    record_placement(ctx, api, backup, active, &source.node, &agent).await;
    let request = request::backup(ctx.config.run_timeout, backup, active, resolved, &source);
    send(
        ctx,
        api,
        backup,
        active,
        &agent,
        request,
        resolved.access().repository(),
    )
    .await
}

/// For a backup of a claim: the claim shared with its other backups, after any restore into
/// it (with a `ClaimBusy` event when it has to wait), so no snapshot mixes old and restored
/// files.
async fn claim_shared(
    ctx: &Context,
    backup: &ResticBackup,
    active: &ActiveRun,
) -> Option<tokio::sync::OwnedRwLockReadGuard<()>> {
    let claim = &backup.spec.source.pvc.as_ref()?.claim_name;
    let key = crate::locks::claim_key(&backup.namespace().unwrap_or_default(), claim);
    if let Some(guard) = ctx.locks.try_shared(&key) {
        return Some(guard);
    }
    let note = format!(
        "Run {} waits for a restore into claim {claim} to finish",
        active.run_id
    );
    publish(ctx, backup, EventType::Normal, er::CLAIM_BUSY, note).await;
    Some(ctx.locks.shared(&key).await)
}

/// After a failed attempt that is to be retried: the next attempt's number goes into
/// `status.activeRun` (unplaced, so a restarted coordinator starts it rather than asking the
/// failed attempt's agent; its progress cleared), an event says why, and the backoff is
/// waited. `Err` ends the run instead: the backup is gone, its status has moved on to
/// another run, or the run was cancelled (`concurrencyPolicy: Replace`) during the backoff.
pub(super) async fn next_attempt(
    ctx: &Context,
    api: &Api<ResticBackup>,
    backup: &ResticBackup,
    active: &ActiveRun,
    failed: Outcome,
    limit: i32,
) -> Result<ActiveRun, Outcome> {
    let next = ActiveRun {
        attempt: Some(active.attempt.unwrap_or(1) + 1),
        node_name: None,
        agent_pod: None,
        ..active.clone()
    };
    let live = ctx
        .status
        .update(api, &backup.name_any(), |_, s| {
            if let Some(a) = s.active_run.as_mut().filter(|a| a.run_id == next.run_id) {
                *a = next.clone();
                s.progress = None;
            }
        })
        .await;
    let ours = |b: &ResticBackup| {
        let a = b.status.as_ref().and_then(|s| s.active_run.as_ref());
        a.is_some_and(|a| a.run_id == next.run_id)
    };
    match live {
        Ok(Some(b)) if !ours(&b) => return Err(failed),
        Ok(None) => return Err(failed),
        // Not recorded: a restarted coordinator asks the failed attempt's agent, gets its
        // failure and retries from there.
        Ok(Some(_)) | Err(_) => {}
    }
    let n = next.attempt.unwrap_or(2);
    let delay = retry_delay(n);
    let note = format!(
        "Attempt {} of run {} failed ({}); attempt {n} of {} in {}s",
        n - 1,
        active.run_id,
        failed.message,
        limit + 1,
        delay.as_secs()
    );
    publish(ctx, backup, EventType::Warning, er::BACKUP_RETRYING, note).await;
    let until = tokio::time::Instant::now() + delay;
    while tokio::time::Instant::now() < until {
        if let Some(cancelled) = cancelled(ctx, &next) {
            return Err(cancelled);
        }
        let left = until.saturating_duration_since(tokio::time::Instant::now());
        tokio::time::sleep(left.min(Duration::from_secs(1))).await;
    }
    Ok(next)
}

/// The outcome of a run cancelled (`concurrencyPolicy: Replace`) before its attempt was sent.
pub(super) fn cancelled(ctx: &Context, active: &ActiveRun) -> Option<Outcome> {
    ctx.cancel_requested(&active.run_id).then(|| {
        Outcome::of_agent(pb::Result {
            outcome: pb::Outcome::Cancelled as i32,
            failure: pb::FailureKind::Cancelled as i32,
            reason: format!(
                "cancelled before attempt {} was sent",
                active.attempt.unwrap_or(1)
            ),
            ..Default::default()
        })
    })
}

/// Records where the run goes (`activeRun.nodeName` and `agentPod`) before it is sent, so a
/// restarted coordinator asks that agent and never places the run again.
async fn record_placement(
    ctx: &Context,
    api: &Api<ResticBackup>,
    backup: &ResticBackup,
    active: &ActiveRun,
    node: &str,
    agent: &AgentEndpoint,
) {
    let agent_ref = ObjectReference {
        kind: Some("Pod".into()),
        name: agent.pod.clone(),
        namespace: Some(agent.namespace.clone()),
    };
    let _ = ctx
        .status
        .update(api, &backup.name_any(), |_, s| {
            if let Some(a) = s.active_run.as_mut().filter(|a| a.run_id == active.run_id) {
                a.node_name = Some(node.to_owned());
                a.agent_pod = Some(agent_ref.clone());
            }
        })
        .await;
}

/// Sends the backup to `agent` (sharing the repository `repository` with other backups) and
/// follows it, writing its progress, to how it ended.
async fn send(
    ctx: &Arc<Context>,
    api: &Api<ResticBackup>,
    backup: &ResticBackup,
    active: &ActiveRun,
    agent: &AgentEndpoint,
    request: pb::BackupRequest,
    repo: &ResticRepository,
) -> Outcome {
    let (node, address) = (agent.node.as_str(), agent.address.as_str());
    let repository = &crate::status::key_of(repo);
    let _shared = match ctx.locks.try_shared(repository) {
        Some(guard) => guard,
        None => {
            let note = format!(
                "Run {} waits for retention, a prune or a check of repository {repository} to finish",
                active.run_id
            );
            publish(ctx, backup, EventType::Normal, er::REPOSITORY_BUSY, note).await;
            ctx.locks.shared(repository).await
        }
    };
    let note = match active.attempt.unwrap_or(1) {
        ..=1 => format!("Starting backup {} on node {node}", active.run_id),
        n => format!("Starting backup {} (attempt {n}) on node {node}", active.run_id),
    };
    publish(ctx, backup, EventType::Normal, er::BACKUP_STARTED, note).await;
    let mut progress = ProgressWriter::new(ctx, api, backup, active);
    let run_id = request::agent_run_id(active);
    let ended = ctx
        .dispatch(
            "backup",
            address,
            &run_id,
            |mut c| async move { c.backup(request).await },
            &mut crate::repository::watching(
                ctx,
                &repo.namespace().unwrap_or_default(),
                &repo.name_any(),
                &mut progress,
            ),
        )
        .await;
    progress.flush().await;
    match ended {
        Ended::Result(r) => Outcome::of_agent(*r),
        Ended::Unavailable(e) => {
            cancel_abandoned(ctx, node, active);
            Outcome::uncertain(format!("agent on node {node} unavailable: {e}"))
        }
        Ended::Unknown => Outcome::uncertain(format!("the agent on node {node} lost run {}", active.run_id)),
    }
}

/// The dump pod's volume, once its dump is written (a customSource).
async fn dump(ctx: &Context, backup: &ResticBackup, active: &ActiveRun) -> Result<PodVolume, Outcome> {
    let source = backup.spec.source.custom_source.clone().unwrap_or_default();
    if let Some(why) = crate::dump::refused(&source) {
        let e = crate::dump::DumpError::Refused(why);
        return Err(Outcome {
            permanent: true,
            ..Outcome::failed_because(reasons::INVALID_SPEC, e.to_string())
        });
    }
    let owner = Owner::backup(backup);
    let pod = crate::dump::dump_pod(&owner, &active.run_id, &source, &ctx.config.holder_image);
    match crate::dump::run(&ctx.client, &pod, &owner.uid, ctx.config.run_timeout).await {
        Ok(d) => Ok(PodVolume {
            pod: d.pod,
            pod_uid: d.uid,
            node: d.node,
            volume: crate::dump::VOLUME.into(),
            pv_name: String::new(),
        }),
        Err(e) => Err(Outcome::failed(e.to_string())),
    }
}

/// The pod volume the run reads: a running pod's, or a holder's started for the claim.
async fn place(ctx: &Context, backup: &ResticBackup, active: &ActiveRun) -> Result<PodVolume, Outcome> {
    let placement = sources::resolve(&ctx.client, backup).await.map_err(|e| Outcome {
        permanent: !e.retryable(),
        ..Outcome::failed_because(e.reason(), e.to_string())
    })?;
    match placement {
        Placement::Pod(pv) => Ok(pv),
        Placement::Dump => dump(ctx, backup, active).await,
        Placement::Holder { claim, pv_name } => {
            let holder = Holder::new(
                &Owner::backup(backup),
                &active.run_id,
                &claim,
                &ctx.config.holder_image,
                true,
            );
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
