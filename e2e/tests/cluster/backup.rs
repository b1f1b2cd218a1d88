//! Backups on the real node: a live pod's claim read from the kubelet's directory, exec hooks
//! in the running container, schedules and manual triggers, a recreated pod, a claim no pod
//! mounts (and its restore into a new claim), and an agent killed mid-backup.

use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use k8s_openapi::api::core::v1::Pod;
use kube::Api;
use kube::api::{DeleteParams, ListParams};
use restic_operator_api::common::{RunResult, RunTrigger};
use restic_operator_e2e::fixtures::assert_trees_equal;

use crate::support::{Ctx, OPERATOR_NAMESPACE, no_pods, restore, snapshot_ids};

/// A ResticBackup of claim `<name>-data` into repository `repo`, with `extra` spec lines.
fn backup(name: &str, repo: &str, extra: &str) -> String {
    format!(
        "apiVersion: backup.resticbackup.io/v1alpha1\nkind: ResticBackup\nmetadata: {{name: {name}}}\n\
         spec:\n  repositoryRef: {{name: {repo}}}\n  source: {{pvc: {{claimName: {name}-data}}}}\n{extra}"
    )
}

#[tokio::test]
async fn scheduled_and_manual_backups_of_a_live_pods_claim_run_exec_hooks() -> Result<()> {
    let ctx = Ctx::new("live-claim").await?;
    let repo = ctx.repository("main");
    ctx.create_repository("main", &repo)?;
    let volume = ctx.deploy_app("web").await?;
    let tree = volume.put_test_tree("tree")?;

    ctx.apply(&backup(
        "web",
        "main",
        r#"  schedule: "* * * * *"
  manualTrigger: first
  hooks:
    preBackup:
      exec:
        podSelector: {matchLabels: {app: web}}
        container: app
        command: [sh, -c, "mkdir -p /data/hooks && echo before > /data/hooks/pre"]
    postBackup:
      exec:
        podSelector: {matchLabels: {app: web}}
        container: app
        command: [sh, -c, "echo after > /data/hooks/post"]
"#,
    ))?;

    // The manual trigger runs at once; the schedule within the minute.
    let first = ctx.finished_run("web", None, Duration::from_secs(120)).await?;
    ensure!(
        first.result == Some(RunResult::Succeeded),
        "first run: {first:?}\n{}",
        ctx.diagnostics()
    );
    let snapshot = first.snapshot_id.clone().context("no snapshot id")?;
    let restored = restore(&repo, &snapshot)?;
    // The agent read the live pod's volume from the kubelet's directory: the snapshot holds the
    // data byte for byte, the pre hook's file (it ran in the container before the backup), and
    // not the post hook's (after).
    assert_trees_equal(tree.path(), &restored.path().join("data/tree"))?;
    let pre = std::fs::read_to_string(restored.path().join("data/hooks/pre"))?;
    ensure!(pre == "before\n", "pre hook output: {pre:?}");
    ensure!(
        !restored.path().join("data/hooks/post").exists(),
        "post hook ran before the backup"
    );
    let post = volume
        .read("hooks/post")
        .context("the post hook did not write into the running container's volume")?;
    ensure!(post == b"after\n");

    let mut run = first;
    let deadline = Instant::now() + Duration::from_secs(150);
    while run.trigger != Some(RunTrigger::Schedule) {
        ensure!(Instant::now() < deadline, "no scheduled run within 150s");
        run = ctx
            .finished_run("web", run.run_id.as_deref(), Duration::from_secs(100))
            .await?;
    }
    ensure!(
        run.result == Some(RunResult::Succeeded),
        "scheduled run: {run:?}\n{}",
        ctx.diagnostics()
    );
    Ok(())
}

#[tokio::test]
async fn a_recreated_pod_and_a_restarted_agent_reread_no_unchanged_file() -> Result<()> {
    let ctx = Ctx::disruptive("recreated").await?;
    let repo = ctx.repository("main");
    ctx.create_repository("main", &repo)?;
    let volume = ctx.deploy_app("db").await?;
    let first_uid = ctx.running_pod("db").await?;
    volume.put_test_tree("tree")?;
    volume.write_random("big", 4 << 20)?;

    ctx.apply(&backup(
        "db",
        "main",
        "  schedule: \"0 3 * * *\"\n  manualTrigger: one\n",
    ))?;
    let first = ctx.finished_run("db", None, Duration::from_secs(120)).await?;
    ensure!(
        first.result == Some(RunResult::Succeeded),
        "{first:?}\n{}",
        ctx.diagnostics()
    );

    // A new pod (new UID, new kubelet directory) and a new agent pod.
    let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), &ctx.namespace);
    pods.delete_collection(&DeleteParams::default(), &ListParams::default().labels("app=db"))
        .await?;
    let agents: Api<Pod> = Api::namespaced(ctx.client.clone(), OPERATOR_NAMESPACE);
    agents
        .delete_collection(
            &DeleteParams::default(),
            &ListParams::default().labels("app.kubernetes.io/component=agent"),
        )
        .await?;
    let second_uid = ctx.running_pod("db").await?;
    ensure!(second_uid != first_uid, "the pod was not recreated");

    ctx.apply(&backup(
        "db",
        "main",
        "  schedule: \"0 3 * * *\"\n  manualTrigger: two\n",
    ))?;
    let second = ctx
        .finished_run("db", first.run_id.as_deref(), Duration::from_secs(180))
        .await?;
    ensure!(
        second.result == Some(RunResult::Succeeded),
        "{second:?}\n{}",
        ctx.diagnostics()
    );
    // Same snapshot path, same host: restic found the parent and read no unchanged file.
    ensure!(
        second.parent_snapshot_id == first.snapshot_id,
        "parent {:?}, expected {:?}",
        second.parent_snapshot_id,
        first.snapshot_id
    );
    ensure!(
        second.files_new == Some(0) && second.files_changed == Some(0),
        "unchanged data was read again: new {:?}, changed {:?}",
        second.files_new,
        second.files_changed
    );
    Ok(())
}

#[tokio::test]
async fn a_claim_no_running_pod_mounts_is_backed_up_through_a_holder_pod() -> Result<()> {
    let ctx = Ctx::new("unmounted").await?;
    let repo = ctx.repository("main");
    ctx.create_repository("main", &repo)?;
    // Bind the claim with a pod that then goes away (scale to zero).
    let volume = ctx.deploy_app("idle").await?;
    let tree = volume.put_test_tree("tree")?;
    ctx.scale_to_zero("idle").await?;

    ctx.apply(&backup(
        "idle",
        "main",
        "  schedule: \"0 3 * * *\"\n  manualTrigger: now\n",
    ))?;
    let run = ctx.finished_run("idle", None, Duration::from_secs(120)).await?;
    ensure!(
        run.result == Some(RunResult::Succeeded),
        "{run:?}\n{}",
        ctx.diagnostics()
    );
    let restored = restore(&repo, run.snapshot_id.as_deref().unwrap_or_default())?;
    assert_trees_equal(tree.path(), &restored.path().join("data/tree"))?;
    // The holder pod is gone once the run ended.
    no_pods(&ctx.client, &ctx.namespace, "", "the holder pod removed").await?;

    // A ResticRestore into a new claim: the default StorageClass binds it on first consumer,
    // which is the restore's holder pod; the agent then fills it on that node.
    ctx.apply(
        "apiVersion: backup.resticbackup.io/v1alpha1\nkind: ResticRestore\nmetadata: {name: back}\n\
         spec: {backupRef: {name: idle}, target: {newPVC: {name: back-data, size: 1Gi}}}\n",
    )?;
    let status = ctx.completed_restore("back", Duration::from_secs(180)).await?;
    ensure!(status.restored_snapshot == run.snapshot_id, "{status:?}");
    no_pods(
        &ctx.client,
        &ctx.namespace,
        "",
        "the restore's holder pod removed",
    )
    .await?;
    // An app started on the restored claim sees the backed-up tree.
    let back = ctx.deploy_app("back").await?;
    assert_trees_equal(tree.path(), back.copy_out("tree")?.path())?;
    Ok(())
}

#[tokio::test]
async fn an_agent_deleted_mid_backup_fails_the_run_quickly_and_the_next_run_succeeds() -> Result<()> {
    let ctx = Ctx::disruptive("agent-killed").await?;
    let repo = ctx.repository("main");
    ctx.create_repository("main", &repo)?;
    let volume = ctx.deploy_app("slow").await?;
    // 48 MiB at 1 MiB/s: a backup that lasts long enough to be interrupted.
    for i in 0..6 {
        volume.write_random(&format!("f{i}"), 8 << 20)?;
    }
    let slow = "  schedule: \"0 3 * * *\"\n  restic: {extraArgs: [\"--limit-upload=1024\"]}\n";
    ctx.apply(&backup("slow", "main", &format!("{slow}  manualTrigger: one\n")))?;

    let backups: Api<restic_operator_api::backup::ResticBackup> =
        Api::namespaced(ctx.client.clone(), &ctx.namespace);
    restic_operator_e2e::eventually("the backup uploading", Duration::from_secs(90), || async {
        Ok(backups
            .get("slow")
            .await?
            .status
            .and_then(|s| s.progress)
            .filter(|p| p.bytes_done.unwrap_or(0) > 0)
            .map(|_| ()))
    })
    .await
    .with_context(|| ctx.diagnostics())?;

    let agents: Api<Pod> = Api::namespaced(ctx.client.clone(), OPERATOR_NAMESPACE);
    let old_agents: Vec<String> = agents
        .list(&ListParams::default().labels("app.kubernetes.io/component=agent"))
        .await?
        .items
        .into_iter()
        .filter_map(|p| p.metadata.name)
        .collect();
    let deleted = Instant::now();
    agents
        .delete_collection(
            &DeleteParams::default(),
            &ListParams::default().labels("app.kubernetes.io/component=agent"),
        )
        .await?;
    let failed = ctx.finished_run("slow", None, Duration::from_secs(60)).await?;
    let took = deleted.elapsed();
    ensure!(
        failed.result == Some(RunResult::Failed),
        "the interrupted run: {failed:?}\n{}",
        ctx.diagnostics()
    );
    let reason = failed.message.clone().unwrap_or_default();
    ensure!(!reason.is_empty(), "a failed run without a reason: {failed:?}");
    ensure!(
        took < Duration::from_secs(30),
        "the run ended {took:?} after its agent was deleted ({reason})"
    );
    eprintln!("interrupted run failed {took:?} after the agent was deleted: {reason}");
    // The next run, on the new agent, is not blocked by anything the old one left.
    ctx.apply(&backup(
        "slow",
        "main",
        "  schedule: \"0 3 * * *\"\n  manualTrigger: two\n",
    ))?;
    let next = ctx
        .finished_run("slow", failed.run_id.as_deref(), Duration::from_secs(180))
        .await?;
    ensure!(
        next.result == Some(RunResult::Succeeded),
        "{next:?}\n{}",
        ctx.diagnostics()
    );
    // restic removed its lock when the old agent stopped it; only the operator's own live
    // operations (repository statistics) may hold one now.
    let out = repo.restic()?.args(["list", "locks", "--no-lock"]).output()?;
    for id in String::from_utf8_lossy(&out.stdout).lines() {
        let lock = repo.restic()?.args(["cat", "lock", id, "--no-lock"]).output()?;
        let lock: serde_json::Value = serde_json::from_slice(&lock.stdout).unwrap_or_default();
        let host = lock["hostname"].as_str().unwrap_or_default();
        ensure!(
            !old_agents.iter().any(|a| host.starts_with(a.as_str())),
            "a lock of the deleted agent's restic is left: {lock}"
        );
    }
    let out = repo.restic()?.args(["check", "--retry-lock=1m"]).output()?;
    ensure!(
        out.status.success(),
        "restic check: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

#[tokio::test]
async fn retention_keeps_the_newest_snapshots() -> Result<()> {
    let ctx = Ctx::new("retention").await?;
    let repo = ctx.repository("main");
    ctx.create_repository("main", &repo)?;
    let volume = ctx.deploy_app("keep").await?;
    let spec = "  schedule: \"0 3 * * *\"\n  retention: {enabled: true, policy: {keepLast: 2}}\n";
    let mut previous = None;
    let mut snapshots = Vec::new();
    for i in 0..3 {
        volume.write("generation", format!("{i}\n").as_bytes())?;
        ctx.apply(&backup(
            "keep",
            "main",
            &format!("{spec}  manualTrigger: run-{i}\n"),
        ))?;
        let run = ctx
            .finished_run("keep", previous.as_deref(), Duration::from_secs(120))
            .await?;
        ensure!(
            run.result == Some(RunResult::Succeeded),
            "{run:?}\n{}",
            ctx.diagnostics()
        );
        snapshots.push(run.snapshot_id.clone().context("no snapshot")?);
        previous = run.run_id;
    }
    let ids = snapshot_ids(&repo)?;
    let mut kept = snapshots[1..].to_vec();
    kept.sort();
    ensure!(
        ids == kept,
        "snapshots after retention: {ids:?}, expected the newest two {kept:?}"
    );
    Ok(())
}

#[tokio::test]
async fn a_slow_upload_says_it_is_uploading_at_100_percent_and_the_snapshot_id_is_short() -> Result<()> {
    let ctx = Ctx::new("stages").await?;
    let repo = ctx.repository("main");
    ctx.create_repository("main", &repo)?;
    let volume = ctx.deploy_app("up").await?;
    volume.write_random("blob", 12 << 20)?;
    ctx.apply(&backup(
        "up",
        "main",
        "  schedule: \"0 3 * * *\"\n  restic: {extraArgs: [\"--limit-upload=1024\"]}\n  manualTrigger: one\n",
    ))?;

    let backups: Api<restic_operator_api::backup::ResticBackup> =
        Api::namespaced(ctx.client.clone(), &ctx.namespace);
    let mut seen = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let status = backups.get("up").await?.status.unwrap_or_default();
        if let Some(p) = status.progress {
            let stage = p.stage.clone().unwrap_or_default();
            if seen.last() != Some(&stage) {
                seen.push(stage.clone());
            }
            if stage == "uploading" {
                ensure!(
                    p.percent_done == Some(100.0),
                    "uploading at {:?} %",
                    p.percent_done
                );
                ensure!(
                    p.seconds_remaining.is_none(),
                    "a time left while uploading: {p:?}"
                );
            }
        }
        if status.last_backup.as_ref().is_some_and(|l| l.result.is_some()) {
            break;
        }
        ensure!(
            Instant::now() < deadline,
            "the backup did not finish; stages {seen:?}"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    eprintln!("stages seen: {seen:?}");
    ensure!(
        seen.iter().any(|s| s == "uploading"),
        "never said it was uploading: {seen:?}"
    );
    let run = ctx.finished_run("up", None, Duration::from_secs(5)).await?;
    ensure!(run.result == Some(RunResult::Succeeded), "{run:?}");
    let id = run.snapshot_id.clone().unwrap_or_default();
    ensure!(id.len() == 64, "{id}");
    ensure!(run.short_snapshot_id.as_deref() == Some(&id[..8]), "{run:?}");
    let wide = ctx.kubectl(&["get", "rbackup", "up", "-o", "wide"])?;
    ensure!(
        wide.contains(&id[..8]) && !wide.contains(&id),
        "kubectl get shows:\n{wide}"
    );
    Ok(())
}

#[tokio::test]
async fn a_host_path_volume_fails_with_what_to_do_instead() -> Result<()> {
    let ctx = Ctx::new("host-path").await?;
    let repo = ctx.repository("main");
    ctx.create_repository("main", &repo)?;
    // What k3s's local-path provisioner makes by default: a hostPath volume.
    let dir = tempfile::tempdir()?;
    let pv = format!("{}-hostpath", ctx.id);
    ctx.apply(&format!(
        r#"apiVersion: v1
kind: PersistentVolume
metadata: {{name: {pv}}}
spec:
  capacity: {{storage: 1Gi}}
  accessModes: [ReadWriteOnce]
  storageClassName: ""
  hostPath: {{path: "{}"}}
  claimRef: {{namespace: {ns}, name: hp-data}}
---
apiVersion: v1
kind: PersistentVolumeClaim
metadata: {{name: hp-data}}
spec: {{accessModes: [ReadWriteOnce], storageClassName: "", volumeName: {pv}, resources: {{requests: {{storage: 1Gi}}}}}}
"#,
        dir.path().display(),
        ns = ctx.namespace
    ))?;
    ctx.apply(&backup(
        "hp",
        "main",
        "  schedule: \"0 3 * * *\"\n  manualTrigger: one\n",
    ))?;
    let run = ctx.finished_run("hp", None, Duration::from_secs(120)).await?;
    let message = run.message.clone().unwrap_or_default();
    ensure!(run.result == Some(RunResult::Failed), "{run:?}");
    ensure!(
        message.contains("is a hostPath volume") && message.contains("volumeType: local"),
        "{message}"
    );
    Ok(())
}
