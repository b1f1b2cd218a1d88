//! The ResticRepository controller: credentials from the Secret, then the readiness probe
//! (`probe`, with `restic init` when no repository exists), statistics after it (`statistics`)
//! and integrity checks on their schedule or on demand (`check`). Failures back off; nothing
//! hot-loops.

mod check;
mod probe;
pub mod request;
mod statistics;

pub use check::{integrity_check_due, next_integrity_check};
pub(crate) use probe::call;
pub use probe::{NotReady, Verdict, not_ready_from, not_ready_from_credentials};

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
use restic_operator_proto::v1 as pb;

use crate::context::Context;
use crate::error::{Result, backoff};
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

/// Validate → dereference the credentials → probe when due → integrity checks.
async fn reconcile_inner(repo: &ResticRepository, ctx: &Arc<Context>) -> Result<Action> {
    let key = crate::status::backoff_key(repo);
    if let Some(nr) = invalid(repo) {
        write_not_ready(ctx, repo, nr).await?;
        return Ok(Action::await_change());
    }
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
            write_not_ready(ctx, repo, not_ready_from_credentials(&e)).await?;
            return Ok(Action::requeue(backoff(ctx.failed(&key))));
        }
    };
    let requeue = match probe_wait(repo, ctx.now(), ctx.config.stats_interval) {
        Some(wait) => wait,
        None => match probe(repo, ctx, &creds).await {
            Ok(()) => {
                ctx.succeeded(&key);
                refresh_soon(ctx, &repo.namespace().unwrap_or_default(), &repo.name_any());
                ctx.config.stats_interval
            }
            Err(Some(delay)) => delay,
            Err(None) => backoff(ctx.failed(&key)),
        },
    };
    let wake = integrity_checks(ctx, repo, creds).await?;
    let requeue = wake.map_or(requeue, |w| requeue.min(w));
    Ok(Action::requeue(requeue.max(Duration::from_secs(1))))
}

/// Why the spec cannot be used as it is (pure): an integrity check schedule that does not
/// parse.
pub fn invalid(repo: &ResticRepository) -> Option<NotReady> {
    let check = repo.spec.integrity_check.as_ref().filter(|c| c.enabled)?;
    let schedule = check.schedule.as_deref().unwrap_or_default();
    let e = Schedule::parse(schedule, check.timezone.as_deref()).err()?;
    Some(NotReady {
        reason: reasons::INVALID_SPEC,
        message: format!("integrityCheck: {e}"),
    })
}

async fn write_not_ready(ctx: &Context, repo: &ResticRepository, nr: NotReady) -> Result<()> {
    let api: Api<ResticRepository> =
        Api::namespaced(ctx.client.clone(), &repo.namespace().unwrap_or_default());
    let (generation, now) = (repo.meta().generation, ctx.now());
    let verdict = Err(nr);
    ctx.status
        .update(&api, &repo.name_any(), |_, s| ready(s, generation, &verdict, now))
        .await?;
    Ok(())
}

/// How long until the probe is due (pure); `None` when it is due now: never ready yet, the
/// spec changed, or the statistics are older than `interval`. Readiness comes from the probe
/// alone; statistics are read after it, in the background, and never change readiness.
pub fn probe_wait(repo: &ResticRepository, now: DateTime<Utc>, interval: Duration) -> Option<Duration> {
    let status = repo.status.clone().unwrap_or_default();
    let is_ready = find_condition(&status.conditions, ct::READY).is_some_and(Condition::is_true);
    if !is_ready || status.observed_generation != repo.meta().generation {
        return None;
    }
    let updated = status.statistics.as_ref()?.update_time.as_ref()?;
    let age = (now - from_time(updated)).to_std().unwrap_or_default();
    (age < interval).then(|| interval - age)
}

/// What the integrity-check schedule asks for now (pure).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct IntegrityPlan {
    /// A new `status.nextIntegrityCheck` to write (`Some(None)` drops it).
    pub record_next: Option<Option<DateTime<Utc>>>,
    /// The check to run now: its manual trigger, if any, and its time.
    pub due: Option<(Option<String>, DateTime<Utc>)>,
    /// When to look again for the next scheduled check.
    pub wake: Option<Duration>,
}

/// Plans the integrity checks of `repo` at `now` (pure). The next time is recorded when there
/// is none yet and dropped when checks were disabled; a check runs, and the next one is
/// waited for, only on a ready repository (an unready one waits for its probe and backoff,
/// never a hot loop).
pub fn integrity_plan(repo: &ResticRepository, now: DateTime<Utc>) -> IntegrityPlan {
    let next = next_integrity_check(repo, now);
    let status = repo.status.as_ref();
    let recorded = status.and_then(|s| s.next_integrity_check.as_ref()).is_some();
    let ready = status
        .and_then(|s| find_condition(&s.conditions, ct::READY))
        .is_some_and(Condition::is_true);
    let due = if ready {
        integrity_check_due(repo, now)
    } else {
        None
    };
    let record_next = match (recorded, next) {
        (false, Some(_)) => Some(next),
        (true, None) if due.is_none() => Some(None),
        _ => None,
    };
    let wake = next
        .filter(|_| ready)
        .map(|n| (n - now).to_std().unwrap_or_default() + Duration::from_millis(200));
    IntegrityPlan {
        record_next,
        due,
        wake,
    }
}

/// Applies the integrity plan to the live object: records the next time, starts a due check
/// in the background (it can take hours and waits for backups). Returns when to wake.
async fn integrity_checks(
    ctx: &Arc<Context>,
    repo: &ResticRepository,
    creds: pb::Repository,
) -> Result<Option<Duration>> {
    let (ns, name) = (repo.namespace().unwrap_or_default(), repo.name_any());
    let api: Api<ResticRepository> = Api::namespaced(ctx.client.clone(), &ns);
    let Some(latest) = api.get_opt(&name).await? else {
        return Ok(None);
    };
    let plan = integrity_plan(&latest, ctx.now());
    if let Some(next) = plan.record_next {
        ctx.status
            .update(&api, &name, |_, s| s.next_integrity_check = next.map(to_time))
            .await?;
    }
    if let Some((manual, scheduled)) = plan.due {
        let ctx2 = Arc::clone(ctx);
        ctx.tasks.spawn_once(
            &format!("check/{ns}/{name}"),
            Box::pin(async move {
                integrity_check(&ctx2, &latest, creds, manual, scheduled).await;
            }),
        );
    }
    Ok(plan.wake)
}

/// Runs `work` in the background on the live repository `namespace/name` and its
/// credentials, unless work under the same `task` runs already; nothing when the repository
/// is gone or its credentials cannot be read (its reconcile says why).
fn in_background<F, Fut>(ctx: &Arc<Context>, task: &str, namespace: &str, name: &str, work: F)
where
    F: FnOnce(Arc<Context>, ResticRepository, pb::Repository) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let ctx2 = Arc::clone(ctx);
    let (ns, name) = (namespace.to_owned(), name.to_owned());
    ctx.tasks.spawn_once(
        &format!("{task}/{ns}/{name}"),
        Box::pin(async move {
            let api: Api<ResticRepository> = Api::namespaced(ctx2.client.clone(), &ns);
            let Ok(Some(repo)) = api.get_opt(&name).await else {
                return;
            };
            if let Ok(creds) = resolve::load_credentials(&ctx2.client, &repo).await {
                work(ctx2, repo, creds.repository).await;
            }
        }),
    );
}

/// Refreshes a repository's statistics in the background (after the probe, or after a backup
/// or retention run changed them), unless a refresh already runs.
pub fn refresh_soon(ctx: &Arc<Context>, namespace: &str, name: &str) {
    in_background(ctx, "stats", namespace, name, |ctx, repo, creds| async move {
        statistics(&repo, &ctx, &creds).await;
    });
}

/// Probes a repository now, in the background (one probe at a time), because a run found
/// that restic cannot reach it (`unreachable`, the backend's error): `Ready` then says so
/// within seconds rather than at the next scheduled probe, and the backups and policies that
/// use it show why in `RepositoryReady`. A repository already not ready is left to its own
/// reconcile, which probes it with backoff until it answers.
pub fn probe_soon(ctx: &Arc<Context>, namespace: &str, name: &str, unreachable: &str) {
    let error = unreachable.to_owned();
    in_background(ctx, "probe", namespace, name, |ctx, repo, creds| async move {
        let ready = repo
            .status
            .as_ref()
            .and_then(|s| find_condition(&s.conditions, ct::READY))
            .is_some_and(Condition::is_true);
        if ready {
            let key = crate::status::key_of(&repo);
            tracing::info!(repository = %key, %error, "a run cannot reach the repository; probing it");
            let _ = probe(&repo, &ctx, &creds).await;
        }
    });
}

/// A follower for `inner` of a run on repository `namespace/name` that has the repository
/// probed (see [`probe_soon`]) when the agent says restic cannot reach it.
pub fn watching<'a>(
    ctx: &Arc<Context>,
    namespace: &str,
    name: &str,
    inner: &'a mut dyn crate::run::Follower,
) -> crate::run::Reachability<'a, impl FnMut(&str) + Send + 'a> {
    let ctx = Arc::clone(ctx);
    let (ns, name) = (namespace.to_owned(), name.to_owned());
    crate::run::Reachability::new(inner, move |error: &str| probe_soon(&ctx, &ns, &name, error))
}

pub async fn publish(ctx: &Context, repo: &ResticRepository, type_: EventType, reason: &str, note: String) {
    crate::context::publish(&ctx.repository_events, repo, type_, reason, note).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(s: &str) -> DateTime<Utc> {
        s.parse().unwrap()
    }

    fn repo(spec: &str, status: &str) -> ResticRepository {
        serde_yaml::from_str(&format!(
            "apiVersion: backup.resticbackup.io/v1alpha1\nkind: ResticRepository\n\
             metadata: {{name: r, namespace: n, uid: u1, generation: 2}}\n\
             spec: {{repositoryURL: 's3:x/y', credentialsSecretRef: {{name: c}}{spec}}}\n\
             status: {{{status}}}\n"
        ))
        .unwrap()
    }

    const READY: &str =
        "observedGeneration: 2, conditions: [{type: Ready, status: 'True', reason: RepositoryAccessible}]";
    const HOUR: Duration = Duration::from_secs(3600);

    #[test]
    fn the_probe_is_due_when_not_ready_changed_or_its_statistics_are_old() {
        let now = t("2026-11-26T10:00:00Z");
        let fresh = format!("{READY}, statistics: {{updateTime: '2026-11-26T09:45:00Z'}}");
        assert_eq!(
            probe_wait(&repo("", &fresh), now, HOUR),
            Some(Duration::from_secs(45 * 60))
        );
        let old = format!("{READY}, statistics: {{updateTime: '2026-11-26T08:59:00Z'}}");
        assert_eq!(probe_wait(&repo("", &old), now, HOUR), None);
        assert_eq!(probe_wait(&repo("", READY), now, HOUR), None, "never read");
        let changed = fresh.replace("observedGeneration: 2", "observedGeneration: 1");
        assert_eq!(probe_wait(&repo("", &changed), now, HOUR), None);
        let unready = fresh.replace("'True'", "'False'");
        assert_eq!(probe_wait(&repo("", &unready), now, HOUR), None);
    }

    #[test]
    fn an_integrity_check_is_scheduled_run_when_due_and_dropped_when_disabled() {
        let now = t("2026-11-26T10:00:00Z"); // a Thursday
        let weekly = ", integrityCheck: {enabled: true, schedule: '0 3 * * 0'}";
        let sunday = t("2026-11-29T03:00:00Z");
        let plan = integrity_plan(&repo(weekly, READY), now);
        assert_eq!(plan.record_next, Some(Some(sunday)));
        assert_eq!(plan.due, None);
        assert_eq!(
            plan.wake,
            Some((sunday - now).to_std().unwrap() + Duration::from_millis(200))
        );

        let due = format!("{READY}, nextIntegrityCheck: '2026-11-22T03:00:00Z'");
        let plan = integrity_plan(&repo(weekly, &due), now);
        assert_eq!(
            (plan.record_next, plan.due),
            (None, Some((None, t("2026-11-22T03:00:00Z"))))
        );
        // Not on a repository that is not ready: no run and no wake-up for it.
        let plan = integrity_plan(&repo(weekly, &due.replace("'True'", "'False'")), now);
        assert_eq!((plan.due, plan.wake), (None, None));

        let disabled = ", integrityCheck: {enabled: false, schedule: '0 3 * * 0'}";
        let plan = integrity_plan(&repo(disabled, &due), now);
        assert_eq!((plan.record_next, plan.due, plan.wake), (Some(None), None, None));
    }

    #[test]
    fn a_check_schedule_that_does_not_parse_makes_the_spec_invalid() {
        let bad = repo(", integrityCheck: {enabled: true, schedule: 'every sunday'}", "");
        let nr = invalid(&bad).unwrap();
        assert_eq!(nr.reason, reasons::INVALID_SPEC);
        assert!(nr.message.starts_with("integrityCheck: "), "{}", nr.message);
        assert_eq!(
            invalid(&repo(", integrityCheck: {enabled: false, schedule: 'x'}", "")),
            None
        );
    }
}
