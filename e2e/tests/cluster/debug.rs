//! The on-call debug CLI from a kubeconfig alone: `restic-agent debug --node NODE` finds the
//! node's agent, gets a short-lived certificate from the coordinator (only for people who may
//! port-forward to the agent pods; both answers recorded in events) and reaches the agent
//! through the API server. A debug certificate cannot write a snapshot.

use restic_operator_e2e::output_text as text;
use std::process::Output;
use std::time::Duration;

use anyhow::{Result, ensure};
use k8s_openapi::api::rbac::v1::{ClusterRoleBinding, RoleBinding};
use kube::Api;
use kube::api::PostParams;

use crate::support::{Ctx, ONCALL_GROUP, OPERATOR_NAMESPACE, RELEASE, agent_node, env};

fn debug(node: &str, kubeconfig: &std::path::Path, args: &[&str]) -> Result<Output> {
    Ok(std::process::Command::new(&env().agent)
        .args([
            "debug",
            "--node",
            node,
            "--namespace",
            OPERATOR_NAMESPACE,
            "--kubeconfig",
        ])
        .arg(kubeconfig)
        .args(args)
        .output()?)
}

#[tokio::test]
async fn people_on_call_reach_an_agent_with_their_kubeconfig_and_others_are_refused_with_a_record()
-> Result<()> {
    let ctx = Ctx::new("debug-cli").await?;
    let node = agent_node(&ctx.client).await?;

    // In the chart's on-call group: a certificate, the agent's runs, its health.
    let alice = env().cluster.kubeconfig_as("alice", &[ONCALL_GROUP])?;
    let out = tokio::task::spawn_blocking({
        let (alice, node) = (alice.clone(), node.clone());
        move || debug(&node, &alice, &["runs"])
    })
    .await??;
    ensure!(out.status.success(), "debug runs as alice: {}", text(&out));
    ensure!(
        text(&out).contains("RUN") && text(&out).contains("KIND"),
        "{}",
        text(&out)
    );
    let out = tokio::task::spawn_blocking({
        let (alice, node) = (alice.clone(), node.clone());
        move || debug(&node, &alice, &["health"])
    })
    .await??;
    ensure!(
        text(&out).contains("SERVING"),
        "debug health as alice: {}",
        text(&out)
    );

    // Her certificate may not write a snapshot, whatever she asks.
    let pw = tempfile::NamedTempFile::new()?;
    std::fs::write(pw.path(), "x")?;
    let pw_path = pw.path().display().to_string();
    let out = tokio::task::spawn_blocking({
        let (alice, node) = (alice.clone(), node.clone());
        move || {
            debug(
                &node,
                &alice,
                &[
                    "backup",
                    "--for-real",
                    "--repo",
                    "s3:http://10.77.0.1:1/b/r",
                    "--password-file",
                    &pw_path,
                    "--pod-uid",
                    "00000000-0000-0000-0000-000000000000",
                    "--volume",
                    "data",
                    "--host",
                    "h",
                ],
            )
        }
    })
    .await??;
    ensure!(
        !out.status.success(),
        "a debug certificate wrote a snapshot: {}",
        text(&out)
    );
    ensure!(
        text(&out).contains("PermissionDenied") && text(&out).contains("may not write a snapshot"),
        "{}",
        text(&out)
    );

    // May see the operator's pods (the built-in `view` role there) and ask for certificates,
    // but not port-forward: the coordinator refuses, and says why.
    let viewers: Api<RoleBinding> = Api::namespaced(ctx.client.clone(), OPERATOR_NAMESPACE);
    let viewer: RoleBinding = serde_json::from_value(serde_json::json!({
        "metadata": {"name": format!("{}-mallory", ctx.id)},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "view"},
        "subjects": [{"kind": "User", "name": "mallory", "apiGroup": "rbac.authorization.k8s.io"}]
    }))?;
    viewers.create(&PostParams::default(), &viewer).await?;
    let bindings: Api<ClusterRoleBinding> = Api::all(ctx.client.clone());
    let binding: ClusterRoleBinding = serde_json::from_value(serde_json::json!({
        "metadata": {"name": format!("{}-mallory", ctx.id)},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": format!("{RELEASE}-debug")},
        "subjects": [{"kind": "User", "name": "mallory", "apiGroup": "rbac.authorization.k8s.io"}]
    }))?;
    bindings.create(&PostParams::default(), &binding).await?;
    let mallory = env().cluster.kubeconfig_as("mallory", &[])?;
    let out = tokio::task::spawn_blocking(move || debug(&node, &mallory, &["runs"])).await??;
    ensure!(!out.status.success(), "mallory reached the agent: {}", text(&out));
    ensure!(
        text(&out).contains("refused a debug certificate")
            && text(&out).contains("mallory may not create pods/portforward in namespace restic-operator"),
        "{}",
        text(&out)
    );

    // Both decisions are on record, with the user's name.
    let events = restic_operator_e2e::eventually("the audit events", Duration::from_secs(20), || async {
        let out = env()
            .cluster
            .kubectl()?
            .args([
                "-n",
                OPERATOR_NAMESPACE,
                "get",
                "events",
                "-o",
                "custom-columns=REASON:.reason,NOTE:.note,MSG:.message",
            ])
            .output()?;
        let all = String::from_utf8_lossy(&out.stdout).into_owned();
        Ok((all.contains("DebugCertificateIssued") && all.contains("DebugCertificateDenied")).then_some(all))
    })
    .await?;
    ensure!(events.contains("to alice"), "{events}");
    ensure!(events.contains("to mallory"), "{events}");
    Ok(())
}
