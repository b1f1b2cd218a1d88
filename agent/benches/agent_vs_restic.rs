//! Benchmark (prints figures, never fails on time): backups and restores through the agent
//! against what a user would run instead, plain restic with its default cache, on the same data
//! and the same S3 server, in the same run.
//!
//! - The data: a mixed tree, half in 32 MiB files and half in ~10 KiB files (1 GiB: 16 large
//!   files and 51,200 small ones), written once, the page cache dropped before each first
//!   backup.
//! - Backups: the first; an unchanged incremental (five of each, alternated, medians); the
//!   same after the pod was recreated with a new UID (the agent's path changes on the node,
//!   plain restic keeps its path); 1 % of the files changed (three rounds).
//! - CPU-bound: incompressible data already in the page cache, backed up into new
//!   repositories through the agent, with plain restic, and with plain restic's `--dry-run`
//!   (its chunker and hash alone, nothing uploaded); throughput of each.
//! - The fixed cost of a run: a one-file volume, unchanged, through the agent and plain.
//! - Restores of the latest snapshot: five each, alternated, medians (the agent's restore
//!   reads its cache through a layer of its own, see `CacheConfig`; plain restic uses its own).
//! - Memory: the agent's RSS idle, and the peak of the agent plus the restic it runs, against
//!   plain restic's peak, both as the proportional set size (PSS) sampled every 10 ms.
//!
//!     cargo bench -p restic-operator-agent --bench agent_vs_restic [-- <MiB>]
//!
//! With `BENCH_MARKDOWN=<file>` the table is also written there as Markdown (what
//! `e2e/scripts/benchmarks.sh` puts into BENCHMARKS.md).

#[path = "../tests/support/mod.rs"]
mod support;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Result, ensure};
use restic_operator_e2e::fixtures::pseudo_random;
use restic_operator_e2e::{ResticRepo, s3_repository, tools::tool, unique_name};
use restic_operator_proto::v1::{self as pb, Outcome};
use support::{Agent, backup, collect, init, options, pod_uid, repository};

const EMPTY_DIR: &str = "kubernetes.io~empty-dir";

fn status_kib(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

/// The processes below `root` (its children, theirs, ...), from the kernel's per-thread lists
/// of children: cheap enough to read every 10 ms without disturbing what is measured.
fn descendants(root: u32) -> Vec<u32> {
    let mut found = vec![root];
    let mut i = 0;
    while i < found.len() {
        let pid = found[i];
        for task in std::fs::read_dir(format!("/proc/{pid}/task"))
            .into_iter()
            .flatten()
            .flatten()
        {
            let children = std::fs::read_to_string(task.path().join("children")).unwrap_or_default();
            found.extend(children.split_whitespace().filter_map(|c| c.parse::<u32>().ok()));
        }
        i += 1;
    }
    found.remove(0);
    found
}

/// A process's proportional set size (KiB): its private memory plus its share of pages it
/// shares with others (the agent's binary, mapped by the agent and its sandbox helpers, counts
/// once), as the kernel charges memory to a cgroup.
fn pss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("Pss:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

/// Samples, every 10 ms until finished, the memory (PSS) of `root` and every process below it,
/// and keeps the largest sum (KiB). The same measure for the agent with its restic and for
/// plain restic.
struct Sampler {
    stop: Arc<AtomicBool>,
    peak: Arc<AtomicU64>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Sampler {
    fn start(root: u32) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let peak = Arc::new(AtomicU64::new(0));
        let (s, p) = (Arc::clone(&stop), Arc::clone(&peak));
        let thread = std::thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                let own = pss_kib(root);
                let parts: Vec<(u32, u64)> = descendants(root).iter().map(|c| (*c, pss_kib(*c))).collect();
                let below: u64 = parts.iter().map(|(_, k)| k).sum();
                if p.fetch_max(own + below, Ordering::Relaxed) < own + below
                    && std::env::var_os("BENCH_VERBOSE").is_some()
                {
                    let names: Vec<String> = parts
                        .iter()
                        .map(|(pid, k)| {
                            let comm =
                                std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
                            format!("{} {} KiB", comm.trim(), k)
                        })
                        .collect();
                    eprintln!("peak: root {own} KiB + {names:?}");
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        });
        Self {
            stop,
            peak,
            thread: Some(thread),
        }
    }

    fn finish(mut self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        self.peak.load(Ordering::Relaxed)
    }
}

/// Plain restic as a user runs it: the repository's environment and restic's default cache
/// (under `$XDG_CACHE_HOME`).
struct Plain {
    repo: ResticRepo,
    cache: PathBuf,
    /// The largest peak PSS of a plain restic run so far (KiB).
    peak_kib: u64,
}

impl Plain {
    fn run(&mut self, args: &[&str], dir: &Path) -> Result<Duration> {
        let mut cmd = Command::new(tool("restic")?);
        cmd.env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env("XDG_CACHE_HOME", &self.cache)
            .envs(self.repo.env())
            .current_dir(dir)
            .args(args)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped());
        let t = Instant::now();
        let child = cmd.spawn()?;
        let sampler = Sampler::start(child.id());
        let out = child.wait_with_output()?;
        let took = t.elapsed();
        self.peak_kib = self.peak_kib.max(sampler.finish());
        ensure!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        Ok(took)
    }
}

struct Row {
    label: &'static str,
    agent: Duration,
    plain: Duration,
    note: String,
}

fn median(v: &mut [Duration]) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn drop_page_cache() -> bool {
    let _ = Command::new("sync").status();
    std::fs::write("/proc/sys/vm/drop_caches", "3").is_ok()
}

fn make_data(root: &Path, mib: usize) -> Result<usize> {
    let large = (mib / 2).div_ceil(32);
    for i in 0..large {
        std::fs::write(
            root.join(format!("large-{i:03}")),
            pseudo_random(32 << 20, i as u64),
        )?;
    }
    let small = mib / 2 * 100;
    for i in 0..small {
        let dir = root.join(format!("small/{:03}", i / 256));
        if i % 256 == 0 {
            std::fs::create_dir_all(&dir)?;
        }
        std::fs::write(
            dir.join(format!("f{i:06}")),
            pseudo_random(10 << 10, 1_000_000 + i as u64),
        )?;
    }
    Ok(large + small)
}

/// Rewrites 1 % of the small files and one large file's first MiB: round `round`'s change.
fn change_one_percent(root: &Path, mib: usize, round: u64) -> Result<usize> {
    let small = mib / 2 * 100;
    let mut changed = 0;
    for i in (round as usize..small).step_by(100) {
        let f = root.join(format!("small/{:03}/f{i:06}", i / 256));
        std::fs::write(
            f,
            pseudo_random(10 << 10, 9_000_000 + round * 1_000_000 + i as u64),
        )?;
        changed += 1;
    }
    let large = root.join(format!("large-{:03}", round as usize % (mib / 2).div_ceil(32)));
    let mut bytes = std::fs::read(&large)?;
    bytes[..1 << 20].copy_from_slice(&pseudo_random(1 << 20, 77_000 + round));
    std::fs::write(large, bytes)?;
    Ok(changed + 1)
}

#[tokio::main]
async fn main() -> Result<()> {
    let mib: usize = std::env::args()
        .skip(1)
        .find_map(|a| a.parse().ok())
        .unwrap_or(1024);
    let agent = Agent::start("bench")?;
    let mut uid = pod_uid(1);
    let data = agent.volume(&uid, EMPTY_DIR, "data")?;
    let files = make_data(&data, mib)?;
    // Plain restic keeps one path whatever the pod's UID: a bind mount of the volume, which
    // follows the directory when the agent's pod directory is renamed.
    let view = agent.dir.join("plain-view");
    std::fs::create_dir_all(&view)?;
    ensure!(
        Command::new("mount")
            .args(["--bind"])
            .arg(&data)
            .arg(&view)
            .status()?
            .success(),
        "bind mount for plain restic"
    );
    struct Unmount(PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = Command::new("umount").arg("-l").arg(&self.0).status();
        }
    }
    let _unmount = Unmount(view.clone());

    // Three repositories a side: the first backup is measured three times, alternated.
    let bucket = unique_name("bench");
    let agent_repos: Vec<ResticRepo> = (0..3)
        .map(|i| s3_repository(&bucket, &format!("agent-{i}")))
        .collect();
    let plain_repos: Vec<ResticRepo> = (0..3)
        .map(|i| s3_repository(&bucket, &format!("plain-{i}")))
        .collect();
    let mut plain = Plain {
        repo: plain_repos[0].clone(),
        cache: agent.dir.join("plain-cache"),
        peak_kib: 0,
    };
    let mut client = agent.client().await?;
    for (i, (a, p)) in agent_repos.iter().zip(&plain_repos).enumerate() {
        // One run id per init: a run id the agent knows returns that run's result.
        init(&mut client, a, &format!("init-{i}")).await?;
        plain.repo = p.clone();
        plain.run(&["init"], &view)?;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let agent_idle_kib = status_kib(agent.pid(), "VmRSS:");
    // Peaks (KiB) per phase: (phase, agent plus restic, plain restic).
    let mut peaks: Vec<(&'static str, u64, u64)> = Vec::new();
    let mut agent_peak_kib = 0u64;

    let cached = |run: &str, uid: &str, repo: &ResticRepo| {
        let mut req = backup(run, repo, uid, "data");
        req.options.as_mut().unwrap().restic = Some(pb::ResticOptions {
            use_cache: true,
            ..Default::default()
        });
        req
    };
    let plain_backup = ["backup", "--host", "app", "--tag", "e2e", "."];
    let mut n = 0;
    let mut through_agent =
        async |uid: &str, repo: &ResticRepo, peak: &mut u64| -> Result<(Duration, pb::BackupSummary)> {
            n += 1;
            let sampler = Sampler::start(agent.pid());
            let t = Instant::now();
            let (_, r) = collect(
                client
                    .backup(cached(&format!("bench-{n}"), uid, repo))
                    .await?
                    .into_inner(),
            )
            .await?;
            let took = t.elapsed();
            *peak = (*peak).max(sampler.finish());
            ensure!(r.outcome == Outcome::Succeeded as i32, "{r:?}");
            Ok((took, r.backup.unwrap_or_default()))
        };

    let mut rows = Vec::new();
    let (mut a, mut p) = (Vec::new(), Vec::new());
    let mut cold = true;
    for (agent_repo, plain_repo) in agent_repos.iter().zip(&plain_repos) {
        cold &= drop_page_cache();
        a.push(through_agent(&uid, agent_repo, &mut agent_peak_kib).await?.0);
        cold &= drop_page_cache();
        plain.repo = plain_repo.clone();
        p.push(plain.run(&plain_backup, &view)?);
    }
    let mut phase = |name: &'static str, agent_peak: &mut u64, plain: &mut Plain| {
        peaks.push((name, *agent_peak, plain.peak_kib));
        *agent_peak = 0;
        plain.peak_kib = 0;
    };
    phase("first backup", &mut agent_peak_kib, &mut plain);
    rows.push(Row {
        label: "first backup",
        agent: median(&mut a),
        plain: median(&mut p),
        note: format!(
            "{mib} MiB in {files} files; medians of 3 each, alternated, each into a new repository; page cache {}",
            if cold { "dropped before each" } else { "not dropped (not allowed here)" }
        ),
    });
    // The rest goes on in the last pair of repositories.
    let via_agent = agent_repos.last().unwrap().clone();
    let (mut a, mut p) = (Vec::new(), Vec::new());
    let mut reread = 0;
    for _ in 0..5 {
        let (t, s) = through_agent(&uid, &via_agent, &mut agent_peak_kib).await?;
        reread += s.files_new + s.files_changed;
        a.push(t);
        p.push(plain.run(&plain_backup, &view)?);
    }
    rows.push(Row {
        label: "unchanged incremental",
        agent: median(&mut a),
        plain: median(&mut p),
        note: format!("medians of 5 each, alternated; files read again: {reread}"),
    });
    phase("unchanged incremental", &mut agent_peak_kib, &mut plain);

    let (mut a, mut p) = (Vec::new(), Vec::new());
    let mut reread = 0;
    for round in 0..3 {
        // The pod is recreated: same volume, new UID, so a new directory on the node.
        let next = pod_uid(2 + round);
        std::fs::rename(agent.pod_dir(&uid), agent.pod_dir(&next))?;
        uid = next;
        let (t, s) = through_agent(&uid, &via_agent, &mut agent_peak_kib).await?;
        reread += s.files_new + s.files_changed;
        a.push(t);
        p.push(plain.run(&plain_backup, &view)?);
    }
    let recreate_reread = reread;
    rows.push(Row {
        label: "unchanged, pod recreated (new UID)",
        agent: median(&mut a),
        plain: median(&mut p),
        note: format!("medians of 3; files read again through the agent: {reread} (plain restic: same path)"),
    });
    phase("pod recreated", &mut agent_peak_kib, &mut plain);

    let (mut a, mut p) = (Vec::new(), Vec::new());
    let mut changed = 0;
    for round in 0..3 {
        let data = agent.pod_dir(&uid).join(format!("volumes/{EMPTY_DIR}/data"));
        let c = change_one_percent(&data, mib, round)?;
        let (t, s) = through_agent(&uid, &via_agent, &mut agent_peak_kib).await?;
        changed = s.files_changed;
        ensure!(s.files_changed as usize == c, "{c} changed, restic saw {s:?}");
        a.push(t);
        p.push(plain.run(&plain_backup, &view)?);
    }
    rows.push(Row {
        label: "1 % of files changed",
        agent: median(&mut a),
        plain: median(&mut p),
        note: format!("medians of 3; {changed} files changed each round"),
    });
    phase("1 % changed", &mut agent_peak_kib, &mut plain);

    // CPU-bound: warm data (in the page cache) into new repositories, where restic's chunker,
    // hash, compression and encryption set the pace; against plain restic, and against
    // restic's chunker and hash alone (`--dry-run`: the same reading and chunking, no upload).
    let cpu_mib = (mib / 4).max(8);
    let cpu = agent.volume(&uid, EMPTY_DIR, "cpu")?;
    for i in 0..cpu_mib.div_ceil(64) {
        let size = (cpu_mib - i * 64).min(64) << 20;
        std::fs::write(cpu.join(format!("blob-{i}")), pseudo_random(size, 500 + i as u64))?;
    }
    let cpu_repos: Vec<(ResticRepo, ResticRepo)> = (0..3)
        .map(|i| {
            (
                s3_repository(&bucket, &format!("cpu-agent-{i}")),
                s3_repository(&bucket, &format!("cpu-plain-{i}")),
            )
        })
        .collect();
    for (i, (a, p)) in cpu_repos.iter().enumerate() {
        init(&mut client, a, &format!("init-cpu-{i}")).await?;
        plain.repo = p.clone();
        plain.run(&["init"], &view)?;
    }
    let (mut a, mut p, mut dry) = (Vec::new(), Vec::new(), Vec::new());
    let cpu_backup = ["backup", "--host", "app", "--tag", "e2e", "."];
    let cpu_dry = ["backup", "--dry-run", "--host", "app", "--tag", "e2e", "."];
    // Warm: read once before the first measured run.
    plain.repo = cpu_repos[0].1.clone();
    plain.run(&cpu_dry, &cpu)?;
    for (agent_repo, plain_repo) in &cpu_repos {
        n += 1;
        let t = Instant::now();
        let mut req = cached(&format!("bench-cpu-{n}"), &uid, agent_repo);
        req.volume.as_mut().unwrap().volume_name = "cpu".into();
        let (_, r) = collect(client.backup(req).await?.into_inner()).await?;
        ensure!(r.outcome == Outcome::Succeeded as i32, "{r:?}");
        a.push(t.elapsed());
        plain.repo = plain_repo.clone();
        dry.push(plain.run(&cpu_dry, &cpu)?);
        p.push(plain.run(&cpu_backup, &cpu)?);
    }
    plain.peak_kib = 0;
    let (cpu_agent, cpu_plain, cpu_dry) = (median(&mut a), median(&mut p), median(&mut dry));
    let rate = |d: Duration| cpu_mib as f64 / d.as_secs_f64();
    rows.push(Row {
        label: "CPU-bound first backup (warm data)",
        agent: cpu_agent,
        plain: cpu_plain,
        note: format!(
            "{cpu_mib} MiB of incompressible data in the page cache, medians of 3 into new repositories: \
             {:.0} MiB/s through the agent, {:.0} MiB/s plain restic, {:.0} MiB/s restic's chunker and hash \
             alone (`--dry-run`)",
            rate(cpu_agent),
            rate(cpu_plain),
            rate(cpu_dry)
        ),
    });

    // The fixed cost of a run: one small file, unchanged, so restic has almost nothing to do.
    let tiny = agent.volume(&uid, EMPTY_DIR, "tiny")?;
    std::fs::write(tiny.join("file"), b"small")?;
    let tiny_repo = (
        s3_repository(&bucket, "tiny-agent"),
        s3_repository(&bucket, "tiny-plain"),
    );
    init(&mut client, &tiny_repo.0, "init-tiny").await?;
    plain.repo = tiny_repo.1.clone();
    plain.run(&["init"], &view)?;
    let (mut a, mut p) = (Vec::new(), Vec::new());
    for round in 0..6 {
        n += 1;
        let t = Instant::now();
        let mut req = cached(&format!("bench-tiny-{n}"), &uid, &tiny_repo.0);
        req.volume.as_mut().unwrap().volume_name = "tiny".into();
        let (_, r) = collect(client.backup(req).await?.into_inner()).await?;
        ensure!(r.outcome == Outcome::Succeeded as i32, "{r:?}");
        let took = t.elapsed();
        let plain_took = plain.run(&cpu_backup, &tiny)?;
        // The first of each makes the repository's first snapshot: not measured.
        if round > 0 {
            a.push(took);
            p.push(plain_took);
        }
    }
    plain.peak_kib = 0;
    rows.push(Row {
        label: "fixed cost: a one-file volume, unchanged",
        agent: median(&mut a),
        plain: median(&mut p),
        note: "medians of 5; the difference is what a run through the agent adds: the gRPC call, \
               the run's record, the cgroup, the sandbox's two helper processes and mounts, and the result"
            .into(),
    });

    // Restores of the latest snapshot into empty directories on the same disk, from the
    // repositories of the backups above.
    plain.repo = plain_repos.last().unwrap().clone();
    let (mut a, mut p) = (Vec::new(), Vec::new());
    for round in 0..5 {
        let target_uid = pod_uid(100 + round);
        let target = agent.volume(&target_uid, EMPTY_DIR, "restore")?;
        let sampler = Sampler::start(agent.pid());
        let t = Instant::now();
        let request = pb::RestoreRequest {
            options: Some(options(&format!("bench-restore-{round}"))),
            repository: Some(repository(&via_agent)),
            volume: Some(pb::VolumeRef {
                pod_uid: target_uid.clone(),
                volume_name: "restore".into(),
                pv_name: String::new(),
            }),
            snapshot_id: "latest".into(),
            ..Default::default()
        };
        let mut request = request;
        request.options.as_mut().unwrap().restic = Some(pb::ResticOptions {
            use_cache: true,
            ..Default::default()
        });
        let (_, r) = collect(client.restore(request).await?.into_inner()).await?;
        a.push(t.elapsed());
        agent_peak_kib = agent_peak_kib.max(sampler.finish());
        ensure!(r.outcome == Outcome::Succeeded as i32, "{r:?}");
        std::fs::remove_dir_all(&target)?;
        let scratch = agent.dir.join(format!("plain-restore-{round}"));
        std::fs::create_dir_all(&scratch)?;
        let target = scratch.display().to_string();
        p.push(plain.run(&["restore", "latest", "--target", &target], &view)?);
        std::fs::remove_dir_all(&scratch)?;
    }
    rows.push(Row {
        label: "restore",
        agent: median(&mut a),
        plain: median(&mut p),
        note: "medians of 5 each, alternated; the agent's restores read the cache, never change it".into(),
    });
    phase("restore", &mut agent_peak_kib, &mut plain);

    let mut md = String::new();
    md.push_str(
        "| run | through the agent | plain restic | ratio | note |\n| --- | --- | --- | --- | --- |\n",
    );
    for r in &rows {
        let ratio = r.agent.as_secs_f64() / r.plain.as_secs_f64();
        md.push_str(&format!(
            "| {} | {:.2} s | {:.2} s | {:.2}× the time ({:.2}× the speed; {:+.2} s) | {} |\n",
            r.label,
            r.agent.as_secs_f64(),
            r.plain.as_secs_f64(),
            ratio,
            1.0 / ratio,
            r.agent.as_secs_f64() - r.plain.as_secs_f64(),
            r.note
        ));
    }
    let mi = |kib: u64| kib as f64 / 1024.0;
    md.push_str(&format!(
        "\nMemory, as the proportional set size (PSS) sampled every 10 ms: the agent idle {:.1} MiB \
         (RSS); the peak of the agent plus the restic it runs (and its sandbox helpers) against plain \
         restic's, by phase:\n\n| phase | agent + restic | plain restic | ratio |\n| --- | --- | --- | --- |\n",
        mi(agent_idle_kib)
    ));
    for (name, a, p) in &peaks {
        md.push_str(&format!(
            "| {name} | {:.1} MiB | {:.1} MiB | {:.2}× |\n",
            mi(*a),
            mi(*p),
            *a as f64 / (*p).max(1) as f64
        ));
    }
    let agent_peak_kib = peaks.iter().map(|p| p.1).max().unwrap_or(0);
    let plain_peak_kib = peaks.iter().map(|p| p.2).max().unwrap_or(0);
    // The goals (issue 14), each with its verdict.
    let time = |i: usize| rows[i].agent.as_secs_f64() / rows[i].plain.as_secs_f64();
    let restore_row = rows.len() - 1;
    let verdict = |ok: bool| if ok { "met" } else { "missed" };
    let overhead = rows[1].agent.as_secs_f64() - rows[1].plain.as_secs_f64();
    let peak_ratio = agent_peak_kib as f64 / plain_peak_kib.max(1) as f64;
    md.push_str("\n| goal | measured | verdict |\n| --- | --- | --- |\n");
    for (goal, measured, ok) in [
        (
            "first backup ≥ 0.97× plain restic's speed",
            format!("{:.2}×", 1.0 / time(0)),
            1.0 / time(0) >= 0.97,
        ),
        (
            "unchanged incremental ≤ 1.1× plain restic's time, fixed overhead ≤ 0.2 s",
            format!("{:.2}×, {overhead:+.2} s", time(1)),
            time(1) <= 1.1 && overhead <= 0.2,
        ),
        (
            "after a pod recreate: 0 files read again, ≤ 1.1× plain restic on the same path",
            format!("{} files, {:.2}×", recreate_reread, time(2)),
            recreate_reread == 0 && time(2) <= 1.1,
        ),
        (
            "restore ≥ 0.95× plain restic's speed",
            format!("{:.2}×", 1.0 / time(restore_row)),
            1.0 / time(restore_row) >= 0.95,
        ),
        (
            "agent RSS idle ≤ 30 MiB",
            format!("{:.1} MiB", mi(agent_idle_kib)),
            mi(agent_idle_kib) <= 30.0,
        ),
        (
            "agent plus restic peak ≤ 1.05× plain restic's",
            format!(
                "{peak_ratio:.2}× ({:.1} MiB against {:.1} MiB)",
                mi(agent_peak_kib),
                mi(plain_peak_kib)
            ),
            peak_ratio <= 1.05,
        ),
    ] {
        md.push_str(&format!("| {goal} | {measured} | {} |\n", verdict(ok)));
    }
    print!("{md}");
    if let Ok(path) = std::env::var("BENCH_MARKDOWN") {
        std::fs::write(path, md)?;
    }
    Ok(())
}
