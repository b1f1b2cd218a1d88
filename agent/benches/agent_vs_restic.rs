//! Benchmark (reports, never fails on time): a backup through the agent against restic run
//! directly, on the same data and the same S3 server, first and unchanged-incremental; a
//! restore of that snapshot through the agent (what a ResticRestore runs) against a plain
//! `restic restore` of the same snapshot (five of each, alternated; the medians); plus the
//! agent process's peak memory.
//!
//!     cargo bench -p restic-operator-agent --bench agent_vs_restic [-- <MiB>]

#[path = "../tests/support/mod.rs"]
mod support;

use std::time::{Duration, Instant};

use anyhow::{Result, ensure};
use restic_operator_e2e::fixtures::pseudo_random;
use restic_operator_e2e::{s3_repository, unique_name};
use restic_operator_proto::v1::{self as pb, Outcome};
use support::{Agent, backup, collect, init, options, pod_uid, repository};

fn vm_hwm_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

#[tokio::main]
async fn main() -> Result<()> {
    let mib: usize = std::env::args()
        .skip(1)
        .find_map(|a| a.parse().ok())
        .unwrap_or(256);
    let agent = Agent::start("bench")?;
    let uid = pod_uid(1);
    let data = agent.volume(&uid, "kubernetes.io~empty-dir", "data")?;
    // Half large files, half many small ones: both paths of restic's archiver.
    for i in 0..(mib / 2) {
        std::fs::write(
            data.join(format!("large-{i:04}")),
            pseudo_random(1 << 20, i as u64),
        )?;
    }
    let small = data.join("small");
    std::fs::create_dir_all(&small)?;
    for i in 0..(mib / 2 * 64) {
        std::fs::write(
            small.join(format!("f{i:06}")),
            pseudo_random(16 << 10, 1_000_000 + i as u64),
        )?;
    }
    let files = mib / 2 + mib / 2 * 64;
    println!("data: {mib} MiB in {files} files; restic 0.18.1, S3 on loopback, no cache for either");

    let bucket = unique_name("bench");
    let via_agent = s3_repository(&bucket, "agent");
    let direct = s3_repository(&bucket, "direct");
    let mut client = agent.client().await?;
    init(&mut client, &via_agent, "init").await?;
    ensure!(direct.restic()?.arg("init").output()?.status.success());

    let mut rows = Vec::new();
    let mut snapshot = String::new();
    for (round, label) in ["first", "unchanged"].iter().enumerate() {
        let t = Instant::now();
        let (_, r) = collect(
            client
                .backup(backup(&format!("bench-{round}"), &via_agent, &uid, "data"))
                .await?
                .into_inner(),
        )
        .await?;
        let agent_time = t.elapsed();
        ensure!(r.outcome == Outcome::Succeeded as i32, "{r:?}");
        snapshot = r.snapshot_id.clone();

        let t = Instant::now();
        let out = direct
            .restic()?
            .current_dir(&data)
            .args(["backup", "--host", "app", "--tag", "e2e", "."])
            .output()?;
        let direct_time = t.elapsed();
        ensure!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        rows.push((*label, agent_time, direct_time));
    }
    // Restores vary a lot from one to the next on a busy 2-core machine: five of each,
    // alternated, and the median of each side.
    let (mut via, mut plain) = (Vec::new(), Vec::new());
    for round in 0..5 {
        via.push(restore_via_agent(&agent, &mut client, &via_agent, &snapshot, round).await?);
        // What a user runs instead: a plain restore of the same snapshot, into an empty
        // directory on the same disk.
        let scratch = agent.volume(&pod_uid(100 + round), "kubernetes.io~empty-dir", "scratch")?;
        let t = Instant::now();
        let out = via_agent
            .restic()?
            .args(["restore", &format!("{snapshot}:/data"), "--target"])
            .arg(&scratch)
            .output()?;
        ensure!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        plain.push(t.elapsed());
    }
    let median = |v: &mut Vec<Duration>| {
        v.sort();
        v[v.len() / 2]
    };
    println!("restores through the agent: {via:.2?}; plain restic: {plain:.2?}");
    rows.push(("restore", median(&mut via), median(&mut plain)));
    println!(
        "{:<12} {:>12} {:>14} {:>10}",
        "run", "agent", "restic direct", "overhead"
    );
    for (label, a, d) in &rows {
        let pct = (a.as_secs_f64() / d.as_secs_f64() - 1.0) * 100.0;
        println!(
            "{:<12} {:>11.2}s {:>13.2}s {:>9.1}%",
            label,
            secs(*a),
            secs(*d),
            pct
        );
    }
    println!(
        "agent process peak RSS (VmHWM): {:.1} MiB",
        vm_hwm_kib(agent.pid()) as f64 / 1024.0
    );
    Ok(())
}

/// Restores `snapshot` through the agent into an empty volume of another pod; its duration.
async fn restore_via_agent(
    agent: &Agent,
    client: &mut restic_operator_proto::v1::agent_client::AgentClient<tonic::transport::Channel>,
    repo: &restic_operator_e2e::ResticRepo,
    snapshot: &str,
    round: u32,
) -> Result<Duration> {
    let uid = pod_uid(10 + round);
    agent.volume(&uid, "kubernetes.io~empty-dir", "restore")?;
    let request = pb::RestoreRequest {
        options: Some(options(&format!("bench-restore-{round}"))),
        repository: Some(repository(repo)),
        volume: Some(pb::VolumeRef {
            pod_uid: uid,
            volume_name: "restore".into(),
            pv_name: String::new(),
        }),
        snapshot_id: snapshot.to_owned(),
        ..Default::default()
    };
    let t = Instant::now();
    let (_, r) = collect(client.restore(request).await?.into_inner()).await?;
    let took = t.elapsed();
    ensure!(r.outcome == Outcome::Succeeded as i32, "{r:?}");
    Ok(took)
}

fn secs(d: Duration) -> f64 {
    d.as_secs_f64()
}
