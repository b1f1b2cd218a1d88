//! Integrity checks (`restic check`) on their schedule or when `manualTrigger` changes, run in
//! the background: they can take hours and wait for backups.

use chrono::{DateTime, Utc};
use kube::runtime::events::EventType;
use kube::{Api, Resource, ResourceExt};
use restic_operator_api::common::{
    Condition, condition_types as ct, event_reasons as er, reasons, set_condition,
};
use restic_operator_api::repository::{IntegrityCheckResult, ResticRepository, ResticRepositoryStatus};
use restic_operator_proto::v1 as pb;

use super::request;
use super::{from_time, publish, to_time};
use crate::context::Context;
use crate::run::CallError;
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

/// What a check's answer says (pure): passed, and the message for the condition and event.
pub fn check_result(answer: &Result<pb::Result, CallError>) -> (bool, String) {
    match answer {
        Ok(_) => (true, "restic check found no errors".to_owned()),
        Err(e) => (false, e.to_string()),
    }
}

/// Records a finished check in `status` (pure): its time and result, and the conditions
/// `IntegrityCheckSucceeded` and `IntegrityCheckFailed`, which always disagree.
pub fn record_check(
    status: &mut ResticRepositoryStatus,
    passed: bool,
    message: &str,
    now: DateTime<Utc>,
    generation: Option<i64>,
) {
    let t = to_time(now);
    status.last_integrity_check = Some(t.clone());
    status.last_integrity_check_result = Some(match passed {
        true => IntegrityCheckResult::Passed,
        false => IntegrityCheckResult::Failed,
    });
    if passed {
        status.last_successful_integrity_check = Some(t.clone());
    }
    let reason = match passed {
        true => reasons::INTEGRITY_CHECK_PASSED,
        false => reasons::INTEGRITY_CHECK_FAILED,
    };
    for (type_, ok) in [
        (ct::INTEGRITY_CHECK_SUCCEEDED, passed),
        (ct::INTEGRITY_CHECK_FAILED, !passed),
    ] {
        let c = Condition::new(type_, ok, reason, message, generation, t.clone());
        set_condition(&mut status.conditions, c);
    }
}

/// Runs the integrity check due at `scheduled` (or triggered by `manual`) and records it.
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
    // Record the trigger and the next time first, so a crash never repeats this check in a
    // loop.
    let next = next_integrity_check(repo, ctx.now().max(scheduled));
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
    let note = "Integrity check started".to_owned();
    publish(ctx, repo, EventType::Normal, er::INTEGRITY_CHECK_STARTED, note).await;
    let request = request::check(repo, creds, scheduled, ctx.config.maintenance_timeout);
    let run_id = crate::run::id_of(&request.options);
    let answer = ctx
        .dispatch(
            "check",
            &agent.address,
            &run_id,
            |mut c| async move { c.check(request).await },
            &mut crate::run::Quiet,
        )
        .await
        .succeeded();
    record(ctx, repo, check_result(&answer)).await;
}

/// Records a finished check: metrics, status and event.
async fn record(ctx: &Context, repo: &ResticRepository, (passed, message): (bool, String)) {
    let (ns, name) = (repo.namespace().unwrap_or_default(), repo.name_any());
    let api: Api<ResticRepository> = Api::namespaced(ctx.client.clone(), &ns);
    let (now, generation) = (ctx.now(), repo.meta().generation);
    let labels = [name.as_str(), ns.as_str()];
    let m = &ctx.metrics;
    m.integrity_check_timestamp
        .with_label_values(&labels)
        .set(now.timestamp() as f64);
    m.integrity_check_status
        .with_label_values(&labels)
        .set(if passed { 1.0 } else { 0.0 });
    let _ = ctx
        .status
        .update(&api, &name, |_, s| {
            record_check(s, passed, &message, now, generation)
        })
        .await;
    match passed {
        true => publish(ctx, repo, EventType::Normal, er::INTEGRITY_CHECK_PASSED, message).await,
        false => {
            let note = format!("Repository integrity check failed: {message}");
            publish(ctx, repo, EventType::Warning, er::REPOSITORY_UNHEALTHY, note).await
        }
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

    #[test]
    fn a_check_records_its_result_and_two_conditions_that_agree() {
        let now: DateTime<Utc> = "2026-11-22T03:10:00Z".parse().unwrap();
        let mut s = ResticRepositoryStatus::default();
        let failed = Err(CallError::Failed(Box::new(pb::Result {
            outcome: pb::Outcome::Failed as i32,
            failure: pb::FailureKind::Restic as i32,
            reason: "pack 1f2e is damaged".into(),
            ..Default::default()
        })));
        let (passed, message) = check_result(&failed);
        assert!(!passed);
        assert_eq!(message, "restic failed: pack 1f2e is damaged");
        record_check(&mut s, passed, &message, now, Some(2));
        let c = |s: &ResticRepositoryStatus, t| {
            restic_operator_api::common::find_condition(&s.conditions, t)
                .unwrap()
                .is_true()
        };
        assert!(!c(&s, ct::INTEGRITY_CHECK_SUCCEEDED) && c(&s, ct::INTEGRITY_CHECK_FAILED));
        assert_eq!(s.last_integrity_check_result, Some(IntegrityCheckResult::Failed));
        assert!(s.last_successful_integrity_check.is_none());

        let (passed, message) = check_result(&Ok(pb::Result::default()));
        record_check(&mut s, passed, &message, now, Some(2));
        assert!(c(&s, ct::INTEGRITY_CHECK_SUCCEEDED) && !c(&s, ct::INTEGRITY_CHECK_FAILED));
        assert_eq!(s.last_successful_integrity_check, Some(to_time(now)));
        let (_, lost) = check_result(&Err(CallError::Lost));
        assert_eq!(lost, "the agent lost the run");
    }
}
