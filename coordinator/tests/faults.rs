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
use restic_operator_e2e::eventually;
use restic_operator_e2e::fixtures::pseudo_random;
use serde_json::json;
use support::{Node, ready_repository, restic_snapshots, wait_dispatched};
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

/// The repository's locks, read without taking one.
fn locks(repo: &restic_operator_e2e::ResticRepo) -> Result<Vec<String>> {
    let out = repo.restic()?.args(["list", "locks", "--no-lock"]).output()?;
    ensure!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    Ok(String::from_utf8(out.stdout)?
        .lines()
        .map(str::to_owned)
        .collect())
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
    let mut row = Row {
        slug: "1-coordinator-mid-backup",
        fault: "coordinator SIGKILL mid-backup",
        repeats: n,
        must_hold: "exactly one snapshot per run; status right ≤ 10 s after restart; no run left in activeRun",
        measured: String::new(),
        held: true,
    };
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
    let mut row = Row {
        slug: "2-agent-mid-backup",
        fault: "agent SIGKILL mid-backup",
        repeats: n,
        must_hold: "the run ends Failed with a reason ≤ 30 s; the next run succeeds; no dead restic's lock blocks prune",
        measured: String::new(),
        held: true,
    };
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
                Ok(locks(&repo)?.is_empty().then_some(()))
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
    let mut row = Row {
        slug: "6-bucket-missing",
        fault: "bucket missing, repository new (no region set)",
        repeats: 1,
        must_hold: "init creates it; Ready within 30 s",
        measured: String::new(),
        held: true,
    };
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
