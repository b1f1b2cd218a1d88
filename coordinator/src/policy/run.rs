//! One GlobalRetentionPolicy run: the repository resolved and taken alone (after its backups
//! and checks, with an event when it has to wait), its size read, one `restic forget` per
//! policy (only the snapshots its selector matches), one `restic prune` if asked, its size
//! read again, and the result recorded. Every agent run's id derives from the run's id, so a
//! run re-entered after a coordinator restart attaches to the steps already done instead of
//! doing them twice.

use std::sync::Arc;

use chrono::{DateTime, Utc};
use kube::runtime::events::EventType;
use kube::{Api, Resource, ResourceExt};
use restic_operator_api::common::{
    ActiveRun, Condition, RunResult, condition_types as ct, event_reasons as er, format_bytes,
    format_duration, reasons, set_condition,
};
use restic_operator_api::retention::{
    GlobalRetentionPolicy, GlobalRetentionPolicyStatus, PolicyRunResult, RetentionPolicyRule,
};
use restic_operator_proto::v1 as pb;

use super::publish;
use crate::agents::AgentEndpoint;
use crate::context::Context;
use crate::repository::request::Kind;
use crate::repository::{call, from_time, to_time};
use crate::resolve::{self, Resolved};
use crate::retention::{self, Selection};
use crate::run::{self, CallError};

/// How a run ended.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Outcome {
    pub result: Option<RunResult>,
    /// What happened, for a person (every failure, by policy).
    pub message: String,
    /// Snapshots the policies removed.
    pub removed: u64,
    /// What each policy did, in the spec's order.
    pub policies: Vec<PolicyRunResult>,
    /// The repository's size before and after (none when it could not be read).
    pub size_before: Option<u64>,
    pub size_after: Option<u64>,
    /// Snapshots in the repository after the run.
    pub snapshots_after: Option<u64>,
}

impl Outcome {
    fn failed(message: String) -> Self {
        Self {
            result: Some(RunResult::Failed),
            message,
            ..Default::default()
        }
    }
}

/// Starts the runner of run `run_id` of a policy unless it runs already.
pub fn ensure_running(ctx: &Arc<Context>, ns: &str, name: &str, run_id: &str) {
    let ctx2 = Arc::clone(ctx);
    let (ns, name, run_id) = (ns.to_owned(), name.to_owned(), run_id.to_owned());
    ctx.tasks.spawn_once(
        &format!("policy-run/{run_id}"),
        Box::pin(async move { run(ctx2, ns, name, run_id).await }),
    );
}

async fn run(ctx: Arc<Context>, ns: String, name: String, run_id: String) {
    let api: Api<GlobalRetentionPolicy> = Api::namespaced(ctx.client.clone(), &ns);
    let Ok(Some(policy)) = api.get_opt(&name).await else {
        return; // gone, or the API is down: the next reconcile starts the runner again
    };
    let Some(active) = policy
        .status
        .as_ref()
        .and_then(|s| s.active_run.clone())
        .filter(|a| a.run_id == run_id)
    else {
        return;
    };
    tracing::info!(policy = %format!("{ns}/{name}"), run_id, "retention run");
    let started = active
        .start_time
        .as_ref()
        .map(from_time)
        .unwrap_or_else(|| ctx.now());
    let outcome = execute(&ctx, &policy, &active).await;
    let (now, generation) = (ctx.now(), policy.meta().generation);
    let written = ctx
        .status
        .update(&api, &name, |_, s| {
            finish(s, &active, &outcome, started, now, generation)
        })
        .await;
    if let Err(e) = written {
        tracing::warn!(policy = %name, error = %e, "could not write the result; the run is re-entered");
        return;
    }
    let (type_, reason, note) = event(&outcome);
    publish(&ctx, &policy, type_, reason, note).await;
    let repo_ns = policy.spec.repository_ref.namespace_or(&ns).to_owned();
    crate::repository::refresh_soon(&ctx, &repo_ns, &policy.spec.repository_ref.name);
}

/// The repository taken alone, then: size, forgets, prune, size.
async fn execute(ctx: &Context, policy: &GlobalRetentionPolicy, active: &ActiveRun) -> Outcome {
    let ns = policy.namespace().unwrap_or_default();
    if let Some(refused) = super::confined(policy)
        .map(|b| b.message)
        .or_else(|| super::invalid(policy))
    {
        return Outcome::failed(refused);
    }
    let resolved = match resolve::resolve_for(&ctx.client, &ns, &policy.spec.repository_ref).await {
        Ok(r) => r,
        Err(e) => return Outcome::failed(e.to_string()),
    };
    let agent = match ctx.agents.any() {
        Ok(a) => a,
        Err(e) => return Outcome::failed(e.to_string()),
    };
    let key = resolved.access().key();
    let _exclusive = match ctx.locks.try_exclusive(&key) {
        Some(guard) => guard,
        None => {
            let note = format!(
                "Run {} waits for the backups and checks of repository {key} to finish",
                active.run_id
            );
            publish(ctx, policy, EventType::Normal, er::REPOSITORY_BUSY, note).await;
            ctx.locks.exclusive(&key).await
        }
    };
    let step = |suffix: &str, timeout| run::options(&format!("{}-{suffix}", active.run_id), timeout);
    let (maintenance, stats_timeout) = (ctx.config.maintenance_timeout, ctx.config.stats_timeout);
    let size_before = stats(ctx, &agent, &resolved, step("size-before", stats_timeout)).await;
    let mut outcome = Outcome {
        size_before: size_before.as_ref().map(|s| s.total_size),
        ..Default::default()
    };
    let mut failures = Vec::new();
    for (i, rule) in policy.spec.policies.iter().enumerate() {
        let request = forget(policy, rule, step(&format!("p{i}"), maintenance), &resolved);
        let mut done = PolicyRunResult {
            policy: i32::try_from(i + 1).unwrap_or(i32::MAX),
            selector: describe(rule),
            ..Default::default()
        };
        match dispatch_forget(ctx, &agent, request).await {
            Ok(summary) => {
                outcome.removed += summary.removed.len() as u64;
                done.snapshots_removed = i64::try_from(summary.removed.len()).ok();
                done.snapshots_kept = i64::try_from(summary.kept.len()).ok();
            }
            Err(e) => {
                failures.push(format!("policy {} ({}): {e}", i + 1, describe(rule)));
                done.error = Some(e.to_string());
            }
        }
        outcome.policies.push(done);
    }
    let forgot = failures.len() < policy.spec.policies.len();
    if policy.spec.prune && forgot {
        let request = pb::RepositoryRequest {
            options: Some(step("prune", maintenance)),
            repository: Some(resolved.agent_repository()),
        };
        if let Err(e) = call(ctx, &agent.address, Kind::Prune, request).await {
            failures.push(format!("prune: {e}"));
        }
    }
    let after = stats(ctx, &agent, &resolved, step("size-after", stats_timeout)).await;
    outcome.size_after = after.as_ref().map(|s| s.total_size);
    outcome.snapshots_after = after.as_ref().map(|s| s.snapshots_count);
    outcome.result = Some(match (failures.is_empty(), forgot) {
        (true, _) => RunResult::Succeeded,
        (false, true) => RunResult::PartiallyFailed,
        (false, false) => RunResult::Failed,
    });
    outcome.message = failures.join("; ");
    outcome
}

/// The forget of one policy (pure): the snapshots its selector matches, grouped by the spec's
/// `groupBy`, kept by its rule; never pruned here (the run prunes once, after all forgets).
pub fn forget(
    policy: &GlobalRetentionPolicy,
    rule: &RetentionPolicyRule,
    options: pb::RunOptions,
    resolved: &Resolved,
) -> pb::ForgetRequest {
    let selection = Selection::of_rule(&rule.selector, &policy.spec.group_by);
    retention::forget_request(
        options,
        resolved.agent_repository(),
        &rule.retention,
        selection,
        false,
    )
}

/// A policy's selector, for messages.
fn describe(rule: &RetentionPolicyRule) -> String {
    let mut parts = Vec::new();
    if !rule.selector.tags.is_empty() {
        parts.push(format!("tags {}", rule.selector.tags.join(",")));
    }
    if let Some(h) = &rule.selector.hostname {
        parts.push(format!("host {h}"));
    }
    match parts.is_empty() {
        true => "every snapshot".into(),
        false => parts.join(", "),
    }
}

async fn dispatch_forget(
    ctx: &Context,
    agent: &AgentEndpoint,
    request: pb::ForgetRequest,
) -> Result<pb::ForgetSummary, CallError> {
    let run_id = run::id_of(&request.options);
    let ended = ctx
        .dispatch(
            "forget",
            &agent.address,
            &run_id,
            |mut c| async move { c.forget(request).await },
            &mut crate::run::Quiet,
        )
        .await;
    Ok(ended.succeeded()?.forget.unwrap_or_default())
}

/// The repository's statistics, or none when they cannot be read (the run goes on without
/// the sizes).
async fn stats(
    ctx: &Context,
    agent: &AgentEndpoint,
    resolved: &Resolved,
    options: pb::RunOptions,
) -> Option<pb::RepositoryStats> {
    let request = pb::RepositoryRequest {
        options: Some(options),
        repository: Some(resolved.agent_repository()),
    };
    match call(ctx, &agent.address, Kind::Stats, request).await {
        Ok(r) => r.stats,
        Err(e) => {
            tracing::warn!(error = %e, "repository statistics for retention could not be read");
            None
        }
    }
}

/// Records a finished run in `status` (pure): the run's figures, `Ready`, `Progressing` and
/// `Degraded`, and `activeRun` cleared. A status whose run in flight is another is left alone.
pub fn finish(
    status: &mut GlobalRetentionPolicyStatus,
    active: &ActiveRun,
    outcome: &Outcome,
    started: DateTime<Utc>,
    now: DateTime<Utc>,
    generation: Option<i64>,
) {
    if status.active_run.as_ref().map(|a| &a.run_id) != Some(&active.run_id) {
        return;
    }
    let result = outcome.result.unwrap_or(RunResult::Failed);
    status.active_run = None;
    status.last_run = Some(to_time(started));
    status.last_run_result = Some(result);
    status.last_run_duration = Some(format_duration((now - started).to_std().unwrap_or_default()));
    status.message = Some(outcome.message.clone()).filter(|m| !m.is_empty());
    let bytes = |b: Option<u64>| b.and_then(|b| i64::try_from(b).ok());
    status.repository_size_before = outcome.size_before.map(format_bytes);
    status.repository_size_before_bytes = bytes(outcome.size_before);
    status.repository_size_after = outcome.size_after.map(format_bytes);
    status.repository_size_after_bytes = bytes(outcome.size_after);
    status.snapshots_removed = i64::try_from(outcome.removed).ok();
    status.policies = outcome.policies.clone();
    status.snapshots_after_retention = bytes(outcome.snapshots_after);
    let (ok, reason, message) = match result {
        RunResult::Succeeded => (true, reasons::LAST_RUN_SUCCEEDED, summary(outcome)),
        _ => (false, reasons::LAST_RUN_FAILED, outcome.message.clone()),
    };
    let set = |s: &mut GlobalRetentionPolicyStatus, type_: &str, ok: bool, message: String| {
        let c = Condition::new(type_, ok, reason, message, generation, to_time(now));
        set_condition(&mut s.conditions, c);
    };
    set(status, ct::READY, ok, message.clone());
    set(
        status,
        ct::PROGRESSING,
        false,
        format!("Run {} finished", active.run_id),
    );
    set(
        status,
        ct::DEGRADED,
        !ok,
        if ok { String::new() } else { message },
    );
}

fn summary(outcome: &Outcome) -> String {
    let size = match (outcome.size_before, outcome.size_after) {
        (Some(b), Some(a)) => format!("; repository {} → {}", format_bytes(b), format_bytes(a)),
        _ => String::new(),
    };
    format!("Removed {} snapshot(s){size}", outcome.removed)
}

/// The event that tells people how the run ended (pure).
pub fn event(outcome: &Outcome) -> (EventType, &'static str, String) {
    match outcome.result {
        Some(RunResult::Succeeded) => (EventType::Normal, er::RETENTION_COMPLETED, summary(outcome)),
        _ => (
            EventType::Warning,
            er::RETENTION_FAILED,
            format!("{}: {}", summary(outcome), outcome.message),
        ),
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn policy(status: &str) -> GlobalRetentionPolicy {
        serde_yaml::from_str(&format!(
            "apiVersion: backup.resticbackup.io/v1alpha1\nkind: GlobalRetentionPolicy\n\
             metadata: {{name: weekly, namespace: n, uid: u1}}\n\
             spec: {{repositoryRef: {{name: r}}, schedule: '@weekly', groupBy: [], prune: true, \
             policies: [{{selector: {{tags: [app=a], hostname: db}}, retention: {{keepLast: 2}}}}, \
             {{retention: {{keepDaily: 7}}}}]}}\n\
             status: {{{status}}}\n"
        ))
        .unwrap()
    }

    fn t(s: &str) -> DateTime<Utc> {
        s.parse().unwrap()
    }

    #[test]
    fn each_policy_forgets_only_what_its_selector_matches_without_pruning() {
        let p = policy("");
        let repo = serde_yaml::from_str(
            "apiVersion: backup.resticbackup.io/v1alpha1\nkind: ResticRepository\n\
             metadata: {name: r, namespace: n}\n\
             spec: {repositoryURL: 's3:x/y', credentialsSecretRef: {name: c}}\n",
        )
        .unwrap();
        let access = crate::resolve::check_namespace(&repo, "n", &Default::default()).unwrap();
        let secret = serde_yaml::from_str(
            "apiVersion: v1\nkind: Secret\nmetadata: {name: c, namespace: n}\nstringData: {RESTIC_PASSWORD: pw}\n",
        )
        .unwrap();
        let resolved = Resolved::from_secret(access, &secret).unwrap();
        let options = run::options("grp-u1-1-p0", Duration::from_secs(60));
        let r = forget(&p, &p.spec.policies[0], options, &resolved);
        assert_eq!(
            (r.host.as_str(), r.tags.clone()),
            ("db", vec!["app=a".to_owned()])
        );
        assert!(r.group_by.is_empty(), "an empty groupBy groups nothing");
        assert!(!r.prune, "the run prunes once, after every forget");
        assert_eq!(r.policy.unwrap().last, 2);
        let r = forget(
            &p,
            &p.spec.policies[1],
            run::options("x", Duration::ZERO),
            &resolved,
        );
        assert_eq!(
            (r.host.as_str(), r.tags.len()),
            ("", 0),
            "an empty selector selects all"
        );
        assert_eq!(describe(&p.spec.policies[0]), "tags app=a, host db");
        assert_eq!(describe(&p.spec.policies[1]), "every snapshot");
    }

    #[test]
    fn a_finished_run_records_its_figures_and_conditions() {
        let mut s = policy("activeRun: {runID: grp-u1-1}").status.unwrap();
        let active = s.active_run.clone().unwrap();
        let outcome = Outcome {
            result: Some(RunResult::Succeeded),
            removed: 5,
            size_before: Some(2048),
            size_after: Some(1024),
            snapshots_after: Some(15),
            policies: vec![PolicyRunResult {
                policy: 1,
                selector: "every snapshot".into(),
                snapshots_removed: Some(5),
                snapshots_kept: Some(15),
                error: None,
            }],
            ..Default::default()
        };
        let started = t("2026-11-29T01:20:00Z");
        finish(
            &mut s,
            &active,
            &outcome,
            started,
            t("2026-11-29T01:21:30Z"),
            Some(3),
        );
        assert!(s.active_run.is_none());
        assert_eq!(s.last_run_duration.as_deref(), Some("1m30s"));
        assert_eq!(
            (s.snapshots_removed, s.snapshots_after_retention),
            (Some(5), Some(15))
        );
        assert_eq!(s.repository_size_after.as_deref(), Some("1.0 KiB"));
        assert_eq!(s.policies, outcome.policies, "by policy");
        let ready = restic_operator_api::common::find_condition(&s.conditions, ct::READY).unwrap();
        assert!(ready.is_true());
        assert_eq!(
            ready.message.as_deref(),
            Some("Removed 5 snapshot(s); repository 2.0 KiB → 1.0 KiB")
        );
        assert_eq!(event(&outcome).1, er::RETENTION_COMPLETED);

        // A failed policy: partially failed, degraded, the failure in the message.
        let mut s = policy("activeRun: {runID: grp-u1-2}").status.unwrap();
        let active = s.active_run.clone().unwrap();
        let partial = Outcome {
            result: Some(RunResult::PartiallyFailed),
            message: "policy 2 (every snapshot): repository locked".into(),
            ..Default::default()
        };
        finish(&mut s, &active, &partial, started, started, None);
        let degraded = restic_operator_api::common::find_condition(&s.conditions, ct::DEGRADED).unwrap();
        assert!(degraded.is_true());
        assert_eq!(
            s.message.as_deref(),
            Some("policy 2 (every snapshot): repository locked")
        );
        let (type_, reason, note) = event(&partial);
        assert_eq!((type_, reason), (EventType::Warning, er::RETENTION_FAILED));
        assert!(note.ends_with("repository locked"), "{note}");

        // Another run in flight: left alone.
        let mut s = policy("activeRun: {runID: grp-u1-3}").status.unwrap();
        finish(&mut s, &active, &outcome, started, started, None);
        assert!(s.active_run.is_some() && s.last_run.is_none());
    }
}
