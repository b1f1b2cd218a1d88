//! The fault suite: parts of the system killed, restarted or missing, over many repeats, with
//! what must hold measured on the real control plane, S3 server, restic, coordinator and
//! agent. Each test writes its row of the table (see `table`); `e2e/scripts/faults.sh` runs
//! the suite and prints the table. `FAULT_REPEATS` lowers the repeat counts for a quick local
//! run; CI runs the full counts.

mod support;
#[path = "faults/table.rs"]
mod table;

use std::collections::HashSet;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use restic_operator_api::restore::RestorePhase;
use restic_operator_e2e::eventually;
use restic_operator_e2e::fixtures::assert_trees_equal;
use restic_operator_e2e::fixtures::pseudo_random;
use restic_operator_proto::v1 as pb;
use serde_json::json;
use support::{
    Node, backed_up, backup_yaml, live_claim, ready_repository, restic_snapshots, restore_yaml,
    wait_dispatched,
};
use table::{Row, spread};

/// The repeat count of a row: `default`, or `FAULT_REPEATS` when set lower.
fn repeats(default: usize) -> usize {
    std::env::var("FAULT_REPEATS")
        .ok()
        .and_then(|v| v.parse().ok())
        .map_or(default, |n: usize| n.clamp(1, default))
}

fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

/// A backup of `db-0`'s volume slow enough to be caught in flight: 512 KiB/s upload.
const SLOW_BACKUP: &str = "apiVersion: backup.resticbackup.io/v1alpha1\nkind: ResticBackup\n\
    metadata: {name: db}\nspec:\n  repositoryRef: {name: main}\n  schedule: '@yearly'\n  \
    source: {podVolumeBackup: {selector: {matchLabels: {app: db}}, volumeName: data}}\n  \
    restic: {extraArgs: ['--limit-upload=512']}\n";

/// New data for repeat `i` (1.5 MiB, about 3 s to upload), in place of the last repeat's.
fn fresh_data(data: &Path, i: usize) -> Result<()> {
    let _ = std::fs::remove_file(data.join(format!("dump-{}.bin", i.wrapping_sub(1))));
    std::fs::write(
        data.join(format!("dump-{i}.bin")),
        pseudo_random(3 << 19, 1000 + i as u64),
    )?;
    Ok(())
}

/// Records the row, failing it with the error when the fault's run did not complete.
fn record(mut row: Row<'_>, outcome: Result<bool>) -> Result<()> {
    match outcome {
        Ok(held) => {
            row.held &= held;
            row.record();
            ensure!(row.held, "{}: {}", row.fault, row.measured);
            Ok(())
        }
        Err(e) => {
            row.held = false;
            row.measured = format!("{} — stopped: {e:#}", row.measured)
                .lines()
                .next()
                .unwrap_or_default()
                .to_owned();
            row.record();
            Err(e)
        }
    }
}

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
            let done = node
                .wait_finished("db", i as i64, Duration::from_secs(90))
                .await?;
            let seen = now_ms();
            let last = done.status.and_then(|s| s.last_backup).context("no lastBackup")?;
            let ok = last.run_id.as_deref() == Some(run_id.as_str())
                && last.result.map(|r| r.to_string()).as_deref() == Some("Succeeded");
            if !ok {
                wrong.push(format!("{run_id}: {last:?}"));
            }
            ids.extend(last.snapshot_id);
            let ended = node
                .agent_runs()
                .await?
                .into_iter()
                .find(|r| r.run_id == run_id)
                .map_or(seen, |r| r.finished_unix_ms);
            late.push(Duration::from_millis((seen - restarted.max(ended)).max(0) as u64));
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
