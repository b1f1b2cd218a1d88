//! Coordinator benchmark, printing figures and never failing on them:
//! - dispatch latency with one backup due: manual trigger → run accepted by the agent →
//!   restic started, p50/p99 over 100 runs one after another;
//! - the status writes of one run (every change to the ResticBackup between the trigger and
//!   the run's record, seen by a watch);
//! - dispatch with 100 backups due at once on one node (100 manual triggers sent together):
//!   how long until every run was accepted (started, or queued behind the agent's limit), and
//!   when restic started for each;
//! - the coordinator's memory and reconcile latency (p99, from its own histogram) with 1,000
//!   and then 10,000 ResticBackups.
//!
//! `cargo bench -p restic-operator-coordinator --bench dispatch`; `BENCH_RUNS`, `BENCH_DUE` and
//! `BENCH_BACKUPS` (`1000,10000`) change the counts, and `BENCH_MARKDOWN=<file>` also writes
//! the figures there as Markdown.

#[path = "../tests/support/mod.rs"]
mod support;

use std::time::Duration;

use anyhow::{Context, Result};
use chrono::Utc;
use futures::StreamExt;
use kube::api::{ListParams, Patch, PatchParams, WatchEvent, WatchParams};
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
    let mut md = String::new();
    let line = format!(
        "| one backup due ({runs} manual triggers, one after another) | trigger → run accepted by the agent p50 {} ms, p99 {} ms; \
         trigger → restic started p50 {} ms, p99 {} ms, max {} ms |\n",
        percentile(&accepted, 0.5),
        percentile(&accepted, 0.99),
        percentile(&latencies, 0.5),
        percentile(&latencies, 0.99),
        latencies.last().unwrap()
    );
    print!("{line}");
    md.push_str("| figure | measured |\n| --- | --- |\n");
    md.push_str(&line);
    let mut goals: Vec<(String, String, bool)> = Vec::new();
    let p99 = percentile(&latencies, 0.99);
    goals.push((
        "dispatch with one due: trigger → restic started p99 ≤ 300 ms".into(),
        format!("{p99} ms"),
        p99 <= 300,
    ));

    // The writes of one run: every change to the ResticBackup after the trigger's own.
    let before = node.backups().get("app").await?;
    let rv = before.metadata.resource_version.clone().unwrap_or_default();
    let mut stream = node
        .backups()
        .watch(&WatchParams::default().fields("metadata.name=app"), &rv)
        .await?
        .boxed();
    let triggered = node
        .backups()
        .patch(
            "app",
            &PatchParams::default(),
            &Patch::Merge(serde_json::json!({"spec": {"manualTrigger": "bench-writes"}})),
        )
        .await?;
    let rv_number = |b: &restic_operator_api::backup::ResticBackup| {
        b.metadata
            .resource_version
            .as_deref()
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
    };
    let trigger_rv = rv_number(&triggered);
    let mut writes = 0;
    let mut progress_writes = 0;
    tokio::time::timeout(Duration::from_secs(120), async {
        while let Some(event) = stream.next().await {
            let event = event?;
            if verbose {
                match &event {
                    WatchEvent::Modified(b) => eprintln!(
                        "modified rv {:?} active {:?} last {:?}",
                        b.metadata.resource_version,
                        b.status
                            .as_ref()
                            .and_then(|s| s.active_run.as_ref())
                            .map(|a| &a.run_id),
                        b.status
                            .as_ref()
                            .and_then(|s| s.last_backup.as_ref())
                            .map(|l| &l.completion_time)
                    ),
                    other => eprintln!("event {other:?}"),
                }
            }
            let WatchEvent::Modified(b) = event else {
                continue;
            };
            if rv_number(&b) <= trigger_rv {
                // The trigger's own change, or one before it.
                continue;
            }
            writes += 1;
            let status = b.status.unwrap_or_default();
            if status.active_run.is_some() && status.progress.is_some() {
                progress_writes += 1;
            }
            let finished_before = before
                .status
                .as_ref()
                .and_then(|s| s.last_backup.as_ref())
                .and_then(|l| l.completion_time.clone());
            let finished = status
                .last_backup
                .as_ref()
                .and_then(|l| l.completion_time.clone());
            if status.active_run.is_none() && finished.is_some() && finished != finished_before {
                break;
            }
        }
        anyhow::Ok(())
    })
    .await
    .context("watching one run's writes")??;
    // And any that follow the run's record.
    let mut after = 0;
    let _ = tokio::time::timeout(Duration::from_secs(5), async {
        while let Some(Ok(event)) = stream.next().await {
            if matches!(event, WatchEvent::Modified(_)) {
                after += 1;
            }
        }
    })
    .await;
    let line = format!(
        "| writes to the ResticBackup in one run (a small volume, under a second) | {} ({progress_writes} of them while the run was in flight with progress, {after} in the 5 s after its record) |\n",
        writes + after
    );
    print!("{line}");
    md.push_str(&line);
    let status_writes = writes + after - progress_writes;
    goals.push((
        "≤ 3 status writes per run plus at most 1 progress write per interval".into(),
        format!("{status_writes} status writes, {progress_writes} with progress"),
        status_writes <= 3,
    ));

    // Many due at once: one pod and one backup each, triggered together.
    let due = count("BENCH_DUE", 100);
    for i in 0..due {
        let (_, data) = node
            .app_pod(&format!("due-{i}"), &format!("due-{i}"), "data")
            .await?;
        std::fs::write(data.join("file"), format!("due {i}"))?;
        node.apply_yaml(&format!(
            "apiVersion: backup.resticbackup.io/v1alpha1\nkind: ResticBackup\nmetadata: {{name: due-{i}}}\n\
             spec: {{repositoryRef: {{name: main}}, schedule: '@yearly', source: {{podVolumeBackup: {{selector: {{matchLabels: {{app: due-{i}}}}}, volumeName: data}}}}}}"
        ))
        .await?;
    }
    eventually("the due backups scheduled", Duration::from_secs(120), || async {
        let list = node.backups().list(&ListParams::default()).await?;
        let ready = list
            .items
            .iter()
            .filter(|b| b.metadata.name.as_deref().is_some_and(|n| n.starts_with("due-")))
            .filter(|b| b.status.as_ref().is_some_and(|s| s.next_backup.is_some()))
            .count();
        Ok((ready == due).then_some(()))
    })
    .await?;
    let known: std::collections::HashSet<String> = support::runs(&agent)
        .await?
        .into_iter()
        .map(|r| r.run_id)
        .collect();
    let t0 = Utc::now().timestamp_millis();
    futures::future::try_join_all((0..due).map(|i| {
        let node = &node;
        async move { node.trigger(&format!("due-{i}"), "now").await }
    }))
    .await?;
    let triggered = Utc::now().timestamp_millis() - t0;
    let new_runs = || async {
        Ok::<_, anyhow::Error>(
            support::runs(&agent)
                .await?
                .into_iter()
                .filter(|r| !known.contains(&r.run_id))
                .collect::<Vec<_>>(),
        )
    };
    eventually("every due run accepted", Duration::from_secs(60), || async {
        Ok((new_runs().await?.len() >= due).then_some(()))
    })
    .await?;
    let mut all_accepted: Vec<i64> = new_runs().await?.iter().map(|r| r.created_unix_ms - t0).collect();
    all_accepted.sort();
    eventually("every due run started", Duration::from_secs(600), || async {
        let runs = new_runs().await?;
        Ok(runs.iter().all(|r| r.started_unix_ms > 0).then_some(()))
    })
    .await?;
    let mut started: Vec<i64> = new_runs().await?.iter().map(|r| r.started_unix_ms - t0).collect();
    started.sort();
    let line = format!(
        "| {due} backups due at once on one node (agent: 2 at once) | triggers sent in {triggered} ms; every run accepted (started or queued) {} ms after the first trigger (p50 {} ms); \
         restic started p50 {} ms, last {} ms (the queue drains at the agent's limit) |\n",
        all_accepted.last().unwrap(),
        percentile(&all_accepted, 0.5),
        percentile(&started, 0.5),
        started.last().unwrap(),
    );
    print!("{line}");
    md.push_str(&line);
    let last = *all_accepted.last().unwrap();
    goals.push((
        format!("{due} due at once: all started or queued ≤ 2 s"),
        format!("{last} ms"),
        last <= 2000,
    ));
    // Their last writes and reconciles are not the next step's.
    for i in 0..due {
        node.wait_finished(&format!("due-{i}"), 0, Duration::from_secs(600))
            .await?;
    }

    // Memory and reconcile latency with many ResticBackups.
    let stages: Vec<usize> = std::env::var("BENCH_BACKUPS")
        .unwrap_or_else(|_| "1000,10000".into())
        .split(',')
        .filter_map(|n| n.trim().parse().ok())
        .collect();
    let pid = node.coordinators[0].process.child.id();
    let api = node.backups();
    let pp = PatchParams::apply("bench");
    let mut created = 0;
    for stage in stages {
        let rss_before = proc_status(pid, "VmRSS:").unwrap_or_default();
        let histogram_before = reconcile_histogram(&node.coordinators[0].metrics()?);
        let t = std::time::Instant::now();
        while created < stage {
            let i = created;
            let manifest = serde_json::json!({
                "apiVersion": "backup.resticbackup.io/v1alpha1", "kind": "ResticBackup",
                "metadata": {"name": format!("b-{i:05}")},
                "spec": {"repositoryRef": {"name": "main"}, "schedule": format!("{} {} * * *", i % 60, (i / 60) % 24),
                         "timezone": "Europe/Berlin",
                         "source": {"podVolumeBackup": {"selector": {"matchLabels": {"app": format!("a{i}")}}, "volumeName": "data"}},
                         "retention": {"enabled": true, "policy": {"keepDaily": 7}}}
            });
            api.patch(&format!("b-{i:05}"), &pp, &Patch::Apply(&manifest))
                .await?;
            created += 1;
        }
        let create_time = t.elapsed();
        let t = std::time::Instant::now();
        eventually("every backup scheduled", Duration::from_secs(1200), || async {
            let list = api.list(&ListParams::default()).await?;
            let scheduled = list
                .items
                .iter()
                .filter(|b| b.metadata.name.as_deref().is_some_and(|n| n.starts_with("b-")))
                .filter(|b| b.status.as_ref().is_some_and(|s| s.next_backup.is_some()))
                .count();
            Ok((scheduled >= stage).then_some(()))
        })
        .await
        .context("scheduling the backups")?;
        let settle = t.elapsed();
        tokio::time::sleep(Duration::from_secs(5)).await;
        let histogram = reconcile_histogram(&node.coordinators[0].metrics()?);
        let line = format!(
            "| {stage} ResticBackups | coordinator RSS {:.1} MiB (before this step {rss_before:.1} MiB, peak {:.1} MiB); \
             reconcile p50 ≤ {} s, p99 ≤ {} s over this step's {} reconciles (histogram bucket bounds); \
             created in {:.0} s, all scheduled {:.1} s after the last |\n",
            proc_status(pid, "VmRSS:").unwrap_or_default(),
            proc_status(pid, "VmHWM:").unwrap_or_default(),
            bucket_quantile(&histogram_before, &histogram, 0.5),
            bucket_quantile(&histogram_before, &histogram, 0.99),
            histogram.last().map(|b| b.1).unwrap_or(0.0)
                - histogram_before.last().map(|b| b.1).unwrap_or(0.0),
            create_time.as_secs_f64(),
            settle.as_secs_f64()
        );
        print!("{line}");
        md.push_str(&line);
        let rss = proc_status(pid, "VmRSS:").unwrap_or_default();
        let cap = if stage <= 1000 { 64.0 } else { 256.0 };
        goals.push((
            format!("coordinator memory ≤ {cap} MiB with {stage} ResticBackups"),
            format!("{rss:.1} MiB"),
            rss <= cap,
        ));
        let p99 = bucket_quantile(&histogram_before, &histogram, 0.99);
        goals.push((
            format!("reconcile p99 ≤ 50 ms with {stage} ResticBackups"),
            format!("≤ {p99} s"),
            p99.parse::<f64>().is_ok_and(|b| b <= 0.05),
        ));
    }
    md.push_str("\n| goal | measured | verdict |\n| --- | --- | --- |\n");
    for (goal, measured, ok) in goals {
        md.push_str(&format!(
            "| {goal} | {measured} | {} |\n",
            if ok { "met" } else { "missed" }
        ));
    }
    if let Ok(path) = std::env::var("BENCH_MARKDOWN") {
        std::fs::write(path, md)?;
    }
    Ok(())
}

/// The reconcile histogram of every controller summed: (upper bound, cumulative count), by
/// bound, `+Inf` last.
fn reconcile_histogram(metrics: &str) -> Vec<(f64, f64)> {
    let mut buckets: std::collections::BTreeMap<String, (f64, f64)> = Default::default();
    for line in metrics.lines() {
        let Some(rest) = line.strip_prefix("restic_operator_reconcile_duration_seconds_bucket{") else {
            continue;
        };
        let Some((labels, value)) = rest.split_once("} ") else {
            continue;
        };
        let Some(le) = labels
            .split(',')
            .find_map(|l| l.strip_prefix("le=\""))
            .map(|l| l.trim_end_matches('"'))
        else {
            continue;
        };
        let bound = if le == "+Inf" {
            f64::INFINITY
        } else {
            le.parse().unwrap_or(f64::INFINITY)
        };
        let count: f64 = value.trim().parse().unwrap_or(0.0);
        let e = buckets.entry(format!("{bound:020.6}")).or_insert((bound, 0.0));
        e.1 += count;
    }
    let mut v: Vec<(f64, f64)> = buckets.into_values().collect();
    v.sort_by(|a, b| a.0.total_cmp(&b.0));
    v
}

/// The smallest bucket bound below which quantile `q` of the reconciles between `before` and
/// `after` fell.
fn bucket_quantile(before: &[(f64, f64)], after: &[(f64, f64)], q: f64) -> String {
    let base = |bound: f64| before.iter().find(|b| b.0 == bound).map(|b| b.1).unwrap_or(0.0);
    let total = after.last().map(|b| b.1 - base(b.0)).unwrap_or(0.0);
    for (bound, count) in after {
        if count - base(*bound) >= q * total {
            return if bound.is_infinite() {
                "∞".into()
            } else {
                format!("{bound}")
            };
        }
    }
    "∞".into()
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
