//! Getting back to a run after a coordinator restart: the recorded agent is asked for it, and
//! a run the agent no longer knows is looked up in the repository before it is ever sent
//! again.

use std::sync::Arc;
use std::time::Duration;

use kube::{Api, ResourceExt};
use restic_operator_api::backup::ResticBackup;
use restic_operator_api::common::ActiveRun;
use restic_operator_proto::v1 as pb;

use super::cancel::{cancel_abandoned, recorded_address};
use super::lookup;
use super::request::agent_run_id;
use super::transition::Outcome;
use crate::context::Context;
use crate::progress::ProgressWriter;
use crate::run::{self, Ended};

/// Re-attach: the run was placed before a coordinator restart. Once placed, a run is never
/// placed again (another node would not know its id): the recorded node's agent is retried
/// until `agent_lost_timeout`. An agent that answers "unknown run" was never sent it, or has
/// forgotten it: only when the repository holds no snapshot of it is it dispatched (see
/// `lookup`). `None` when the run is to be dispatched.
pub(super) async fn reattach(
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
                    let run_id = agent_run_id(active);
                    let reference = &backup.spec.repository_ref;
                    let ns = backup.namespace().unwrap_or_default();
                    let repository = (reference.namespace_or(&ns), reference.name.as_str());
                    let ended = {
                        let mut follower =
                            crate::repository::watching(ctx, repository.0, repository.1, &mut progress);
                        run::attach(&mut client, &run_id, &mut follower).await
                    };
                    progress.flush().await;
                    ended
                }
                Err(e) => Ended::Unavailable(e.to_string()),
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
                    return Some(Outcome::uncertain("the run's agent could not be asked about it"));
                };
                return forgotten(ctx, backup, active, address).await;
            }
            Ended::Unavailable(e) => {
                if tokio::time::Instant::now() > deadline {
                    if let Some(node) = &active.node_name {
                        cancel_abandoned(ctx, node, active);
                    }
                    return Some(Outcome::uncertain(format!("lost the run in flight: {e}")));
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
        Err(e) => Some(Outcome::uncertain(format!(
            "the agent no longer knew run {}, and the repository could not be searched for its \
             snapshot, so it was not sent again (the next run will be): {e}",
            active.run_id
        ))),
    }
}
