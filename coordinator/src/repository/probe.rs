//! Readiness: a probe that costs the same for any repository (`restic cat config
//! --no-lock` through an agent), `restic init` first when no repository exists (never over an
//! existing one), and the `Ready` condition whose reason says what is wrong.

use std::time::Duration;

use chrono::{DateTime, Utc};
use kube::runtime::events::EventType;
use kube::{Api, Resource, ResourceExt};
use restic_operator_api::common::{
    Condition, condition_types as ct, event_reasons as er, reasons, set_condition,
};
use restic_operator_api::repository::{ResticRepository, ResticRepositoryStatus};
use restic_operator_proto::v1 as pb;
use restic_operator_proto::v1::agent_client::AgentClient;
use tonic::transport::Channel;

use super::request::{self, Kind};
use super::{publish, to_time};
use crate::context::Context;
use crate::resolve::CredentialsError;
use crate::run::{self, CallError};

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

/// What a probe's answer means for readiness (pure).
#[derive(Debug, Clone, PartialEq)]
pub enum Verdict {
    Ready {
        reason: &'static str,
        message: &'static str,
    },
    /// No repository at the URL, and no init tried yet: initialize it.
    Initialize,
    NotReady(NotReady),
}

/// The verdict on a probe's `answer`; `init` is `None` before any init, `Some(created)` after
/// one (`created`: it made the repository, rather than finding one made meanwhile).
pub fn verdict(answer: &Result<pb::Result, CallError>, init: Option<bool>) -> Verdict {
    match (answer, init) {
        (Ok(_), Some(true)) => Verdict::Ready {
            reason: reasons::REPOSITORY_INITIALIZED,
            message: "Repository was initialized and is accessible",
        },
        (Ok(_), _) => Verdict::Ready {
            reason: reasons::REPOSITORY_ACCESSIBLE,
            message: "Repository is initialized and accessible",
        },
        (Err(e), None) if e.failure() == Some(pb::FailureKind::RepositoryNotFound) => Verdict::Initialize,
        (Err(e), _) => Verdict::NotReady(not_ready_from_call(e)),
    }
}

/// What an init's `answer` means (pure): `Ok(true)` when it made the repository, `Ok(false)`
/// when one exists already (another initializer won the race: `init` never touches an
/// existing repository), or why the repository stays not ready.
pub fn initialized(answer: &Result<pb::Result, CallError>) -> Result<bool, NotReady> {
    match answer {
        Ok(_) => Ok(true),
        Err(e) if e.failure() == Some(pb::FailureKind::RepositoryExists) => Ok(false),
        Err(CallError::Failed(r)) => Err(NotReady {
            reason: reasons::REPOSITORY_NOT_INITIALIZED,
            message: format!(
                "no repository exists at the URL and restic init failed: {}",
                run::describe_failure(r)
            ),
        }),
        Err(e) => Err(not_ready_from_call(e)),
    }
}

/// Why a call that did not succeed leaves the repository not ready.
fn not_ready_from_call(e: &CallError) -> NotReady {
    match e {
        CallError::Failed(r) => not_ready_from(r),
        CallError::Unavailable(message) => NotReady {
            reason: reasons::AGENT_UNAVAILABLE,
            message: message.clone(),
        },
        CallError::Lost => NotReady {
            reason: reasons::REPOSITORY_NOT_READY,
            message: e.to_string(),
        },
    }
}

/// Sets the `Ready` condition from a verdict (pure).
pub fn ready(
    status: &mut ResticRepositoryStatus,
    generation: Option<i64>,
    verdict: &Result<(&'static str, &str), NotReady>,
    now: DateTime<Utc>,
) {
    let now = to_time(now);
    let c = match verdict {
        Ok((reason, message)) => Condition::new(ct::READY, true, reason, *message, generation, now),
        Err(nr) => Condition::new(ct::READY, false, nr.reason, nr.message.clone(), generation, now),
    };
    set_condition(&mut status.conditions, c);
    status.observed_generation = generation;
}

/// The readiness probe, with `init` first when the repository does not exist; the verdict
/// goes into `Ready`. `Err(Some(d))` asks for a retry after `d`, `Err(None)` for backoff
/// (failed; the condition says why).
pub(super) async fn probe(
    repo: &ResticRepository,
    ctx: &Context,
    creds: &pb::Repository,
) -> Result<(), Option<Duration>> {
    let agent = match ctx.agents.any() {
        Ok(a) => a,
        Err(e) => {
            let nr = NotReady {
                reason: reasons::AGENT_UNAVAILABLE,
                message: e.to_string(),
            };
            write(ctx, repo, &Err(nr)).await;
            return Err(Some(Duration::from_secs(10)));
        }
    };
    let at = ctx.now();
    let ask = |kind, attempt| {
        let request = request::repository(kind, repo, creds, at, attempt, ctx.config.repository_timeout);
        call(ctx, &agent.address, kind, request)
    };
    let mut verdict = verdict(&ask(Kind::Probe, 0).await, None);
    if verdict == Verdict::Initialize {
        verdict = match initialized(&ask(Kind::Init, 0).await) {
            Ok(created) => {
                if created {
                    let note = format!(
                        "Initialized the restic repository at {}",
                        repo.spec.repository_url
                    );
                    publish(ctx, repo, EventType::Normal, er::REPOSITORY_INITIALIZED, note).await;
                }
                self::verdict(&ask(Kind::Probe, 1).await, Some(created))
            }
            Err(nr) => Verdict::NotReady(nr),
        };
    }
    let (written, outcome) = match verdict {
        Verdict::Ready { reason, message } => (Ok((reason, message)), Ok(())),
        Verdict::NotReady(nr) => (Err(nr), Err(None)),
        Verdict::Initialize => unreachable!("an init was tried"),
    };
    write(ctx, repo, &written).await;
    outcome
}

/// Writes the probe's verdict into `Ready` (a failure to write is logged: the next probe
/// writes it again).
async fn write(ctx: &Context, repo: &ResticRepository, verdict: &Result<(&'static str, &str), NotReady>) {
    let name = repo.name_any();
    let api: Api<ResticRepository> =
        Api::namespaced(ctx.client.clone(), &repo.namespace().unwrap_or_default());
    let (generation, now) = (repo.meta().generation, ctx.now());
    let r = ctx
        .status
        .update(&api, &name, |_, s| ready(s, generation, verdict, now))
        .await;
    if let Err(e) = r {
        tracing::warn!(repository = %name, error = %e, "status update failed");
    }
}

/// Sends one repository request of `kind` to the agent at `address` and follows it.
pub(crate) async fn call(
    ctx: &Context,
    address: &str,
    kind: Kind,
    request: pb::RepositoryRequest,
) -> Result<pb::Result, CallError> {
    let run_id = crate::run::id_of(&request.options);
    let send = |mut c: AgentClient<Channel>| async move {
        match kind {
            Kind::Probe => c.probe(request).await,
            Kind::Init => c.init(request).await,
            Kind::Stats => c.stats(request).await,
            Kind::Prune => c.prune(request).await,
        }
    };
    ctx.dispatch(kind.as_str(), address, &run_id, send, &mut crate::run::Quiet)
        .await
        .succeeded()
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

    fn failed(k: pb::FailureKind) -> Result<pb::Result, CallError> {
        Err(CallError::Failed(Box::new(pb::Result {
            outcome: pb::Outcome::Failed as i32,
            failure: k as i32,
            reason: "x".into(),
            ..Default::default()
        })))
    }

    fn ok() -> Result<pb::Result, CallError> {
        Ok(pb::Result {
            outcome: pb::Outcome::Succeeded as i32,
            ..Default::default()
        })
    }

    #[test]
    fn a_missing_repository_is_initialized_once_then_probed_again() {
        assert_eq!(
            verdict(&failed(pb::FailureKind::RepositoryNotFound), None),
            Verdict::Initialize
        );
        assert_eq!(initialized(&ok()), Ok(true));
        assert_eq!(
            verdict(&ok(), Some(true)),
            Verdict::Ready {
                reason: reasons::REPOSITORY_INITIALIZED,
                message: "Repository was initialized and is accessible"
            }
        );
        // Still missing after the init: not ready, and no second init.
        let Verdict::NotReady(nr) = verdict(&failed(pb::FailureKind::RepositoryNotFound), Some(true)) else {
            panic!("a repository still missing after init is not ready");
        };
        assert_eq!(nr.reason, reasons::REPOSITORY_NOT_INITIALIZED);
    }

    #[test]
    fn an_init_that_finds_a_repository_made_meanwhile_is_no_failure() {
        assert_eq!(initialized(&failed(pb::FailureKind::RepositoryExists)), Ok(false));
        assert!(matches!(
            verdict(&ok(), Some(false)),
            Verdict::Ready {
                reason: reasons::REPOSITORY_ACCESSIBLE,
                ..
            }
        ));
        let nr = initialized(&failed(pb::FailureKind::WrongPassword)).unwrap_err();
        assert_eq!(nr.reason, reasons::REPOSITORY_NOT_INITIALIZED);
        assert!(
            nr.message.starts_with(
                "no repository exists at the URL and restic init failed: wrong repository password"
            ),
            "{}",
            nr.message
        );
    }

    #[test]
    fn an_agent_that_cannot_be_reached_or_loses_the_probe_leaves_the_repository_not_ready() {
        let Verdict::NotReady(nr) = verdict(&Err(CallError::Unavailable("connection refused".into())), None)
        else {
            panic!("an unreachable agent is not a ready repository");
        };
        assert_eq!(
            (nr.reason, nr.message.as_str()),
            (reasons::AGENT_UNAVAILABLE, "connection refused")
        );
        let Verdict::NotReady(nr) = verdict(&Err(CallError::Lost), None) else {
            panic!("a lost probe is not a ready repository");
        };
        assert_eq!(nr.reason, reasons::REPOSITORY_NOT_READY);
        let Verdict::NotReady(nr) = verdict(&failed(pb::FailureKind::Locked), None) else {
            panic!("a locked repository is not ready");
        };
        assert_eq!(nr.reason, reasons::REPOSITORY_LOCKED);
    }

    #[test]
    fn the_ready_condition_says_what_the_verdict_says() {
        let mut s = ResticRepositoryStatus::default();
        let now: DateTime<Utc> = "2026-11-26T10:00:00Z".parse().unwrap();
        let nr = NotReady {
            reason: reasons::AUTHENTICATION_FAILED,
            message: "wrong repository password".into(),
        };
        ready(&mut s, Some(4), &Err(nr), now);
        let c = restic_operator_api::common::find_condition(&s.conditions, ct::READY).unwrap();
        assert!(!c.is_true());
        assert_eq!(c.reason.as_deref(), Some(reasons::AUTHENTICATION_FAILED));
        assert_eq!((c.observed_generation, s.observed_generation), (Some(4), Some(4)));
        ready(&mut s, Some(4), &Ok((reasons::REPOSITORY_ACCESSIBLE, "ok")), now);
        let c = restic_operator_api::common::find_condition(&s.conditions, ct::READY).unwrap();
        assert!(c.is_true());
    }
}
