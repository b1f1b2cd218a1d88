//! The ResticRepository controller: credentials from the Secret, `restic init` when no
//! repository exists (never over an existing one), statistics on an interval, integrity
//! checks on their schedule or on demand, and a `Ready` condition whose reason says what
//! is wrong. Failures back off; nothing hot-loops.

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::runtime::controller::Action;
use kube::runtime::events::EventType;
use kube::{Api, Resource, ResourceExt};
use restic_operator_api::common::{
    Condition, ConditionStatus, condition_types as ct, event_reasons as er, find_condition, format_bytes,
    reasons, set_condition,
};
use restic_operator_api::repository::{
    IntegrityCheckResult, RepositoryStatistics, ResticRepository, ResticRepositoryStatus,
};
use restic_operator_proto::v1 as pb;

use crate::context::Context;
use crate::error::{Error, Result, backoff};
use crate::resolve::{self, CredentialsError};
use crate::run::{self, Ended};
use crate::schedule::Schedule;

pub const CONTROLLER: &str = "resticrepository";

pub fn to_time(t: DateTime<Utc>) -> Time {
    Time(Timestamp::from_millisecond(t.timestamp_millis()).unwrap_or(Timestamp::UNIX_EPOCH))
}

pub fn from_time(t: &Time) -> DateTime<Utc> {
    DateTime::from_timestamp_millis(t.0.as_millisecond()).unwrap_or_default()
}

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

/// The integrity check to run now, if any: a pending manual trigger, or a due scheduled one.
pub fn integrity_check_due(
    repo: &ResticRepository,
    now: DateTime<Utc>,
) -> Option<(Option<String>, DateTime<Utc>)> {
    let check = repo.spec.integrity_check.as_ref()?;
    let status = repo.status.clone().unwrap_or_default();
    if let Some(t) = check.manual_trigger.as_deref().filter(|t| !t.is_empty())
        && status.last_manual_trigger.as_deref() != Some(t)
    {
        return Some((Some(t.to_owned()), now));
    }
    let next = status.next_integrity_check.as_ref().map(from_time)?;
    (check.enabled && next <= now).then_some((None, next))
}

/// The next scheduled check after `now`.
pub fn next_integrity_check(repo: &ResticRepository, now: DateTime<Utc>) -> Option<DateTime<Utc>> {
    let check = repo.spec.integrity_check.as_ref().filter(|c| c.enabled)?;
    Schedule::parse(check.schedule.as_deref()?, check.timezone.as_deref())
        .ok()?
        .next_after(now)
}

fn ready(
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

pub async fn reconcile(repo: Arc<ResticRepository>, ctx: Arc<Context>) -> Result<Action> {
    crate::context::observed(&ctx.metrics, CONTROLLER, reconcile_inner(&repo, &ctx)).await
}

async fn reconcile_inner(repo: &ResticRepository, ctx: &Arc<Context>) -> Result<Action> {
    let ns = repo.namespace().unwrap_or_default();
    let name = repo.name_any();
    let key = format!("repository/{ns}/{name}");
    let api: Api<ResticRepository> = Api::namespaced(ctx.client.clone(), &ns);
    let now = Utc::now();
    let generation = repo.meta().generation;

    // Validate (pure).
    if let Some(check) = repo.spec.integrity_check.as_ref().filter(|c| c.enabled)
        && let Err(e) = Schedule::parse(
            check.schedule.as_deref().unwrap_or_default(),
            check.timezone.as_deref(),
        )
    {
        let nr = NotReady {
            reason: reasons::INVALID_SPEC,
            message: format!("integrityCheck: {e}"),
        };
        ctx.status
            .update(&api, &name, |_, s| ready(s, generation, Err(&nr), ""))
            .await?;
        return Ok(Action::await_change());
    }

    // Dereference: credentials.
    let creds = match resolve::load_credentials(&ctx.client, repo).await {
        Ok(c) => {
            if !c.ignored.is_empty() {
                // Identical events are folded into one, with a count.
                let note = format!(
                    "Secret {} keys left out, not restic backend settings: {}",
                    repo.spec.credentials_secret_ref.name,
                    c.ignored.join(", ")
                );
                publish(ctx, repo, EventType::Warning, er::SECRET_KEYS_IGNORED, note).await;
            }
            c.repository
        }
        Err(e) => {
            let nr = not_ready_from_credentials(&e);
            ctx.status
                .update(&api, &name, |_, s| ready(s, generation, Err(&nr), ""))
                .await?;
            return Ok(Action::requeue(backoff(ctx.failed(&key))));
        }
    };

    // The probe (and init) when due: never ready yet, spec changed, or the statistics are
    // older than the interval. Readiness comes from the probe alone; statistics are read
    // after it, in the background, and never change readiness.
    let status = repo.status.clone().unwrap_or_default();
    let is_ready = find_condition(&status.conditions, ct::READY).is_some_and(Condition::is_true);
    let stats_age = status
        .statistics
        .as_ref()
        .and_then(|s| s.update_time.as_ref())
        .map(|t| now - from_time(t));
    let stats_due = !is_ready
        || status.observed_generation != generation
        || stats_age.is_none_or(|age| age.to_std().unwrap_or_default() >= ctx.config.stats_interval);
    let mut requeue = ctx.config.stats_interval;
    if stats_due {
        match probe(repo, ctx, &creds).await {
            Ok(()) => {
                ctx.succeeded(&key);
                refresh_soon(ctx, &ns, &name);
            }
            Err(Some(delay)) => requeue = delay,
            Err(None) => requeue = backoff(ctx.failed(&key)),
        }
    } else if let Some(age) = stats_age {
        requeue = ctx
            .config
            .stats_interval
            .saturating_sub(age.to_std().unwrap_or_default());
    }

    // Integrity checks: the next time in status; a due one runs in the background (it can
    // take hours and waits for backups).
    let latest = api.get_opt(&name).await?;
    let Some(latest) = latest else {
        return Ok(Action::await_change());
    };
    let next = next_integrity_check(&latest, now);
    let prev_next = latest
        .status
        .as_ref()
        .and_then(|s| s.next_integrity_check.clone());
    let ready_now = latest
        .status
        .as_ref()
        .and_then(|s| find_condition(&s.conditions, ct::READY))
        .is_some_and(Condition::is_true);
    let due = if ready_now {
        integrity_check_due(&latest, now)
    } else {
        None
    };
    // Record the next time when there is none yet, and drop it when checks were disabled.
    let stale = prev_next.is_some() && next.is_none();
    if (prev_next.is_none() && next.is_some()) || (stale && due.is_none()) {
        ctx.status
            .update(&api, &name, |_, s| s.next_integrity_check = next.map(to_time))
            .await?;
    }
    if let Some((manual, scheduled)) = due {
        let ctx2 = Arc::clone(ctx);
        let repo2 = latest.clone();
        ctx.tasks.spawn_once(
            &format!("check/{ns}/{name}"),
            Box::pin(async move {
                integrity_check(&ctx2, &repo2, creds, manual, scheduled).await;
            }),
        );
    }
    // Wake up for the next check only when it can run (a check of an unready repository
    // waits for the stats refresh and its backoff, never a hot loop).
    if ready_now && let Some(n) = next {
        let until = (n - now).to_std().unwrap_or_default() + Duration::from_millis(200);
        requeue = requeue.min(until);
    }
    Ok(Action::requeue(requeue.max(Duration::from_secs(1))))
}

/// The readiness probe, with `init` first when the repository does not exist. `Err(Some(d))`
/// asks for a retry after `d`, `Err(None)` for backoff (failed; the condition says why).
async fn probe(
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

/// Reads a repository's statistics (`restic stats`, slow on large repositories) into
/// `status.statistics` and the metrics. A failure is a warning event; readiness is the
/// probe's alone.
async fn statistics(repo: &ResticRepository, ctx: &Context, creds: &pb::Repository) {
    let ns = repo.namespace().unwrap_or_default();
    let name = repo.name_any();
    // Stats read the index; skipped while forget, prune or check hold the repository.
    let Some(_shared) = ctx.locks.try_shared(&format!("{ns}/{name}")) else {
        return;
    };
    let Ok(agent) = ctx.agents.any() else {
        return; // the probe reports a missing agent
    };
    let uid = repo.uid().unwrap_or_default();
    let run_id = format!("repo-{uid}-stats-{}", Utc::now().timestamp());
    let request = pb::RepositoryRequest {
        options: Some(run::options(&run_id, ctx.config.stats_timeout)),
        repository: Some(creds.clone()),
    };
    let ended = ctx
        .dispatch(
            "stats",
            &agent.address,
            &run_id,
            |mut c| async move { c.stats(request).await },
            &mut |_| {},
        )
        .await;
    let stats = match ended {
        Ended::Result(r) if r.outcome == pb::Outcome::Succeeded as i32 => r.stats.unwrap_or_default(),
        Ended::Result(r) => return statistics_failed(ctx, repo, run::describe_failure(&r)).await,
        Ended::Unavailable(e) => return statistics_failed(ctx, repo, e).await,
        Ended::Unknown => return statistics_failed(ctx, repo, "the agent lost the run".into()).await,
    };
    ctx.metrics
        .repository_size
        .with_label_values(&[&name, &ns])
        .set(stats.total_size as f64);
    ctx.metrics
        .repository_snapshots
        .with_label_values(&[&name, &ns])
        .set(stats.snapshots_count as f64);
    let api: Api<ResticRepository> = Api::namespaced(ctx.client.clone(), &ns);
    let written = ctx
        .status
        .update(&api, &name, |_, s| {
            s.statistics = Some(RepositoryStatistics {
                total_size: Some(format_bytes(stats.total_size)),
                total_size_bytes: i64::try_from(stats.total_size).ok(),
                total_file_count: i64::try_from(stats.total_file_count).ok(),
                snapshot_count: i64::try_from(stats.snapshots_count).ok(),
                update_time: Some(to_time(Utc::now())),
            })
        })
        .await;
    if let Err(e) = written {
        tracing::warn!(repository = %name, error = %e, "status update failed");
    }
}

async fn statistics_failed(ctx: &Context, repo: &ResticRepository, why: String) {
    let note = format!("Repository statistics could not be read (the repository stays usable): {why}");
    publish(ctx, repo, EventType::Warning, er::STATISTICS_FAILED, note).await;
}

/// Refreshes a repository's statistics in the background (after the probe, or after a backup
/// or retention run changed them), unless a refresh already runs.
pub fn refresh_soon(ctx: &Arc<Context>, namespace: &str, name: &str) {
    let ctx2 = Arc::clone(ctx);
    let (ns, name) = (namespace.to_owned(), name.to_owned());
    ctx.tasks.spawn_once(
        &format!("stats/{ns}/{name}"),
        Box::pin(async move {
            let api: Api<ResticRepository> = Api::namespaced(ctx2.client.clone(), &ns);
            let Ok(Some(repo)) = api.get_opt(&name).await else {
                return;
            };
            if let Ok(creds) = resolve::load_credentials(&ctx2.client, &repo).await {
                statistics(&repo, &ctx2, &creds.repository).await;
            }
        }),
    );
}

async fn integrity_check(
    ctx: &Context,
    repo: &ResticRepository,
    creds: pb::Repository,
    manual: Option<String>,
    scheduled: DateTime<Utc>,
) {
    let ns = repo.namespace().unwrap_or_default();
    let name = repo.name_any();
    let api: Api<ResticRepository> = Api::namespaced(ctx.client.clone(), &ns);
    let generation = repo.meta().generation;
    // Record the trigger and the next time first, so a crash never repeats this check in a
    // loop.
    let next = next_integrity_check(repo, Utc::now().max(scheduled));
    let _ = ctx
        .status
        .update(&api, &name, |_, s| {
            if let Some(m) = &manual {
                s.last_manual_trigger = Some(m.clone());
            }
            s.next_integrity_check = next.map(to_time);
        })
        .await;
    let agent = match ctx.agents.any() {
        Ok(a) => a,
        Err(e) => {
            tracing::warn!(repository = %name, error = %e, "integrity check not run");
            return;
        }
    };
    let _exclusive = ctx.locks.exclusive(&format!("{ns}/{name}")).await;
    publish(
        ctx,
        repo,
        EventType::Normal,
        er::INTEGRITY_CHECK_STARTED,
        "Integrity check started".into(),
    )
    .await;
    let run_id = format!(
        "repo-{}-check-{}",
        repo.uid().unwrap_or_default(),
        scheduled.timestamp()
    );
    let request = pb::CheckRequest {
        options: Some(run::options(&run_id, ctx.config.maintenance_timeout)),
        repository: Some(creds),
        read_data_subset: repo
            .spec
            .integrity_check
            .as_ref()
            .and_then(|c| c.read_data_subset.clone())
            .unwrap_or_default(),
    };
    let ended = ctx
        .dispatch(
            "check",
            &agent.address,
            &run_id,
            |mut c| async move { c.check(request).await },
            &mut |_| {},
        )
        .await;
    let (passed, message) = match &ended {
        Ended::Result(r) if r.outcome == pb::Outcome::Succeeded as i32 => {
            (true, "restic check found no errors".to_owned())
        }
        Ended::Result(r) => (false, run::describe_failure(r)),
        Ended::Unavailable(e) => (false, e.clone()),
        Ended::Unknown => (false, "the agent lost the run".to_owned()),
    };
    let now = Utc::now();
    ctx.metrics
        .integrity_check_timestamp
        .with_label_values(&[&name, &ns])
        .set(now.timestamp() as f64);
    ctx.metrics
        .integrity_check_status
        .with_label_values(&[&name, &ns])
        .set(if passed { 1.0 } else { 0.0 });
    let t = to_time(now);
    let _ = ctx
        .status
        .update(&api, &name, |_, s| {
            s.last_integrity_check = Some(t.clone());
            s.last_integrity_check_result = Some(if passed {
                IntegrityCheckResult::Passed
            } else {
                IntegrityCheckResult::Failed
            });
            if passed {
                s.last_successful_integrity_check = Some(t.clone());
            }
            let (st, sf) = if passed {
                (ConditionStatus::True, ConditionStatus::False)
            } else {
                (ConditionStatus::False, ConditionStatus::True)
            };
            let reason = if passed {
                reasons::INTEGRITY_CHECK_PASSED
            } else {
                reasons::INTEGRITY_CHECK_FAILED
            };
            set_condition(
                &mut s.conditions,
                Condition::new(
                    ct::INTEGRITY_CHECK_SUCCEEDED,
                    st,
                    reason,
                    message.clone(),
                    generation,
                    t.clone(),
                ),
            );
            set_condition(
                &mut s.conditions,
                Condition::new(
                    ct::INTEGRITY_CHECK_FAILED,
                    sf,
                    reason,
                    message.clone(),
                    generation,
                    t.clone(),
                ),
            );
        })
        .await;
    if passed {
        publish(ctx, repo, EventType::Normal, er::INTEGRITY_CHECK_PASSED, message).await;
    } else {
        publish(
            ctx,
            repo,
            EventType::Warning,
            er::REPOSITORY_UNHEALTHY,
            format!("Repository integrity check failed: {message}"),
        )
        .await;
    }
}

pub async fn publish(ctx: &Context, repo: &ResticRepository, type_: EventType, reason: &str, note: String) {
    crate::context::publish(&ctx.repository_events, repo, type_, reason, note).await;
}

pub fn error_policy(repo: Arc<ResticRepository>, error: &Error, ctx: Arc<Context>) -> Action {
    let key = format!("repository/{}", crate::status::key_of(repo.as_ref()));
    tracing::warn!(repository = %key, %error, "reconcile failed");
    match error.class() {
        crate::error::Class::Permanent => Action::await_change(),
        crate::error::Class::Temporary => Action::requeue(backoff(ctx.failed(&key))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn repo(yaml: &str) -> ResticRepository {
        serde_yaml::from_str(yaml).unwrap()
    }

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

    #[test]
    fn manual_check_trigger_runs_once_and_schedule_when_due() {
        let now: DateTime<Utc> = "2024-01-15T10:00:00Z".parse().unwrap();
        let base = "apiVersion: backup.resticbackup.io/v1alpha1\nkind: ResticRepository\nmetadata: {name: r, namespace: n}\n\
                    spec: {repositoryURL: 's3:x/y', credentialsSecretRef: {name: c}, integrityCheck: {enabled: true, schedule: '0 3 * * 0', manualTrigger: 'a'}}\n";
        let pending = repo(base);
        assert_eq!(integrity_check_due(&pending, now), Some((Some("a".into()), now)));
        let handled = repo(&format!(
            "{base}status: {{lastManualTrigger: 'a', nextIntegrityCheck: '2024-01-14T03:00:00Z'}}"
        ));
        let due: DateTime<Utc> = "2024-01-14T03:00:00Z".parse().unwrap();
        assert_eq!(integrity_check_due(&handled, now), Some((None, due)));
        let later = repo(&format!(
            "{base}status: {{lastManualTrigger: 'a', nextIntegrityCheck: '2024-01-21T03:00:00Z'}}"
        ));
        assert_eq!(integrity_check_due(&later, now), None);
        assert_eq!(
            next_integrity_check(&later, now),
            Some("2024-01-21T03:00:00Z".parse().unwrap())
        );
    }
}
