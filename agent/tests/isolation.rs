//! The agent against a hostile tenant: everything a tenant controls (extra arguments, the
//! repository URL, paths inside a volume, the volume's contents) tried as an attacker would,
//! through the real agent binary, real restic and S3. Each attack must be refused with a
//! message naming it, and `restic ls` must show that no file from outside the volume entered a
//! snapshot and that nothing outside a restore's target was written.

mod support;

use std::os::unix::fs::symlink;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use restic_operator_e2e::{s3_repository, tools::tool, unique_name};
use restic_operator_proto::v1::agent_client::AgentClient;
use restic_operator_proto::v1::{self as pb, FailureKind, Outcome, RestoreMode, run_event::Event};
use serde_json::Value;
use support::{Agent, backup, collect, options, pod_uid, repository};
use tonic::transport::Channel;

const EMPTY_DIR: &str = "kubernetes.io~empty-dir";

async fn init(
    client: &mut AgentClient<Channel>,
    repo: &restic_operator_e2e::ResticRepo,
    run_id: &str,
) -> Result<()> {
    let req = pb::RepositoryRequest {
        options: Some(options(run_id)),
        repository: Some(repository(repo)),
    };
    let (_, result) = collect(client.init(req).await?.into_inner()).await?;
    ensure!(result.outcome == Outcome::Succeeded as i32, "init: {result:?}");
    Ok(())
}

/// Every path `restic ls` lists in every snapshot of the repository.
fn snapshot_paths(repo: &restic_operator_e2e::ResticRepo) -> Result<Vec<String>> {
    let mut paths = Vec::new();
    for id in snapshot_ids(repo)? {
        let out = repo.restic()?.args(["ls", "--json", "--no-lock", &id]).output()?;
        ensure!(
            out.status.success(),
            "restic ls: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            let v: Value = serde_json::from_str(line)?;
            if let Some(p) = v["path"].as_str() {
                paths.push(p.to_owned());
            }
        }
    }
    Ok(paths)
}

fn snapshot_ids(repo: &restic_operator_e2e::ResticRepo) -> Result<Vec<String>> {
    let out = repo
        .restic()?
        .args(["snapshots", "--json", "--no-lock"])
        .output()?;
    ensure!(
        out.status.success(),
        "restic snapshots: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Vec<Value> = serde_json::from_slice(&out.stdout)?;
    Ok(v.iter()
        .filter_map(|s| s["id"].as_str().map(str::to_owned))
        .collect())
}

/// Whether a run was refused for a path in the volume that leads out of it (the sandbox
/// names the case it hit: out of the volume, a symbolic link, not a directory).
fn refused_path(reason: &str) -> bool {
    ["leaves the volume", "symbolic link", "not a directory"]
        .iter()
        .any(|r| reason.contains(r))
}

/// Swaps two names (a directory and a symlink) back and forth until stopped, as a pod would to
/// win a race between a check and a use.
fn flip(a: std::path::PathBuf, b: std::path::PathBuf, stop: Arc<AtomicBool>) -> std::thread::JoinHandle<u64> {
    std::thread::spawn(move || {
        let mut flips = 0;
        while !stop.load(Ordering::Relaxed) {
            let cwd = nix::fcntl::AT_FDCWD;
            if nix::fcntl::renameat2(cwd, &a, cwd, &b, nix::fcntl::RenameFlags::RENAME_EXCHANGE).is_ok() {
                flips += 1;
            }
            std::thread::sleep(Duration::from_micros(200));
        }
        flips
    })
}

#[tokio::test]
async fn extra_arguments_that_run_commands_read_files_or_are_positional_are_refused_by_the_agent()
-> Result<()> {
    let agent = Agent::start("iso-args")?;
    let repo = s3_repository(&unique_name("iso-args"), "repo");
    let mut client = agent.client().await?;
    let uid = pod_uid(1);
    agent.volume(&uid, EMPTY_DIR, "data")?;
    // The forms the attack report found, and the ones a deny-list would miss.
    let attacks: &[&[&str]] = &[
        &["--stdin-from-command", "/bin/sh", "/data/x.sh"],
        &["--files-from=/proc/1/root/etc/shadow"],
        &["/proc/1/root/etc"],
        &["-vr/tmp/other-repo"],
        &["--option=sftp.command=sh -c id"],
        &["--password-command=cat /proc/1/environ"],
        &["--exclude-file=/etc/shadow"],
        &["--limit-upload", "512"],
    ];
    for attack in attacks {
        let mut req = backup("iso-args", &repo, &uid, "data");
        req.options.as_mut().unwrap().restic = Some(pb::ResticOptions {
            extra_args: attack.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        });
        let err = match client.backup(req).await {
            Err(status) => status,
            Ok(_) => anyhow::bail!("{attack:?} was accepted"),
        };
        ensure!(err.code() == tonic::Code::InvalidArgument, "{attack:?}: {err:?}");
        let first_bad = attack
            .iter()
            .find(|a| restic_operator_args::check_one(restic_operator_args::Op::Backup, a).is_err())
            .unwrap();
        ensure!(
            err.message().contains(&format!("{first_bad:?}")),
            "{attack:?}: the message names the item: {}",
            err.message()
        );
    }
    Ok(())
}

#[tokio::test]
async fn local_repositories_are_refused_unless_the_node_allows_their_directory() -> Result<()> {
    let agent = Agent::start("iso-local")?;
    let mut client = agent.client().await?;
    let node_dir = agent.dir.join("node-secrets");
    std::fs::create_dir_all(&node_dir)?;
    for url in [
        format!("local:{}", node_dir.display()),
        node_dir.display().to_string(),
    ] {
        let req = pb::RepositoryRequest {
            options: Some(options("local-init")),
            repository: Some(pb::Repository {
                url: url.clone(),
                password: "pw".into(),
                env: Default::default(),
            }),
        };
        // Refused before a run starts.
        let refused = client
            .init(req)
            .await
            .err()
            .context("a local repository was accepted")?;
        ensure!(
            refused.code() == tonic::Code::InvalidArgument,
            "{url}: {refused:?}"
        );
        ensure!(
            refused.message().contains("--allow-local-repository-dir"),
            "{}",
            refused.message()
        );
    }
    ensure!(
        std::fs::read_dir(&node_dir)?.next().is_none(),
        "nothing was written"
    );

    // An administrator may allow a directory; repositories below it then work as before.
    let allowed = agent.dir.join("allowed");
    std::fs::create_dir_all(&allowed)?;
    let flag = format!("--allow-local-repository-dir={}", allowed.display());
    let local_agent = Agent::start_with("iso-local-ok", &[flag.as_str()])?;
    let mut client = local_agent.client().await?;
    let req = pb::RepositoryRequest {
        options: Some(options("local-ok")),
        repository: Some(pb::Repository {
            url: format!("local:{}/repo", allowed.display()),
            password: "pw".into(),
            env: Default::default(),
        }),
    };
    let (_, result) = collect(client.init(req).await?.into_inner()).await?;
    ensure!(result.outcome == Outcome::Succeeded as i32, "{result:?}");
    ensure!(allowed.join("repo/config").exists());
    Ok(())
}

#[tokio::test]
async fn a_symlink_flipped_during_subpath_backups_never_brings_outside_files_into_a_snapshot() -> Result<()> {
    let agent = Agent::start("iso-flip-backup")?;
    let repo = s3_repository(&unique_name("iso-flip-backup"), "repo");
    let mut client = agent.client().await?;
    init(&mut client, &repo, "init").await?;
    let uid = pod_uid(2);
    let data = agent.volume(&uid, EMPTY_DIR, "data")?;
    std::fs::create_dir_all(data.join("a"))?;
    std::fs::write(data.join("a/inside"), b"tenant data")?;
    let outside = agent.dir.join("outside");
    std::fs::create_dir_all(&outside)?;
    std::fs::write(outside.join("node-secret"), b"not the tenant's")?;
    // `b` is an absolute symlink out of the volume; the pod swaps it with `a` continuously.
    symlink(&outside, data.join("b"))?;
    let stop = Arc::new(AtomicBool::new(false));
    let flipper = flip(data.join("a"), data.join("b"), Arc::clone(&stop));

    let (mut made, mut refused) = (0, 0);
    for i in 0..12 {
        let mut req = backup(&format!("flip-{i}"), &repo, &uid, "data");
        req.paths = vec!["/a".into()];
        let (_, result) = collect(client.backup(req).await?.into_inner()).await?;
        if result.outcome == Outcome::Succeeded as i32 {
            made += 1;
        } else {
            ensure!(result.failure == FailureKind::InvalidRequest as i32, "{result:?}");
            ensure!(refused_path(&result.reason), "{}", result.reason);
            refused += 1;
        }
    }
    stop.store(true, Ordering::Relaxed);
    let flips = flipper.join().unwrap();
    ensure!(flips > 100, "the race was run ({flips} flips)");
    let paths = snapshot_paths(&repo)?;
    ensure!(
        !paths.iter().any(|p| p.contains("node-secret")),
        "an outside file entered a snapshot: {paths:?}"
    );
    ensure!(
        made > 0 && refused > 0,
        "both sides of the race were seen: {made} made, {refused} refused"
    );
    ensure!(
        paths.iter().all(|p| p == "/data" || p.starts_with("/data/a")),
        "only the volume's own path: {paths:?}"
    );
    Ok(())
}

#[tokio::test]
async fn a_symlink_flipped_during_restores_never_lets_a_write_leave_the_target() -> Result<()> {
    let agent = Agent::start("iso-flip-restore")?;
    let repo = s3_repository(&unique_name("iso-flip-restore"), "repo");
    let mut client = agent.client().await?;
    init(&mut client, &repo, "init").await?;
    let source_uid = pod_uid(3);
    let source = agent.volume(&source_uid, EMPTY_DIR, "data")?;
    std::fs::write(source.join("restored-file"), b"from the snapshot")?;
    let (_, made) = collect(
        client
            .backup(backup("src", &repo, &source_uid, "data"))
            .await?
            .into_inner(),
    )
    .await?;
    ensure!(made.outcome == Outcome::Succeeded as i32, "{made:?}");

    let uid = pod_uid(4);
    let data = agent.volume(&uid, EMPTY_DIR, "data")?;
    std::fs::create_dir_all(data.join("t"))?;
    let outside = agent.dir.join("outside-restore");
    std::fs::create_dir_all(&outside)?;
    symlink(&outside, data.join("u"))?;
    let stop = Arc::new(AtomicBool::new(false));
    let flipper = flip(data.join("t"), data.join("u"), Arc::clone(&stop));
    for i in 0..10 {
        let req = pb::RestoreRequest {
            options: Some(options(&format!("restore-{i}"))),
            repository: Some(repository(&repo)),
            volume: Some(pb::VolumeRef {
                pod_uid: uid.clone(),
                volume_name: "data".into(),
                pv_name: String::new(),
            }),
            snapshot_id: made.snapshot_id.clone(),
            target_subpath: "/t".into(),
            mode: RestoreMode::Overwrite as i32,
            ..Default::default()
        };
        let (_, result) = collect(client.restore(req).await?.into_inner()).await?;
        ensure!(
            result.outcome == Outcome::Succeeded as i32
                || (result.failure == FailureKind::InvalidRequest as i32 && refused_path(&result.reason)),
            "{result:?}"
        );
    }
    stop.store(true, Ordering::Relaxed);
    flipper.join().unwrap();
    ensure!(
        std::fs::read_dir(&outside)?.next().is_none(),
        "a restore wrote outside its target"
    );
    // Whichever name holds the real directory now, that is where the file went.
    let real = if data.join("t").is_symlink() {
        data.join("u")
    } else {
        data.join("t")
    };
    ensure!(real.join("restored-file").exists(), "the restore itself worked");
    Ok(())
}

/// The probe's report from one run: what a program smuggled into restic's place sees.
async fn probe(agent: &Agent, uid: &str) -> Result<Value> {
    let mut client = agent.client().await?;
    let repo = s3_repository(&unique_name("iso-probe"), "repo");
    let (events, _) = collect(
        client
            .backup(backup("probe", &repo, uid, "data"))
            .await?
            .into_inner(),
    )
    .await?;
    let line = events
        .iter()
        .find_map(|e| match &e.event {
            Some(Event::Log(l)) => l.line.strip_prefix("probe: ").map(str::to_owned),
            _ => None,
        })
        .with_context(|| format!("no probe report; agent log:\n{}", agent.log()))?;
    Ok(serde_json::from_str(&line)?)
}

#[tokio::test]
async fn a_program_smuggled_into_a_run_sees_no_process_and_can_do_nothing_outside() -> Result<()> {
    // Another tenant's run in flight on the same node, with its password in its environment.
    let canary = format!("canary-{}", unique_name("pw"));
    let mut other = std::process::Command::new("sleep")
        .arg("60")
        .env("RESTIC_PASSWORD", &canary)
        .spawn()?;
    let agent = Agent::start_with_restic("iso-probe", &tool("sandbox-probe")?, &[])?;
    let uid = pod_uid(5);
    let data = agent.volume(&uid, EMPTY_DIR, "data")?;
    std::fs::write(data.join("x.sh"), "#!/bin/sh\nid > /data/pwned\n")?;
    std::fs::set_permissions(
        data.join("x.sh"),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )?;
    let report = probe(&agent, &uid).await;
    let _ = other.kill();
    let report = report?;
    let text = report.to_string();

    ensure!(
        // No /proc at all: no process (not even itself), no environment, no /proc/sys.
        report["pids"].is_null(),
        "sees no process: {}",
        report["pids"]
    );
    ensure!(
        !text.contains(&canary),
        "another run's environment leaked: {text}"
    );
    // Root, but only CAP_DAC_READ_SEARCH (bit 2) for a backup, and no way to gain more.
    let status = &report["status"];
    ensure!(status["CapEff"] == "0000000000000004", "{status}");
    ensure!(status["CapBnd"] == "0000000000000004", "{status}");
    ensure!(
        status["CapAmb"] == "0000000000000000" && status["CapInh"] == "0000000000000000",
        "{status}"
    );
    ensure!(status["NoNewPrivs"] == "1", "{status}");
    // A minimal root: no shell, no node directories.
    let root: Vec<String> = serde_json::from_value(report["root"].clone())?;
    for entry in &root {
        ensure!(
            [".restic", "data", "dev", "etc", "tmp"].contains(&entry.as_str()),
            "unexpected /{entry} in the sandbox: {root:?}"
        );
    }
    // A host name of the run's own, and PID 2 under a first process that only holds the
    // namespace: the two things that let a killed run's locks be found and removed.
    let hostname = report["hostname"].as_str().unwrap_or("");
    let hash = hostname.rsplit('-').next().unwrap_or("");
    ensure!(
        hash.len() == 16 && hash.bytes().all(|b| b.is_ascii_hexdigit()) && hostname.len() > 17,
        "{hostname}"
    );
    ensure!(report["pid"] == 2, "restic's pid: {}", report["pid"]);
    let attempts = &report["attempts"];
    eprintln!("what the probe tried: {attempts}");
    let failed_with = |what: &str, why: &str| -> Result<()> {
        let got = attempts[what].as_str().unwrap_or("");
        ensure!(got.contains(why), "{what}: expected {why:?}, got {got:?}");
        Ok(())
    };
    failed_with("shell", "no such file")?;
    failed_with("execVolumeScript", "permission denied")?;
    failed_with("writeRoot", "read-only")?;
    failed_with("writeVolume", "read-only")?;
    failed_with("mount", "operation not permitted")?;
    failed_with("chroot", "operation not permitted")?;
    failed_with("readHostShadow", "no such file")?;
    failed_with("writeCorePattern", "no such file")?;
    failed_with("sysrq", "no such file")?;
    failed_with("mountProc", "operation not permitted")?;
    // What it writes cannot be run: scratch space is noexec.
    failed_with("execTmp", "permission denied")?;
    // The seccomp filter: calls restic never makes are refused.
    for call in ["openByHandle", "keyctl", "bpf", "cloneNewUser", "unshareUser"] {
        failed_with(call, "operation not permitted")?;
    }
    ensure!(!data.join("pwned").exists() && !data.join("planted").exists());
    // Nothing of the node's kubelet directory is visible: the volume is at /data only.
    let entries: Vec<String> = serde_json::from_value(report["dataEntries"].clone())?;
    ensure!(entries == vec!["x.sh".to_owned()], "{entries:?}");
    ensure!(Path::new(&agent.kubelet).exists());
    Ok(())
}
