//! The coordinator end to end: real control plane, S3 server, restic, coordinator and agent
//! binaries; pods are API objects whose UIDs map to a kubelet-shaped directory.

mod support;

#[path = "coordinator/restore.rs"]
mod restore;

use std::time::Duration;

use anyhow::{Context, Result, ensure};
use chrono::{Timelike, Utc};
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{Namespace, Pod, Secret};
use k8s_openapi::api::events::v1::Event;
use kube::api::{ListParams, ObjectMeta, Patch, PatchParams, PostParams};
use kube::{Api, ResourceExt};
use restic_operator_e2e::fixtures::{make_tree, pseudo_random};
use restic_operator_e2e::{eventually, unique_name};
use restic_operator_proto::v1 as pb;
use serde_json::json;
use support::{
    Node, backup_yaml, bound_claim, csi_mount, ready_repository, restic_snapshots, wait_dispatched,
};

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
    // The default hostname is namespace-qualified: `<name>.<namespace>`.
    assert_eq!(snapshots[0]["hostname"], format!("web.{}", node.ns));
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
    let first = last.run_id.clone().unwrap();
    let started_ms = eventually("the manual run on the agent", Duration::from_secs(10), || async {
        let runs = support::runs(&agent).await?;
        Ok(runs
            .into_iter()
            .find(|r| r.kind == pb::RunKind::Backup as i32 && r.run_id != first && r.started_unix_ms > 0)
            .map(|r| r.started_unix_ms))
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
         restic: {extraArgs: ['--limit-upload=512']}\n",
    )
}

/// A node whose coordinator was killed while it followed a slow backup of `db-0`'s volume
/// (`size` bytes); returns the node (with no coordinator), the repository and the run id.
async fn killed_mid_backup(
    test: &str,
    size: usize,
) -> Result<(Node, restic_operator_e2e::ResticRepo, String)> {
    let mut node = Node::start(test).await?;
    let repo = ready_repository(&node, "main").await?;
    let (_, data) = node.app_pod("db-0", "db", "data").await?;
    std::fs::write(data.join("dump.sql"), pseudo_random(size, 7))?;
    node.apply_yaml(&slow_backup("db")).await?;
    node.trigger("db", "once").await?;
    let run_id = wait_dispatched(&node, "db").await?;
    node.coordinators[0].kill();
    node.coordinators.clear();
    Ok((node, repo, run_id))
}

/// Asserts that the node's (restarted) coordinator never sent a backup to an agent.
fn assert_not_dispatched(node: &Node, why: &str) {
    assert_eq!(
        node.coordinators[0].metric("restic_operator_dispatch_total{kind=\"backup\"}"),
        None,
        "{why}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_coordinator_killed_mid_backup_reattaches_after_restart_and_makes_exactly_one_snapshot()
-> Result<()> {
    let (mut node, repo, run_id) = killed_mid_backup("sigkill", 6 << 20).await?;
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
    assert_not_dispatched(&node, "the restarted coordinator dispatched the backup again");
    Ok(())
}

/// The agent keeps finished runs for `--keep-finished`; a coordinator that comes back later
/// finds the run unknown. It looks the run up in the repository instead of sending it again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_the_agent_forgot_is_found_in_the_repository_and_never_sent_again() -> Result<()> {
    // The coordinator dies; the backup finishes with nobody following it...
    let (mut node, repo, run_id) = killed_mid_backup("forgotten", 3 << 20).await?;
    let snapshot = eventually("the run's snapshot", Duration::from_secs(60), || async {
        let list = restic_snapshots(&repo)?;
        Ok(list.first().and_then(|s| s["id"].as_str()).map(String::from))
    })
    .await?;
    // ...and the agent forgets it, as after --keep-finished.
    node.agent.as_mut().context("no agent")?.restart(true).await?;
    node.start_coordinator("coordinator-a").await?;

    let done = node.wait_finished("db", 0, Duration::from_secs(90)).await?;
    let last = done.status.unwrap().last_backup.unwrap();
    assert_eq!(last.run_id.as_deref(), Some(run_id.as_str()));
    assert_eq!(
        last.result.map(|r| r.to_string()).as_deref(),
        Some("Succeeded"),
        "{last:?}"
    );
    assert_eq!(last.snapshot_id.as_deref(), Some(snapshot.as_str()));
    let message = last.message.unwrap_or_default();
    assert!(message.contains("was not sent again"), "{message}");
    assert_eq!(last.files_new, None, "no counts without the agent's summary");
    assert_eq!(restic_snapshots(&repo)?.len(), 1, "a second snapshot was made");
    assert_not_dispatched(&node, "the run was sent again");
    Ok(())
}

/// Readiness comes from a cheap probe. A repository whose statistics cannot be read (here an
/// integrity check holds its exclusive lock; on a large repository, the time `restic stats`
/// takes) stays Ready and takes backups; the failure is a warning event.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_repository_whose_statistics_cannot_be_read_stays_ready() -> Result<()> {
    let node = Node::start("stats-locked").await?;
    let repo = ready_repository(&node, "main").await?;
    // The first statistics, read after the first probe.
    eventually("the first statistics", Duration::from_secs(30), || async {
        let r = node.repositories().get("main").await?;
        Ok(r.status.and_then(|s| s.statistics).map(|_| ()))
    })
    .await?;
    let check = hold_exclusive_lock(&repo).await?;

    // A spec change makes the coordinator probe the repository and read its statistics again.
    let changed = node
        .repositories()
        .patch(
            "main",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"cache": {"enabled": true}}})),
        )
        .await?;
    let failed = wait_event(&node, "StatisticsFailed").await;
    let probed = eventually("the new generation probed", Duration::from_secs(30), || async {
        let r = node.repositories().get("main").await?;
        Ok(r.status
            .filter(|s| s.observed_generation == changed.metadata.generation))
    })
    .await;
    drop(check);
    let note = failed?.note.unwrap_or_default();
    assert!(note.contains("locked"), "{note}");
    let status = probed?;
    let ready = status
        .conditions
        .iter()
        .find(|c| c.type_ == "Ready")
        .context("no Ready condition")?;
    assert!(
        ready.is_true() && ready.reason.as_deref() == Some("RepositoryAccessible"),
        "{ready:?}"
    );
    Ok(())
}

/// A slow `restic check` holding a repository's exclusive lock, stopped when dropped (its
/// lock then stays behind: `restic unlock --remove-all` removes it).
struct ExclusiveLock(std::process::Child);

impl Drop for ExclusiveLock {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts a slow `restic check` that holds the repository's exclusive lock, once the
/// repository has a snapshot to read; returns when the lock is there.
async fn hold_exclusive_lock(repo: &restic_operator_e2e::ResticRepo) -> Result<ExclusiveLock> {
    let src = tempfile::tempdir()?;
    std::fs::write(src.path().join("f"), pseudo_random(1 << 20, 5))?;
    let out = repo
        .restic()?
        .current_dir(src.path())
        .args(["backup", "."])
        .output()?;
    ensure!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    // It waits for the locks of others (the coordinator reads the repository's statistics).
    let check = ExclusiveLock(
        repo.restic()?
            .args(["check", "--read-data", "--limit-download=1", "--retry-lock=2m"])
            .spawn()?,
    );
    // Other locks come and go (the coordinator reads the repository's statistics): wait for
    // this process's own exclusive one.
    let pid = check.0.id();
    eventually("the check's exclusive lock", Duration::from_secs(20), || async {
        let out = repo.restic()?.args(["list", "locks", "--no-lock"]).output()?;
        for id in String::from_utf8_lossy(&out.stdout).lines() {
            let lock = repo.restic()?.args(["cat", "lock", id, "--no-lock"]).output()?;
            let lock: serde_json::Value = match serde_json::from_slice(&lock.stdout) {
                Ok(v) => v,
                Err(_) => continue, // removed meanwhile
            };
            if lock["exclusive"] == true && lock["pid"] == pid {
                return Ok(Some(()));
            }
        }
        Ok(None)
    })
    .await?;
    Ok(check)
}

/// `jobConfig.backoffLimit`: a backup that fails for a reason a retry can fix (here another
/// process's exclusive lock on the repository) is tried again after a backoff, in the same
/// run, and the run makes one snapshot; its record says why the first attempt failed. With
/// the default (no retry) the same failure ends the run at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backup_that_fails_is_retried_within_its_backoff_limit_in_the_same_run() -> Result<()> {
    let (node, repo) = db_node("retry").await?;
    let check = hold_exclusive_lock(&repo).await?;
    let spec = |limit: i32| {
        format!(
            "  repositoryRef: {{name: main}}\n  schedule: '@yearly'\n  \
             source: {{podVolumeBackup: {{selector: {{matchLabels: {{app: db}}}}, volumeName: data}}}}\n  \
             jobConfig: {{backoffLimit: {limit}}}\n  manualTrigger: once\n"
        )
    };
    node.apply_yaml(&backup_yaml("no-retry", &spec(0))).await?;
    let once = node.wait_finished("no-retry", 0, Duration::from_secs(60)).await?;
    let last = once.status.unwrap_or_default().last_backup.context("no record")?;
    assert_eq!(
        last.result.map(|r| r.to_string()).as_deref(),
        Some("Failed"),
        "{last:?}"
    );
    let message = last.message.unwrap_or_default();
    assert!(
        message.contains("locked") && !message.contains("attempt"),
        "{message}"
    );

    node.apply_yaml(&backup_yaml("retried", &spec(2))).await?;
    let retrying = wait_event(&node, "BackupRetrying").await;
    drop(check);
    let out = repo.restic()?.args(["unlock", "--remove-all"]).output()?;
    ensure!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let note = retrying?.note.unwrap_or_default();
    assert!(
        note.contains("Attempt 1 of run") && note.contains("attempt 2 of 3 in 10s"),
        "{note}"
    );
    let active = node
        .backups()
        .get("retried")
        .await?
        .status
        .and_then(|s| s.active_run);
    assert_eq!(active.as_ref().and_then(|a| a.attempt), Some(2), "{active:?}");

    let done = node.wait_finished("retried", 0, Duration::from_secs(90)).await?;
    let last = done.status.unwrap_or_default().last_backup.context("no record")?;
    assert_eq!(
        last.result.map(|r| r.to_string()).as_deref(),
        Some("Succeeded"),
        "{last:?}"
    );
    let message = last.message.clone().unwrap_or_default();
    assert!(
        message.starts_with("attempt 2 of 3; attempt 1 failed: repository locked"),
        "{message}"
    );
    let run_id = last.run_id.clone().context("no run id")?;
    let runs = node.agent_runs().await?;
    let outcome = |id: &str| {
        runs.iter()
            .find(|r| r.run_id == id)
            .and_then(|r| r.result.clone())
            .map(|r| r.outcome)
    };
    assert_eq!(outcome(&run_id), Some(pb::Outcome::Failed as i32), "{runs:?}");
    assert_eq!(
        outcome(&format!("{run_id}-a2")),
        Some(pb::Outcome::Succeeded as i32),
        "{runs:?}"
    );
    let snapshots = restic_snapshots(&repo)?;
    assert_eq!(
        snapshots.len(),
        2,
        "the seeded snapshot and the retried run's: {snapshots:?}"
    );
    assert_eq!(last.snapshot_id.as_deref(), snapshots[1]["id"].as_str());
    Ok(())
}

/// Backups use restic's cache of repository metadata on the node (in the agent's state
/// directory) unless the repository turns it off.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backups_use_the_agents_restic_cache_unless_the_repository_turns_it_off() -> Result<()> {
    let node = Node::start("cache").await?;
    ready_repository(&node, "cached").await?;
    ready_repository(&node, "uncached").await?;
    node.repositories()
        .patch(
            "uncached",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"cache": {"enabled": false}}})),
        )
        .await?;
    let (_, data) = node.app_pod("web-0", "web", "data").await?;
    make_tree(&data.join("site"))?;
    for repo in ["cached", "uncached"] {
        node.apply_yaml(&format!(
            "apiVersion: backup.resticbackup.io/v1alpha1\nkind: ResticBackup\nmetadata: {{name: to-{repo}}}\n\
             spec:\n  repositoryRef: {{name: {repo}}}\n  schedule: '@yearly'\n  \
             source: {{podVolumeBackup: {{selector: {{matchLabels: {{app: web}}}}, volumeName: data}}}}\n  \
             manualTrigger: once\n"
        ))
        .await?;
        node.wait_succeeded(&format!("to-{repo}"), 0, Duration::from_secs(90))
            .await?;
    }
    // One repository's cache, with what restic keeps there (its index and snapshot files).
    let caches: Vec<std::path::PathBuf> = std::fs::read_dir(node.dir.join("agent-state/cache"))
        .context("no cache directory")?
        .map(|e| Ok(e?.path()))
        .collect::<Result<_>>()?;
    assert_eq!(caches.len(), 1, "{caches:?}");
    let files = cached_metadata(&caches[0], false)?;
    assert!(
        files > 0,
        "no index or snapshot file cached in {}",
        caches[0].display()
    );
    Ok(())
}

/// The number of files below `dir` in directories named `index` or `snapshots` (restic's
/// cache layout: `<repository id>/{index,snapshots,data}`).
fn cached_metadata(dir: &std::path::Path, counted: bool) -> Result<usize> {
    let mut n = 0;
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or_default();
        n += match path.is_dir() {
            true => cached_metadata(&path, counted || name == "index" || name == "snapshots")?,
            false => usize::from(counted),
        };
    }
    Ok(n)
}

/// Sets the Ready condition of the node's agent pod, as its kubelet would.
async fn agent_ready(node: &Node, ready: bool) -> Result<()> {
    let status = json!({"status": {"conditions": [{"type": "Ready", "status": if ready { "True" } else { "False" }}]}});
    Api::<Pod>::namespaced(node.client.clone(), &node.ns)
        .patch_status(
            &format!("restic-agent-{}", node.name),
            &PatchParams::default(),
            &Patch::Merge(&status),
        )
        .await?;
    Ok(())
}

/// A run the coordinator gave up on (its agent did not answer for --agent-lost-timeout) is
/// cancelled on that agent once it answers again, so it cannot overlap the next run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_given_up_on_is_cancelled_on_its_agent_when_the_agent_answers_again() -> Result<()> {
    let mut node = Node::start_with("abandoned", &[], &["--agent-lost-timeout=3s".into()]).await?;
    let repo = ready_repository(&node, "main").await?;
    let (_, data) = node.app_pod("db-0", "db", "data").await?;
    std::fs::write(data.join("dump.sql"), pseudo_random(16 << 20, 11))?;
    // Retries allowed: a run that may still be going on its agent is never one of them.
    let retries = "  jobConfig: {backoffLimit: 2}\n";
    node.apply_yaml(&format!("{}{retries}", slow_backup("db")))
        .await?;
    node.trigger("db", "once").await?;
    let run_id = wait_dispatched(&node, "db").await?;

    // The coordinator restarts while the agent's pod is not Ready: it cannot reach the run and
    // gives it up...
    node.coordinators[0].kill();
    node.coordinators.clear();
    agent_ready(&node, false).await?;
    node.start_coordinator("coordinator-a").await?;
    let given_up = node.wait_finished("db", 0, Duration::from_secs(60)).await?;
    let last = given_up.status.unwrap().last_backup.unwrap();
    assert_eq!(
        last.result.map(|r| r.to_string()).as_deref(),
        Some("Failed"),
        "{last:?}"
    );
    assert!(
        last.message
            .as_deref()
            .unwrap_or_default()
            .contains("lost the run in flight"),
        "{last:?}"
    );
    assert!(
        events(&node, "BackupRetrying").await?.is_empty(),
        "a run that may still be going on was retried: {last:?}"
    );

    // ...and once the agent is back, the run still going there is cancelled.
    agent_ready(&node, true).await?;
    let agent = node.agent_client().await?;
    let result = eventually(
        "the run cancelled on the agent",
        Duration::from_secs(30),
        || async {
            let runs = support::runs(&agent).await?;
            Ok(runs
                .into_iter()
                .find(|r| r.run_id == run_id)
                .and_then(|r| r.result))
        },
    )
    .await?;
    assert_eq!(result.outcome, pb::Outcome::Cancelled as i32, "{result:?}");
    assert!(
        restic_snapshots(&repo)?.is_empty(),
        "the abandoned run made a snapshot"
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

    // History: eight days of this backup's snapshots (its host, its tag and its namespace's
    // tag), one of another host and one an old script made under the same host and tag (no
    // namespace tag); retention must touch neither of those two.
    let src = node.dir.join("history");
    std::fs::create_dir_all(&src)?;
    std::fs::write(src.join("f"), b"old")?;
    let ns_tag = format!("restic-operator/namespace={}", node.ns);
    let ours = format!("nightly,{ns_tag}");
    let backup_tagged = |host: &str, tags: &str, time: String| -> Result<String> {
        let out = repo
            .restic()?
            .args(["backup", "--json", "--host", host, "--tag", tags, "--time", &time])
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
    let backup_at = |host: &str, time: String| backup_tagged(host, &ours, time);
    let script = backup_tagged(
        "db",
        "nightly",
        (Utc::now() - chrono::Duration::days(20))
            .format("%Y-%m-%d %H:%M:%S")
            .to_string(),
    )?;
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
            &ours,
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
        .filter(|s| s["hostname"] == "db" && s["id"] != json!(script))
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
    assert!(
        all.iter().any(|s| s["id"].as_str() == Some(script.as_str())),
        "an old script's snapshot of the same host and tag is left to global retention"
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
    let runs = node.agent_runs().await?;
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

/// A namespace for apps outside the test's own (which holds the operator's Secrets), so a
/// test can see what the operator puts there.
async fn app_namespace(name: &str) -> Result<String> {
    let ns = unique_name(name);
    Api::<Namespace>::all(restic_operator_e2e::TestEnv::get().client().await?)
        .create(
            &PostParams::default(),
            &Namespace {
                metadata: ObjectMeta {
                    name: Some(ns.clone()),
                    ..Default::default()
                },
                ..Default::default()
            },
        )
        .await?;
    Ok(ns)
}

/// Lets namespace `ns` use repository `repo` of the test namespace.
async fn allow_namespace(node: &Node, repo: &str, ns: &str) -> Result<()> {
    node.repositories()
        .patch(
            repo,
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"allowedNamespaces": {"names": [ns]}}})),
        )
        .await?;
    Ok(())
}

/// A ResticBackup `name` in namespace `ns` (server-side apply).
async fn apply_backup_in(node: &Node, ns: &str, name: &str, spec: &str) -> Result<()> {
    let value: serde_json::Value = serde_yaml::from_str(&backup_yaml(name, spec))?;
    Api::<restic_operator_api::backup::ResticBackup>::namespaced(node.client.clone(), ns)
        .patch(
            name,
            &PatchParams::apply("e2e-test").force(),
            &Patch::Apply(&value),
        )
        .await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_claim_no_running_pod_mounts_is_backed_up_through_an_unprivileged_holder_pod_removed_afterwards()
-> Result<()> {
    let apps = app_namespace("holder-apps").await?;
    let node = Node::start_with("holder", &[&apps], &[]).await?;
    let repo = ready_repository(&node, "main").await?;
    allow_namespace(&node, "main", &apps).await?;
    let pv_name = format!("{}-pv", node.ns);
    bound_claim(&node, &apps, &pv_name).await?;
    apply_backup_in(
        &node,
        &apps,
        "archive",
        &format!(
            "  repositoryRef: {{name: main, namespace: {}}}\n  schedule: '@yearly'\n  source: {{pvc: {{claimName: data}}}}\n  \
             manualTrigger: go\n  jobConfig: {{nodeSelector: {{disk: ssd}}, securityContext: {{runAsUser: 0}}}}\n",
            node.ns
        ),
    )
    .await?;
    let backups: Api<restic_operator_api::backup::ResticBackup> = Api::namespaced(node.client.clone(), &apps);
    let pods: Api<Pod> = Api::namespaced(node.client.clone(), &apps);
    let secrets: Api<Secret> = Api::namespaced(node.client.clone(), &apps);

    // The holder: the pause image and the claim, nothing else.
    let holder = eventually("the holder pod", Duration::from_secs(30), || async {
        let list = ListParams::default().labels("app.kubernetes.io/component=holder");
        Ok(pods.list(&list).await?.items.into_iter().next())
    })
    .await
    .with_context(|| node.coordinator_log())?;
    let backup = backups.get("archive").await?;
    let run_id = backup
        .status
        .as_ref()
        .and_then(|s| s.active_run.as_ref())
        .map(|a| a.run_id.clone())
        .context("the run is in status")?;
    assert_eq!(
        holder.name_any(),
        restic_operator_coordinator::holder::holder_name("archive", &run_id)
    );
    let labels = holder.labels();
    assert_eq!(labels["backup.resticbackup.io/backup"], "archive");
    assert_eq!(labels["app.kubernetes.io/name"], "restic-operator");
    let owner = &holder.owner_references()[0];
    assert_eq!(
        (owner.kind.as_str(), Some(owner.uid.clone()), owner.controller),
        ("ResticBackup", backup.uid(), Some(true))
    );
    let spec = holder.spec.clone().unwrap();
    assert_eq!(spec.automount_service_account_token, Some(false));
    assert_eq!(spec.enable_service_links, Some(false));
    assert_eq!(spec.restart_policy.as_deref(), Some("Never"));
    assert_eq!(spec.node_selector.clone().unwrap()["disk"], "ssd");
    let psc = spec.security_context.clone().unwrap();
    assert_eq!(
        (psc.run_as_non_root, psc.run_as_user, psc.run_as_group),
        (Some(true), Some(65535), Some(65535)),
        "non-root, whatever jobConfig.securityContext asks of restic"
    );
    assert_eq!(psc.seccomp_profile.unwrap().type_, "RuntimeDefault");
    assert_eq!(spec.containers.len(), 1);
    let c = &spec.containers[0];
    assert_eq!(c.image.as_deref(), Some("registry.k8s.io/pause:3.10.1"));
    assert!(c.command.is_none() && c.args.is_none() && c.env.is_none() && c.env_from.is_none());
    assert!(c.ports.is_none());
    let sc = c.security_context.clone().unwrap();
    assert_eq!(sc.allow_privilege_escalation, Some(false));
    assert_eq!(sc.read_only_root_filesystem, Some(true));
    assert_eq!(sc.capabilities.unwrap().drop, Some(vec!["ALL".to_owned()]));
    assert!(c.resources.as_ref().and_then(|r| r.limits.as_ref()).is_some());
    let volumes = spec.volumes.clone().unwrap();
    assert_eq!(volumes.len(), 1, "the claim is the only volume: {volumes:?}");
    let claim = volumes[0].persistent_volume_claim.clone().unwrap();
    assert_eq!((claim.claim_name.as_str(), claim.read_only), ("data", Some(true)));
    assert!(
        secrets.list(&ListParams::default()).await?.items.is_empty(),
        "nothing secret in the app namespace"
    );

    // Play the scheduler and the kubelet: bind the holder to the node, mount the claim in its
    // pod directory, report it running.
    make_tree(&csi_mount(&node, &holder.uid().unwrap(), &pv_name))?;
    restic_operator_e2e::operator::bind(&node.client, &apps, &holder.name_any(), &node.name).await?;
    restic_operator_e2e::operator::mark_running(&node.client, &apps, &holder.name_any(), "10.1.0.11").await?;

    let last = node
        .wait_succeeded_in(&apps, "archive", 0, Duration::from_secs(60))
        .await?;
    let snapshots = restic_snapshots(&repo)?;
    assert_eq!(snapshots.len(), 1);
    assert_eq!(snapshots[0]["paths"], json!(["/data"]));
    assert_eq!(snapshots[0]["hostname"], json!(backup.effective_hostname()));
    assert_eq!(last.snapshot_id.as_deref(), snapshots[0]["id"].as_str());
    // A bound pod is gone once its kubelet confirms; deletion requested is what the
    // coordinator does. Then play the kubelet's part.
    eventually("the holder pod deleted", Duration::from_secs(30), || async {
        let p = pods.get_opt(&holder.name_any()).await?;
        Ok(p.is_none_or(|p| p.metadata.deletion_timestamp.is_some())
            .then_some(()))
    })
    .await
    .with_context(|| node.coordinator_log())?;
    let _ = pods
        .delete(
            &holder.name_any(),
            &kube::api::DeleteParams {
                grace_period_seconds: Some(0),
                ..Default::default()
            },
        )
        .await;
    assert!(secrets.list(&ListParams::default()).await?.items.is_empty());

    // Once a running pod mounts the claim, the next run goes to its node's agent, which
    // reads the claim's CSI directory (named after the PV), and no holder is started.
    let pod: Pod = serde_json::from_value(json!({
        "metadata": {"name": "archiver-0", "labels": {"app": "archiver"}},
        "spec": {"nodeName": node.name, "containers": [{"name": "app", "image": "busybox"}],
                 "volumes": [{"name": "archive", "persistentVolumeClaim": {"claimName": "data"}}]}
    }))?;
    let uid =
        restic_operator_e2e::operator::create_running_pod(&node.client, &apps, pod, "10.1.0.10").await?;
    let csi = csi_mount(&node, &uid, &pv_name);
    make_tree(&csi)?;
    std::fs::write(csi.join("added-later"), b"new")?;
    backups
        .patch(
            "archive",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"manualTrigger": "again"}})),
        )
        .await?;
    let last = node
        .wait_succeeded_in(&apps, "archive", 1, Duration::from_secs(60))
        .await?;
    assert_eq!(
        last.files_new,
        Some(1),
        "incremental over the holder run's snapshot: only the new file"
    );
    assert!(
        pods.list(&ListParams::default().labels("app.kubernetes.io/component=holder"))
            .await?
            .items
            .is_empty(),
        "no holder this time"
    );
    assert_eq!(restic_snapshots(&repo)?.len(), 2);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pod_a_user_created_under_the_holder_name_is_neither_used_nor_deleted() -> Result<()> {
    let node = Node::start_with("holder-conflict", &[], &["--holder-start-timeout=5s".into()]).await?;
    let repo = ready_repository(&node, "main").await?;
    let pv_name = format!("{}-pv", node.ns);
    bound_claim(&node, &node.ns, &pv_name).await?;
    node.apply_yaml(&backup_yaml(
        "archive",
        "  repositoryRef: {name: main}\n  schedule: '@yearly'\n  source: {pvc: {claimName: data}}\n",
    ))
    .await?;

    // The name the holder of trigger "go" will have: the run id is the backup's UID, the
    // trigger and the generation that sets it (the next one).
    let backup = node.backups().get("archive").await?;
    let generation = backup.metadata.generation.unwrap_or(0) + 1;
    let run_id = restic_operator_coordinator::backup::manual_run_id(&backup.uid().unwrap(), "go", generation);
    let name = restic_operator_coordinator::holder::holder_name("archive", &run_id);

    // A user's pod under that name, as tempting as it gets: a holder's labels (so it is no
    // backup source either), the pause image, the claim as `data`, running on the node with
    // readable data; only not created by the operator.
    let pod: Pod = serde_json::from_value(json!({
        "metadata": {"name": name, "labels": {"app.kubernetes.io/name": "restic-operator",
            "app.kubernetes.io/component": "holder", "backup.resticbackup.io/backup": "archive"}},
        "spec": {"nodeName": node.name, "containers": [{"name": "holder", "image": "registry.k8s.io/pause:3.10.1"}],
                 "volumes": [{"name": "data", "persistentVolumeClaim": {"claimName": "data", "readOnly": true}}]}
    }))?;
    let pod_uid = node.create_running_pod(pod, "10.1.0.12").await?;
    make_tree(&csi_mount(&node, &pod_uid, &pv_name))?;

    node.trigger("archive", "go").await?;
    let done = node.wait_finished("archive", 0, Duration::from_secs(60)).await?;
    let status = done.status.clone().unwrap();
    let last = status.last_backup.clone().unwrap();
    assert_eq!(last.run_id.as_deref(), Some(run_id.as_str()));
    assert_eq!(last.result.map(|r| r.to_string()).as_deref(), Some("Failed"));
    let message = last.message.clone().unwrap_or_default();
    assert!(
        message.contains(&name) && message.contains("not created by the operator"),
        "{message}"
    );
    let ready = status.conditions.iter().find(|c| c.type_ == "Ready").unwrap();
    assert_eq!(ready.reason.as_deref(), Some("HolderPodConflict"), "{ready:?}");
    let event = wait_event(&node, "HolderPodConflict").await?;
    assert_eq!(event.type_.as_deref(), Some("Warning"));
    assert!(event.note.unwrap_or_default().contains(&name));

    let pods: Api<Pod> = Api::namespaced(node.client.clone(), &node.ns);
    let still = pods.get(&name).await?;
    assert_eq!(
        still.uid().as_deref(),
        Some(pod_uid.as_str()),
        "the user's pod is still there"
    );
    assert!(
        still.metadata.deletion_timestamp.is_none(),
        "and not being deleted"
    );
    assert!(
        restic_snapshots(&repo)?.is_empty(),
        "nothing was backed up from it"
    );
    let runs = node.agent_runs().await?;
    assert!(
        runs.iter().all(|r| r.kind != pb::RunKind::Backup as i32),
        "nothing was sent to the agent: {runs:?}"
    );

    // A holder that does not run in time (nothing binds it here) fails its run and goes.
    node.trigger("archive", "again").await?;
    let holder = eventually("the holder of the next run", Duration::from_secs(30), || async {
        Ok(node
            .pods("app.kubernetes.io/component=holder")
            .await?
            .into_iter()
            .find(|p| p.name_any() != name))
    })
    .await?;
    assert_ne!(holder.name_any(), name);
    let done = node.wait_finished("archive", 1, Duration::from_secs(60)).await?;
    let status = done.status.unwrap();
    let message = status.last_backup.unwrap().message.unwrap_or_default();
    assert!(message.contains("was not running within 5s"), "{message}");
    let ready = status.conditions.iter().find(|c| c.type_ == "Ready").unwrap();
    assert_eq!(ready.reason.as_deref(), Some("HolderNotStarted"));
    eventually("the holder deleted", Duration::from_secs(30), || async {
        Ok(pods.get_opt(&holder.name_any()).await?.is_none().then_some(()))
    })
    .await?;
    assert_eq!(pods.get(&name).await?.uid().as_deref(), Some(pod_uid.as_str()));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_repository_switched_right_after_a_trigger_never_gets_a_backup_from_a_namespace_it_refuses()
-> Result<()> {
    let apps = app_namespace("switch-apps").await?;
    let node = Node::start_with("repo-switch", &[&apps], &[]).await?;
    let open = ready_repository(&node, "open").await?;
    let closed = ready_repository(&node, "closed").await?;
    allow_namespace(&node, "open", &apps).await?;
    let uid = restic_operator_e2e::operator::app_pod(&node.client, &apps, &node.name, "app-0", "app", "data")
        .await?;
    std::fs::write(node.agent().empty_dir(&uid, "data")?.join("file"), b"data")?;
    apply_backup_in(
        &node,
        &apps,
        "app",
        &format!(
            "  repositoryRef: {{name: open, namespace: {}}}\n  schedule: '@yearly'\n  \
             source: {{podVolumeBackup: {{selector: {{matchLabels: {{app: app}}}}, volumeName: data}}}}\n",
            node.ns
        ),
    )
    .await?;
    let backups: Api<restic_operator_api::backup::ResticBackup> = Api::namespaced(node.client.clone(), &apps);
    let set_repository = |repo: &'static str| {
        let backups = backups.clone();
        let ns = node.ns.clone();
        async move {
            backups
                .patch(
                    "app",
                    &PatchParams::default(),
                    &Patch::Merge(json!({"spec": {"repositoryRef": {"name": repo, "namespace": ns}}})),
                )
                .await
        }
    };
    // The open repository is usable (the reconcile has seen the current spec).
    let accessible = || async {
        let b = backups.get("app").await?;
        let status = b.status.clone().unwrap_or_default();
        let ok = status.observed_generation == b.metadata.generation
            && status
                .conditions
                .iter()
                .any(|c| c.type_ == "RepositoryReady" && c.reason.as_deref() == Some("RepositoryAccessible"));
        Ok(ok.then_some(b))
    };
    let backup = eventually(
        "the open repository accessible",
        Duration::from_secs(30),
        accessible,
    )
    .await
    .with_context(|| node.coordinator_log())?;
    let backup_uid = backup.uid().unwrap();

    let (mut succeeded, mut refused_in_run, mut refused_at_start) = (0, 0, 0);
    // Mostly at once; the last two switch a little later, around and after the dispatch.
    for (i, delay) in [0, 0, 0, 100, 1500].into_iter().enumerate() {
        let trigger = format!("switch-{i}");
        // The ids of this trigger's run, whatever generation it gets.
        let prefix = format!(
            "rb-{backup_uid}-m{:08x}-",
            restic_operator_coordinator::holder::fnv(&trigger)
        );
        backups
            .patch(
                "app",
                &PatchParams::default(),
                &Patch::Merge(json!({"spec": {"manualTrigger": trigger}})),
            )
            .await?;
        tokio::time::sleep(Duration::from_millis(delay)).await;
        set_repository("closed").await?;
        let handled = eventually(
            &format!("trigger {trigger} handled"),
            Duration::from_secs(60),
            || async {
                let b = backups.get("app").await?;
                let s = b.status.clone().unwrap_or_default();
                Ok(
                    (s.last_manual_trigger.as_deref() == Some(trigger.as_str()) && s.active_run.is_none())
                        .then_some(s),
                )
            },
        )
        .await
        .with_context(|| node.coordinator_log())?;
        let last = handled
            .last_backup
            .filter(|l| l.run_id.as_deref().is_some_and(|id| id.starts_with(&prefix)));
        match last {
            Some(last) if last.result.map(|r| r.to_string()).as_deref() == Some("Succeeded") => {
                succeeded += 1
            }
            other => {
                if let Some(last) = other {
                    let message = last.message.unwrap_or_default();
                    assert!(
                        message.starts_with("refused: ") && message.contains("does not allow namespace"),
                        "run {:?} neither succeeded nor was refused: {message}",
                        last.run_id
                    );
                    refused_in_run += 1;
                } else {
                    refused_at_start += 1;
                }
                let condition = handled
                    .conditions
                    .iter()
                    .find(|c| c.type_ == "RepositoryReady")
                    .and_then(|c| c.reason.clone());
                assert_eq!(condition.as_deref(), Some("NamespaceNotAllowed"));
                // The recorder folds repeats of an event into one series, so only the first
                // refusal's note names its run.
                eventually(
                    "the NamespaceNotAllowed event",
                    Duration::from_secs(30),
                    || async {
                        let all = Api::<Event>::namespaced(node.client.clone(), &apps)
                            .list(&ListParams::default())
                            .await?
                            .items;
                        Ok(all.into_iter().find(|e| {
                            e.reason.as_deref() == Some("NamespaceNotAllowed")
                                && e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some("app")
                                && e.note.as_deref().is_some_and(|n| n.contains("refused"))
                        }))
                    },
                )
                .await?;
            }
        }
        set_repository("open").await?;
        eventually(
            "the open repository accessible again",
            Duration::from_secs(30),
            accessible,
        )
        .await?;
    }
    eprintln!(
        "5 switched triggers: {succeeded} backed up into the allowed repository, {refused_in_run} refused by \
         the run, {refused_at_start} refused before a run was recorded"
    );
    assert!(
        restic_snapshots(&closed)?.is_empty(),
        "the repository that does not allow the namespace never got a snapshot"
    );
    assert_eq!(restic_snapshots(&open)?.len(), succeeded);
    let runs = node.agent_runs().await?;
    let backups_sent = runs
        .iter()
        .filter(|r| r.kind == pb::RunKind::Backup as i32)
        .count();
    assert_eq!(
        backups_sent, succeeded,
        "only the allowed runs reached the agent: {runs:?}"
    );
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
    // The kubelet updates the agent's files; the agent serves the renewed certificate without
    // a restart. The coordinator's own client certificate was renewed too, from the same CA.
    let agent = node.agent();
    agent.refresh_tls(&node.client, &node.ns).await?;
    let agent_log = || std::fs::read_to_string(agent.process.log.clone()).unwrap_or_default();
    eventually(
        "the agent reloading its certificate",
        Duration::from_secs(10),
        || async { Ok(agent_log().contains("reloaded the TLS certificate").then_some(())) },
    )
    .await?;
    assert!(
        !agent_log().contains("closing connections"),
        "the CA stayed, so no connection is closed:\n{}",
        agent_log()
    );
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

/// Whether the API server lets the coordinator's ServiceAccount of `node` do `verb` on
/// `resource` (`resource[.group][/subresource]`), asked with a SubjectAccessReview.
async fn coordinator_may(
    node: &Node,
    verb: &str,
    resource: &str,
    namespace: &str,
    name: &str,
) -> Result<bool> {
    use k8s_openapi::api::authorization::v1::SubjectAccessReview;
    let (resource, subresource) = resource.split_once('/').unwrap_or((resource, ""));
    let (resource, group) = resource.split_once('.').unwrap_or((resource, ""));
    let review: SubjectAccessReview = serde_json::from_value(json!({
        "spec": {
            "user": format!("system:serviceaccount:{}:{}", node.ns, support::COORDINATOR_SERVICE_ACCOUNT),
            "groups": ["system:serviceaccounts", format!("system:serviceaccounts:{}", node.ns), "system:authenticated"],
            "resourceAttributes": {
                "verb": verb, "group": group, "resource": resource, "subresource": subresource,
                "namespace": namespace, "name": name
            }
        }
    }))?;
    let answer = Api::<SubjectAccessReview>::all(node.client.clone())
        .create(&PostParams::default(), &review)
        .await?;
    Ok(answer.status.is_some_and(|s| s.allowed))
}

/// Grants or withdraws the coordinator's permission to write ResticBackup status (its
/// ClusterRole of `Node::start_as`).
async fn backup_status_writable(node: &Node, writable: bool) -> Result<()> {
    use k8s_openapi::api::rbac::v1::ClusterRole;
    let roles: Api<ClusterRole> = Api::all(node.client.clone());
    let name = format!("{}-coordinator", node.ns);
    let mut role = roles.get(&name).await?;
    for rule in role.rules.iter_mut().flatten() {
        let resources = rule.resources.get_or_insert_with(Vec::new);
        if resources.iter().any(|r| r == "resticrepositories/status") {
            resources.retain(|r| r != "resticbackups/status");
            if writable {
                resources.push("resticbackups/status".into());
            }
        }
    }
    roles.replace(&name, &PostParams::default(), &role).await?;
    Ok(())
}

/// The coordinator's RBAC as the chart ships it.
fn shipped_rbac() -> support::CoordinatorRbac<'static> {
    support::CoordinatorRbac {
        cluster_role: include_str!("../rbac/clusterrole.yaml"),
        role: include_str!("../rbac/role.yaml"),
    }
}

/// A run whose final status cannot be written is finished again by the next reconcile; its
/// post-backup hook runs once, not on every attempt. (The exec hook fails here, as pods of
/// this tier have no kubelet: each run of it is a HookFailed event, counted by its series.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_whose_status_cannot_be_written_runs_its_post_hook_once() -> Result<()> {
    let rbac = shipped_rbac();
    let flags = ["--status-write-attempts=2".to_string()];
    let node = Node::start_as("hook-once", &[], &flags, Some(rbac)).await?;
    ready_repository(&node, "main").await?;
    let (_, data) = node.app_pod("db-0", "db", "data").await?;
    std::fs::write(data.join("dump.sql"), pseudo_random(3 << 20, 13))?;
    let hook = "  hooks: {postBackup: {exec: {podSelector: {matchLabels: {app: db}}, container: app, \
                command: [sh, -c, 'true'], timeout: 10s}}}\n  manualTrigger: go\n";
    node.apply_yaml(&format!("{}{hook}", slow_backup("db"))).await?;
    wait_dispatched(&node, "db").await?;
    // The status cannot be written from now on: the run is finished, and finished again.
    backup_status_writable(&node, false).await?;
    eventually("the run finished twice", Duration::from_secs(90), || async {
        let log = node.coordinators[0].log();
        let finished = log
            .matches("could not write the final status; the run is re-attached")
            .count();
        Ok((finished >= 2).then_some(()))
    })
    .await?;
    let runs: i32 = events(&node, "HookFailed")
        .await?
        .iter()
        .map(|e| e.series.as_ref().map_or(1, |s| s.count))
        .sum();
    assert_eq!(runs, 1, "the post hook ran {runs} times");

    // Writable again: the run's result is recorded.
    backup_status_writable(&node, true).await?;
    let done = node.wait_finished("db", 0, Duration::from_secs(60)).await?;
    let last = done.status.unwrap().last_backup.unwrap();
    assert_eq!(
        last.result.map(|r| r.to_string()).as_deref(),
        Some("Succeeded"),
        "{last:?}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_coordinator_works_with_only_its_cluster_role() -> Result<()> {
    let rbac = shipped_rbac();
    // The operator's namespace (which also holds an app) and a second app namespace.
    let apps = app_namespace("rbac-apps").await?;
    let node = Node::start_as("rbac", &[&apps], &[], Some(rbac)).await?;
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

    // A claim no running pod mounts, in the other namespace: a holder pod there.
    allow_namespace(&node, "main", &apps).await?;
    let pv_name = format!("{}-pv", node.ns);
    bound_claim(&node, &apps, &pv_name).await?;
    apply_backup_in(
        &node,
        &apps,
        "archive",
        &format!(
            "  repositoryRef: {{name: main, namespace: {}}}\n  schedule: '@yearly'\n  \
             source: {{pvc: {{claimName: data}}}}\n  manualTrigger: go\n",
            node.ns
        ),
    )
    .await?;
    let pods: Api<Pod> = Api::namespaced(node.client.clone(), &apps);
    let holder = eventually("the holder pod", Duration::from_secs(30), || async {
        let list = ListParams::default().labels("app.kubernetes.io/component=holder");
        Ok(pods.list(&list).await?.items.into_iter().next())
    })
    .await
    .with_context(|| node.coordinator_log())?;
    make_tree(&csi_mount(&node, &holder.uid().unwrap(), &pv_name))?;
    restic_operator_e2e::operator::bind(&node.client, &apps, &holder.name_any(), &node.name).await?;
    restic_operator_e2e::operator::mark_running(&node.client, &apps, &holder.name_any(), "10.1.0.11").await?;
    node.wait_succeeded_in(&apps, "archive", 0, Duration::from_secs(60))
        .await?;
    eventually("the holder pod deleted", Duration::from_secs(30), || async {
        let p = pods.get_opt(&holder.name_any()).await?;
        Ok(p.is_none_or(|p| p.metadata.deletion_timestamp.is_some())
            .then_some(()))
    })
    .await
    .with_context(|| node.coordinator_log())?;
    assert_eq!(restic_snapshots(&repo)?.len(), 2);

    // An exec hook passes authorization (without a kubelet, the API server then cannot reach
    // the container, so the hook itself fails).
    node.apply_yaml(&backup_yaml(
        "exec",
        "  repositoryRef: {name: main}\n  schedule: '@yearly'\n  \
         source: {podVolumeBackup: {selector: {matchLabels: {app: db}}, volumeName: data}}\n  \
         hooks: {preBackup: {exec: {podSelector: {matchLabels: {app: db}}, command: [sync], timeout: 20s}}}\n  \
         manualTrigger: go\n",
    ))
    .await?;
    let done = node.wait_finished("exec", 0, Duration::from_secs(60)).await?;
    let message = done
        .status
        .unwrap()
        .last_backup
        .unwrap()
        .message
        .unwrap_or_default();
    assert!(message.contains("preBackup hook failed"), "{message}");
    assert!(!message.to_lowercase().contains("forbidden"), "{message}");

    let log = node.coordinators[0].log();
    assert!(
        !log.to_lowercase().contains("forbidden"),
        "a request was forbidden:\n{log}"
    );

    // And no more than that: what the roles leave out, asked of the API server.
    let (own, other) = (node.ns.as_str(), apps.as_str());
    for (verb, resource, ns, name, allowed) in [
        // Repository credentials are read by name, never discovered.
        ("get", "secrets", other, "creds", true),
        ("list", "secrets", other, "", false),
        ("watch", "secrets", own, "", false),
        // Secrets are written only in its own namespace, and only its two.
        ("create", "secrets", own, "", true),
        ("create", "secrets", other, "", false),
        ("update", "secrets", own, "restic-operator-agent-tls", true),
        ("update", "secrets", own, "someone-elses", false),
        ("update", "secrets", other, "restic-operator-agent-tls", false),
        ("delete", "secrets", own, "restic-operator-ca", false),
        // Its Lease only, in its namespace.
        (
            "update",
            "leases.coordination.k8s.io",
            own,
            "restic-operator-coordinator",
            true,
        ),
        (
            "update",
            "leases.coordination.k8s.io",
            other,
            "kube-controller-manager",
            false,
        ),
        // Holders and hooks in watched namespaces, but pods are never modified in place.
        ("create", "pods", other, "", true),
        ("update", "pods", other, "app", false),
        ("create", "pods/exec", other, "app", true),
        ("create", "pods/ephemeralcontainers", other, "app", false),
        ("watch", "pods", other, "", false),
        // Status only; specs are the users'.
        (
            "patch",
            "resticbackups.backup.resticbackup.io/status",
            other,
            "db",
            true,
        ),
        (
            "patch",
            "resticbackups.backup.resticbackup.io",
            other,
            "db",
            false,
        ),
        (
            "create",
            "resticrepositories.backup.resticbackup.io",
            own,
            "",
            false,
        ),
        ("delete", "jobs.batch", other, "hook", false),
        (
            "create",
            "clusterrolebindings.rbac.authorization.k8s.io",
            "",
            "",
            false,
        ),
    ] {
        let may = coordinator_may(&node, verb, resource, ns, name).await?;
        assert_eq!(
            may, allowed,
            "{verb} {resource} {ns}/{name}: allowed is {may}, expected {allowed}"
        );
    }
    Ok(())
}

// ---- Tenants against each other: snapshot identity and secrets ----

/// Two app namespaces allowed to use repository `shared` of the test namespace, each with a
/// pod `db-0` whose volume names its owner.
async fn two_teams(test: &str) -> Result<(Node, restic_operator_e2e::ResticRepo, [String; 2])> {
    let teams = [app_namespace("team-a").await?, app_namespace("team-b").await?];
    let node = Node::start_with(test, &[&teams[0], &teams[1]], &[]).await?;
    let repo = ready_repository(&node, "shared").await?;
    node.repositories()
        .patch(
            "shared",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"allowedNamespaces": {"names": teams}}})),
        )
        .await?;
    for ns in &teams {
        let uid = restic_operator_e2e::operator::app_pod(&node.client, ns, &node.name, "db-0", "db", "data")
            .await?;
        let dir = node.agent().empty_dir(&uid, "data")?;
        std::fs::write(dir.join("owner"), ns.as_bytes())?;
    }
    Ok((node, repo, teams))
}

fn team_backup(node: &Node, trigger: &str, extra: &str) -> String {
    format!(
        "  repositoryRef: {{name: shared, namespace: {}}}\n  schedule: '@yearly'\n  \
         source: {{podVolumeBackup: {{selector: {{matchLabels: {{app: db}}}}, volumeName: data}}}}\n  \
         retention: {{enabled: true, policy: {{keepLast: 1}}}}\n  manualTrigger: '{trigger}'\n{extra}",
        node.ns
    )
}

fn snapshots_by_host(
    repo: &restic_operator_e2e::ResticRepo,
) -> Result<std::collections::BTreeMap<String, usize>> {
    let mut hosts = std::collections::BTreeMap::new();
    for s in restic_snapshots(repo)? {
        *hosts
            .entry(s["hostname"].as_str().unwrap_or_default().to_owned())
            .or_insert(0) += 1;
    }
    Ok(hosts)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn same_named_backups_of_two_namespaces_in_one_repository_never_thin_each_others_snapshots()
-> Result<()> {
    let (node, repo, [a, b]) = two_teams("two-teams").await?;
    apply_backup_in(&node, &a, "db", &team_backup(&node, "1", "")).await?;
    node.wait_succeeded_in(&a, "db", 0, Duration::from_secs(60))
        .await?;
    apply_backup_in(&node, &b, "db", &team_backup(&node, "1", "")).await?;
    node.wait_succeeded_in(&b, "db", 0, Duration::from_secs(60))
        .await?;
    // Team b runs again; its keepLast 1 retention must leave team a's snapshot alone.
    apply_backup_in(&node, &b, "db", &team_backup(&node, "2", "")).await?;
    node.wait_succeeded_in(&b, "db", 1, Duration::from_secs(60))
        .await?;
    let hosts = snapshots_by_host(&repo)?;
    assert_eq!(
        hosts,
        [(format!("db.{a}"), 1), (format!("db.{b}"), 1)]
            .into_iter()
            .collect(),
        "one snapshot per namespace, each under its own hostname"
    );

    // Team b copies team a's hostname, hoping its retention thins team a's snapshots and its
    // snapshots become team a's parents. The namespace tag keeps them apart.
    let a_first = restic_snapshots(&repo)?
        .into_iter()
        .find(|s| s["hostname"] == format!("db.{a}"))
        .and_then(|s| s["id"].as_str().map(str::to_owned))
        .unwrap();
    apply_backup_in(
        &node,
        &b,
        "thief",
        &team_backup(&node, "go", &format!("  restic: {{hostname: db.{a}}}\n")),
    )
    .await?;
    let thief = node
        .wait_succeeded_in(&b, "thief", 0, Duration::from_secs(60))
        .await?;
    let thief_snapshot = restic_snapshots(&repo)?
        .into_iter()
        .find(|s| Some(s["id"].as_str().unwrap_or_default()) == thief.snapshot_id.as_deref())
        .unwrap();
    assert_eq!(
        (thief.parent_snapshot_id, &thief_snapshot["parent"]),
        (None, &serde_json::Value::Null),
        "team a's snapshot is not team b's parent"
    );
    let ids: Vec<String> = restic_snapshots(&repo)?
        .iter()
        .filter_map(|s| s["id"].as_str().map(str::to_owned))
        .collect();
    assert!(
        ids.contains(&a_first),
        "team b's retention left team a's snapshot"
    );
    // Team a's next run takes its own snapshot as parent, not team b's newer one, and its
    // retention removes its own old snapshot only.
    apply_backup_in(&node, &a, "db", &team_backup(&node, "2", "")).await?;
    let second = node
        .wait_succeeded_in(&a, "db", 1, Duration::from_secs(60))
        .await?;
    assert_eq!(second.parent_snapshot_id.as_deref(), Some(a_first.as_str()));
    let by_namespace = |ns: &str| -> Result<usize> {
        let tag = format!("restic-operator/namespace={ns}");
        Ok(restic_snapshots(&repo)?
            .iter()
            .filter(|s| {
                s["tags"]
                    .as_array()
                    .is_some_and(|t| t.iter().any(|t| t == &json!(tag)))
            })
            .count())
    };
    assert_eq!(by_namespace(&a)?, 1, "team a keeps one (keepLast 1)");
    assert_eq!(
        by_namespace(&b)?,
        2,
        "team b keeps one per hostname: db.{b} and its copy of db.{a}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_repository_password_appears_nowhere_but_in_its_secret() -> Result<()> {
    let apps = app_namespace("canary-apps").await?;
    let node = Node::start_with("canary", &[&apps], &[]).await?;
    let mut repo = node.ctx.repository("vault");
    let canary = format!("canary-{}", unique_name("pw"));
    repo.password = canary.clone();
    node.repository("vault", &repo).await?;
    node.wait_repository_reason("vault", "RepositoryInitialized", Duration::from_secs(60))
        .await?;
    allow_namespace(&node, "vault", &apps).await?;
    let uid = restic_operator_e2e::operator::app_pod(&node.client, &apps, &node.name, "app-0", "app", "data")
        .await?;
    let data = node.agent().empty_dir(&uid, "data")?;
    make_tree(&data)?;
    for i in 0..6 {
        std::fs::write(data.join(format!("blob-{i}")), pseudo_random(4 << 20, 70 + i))?;
    }
    apply_backup_in(
        &node,
        &apps,
        "app",
        &format!(
            "  repositoryRef: {{name: vault, namespace: {}}}\n  schedule: '@yearly'\n  \
             source: {{podVolumeBackup: {{selector: {{matchLabels: {{app: app}}}}, volumeName: data}}}}\n  \
             restic: {{extraArgs: ['--limit-upload=4096']}}\n  manualTrigger: go\n",
            node.ns
        ),
    )
    .await?;

    // While the run is in flight: no process's command line carries the password.
    let mut scans = 0;
    let mut seen_in_cmdline = Vec::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        for entry in std::fs::read_dir("/proc")?.flatten() {
            if let Ok(cmdline) = std::fs::read(entry.path().join("cmdline"))
                && String::from_utf8_lossy(&cmdline).contains(&canary)
            {
                seen_in_cmdline.push(String::from_utf8_lossy(&cmdline).replace('\0', " "));
            }
        }
        scans += 1;
        let b = Api::<restic_operator_api::backup::ResticBackup>::namespaced(node.client.clone(), &apps)
            .get("app")
            .await?;
        let done = b
            .status
            .as_ref()
            .is_some_and(|s| s.active_run.is_none() && s.last_backup.is_some());
        if done || std::time::Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    node.wait_succeeded_in(&apps, "app", 0, Duration::from_secs(60))
        .await?;
    assert!(scans > 5, "the run was watched while in flight ({scans} scans)");
    assert!(
        seen_in_cmdline.is_empty(),
        "in command lines: {seen_in_cmdline:?}"
    );

    let mut places: Vec<(String, String)> = vec![
        ("the coordinator's log".into(), node.coordinators[0].log()),
        (
            "the agent's log".into(),
            std::fs::read_to_string(&node.agent().process.log).unwrap_or_default(),
        ),
        (
            "the coordinator's metrics".into(),
            node.coordinators[0].metrics()?,
        ),
    ];
    let events = Api::<Event>::all(node.client.clone())
        .list(&ListParams::default())
        .await?;
    places.push(("events".into(), serde_json::to_string(&events.items)?));
    // Everything in the app namespace a tenant can read, the backup's status included.
    let dynamic = |kind: &str| {
        Api::<kube::core::DynamicObject>::namespaced_with(
            node.client.clone(),
            &apps,
            &kube::core::ApiResource::from_gvk(&kube::core::GroupVersionKind::gvk(
                if kind.starts_with("Restic") {
                    "backup.resticbackup.io"
                } else {
                    ""
                },
                if kind.starts_with("Restic") {
                    "v1alpha1"
                } else {
                    "v1"
                },
                kind,
            )),
        )
    };
    for kind in ["Pod", "Secret", "ConfigMap", "ResticBackup"] {
        let list = dynamic(kind).list(&ListParams::default()).await?;
        places.push((format!("{kind}s in {apps}"), serde_json::to_string(&list.items)?));
    }
    for (place, text) in &places {
        assert!(!text.is_empty() || place.contains("metrics"), "{place} was read");
        assert!(!text.contains(&canary), "the password is in {place}");
    }
    // The check can fail: the password is where it belongs.
    let secret = Api::<Secret>::namespaced(node.client.clone(), &node.ns)
        .get("vault-creds")
        .await?;
    assert_eq!(secret.data.unwrap()["RESTIC_PASSWORD"].0, canary.as_bytes());
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_secret_written_for_the_old_scripts_still_makes_the_repository_ready() -> Result<()> {
    let node = Node::start("old-secret").await?;
    let repo = node.ctx.repository("legacy");
    // As the seeds' Secret: the repository URL in RESTIC_REPOSITORY, and settings of the old
    // scripts the agent has no use for.
    let mut data = serde_json::Map::new();
    data.insert("RESTIC_PASSWORD".into(), json!(repo.password));
    data.insert("RESTIC_REPOSITORY".into(), json!(repo.url));
    data.insert("RESTIC_HOSTNAME".into(), json!("emby"));
    data.insert("RESTIC_BACKUP_COMMAND".into(), json!("restic backup /config"));
    for (k, v) in repo.s3.env() {
        data.insert(k, json!(v));
    }
    node.apply_secret("legacy-creds", data).await?;
    node.apply_yaml(&format!(
        "apiVersion: backup.resticbackup.io/v1alpha1\nkind: ResticRepository\nmetadata: {{name: legacy}}\n\
         spec: {{repositoryURL: '{}', credentialsSecretRef: {{name: legacy-creds}}}}",
        repo.url
    ))
    .await?;
    node.wait_repository_reason("legacy", "RepositoryInitialized", Duration::from_secs(60))
        .await?;
    let event = wait_event(&node, "SecretKeysIgnored").await?;
    let note = event.note.unwrap_or_default();
    assert!(
        note.contains("RESTIC_BACKUP_COMMAND, RESTIC_HOSTNAME") && !note.contains("RESTIC_REPOSITORY"),
        "{note}"
    );
    assert_eq!(event.type_.as_deref(), Some("Warning"));

    // A RESTIC_REPOSITORY naming another repository is a clear condition, not a guess.
    let mut other = serde_json::Map::new();
    other.insert("RESTIC_PASSWORD".into(), json!(repo.password));
    other.insert("RESTIC_REPOSITORY".into(), json!("s3:elsewhere/bucket"));
    node.apply_secret("mismatch-creds", other).await?;
    node.apply_yaml(&format!(
        "apiVersion: backup.resticbackup.io/v1alpha1\nkind: ResticRepository\nmetadata: {{name: mismatch}}\n\
         spec: {{repositoryURL: '{}', credentialsSecretRef: {{name: mismatch-creds}}}}",
        repo.url
    ))
    .await?;
    node.wait_repository_reason("mismatch", "InvalidSpec", Duration::from_secs(30))
        .await?;
    Ok(())
}

/// The ids of the snapshots `restic forget --dry-run` with `args` would remove.
fn predicted_removals(repo: &restic_operator_e2e::ResticRepo, args: &[&str]) -> Result<Vec<String>> {
    let out = repo
        .restic()?
        .args(["forget", "--dry-run", "--json", "--no-lock"])
        .args(args)
        .output()?;
    ensure!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let groups: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout)?;
    Ok(groups
        .iter()
        .flat_map(|g| g["remove"].as_array().cloned().unwrap_or_default())
        .filter_map(|s| s["id"].as_str().map(String::from))
        .collect())
}

/// A GlobalRetentionPolicy removes exactly what `restic forget --dry-run` with the same
/// arguments predicts, policy by policy, prunes once, and leaves the snapshots no selector
/// matches untouched; its status and event say what it did.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_global_retention_policy_removes_what_restic_forget_predicts_and_nothing_else() -> Result<()> {
    let node = Node::start("grp").await?;
    let repo = ready_repository(&node, "main").await?;
    let src = tempfile::tempdir()?;
    for (tag, host) in [
        ("app=a", "db"),
        ("app=b", "web"),
        ("app=b", "db"),
        ("other", "db"),
    ] {
        for day in 1..=5 {
            std::fs::write(src.path().join("f"), pseudo_random(4 << 10, day))?;
            let time = format!("2026-11-{day:02} 02:00:00");
            let out = repo
                .restic()?
                .current_dir(src.path())
                .args(["backup", ".", "--host", host, "--tag", tag, "--time", &time])
                .output()?;
            ensure!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        }
    }
    let before: Vec<String> = restic_snapshots(&repo)?
        .iter()
        .filter_map(|s| s["id"].as_str().map(String::from))
        .collect();
    let mut expected = predicted_removals(&repo, &["--tag", "app=a", "--group-by", "", "--keep-last", "2"])?;
    expected.extend(predicted_removals(
        &repo,
        &[
            "--tag",
            "app=b",
            "--host",
            "web",
            "--group-by",
            "",
            "--keep-daily",
            "3",
        ],
    )?);
    ensure!(
        expected.len() == 5,
        "3 of app=a and 2 of app=b on web: {expected:?}"
    );

    node.apply_yaml(
        "apiVersion: backup.resticbackup.io/v1alpha1\nkind: GlobalRetentionPolicy\nmetadata: {name: weekly}\n\
         spec:\n  repositoryRef: {name: main}\n  schedule: '@yearly'\n  groupBy: []\n  prune: true\n  \
         manualTrigger: go\n  policies:\n  \
         - {selector: {tags: [app=a]}, retention: {keepLast: 2}}\n  \
         - {selector: {tags: [app=b], hostname: web}, retention: {keepDaily: 3}}\n",
    )
    .await?;
    let policies = node.policies();
    let status = eventually("the retention run's result", Duration::from_secs(90), || async {
        let p = policies.get("weekly").await?;
        Ok(p.status
            .filter(|s| s.last_run_result.is_some() && s.active_run.is_none()))
    })
    .await
    .with_context(|| node.coordinator_log())?;
    assert_eq!(
        status.last_run_result.map(|r| r.to_string()).as_deref(),
        Some("Succeeded"),
        "{status:?}"
    );
    let after: Vec<String> = restic_snapshots(&repo)?
        .iter()
        .filter_map(|s| s["id"].as_str().map(String::from))
        .collect();
    let mut left: Vec<&String> = before.iter().filter(|id| !expected.contains(id)).collect();
    let mut found: Vec<&String> = after.iter().collect();
    left.sort();
    found.sort();
    assert_eq!(
        found, left,
        "exactly what restic forget --dry-run predicted was removed"
    );
    assert_eq!(status.snapshots_removed, Some(5));
    let by_policy: Vec<(i32, Option<i64>, Option<i64>)> = status
        .policies
        .iter()
        .map(|p| (p.policy, p.snapshots_removed, p.snapshots_kept))
        .collect();
    assert_eq!(
        by_policy,
        [(1, Some(3), Some(2)), (2, Some(2), Some(3))],
        "{:?}",
        status.policies
    );
    assert_eq!(status.snapshots_after_retention, Some(15));
    assert!(status.repository_size_before_bytes.is_some() && status.repository_size_after_bytes.is_some());
    assert_eq!(status.last_manual_trigger.as_deref(), Some("go"));
    let ready = status
        .conditions
        .iter()
        .find(|c| c.type_ == "Ready")
        .context("no Ready")?;
    assert!(ready.is_true(), "{ready:?}");
    let note = wait_event(&node, "RetentionCompleted")
        .await?
        .note
        .unwrap_or_default();
    assert!(note.starts_with("Removed 5 snapshot(s); repository "), "{note}");
    // Pruned once: the agent ran one prune, named for the run.
    let runs = node.agent_runs().await?;
    let prunes: Vec<&str> = runs
        .iter()
        .filter(|r| r.run_id.ends_with("-prune"))
        .map(|r| r.run_id.as_str())
        .collect();
    assert_eq!(prunes.len(), 1, "{prunes:?}");

    // A policy naming a repository of another namespace is refused, whatever that repository
    // allows: it would act on every namespace's snapshots there.
    node.apply_yaml(
        "apiVersion: backup.resticbackup.io/v1alpha1\nkind: GlobalRetentionPolicy\nmetadata: {name: elsewhere}\n\
         spec:\n  repositoryRef: {name: shared, namespace: backup-system}\n  schedule: '@yearly'\n  \
         manualTrigger: go\n  policies:\n  - {retention: {keepLast: 1}}\n",
    )
    .await?;
    let refused = eventually("the policy refused", Duration::from_secs(30), || async {
        let p = policies.get("elsewhere").await?;
        let status = p.status.unwrap_or_default();
        Ok(status
            .conditions
            .into_iter()
            .find(|c| c.type_ == "RepositoryReady" && c.reason.as_deref() == Some("NamespaceNotAllowed")))
    })
    .await?;
    assert!(!refused.is_true(), "{refused:?}");
    wait_event(&node, "NamespaceNotAllowed").await?;
    let p = policies.get("elsewhere").await?;
    let status = p.status.unwrap_or_default();
    assert!(
        status.active_run.is_none() && status.last_run.is_none(),
        "{status:?}"
    );
    Ok(())
}

/// restic's locks in `repo` now: (exclusive, hostname/pid) of each.
fn restic_locks(repo: &restic_operator_e2e::ResticRepo) -> Result<Vec<(bool, String)>> {
    let out = repo.restic()?.args(["list", "locks", "--no-lock"]).output()?;
    let mut locks = Vec::new();
    for id in String::from_utf8_lossy(&out.stdout).lines() {
        let lock = repo.restic()?.args(["cat", "lock", id, "--no-lock"]).output()?;
        // A lock removed between the listing and the read is gone, not held.
        if let Ok(lock) = serde_json::from_slice::<serde_json::Value>(&lock.stdout) {
            let who = format!(
                "{}/{}",
                lock["hostname"].as_str().unwrap_or_default(),
                lock["pid"]
            );
            locks.push((lock["exclusive"].as_bool().unwrap_or(false), who));
        }
    }
    Ok(locks)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_prune_and_the_backups_of_its_repository_never_overlap() -> Result<()> {
    let node = Node::start("overlap").await?;
    let repo = ready_repository(&node, "main").await?;
    let (_, data) = node.app_pod("db-0", "db", "data").await?;
    std::fs::write(data.join("dump.sql"), pseudo_random(6 << 20, 5))?;
    node.apply_yaml(&slow_backup("db")).await?;
    node.trigger("db", "one").await?;
    wait_dispatched(&node, "db").await?;

    // restic's own locks, sampled while everything runs: an exclusive lock is never seen
    // beside another one. Each sample opens the repository (about a second), so a short prune
    // may fall between samples; the agent's process times below are the complete record.
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sampler = {
        let (repo, done) = (repo.clone(), done.clone());
        std::thread::spawn(move || -> Result<(usize, usize)> {
            let (mut exclusive, mut shared) = (0, 0);
            while !done.load(std::sync::atomic::Ordering::Relaxed) {
                let locks = restic_locks(&repo)?;
                let held: Vec<bool> = locks.iter().map(|(e, _)| *e).collect();
                ensure!(
                    !(held.contains(&true) && held.len() > 1),
                    "an exclusive lock beside another: {locks:?}"
                );
                exclusive += held.iter().filter(|e| **e).count();
                shared += held.iter().filter(|e| !**e).count();
                std::thread::sleep(Duration::from_millis(200));
            }
            Ok((exclusive, shared))
        })
    };
    // Retention with a prune, asked while the backup runs: it waits for the backup.
    node.apply_yaml(
        "apiVersion: backup.resticbackup.io/v1alpha1\nkind: GlobalRetentionPolicy\nmetadata: {name: prune}\n\
         spec:\n  repositoryRef: {name: main}\n  schedule: '@yearly'\n  prune: true\n  manualTrigger: go\n  \
         policies:\n  - {retention: {keepLast: 10}}\n",
    )
    .await?;
    let busy = wait_event(&node, "RepositoryBusy").await?;
    node.wait_finished("db", 0, Duration::from_secs(90)).await?;
    // A backup asked while retention holds the repository waits for it.
    node.trigger("db", "two").await?;
    node.wait_finished("db", 1, Duration::from_secs(120)).await?;
    let policies = node.policies();
    let status = eventually("the retention run's result", Duration::from_secs(90), || async {
        let p = policies.get("prune").await?;
        Ok(p.status
            .filter(|s| s.last_run_result.is_some() && s.active_run.is_none()))
    })
    .await
    .with_context(|| node.coordinator_log())?;
    assert_eq!(
        status.last_run_result.map(|r| r.to_string()).as_deref(),
        Some("Succeeded")
    );
    done.store(true, std::sync::atomic::Ordering::Relaxed);
    let (exclusive, shared) = sampler.join().expect("the lock sampler")?;
    eprintln!(
        "restic lock samples: {exclusive} exclusive, {shared} shared; first wait: {:?}",
        busy.note
    );

    // The agent's own record of when each restic process ran: the prune between the backups.
    let runs = node.agent_runs().await?;
    let span = |r: &pb::RunInfo| (r.started_unix_ms, r.finished_unix_ms);
    let backups: Vec<(i64, i64)> = runs
        .iter()
        .filter(|r| r.kind == pb::RunKind::Backup as i32)
        .map(span)
        .collect();
    let prunes: Vec<(i64, i64)> = runs
        .iter()
        .filter(|r| r.kind == pb::RunKind::Prune as i32)
        .map(span)
        .collect();
    assert_eq!((backups.len(), prunes.len()), (2, 1), "{runs:?}");
    for (b, p) in backups.iter().flat_map(|b| prunes.iter().map(move |p| (b, p))) {
        assert!(b.1 <= p.0 || p.1 <= b.0, "backup {b:?} overlaps prune {p:?}");
    }
    let backup_events = events(&node, "RepositoryBusy").await?;
    assert!(
        backup_events
            .iter()
            .any(|e| e.regarding.as_ref().and_then(|r| r.kind.as_deref()) == Some("ResticBackup")),
        "the second backup waited for retention, with an event: {backup_events:?}"
    );
    Ok(())
}
