//! The coordinator end to end: real control plane, S3 server, restic, coordinator and agent
//! binaries; pods are API objects whose UIDs map to a kubelet-shaped directory.

mod support;

use std::time::Duration;

use anyhow::{Context, Result, ensure};
use chrono::{Timelike, Utc};
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{Namespace, PersistentVolume, PersistentVolumeClaim, Pod, Secret};
use k8s_openapi::api::events::v1::Event;
use kube::api::{ListParams, ObjectMeta, Patch, PatchParams, PostParams};
use kube::{Api, ResourceExt};
use restic_operator_e2e::fixtures::{make_tree, pseudo_random};
use restic_operator_e2e::{eventually, unique_name};
use restic_operator_proto::v1 as pb;
use serde_json::json;
use support::{Node, restic_snapshots};

fn backup_yaml(name: &str, spec: &str) -> String {
    format!(
        "apiVersion: backup.resticbackup.io/v1alpha1\nkind: ResticBackup\nmetadata: {{name: {name}}}\nspec:\n{spec}"
    )
}

async fn events(node: &Node, reason: &str) -> Result<Vec<Event>> {
    let all = Api::<Event>::namespaced(node.client.clone(), &node.ns)
        .list(&ListParams::default())
        .await?
        .items;
    Ok(all
        .into_iter()
        .filter(|e| e.reason.as_deref() == Some(reason))
        .collect())
}

async fn wait_event(node: &Node, reason: &str) -> Result<Event> {
    eventually(&format!("event {reason}"), Duration::from_secs(30), || async {
        Ok(events(node, reason).await?.into_iter().next())
    })
    .await
}

/// A node with an initialized repository `main` and a pod `db-0` (label `app: db`) whose
/// volume `data` holds a small tree.
async fn db_node(test: &str) -> Result<(Node, restic_operator_e2e::ResticRepo)> {
    let node = Node::start(test).await?;
    let repo = ready_repository(&node, "main").await?;
    let (_, data) = node.app_pod("db-0", "db", "data").await?;
    make_tree(&data)?;
    Ok((node, repo))
}

/// A ResticRepository on S3, initialized by the coordinator; returns its restic handle.
async fn ready_repository(node: &Node, name: &str) -> Result<restic_operator_e2e::ResticRepo> {
    let repo = node.ctx.repository(name);
    node.repository(name, &repo).await?;
    node.wait_repository_reason(name, "RepositoryInitialized", Duration::from_secs(60))
        .await?;
    Ok(repo)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scheduled_backup_runs_on_time_and_a_manual_trigger_starts_within_two_seconds() -> Result<()> {
    let node = Node::start("scheduled").await?;
    let repo = ready_repository(&node, "main").await?;
    let (_, data) = node.app_pod("web-0", "web", "data").await?;
    make_tree(&data)?;

    // The next minute, with at least 20 s to set up.
    let now = Utc::now();
    let mut at = now.with_second(0).unwrap().with_nanosecond(0).unwrap() + chrono::Duration::minutes(1);
    if at - now < chrono::Duration::seconds(20) {
        at += chrono::Duration::minutes(1);
    }
    node.apply_yaml(&backup_yaml(
        "web",
        &format!(
            "  repositoryRef: {{name: main}}\n  schedule: '{} {} * * *'\n  timezone: UTC\n  \
             source: {{podVolumeBackup: {{selector: {{matchLabels: {{app: web}}}}, volumeName: data}}}}\n",
            at.minute(),
            at.hour()
        ),
    ))
    .await?;
    let api = node.backups();
    let next = eventually("status.nextBackup", Duration::from_secs(20), || async {
        Ok(api.get("web").await?.status.and_then(|s| s.next_backup))
    })
    .await?;
    assert_eq!(
        next.0.as_second(),
        at.timestamp(),
        "nextBackup is the scheduled minute"
    );

    let done = node
        .wait_finished(
            "web",
            0,
            (at - Utc::now()).to_std().unwrap_or_default() + Duration::from_secs(90),
        )
        .await?;
    let status = done.status.clone().unwrap();
    let last = status.last_backup.clone().unwrap();
    assert_eq!(
        last.result.map(|r| r.to_string()).as_deref(),
        Some("Succeeded"),
        "{last:?}"
    );
    let started = last.start_time.clone().unwrap().0.as_second();
    assert!(
        (at.timestamp()..=at.timestamp() + 5).contains(&started),
        "the run started at {started}, scheduled for {}",
        at.timestamp()
    );
    let snapshots = restic_snapshots(&repo)?;
    assert_eq!(snapshots.len(), 1);
    let id = snapshots[0]["id"].as_str().unwrap();
    assert_eq!(
        last.snapshot_id.as_deref(),
        Some(id),
        "status shows the snapshot restic lists"
    );
    assert_eq!(snapshots[0]["hostname"], "web");
    assert_eq!(snapshots[0]["paths"], json!(["/data"]));
    assert!(status.last_successful_backup.is_some());
    assert_eq!(
        status.statistics.as_ref().unwrap().successful_backups,
        Some(1),
        "{}",
        node.coordinator_log()
    );
    assert!(status.last_schedule_time.is_some());
    let next = status.next_backup.unwrap().0.as_second();
    assert_eq!(next, at.timestamp() + 86400, "next run is a day later");
    wait_event(&node, "BackupStarted").await?;
    wait_event(&node, "BackupCompleted").await?;

    // Manual trigger: the agent starts restic within two seconds.
    let mut agent = node.agent_client().await?;
    let t0 = Utc::now().timestamp_millis();
    node.trigger("web", "2024-01-15T10:00:00Z").await?;
    let started_ms = eventually("the manual run on the agent", Duration::from_secs(10), || {
        let mut agent = agent.clone();
        let first = last.run_id.clone().unwrap();
        async move {
            let runs = agent.list_runs(pb::ListRunsRequest {}).await?.into_inner().runs;
            Ok(runs
                .into_iter()
                .find(|r| r.kind == pb::RunKind::Backup as i32 && r.run_id != first && r.started_unix_ms > 0)
                .map(|r| r.started_unix_ms))
        }
    })
    .await?;
    let latency = started_ms - t0;
    eprintln!("manual trigger to restic running: {latency} ms");
    assert!(
        latency <= 2000,
        "manual trigger took {latency} ms to start restic"
    );
    let done = node.wait_finished("web", 1, Duration::from_secs(60)).await?;
    let status = done.status.unwrap();
    assert_eq!(
        status.last_manual_trigger.as_deref(),
        Some("2024-01-15T10:00:00Z")
    );
    assert_eq!(status.statistics.unwrap().total_backups, Some(2));
    assert_eq!(restic_snapshots(&repo)?.len(), 2);
    // The repository's statistics follow the backups without waiting for the interval.
    let repos = node.repositories();
    eventually(
        "repository statistics counting both snapshots",
        Duration::from_secs(30),
        || async {
            Ok(repos
                .get("main")
                .await?
                .status
                .and_then(|s| s.statistics)
                .and_then(|s| s.snapshot_count)
                .filter(|n| *n == 2))
        },
    )
    .await?;
    let _ = agent.list_runs(pb::ListRunsRequest {}).await?;

    // Metrics as the specification names them.
    let c = &node.coordinators[0];
    let ns = &node.ns;
    assert_eq!(
        c.metric(&format!(
            "backup_status{{backup=\"web\",namespace=\"{ns}\",status=\"success\"}}"
        )),
        Some(1.0)
    );
    assert!(
        c.metric(&format!(
            "backup_snapshot_files_total{{backup=\"web\",namespace=\"{ns}\"}}"
        ))
        .unwrap()
            >= 4.0
    );
    assert!(
        c.metric(&format!(
            "backup_duration_seconds{{backup=\"web\",namespace=\"{ns}\"}}"
        ))
        .is_some()
    );
    assert!(
        c.metric(&format!(
            "restic_repository_snapshots_total{{namespace=\"{ns}\",repository=\"main\"}}"
        ))
        .is_some()
    );
    assert!(
        c.metric("restic_operator_reconcile_total{controller=\"resticbackup\",result=\"success\"}")
            .unwrap()
            >= 1.0
    );

    // Deleting the backup removes its series.
    node.backups().delete("web", &Default::default()).await?;
    let series = format!("backup_status{{backup=\"web\",namespace=\"{ns}\",status=\"success\"}}");
    eventually(
        "the deleted backup's metrics gone",
        Duration::from_secs(20),
        || async { Ok(c.metric(&series).is_none().then_some(())) },
    )
    .await?;
    Ok(())
}

/// ~6 MiB that upload at `--limit-upload 512` (KiB/s) for about 12 s.
fn slow_backup(name: &str) -> String {
    backup_yaml(
        name,
        "  repositoryRef: {name: main}\n  schedule: '@yearly'\n  \
         source: {podVolumeBackup: {selector: {matchLabels: {app: db}}, volumeName: data}}\n  \
         restic: {extraArgs: ['--limit-upload', '512']}\n",
    )
}

async fn wait_dispatched(node: &Node, name: &str) -> Result<String> {
    let api = node.backups();
    eventually(
        "the run in flight on the agent",
        Duration::from_secs(30),
        || async {
            let b = api.get(name).await?;
            let s = b.status.unwrap_or_default();
            Ok(match (s.active_run, s.progress) {
                (Some(a), Some(_)) if a.node_name.is_some() => Some(a.run_id),
                _ => None,
            })
        },
    )
    .await
    .with_context(|| node.coordinator_log())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_coordinator_killed_mid_backup_reattaches_after_restart_and_makes_exactly_one_snapshot()
-> Result<()> {
    let mut node = Node::start("sigkill").await?;
    let repo = ready_repository(&node, "main").await?;
    let (_, data) = node.app_pod("db-0", "db", "data").await?;
    std::fs::write(data.join("dump.sql"), pseudo_random(6 << 20, 7))?;
    node.apply_yaml(&slow_backup("db")).await?;
    node.trigger("db", "once").await?;
    let run_id = wait_dispatched(&node, "db").await?;

    node.coordinators[0].kill();
    node.coordinators.clear();
    tokio::time::sleep(Duration::from_secs(2)).await;
    node.start_coordinator("coordinator-a").await?;

    let done = node.wait_finished("db", 0, Duration::from_secs(90)).await?;
    let status = done.status.unwrap();
    let last = status.last_backup.unwrap();
    assert_eq!(last.run_id.as_deref(), Some(run_id.as_str()));
    assert_eq!(
        last.result.map(|r| r.to_string()).as_deref(),
        Some("Succeeded"),
        "{:?}",
        last.message
    );
    assert_eq!(
        status.statistics.unwrap().total_backups,
        Some(1),
        "the run is counted once"
    );
    let snapshots = restic_snapshots(&repo)?;
    assert_eq!(snapshots.len(), 1, "exactly one snapshot: {snapshots:?}");
    assert_eq!(last.snapshot_id.as_deref(), snapshots[0]["id"].as_str());
    let log = node.coordinators[0].log();
    assert!(log.contains("re-attached to the run in flight"), "{log}");
    assert_eq!(
        node.coordinators[0].metric("restic_operator_dispatch_total{kind=\"backup\"}"),
        None,
        "the restarted coordinator did not dispatch the backup again"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_replica_never_dispatches_while_the_first_leads_and_takes_over_when_it_dies() -> Result<()> {
    let mut node = Node::start("replicas").await?;
    node.start_coordinator("coordinator-b").await?;
    let repo = ready_repository(&node, "main").await?;
    let (_, data) = node.app_pod("db-0", "db", "data").await?;
    std::fs::write(data.join("dump.sql"), pseudo_random(6 << 20, 8))?;
    node.apply_yaml(&slow_backup("db")).await?;
    node.trigger("db", "once").await?;
    wait_dispatched(&node, "db").await?;

    let (a, b) = (&node.coordinators[0], &node.coordinators[1]);
    assert_eq!(a.metric("restic_operator_leader"), Some(1.0));
    assert_eq!(b.metric("restic_operator_leader"), Some(0.0));
    assert_eq!(
        a.metric("restic_operator_dispatch_total{kind=\"backup\"}"),
        Some(1.0)
    );
    assert_eq!(b.metric("restic_operator_dispatch_total{kind=\"backup\"}"), None);
    assert!(
        b.metric("restic_operator_reconcile_total{controller=\"resticbackup\",result=\"success\"}")
            .is_none()
    );
    assert!(b.log().contains("waiting for leadership"), "{}", b.log());

    // The leader dies mid-run: the follower takes the lease and re-attaches.
    node.coordinators[0].kill();
    node.wait_leader(1).await?;
    node.wait_succeeded("db", 0, Duration::from_secs(90)).await?;
    assert_eq!(restic_snapshots(&repo)?.len(), 1);
    assert_eq!(
        node.coordinators[1].metric("restic_operator_dispatch_total{kind=\"backup\"}"),
        None
    );
    Ok(())
}

/// Plays the kubelet for a Job's pod: ends it with `exit_code` and `message`.
async fn finish_job_pod(node: &Node, job: &str, exit_code: i32, message: &str) -> Result<()> {
    let pods: Api<Pod> = Api::namespaced(node.client.clone(), &node.ns);
    let pod = eventually(
        &format!("the pod of Job {job}"),
        Duration::from_secs(30),
        || async {
            Ok(pods
                .list(&ListParams::default().labels(&format!("job-name={job}")))
                .await?
                .items
                .into_iter()
                .next())
        },
    )
    .await
    .with_context(|| node.coordinator_log())?;
    let container = pod.spec.as_ref().unwrap().containers[0].name.clone();
    let phase = if exit_code == 0 { "Succeeded" } else { "Failed" };
    let now = Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    let status = json!({"status": {"phase": phase, "containerStatuses": [{
        "name": container, "image": "busybox", "imageID": "", "ready": false, "restartCount": 0,
        "state": {"terminated": {"exitCode": exit_code, "message": message, "reason": if exit_code == 0 {"Completed"} else {"Error"},
                  "startedAt": now, "finishedAt": now}}}]}});
    pods.patch_status(&pod.name_any(), &PatchParams::default(), &Patch::Merge(&status))
        .await?;
    Ok(())
}

async fn wait_job(node: &Node, label: &str) -> Result<Job> {
    let jobs: Api<Job> = Api::namespaced(node.client.clone(), &node.ns);
    eventually(
        &format!("a Job with {label}"),
        Duration::from_secs(30),
        || async {
            Ok(jobs
                .list(&ListParams::default().labels(label))
                .await?
                .items
                .into_iter()
                .next())
        },
    )
    .await
    .with_context(|| node.coordinator_log())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_pre_hook_job_fails_the_run_and_runs_on_failure() -> Result<()> {
    let (node, repo) = db_node("hooks").await?;
    let template = "{spec: {containers: [{name: hook, image: busybox, command: [sh, -c, 'exit 1']}]}}";
    node.apply_yaml(&backup_yaml(
        "db",
        &format!(
            "  repositoryRef: {{name: main}}\n  schedule: '@yearly'\n  \
             source: {{podVolumeBackup: {{selector: {{matchLabels: {{app: db}}}}, volumeName: data}}}}\n  \
             hooks:\n    preBackup: {{job: {{podTemplate: {template}, timeout: 2m}}}}\n    \
             onFailure: {{job: {{podTemplate: {template}}}}}\n"
        ),
    ))
    .await?;
    node.trigger("db", "go").await?;

    let pre = wait_job(&node, "backup.resticbackup.io/hook=preBackup").await?;
    finish_job_pod(&node, &pre.name_any(), 1, "database is locked").await?;
    let on_failure = wait_job(&node, "backup.resticbackup.io/hook=onFailure").await?;
    finish_job_pod(&node, &on_failure.name_any(), 0, "alerted").await?;

    let done = node.wait_finished("db", 0, Duration::from_secs(60)).await?;
    let status = done.status.unwrap();
    let last = status.last_backup.unwrap();
    assert_eq!(last.result.map(|r| r.to_string()).as_deref(), Some("Failed"));
    let message = last.message.unwrap_or_default();
    assert!(message.contains("preBackup hook failed"), "{message}");
    assert!(
        message.contains("exited 1: database is locked"),
        "the hook's output is in the reason: {message}"
    );
    assert!(message.contains("onFailure hook ran"), "{message}");
    let ready = status.conditions.iter().find(|c| c.type_ == "Ready").unwrap();
    assert!(
        !ready.is_true() && ready.reason.as_deref() == Some("BackupFailed"),
        "{ready:?}"
    );
    let jobs: Api<Job> = Api::namespaced(node.client.clone(), &node.ns);
    let on_failure = jobs.get(&on_failure.name_any()).await?;
    let complete = on_failure
        .status
        .and_then(|s| s.conditions)
        .unwrap_or_default()
        .iter()
        .any(|c| c.type_ == "Complete" && c.status == "True");
    assert!(complete, "the onFailure Job ran to completion");
    assert!(restic_snapshots(&repo)?.is_empty(), "nothing was backed up");
    wait_event(&node, "HookFailed").await?;
    wait_event(&node, "BackupFailed").await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_exec_hook_goes_through_the_api_server_to_the_pod_and_its_failure_is_reported() -> Result<()> {
    // Without a kubelet the API server cannot reach the container; what is tested here is that
    // the hook picks the right pod and container and reports the failure. The cluster e2e
    // suite runs real commands.
    let (node, repo) = db_node("exec-hook").await?;
    node.apply_yaml(&backup_yaml(
        "db",
        "  repositoryRef: {name: main}\n  schedule: '@yearly'\n  \
         source: {podVolumeBackup: {selector: {matchLabels: {app: db}}, volumeName: data}}\n  \
         hooks: {preBackup: {exec: {podSelector: {matchLabels: {app: db}}, container: app, command: [sh, -c, 'sync'], timeout: 20s}}}\n",
    ))
    .await?;
    node.trigger("db", "go").await?;
    let done = node.wait_finished("db", 0, Duration::from_secs(60)).await?;
    let last = done.status.unwrap().last_backup.unwrap();
    let message = last.message.unwrap_or_default();
    assert_eq!(last.result.map(|r| r.to_string()).as_deref(), Some("Failed"));
    assert!(message.contains("preBackup hook failed"), "{message}");
    assert!(message.contains("pod db-0 container app"), "{message}");
    assert!(restic_snapshots(&repo)?.is_empty());
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_leaves_the_snapshots_restic_forget_dry_run_predicts() -> Result<()> {
    let (node, repo) = db_node("retention").await?;

    // History made by the old scripts: eight days of snapshots of this host and tag, and
    // one of another host that retention must not touch.
    let src = node.dir.join("history");
    std::fs::create_dir_all(&src)?;
    std::fs::write(src.join("f"), b"old")?;
    let backup_at = |host: &str, time: String| -> Result<String> {
        let out = repo
            .restic()?
            .args([
                "backup", "--json", "--host", host, "--tag", "nightly", "--time", &time,
            ])
            .arg(&src)
            .output()?;
        ensure!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let summary: serde_json::Value = String::from_utf8(out.stdout)?
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .find(|v: &serde_json::Value| v["message_type"] == "summary")
            .context("no summary")?;
        Ok(summary["snapshot_id"].as_str().unwrap_or_default().to_owned())
    };
    for day in 1..=8 {
        let t = Utc::now() - chrono::Duration::days(day);
        backup_at("db", t.format("%Y-%m-%d %H:%M:%S").to_string())?;
    }
    let other = backup_at(
        "someone-else",
        (Utc::now() - chrono::Duration::days(30))
            .format("%Y-%m-%d %H:%M:%S")
            .to_string(),
    )?;

    // What restic predicts, with a probe standing in for the coordinator's snapshot.
    let policy = ["--keep-last", "1", "--keep-daily", "3", "--keep-weekly", "2"];
    let probe = backup_at("db", Utc::now().format("%Y-%m-%d %H:%M:%S").to_string())?;
    let out = repo
        .restic()?
        .args([
            "forget",
            "--dry-run",
            "--json",
            "--group-by",
            "host,tags",
            "--host",
            "db",
            "--tag",
            "nightly",
        ])
        .args(policy)
        .output()?;
    ensure!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let groups: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout)?;
    let mut predicted: Vec<String> = groups
        .iter()
        .flat_map(|g| g["keep"].as_array().cloned().unwrap_or_default())
        .map(|s| s["id"].as_str().unwrap().to_owned())
        .collect();
    let out = repo.restic()?.args(["forget", &probe]).output()?;
    ensure!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(predicted.contains(&probe), "the newest snapshot is kept");

    node.apply_yaml(&backup_yaml(
        "db",
        "  repositoryRef: {name: main}\n  schedule: '@yearly'\n  \
         source: {podVolumeBackup: {selector: {matchLabels: {app: db}}, volumeName: data}}\n  \
         restic: {hostname: db, tags: [nightly]}\n  \
         retention: {enabled: true, policy: {keepLast: 1, keepDaily: 3, keepWeekly: 2}, groupBy: [host, tags]}\n",
    ))
    .await?;
    node.trigger("db", "go").await?;
    let done = node.wait_finished("db", 0, Duration::from_secs(60)).await?;
    let status = done.status.unwrap();
    let last = status.last_backup.unwrap();
    assert_eq!(
        last.result.map(|r| r.to_string()).as_deref(),
        Some("Succeeded"),
        "{:?}",
        last.message
    );
    let new_id = last.snapshot_id.unwrap();
    predicted.retain(|id| *id != probe);
    predicted.push(new_id);
    predicted.sort();

    let mut remaining: Vec<String> = restic_snapshots(&repo)?
        .iter()
        .filter(|s| s["hostname"] == "db")
        .map(|s| s["id"].as_str().unwrap().to_owned())
        .collect();
    remaining.sort();
    assert_eq!(
        remaining, predicted,
        "retention keeps what restic's dry run predicts"
    );
    let all = restic_snapshots(&repo)?;
    assert!(
        all.iter().any(|s| s["id"].as_str() == Some(other.as_str())),
        "another host is untouched"
    );
    assert_eq!(status.snapshots_after_retention, Some(predicted.len() as i64));
    assert_eq!(
        status.snapshots_removed_by_retention,
        Some(9 - predicted.len() as i64)
    );
    assert!(status.last_retention_run.is_some());
    let event = wait_event(&node, "RetentionCompleted").await?;
    assert!(event.note.unwrap_or_default().contains("removed"));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repository_failures_each_have_their_own_reason() -> Result<()> {
    let node = Node::start("repo-failures").await?;
    // Wrong password: a repository made by restic with one password, a Secret with another.
    let real = node.ctx.repository("wrong");
    let out = real.restic()?.arg("init").output()?;
    ensure!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let mut wrong = real.clone();
    wrong.password = "not-the-password".into();
    node.repository("wrong", &wrong).await?;
    // Unreachable: nothing listens there.
    let port = restic_operator_e2e::process::free_port()?;
    let mut unreachable = node.ctx.repository("unreachable");
    unreachable.url = format!("s3:http://127.0.0.1:{port}/nowhere/repo");
    node.repository("unreachable", &unreachable).await?;
    // Missing Secret, and a Secret without the password.
    node.apply_yaml(
        "apiVersion: backup.resticbackup.io/v1alpha1\nkind: ResticRepository\nmetadata: {name: nosecret}\n\
         spec: {repositoryURL: 's3:http://127.0.0.1:1/x/y', credentialsSecretRef: {name: does-not-exist}}",
    )
    .await?;
    let mut data = serde_json::Map::new();
    data.insert("AWS_ACCESS_KEY_ID".into(), json!("x"));
    node.apply_secret("nopassword", data).await?;
    node.apply_yaml(
        "apiVersion: backup.resticbackup.io/v1alpha1\nkind: ResticRepository\nmetadata: {name: nokey}\n\
         spec: {repositoryURL: 's3:http://127.0.0.1:1/x/y', credentialsSecretRef: {name: nopassword}}",
    )
    .await?;

    let m = node
        .wait_repository_reason("nosecret", "SecretNotFound", Duration::from_secs(30))
        .await?;
    assert!(m.contains("does-not-exist"), "{m}");
    let m = node
        .wait_repository_reason("nokey", "SecretKeyMissing", Duration::from_secs(30))
        .await?;
    assert!(m.contains("RESTIC_PASSWORD"), "{m}");
    let m = node
        .wait_repository_reason("wrong", "AuthenticationFailed", Duration::from_secs(60))
        .await?;
    assert!(!m.contains("not-the-password"), "the password never appears: {m}");
    node.wait_repository_reason("unreachable", "RepositoryUnreachable", Duration::from_secs(90))
        .await?;

    // Nothing re-initialized the repository whose password was wrong.
    let out = real.restic()?.args(["cat", "config"]).output()?;
    ensure!(
        out.status.success(),
        "the original repository still opens with its password"
    );

    // A backup on an unready repository says why and does not run.
    let (_, data) = node.app_pod("db-0", "db", "data").await?;
    make_tree(&data)?;
    node.apply_yaml(&backup_yaml(
        "db",
        "  repositoryRef: {name: wrong}\n  schedule: '@yearly'\n  \
         source: {podVolumeBackup: {selector: {matchLabels: {app: db}}, volumeName: data}}\n  manualTrigger: go\n",
    ))
    .await?;
    let api = node.backups();
    let message = eventually(
        "RepositoryReady=False on the backup",
        Duration::from_secs(30),
        || async {
            let b = api.get("db").await?;
            Ok(b.status
                .and_then(|s| s.conditions.into_iter().find(|c| c.type_ == "RepositoryReady"))
                .filter(|c| c.reason.as_deref() == Some("RepositoryNotReady"))
                .and_then(|c| c.message))
        },
    )
    .await?;
    assert!(message.contains("AuthenticationFailed"), "{message}");
    assert_eq!(
        node.coordinators[0].metric("restic_operator_dispatch_total{kind=\"backup\"}"),
        None
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backup_from_a_namespace_the_repository_does_not_allow_is_refused() -> Result<()> {
    let other = unique_name("other-team");
    let admin = restic_operator_e2e::TestEnv::get().client().await?;
    Api::<Namespace>::all(admin.clone())
        .create(
            &PostParams::default(),
            &Namespace {
                metadata: ObjectMeta {
                    name: Some(other.clone()),
                    labels: Some([("team".to_owned(), "b".to_owned())].into()),
                    ..Default::default()
                },
                ..Default::default()
            },
        )
        .await?;
    let node = Node::start_with("allowed-ns", &[&other], &[]).await?;
    let repo = node.ctx.repository("main");
    node.repository("main", &repo).await?;
    node.wait_repository_reason("main", "RepositoryInitialized", Duration::from_secs(60))
        .await?;
    let backups: Api<restic_operator_api::backup::ResticBackup> = Api::namespaced(admin.clone(), &other);
    let manifest: serde_json::Value = serde_yaml::from_str(&format!(
        "apiVersion: backup.resticbackup.io/v1alpha1\nkind: ResticBackup\nmetadata: {{name: intruder}}\n\
         spec: {{repositoryRef: {{name: main, namespace: {}}}, schedule: '@yearly', manualTrigger: now,\n\
         source: {{podVolumeBackup: {{selector: {{matchLabels: {{app: x}}}}, volumeName: data}}}}}}",
        node.ns
    ))?;
    backups
        .patch(
            "intruder",
            &PatchParams::apply("e2e-test"),
            &Patch::Apply(&manifest),
        )
        .await?;
    let condition = eventually("NamespaceNotAllowed", Duration::from_secs(30), || async {
        let b = backups.get("intruder").await?;
        Ok(b.status
            .and_then(|s| s.conditions.into_iter().find(|c| c.type_ == "RepositoryReady"))
            .filter(|c| c.reason.as_deref() == Some("NamespaceNotAllowed")))
    })
    .await
    .with_context(|| node.coordinator_log())?;
    assert!(condition.message.unwrap_or_default().contains(&other));
    let refused = eventually("the refusal event", Duration::from_secs(30), || async {
        let all = Api::<Event>::namespaced(admin.clone(), &other)
            .list(&ListParams::default())
            .await?
            .items;
        Ok(all
            .into_iter()
            .find(|e| e.reason.as_deref() == Some("NamespaceNotAllowed")))
    })
    .await?;
    assert!(refused.note.unwrap_or_default().contains("refused"));
    // Still nothing a while later.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let mut agent = node.agent_client().await?;
    let runs = agent.list_runs(pb::ListRunsRequest {}).await?.into_inner().runs;
    assert!(
        runs.iter().all(|r| r.kind != pb::RunKind::Backup as i32),
        "nothing was sent to an agent: {runs:?}"
    );
    assert_eq!(
        node.coordinators[0].metric("restic_operator_dispatch_total{kind=\"backup\"}"),
        None
    );
    let status = backups.get("intruder").await?.status.unwrap();
    assert_eq!(
        status.last_manual_trigger.as_deref(),
        Some("now"),
        "the refused trigger is not run later"
    );
    assert!(restic_snapshots(&repo)?.is_empty());
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_claim_no_running_pod_mounts_is_backed_up_by_a_mover_pod_that_is_removed_afterwards() -> Result<()>
{
    let mover_port = restic_operator_e2e::process::free_port()?;
    let node = Node::start_with(
        "mover",
        &[],
        &[
            format!("--mover-port={mover_port}"),
            "--mover-image=restic-agent:test".into(),
        ],
    )
    .await?;
    let repo = ready_repository(&node, "main").await?;
    // A claim bound to a volume, mounted by no pod.
    let pv_name = format!("{}-pv", node.ns);
    let pv: PersistentVolume = serde_json::from_value(json!({
        "metadata": {"name": pv_name},
        "spec": {"capacity": {"storage": "1Gi"}, "accessModes": ["ReadWriteOnce"], "hostPath": {"path": "/srv/data"},
                 "claimRef": {"namespace": node.ns, "name": "data"}, "persistentVolumeReclaimPolicy": "Retain"}
    }))?;
    Api::<PersistentVolume>::all(node.client.clone())
        .create(&PostParams::default(), &pv)
        .await?;
    let pvc: PersistentVolumeClaim = serde_json::from_value(json!({
        "metadata": {"name": "data"},
        "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "1Gi"}}, "volumeName": pv_name}
    }))?;
    Api::<PersistentVolumeClaim>::namespaced(node.client.clone(), &node.ns)
        .create(&PostParams::default(), &pvc)
        .await?;
    node.apply_yaml(&backup_yaml(
        "archive",
        "  repositoryRef: {name: main}\n  schedule: '@yearly'\n  source: {pvc: {claimName: data}}\n  manualTrigger: go\n",
    ))
    .await?;

    // The mover pod: the agent image in mover mode, the claim read-only.
    let mover = eventually("the mover pod", Duration::from_secs(30), || async {
        Ok(node
            .pods("app.kubernetes.io/component=mover")
            .await?
            .into_iter()
            .next())
    })
    .await
    .with_context(|| node.coordinator_log())?;
    let spec = mover.spec.clone().unwrap();
    let claim = spec.volumes.as_ref().unwrap()[0]
        .persistent_volume_claim
        .clone()
        .unwrap();
    assert_eq!((claim.claim_name.as_str(), claim.read_only), ("data", Some(true)));
    let container = &spec.containers[0];
    assert_eq!(container.image.as_deref(), Some("restic-agent:test"));
    assert!(
        container
            .args
            .as_ref()
            .unwrap()
            .contains(&"--mover-volume=/data".to_owned())
    );

    // Play the kubelet: run the mover with the certificate from its Secret, serving a
    // directory that stands for the mounted claim, and report the pod running.
    let secret = Api::<Secret>::namespaced(node.client.clone(), &node.ns)
        .get(&format!("{}-tls", mover.name_any()))
        .await?;
    let pki = node.dir.join("mover-pki");
    std::fs::create_dir_all(&pki)?;
    for key in ["tls.crt", "tls.key", "ca.crt"] {
        std::fs::write(pki.join(key), &secret.data.as_ref().unwrap()[key].0)?;
    }
    let volume = node.dir.join("claim");
    make_tree(&volume)?;
    let p = |f: &str| pki.join(f).display().to_string();
    let args = vec![
        "serve".to_owned(),
        format!("--mover-volume={}", volume.display()),
        format!("--listen=127.0.0.1:{mover_port}"),
        format!("--tls-cert={}", p("tls.crt")),
        format!("--tls-key={}", p("tls.key")),
        format!("--tls-client-ca={}", p("ca.crt")),
        format!("--state-dir={}", node.dir.join("mover-state").display()),
        format!(
            "--restic={}",
            restic_operator_e2e::tools::tool("restic")?.display()
        ),
        format!(
            "--metrics-listen=127.0.0.1:{}",
            restic_operator_e2e::process::free_port()?
        ),
    ];
    let _mover_process = restic_operator_e2e::process::Process::spawn(
        "restic-agent-mover",
        &support::agent_binary()?,
        &args,
        &node.dir,
    )?;
    eventually("the mover listening", Duration::from_secs(20), || async {
        Ok(std::net::TcpStream::connect(("127.0.0.1", mover_port))
            .ok()
            .map(|_| ()))
    })
    .await?;
    let pods: Api<Pod> = Api::namespaced(node.client.clone(), &node.ns);
    restic_operator_e2e::operator::mark_running(&node.client, &node.ns, &mover.name_any(), "127.0.0.1")
        .await?;
    // The scheduler would bind it; tests have none, so the node stays unset and the
    // coordinator reaches the pod by IP.

    let last = node.wait_succeeded("archive", 0, Duration::from_secs(60)).await?;
    let snapshots = restic_snapshots(&repo)?;
    assert_eq!(snapshots.len(), 1);
    assert_eq!(snapshots[0]["paths"], json!(["/data"]));
    assert_eq!(last.snapshot_id.as_deref(), snapshots[0]["id"].as_str());
    eventually(
        "the mover pod and its Secret removed",
        Duration::from_secs(30),
        || async {
            let pod_gone = pods.get_opt(&mover.name_any()).await?.is_none();
            let secret_gone = Api::<Secret>::namespaced(node.client.clone(), &node.ns)
                .get_opt(&format!("{}-tls", mover.name_any()))
                .await?
                .is_none();
            Ok((pod_gone && secret_gone).then_some(()))
        },
    )
    .await?;

    // Once a running pod mounts the claim, the next run goes to its node's agent, which
    // reads the claim's CSI directory (named after the PV), and no mover is started.
    let pod: Pod = serde_json::from_value(json!({
        "metadata": {"name": "archiver-0", "labels": {"app": "archiver"}},
        "spec": {"nodeName": node.name, "containers": [{"name": "app", "image": "busybox"}],
                 "volumes": [{"name": "archive", "persistentVolumeClaim": {"claimName": "data"}}]}
    }))?;
    let uid = node.create_running_pod(pod, "10.1.0.10").await?;
    let csi = node
        .agent()
        .kubelet
        .join("pods")
        .join(&uid)
        .join("volumes/kubernetes.io~csi")
        .join(&pv_name)
        .join("mount");
    make_tree(&csi)?;
    std::fs::write(csi.join("added-later"), b"new")?;
    node.trigger("archive", "again").await?;
    let last = node.wait_succeeded("archive", 1, Duration::from_secs(60)).await?;
    assert_eq!(
        last.files_new,
        Some(1),
        "incremental over the mover's snapshot: only the new file"
    );
    assert!(
        node.pods("app.kubernetes.io/component=mover").await?.is_empty(),
        "no mover this time"
    );
    assert_eq!(restic_snapshots(&repo)?.len(), 2);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_integrity_check_runs_through_an_agent_and_records_its_result() -> Result<()> {
    let node = Node::start("integrity").await?;
    ready_repository(&node, "main").await?;
    node.repositories()
        .patch(
            "main",
            &PatchParams::default(),
            &Patch::Merge(
                json!({"spec": {"integrityCheck": {"enabled": true, "schedule": "0 3 * * 0",
                "timezone": "Europe/Berlin", "manualTrigger": "check-now"}}}),
            ),
        )
        .await?;
    let api = node.repositories();
    let status = eventually("the integrity check result", Duration::from_secs(60), || async {
        let r = api.get("main").await?;
        Ok(r.status.filter(|s| s.last_integrity_check_result.is_some()))
    })
    .await
    .with_context(|| node.coordinator_log())?;
    assert_eq!(
        serde_json::to_value(status.last_integrity_check_result)?,
        json!("Passed")
    );
    assert_eq!(status.last_manual_trigger.as_deref(), Some("check-now"));
    let next = status.next_integrity_check.expect("next scheduled check").0;
    assert!(
        next.as_second() > Utc::now().timestamp(),
        "the next check is in the future"
    );
    let ok = status
        .conditions
        .iter()
        .find(|c| c.type_ == "IntegrityCheckSucceeded")
        .unwrap();
    assert!(ok.is_true(), "{ok:?}");
    let c = &node.coordinators[0];
    assert_eq!(
        c.metric(&format!(
            "restic_repository_integrity_check_status{{namespace=\"{}\",repository=\"main\"}}",
            node.ns
        )),
        Some(1.0)
    );
    assert_eq!(
        c.metric("restic_operator_dispatch_total{kind=\"check\"}"),
        Some(1.0)
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_certificate_is_renewed_before_it_expires_and_runs_keep_working() -> Result<()> {
    // Certificates valid for 10 days, renewed when less than 30 remain: every check renews.
    let node = Node::start_with(
        "cert-renewal",
        &[],
        &[
            "--cert-validity=240h".into(),
            "--cert-renew-before=720h".into(),
            "--cert-check-interval=2s".into(),
        ],
    )
    .await?;
    let secrets: Api<Secret> = Api::namespaced(node.client.clone(), &node.ns);
    let read = |s: &Secret, k: &str| s.data.as_ref().unwrap()[k].0.clone();
    let first = secrets.get("restic-operator-agent-tls").await?;
    let renewed = eventually("a renewed agent certificate", Duration::from_secs(30), || async {
        let now = secrets.get("restic-operator-agent-tls").await?;
        Ok((read(&now, "tls.crt") != read(&first, "tls.crt")).then_some(now))
    })
    .await
    .with_context(|| node.coordinator_log())?;
    assert_eq!(read(&renewed, "ca.crt"), read(&first, "ca.crt"), "the CA stays");
    assert!(
        node.coordinators[0]
            .log()
            .contains("renewed the agent certificate")
    );
    // The coordinator's own client certificate was renewed too; the agent (still serving
    // its first certificate, from the same CA) accepts it.
    let repo = ready_repository(&node, "main").await?;
    let (_, data) = node.app_pod("db-0", "db", "data").await?;
    make_tree(&data)?;
    node.apply_yaml(&backup_yaml(
        "db",
        "  repositoryRef: {name: main}\n  schedule: '@yearly'\n  \
         source: {podVolumeBackup: {selector: {matchLabels: {app: db}}, volumeName: data}}\n  manualTrigger: go\n",
    ))
    .await?;
    node.wait_succeeded("db", 0, Duration::from_secs(60)).await?;
    assert_eq!(restic_snapshots(&repo)?.len(), 1);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_coordinator_works_with_only_its_cluster_role() -> Result<()> {
    let role = include_str!("../rbac/clusterrole.yaml");
    let node = Node::start_as("rbac", &[], &[], Some(role)).await?;
    let repo = ready_repository(&node, "main").await?;
    let (_, data) = node.app_pod("db-0", "db", "data").await?;
    make_tree(&data)?;
    let template = "{spec: {containers: [{name: hook, image: busybox}]}}";
    node.apply_yaml(&backup_yaml(
        "db",
        &format!(
            "  repositoryRef: {{name: main}}\n  schedule: '@yearly'\n  \
             source: {{podVolumeBackup: {{selector: {{matchLabels: {{app: db}}}}, volumeName: data}}}}\n  \
             hooks: {{postBackup: {{job: {{podTemplate: {template}}}}}}}\n  \
             retention: {{enabled: true, policy: {{keepLast: 3}}}}\n  manualTrigger: go\n"
        ),
    ))
    .await?;
    let post = wait_job(&node, "backup.resticbackup.io/hook=postBackup").await?;
    finish_job_pod(&node, &post.name_any(), 0, "done").await?;
    let done = node.wait_finished("db", 0, Duration::from_secs(60)).await?;
    let status = done.status.unwrap();
    let last = status.last_backup.unwrap();
    assert_eq!(
        last.result.map(|r| r.to_string()).as_deref(),
        Some("Succeeded"),
        "{:?}",
        last.message
    );
    assert!(status.last_retention_run.is_some(), "retention ran");
    assert_eq!(restic_snapshots(&repo)?.len(), 1);
    wait_event(&node, "BackupCompleted").await?;
    let log = node.coordinators[0].log();
    assert!(
        !log.to_lowercase().contains("forbidden"),
        "a request was forbidden:\n{log}"
    );
    Ok(())
}
