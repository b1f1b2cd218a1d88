//! The chart's RBAC, held to what the operator really does: the coordinator runs as the chart's
//! ServiceAccount on an RBAC-enforcing API server, a scenario uses every feature that needs a
//! grant, and the API server's audit log must show each granted verb used. A grant the code
//! never uses fails this test; a use that is not granted fails the scenario. A test binary of
//! its own: its cluster's audit log holds only this scenario.

#[path = "../cluster/support.rs"]
mod support;

use std::collections::BTreeSet;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use k8s_openapi::api::rbac::v1::{ClusterRole, PolicyRule, Role};
use kube::Api;
use restic_operator_api::retention::GlobalRetentionPolicy;

use restic_operator_e2e::EXTERNAL_KUBECONFIG_ENV;
use support::{Ctx, ONCALL_GROUP, OPERATOR_NAMESPACE, RELEASE, agent_node, env};

/// Grants the scenario cannot show in use, each with the reason it is still needed.
const NOT_SEEN: &[(&str, &str, &str, &str)] = &[
    (
        "",
        "pods/exec",
        "create",
        "Kubernetes 1.35+ authorizes exec over WebSocket as create (1.34: get)",
    ),
    (
        "",
        "secrets",
        "update",
        "certificate renewal; the_agent_certificate_is_renewed_before_it_expires_and_runs_keep_working proves it",
    ),
    (
        "events.k8s.io",
        "events",
        "patch",
        "an event that repeats is patched, which this short scenario may not do",
    ),
    (
        "certificates.k8s.io",
        "signers",
        "approve",
        "an authorization check of the approval, not a request of its own",
    ),
    (
        "certificates.k8s.io",
        "signers",
        "sign",
        "an authorization check of the signing, not a request of its own",
    ),
];

/// (apiGroup, resource[/subresource], verb) of every rule.
fn grants(rules: &[PolicyRule]) -> BTreeSet<(String, String, String)> {
    let mut out = BTreeSet::new();
    for r in rules {
        for g in r.api_groups.iter().flatten() {
            for res in r.resources.iter().flatten() {
                for v in &r.verbs {
                    out.insert((g.clone(), res.clone(), v.clone()));
                }
            }
        }
    }
    out
}

#[tokio::test]
async fn the_chart_grants_the_coordinator_only_what_it_uses() -> Result<()> {
    if std::env::var_os(EXTERNAL_KUBECONFIG_ENV).is_some() {
        eprintln!(
            "not run on the cluster of {EXTERNAL_KUBECONFIG_ENV}: it reads the API server's audit \
             log, which only a cluster this test starts has"
        );
        return Ok(());
    }
    let ctx = Ctx::disruptive("rbac").await?;
    // The repository lives in another namespace and admits this one by label: the coordinator
    // reads the backup's namespace to match it.
    let repo_ns = format!("{}-repo", ctx.id);
    ctx.kubectl(&["create", "namespace", &repo_ns])?;
    ctx.kubectl(&[
        "label",
        "namespace",
        &ctx.namespace,
        "e2e.resticbackup.io/backups=yes",
    ])?;
    let repo = ctx.repository("main");
    let mut data = format!("  RESTIC_PASSWORD: {}\n", repo.password);
    for (k, v) in repo.s3.env() {
        data.push_str(&format!("  {k}: {v}\n"));
    }
    ctx.apply_in(
        &repo_ns,
        &format!(
        "apiVersion: v1\nkind: Secret\nmetadata: {{name: creds, namespace: {repo_ns}}}\nstringData:\n{data}---\n\
         apiVersion: backup.resticbackup.io/v1alpha1\nkind: ResticRepository\nmetadata: {{name: shared, namespace: {repo_ns}}}\n\
         spec:\n  repositoryURL: '{}'\n  credentialsSecretRef: {{name: creds}}\n  \
         allowedNamespaces: {{selector: {{matchLabels: {{e2e.resticbackup.io/backups: \"yes\"}}}}}}\n",
        repo.url
    ),
    )?;

    // A live pod's claim with an exec hook before and a failing Job hook after (its pod's
    // output is read); and a claim no pod mounts (a holder pod).
    ctx.deploy_app("live").await?;
    ctx.deploy_app("idle").await?;
    ctx.scale_to_zero("idle").await?;
    ctx.apply(&format!(
        r#"apiVersion: backup.resticbackup.io/v1alpha1
kind: ResticBackup
metadata: {{name: live}}
spec:
  repositoryRef: {{name: shared, namespace: {repo_ns}}}
  schedule: "0 3 * * *"
  source: {{pvc: {{claimName: live-data}}}}
  hooks:
    preBackup:
      exec:
        podSelector: {{matchLabels: {{app: live}}}}
        container: app
        command: [sh, -c, "echo ready"]
    postBackup:
      job:
        podTemplate:
          spec:
            containers:
              - name: notify
                image: e2e.local/busybox:1.35
                command: [sh, -c, "echo the post hook fails on purpose; exit 3"]
  manualTrigger: one
"#
    ))?;
    let live = ctx.finished_run("live", None, Duration::from_secs(180)).await?;
    ensure!(
        live.message
            .as_deref()
            .unwrap_or_default()
            .contains("fails on purpose"),
        "the failed Job hook's output is not in the result: {live:?}\n{}",
        ctx.diagnostics()
    );
    ctx.apply(&format!(
        "apiVersion: backup.resticbackup.io/v1alpha1\nkind: ResticBackup\nmetadata: {{name: idle}}\n\
         spec:\n  repositoryRef: {{name: shared, namespace: {repo_ns}}}\n  schedule: \"0 3 * * *\"\n  \
         source: {{pvc: {{claimName: idle-data}}}}\n  manualTrigger: one\n"
    ))?;
    let idle = ctx.finished_run("idle", None, Duration::from_secs(180)).await?;
    ensure!(idle.snapshot_id.is_some(), "{idle:?}\n{}", ctx.diagnostics());

    // A restore of it into a new claim (created by the coordinator), through a holder pod.
    ctx.apply(
        "apiVersion: backup.resticbackup.io/v1alpha1\nkind: ResticRestore\nmetadata: {name: back}\n\
         spec: {backupRef: {name: idle}, target: {newPVC: {name: back-data, size: 1Gi}}}\n",
    )?;
    ctx.completed_restore("back", Duration::from_secs(180)).await?;

    // Repository-wide retention, from the repository's own namespace (keeping everything).
    ctx.apply_in(
        &repo_ns,
        &format!(
            "apiVersion: backup.resticbackup.io/v1alpha1\nkind: GlobalRetentionPolicy\n\
             metadata: {{name: keep-all, namespace: {repo_ns}}}\n\
             spec:\n  repositoryRef: {{name: shared}}\n  schedule: '@yearly'\n  manualTrigger: one\n  \
             policies:\n  - retention: {{keepLast: 100}}\n"
        ),
    )?;
    let policies: Api<GlobalRetentionPolicy> = Api::namespaced(ctx.client.clone(), &repo_ns);
    let ran = restic_operator_e2e::eventually("the retention run", Duration::from_secs(180), || async {
        let p = policies.get("keep-all").await?;
        Ok(p.status.and_then(|s| s.last_run_result))
    })
    .await?;
    ensure!(ran.to_string() == "Succeeded", "{ran}\n{}", ctx.diagnostics());

    // A person on call gets a debug certificate (signed after a SubjectAccessReview).
    let alice = env().cluster.kubeconfig_as("alice", &[ONCALL_GROUP])?;
    let agent = env().agent.clone();
    let node = agent_node(&ctx.client).await?;
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new(agent)
            .args(["debug", "--node", &node, "--kubeconfig"])
            .arg(alice)
            .arg("health")
            .output()
    })
    .await??;
    ensure!(
        out.status.success(),
        "debug health: {}",
        String::from_utf8_lossy(&out.stderr)
    );

    // What the chart grants the coordinator...
    let cluster_role = Api::<ClusterRole>::all(ctx.client.clone())
        .get(&format!("{RELEASE}-coordinator"))
        .await?;
    let role = Api::<Role>::namespaced(ctx.client.clone(), OPERATOR_NAMESPACE)
        .get(&format!("{RELEASE}-coordinator"))
        .await?;
    let mut granted = grants(cluster_role.rules.as_deref().unwrap_or_default());
    granted.extend(grants(&role.rules.unwrap_or_default()));

    // ...and what it did, as the API server recorded it.
    let user = format!("system:serviceaccount:{OPERATOR_NAMESPACE}:{RELEASE}-coordinator");
    let plane = &env()
        .cluster
        .local
        .as_ref()
        .context("no local control plane")?
        .plane;
    let log = std::fs::read_to_string(plane.audit_log()).context("read the audit log")?;
    let mut used = BTreeSet::new();
    let mut forbidden = BTreeSet::new();
    for line in log.lines() {
        let e: serde_json::Value = serde_json::from_str(line)?;
        if e["user"]["username"] != user.as_str() || e["objectRef"].is_null() {
            continue;
        }
        let o = &e["objectRef"];
        let mut resource = o["resource"].as_str().unwrap_or_default().to_owned();
        if let Some(sub) = o["subresource"].as_str() {
            resource = format!("{resource}/{sub}");
        }
        let key = (
            o["apiGroup"].as_str().unwrap_or_default().to_owned(),
            resource,
            e["verb"].as_str().unwrap_or_default().to_owned(),
        );
        if e["responseStatus"]["code"].as_i64() == Some(403) {
            forbidden.insert(key);
        } else {
            used.insert(key);
        }
    }
    ensure!(forbidden.is_empty(), "the coordinator was refused: {forbidden:?}");
    let unused: Vec<_> = granted
        .iter()
        .filter(|g| !used.contains(*g))
        .filter(|(g, r, v)| {
            !NOT_SEEN
                .iter()
                .any(|(eg, er, ev, _)| eg == g && er == r && ev == v)
        })
        .collect();
    ensure!(
        unused.is_empty(),
        "the chart grants the coordinator what it never used here: {unused:?}\n\
         remove the grant, or make this scenario use it, or add it to NOT_SEEN with the reason\n\
         used: {used:?}"
    );
    Ok(())
}
