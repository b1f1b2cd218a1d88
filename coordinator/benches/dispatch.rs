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
use support::Node;

fn count(var: &str, default: usize) -> usize {
    std::env::var(var)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

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
    let runs = count("BENCH_RUNS", 100);
    let verbose = std::env::var_os("BENCH_VERBOSE").is_some();
    let (mut accepted, mut latencies) = (Vec::new(), Vec::new());
    for i in 0..runs {
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
        let (created, started) = eventually("restic running", Duration::from_secs(10), || async {
            let runs = support::runs(&agent).await?;
            Ok(runs
                .into_iter()
                .find(|r| r.run_id == run_id && r.started_unix_ms > 0)
                .map(|r| (r.created_unix_ms, r.started_unix_ms)))
        })
        .await?;
        if verbose {
            println!(
                "{run_id} trigger {t0} accepted +{} started +{}",
                created - t0,
                started - t0
            );
        }
        accepted.push(created - t0);
        latencies.push(started - t0);
        node.wait_finished("app", i as i64, Duration::from_secs(60))
            .await?;
    }
    accepted.sort();
    latencies.sort();
    println!(
        "dispatch latency over {runs} manual triggers: patch → run accepted by the agent p50 {} ms, p99 {} ms; \
         patch → restic started p50 {} ms, p99 {} ms, max {} ms",
        percentile(&accepted, 0.5),
        percentile(&accepted, 0.99),
        percentile(&latencies, 0.5),
        percentile(&latencies, 0.99),
        latencies.last().unwrap()
    );

    // Memory with many ResticBackups.
    let backups = count("BENCH_BACKUPS", 1000);
    let pid = node.coordinators[0].process.child.id();
    let before = proc_status(pid, "VmRSS:").unwrap_or_default();
    let api = node.backups();
    let pp = PatchParams::apply("bench");
    for i in 0..backups {
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
        Ok((scheduled > backups).then_some(()))
    })
    .await
    .context("scheduling the backups")?;
    let settle = t.elapsed();
    tokio::time::sleep(Duration::from_secs(5)).await;
    println!(
        "coordinator memory: {before:.1} MiB RSS before, {:.1} MiB RSS with {backups} ResticBackups (peak {:.1} MiB); all scheduled {:.1}s after the last create",
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
