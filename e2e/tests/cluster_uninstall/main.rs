//! Uninstalling the chart on the real node leaves the user's data, resources and snapshots
//! alone, and installing it again carries on. A test binary of its own: it removes the
//! operator that the cluster tier's other tests use.

#[path = "../cluster/support.rs"]
mod support;

use std::time::Duration;

use anyhow::{Context, Result, ensure};
use kube::Api;
use restic_operator_api::backup::ResticBackup;
use restic_operator_api::common::RunResult;
use restic_operator_api::repository::ResticRepository;
use restic_operator_e2e::fixtures::assert_trees_equal;

use support::{Ctx, OPERATOR_NAMESPACE, RELEASE, no_pods, snapshot_ids};

fn backup(trigger: &str) -> String {
    format!(
        "apiVersion: backup.resticbackup.io/v1alpha1\nkind: ResticBackup\nmetadata: {{name: app}}\n\
         spec:\n  repositoryRef: {{name: main}}\n  schedule: \"0 3 * * *\"\n  \
         source: {{pvc: {{claimName: app-data}}}}\n  manualTrigger: {trigger}\n"
    )
}

#[tokio::test]
async fn uninstalling_the_chart_leaves_data_resources_and_snapshots_and_a_reinstall_carries_on() -> Result<()>
{
    let ctx = Ctx::disruptive("uninstall").await?;
    let repo = ctx.repository("main");
    ctx.create_repository("main", &repo)?;
    let volume = ctx.deploy_app("app").await?;
    let tree = volume.put_test_tree("tree")?;
    ctx.apply(&backup("one"))?;
    let first = ctx.finished_run("app", None, Duration::from_secs(120)).await?;
    ensure!(
        first.result == Some(RunResult::Succeeded),
        "{first:?}\n{}",
        ctx.diagnostics()
    );
    let before = snapshot_ids(&repo)?;

    let env = support::env();
    let out = env
        .cluster
        .helm()?
        .args([
            "uninstall",
            RELEASE,
            "--namespace",
            OPERATOR_NAMESPACE,
            "--wait",
            "--timeout",
            "2m",
        ])
        .output()?;
    ensure!(
        out.status.success(),
        "helm uninstall: {}",
        String::from_utf8_lossy(&out.stderr)
    );

    // The operator is gone...
    no_pods(&ctx.client, OPERATOR_NAMESPACE, "", "the operator's pods gone").await?;
    // ...and nothing of the user's: the resources (helm never deletes CRDs), the app and its
    // data, the snapshots.
    let backups: Api<ResticBackup> = Api::namespaced(ctx.client.clone(), &ctx.namespace);
    let repositories: Api<ResticRepository> = Api::namespaced(ctx.client.clone(), &ctx.namespace);
    let kept = backups.get("app").await.context("the ResticBackup is gone")?;
    ensure!(
        kept.status
            .and_then(|s| s.last_backup)
            .and_then(|l| l.snapshot_id)
            == first.snapshot_id,
        "the backup's status lost its last snapshot"
    );
    repositories
        .get("main")
        .await
        .context("the ResticRepository is gone")?;
    ctx.running_pod("app").await.context("the app stopped")?;
    assert_trees_equal(tree.path(), volume.copy_out("tree")?.path())?;
    ensure!(snapshot_ids(&repo)? == before, "the snapshots changed");
    let out = repo.restic()?.args(["check", "--retry-lock=1m"]).output()?;
    ensure!(
        out.status.success(),
        "restic check: {}",
        String::from_utf8_lossy(&out.stderr)
    );

    // Installed again, the operator takes the same resources up where they were.
    env.cluster
        .install_operator(RELEASE, OPERATOR_NAMESPACE, &support::test_values())?;
    ctx.apply(&backup("two"))?;
    let second = ctx
        .finished_run("app", first.run_id.as_deref(), Duration::from_secs(120))
        .await?;
    ensure!(
        second.result == Some(RunResult::Succeeded),
        "{second:?}\n{}",
        ctx.diagnostics()
    );
    ensure!(second.parent_snapshot_id == first.snapshot_id, "{second:?}");
    Ok(())
}
