//! The ResticRepository controller: credentials from the Secret, then the readiness probe
//! (`probe`, with `restic init` when no repository exists), statistics after it (`statistics`)
//! and integrity checks on their schedule or on demand (`check`). Failures back off; nothing
//! hot-loops.

mod check;
mod probe;
mod statistics;

pub use check::{integrity_check_due, next_integrity_check};
pub use probe::{NotReady, not_ready_from, not_ready_from_credentials};

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::runtime::controller::Action;
use kube::runtime::events::EventType;
use kube::{Api, Resource, ResourceExt};
use restic_operator_api::common::{
    Condition, condition_types as ct, event_reasons as er, find_condition, reasons,
};
use restic_operator_api::repository::ResticRepository;

use crate::context::Context;
use crate::error::{Error, Result, backoff};
use crate::resolve::{self};
use crate::schedule::Schedule;

pub const CONTROLLER: &str = "resticrepository";
use check::integrity_check;
use probe::{probe, ready};
use statistics::statistics;

pub fn to_time(t: DateTime<Utc>) -> Time {
    Time(Timestamp::from_millisecond(t.timestamp_millis()).unwrap_or(Timestamp::UNIX_EPOCH))
}

pub fn from_time(t: &Time) -> DateTime<Utc> {
    DateTime::from_timestamp_millis(t.0.as_millisecond()).unwrap_or_default()
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
