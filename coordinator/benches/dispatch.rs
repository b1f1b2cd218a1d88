//! Coordinator benchmark: dispatch latency (manual trigger → restic running on the agent,
//! p50/p99 over 100 runs) and the coordinator's memory with 1,000 ResticBackups.
//! Prints figures; it does not pass or fail on them.
//!
//! `cargo bench -p restic-operator-coordinator --bench dispatch`

#[path = "../tests/support/mod.rs"]
mod support;

use std::time::Duration;

use anyhow::{Context, Result};
use chrono::Utc;
use kube::api::{ListParams, Patch, PatchParams};
use restic_operator_e2e::eventually;
use restic_operator_proto::v1 as pb;
use support::Node;

const RUNS: usize = 100;
const BACKUPS: usize = 1000;

fn proc_status(pid: u32, field: &str) -> Option<f64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    text.lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|kb| kb.parse::<f64>().ok())
        .map(|kb| kb / 1024.0)
}

fn percentile(sorted: &[i64], p: f64) -> i64 {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i]
}

async fn bench() -> Result<()> {
    let node = Node::start("bench-dispatch").await?;
    let repo = node.ctx.repository("main");
    node.repository("main", &repo).await?;
    node.wait_repository_reason("main", "RepositoryInitialized", Duration::from_secs(60))
        .await?;
    let (_, data) = node.app_pod("app-0", "app", "data").await?;
    std::fs::write(data.join("file"), b"small")?;
    node.apply_yaml(
        "apiVersion: backup.resticbackup.io/v1alpha1\nkind: ResticBackup\nmetadata: {name: app}\n\
         spec: {repositoryRef: {name: main}, schedule: '@yearly', source: {podVolumeBackup: {selector: {matchLabels: {app: app}}, volumeName: data}}}",
    )
    .await?;
    let agent = node.agent_client().await?;
    let mut latencies = Vec::new();
    for i in 0..RUNS {
        let trigger = format!("bench-{i}");
        let t0 = Utc::now().timestamp_millis();
        node.trigger("app", &trigger).await?;
        let run_id = eventually("the run in status", Duration::from_secs(10), || async {
            Ok(node
                .backups()
                .get("app")
                .await?
                .status
                .and_then(|s| s.active_run)
                .map(|a| a.run_id))
        })
        .await?;
        let started = eventually("restic running", Duration::from_secs(10), || {
            let mut agent = agent.clone();
            let run_id = run_id.clone();
            async move {
                let runs = agent.list_runs(pb::ListRunsRequest {}).await?.into_inner().runs;
                Ok(runs
                    .into_iter()
                    .find(|r| r.run_id == run_id && r.started_unix_ms > 0)
                    .map(|r| r.started_unix_ms))
            }
        })
        .await?;
        latencies.push(started - t0);
        node.wait_finished("app", i as i64, Duration::from_secs(60))
            .await?;
    }
    latencies.sort();
    println!(
        "dispatch latency over {RUNS} manual triggers (patch → restic started on the agent): p50 {} ms, p99 {} ms, max {} ms",
        percentile(&latencies, 0.5),
        percentile(&latencies, 0.99),
        latencies.last().unwrap()
    );

    // Memory with many ResticBackups.
    let pid = node.coordinators[0].process.child.id();
    let before = proc_status(pid, "VmRSS:").unwrap_or_default();
    let api = node.backups();
    let pp = PatchParams::apply("bench");
    for i in 0..BACKUPS {
        let manifest = serde_json::json!({
            "apiVersion": "backup.resticbackup.io/v1alpha1", "kind": "ResticBackup",
            "metadata": {"name": format!("b-{i:04}")},
            "spec": {"repositoryRef": {"name": "main"}, "schedule": format!("{} {} * * *", i % 60, (i / 60) % 24),
                     "timezone": "Europe/Berlin",
                     "source": {"podVolumeBackup": {"selector": {"matchLabels": {"app": format!("a{i}")}}, "volumeName": "data"}},
                     "retention": {"enabled": true, "policy": {"keepDaily": 7}}}
        });
        api.patch(&format!("b-{i:04}"), &pp, &Patch::Apply(&manifest))
            .await?;
    }
    let t = std::time::Instant::now();
    eventually("every backup scheduled", Duration::from_secs(600), || async {
        let list = api.list(&ListParams::default()).await?;
        let scheduled = list
            .items
            .iter()
            .filter(|b| b.status.as_ref().is_some_and(|s| s.next_backup.is_some()))
            .count();
        Ok((scheduled > BACKUPS).then_some(()))
    })
    .await
    .context("scheduling 1,000 backups")?;
    let settle = t.elapsed();
    tokio::time::sleep(Duration::from_secs(5)).await;
    println!(
        "coordinator memory: {before:.1} MiB RSS before, {:.1} MiB RSS with {BACKUPS} ResticBackups (peak {:.1} MiB); all scheduled {:.1}s after the last create",
        proc_status(pid, "VmRSS:").unwrap_or_default(),
        proc_status(pid, "VmHWM:").unwrap_or_default(),
        settle.as_secs_f64()
    );
    Ok(())
}

fn main() -> Result<()> {
    if std::env::args().any(|a| a == "--list") {
        return Ok(());
    }
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?
        .block_on(bench())
}
