//! ResticRestore end to end: the snapshot resolved and recorded, a holder pod for an unmounted
//! claim and a running pod's volume restored live, the modes, include and exclude, hooks,
//! selection as restic itself would pick, and a coordinator killed mid-restore.

use std::time::Duration;

use anyhow::{Context, Result, ensure};
use k8s_openapi::api::core::v1::Pod;
use kube::api::{ListParams, Patch, PatchParams};
use kube::{Api, ResourceExt};
use restic_operator_api::common::{condition_types as ct, event_reasons as er, reasons};
use restic_operator_api::restore::{ResticRestoreStatus, RestorePhase};
use restic_operator_e2e::eventually;
use restic_operator_e2e::fixtures::{
    assert_trees_equal, assert_trees_identical, make_full_tree, make_tree, pseudo_random,
};
use restic_operator_proto::v1 as pb;
use serde_json::json;

use super::support::{
    Node, backup_yaml, bound_claim, csi_mount, live_claim, ready_repository, restic_snapshots, restore_yaml,
    runs,
};
use super::{events, finish_job_pod, wait_job};

/// The `Complete` condition's reason.
fn complete_reason(s: &ResticRestoreStatus) -> Option<String> {
    s.conditions
        .iter()
        .find(|c| c.type_ == ct::COMPLETE)
        .and_then(|c| c.reason.clone())
}

/// `support::backed_up`, with the snapshot it made.
async fn backed_up(
    test: &str,
    fill: fn(&std::path::Path) -> Result<()>,
) -> Result<(Node, std::path::PathBuf, serde_json::Value)> {
    let (node, repo, data) = super::support::backed_up(test, fill).await?;
    let snapshot = restic_snapshots(&repo)?.remove(0);
    Ok((node, data, snapshot))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restore_into_an_unmounted_claim_goes_through_a_holder_and_matches_the_volume_byte_for_byte()
-> Result<()> {
    let (node, data, snapshot) = backed_up("restore-holder", make_full_tree).await?;
    let pv = format!("{}-pv", node.ns);
    bound_claim(&node, &node.ns, &pv).await?;
    node.apply_yaml(&restore_yaml(
        "back",
        "  backupRef: {name: db}\n  target: {pvc: {claimName: data}}\n  options: {verify: true}\n",
    ))
    .await?;
    let pods: Api<Pod> = Api::namespaced(node.client.clone(), &node.ns);
    let holder = eventually("the restore's holder pod", Duration::from_secs(30), || async {
        let list = ListParams::default().labels("backup.resticbackup.io/restore=back");
        Ok(pods.list(&list).await?.items.into_iter().next())
    })
    .await
    .with_context(|| node.coordinator_log())?;
    // The snapshot is in status before any data moves.
    let status = node.restores().get("back").await?.status.unwrap_or_default();
    assert_eq!(status.phase, Some(RestorePhase::InProgress));
    assert_eq!(status.restored_snapshot.as_deref(), snapshot["id"].as_str());
    assert!(status.snapshot_time.is_some());
    let owner = &holder.owner_references()[0];
    assert_eq!(owner.kind, "ResticRestore");
    let volumes = holder.spec.clone().unwrap().volumes.unwrap();
    let claim = volumes[0].persistent_volume_claim.clone().unwrap();
    assert_eq!(claim.claim_name, "data");
    assert_ne!(claim.read_only, Some(true), "read-write");

    // Play the scheduler and the kubelet.
    let target = csi_mount(&node, &holder.uid().unwrap(), &pv);
    std::fs::create_dir_all(&target)?;
    restic_operator_e2e::operator::bind(&node.client, &node.ns, &holder.name_any(), &node.name).await?;
    restic_operator_e2e::operator::mark_running(&node.client, &node.ns, &holder.name_any(), "10.1.0.11")
        .await?;

    let status = node.wait_restored("back", Duration::from_secs(60)).await?;
    assert_eq!(
        status.phase,
        Some(RestorePhase::Completed),
        "{:?}",
        status.message
    );
    assert_eq!(
        complete_reason(&status).as_deref(),
        Some(reasons::RESTORE_SUCCEEDED)
    );
    assert!(status.restored_files.unwrap_or(0) >= 6, "{status:?}");
    assert!(status.completion_time.is_some() && status.active_run.is_none());
    assert_trees_identical(&data, &target)?;
    assert_eq!(events(&node, er::RESTORE_STARTED).await?.len(), 1);
    assert_eq!(events(&node, er::RESTORE_COMPLETED).await?.len(), 1);
    eventually("the holder pod deleted", Duration::from_secs(30), || async {
        let p = pods.get_opt(&holder.name_any()).await?;
        Ok(p.is_none_or(|p| p.metadata.deletion_timestamp.is_some())
            .then_some(()))
    })
    .await?;

    // Finished is final, and the spec no longer changes.
    let changed = node
        .restores()
        .patch(
            "back",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"includePaths": ["/sub"]}})),
        )
        .await;
    let refused = format!("{:?}", changed.expect_err("the spec changed after the restore"));
    assert!(refused.contains("cannot change once it has started"), "{refused}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_live_restore_refuses_a_non_empty_target_and_overwrites_mirrors_and_filters_only_when_asked()
-> Result<()> {
    let (node, data, _) = backed_up("restore-modes", make_tree).await?;
    let target = live_claim(&node).await?;
    std::fs::create_dir_all(target.join("sub"))?;
    std::fs::write(target.join("stray"), b"not in the snapshot")?;
    std::fs::write(target.join("sub/private"), b"changed since")?;
    let restore = |name: &str, extra: &str| {
        restore_yaml(
            name,
            &format!("  backupRef: {{name: db}}\n  target: {{pvc: {{claimName: data}}}}\n{extra}"),
        )
    };

    // IfEmpty (the default): refused, nothing written.
    node.apply_yaml(&restore("safe", "")).await?;
    let s = node.wait_restored("safe", Duration::from_secs(60)).await?;
    assert_eq!(s.phase, Some(RestorePhase::Failed));
    assert_eq!(
        complete_reason(&s).as_deref(),
        Some(reasons::TARGET_NOT_EMPTY),
        "{:?}",
        s.message
    );
    assert!(
        s.message.as_deref().unwrap_or_default().contains("not empty"),
        "{s:?}"
    );
    assert!(!target.join("big.bin").exists());

    // Overwrite, only /sub/script.sh: it comes back, private stays changed.
    node.apply_yaml(&restore(
        "some",
        "  options: {mode: Overwrite}\n  includePaths: [/sub/script.sh]\n",
    ))
    .await?;
    let s = node.wait_restored("some", Duration::from_secs(60)).await?;
    assert_eq!(s.phase, Some(RestorePhase::Completed), "{:?}", s.message);
    assert_eq!(
        std::fs::read(target.join("sub/script.sh"))?,
        std::fs::read(data.join("sub/script.sh"))?
    );
    assert_eq!(std::fs::read(target.join("sub/private"))?, b"changed since");
    assert!(!target.join("big.bin").exists(), "not included");
    assert!(target.join("stray").exists(), "Overwrite keeps other files");

    // A failing pre-restore hook: nothing is written, even by Mirror.
    let failing = "{spec: {containers: [{name: hook, image: busybox, command: [sh, -c, 'exit 3']}]}}";
    node.apply_yaml(&restore(
        "hooked",
        &format!(
            "  options: {{mode: Mirror}}\n  hooks: {{preRestore: {{job: {{podTemplate: {failing}}}}}}}\n"
        ),
    ))
    .await?;
    let job = wait_job(&node, "backup.resticbackup.io/restore=hooked").await?;
    finish_job_pod(&node, &job.name_any(), 3, "app still running").await?;
    let s = node.wait_restored("hooked", Duration::from_secs(60)).await?;
    assert_eq!(s.phase, Some(RestorePhase::Failed));
    assert_eq!(
        complete_reason(&s).as_deref(),
        Some(reasons::HOOK_FAILED),
        "{:?}",
        s.message
    );
    assert!(
        s.message
            .as_deref()
            .unwrap_or_default()
            .contains("nothing was restored"),
        "{s:?}"
    );
    assert!(
        target.join("stray").exists() && !target.join("big.bin").exists(),
        "nothing written"
    );

    // Mirror: exactly the snapshot.
    node.apply_yaml(&restore("exact", "  options: {mode: Mirror}\n"))
        .await?;
    let s = node.wait_restored("exact", Duration::from_secs(60)).await?;
    assert_eq!(s.phase, Some(RestorePhase::Completed), "{:?}", s.message);
    assert!(s.deleted_files.unwrap_or(0) >= 1, "{s:?}");
    assert_trees_equal(&data, &target)?;

    // Overwrite without private: the rest comes back, private stays as it is now.
    std::fs::write(target.join("sub/private"), b"changed again")?;
    std::fs::remove_file(target.join("big.bin"))?;
    node.apply_yaml(&restore(
        "most",
        "  options: {mode: Overwrite}\n  excludePaths: [private]\n",
    ))
    .await?;
    let s = node.wait_restored("most", Duration::from_secs(60)).await?;
    assert_eq!(s.phase, Some(RestorePhase::Completed), "{:?}", s.message);
    assert_eq!(
        std::fs::read(target.join("big.bin"))?,
        std::fs::read(data.join("big.bin"))?
    );
    assert_eq!(std::fs::read(target.join("sub/private"))?, b"changed again");
    Ok(())
}

/// The id of the newest snapshot restic lists for `args` taken before `before`.
fn restic_pick(
    repo: &restic_operator_e2e::ResticRepo,
    args: &[&str],
    before: Option<&str>,
) -> Result<String> {
    let out = repo.restic()?.args(["snapshots", "--json"]).args(args).output()?;
    ensure!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let listed: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout)?;
    let time = |s: &serde_json::Value| {
        chrono::DateTime::parse_from_rfc3339(s["time"].as_str().unwrap_or_default()).map(|t| t.to_utc())
    };
    let mut candidates = Vec::new();
    for s in listed {
        let t = time(&s)?;
        if before.is_none_or(|b| t < chrono::DateTime::parse_from_rfc3339(b).unwrap().to_utc()) {
            candidates.push((t, s["id"].as_str().unwrap_or_default().to_owned()));
        }
    }
    candidates.sort();
    candidates.pop().map(|(_, id)| id).context("restic lists nothing")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn selection_by_tag_host_and_time_picks_the_snapshot_restic_would() -> Result<()> {
    let node = Node::start("restore-select").await?;
    let repo = ready_repository(&node, "main").await?;
    let source = tempfile::tempdir()?;
    let data = source.path().join("data");
    for (i, (host, tags, time)) in [
        ("db", "daily", "2026-01-01 00:00:00"),
        ("db", "daily,keep", "2026-01-02 00:00:00"),
        ("web", "daily", "2026-01-03 00:00:00"),
        ("db", "weekly", "2026-01-04 00:00:00"),
        ("db", "daily", "2026-01-05 00:00:00"),
    ]
    .into_iter()
    .enumerate()
    {
        std::fs::create_dir_all(&data)?;
        std::fs::write(data.join("which"), format!("{i}"))?;
        let out = repo
            .restic()?
            .current_dir(source.path())
            .args(["backup", "data", "--host", host, "--tag", tags, "--time", time])
            .output()?;
        ensure!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    }
    // A relative path is stored as its last component at the root: `/data`, the default
    // snapshot path of a restore from a repository.
    let target = live_claim(&node).await?;
    let cases = [
        (
            "tag",
            "{hostname: db, tags: [daily]}",
            vec!["--host", "db", "--tag", "daily"],
            None,
        ),
        (
            "both-tags",
            "{tags: [daily, keep]}",
            vec!["--tag", "daily,keep"],
            None,
        ),
        (
            "before",
            "{hostname: db, tags: [daily], before: '2026-01-04T00:00:00Z'}",
            vec!["--host", "db", "--tag", "daily"],
            Some("2026-01-04T00:00:00Z"),
        ),
        ("host", "{hostname: web}", vec!["--host", "web"], None),
    ];
    for (name, selector, args, before) in cases {
        node.apply_yaml(&restore_yaml(
            name,
            &format!(
                "  repositoryRef: {{name: main}}\n  snapshotSelector: {selector}\n  \
                 target: {{pvc: {{claimName: data, path: /{name}}}}}\n"
            ),
        ))
        .await?;
        let s = node.wait_restored(name, Duration::from_secs(60)).await?;
        assert_eq!(s.phase, Some(RestorePhase::Completed), "{name}: {:?}", s.message);
        let expected = restic_pick(&repo, &args, before)?;
        assert_eq!(s.restored_snapshot.as_deref(), Some(expected.as_str()), "{name}");
        let which = std::fs::read_to_string(target.join(name).join("which"))?;
        ensure!(!which.is_empty(), "{name}: restored into its subdirectory");
    }
    // Nothing matches: the closest snapshots are named, and nothing is written.
    node.apply_yaml(&restore_yaml(
        "none",
        "  repositoryRef: {name: main}\n  snapshotSelector: {hostname: db, before: '2025-01-01T00:00:00Z'}\n  \
         target: {pvc: {claimName: data, path: /none}}\n",
    ))
    .await?;
    let s = node.wait_restored("none", Duration::from_secs(60)).await?;
    assert_eq!(complete_reason(&s).as_deref(), Some(reasons::SNAPSHOT_NOT_FOUND));
    let message = s.message.unwrap_or_default();
    assert!(
        message.contains("closest:") && message.contains("host db"),
        "{message}"
    );
    assert!(!target.join("none").exists());
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_coordinator_killed_mid_restore_attaches_after_restart_and_restores_exactly_once() -> Result<()> {
    let (mut node, data, _) = backed_up("restore-kill", |d| {
        std::fs::write(d.join("dump.sql"), pseudo_random(6 << 20, 11))?;
        Ok(())
    })
    .await?;
    let target = live_claim(&node).await?;
    node.apply_yaml(&restore_yaml(
        "slow",
        "  backupRef: {name: db}\n  target: {pvc: {claimName: data}}\n  \
         options: {extraArgs: ['--limit-download=512']}\n",
    ))
    .await?;
    let run_id = eventually(
        "the restore in flight on the agent",
        Duration::from_secs(30),
        || async {
            let s = node.restores().get("slow").await?.status.unwrap_or_default();
            Ok(match (s.active_run, s.progress) {
                (Some(a), Some(_)) if a.node_name.is_some() => Some(a.run_id),
                _ => None,
            })
        },
    )
    .await
    .with_context(|| node.coordinator_log())?;
    node.coordinators[0].kill();
    node.coordinators.clear();
    tokio::time::sleep(Duration::from_secs(2)).await;
    node.start_coordinator("coordinator-b").await?;

    let s = node.wait_restored("slow", Duration::from_secs(90)).await?;
    assert_eq!(s.phase, Some(RestorePhase::Completed), "{:?}", s.message);
    assert_trees_equal(&data, &target)?;
    let agent = node.agent_client().await?;
    let restores: Vec<pb::RunInfo> = runs(&agent)
        .await?
        .into_iter()
        .filter(|r| r.kind == pb::RunKind::Restore as i32)
        .collect();
    assert_eq!(restores.len(), 1, "restored once: {restores:?}");
    assert_eq!(restores[0].run_id, run_id);
    assert_eq!(
        node.coordinators[0].metric("restic_operator_dispatch_total{kind=\"restore\"}"),
        None,
        "the restarted coordinator attached, never sent the restore again"
    );
    assert_eq!(events(&node, er::RESTORE_COMPLETED).await?.len(), 1);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restore_waits_for_a_backup_of_its_claim_to_finish() -> Result<()> {
    let (node, _, _) = backed_up("restore-wait", make_tree).await?;
    let target = live_claim(&node).await?;
    std::fs::write(target.join("dump.sql"), pseudo_random(6 << 20, 3))?;
    // A slow backup of the claim itself (about 12 s at 512 KiB/s).
    node.apply_yaml(&backup_yaml(
        "claim",
        "  repositoryRef: {name: main}\n  schedule: '@yearly'\n  source: {pvc: {claimName: data}}\n  \
         restic: {extraArgs: ['--limit-upload=512']}\n  manualTrigger: go\n",
    ))
    .await?;
    eventually(
        "the claim's backup in flight",
        Duration::from_secs(30),
        || async {
            let b = node.backups().get("claim").await?;
            Ok(b.status.and_then(|s| s.progress).map(|_| ()))
        },
    )
    .await
    .with_context(|| node.coordinator_log())?;
    node.apply_yaml(&restore_yaml(
        "meanwhile",
        "  backupRef: {name: db}\n  target: {pvc: {claimName: data, path: /restored}}\n",
    ))
    .await?;
    let waiting = eventually("the restore waiting", Duration::from_secs(30), || async {
        Ok(events(&node, er::RESTORE_WAITING).await?.into_iter().next())
    })
    .await?;
    assert!(
        waiting.note.unwrap_or_default().contains("backup claim"),
        "names the backup"
    );
    let s = node.wait_restored("meanwhile", Duration::from_secs(90)).await?;
    assert_eq!(s.phase, Some(RestorePhase::Completed), "{:?}", s.message);
    // The agent's record: the restore's restic started after the backup's ended.
    let agent = node.agent_client().await?;
    let all = runs(&agent).await?;
    let span = |kind: pb::RunKind, id: &str| {
        all.iter()
            .find(|r| r.kind == kind as i32 && r.run_id.starts_with(id))
            .map(|r| (r.started_unix_ms, r.finished_unix_ms))
    };
    let backup_run = node
        .backups()
        .get("claim")
        .await?
        .status
        .unwrap_or_default()
        .last_backup
        .unwrap_or_default();
    let backup =
        span(pb::RunKind::Backup, backup_run.run_id.as_deref().unwrap_or("?")).context("the backup run")?;
    let restore = span(pb::RunKind::Restore, "restore-").context("the restore run")?;
    assert!(
        backup.1 <= restore.0,
        "backup {backup:?} and restore {restore:?} overlap"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backup_of_a_claim_waits_for_a_restore_into_it() -> Result<()> {
    let (node, _, _) = backed_up("restore-first", |d| {
        std::fs::write(d.join("dump.sql"), pseudo_random(6 << 20, 13))?;
        Ok(())
    })
    .await?;
    let target = live_claim(&node).await?;
    std::fs::write(target.join("live"), b"the app's own file")?;
    // A slow restore into the claim (about 12 s at 512 KiB/s)...
    node.apply_yaml(&restore_yaml(
        "slow",
        "  backupRef: {name: db}\n  target: {pvc: {claimName: data, path: /restored}}\n  \
         options: {extraArgs: ['--limit-download=512']}\n",
    ))
    .await?;
    eventually("the restore in flight", Duration::from_secs(30), || async {
        let s = node.restores().get("slow").await?.status.unwrap_or_default();
        Ok(s.progress.map(|_| ()))
    })
    .await
    .with_context(|| node.coordinator_log())?;
    // ...and a backup of that claim asked for meanwhile: it waits, then backs up the result.
    node.apply_yaml(&backup_yaml(
        "claim",
        "  repositoryRef: {name: main}\n  schedule: '@yearly'\n  source: {pvc: {claimName: data}}\n  \
         manualTrigger: go\n",
    ))
    .await?;
    let busy = eventually("the backup waiting", Duration::from_secs(30), || async {
        Ok(events(&node, er::CLAIM_BUSY).await?.into_iter().next())
    })
    .await?;
    assert!(busy.note.unwrap_or_default().contains("restore into claim data"));
    let s = node.wait_restored("slow", Duration::from_secs(90)).await?;
    assert_eq!(s.phase, Some(RestorePhase::Completed), "{:?}", s.message);
    let last = node.wait_succeeded("claim", 0, Duration::from_secs(90)).await?;
    let agent = node.agent_client().await?;
    let all = runs(&agent).await?;
    let span = |r: &pb::RunInfo| (r.started_unix_ms, r.finished_unix_ms);
    let restore = all
        .iter()
        .find(|r| r.kind == pb::RunKind::Restore as i32)
        .map(span)
        .context("the restore run")?;
    let backup = all
        .iter()
        .find(|r| Some(r.run_id.as_str()) == last.run_id.as_deref())
        .map(span)
        .context("the backup run")?;
    assert!(
        restore.1 <= backup.0,
        "restore {restore:?} and backup {backup:?} overlap"
    );
    Ok(())
}
