//! Stopping runs on their agent: the run in flight that `concurrencyPolicy: Replace`
//! replaces, and a run given up on whose agent may still be running it.

use std::sync::Arc;
use std::time::Duration;

use restic_operator_api::common::ActiveRun;
use restic_operator_proto::v1 as pb;

use super::request::agent_run_id;
use crate::context::Context;

/// Asks the agent to cancel the run in flight (`concurrencyPolicy: Replace`), and the runner
/// not to send another attempt of it.
pub async fn cancel(ctx: &Context, active: &ActiveRun) {
    ctx.request_cancel(&active.run_id);
    let Some(address) = recorded_address(ctx, active) else {
        return;
    };
    if let Ok(mut client) = ctx.agents.client(&address) {
        let _ = client
            .cancel(pb::CancelRequest {
                run_id: agent_run_id(active),
            })
            .await;
    }
}

/// A run given up on (its agent did not answer for `--agent-lost-timeout`) may still be
/// going on that agent: a network split, or an agent pod gone from the API while its process
/// runs. It is cancelled there as soon as the node's agent answers again, so it cannot
/// overlap the next run. Tried until the run's own timeout, after which the agent has stopped
/// it anyway.
pub(super) fn cancel_abandoned(ctx: &Arc<Context>, node: &str, active: &ActiveRun) {
    let (ctx2, node, run_id) = (Arc::clone(ctx), node.to_owned(), agent_run_id(active));
    ctx.tasks.spawn_once(
        &abandoned_key(&active.run_id),
        Box::pin(async move {
            let deadline = tokio::time::Instant::now() + ctx2.config.run_timeout;
            let mut wait = Duration::from_secs(1);
            while tokio::time::Instant::now() < deadline {
                let sent = match ctx2.agents.on_node(&node).and_then(|a| ctx2.agents.client(&a.address)) {
                    Ok(mut client) => client.cancel(pb::CancelRequest { run_id: run_id.clone() }).await,
                    Err(e) => Err(tonic::Status::unavailable(e.to_string())),
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

pub(super) fn abandoned_key(run_id: &str) -> String {
    format!("abandoned/{run_id}")
}

/// Where a placed run went: the agent of the recorded node (holder runs too: the holder only
/// keeps the claim mounted on that node).
pub(super) fn recorded_address(ctx: &Context, active: &ActiveRun) -> Option<String> {
    active.agent_pod.as_ref()?;
    ctx.agents
        .on_node(active.node_name.as_deref()?)
        .ok()
        .map(|a| a.address)
}
