//! One attempt of a run: placement (a running pod, or a holder pod for a claim no running pod
//! mounts), the node's agent, the placement recorded in `status.activeRun`, and the backup
//! sent and followed to its result; and the step to the next attempt when
//! `jobConfig.backoffLimit` allows one.

use std::sync::Arc;

use kube::runtime::events::EventType;
use kube::{Api, ResourceExt};
use restic_operator_api::backup::ResticBackup;
use restic_operator_api::common::{ActiveRun, ObjectReference, event_reasons as er};
use restic_operator_proto::v1 as pb;

use super::cancel::cancel_abandoned;
use super::progress::ProgressWriter;
use super::request;
use super::runner::publish;
use super::transition::{Outcome, retry_delay};
use crate::agents::AgentEndpoint;
use crate::context::Context;
use crate::holder::Holder;
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
    record_placement(ctx, api, backup, active, &source.node, &agent).await;
    let request = request::backup(ctx.config.run_timeout, backup, active, resolved, &source);
    send(
        ctx,
        api,
        backup,
        active,
        &agent,
        request,
        &resolved.access().key(),
    )
    .await
}

/// After a failed attempt that is to be retried: the next attempt's number goes into
/// `status.activeRun` (unplaced, so a restarted coordinator starts it rather than asking the
/// failed attempt's agent), an event says why, and the backoff is waited.
pub(super) async fn next_attempt(
    ctx: &Context,
    api: &Api<ResticBackup>,
    backup: &ResticBackup,
    active: &ActiveRun,
    failed: &Outcome,
    limit: i32,
) -> ActiveRun {
    let next = ActiveRun {
        attempt: Some(active.attempt.unwrap_or(1) + 1),
        node_name: None,
        agent_pod: None,
        ..active.clone()
    };
    let _ = ctx
        .status
        .update(api, &backup.name_any(), |_, s| {
            if let Some(a) = s.active_run.as_mut().filter(|a| a.run_id == next.run_id) {
                *a = next.clone();
            }
        })
        .await;
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
    tokio::time::sleep(delay).await;
    next
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
    repository: &str,
) -> Outcome {
    let (node, address) = (agent.node.as_str(), agent.address.as_str());
    let _shared = ctx.locks.shared(repository).await;
    let note = format!("Starting backup {} on node {node}", active.run_id);
    publish(ctx, backup, EventType::Normal, er::BACKUP_STARTED, note).await;
    let mut progress = ProgressWriter::new(ctx, api, backup, active);
    let run_id = request::agent_run_id(active);
    let ended = ctx
        .dispatch(
            "backup",
            address,
            &run_id,
            |mut c| async move { c.backup(request).await },
            &mut |e| progress.on_event(e),
        )
        .await;
    progress.flush().await;
    match ended {
        Ended::Result(r) => Outcome::of_agent(*r),
        Ended::Unavailable(e) => {
            cancel_abandoned(ctx, node, active);
            Outcome::failed(format!("agent on node {node} unavailable: {e}"))
        }
        Ended::Unknown => Outcome::failed(format!("the agent on node {node} lost run {}", active.run_id)),
    }
}

/// The pod volume the run reads: a running pod's, or a holder's started for the claim.
async fn place(ctx: &Context, backup: &ResticBackup, active: &ActiveRun) -> Result<PodVolume, Outcome> {
    let placement = sources::resolve(&ctx.client, backup)
        .await
        .map_err(|e| Outcome::failed_because(e.reason(), e.to_string()))?;
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
