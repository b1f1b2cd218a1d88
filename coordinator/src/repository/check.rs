//! Integrity checks (`restic check`) on their schedule or when `manualTrigger` changes, run in
//! the background: they can take hours and wait for backups.

use chrono::{DateTime, Utc};
use kube::runtime::events::EventType;
use kube::{Api, Resource, ResourceExt};
use restic_operator_api::common::{
    Condition, ConditionStatus, condition_types as ct, event_reasons as er, reasons, set_condition,
};
use restic_operator_api::repository::{IntegrityCheckResult, ResticRepository};
use restic_operator_proto::v1 as pb;

use super::{from_time, publish, to_time};
use crate::context::Context;
use crate::run::{self, Ended};
use crate::schedule::Schedule;

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

pub(super) async fn integrity_check(
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

#[cfg(test)]
mod tests {
    use super::*;

    fn repo(yaml: &str) -> ResticRepository {
        serde_yaml::from_str(yaml).unwrap()
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
