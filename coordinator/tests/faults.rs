//! The fault suite: parts of the system killed, restarted or missing, over many repeats, with
//! what must hold measured on the real control plane, S3 server, restic, coordinator and
//! agent (the API server's row is `apiserver.rs`, a binary of its own). Each test writes its
//! row of the table (see `table`); `e2e/scripts/faults.sh` runs the suite and prints the
//! table. `FAULT_REPEATS` lowers the repeat counts for a quick local run; CI runs the full
//! counts.
#[path = "faults/common.rs"]
mod common;
mod support;
#[path = "faults/table.rs"]
mod table;

use std::collections::HashSet;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use common::{SLOW_BACKUP, backup_ended, fresh_data, now_ms, record, repeats};
use restic_operator_api::restore::RestorePhase;
use restic_operator_e2e::fixtures::assert_trees_equal;
use restic_operator_e2e::fixtures::pseudo_random;
use restic_operator_e2e::s3::S3Server;
use restic_operator_e2e::{ResticRepo, eventually};
use restic_operator_proto::v1 as pb;
use restic_operator_proto::v1::agent_client::AgentClient;
use serde_json::json;
use support::{
    Node, backed_up, backup_yaml, live_claim, ready_repository, restic_snapshots, restore_yaml,
    wait_dispatched,
};
use table::{Row, spread};
use tonic::transport::Channel;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn coordinator_sigkilled_mid_backup() -> Result<()> {
    let n = repeats(20);
    let mut row = Row::new(
        "1-coordinator-mid-backup",
        "coordinator SIGKILL mid-backup",
        n,
        "exactly one snapshot per run; status right ≤ 10 s after restart; no run left in activeRun",
    );
    let outcome = async {
        let mut node = Node::start("fault-coordinator").await?;
        let repo = ready_repository(&node, "main").await?;
        let (_, data) = node.app_pod("db-0", "db", "data").await?;
        node.apply_yaml(SLOW_BACKUP).await?;
        let (mut late, mut ids, mut wrong) = (Vec::new(), HashSet::new(), Vec::new());
        let mut resent = 0;
        for i in 0..n {
            fresh_data(&data, i)?;
            node.trigger("db", &format!("kill-{i}")).await?;
            let run_id = wait_dispatched(&node, "db").await?;
            node.coordinators[0].kill();
            node.coordinators.clear();
            let restarted = now_ms();
            node.start_coordinator("coordinator-a").await?;
            let end = backup_ended(&node, &run_id, i, restarted, Duration::from_secs(90)).await?;
            if let Some(last) = end.wrong {
                wrong.push(format!("{run_id}: {last:?}"));
            }
            ids.extend(end.snapshot_id);
            late.push(end.late);
            if node.coordinators[0]
                .metric("restic_operator_dispatch_total{kind=\"backup\"}")
                .is_some()
            {
                resent += 1;
            }
        }
        let snapshots = restic_snapshots(&repo)?;
        let in_repo: HashSet<String> = snapshots
            .iter()
            .filter_map(|s| s["id"].as_str().map(String::from))
            .collect();
        row.measured = format!(
            "{} snapshots for {n} runs, {} distinct ids in status, all in the repository: {}; \
             re-sent {resent}; status right {} after restart or the run's end; wrong results: {}",
            snapshots.len(),
            ids.len(),
            ids.is_subset(&in_repo),
            spread(late.clone()),
            wrong.len()
        );
        let max = late.iter().max().copied().unwrap_or_default();
        Ok(snapshots.len() == n
            && ids.len() == n
            && ids.is_subset(&in_repo)
            && resent == 0
            && wrong.is_empty()
            && max <= Duration::from_secs(10))
    }
    .await;
    record(row, outcome)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_sigkilled_mid_backup() -> Result<()> {
    let n = repeats(20);
    let mut row = Row::new(
        "2-agent-mid-backup",
        "agent SIGKILL mid-backup",
        n,
        "the run ends Failed with a reason ≤ 30 s; the next run succeeds; no dead restic's lock blocks prune",
    );
    let outcome = async {
        let mut node = Node::start("fault-agent").await?;
        let repo = ready_repository(&node, "main").await?;
        let (_, data) = node.app_pod("db-0", "db", "data").await?;
        node.apply_yaml(SLOW_BACKUP).await?;
        let (mut to_fail, mut wrong, mut next_failed) = (Vec::new(), Vec::new(), 0);
        let mut locks_left = 0;
        let mut total = 0;
        for i in 0..n {
            fresh_data(&data, i)?;
            node.trigger("db", &format!("kill-{i}")).await?;
            let run_id = wait_dispatched(&node, "db").await?;
            let killed = Instant::now();
            node.agent.as_mut().context("no agent")?.restart(false).await?;
            let done = node.wait_finished("db", total, Duration::from_secs(60)).await?;
            to_fail.push(killed.elapsed());
            total += 1;
            let last = done.status.and_then(|s| s.last_backup).context("no lastBackup")?;
            let failed = last.run_id.as_deref() == Some(run_id.as_str())
                && last.result.map(|r| r.to_string()).as_deref() == Some("Failed")
                && last.message.as_deref().is_some_and(|m| !m.is_empty());
            if !failed {
                wrong.push(format!("{run_id}: {last:?}"));
            }
            node.trigger("db", &format!("next-{i}")).await?;
            if node
                .wait_succeeded("db", total, Duration::from_secs(60))
                .await
                .is_err()
            {
                next_failed += 1;
            }
            total += 1;
            // The next run removed what the killed restic left. Live locks (the statistics
            // read after a run) come and go; a dead one would stay for 30 minutes.
            let gone = eventually("no lock", Duration::from_secs(15), || async {
                Ok(repo.lock_ids()?.is_empty().then_some(()))
            })
            .await;
            if gone.is_err() {
                locks_left += 1;
            }
        }
        // An exclusive operation by restic itself, which no dead lock may block (it waits out
        // live ones).
        let prune = repo.restic()?.args(["prune", "--retry-lock=1m"]).output()?;
        let pruned = prune.status.success();
        row.measured = format!(
            "Failed with a reason {}; wrong results {}; next run failed {next_failed}; \
             repeats with a lock still there 15 s after the next run {locks_left}; \
             restic prune after all: {}",
            spread(to_fail.clone()),
            wrong.len(),
            if pruned { "ran" } else { "refused" }
        );
        let max = to_fail.iter().max().copied().unwrap_or_default();
        Ok(wrong.is_empty()
            && next_failed == 0
            && locks_left == 0
            && pruned
            && max <= Duration::from_secs(30))
    }
    .await;
    record(row, outcome)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_repository_whose_bucket_does_not_exist() -> Result<()> {
    let mut row = Row::new(
        "6-bucket-missing",
        "bucket missing, repository new (no region set)",
        1,
        "init creates it; Ready within 30 s",
    );
    let outcome = async {
        let node = Node::start("fault-bucket").await?;
        let repo = node.ctx.repository("nobucket");
        // Without a region restic asks S3 where the bucket is, and retries "no such bucket".
        let mut data = serde_json::Map::new();
        data.insert("RESTIC_PASSWORD".into(), json!(repo.password));
        for (k, v) in repo.s3.env() {
            if k != "AWS_DEFAULT_REGION" {
                data.insert(k, json!(v));
            }
        }
        node.apply_secret("nobucket-creds", data).await?;
        let started = Instant::now();
        node.apply_yaml(&format!(
            "apiVersion: backup.resticbackup.io/v1alpha1\nkind: ResticRepository\n\
             metadata: {{name: nobucket}}\nspec: {{repositoryURL: '{}', \
             credentialsSecretRef: {{name: nobucket-creds}}}}",
            repo.url
        ))
        .await?;
        node.wait_repository_reason("nobucket", "RepositoryInitialized", Duration::from_secs(60))
            .await?;
        let ready = started.elapsed();
        let opens = eventually("the new repository", Duration::from_secs(10), || async {
            Ok(restic_snapshots(&repo).ok().map(|_| ()))
        })
        .await
        .is_ok();
        row.measured = format!(
            "Ready (RepositoryInitialized) after {:.1} s; the repository opens: {opens}",
            ready.as_secs_f64()
        );
        Ok(opens && ready <= Duration::from_secs(30))
    }
    .await;
    record(row, outcome)
}

/// A node with repository `main`, one successful backup `db` of pod `db-0`'s volume (1.5 MiB,
/// three seconds to download at 512 KiB/s) and a running pod mounting claim `data`; returns
/// the node, the repository, the backed-up volume and the claim's directory.
async fn restorable(
    test: &str,
) -> Result<(
    Node,
    restic_operator_e2e::ResticRepo,
    std::path::PathBuf,
    std::path::PathBuf,
)> {
    let (node, repo, data) = backed_up(test, |d| fresh_data(d, 0)).await?;
    let target = live_claim(&node).await?;
    Ok((node, repo, data, target))
}

/// Applies restore `name` of backup `db` into `/<name>` of claim `data` (512 KiB/s when
/// `slow`).
async fn restore_into(node: &Node, name: &str, slow: bool) -> Result<()> {
    let limit = if slow {
        "\n  options: {extraArgs: ['--limit-download=512']}"
    } else {
        ""
    };
    node.apply_yaml(&restore_yaml(
        name,
        &format!("  backupRef: {{name: db}}\n  target: {{pvc: {{claimName: data, path: /{name}}}}}{limit}\n"),
    ))
    .await
}

/// The run id of restore `name` once it is in flight on the agent.
async fn restore_in_flight(node: &Node, name: &str) -> Result<String> {
    eventually("the restore in flight", Duration::from_secs(30), || async {
        let s = node.restores().get(name).await?.status.unwrap_or_default();
        Ok(match (s.active_run, s.progress) {
            (Some(a), Some(_)) if a.node_name.is_some() => Some(a.run_id),
            _ => None,
        })
    })
    .await
    .with_context(|| node.coordinator_log())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn coordinator_sigkilled_mid_restore() -> Result<()> {
    let n = repeats(20);
    let mut row = Row::new(
        "1b-coordinator-mid-restore",
        "coordinator SIGKILL mid-restore",
        n,
        "each restore runs once and completes identical to the volume; status right ≤ 10 s after restart",
    );
    let outcome = async {
        let (mut node, _, data, target) = restorable("fault-coord-restore").await?;
        let (mut late, mut wrong, mut differ, mut resent) = (Vec::new(), Vec::new(), 0, 0);
        for i in 0..n {
            let name = format!("r-{i}");
            restore_into(&node, &name, true).await?;
            let run_id = restore_in_flight(&node, &name).await?;
            node.coordinators[0].kill();
            node.coordinators.clear();
            let restarted = now_ms();
            node.start_coordinator("coordinator-a").await?;
            let s = node.wait_restored(&name, Duration::from_secs(90)).await?;
            let seen = now_ms();
            if s.phase != Some(RestorePhase::Completed) {
                wrong.push(format!("{name}: {:?} {:?}", s.phase, s.message));
            }
            if assert_trees_equal(&data, &target.join(&name)).is_err() {
                differ += 1;
            }
            let runs = node.agent_runs().await?;
            let ended = runs
                .iter()
                .find(|r| r.run_id == run_id)
                .map_or(seen, |r| r.finished_unix_ms);
            late.push(Duration::from_millis((seen - restarted.max(ended)).max(0) as u64));
            let restores = runs
                .iter()
                .filter(|r| r.kind == pb::RunKind::Restore as i32)
                .count();
            if restores != i + 1
                || node.coordinators[0]
                    .metric("restic_operator_dispatch_total{kind=\"restore\"}")
                    .is_some()
            {
                resent += 1;
            }
        }
        row.measured = format!(
            "{} of {n} completed; trees differing {differ}; restores sent more than once {resent}; \
             status right {} after restart or the run's end",
            n - wrong.len(),
            spread(late.clone())
        );
        let max = late.iter().max().copied().unwrap_or_default();
        Ok(wrong.is_empty() && differ == 0 && resent == 0 && max <= Duration::from_secs(10))
    }
    .await;
    record(row, outcome)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_sigkilled_mid_restore() -> Result<()> {
    let n = repeats(20);
    let mut row = Row::new(
        "2b-agent-mid-restore",
        "agent SIGKILL mid-restore",
        n,
        "the restore ends Failed with a reason ≤ 30 s; the next restore completes; no dead restic's lock blocks prune",
    );
    let outcome = async {
        let (mut node, repo, data, target) = restorable("fault-agent-restore").await?;
        let (mut to_fail, mut wrong, mut next_failed, mut locks_left) = (Vec::new(), Vec::new(), 0, 0);
        for i in 0..n {
            let name = format!("k-{i}");
            restore_into(&node, &name, true).await?;
            restore_in_flight(&node, &name).await?;
            let killed = Instant::now();
            node.agent.as_mut().context("no agent")?.restart(false).await?;
            let s = node.wait_restored(&name, Duration::from_secs(60)).await?;
            to_fail.push(killed.elapsed());
            if s.phase != Some(RestorePhase::Failed) || s.message.as_deref().is_none_or(str::is_empty) {
                wrong.push(format!("{name}: {:?} {:?}", s.phase, s.message));
            }
            let next = format!("n-{i}");
            restore_into(&node, &next, false).await?;
            let s = node.wait_restored(&next, Duration::from_secs(60)).await?;
            if s.phase != Some(RestorePhase::Completed)
                || assert_trees_equal(&data, &target.join(&next)).is_err()
            {
                next_failed += 1;
            }
            let gone = eventually("no lock", Duration::from_secs(15), || async {
                Ok(repo.lock_ids()?.is_empty().then_some(()))
            })
            .await;
            if gone.is_err() {
                locks_left += 1;
            }
        }
        let pruned = repo
            .restic()?
            .args(["prune", "--retry-lock=1m"])
            .output()?
            .status
            .success();
        row.measured = format!(
            "Failed with a reason {}; other endings {}; next restore failed or differed \
             {next_failed}; repeats with a lock still there 15 s after the next restore \
             {locks_left}; restic prune after all: {}",
            spread(to_fail.clone()),
            wrong.len(),
            if pruned { "ran" } else { "refused" }
        );
        if let Some(w) = wrong.first() {
            row.measured.push_str(&format!(" (first: {w})"));
        }
        let max = to_fail.iter().max().copied().unwrap_or_default();
        Ok(wrong.is_empty()
            && next_failed == 0
            && locks_left == 0
            && pruned
            && max <= Duration::from_secs(30))
    }
    .await;
    record(row, outcome)
}

/// What one freeze of the agent showed.
struct Frozen {
    /// Said while the agent was frozen (a condition's reason and message), if anything.
    reported: Option<String>,
    /// How the run ended after the agent was thawed, and after how long.
    ended: String,
    after: Duration,
    clean: bool,
    /// Backup runs the agent saw for this backup (1: nothing was started twice).
    runs: usize,
    snapshots: usize,
}

/// Freezes the agent (SIGSTOP) for `freeze` in the middle of a backup, then thaws it.
async fn frozen_once(i: usize, freeze: Duration) -> Result<Frozen> {
    // The default time to give up on an agent (2 minutes), not the tests' 30 s.
    let flags = ["--agent-lost-timeout=2m".to_string()];
    let node = Node::start_with(&format!("fault-frozen-{i}"), &[], &flags).await?;
    let repo = ready_repository(&node, "main").await?;
    let (_, data) = node.app_pod("db-0", "db", "data").await?;
    fresh_data(&data, i)?;
    node.apply_yaml(SLOW_BACKUP).await?;
    node.trigger("db", "frozen").await?;
    wait_dispatched(&node, "db").await?;
    let pid = node.agent().process.child.id().to_string();
    let signal = |s: &str| std::process::Command::new("kill").args([s, &pid]).status();
    signal("-STOP")?;
    let frozen = Instant::now();
    let mut reported = None;
    while frozen.elapsed() < freeze {
        if reported.is_none() {
            let b = node.backups().get("db").await?;
            let s = b.status.unwrap_or_default();
            reported = s
                .conditions
                .iter()
                .find(|c| c.reason.as_deref() == Some("AgentUnavailable"))
                .map(|c| format!("{}: {}", c.type_, c.message.clone().unwrap_or_default()));
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    signal("-CONT")?;
    let thawed = Instant::now();
    let done = node.wait_finished("db", 0, Duration::from_secs(120)).await?;
    let after = thawed.elapsed();
    let last = done.status.and_then(|s| s.last_backup).context("no lastBackup")?;
    let result = last.result.map(|r| r.to_string()).unwrap_or_default();
    let runs = node
        .agent_runs()
        .await?
        .into_iter()
        .filter(|r| r.kind == pb::RunKind::Backup as i32)
        .count();
    let snapshots = restic_snapshots(&repo)?.len();
    let clean = match result.as_str() {
        "Succeeded" => snapshots == 1 && last.snapshot_id.is_some(),
        "Failed" => last.message.as_deref().is_some_and(|m| !m.is_empty()),
        _ => false,
    };
    Ok(Frozen {
        reported,
        ended: format!("{result} ({})", last.message.unwrap_or_default()),
        after,
        clean,
        runs,
        snapshots,
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_frozen_mid_backup() -> Result<()> {
    let n = repeats(5);
    let freeze = Duration::from_secs(60);
    let mut row = Row::new(
        "3-agent-frozen",
        "agent frozen (SIGSTOP 60 s, then SIGCONT) mid-backup",
        n,
        "AgentUnavailable reported; no second run for the id; re-attaches or fails cleanly after",
    );
    let outcome = async {
        // The repeats freeze agents of their own nodes at the same time.
        let all = futures::future::join_all((0..n).map(|i| frozen_once(i, freeze))).await;
        let all: Vec<Frozen> = all.into_iter().collect::<Result<_>>()?;
        let reported = all.iter().filter(|f| f.reported.is_some()).count();
        let twice = all.iter().filter(|f| f.runs != 1).count();
        let clean = all.iter().filter(|f| f.clean).count();
        row.measured = format!(
            "AgentUnavailable reported in {reported} of {n} (e.g. {:?}); runs started twice {twice}; \
             ended cleanly {clean} of {n}, {} after the thaw: {:?}; snapshots {:?}",
            all.iter().find_map(|f| f.reported.clone()).unwrap_or_default(),
            spread(all.iter().map(|f| f.after).collect()),
            all.iter().map(|f| f.ended.clone()).collect::<Vec<_>>(),
            all.iter().map(|f| f.snapshots).collect::<Vec<_>>(),
        );
        Ok(reported == n && twice == 0 && clean == n)
    }
    .await;
    record(row, outcome)
}

/// A small file system mounted over a directory for the length of a test.
struct SmallDisk(std::path::PathBuf);

impl SmallDisk {
    fn mount(dir: &Path, size: &str) -> Result<Self> {
        std::fs::create_dir_all(dir)?;
        let out = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir)
            .output()?;
        ensure!(
            out.status.success(),
            "mount: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(Self(dir.to_path_buf()))
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.0)
            .status();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agents_state_disk_full() -> Result<()> {
    let mut row = Row::new(
        "8-state-disk-full",
        "the agent's state disk full",
        1,
        "runs fail with a reason naming the disk; the agent stays healthy; recovers when space returns",
    );
    let outcome = async {
        let node = Node::start("fault-disk").await?;
        ready_repository(&node, "main").await?;
        let (_, data) = node.app_pod("db-0", "db", "data").await?;
        fresh_data(&data, 0)?;
        node.apply_yaml(&backup_yaml(
            "db",
            "  repositoryRef: {name: main}\n  schedule: '@yearly'\n  \
             source: {podVolumeBackup: {selector: {matchLabels: {app: db}}, volumeName: data}}\n",
        ))
        .await?;
        // The state directory on a 96 MiB disk of its own, then filled.
        let state = node.agent().state_dir().to_path_buf();
        let _disk = SmallDisk::mount(&state, "96m")?;
        let filler = state.join("filler");
        std::fs::write(&filler, vec![1u8; 90 << 20])?;
        node.trigger("db", "full").await?;
        let failed = node.wait_finished("db", 0, Duration::from_secs(60)).await?;
        let last = failed
            .status
            .and_then(|s| s.last_backup)
            .context("no lastBackup")?;
        let message = last.message.clone().unwrap_or_default();
        let named = last.result.map(|r| r.to_string()).as_deref() == Some("Failed")
            && message.contains("state directory")
            && message.contains(&state.display().to_string());
        // Still serving: it lists its runs.
        let healthy = node.agent_runs().await.is_ok();
        std::fs::remove_file(&filler)?;
        node.trigger("db", "room-again").await?;
        let recovered = node
            .wait_succeeded("db", 1, Duration::from_secs(60))
            .await
            .is_ok();
        let shown = message.split(" is full").next().unwrap_or_default().to_owned();
        row.measured = format!(
            "Failed naming the state directory: {named} (\"{shown} is full ...\"); agent answering: \
             {healthy}; next run after freeing space succeeded: {recovered}"
        );
        Ok(named && healthy && recovered)
    }
    .await;
    record(row, outcome)
}

/// Resident memory of process `root` and all its descendants, in bytes.
fn tree_rss(root: u32) -> u64 {
    let mut parent = std::collections::HashMap::new();
    let mut rss = std::collections::HashMap::new();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(status) = std::fs::read_to_string(entry.path().join("status")) else {
            continue;
        };
        let field = |name: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .and_then(|v| v.split_whitespace().next())
                .and_then(|v| v.parse::<u64>().ok())
        };
        if let Some(ppid) = field("PPid:") {
            parent.insert(pid, ppid as u32);
        }
        rss.insert(pid, field("VmRSS:").unwrap_or(0) << 10);
    }
    let under = |mut pid: u32| {
        while pid > 1 {
            if pid == root {
                return true;
            }
            pid = parent.get(&pid).copied().unwrap_or(0);
        }
        false
    };
    rss.iter().filter(|(pid, _)| under(**pid)).map(|(_, r)| r).sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_backups_due_at_once_on_one_node() -> Result<()> {
    const BACKUPS: usize = 50;
    // The agent's defaults: 2 runs at once, each restic limited to 1 GiB.
    const CONCURRENT: u64 = 2;
    const PER_RUN: u64 = 1 << 30;
    let rounds = repeats(3);
    let mut row = Row::new(
        "7-fifty-due-at-once",
        "50 backups due at once on one node (agent defaults: 2 at once, 1 GiB per restic)",
        rounds,
        "all complete; agent + restic memory under the cap; none lost or duplicated",
    );
    let outcome = async {
        let node = Node::start("fault-fifty").await?;
        let repo = ready_repository(&node, "main").await?;
        let mut volumes = Vec::new();
        for i in 0..BACKUPS {
            let (_, dir) = node.app_pod(&format!("app-{i}"), &format!("a{i}"), "data").await?;
            node.apply_yaml(&backup_yaml(
                &format!("b{i}"),
                &format!(
                    "  repositoryRef: {{name: main}}\n  schedule: '@yearly'\n  \
                     source: {{podVolumeBackup: {{selector: {{matchLabels: {{app: a{i}}}}}, volumeName: data}}}}\n"
                ),
            ))
            .await?;
            volumes.push(dir);
        }
        let agent_pid = node.agent().process.child.id();
        let cap = 64 * (1 << 20) + CONCURRENT * PER_RUN;
        let (mut took, mut peak, mut wrong) = (Vec::new(), 0u64, Vec::new());
        for round in 0..rounds {
            for (i, dir) in volumes.iter().enumerate() {
                std::fs::write(dir.join(format!("round-{round}")), pseudo_random(64 << 10, (i * 10 + round) as u64))?;
            }
            let started = Instant::now();
            for i in 0..BACKUPS {
                node.trigger(&format!("b{i}"), &format!("round-{round}")).await?;
            }
            let api = node.backups();
            loop {
                peak = peak.max(tree_rss(agent_pid));
                let list = api.list(&Default::default()).await?.items;
                let done = list
                    .iter()
                    .filter(|b| {
                        let s = b.status.clone().unwrap_or_default();
                        s.active_run.is_none()
                            && s.statistics.and_then(|t| t.total_backups).unwrap_or(0) > round as i64
                    })
                    .count();
                if done == BACKUPS {
                    for b in &list {
                        let last = b.status.clone().and_then(|s| s.last_backup);
                        let ok = last
                            .as_ref()
                            .and_then(|l| l.result.map(|r| r.to_string()))
                            .as_deref()
                            == Some("Succeeded");
                        if !ok {
                            wrong.push(format!("{:?}: {last:?}", b.metadata.name));
                        }
                    }
                    break;
                }
                ensure!(
                    started.elapsed() < Duration::from_secs(300),
                    "round {round}: {done} of {BACKUPS} done after 5 minutes"
                );
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
            took.push(started.elapsed());
        }
        // Exactly one snapshot per backup and round.
        let snapshots = restic_snapshots(&repo)?;
        let mut per_host: std::collections::HashMap<String, usize> = Default::default();
        for s in &snapshots {
            *per_host.entry(s["hostname"].as_str().unwrap_or_default().to_owned()).or_default() += 1;
        }
        let exact = per_host.len() == BACKUPS && per_host.values().all(|n| *n == rounds);
        row.measured = format!(
            "all {BACKUPS} done in {} per round; {} snapshots, {} hosts, each with one per round: {exact}; \
             failed runs {}; agent + restic peak {} MiB of a {} MiB cap",
            spread(took),
            snapshots.len(),
            per_host.len(),
            wrong.len(),
            peak >> 20,
            cap >> 20
        );
        Ok(exact && wrong.is_empty() && peak <= cap)
    }
    .await;
    record(row, outcome)
}

/// The reconciles of `controller` so far, whatever their result.
fn reconciles(node: &Node, controller: &str) -> Result<u64> {
    let text = node.coordinators[0].metrics()?;
    let series = format!("restic_operator_reconcile_total{{controller=\"{controller}\"");
    Ok(text
        .lines()
        .filter(|l| l.starts_with(&series))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as u64)
}

/// Waits until backup `db`'s restic is reading and uploading (not queued, not starting).
async fn uploading(node: &Node) -> Result<()> {
    let api = node.backups();
    eventually("the backup uploading", Duration::from_secs(60), || async {
        let b = api.get("db").await?;
        let p = b.status.and_then(|s| s.progress);
        Ok(p.filter(|p| p.bytes_done.unwrap_or_default() > 0).map(|_| ()))
    })
    .await
}

/// What one outage of the S3 server showed.
#[derive(Debug, Default)]
struct Outage {
    /// After the server went down: the repository's `Ready` False with `RepositoryUnreachable`,
    /// and the backup's `RepositoryReady` False naming it.
    repository_unreachable: Option<Duration>,
    backup_told: Option<Duration>,
    message: String,
    /// Reconciles of the repository and of the backup while the server was down.
    repository_reconciles: u64,
    backup_reconciles: u64,
    /// The backup's reconciles at the start of a run triggered during the outage (not in
    /// `backup_reconciles`).
    start_reconciles: u64,
    /// After the server came back: the repository Ready again, and the backup's end.
    ready_again: Duration,
    backup_ended: Duration,
    result: String,
    /// Whether the repository came back within one backoff of the controller.
    within_backoff: bool,
    /// Probes that failed while the server was down.
    failed_probes: usize,
}

/// One S3 outage of `down` on `node`'s own server, with backup `db` started `trigger_after`
/// into it (`None`: it runs already when the server goes down).
async fn outage(
    node: &Node,
    agent: &AgentClient<Channel>,
    s3: &mut S3Server,
    down: Duration,
    trigger_after: Option<Duration>,
    round: usize,
) -> Result<Outage> {
    let trigger = format!("outage-{round}");
    if trigger_after.is_none() {
        node.trigger("db", &trigger).await?;
        uploading(node).await?;
    }
    let (repositories, backups) = (
        reconciles(node, "resticrepository")?,
        reconciles(node, "resticbackup")?,
    );
    s3.stop();
    let stopped = Instant::now();
    let mut seen = Outage::default();
    let mut triggered = false;
    // The backup's reconciles in the 5 s after a trigger during the outage are the start of
    // its run (the trigger and the writes that record the run), not the outage's.
    let settled = trigger_after.map(|t| t + Duration::from_secs(5));
    let (mut at_trigger, mut counted_start) = (0, false);
    while stopped.elapsed() < down {
        if trigger_after.is_some_and(|t| stopped.elapsed() >= t) && !triggered {
            at_trigger = reconciles(node, "resticbackup")?;
            node.trigger("db", &trigger).await?;
            triggered = true;
        }
        if settled.is_some_and(|t| stopped.elapsed() >= t) && !counted_start {
            seen.start_reconciles = reconciles(node, "resticbackup")? - at_trigger;
            counted_start = true;
        }
        let repo = node.repositories().get("main").await?;
        let ready = repo
            .status
            .unwrap_or_default()
            .conditions
            .into_iter()
            .find(|c| c.type_ == "Ready");
        if seen.repository_unreachable.is_none()
            && let Some(c) =
                ready.filter(|c| !c.is_true() && c.reason.as_deref() == Some("RepositoryUnreachable"))
        {
            seen.repository_unreachable = Some(stopped.elapsed());
            seen.message = c.message.unwrap_or_default();
        }
        let backup = node.backups().get("db").await?;
        let told = backup.status.unwrap_or_default().conditions.into_iter().any(|c| {
            c.type_ == "RepositoryReady"
                && !c.is_true()
                && c.message.unwrap_or_default().contains("RepositoryUnreachable")
        });
        if told && seen.backup_told.is_none() {
            seen.backup_told = Some(stopped.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    seen.repository_reconciles = reconciles(node, "resticrepository")? - repositories;
    seen.backup_reconciles = reconciles(node, "resticbackup")? - backups - seen.start_reconciles;
    s3.start_again()?;
    let back = Instant::now();
    node.wait_repository_reason("main", "RepositoryAccessible", Duration::from_secs(330))
        .await?;
    seen.ready_again = back.elapsed();
    // The controller backs off after each probe that failed while the server was down (the
    // agent's record of them): it waits at most the backoff of that many failures, and
    // restic's probe takes a moment.
    let stopped_ms = now_ms() - i64::try_from(stopped.elapsed().as_millis())?;
    seen.failed_probes = support::runs(agent)
        .await?
        .iter()
        .filter(|r| r.kind == pb::RunKind::Probe as i32 && r.created_unix_ms >= stopped_ms)
        .filter(|r| {
            r.result
                .as_ref()
                .is_some_and(|r| r.outcome != pb::Outcome::Succeeded as i32)
        })
        .count();
    let backoff = restic_operator_coordinator::error::backoff(u32::try_from(seen.failed_probes)?);
    seen.within_backoff = seen.ready_again <= backoff + Duration::from_secs(5);
    let done = node
        .wait_finished("db", round as i64, Duration::from_secs(300))
        .await?;
    seen.backup_ended = back.elapsed();
    let last = done.status.and_then(|s| s.last_backup).context("no lastBackup")?;
    seen.result = format!(
        "{}{}",
        last.result.map(|r| r.to_string()).unwrap_or_default(),
        last.message.map(|m| format!(" ({m})")).unwrap_or_default()
    );
    Ok(seen)
}

/// Both outages on a node of its own with its own S3 server: mid-backup, then between runs.
async fn outages_once(i: usize, down: Duration) -> Result<(Outage, Outage, usize)> {
    // Progress written at the coordinator's default interval, not the other tests' 1 s.
    let flags = ["--progress-interval=3s".to_string()];
    let mut node = Node::start_with(&format!("fault-s3-{i}"), &[], &flags).await?;
    let mut s3 = S3Server::start(&node.dir.join("s3"))?;
    let repo = ResticRepo {
        url: s3.endpoint.repository(&format!("outage-{i}"), "main"),
        password: format!("password-of-outage-{i}"),
        s3: s3.endpoint.clone(),
    };
    node.repository("main", &repo).await?;
    node.wait_repository_reason("main", "RepositoryInitialized", Duration::from_secs(60))
        .await?;
    let (_, data) = node.app_pod("db-0", "db", "data").await?;
    std::fs::write(data.join("dump.bin"), pseudo_random(3 << 20, 77 + i as u64))?;
    node.apply_yaml(SLOW_BACKUP).await?;
    let agent = node.agent_client().await?;
    let mid_backup = outage(&node, &agent, &mut s3, down, None, 0).await?;
    std::fs::write(data.join("dump-2.bin"), pseudo_random(1 << 20, 88 + i as u64))?;
    let between = outage(&node, &agent, &mut s3, down, Some(Duration::from_secs(15)), 1).await?;
    let snapshots = restic_snapshots(&repo)?.len();
    node.coordinators.clear();
    Ok((mid_backup, between, snapshots))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_server_down_mid_backup_and_between_runs() -> Result<()> {
    let n = repeats(5);
    let down = Duration::from_secs(60);
    let mut row = Row::new(
        "4-s3-down",
        "S3 server down 60 s, mid-backup and between runs",
        n,
        "a clear reason; RepositoryReady=False with RepositoryUnreachable; recovery within one \
         backoff of the server's return; ≤ 1 reconcile per 10 s per object while down",
    );
    let outcome = async {
        // The repeats stop servers of their own, all at once.
        let all = futures::future::join_all((0..n).map(|i| outages_once(i, down))).await;
        let all: Vec<(Outage, Outage, usize)> = all.into_iter().collect::<Result<_>>()?;
        let outages: Vec<&Outage> = all.iter().flat_map(|(a, b, _)| [a, b]).collect();
        let told = |o: &&&Outage| o.repository_unreachable.is_some() && o.backup_told.is_some();
        let reported = outages.iter().filter(told).count();
        let at = |f: fn(&Outage) -> Option<Duration>, between: bool| {
            let of_kind = outages
                .iter()
                .enumerate()
                .filter(|(k, _)| (k % 2 == 1) == between);
            spread(of_kind.filter_map(|(_, o)| f(o)).collect())
        };
        let most = |f: fn(&Outage) -> u64| outages.iter().map(|o| f(o)).max().unwrap_or_default();
        // Reconciles per 10 s per object over the outage.
        let per_10s = |count: u64, window: Duration| count as f64 * 10.0 / window.as_secs_f64().max(1.0);
        let rate =
            |o: &&Outage| per_10s(o.repository_reconciles, down).max(per_10s(o.backup_reconciles, down));
        let fastest = outages.iter().map(rate).fold(0.0, f64::max);
        let allowed = |o: &&Outage| {
            o.repository_reconciles <= down.as_secs().div_ceil(10)
                && o.backup_reconciles <= down.as_secs().div_ceil(10)
        };
        let calm = outages.iter().filter(|o| allowed(o)).count();
        let succeeded = outages.iter().filter(|o| o.result == "Succeeded").count();
        let within = outages.iter().filter(|o| o.within_backoff).count();
        let snapshots: Vec<usize> = all.iter().map(|(_, _, s)| *s).collect();
        row.measured = format!(
            "Unreachable shown in {reported} of {} outages, in the repository's Ready {} after \
             the stop mid-backup and {} between runs (the run starts 15 s into the outage), in \
             the backup's RepositoryReady {} and {}, e.g. {:?}; reconciles while down: \
             at most {} (repository, per 60 s) and {} (backup, without the {} of the start of \
             a run triggered during the outage), at most {fastest:.2} per \
             10 s per object, within the limit in {calm} of {}; Ready again {} after the return, \
             within the backoff after the failed probes (at most {}) in {within} of {}; the runs rode out the outage on restic's \
             retries: {succeeded} of {} Succeeded, {} after the return; snapshots {snapshots:?}",
            outages.len(),
            at(|o| o.repository_unreachable, false),
            at(|o| o.repository_unreachable, true),
            at(|o| o.backup_told, false),
            at(|o| o.backup_told, true),
            outages.first().map(|o| o.message.clone()).unwrap_or_default(),
            most(|o| o.repository_reconciles),
            most(|o| o.backup_reconciles),
            most(|o| o.start_reconciles),
            outages.len(),
            spread(outages.iter().map(|o| o.ready_again).collect()),
            outages.iter().map(|o| o.failed_probes).max().unwrap_or_default(),
            outages.len(),
            outages.len(),
            spread(outages.iter().map(|o| o.backup_ended).collect()),
        );
        Ok(reported == outages.len()
            && calm == outages.len()
            && within == outages.len()
            && succeeded == outages.len()
            && snapshots.iter().all(|&s| s == 2))
    }
    .await;
    record(row, outcome)
}

/// A retention policy keeping the last snapshot tagged `fault`, then pruning.
const KEEP_ONE: &str = "apiVersion: backup.resticbackup.io/v1alpha1\nkind: GlobalRetentionPolicy\n\
    metadata: {name: keep-one}\nspec:\n  repositoryRef: {name: main}\n  schedule: '@yearly'\n  \
    groupBy: []\n  prune: true\n  policies:\n  - {selector: {tags: [fault]}, retention: {keepLast: 1}}\n";

/// The steps of a retention run, as the ids of its agent runs end: the size read, the one
/// policy's forget, the prune.
const RETENTION_STEPS: [&str; 3] = ["size-before", "p0", "prune"];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn coordinator_sigkilled_mid_retention() -> Result<()> {
    let n = repeats(20);
    let mut row = Row::new(
        "1c-coordinator-mid-retention",
        "coordinator SIGKILL mid-retention",
        n,
        "each forget and prune ran at most once; status right ≤ 10 s after restart; no run left in activeRun",
    );
    let outcome = async {
        let mut node = Node::start("fault-coord-retention").await?;
        // A server of its own, frozen to hold each step in flight while the coordinator dies.
        let s3 = S3Server::start(&node.dir.join("s3"))?;
        let repo = ResticRepo {
            url: s3.endpoint.repository("retention", "main"),
            password: "password-of-retention".into(),
            s3: s3.endpoint.clone(),
        };
        node.repository("main", &repo).await?;
        node.wait_repository_reason("main", "RepositoryInitialized", Duration::from_secs(60))
            .await?;
        let source = node.dir.join("retention-source");
        std::fs::create_dir_all(&source)?;
        let snapshot = |i: usize| -> Result<()> {
            std::fs::write(source.join("data.bin"), pseudo_random(256 << 10, 500 + i as u64))?;
            let out = repo
                .restic()?
                .args(["backup", "--host", "fault", "--tag", "fault"])
                .arg(&source)
                .output()?;
            ensure!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
            Ok(())
        };
        snapshot(0)?;
        node.apply_yaml(KEEP_ONE).await?;
        let policies = node.policies();
        let agent = node.agent_client().await?;
        let idle = || async {
            let runs = support::runs(&agent).await?;
            let busy = runs.iter().any(|r| r.state != pb::RunState::Finished as i32);
            Ok((!busy).then_some(()))
        };
        let (mut late, mut caught, mut wrong, mut twice) = (Vec::new(), 0, Vec::new(), Vec::new());
        for i in 0..n {
            snapshot(i + 1)?;
            let step = RETENTION_STEPS[i % RETENTION_STEPS.len()];
            // The first step starts at once: the server is frozen before the trigger, once the
            // statistics read after the last run is done (retention waits for it, and it
            // would wait for the frozen server).
            let frozen_first = step == RETENTION_STEPS[0];
            if frozen_first {
                // Idle twice, a second apart: the read starts a moment after the run's end.
                eventually("the agent idle", Duration::from_secs(60), idle).await?;
                tokio::time::sleep(Duration::from_secs(1)).await;
                eventually("the agent idle", Duration::from_secs(60), idle).await?;
                s3.pause()?;
            }
            let trigger = format!("kill-{i}");
            policies
                .patch(
                    "keep-one",
                    &kube::api::PatchParams::default(),
                    &kube::api::Patch::Merge(json!({"spec": {"manualTrigger": trigger}})),
                )
                .await?;
            let run_id = eventually("the retention run", Duration::from_secs(30), || async {
                let p = policies.get("keep-one").await?;
                Ok(p.status.and_then(|s| s.active_run).map(|a| a.run_id))
            })
            .await?;
            let target = format!("{run_id}-{step}");
            let waited = Instant::now();
            while !support::runs(&agent).await?.iter().any(|r| r.run_id == target) {
                ensure!(
                    waited.elapsed() < Duration::from_secs(60),
                    "{target} never reached the agent"
                );
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            if !frozen_first {
                s3.pause()?;
            }
            let in_flight = support::runs(&agent)
                .await?
                .iter()
                .any(|r| r.run_id == target && r.state != pb::RunState::Finished as i32);
            caught += usize::from(in_flight);
            node.coordinators[0].kill();
            node.coordinators.clear();
            node.start_coordinator("coordinator-a").await?;
            let restarted = now_ms();
            s3.resume()?;
            let status = eventually("the retention run's end", Duration::from_secs(90), || async {
                let p = policies.get("keep-one").await?;
                Ok(p.status.filter(|s| {
                    s.active_run.is_none() && s.last_manual_trigger.as_deref() == Some(trigger.as_str())
                }))
            })
            .await
            .with_context(|| node.coordinator_log())?;
            let seen = now_ms();
            let steps: Vec<pb::RunInfo> = support::runs(&agent)
                .await?
                .into_iter()
                .filter(|r| r.run_id.starts_with(&format!("{run_id}-")))
                .collect();
            let of = |k: pb::RunKind| steps.iter().filter(|r| r.kind == k as i32).count();
            if of(pb::RunKind::Forget) != 1 || of(pb::RunKind::Prune) != 1 {
                twice.push(format!(
                    "{run_id}: {} forgets, {} prunes",
                    of(pb::RunKind::Forget),
                    of(pb::RunKind::Prune)
                ));
            }
            // A forget run again would have found nothing left to remove.
            let result = status.last_run_result.map(|r| r.to_string()).unwrap_or_default();
            if result != "Succeeded" || status.snapshots_removed != Some(1) {
                wrong.push(format!(
                    "{run_id}: {result}, removed {:?}, {:?}",
                    status.snapshots_removed, status.message
                ));
            }
            let ended = steps.iter().map(|r| r.finished_unix_ms).max().unwrap_or(seen);
            late.push(Duration::from_millis((seen - restarted.max(ended)).max(0) as u64));
        }
        // The statistics read after the last run holds a live lock while it runs.
        eventually("the agent idle", Duration::from_secs(60), idle).await?;
        let left = restic_snapshots(&repo)?.len();
        let locks = repo.lock_ids()?.len();
        row.measured = format!(
            "{caught} of {n} kills with the step in flight (size read, forget, prune in turn; the \
             others between steps); forgets or prunes run twice: {}; wrong results: {}; status \
             right {} after restart or the run's end; snapshots left {left} (kept 1), locks left {locks}",
            twice.len(),
            wrong.len(),
            spread(late.clone())
        );
        if !wrong.is_empty() || !twice.is_empty() {
            eprintln!("{wrong:?} {twice:?}");
        }
        let max = late.iter().max().copied().unwrap_or_default();
        Ok(twice.is_empty() && wrong.is_empty() && left == 1 && locks == 0 && max <= Duration::from_secs(10))
    }
    .await;
    record(row, outcome)
}
