//! The GlobalRetentionPolicy controller: repository-wide retention on a schedule or a manual
//! trigger. Its reconcile has the backup controller's shape (re-attach, validate, dereference,
//! decide and record under the status lock, apply) and plans with the same [`crate::plan`].
//! A run (see [`run`]) takes the repository alone, forgets each policy's snapshots, prunes once
//! if asked, and records what it removed.

pub mod run;

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use kube::runtime::controller::Action;
use kube::runtime::events::EventType;
use kube::{Api, Resource, ResourceExt};
use restic_operator_api::common::{ConcurrencyPolicy, reasons};
use restic_operator_api::retention::GlobalRetentionPolicy;

use crate::context::Context;
use crate::error::Result;
use crate::plan::{Blocked, Plan, Scheduled, events, gate};
use crate::repository::from_time;
use crate::resolve;
use crate::schedule::Schedule;

pub const CONTROLLER: &str = "globalretentionpolicy";

/// The prefix of a policy's run ids.
pub const RUN_PREFIX: &str = "grp";

/// Decides what to do at `now` (pure). A tick due while a run is in flight is skipped
/// (`Forbid`: retention is not worth running twice at once).
pub fn plan(
    policy: &GlobalRetentionPolicy,
    schedule: &Schedule,
    now: DateTime<Utc>,
    deadline: Duration,
) -> Plan {
    let status = policy.status.clone().unwrap_or_default();
    let uid = policy.uid().unwrap_or_default();
    let scheduled = Scheduled {
        prefix: RUN_PREFIX,
        uid: &uid,
        suspend: policy.spec.suspend,
        in_flight: status.active_run.is_some(),
        policy: ConcurrencyPolicy::Forbid,
        last_schedule: status.last_schedule_time.as_ref().map(from_time),
        created: policy.metadata.creation_timestamp.as_ref().map(from_time),
        manual: policy.pending_manual_trigger(),
        generation: policy.metadata.generation.unwrap_or(0),
        last_run: None,
    };
    crate::plan::plan(&scheduled, schedule, now, deadline)
}

/// Why the spec cannot run as it is (pure): an empty hostname or tag in a selector, which
/// restic would read as "any" (so a selector meant to narrow would select everything), or a
/// rule that keeps nothing (restic refuses to forget with no keep rule).
pub fn invalid(policy: &GlobalRetentionPolicy) -> Option<String> {
    policy.spec.policies.iter().enumerate().find_map(|(i, rule)| {
        let n = i + 1;
        let selector = &rule.selector;
        if selector.hostname.as_deref().is_some_and(|h| h.trim().is_empty()) {
            return Some(format!(
                "policies[{n}].selector.hostname is empty; leave it out to select any host"
            ));
        }
        if selector.tags.iter().any(|t| t.trim().is_empty()) {
            return Some(format!("policies[{n}].selector.tags holds an empty tag"));
        }
        if selector.tags.iter().any(|t| t.contains(',')) {
            let why = "restic reads a comma as two tags; list them apart";
            return Some(format!(
                "policies[{n}].selector.tags holds a tag with a comma: {why}"
            ));
        }
        let keep = crate::retention::keep_policy(&rule.retention);
        let keeps = [
            keep.last,
            keep.hourly,
            keep.daily,
            keep.weekly,
            keep.monthly,
            keep.yearly,
        ];
        keeps
            .iter()
            .all(|k| *k == 0)
            .then(|| format!("policies[{n}].retention keeps nothing; set at least one keep count above 0"))
    })
}

/// Why the policy may not use its repository at all (pure): a policy acts on every
/// namespace's snapshots in a repository, so only the repository's own namespace may have one.
pub fn confined(policy: &GlobalRetentionPolicy) -> Option<Blocked> {
    let ns = policy.namespace().unwrap_or_default();
    let repo_ns = policy.spec.repository_ref.namespace_or(&ns);
    (repo_ns != ns).then(|| Blocked {
        reason: reasons::NAMESPACE_NOT_ALLOWED,
        message: format!(
            "a GlobalRetentionPolicy acts on every snapshot of its repository, whichever namespace \
             made it, so it must be in the repository's namespace ({repo_ns}), not {ns}"
        ),
    })
}

pub async fn reconcile(policy: Arc<GlobalRetentionPolicy>, ctx: Arc<Context>) -> Result<Action> {
    crate::context::observed(&ctx.metrics, CONTROLLER, reconcile_inner(&policy, &ctx)).await
}

/// Re-attach → validate → dereference → decide and record (under the status lock) → apply.
async fn reconcile_inner(policy: &GlobalRetentionPolicy, ctx: &Arc<Context>) -> Result<Action> {
    let (ns, name) = (policy.namespace().unwrap_or_default(), policy.name_any());
    let api: Api<GlobalRetentionPolicy> = Api::namespaced(ctx.client.clone(), &ns);
    let now = ctx.now();
    if let Some(active) = policy.status.as_ref().and_then(|s| s.active_run.as_ref()) {
        run::ensure_running(ctx, &ns, &name, &active.run_id);
    }
    let generation = policy.meta().generation;
    let parsed = Schedule::parse(&policy.spec.schedule, policy.spec.timezone.as_deref());
    let schedule = match (parsed.map_err(|e| e.to_string()), invalid(policy)) {
        (Ok(s), None) => s,
        (Err(message), _) | (_, Some(message)) => {
            crate::status::write_invalid(&ctx.status, &api, policy, &message, now).await?;
            return Ok(Action::await_change());
        }
    };
    let blocked = match confined(policy) {
        Some(b) => Some(b),
        None => resolve::blocked(&ctx.client, &ns, &policy.spec.repository_ref).await?,
    };
    let deadline = ctx.config.starting_deadline;
    let mut decided = None;
    let updated = ctx
        .status
        .update(&api, &name, |fresh, s| {
            let decision = gate(plan(fresh, &schedule, now, deadline), blocked.as_ref());
            let suspend = fresh.spec.suspend;
            crate::plan::record(s, suspend, &decision, blocked.as_ref(), generation, now);
            decided = Some(decision);
        })
        .await?;
    let (Some(updated), Some(decision)) = (updated, decided) else {
        return Ok(Action::await_change());
    };
    for (type_, reason, note) in events(&decision, blocked.as_ref()) {
        publish(ctx, policy, type_, reason, note).await;
    }
    if let Some(run) = &decision.start {
        run::ensure_running(ctx, &ns, &name, &run.run_id);
    }
    let key = crate::status::backoff_key(policy);
    let in_flight = updated.status.as_ref().is_some_and(|s| s.active_run.is_some());
    Ok(ctx.after_decision(&key, blocked.is_some(), in_flight, &decision))
}

pub async fn publish(
    ctx: &Context,
    policy: &GlobalRetentionPolicy,
    type_: EventType,
    reason: &str,
    note: String,
) {
    crate::context::publish(&ctx.policy_events, policy, type_, reason, note).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(namespace: &str, spec: &str) -> GlobalRetentionPolicy {
        serde_yaml::from_str(&format!(
            "apiVersion: backup.resticbackup.io/v1alpha1\nkind: GlobalRetentionPolicy\n\
             metadata: {{name: weekly, namespace: {namespace}}}\n\
             spec: {{schedule: '@weekly', {spec}}}\n"
        ))
        .unwrap()
    }

    #[test]
    fn a_policy_acts_only_on_a_repository_of_its_own_namespace() {
        let rules = "policies: [{retention: {keepLast: 1}}]";
        let own = policy(
            "backup-system",
            &format!("repositoryRef: {{name: shared}}, {rules}"),
        );
        assert_eq!(confined(&own), None);
        let named = format!("repositoryRef: {{name: shared, namespace: backup-system}}, {rules}");
        assert_eq!(confined(&policy("backup-system", &named)), None);
        let tenant = confined(&policy("team-a", &named)).unwrap();
        assert_eq!(tenant.reason, reasons::NAMESPACE_NOT_ALLOWED);
        assert!(
            tenant
                .message
                .contains("must be in the repository's namespace (backup-system), not team-a")
        );
    }

    #[test]
    fn selectors_that_would_select_everything_and_rules_that_keep_nothing_are_refused() {
        let spec = |rule: &str| policy("n", &format!("repositoryRef: {{name: r}}, policies: [{rule}]"));
        assert_eq!(
            invalid(&spec(
                "{selector: {tags: [a], hostname: db}, retention: {keepLast: 1}}"
            )),
            None
        );
        let empty_host = invalid(&spec("{selector: {hostname: ''}, retention: {keepLast: 1}}")).unwrap();
        assert!(
            empty_host.contains("policies[1].selector.hostname is empty"),
            "{empty_host}"
        );
        let empty_tag = invalid(&spec("{selector: {tags: [a, ' ']}, retention: {keepLast: 1}}")).unwrap();
        assert!(empty_tag.contains("empty tag"), "{empty_tag}");
        let comma = invalid(&spec("{selector: {tags: ['a,b']}, retention: {keepLast: 1}}")).unwrap();
        assert!(comma.contains("a tag with a comma"), "{comma}");
        let nothing = invalid(&spec("{retention: {keepLast: 0}}")).unwrap();
        assert!(nothing.contains("keeps nothing"), "{nothing}");
    }

    #[test]
    fn a_policy_plans_like_a_backup_with_its_own_run_ids_and_never_runs_twice_at_once() {
        let p: GlobalRetentionPolicy = serde_yaml::from_str(
            "apiVersion: backup.resticbackup.io/v1alpha1\nkind: GlobalRetentionPolicy\n\
             metadata: {name: weekly, namespace: n, uid: u1, creationTimestamp: '2026-11-01T00:00:00Z'}\n\
             spec: {repositoryRef: {name: r}, schedule: '0 3 * * 0', policies: [{retention: {keepLast: 1}}]}\n\
             status: {lastScheduleTime: '2026-11-22T03:00:00Z'}\n",
        )
        .unwrap();
        let schedule = Schedule::parse("0 3 * * 0", None).unwrap();
        let hour = Duration::from_secs(3600);
        let now: DateTime<Utc> = "2026-11-29T03:00:05Z".parse().unwrap();
        let run = plan(&p, &schedule, now, hour).start.unwrap();
        assert!(run.run_id.starts_with("grp-u1-"), "{}", run.run_id);
        let mut busy = p.clone();
        busy.status.as_mut().unwrap().active_run = Some(Default::default());
        let skipped = plan(&busy, &schedule, now, hour);
        assert!(
            skipped.start.is_none() && skipped.skipped.is_some(),
            "{skipped:?}"
        );
    }
}
