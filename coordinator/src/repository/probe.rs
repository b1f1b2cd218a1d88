//! Readiness: a probe that costs the same for any repository (`restic cat config
//! --no-lock` through an agent), `restic init` first when no repository exists (never over an
//! existing one), and the `Ready` condition whose reason says what is wrong.

use std::time::Duration;

use chrono::Utc;
use kube::runtime::events::EventType;
use kube::{Api, Resource, ResourceExt};
use restic_operator_api::common::{
    Condition, condition_types as ct, event_reasons as er, reasons, set_condition,
};
use restic_operator_api::repository::{ResticRepository, ResticRepositoryStatus};
use restic_operator_proto::v1 as pb;

use super::{publish, to_time};
use crate::context::Context;
use crate::error::Result;
use crate::resolve::CredentialsError;
use crate::run::{self, Ended};

/// Why a repository is not Ready: the condition reason and a message.
#[derive(Debug, Clone, PartialEq)]
pub struct NotReady {
    pub reason: &'static str,
    pub message: String,
}

/// Maps an agent failure to the repository's condition reason.
pub fn not_ready_from(result: &pb::Result) -> NotReady {
    let reason = match pb::FailureKind::try_from(result.failure).unwrap_or(pb::FailureKind::Unspecified) {
        pb::FailureKind::WrongPassword => reasons::AUTHENTICATION_FAILED,
        pb::FailureKind::RepositoryUnreachable => reasons::REPOSITORY_UNREACHABLE,
        pb::FailureKind::RepositoryNotFound => reasons::REPOSITORY_NOT_INITIALIZED,
        pb::FailureKind::Locked => reasons::REPOSITORY_LOCKED,
        _ => reasons::REPOSITORY_NOT_READY,
    };
    NotReady {
        reason,
        message: run::describe_failure(result),
    }
}

pub fn not_ready_from_credentials(e: &CredentialsError) -> NotReady {
    NotReady {
        reason: e.reason(),
        message: e.to_string(),
    }
}

pub(super) fn ready(
    status: &mut ResticRepositoryStatus,
    generation: Option<i64>,
    ok: Result<&'static str, &NotReady>,
    message: &str,
) {
    let now = to_time(Utc::now());
    let c = match ok {
        Ok(reason) => Condition::new(ct::READY, true, reason, message, generation, now),
        Err(nr) => Condition::new(ct::READY, false, nr.reason, nr.message.clone(), generation, now),
    };
    set_condition(&mut status.conditions, c);
    status.observed_generation = generation;
}

/// The readiness probe, with `init` first when the repository does not exist. `Err(Some(d))`
/// asks for a retry after `d`, `Err(None)` for backoff (failed; the condition says why).
pub(super) async fn probe(
    repo: &ResticRepository,
    ctx: &Context,
    creds: &pb::Repository,
) -> Result<(), Option<Duration>> {
    let ns = repo.namespace().unwrap_or_default();
    let name = repo.name_any();
    let api: Api<ResticRepository> = Api::namespaced(ctx.client.clone(), &ns);
    let generation = repo.meta().generation;
    let uid = repo.uid().unwrap_or_default();
    let write = |ok: Result<&'static str, NotReady>, message: String| {
        let api = api.clone();
        let name = name.clone();
        async move {
            let r = ctx
                .status
                .update(&api, &name, |_, s| {
                    ready(s, generation, ok.as_ref().map(|r| *r), &message)
                })
                .await;
            if let Err(e) = r {
                tracing::warn!(repository = %name, error = %e, "status update failed");
            }
        }
    };
    let agent = match ctx.agents.any() {
        Ok(a) => a,
        Err(e) => {
            let nr = NotReady {
                reason: reasons::AGENT_UNAVAILABLE,
                message: e,
            };
            write(Err(nr), String::new()).await;
            return Err(Some(Duration::from_secs(10)));
        }
    };
    let stamp = Utc::now().timestamp();
    let timeout = ctx.config.repository_timeout;
    let mut initialized = false;
    for attempt in 0..2 {
        let run_id = format!("repo-{uid}-probe-{stamp}-{attempt}");
        let request = pb::RepositoryRequest {
            options: Some(run::options(&run_id, timeout)),
            repository: Some(creds.clone()),
        };
        let ended = ctx
            .dispatch(
                "probe",
                &agent.address,
                &run_id,
                |mut c| async move { c.probe(request).await },
                &mut |_| {},
            )
            .await;
        let result = match ended {
            Ended::Result(r) => r,
            Ended::Unavailable(message) => {
                let nr = NotReady {
                    reason: reasons::AGENT_UNAVAILABLE,
                    message,
                };
                write(Err(nr), String::new()).await;
                return Err(None);
            }
            Ended::Unknown => return Err(None),
        };
        if result.outcome == pb::Outcome::Succeeded as i32 {
            let (reason, message) = if initialized {
                (
                    reasons::REPOSITORY_INITIALIZED,
                    "Repository was initialized and is accessible",
                )
            } else {
                (
                    reasons::REPOSITORY_ACCESSIBLE,
                    "Repository is initialized and accessible",
                )
            };
            write(Ok(reason), message.into()).await;
            return Ok(());
        }
        let not_found = result.failure == pb::FailureKind::RepositoryNotFound as i32;
        if !(not_found && attempt == 0) {
            write(Err(not_ready_from(&result)), String::new()).await;
            return Err(None);
        }
        // No repository at the URL: initialize it. `init` refuses to touch an existing
        // repository (RepositoryExists), so a race with another initializer is harmless.
        let run_id = format!("repo-{uid}-init-{stamp}");
        let request = pb::RepositoryRequest {
            options: Some(run::options(&run_id, timeout)),
            repository: Some(creds.clone()),
        };
        let ended = ctx
            .dispatch(
                "init",
                &agent.address,
                &run_id,
                |mut c| async move { c.init(request).await },
                &mut |_| {},
            )
            .await;
        match ended {
            Ended::Result(r) if r.outcome == pb::Outcome::Succeeded as i32 => {
                initialized = true;
                publish(
                    ctx,
                    repo,
                    EventType::Normal,
                    er::REPOSITORY_INITIALIZED,
                    format!(
                        "Initialized the restic repository at {}",
                        repo.spec.repository_url
                    ),
                )
                .await;
            }
            Ended::Result(r) if r.failure == pb::FailureKind::RepositoryExists as i32 => {}
            Ended::Result(r) => {
                let nr = NotReady {
                    reason: reasons::REPOSITORY_NOT_INITIALIZED,
                    message: format!(
                        "no repository exists at the URL and restic init failed: {}",
                        run::describe_failure(&r)
                    ),
                };
                write(Err(nr), String::new()).await;
                return Err(None);
            }
            Ended::Unavailable(e) => {
                let nr = NotReady {
                    reason: reasons::AGENT_UNAVAILABLE,
                    message: e,
                };
                write(Err(nr), String::new()).await;
                return Err(None);
            }
            Ended::Unknown => return Err(None),
        }
    }
    Err(None)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn agent_failures_map_to_distinct_reasons() {
        let r = |k: pb::FailureKind| pb::Result {
            outcome: pb::Outcome::Failed as i32,
            failure: k as i32,
            reason: "x".into(),
            ..Default::default()
        };
        assert_eq!(
            not_ready_from(&r(pb::FailureKind::WrongPassword)).reason,
            "AuthenticationFailed"
        );
        assert_eq!(
            not_ready_from(&r(pb::FailureKind::RepositoryUnreachable)).reason,
            "RepositoryUnreachable"
        );
        assert_eq!(
            not_ready_from(&r(pb::FailureKind::RepositoryNotFound)).reason,
            "RepositoryNotInitialized"
        );
        assert_eq!(
            not_ready_from(&r(pb::FailureKind::Locked)).reason,
            "RepositoryLocked"
        );
    }
}
