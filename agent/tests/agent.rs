//! The real agent binary against real restic 0.18.1 and a real S3 server, with a
//! kubelet-shaped directory tree standing in for the node.

mod support;

use std::os::unix::fs::{PermissionsExt, symlink};
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use restic_operator_e2e::fixtures::{assert_trees_equal, make_tree, pseudo_random};
use restic_operator_e2e::s3::S3Server;
use restic_operator_e2e::{ResticRepo, s3_repository, tools::tool, unique_name};
use restic_operator_proto::v1::{self as pb, FailureKind, Outcome, RestoreMode, run_event::Event};
use support::{Agent, backup, collect, init, options, pod_uid, repository, restic_snapshots};
use tokio_stream::StreamExt;

const EMPTY_DIR: &str = "kubernetes.io~empty-dir";
const CSI: &str = "kubernetes.io~csi";

fn outcome(r: &pb::Result) -> Outcome {
    Outcome::try_from(r.outcome).unwrap_or(Outcome::Unspecified)
}

#[tokio::test]
async fn backup_then_restore_reproduces_the_volume_byte_for_byte() -> Result<()> {
    let agent = Agent::start("roundtrip")?;
    let repo = s3_repository(&unique_name("roundtrip"), "repo");
    let mut client = agent.client().await?;
    init(&mut client, &repo, "init-1").await?;

    let uid = pod_uid(1);
    let data = agent.volume(&uid, CSI, "pvc-data")?;
    make_tree(&data)?;
    let mut req = backup("backup-1", &repo, &uid, "data");
    req.volume.as_mut().unwrap().pv_name = "pvc-data".into();
    let (_, result) = collect(client.backup(req).await?.into_inner()).await?;
    ensure!(outcome(&result) == Outcome::Succeeded, "backup: {result:?}");
    ensure!(result.backup.as_ref().unwrap().files_new == 4, "{result:?}"); // the symlink is not a file

    // The snapshot holds the volume at the stable path, never a kubelet path.
    let snaps = restic_snapshots(&repo)?;
    ensure!(
        snaps.len() == 1 && snaps[0]["paths"] == serde_json::json!(["/data"]),
        "{snaps:?}"
    );
    ensure!(
        snaps[0]["id"] == result.snapshot_id,
        "{snaps:?} vs {}",
        result.snapshot_id
    );

    // Restore into another pod's empty volume.
    let target_uid = pod_uid(2);
    let target = agent.volume(&target_uid, EMPTY_DIR, "restore")?;
    let req = pb::RestoreRequest {
        options: Some(options("restore-1")),
        repository: Some(repository(&repo)),
        volume: Some(pb::VolumeRef {
            pod_uid: target_uid.clone(),
            volume_name: "restore".into(),
            pv_name: String::new(),
        }),
        snapshot_id: result.snapshot_id.clone(),
        verify: true,
        ..Default::default()
    };
    let (_, restored) = collect(client.restore(req.clone()).await?.into_inner()).await?;
    ensure!(outcome(&restored) == Outcome::Succeeded, "restore: {restored:?}");
    assert_trees_equal(&data, &target)?;

    // Safe by default: the same restore into the now non-empty volume is refused...
    let mut again = req.clone();
    again.options = Some(options("restore-2"));
    let (_, refused) = collect(client.restore(again).await?.into_inner()).await?;
    ensure!(
        refused.failure == FailureKind::InvalidRequest as i32,
        "{refused:?}"
    );
    ensure!(refused.reason.contains("not empty"), "{}", refused.reason);
    // ...and Mirror makes the target match the snapshot, deleting what it does not have.
    std::fs::write(target.join("stray"), b"not in the snapshot")?;
    std::fs::write(target.join("empty"), b"changed")?;
    let mut mirror = req;
    mirror.options = Some(options("restore-3"));
    mirror.mode = RestoreMode::Mirror as i32;
    let (_, mirrored) = collect(client.restore(mirror).await?.into_inner()).await?;
    ensure!(outcome(&mirrored) == Outcome::Succeeded, "mirror: {mirrored:?}");
    assert_trees_equal(&data, &target)?;
    Ok(())
}

#[tokio::test]
async fn an_unchanged_volume_stays_incremental_after_its_pod_is_recreated() -> Result<()> {
    let agent = Agent::start("incremental")?;
    let repo = s3_repository(&unique_name("incremental"), "repo");
    let mut client = agent.client().await?;
    init(&mut client, &repo, "init").await?;
    let first_uid = pod_uid(1);
    make_tree(&agent.volume(&first_uid, EMPTY_DIR, "data")?)?;
    let (_, first) = collect(
        client
            .backup(backup("first", &repo, &first_uid, "data"))
            .await?
            .into_inner(),
    )
    .await?;
    ensure!(outcome(&first) == Outcome::Succeeded, "{first:?}");

    // The pod is recreated: same volume (same inodes), new UID, so a new kubelet path.
    let second_uid = pod_uid(2);
    std::fs::rename(agent.pod_dir(&first_uid), agent.pod_dir(&second_uid))?;
    let (_, second) = collect(
        client
            .backup(backup("second", &repo, &second_uid, "data"))
            .await?
            .into_inner(),
    )
    .await?;
    ensure!(outcome(&second) == Outcome::Succeeded, "{second:?}");
    let s = second.backup.as_ref().unwrap();
    ensure!(s.files_new == 0 && s.files_changed == 0, "not incremental: {s:?}");
    ensure!(s.files_unmodified == 4, "{s:?}");
    ensure!(
        s.parent_snapshot_id == first.snapshot_id,
        "parent {} != {}",
        s.parent_snapshot_id,
        first.snapshot_id
    );
    let snaps = restic_snapshots(&repo)?;
    let paths: Vec<_> = snaps.iter().map(|s| s["paths"].clone()).collect();
    ensure!(paths == vec![serde_json::json!(["/data"]); 2], "{paths:?}");
    ensure!(
        parent_in_repository(&repo, &second.snapshot_id)? == Some(first.snapshot_id.clone()),
        "the snapshot names the reported parent"
    );
    Ok(())
}

/// The parent in the repository's record of `snapshot`.
fn parent_in_repository(repo: &restic_operator_e2e::ResticRepo, snapshot: &str) -> Result<Option<String>> {
    let snaps = restic_snapshots(repo)?;
    let s = snaps
        .iter()
        .find(|s| s["id"] == snapshot)
        .ok_or_else(|| anyhow::anyhow!("no snapshot {snapshot}"))?;
    Ok(s["parent"].as_str().map(str::to_owned))
}

/// A backup is one restic call: its parent is the snapshot it made last on this node, named
/// with `--parent`; without that record restic picks the latest snapshot with the same host,
/// paths and every tag, so never another namespace's; and a recorded parent forgotten since
/// costs a second call, not a failure.
#[tokio::test]
async fn the_parent_is_chosen_inside_the_single_backup_call_and_never_another_namespaces() -> Result<()> {
    let agent = Agent::start("parent")?;
    let repo = s3_repository(&unique_name("parent"), "repo");
    let mut client = agent.client().await?;
    init(&mut client, &repo, "init").await?;
    let uid = pod_uid(1);
    make_tree(&agent.volume(&uid, EMPTY_DIR, "data")?)?;
    let request = |run: &str, namespace: &str| {
        let mut req = backup(run, &repo, &uid, "data");
        req.tags.push(format!("restic-operator/namespace={namespace}"));
        req
    };
    let mut run = async |req: pb::BackupRequest| -> Result<(Vec<pb::RunEvent>, pb::Result)> {
        let (events, r) = collect(client.backup(req).await?.into_inner()).await?;
        ensure!(outcome(&r) == Outcome::Succeeded, "{r:?}");
        Ok((events, r))
    };
    let restic_calls = |events: &[pb::RunEvent]| {
        events
            .iter()
            .filter(|e| matches!(e.event, Some(pb::run_event::Event::Started(_))))
            .count()
    };

    // The first: no parent anywhere, all files read, one call.
    let (events, first) = run(request("p1", "team-a")).await?;
    ensure!(restic_calls(&events) == 1, "{events:?}");
    ensure!(first.backup.as_ref().unwrap().files_new == 4, "{first:?}");
    ensure!(parent_in_repository(&repo, &first.snapshot_id)?.is_none());

    // Another namespace, same host, paths and other tags: team a's snapshot is not its parent.
    let (_, theirs) = run(request("p2", "team-b")).await?;
    ensure!(theirs.backup.as_ref().unwrap().files_new == 4, "{theirs:?}");
    ensure!(
        parent_in_repository(&repo, &theirs.snapshot_id)?.is_none(),
        "team a's snapshot became team b's parent"
    );

    // A backup without any namespace tag (the debug CLI's) takes no parent of restic's choosing.
    let mut untagged = backup("p2u", &repo, &uid, "data");
    untagged.tags = vec!["e2e".into()];
    let (_, untagged) = run(untagged).await?;
    ensure!(
        parent_in_repository(&repo, &untagged.snapshot_id)?.is_none(),
        "a namespace's snapshot became the parent of an untagged backup"
    );

    // Team a's next: the recorded parent, one call, nothing read again.
    let (events, second) = run(request("p3", "team-a")).await?;
    ensure!(restic_calls(&events) == 1, "{events:?}");
    let s = second.backup.as_ref().unwrap();
    ensure!(
        s.files_unmodified == 4 && s.parent_snapshot_id == first.snapshot_id,
        "{s:?}"
    );
    ensure!(parent_in_repository(&repo, &second.snapshot_id)? == Some(first.snapshot_id.clone()));

    // Team b backs up again, so its snapshot is the newest of the host and paths. The node's
    // records are lost: restic picks team a's latest, not team b's newer one (same host, paths
    // and other tags, but not team a's namespace tag); the result does not claim to know which.
    run(request("p3b", "team-b")).await?;
    std::fs::remove_dir_all(agent.dir.join("state/parents"))?;
    // A run whose parent restic chose: nothing read again, no parent claimed, and the
    // repository names `expected` as its parent.
    let chosen_by_restic = |r: &pb::Result, expected: &pb::Result| -> Result<()> {
        let s = r.backup.as_ref().unwrap();
        ensure!(
            s.files_unmodified == 4 && s.parent_snapshot_id.is_empty(),
            "{s:?}"
        );
        ensure!(parent_in_repository(&repo, &r.snapshot_id)? == Some(expected.snapshot_id.clone()));
        Ok(())
    };
    let (events, third) = run(request("p4", "team-a")).await?;
    ensure!(restic_calls(&events) == 1, "{events:?}");
    chosen_by_restic(&third, &second)?;

    // The recorded parent (the third) is forgotten: a second call, which restic's choice
    // (the second) serves.
    let out = repo.restic()?.args(["forget", &third.snapshot_id]).output()?;
    ensure!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let (events, fourth) = run(request("p5", "team-a")).await?;
    ensure!(restic_calls(&events) == 2, "{events:?}");
    chosen_by_restic(&fourth, &second)?;
    // And the one after it has its record again.
    let (_, fifth) = run(request("p6", "team-a")).await?;
    ensure!(fifth.backup.as_ref().unwrap().parent_snapshot_id == fourth.snapshot_id);

    // --skip-if-unchanged: nothing changed, so no new snapshot; the run names the latest.
    let before = restic_snapshots(&repo)?.len();
    let mut skip = request("p7", "team-a");
    skip.options.as_mut().unwrap().restic = Some(pb::ResticOptions {
        extra_args: vec!["--skip-if-unchanged".into()],
        ..Default::default()
    });
    let (_, skipped) = run(skip).await?;
    ensure!(
        skipped.snapshot_id == fifth.snapshot_id && skipped.reason.contains("nothing changed"),
        "{skipped:?}"
    );
    ensure!(restic_snapshots(&repo)?.len() == before, "a snapshot was made");
    Ok(())
}

/// 24 MB of incompressible data uploaded at 4 MiB/s: a backup of about six seconds.
fn slow_backup(
    agent: &Agent,
    uid: &str,
    run_id: &str,
    repo: &restic_operator_e2e::ResticRepo,
) -> Result<pb::BackupRequest> {
    let data = agent.volume(uid, EMPTY_DIR, "data")?;
    for i in 0..6 {
        std::fs::write(data.join(format!("blob-{i}")), pseudo_random(4 << 20, 100 + i))?;
    }
    let mut req = backup(run_id, repo, uid, "data");
    req.options.as_mut().unwrap().restic = Some(pb::ResticOptions {
        extra_args: vec!["--limit-upload=4096".into()],
        ..Default::default()
    });
    Ok(req)
}

#[tokio::test]
async fn progress_events_arrive_during_a_multi_second_backup() -> Result<()> {
    let agent = Agent::start("progress")?;
    let repo = s3_repository(&unique_name("progress"), "repo");
    let mut client = agent.client().await?;
    init(&mut client, &repo, "init").await?;
    let uid = pod_uid(1);
    let req = slow_backup(&agent, &uid, "slow", &repo)?;
    let started = std::time::Instant::now();
    let mut stream = client.backup(req).await?.into_inner();
    let mut progress = Vec::new();
    let mut result = None;
    while let Some(ev) = stream.next().await {
        match ev?.event {
            Some(Event::Progress(p)) => progress.push((started.elapsed(), p)),
            Some(Event::Result(r)) => result = Some(r),
            _ => {}
        }
    }
    let result = result.expect("result");
    ensure!(outcome(&result) == Outcome::Succeeded, "{result:?}");
    let took = started.elapsed();
    ensure!(
        took > Duration::from_secs(3),
        "backup too fast ({took:?}) to prove streaming"
    );
    // Several progress events, spread over the run (not all at the end), with rising counters.
    ensure!(
        progress.len() >= 3,
        "only {} progress events in {took:?}",
        progress.len()
    );
    ensure!(
        progress[0].0 < took - Duration::from_secs(2),
        "first progress only at {:?} of {took:?}",
        progress[0].0
    );
    let bytes: Vec<u64> = progress.iter().map(|(_, p)| p.bytes_done).collect();
    ensure!(bytes.windows(2).all(|w| w[0] <= w[1]), "{bytes:?}");
    ensure!(
        progress.iter().any(|(_, p)| p.total_bytes == 24 << 20),
        "totals: {progress:?}"
    );
    Ok(())
}

#[tokio::test]
async fn clients_without_a_certificate_or_with_one_from_another_ca_are_refused() -> Result<()> {
    let agent = Agent::start("mtls")?;
    let list = |mut c: restic_operator_proto::v1::agent_client::AgentClient<tonic::transport::Channel>| async move {
        c.list_runs(pb::ListRunsRequest {}).await
    };
    // The coordinator's certificate works.
    list(agent.client().await?).await?;
    // No client certificate: the handshake (or the first call) fails.
    let anonymous = match agent.client_with(None).await {
        Ok(c) => list(c).await.is_err(),
        Err(_) => true,
    };
    ensure!(anonymous, "a client without a certificate was served");
    // A certificate from another CA, even with the same name.
    let other =
        restic_operator_e2e::certs::Ca::new("someone-else")?.client("restic-operator-coordinator", None)?;
    let foreign = match agent.client_with(Some(&other)).await {
        Ok(c) => list(c).await.is_err(),
        Err(_) => true,
    };
    ensure!(foreign, "a client with a foreign CA's certificate was served");
    Ok(())
}

#[tokio::test]
async fn replaced_certificates_take_over_without_a_restart_and_the_run_in_flight_survives() -> Result<()> {
    use restic_operator_e2e::certs::Ca;
    use restic_operator_e2e::eventually;
    let agent = Agent::start_with("tls-reload", &["--tls-reload-interval=200ms"])?;
    let repo = s3_repository(&unique_name("tls-reload"), "repo");
    let mut old = agent.client().await?;
    init(&mut old, &repo, "init").await?;
    let uid = pod_uid(1);
    let run_id = unique_name("across-reload");
    // About twelve seconds of upload: still running after both replacements below.
    let mut req = slow_backup(&agent, &uid, &run_id, &repo)?;
    req.options.as_mut().unwrap().restic.as_mut().unwrap().extra_args = vec!["--limit-upload=2048".into()];
    let mut running = old.backup(req).await?.into_inner();
    while let Some(ev) = running.next().await {
        if matches!(ev?.event, Some(Event::Progress(_))) {
            break;
        }
    }
    let list = |mut c: restic_operator_proto::v1::agent_client::AgentClient<tonic::transport::Channel>| async move {
        c.list_runs(pb::ListRunsRequest {}).await
    };

    // An unusable certificate is reported, and the previous configuration keeps serving.
    agent.replace_pki_file(
        "server.crt",
        "-----BEGIN CERTIFICATE-----\nbm90IGEgY2VydGlmaWNhdGU=\n-----END CERTIFICATE-----\n",
    )?;
    eventually(
        "the bad certificate reported",
        Duration::from_secs(10),
        || async { Ok(agent.log().contains("not usable").then_some(())) },
    )
    .await?;
    list(agent.client().await?).await?;

    // Everything from a new CA: its clients get in, the old CA's are refused, and the
    // connection the old CA authenticated is closed.
    let new_ca = Ca::new("agent-test-ca-renewed")?;
    let new_identity = new_ca.client("restic-operator-coordinator", None)?;
    agent.replace_pki(&new_ca)?;
    let mut new = eventually(
        "a client of the new CA served",
        Duration::from_secs(10),
        || async {
            let Ok(mut c) = agent.client_trusting(&new_ca, Some(&new_identity)).await else {
                return Ok(None);
            };
            Ok(c.list_runs(pb::ListRunsRequest {}).await.is_ok().then_some(c))
        },
    )
    .await?;
    ensure!(
        agent.log().contains("reloaded the TLS certificate"),
        "{}",
        agent.log()
    );
    let refused = match agent.client().await {
        Ok(c) => list(c).await.is_err(),
        Err(_) => true,
    };
    ensure!(refused, "a client of the replaced CA was served");
    // The old CA's client with the new agent certificate trusted: its certificate is refused.
    let old_identity_new_trust = match agent.client_trusting(&new_ca, Some(&agent.client_cert)).await {
        Ok(c) => list(c).await.is_err(),
        Err(_) => true,
    };
    ensure!(
        old_identity_new_trust,
        "a client certificate of the replaced CA was accepted"
    );
    let mut old_stream_result = None;
    while let Some(ev) = running.next().await {
        match ev {
            Ok(ev) => {
                if let Some(Event::Result(r)) = ev.event {
                    old_stream_result = Some(r);
                }
            }
            Err(_) => break,
        }
    }
    ensure!(
        old_stream_result.is_none(),
        "the old CA's connection stayed open to the end: {old_stream_result:?}"
    );

    // The run went on: the new client re-attaches by id and gets its result.
    let (_, result) = collect(
        new.attach(pb::AttachRequest {
            run_id: run_id.clone(),
        })
        .await?
        .into_inner(),
    )
    .await?;
    ensure!(outcome(&result) == Outcome::Succeeded, "{result:?}");
    ensure!(restic_snapshots(&repo)?.len() == 1);
    Ok(())
}

#[tokio::test]
async fn volume_names_and_symlinks_that_escape_the_pod_are_refused() -> Result<()> {
    let agent = Agent::start("escape")?;
    let repo = s3_repository(&unique_name("escape"), "repo");
    let mut client = agent.client().await?;
    let uid = pod_uid(1);
    agent.volume(&uid, EMPTY_DIR, "data")?;
    // A planted symlink as a volume directory, pointing at the host's /etc.
    symlink(
        "/etc",
        agent.pod_dir(&uid).join("volumes").join(EMPTY_DIR).join("evil"),
    )?;

    for (volume, pod, code) in [
        ("../../../../etc", uid.as_str(), tonic::Code::InvalidArgument),
        ("data/../../x", uid.as_str(), tonic::Code::InvalidArgument),
        ("data", "../../etc", tonic::Code::InvalidArgument),
        ("evil", uid.as_str(), tonic::Code::PermissionDenied),
        ("missing", uid.as_str(), tonic::Code::NotFound),
    ] {
        let mut req = backup(&unique_name("escape-run"), &repo, pod, volume);
        req.volume.as_mut().unwrap().pod_uid = pod.into();
        let err = client.backup(req).await.err();
        ensure!(
            err.as_ref().map(|e| e.code()) == Some(code),
            "{volume} in {pod}: {err:?}"
        );
    }
    // Paths inside the volume may not climb out either.
    let mut req = backup("escape-paths", &repo, &uid, "data");
    req.paths = vec!["../../..".into()];
    let err = client.backup(req).await.expect_err("'..' path accepted");
    ensure!(
        err.code() == tonic::Code::InvalidArgument && err.message().contains(".."),
        "{err:?}"
    );
    // Nothing ran: no snapshots, not even a repository.
    ensure!(
        client
            .list_runs(pb::ListRunsRequest {})
            .await?
            .into_inner()
            .runs
            .is_empty()
    );
    Ok(())
}

/// The memory cgroup of this test process, where the agent (a child) creates run cgroups.
fn own_memory_cgroup() -> Option<std::path::PathBuf> {
    let text = std::fs::read_to_string("/proc/self/cgroup").ok()?;
    let rel = text.lines().find_map(|l| {
        let mut p = l.splitn(3, ':');
        let (_, c, path) = (p.next()?, p.next()?, p.next()?);
        c.split(',').any(|c| c == "memory").then(|| path.to_string())
    })?;
    let dir = std::path::Path::new("/sys/fs/cgroup/memory").join(rel.trim_start_matches('/'));
    dir.exists().then_some(dir)
}

#[tokio::test]
async fn cancel_stops_restic_and_leaves_no_lock_mount_zombie_or_cgroup_behind() -> Result<()> {
    let agent = Agent::start("cancel")?;
    let repo = s3_repository(&unique_name("cancel"), "repo");
    let mut client = agent.client().await?;
    init(&mut client, &repo, "init").await?;
    let uid = pod_uid(1);
    let run_id = unique_name("cancel-run");
    let req = slow_backup(&agent, &uid, &run_id, &repo)?;
    let mut stream = client.backup(req).await?.into_inner();
    // Wait until restic is really working, then cancel.
    while let Some(ev) = stream.next().await {
        if matches!(ev?.event, Some(Event::Progress(_))) {
            break;
        }
    }
    let cancelled = client
        .cancel(pb::CancelRequest {
            run_id: run_id.clone(),
        })
        .await?
        .into_inner();
    ensure!(cancelled.cancelled);
    let mut result = None;
    while let Some(ev) = stream.next().await {
        if let Some(Event::Result(r)) = ev?.event {
            result = Some(r);
        }
    }
    let result = result.expect("result");
    ensure!(outcome(&result) == Outcome::Cancelled, "{result:?}");

    // No zombie children of the agent, no mounts of its sandboxes on the host, no run cgroup.
    let pid = agent.pid().to_string();
    for entry in std::fs::read_dir("/proc")?.flatten() {
        if let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) {
            let fields: Vec<&str> = stat
                .rsplit_once(')')
                .map(|(_, r)| r.split_whitespace().collect())
                .unwrap_or_default();
            ensure!(
                !(fields.first() == Some(&"Z") && fields.get(1) == Some(&pid.as_str())),
                "zombie child: {stat}"
            );
        }
    }
    let mounts = std::fs::read_to_string("/proc/self/mountinfo")?;
    ensure!(
        !mounts.contains(agent.dir.to_str().unwrap()),
        "sandbox mount leaked:\n{mounts}"
    );
    if let Some(cg) = own_memory_cgroup() {
        let runs = cg.join("restic-agent-runs");
        let left: Vec<_> = std::fs::read_dir(&runs)?
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().starts_with(&format!("{run_id}-")))
            .collect();
        ensure!(
            left.is_empty(),
            "run cgroups left in {}: {left:?}",
            runs.display()
        );
    }
    ensure!(
        !agent
            .dir
            .join("state/scratch")
            .read_dir()
            .is_ok_and(|mut d| d.next().is_some()),
        "scratch left behind"
    );

    // The next runs are not blocked by a lock: a backup, and an exclusive forget.
    let mut req = backup("after-cancel", &repo, &uid, "data");
    req.options.as_mut().unwrap().restic = None;
    let (_, next) = collect(client.backup(req).await?.into_inner()).await?;
    ensure!(outcome(&next) == Outcome::Succeeded, "{next:?}");
    let forget = pb::ForgetRequest {
        options: Some(options("forget-after-cancel")),
        repository: Some(repository(&repo)),
        policy: Some(pb::KeepPolicy {
            last: 1,
            ..Default::default()
        }),
        ..Default::default()
    };
    let (_, forgot) = collect(client.forget(forget).await?.into_inner()).await?;
    ensure!(outcome(&forgot) == Outcome::Succeeded, "{forgot:?}");
    Ok(())
}

#[tokio::test]
async fn two_calls_with_one_run_id_make_one_snapshot() -> Result<()> {
    let agent = Agent::start("idempotent")?;
    let repo = s3_repository(&unique_name("idempotent"), "repo");
    let mut client = agent.client().await?;
    init(&mut client, &repo, "init").await?;
    let uid = pod_uid(1);
    make_tree(&agent.volume(&uid, EMPTY_DIR, "data")?)?;
    let req = backup("backup-app-20240115t020000z", &repo, &uid, "data");
    let mut other = agent.client().await?;
    // Concurrently, as a retried dispatch would, and once more after it finished.
    let (a, b) = tokio::join!(client.backup(req.clone()), other.backup(req.clone()));
    let (_, ra) = collect(a?.into_inner()).await?;
    let (_, rb) = collect(b?.into_inner()).await?;
    let third = client.backup(req).await?;
    ensure!(
        third
            .metadata()
            .get("x-run-attached")
            .is_some_and(|v| v == "true")
    );
    let (_, rc) = collect(third.into_inner()).await?;
    ensure!(outcome(&ra) == Outcome::Succeeded, "{ra:?}");
    ensure!(ra.snapshot_id == rb.snapshot_id && rb.snapshot_id == rc.snapshot_id);
    ensure!(restic_snapshots(&repo)?.len() == 1, "more than one snapshot");
    Ok(())
}

/// Backs up a volume with one readable file and root-only files `locked_names`, as the
/// backup's securityContext user (65534), who cannot read them.
async fn back_up_unreadable(test: &str, locked_names: &[String]) -> Result<(Vec<pb::RunEvent>, pb::Result)> {
    let agent = Agent::start(test)?;
    let repo = s3_repository(&unique_name(test), "repo");
    let mut client = agent.client().await?;
    init(&mut client, &repo, "init").await?;
    let uid = pod_uid(1);
    let data = agent.volume(&uid, EMPTY_DIR, "data")?;
    std::fs::write(data.join("readable"), b"fine")?;
    for name in locked_names {
        std::fs::write(data.join(name), b"root only")?;
        std::fs::set_permissions(data.join(name), std::fs::Permissions::from_mode(0o000))?;
    }
    let mut req = backup(test, &repo, &uid, "data");
    let opts = req.options.as_mut().unwrap();
    opts.run_as_user = Some(65534);
    opts.run_as_group = Some(65534);
    collect(client.backup(req).await?.into_inner()).await
}

#[tokio::test]
async fn an_unreadable_file_makes_the_run_partially_failed_with_its_path() -> Result<()> {
    let (events, result) = back_up_unreadable("unreadable", &["locked".to_owned()]).await?;
    ensure!(outcome(&result) == Outcome::PartiallyFailed, "{result:?}");
    ensure!(
        result.failed_paths == vec!["/data/locked".to_string()],
        "{:?}",
        result.failed_paths
    );
    ensure!(
        !result.snapshot_id.is_empty(),
        "the readable files still make a snapshot"
    );
    let warned = events
        .iter()
        .any(|e| matches!(&e.event, Some(Event::Warning(w)) if w.path == "/data/locked"));
    ensure!(warned, "no warning event for the unreadable file");
    ensure!(result.failed_paths_total == 1, "{result:?}");
    Ok(())
}

#[tokio::test]
async fn a_volume_full_of_unreadable_files_gives_a_bounded_result_with_the_count() -> Result<()> {
    let many = restic_operator_proto::MAX_FAILED_PATHS + 150;
    let names: Vec<String> = (0..many).map(|i| format!("locked-{i:04}")).collect();
    let (events, result) = back_up_unreadable("many-unreadable", &names).await?;
    ensure!(outcome(&result) == Outcome::PartiallyFailed, "{result:?}");
    ensure!(
        result.failed_paths.len() == restic_operator_proto::MAX_FAILED_PATHS,
        "the list is capped: {}",
        result.failed_paths.len()
    );
    ensure!(
        result.failed_paths_total == many as u64,
        "all counted: {}",
        result.failed_paths_total
    );
    ensure!(
        result.reason.contains(&format!("{many} file(s)")),
        "{}",
        result.reason
    );
    let warnings = events
        .iter()
        .filter(|e| matches!(&e.event, Some(Event::Warning(_))))
        .count();
    ensure!(
        warnings == restic_operator_proto::MAX_FAILED_PATHS,
        "warning events are capped too: {warnings}"
    );
    Ok(())
}

#[tokio::test]
async fn forget_leaves_exactly_what_restic_forget_dry_run_predicts() -> Result<()> {
    let agent = Agent::start("forget")?;
    let repo = s3_repository(&unique_name("forget"), "repo");
    let mut client = agent.client().await?;
    init(&mut client, &repo, "init").await?;
    let uid = pod_uid(1);
    let data = agent.volume(&uid, EMPTY_DIR, "data")?;
    // Five snapshots, and one of another host that the scoped policy must not touch.
    for i in 0..5 {
        std::fs::write(data.join("counter"), i.to_string())?;
        let (_, r) = collect(
            client
                .backup(backup(&format!("b{i}"), &repo, &uid, "data"))
                .await?
                .into_inner(),
        )
        .await?;
        ensure!(outcome(&r) == Outcome::Succeeded, "{r:?}");
    }
    let mut other = backup("other-host", &repo, &uid, "data");
    other.host = "other".into();
    collect(client.backup(other).await?.into_inner()).await?;

    let predicted = repo
        .restic()?
        .args([
            "forget",
            "--json",
            "--dry-run",
            "--keep-last",
            "2",
            "--keep-daily",
            "1",
        ])
        .args(["--group-by", "host,tags", "--host", "app", "--tag", "e2e"])
        .output()?;
    ensure!(
        predicted.status.success(),
        "{}",
        String::from_utf8_lossy(&predicted.stderr)
    );
    let groups: Vec<serde_json::Value> = serde_json::from_slice(&predicted.stdout)?;
    let mut keep: Vec<String> = groups
        .iter()
        .flat_map(|g| g["keep"].as_array().cloned().unwrap_or_default())
        .map(|s| s["id"].as_str().unwrap().to_string())
        .collect();

    let req = pb::ForgetRequest {
        options: Some(options("forget")),
        repository: Some(repository(&repo)),
        policy: Some(pb::KeepPolicy {
            last: 2,
            daily: 1,
            ..Default::default()
        }),
        group_by: vec!["host".into(), "tags".into()],
        host: "app".into(),
        tags: vec!["e2e".into()],
        prune: true,
        ..Default::default()
    };
    let (_, result) = collect(client.forget(req).await?.into_inner()).await?;
    ensure!(outcome(&result) == Outcome::Succeeded, "{result:?}");
    let mut remaining: Vec<String> = restic_snapshots(&repo)?
        .iter()
        .filter(|s| s["hostname"] == "app")
        .map(|s| s["id"].as_str().unwrap().to_string())
        .collect();
    keep.sort();
    remaining.sort();
    ensure!(
        keep == remaining && keep.len() == 2,
        "kept {remaining:?}, restic predicted {keep:?}"
    );
    ensure!(result.forget.as_ref().unwrap().removed.len() == 3, "{result:?}");
    ensure!(
        restic_snapshots(&repo)?.iter().any(|s| s["hostname"] == "other"),
        "another host's snapshot was forgotten"
    );
    Ok(())
}

#[tokio::test]
async fn repository_failures_have_their_own_reasons_and_never_leak_the_password() -> Result<()> {
    let agent = Agent::start("repo-failures")?;
    let repo = s3_repository(&unique_name("repo-failures"), "repo");
    let mut client = agent.client().await?;
    let stats = |repo: pb::Repository, id: &str| pb::RepositoryRequest {
        options: Some(options(id)),
        repository: Some(repo),
    };
    // Not initialized yet; the readiness probe tells it apart as statistics do.
    let (_, missing) = collect(client.stats(stats(repository(&repo), "s1")).await?.into_inner()).await?;
    let (_, probed) = collect(client.probe(stats(repository(&repo), "p1")).await?.into_inner()).await?;
    for r in [missing, probed] {
        ensure!(r.failure == FailureKind::RepositoryNotFound as i32, "{r:?}");
    }
    init(&mut client, &repo, "init").await?;
    // Wrong password.
    let mut wrong = repository(&repo);
    wrong.password = "definitely-wrong-password".into();
    let (events, bad) = collect(client.stats(stats(wrong.clone(), "s2")).await?.into_inner()).await?;
    let (_, probed) = collect(client.probe(stats(wrong, "p2")).await?.into_inner()).await?;
    for r in [&bad, &probed] {
        ensure!(r.failure == FailureKind::WrongPassword as i32, "{r:?}");
    }
    let all = format!("{events:?}{}", agent.log());
    ensure!(
        !all.contains("definitely-wrong-password") && !all.contains(&repo.password),
        "password leaked"
    );
    // Unreachable server.
    let mut gone = repository(&repo);
    gone.url = format!(
        "s3:http://127.0.0.1:{}/nowhere/repo",
        restic_operator_e2e::process::free_port()?
    );
    let mut req = stats(gone, "s3");
    // restic would retry an unreachable backend for minutes; the agent stops it at its first
    // retry of the repository's config, long before the caller's deadline.
    req.options.as_mut().unwrap().timeout_seconds = 120;
    let (_, unreachable) = collect(client.stats(req).await?.into_inner()).await?;
    ensure!(
        unreachable.failure == FailureKind::RepositoryUnreachable as i32
            && !unreachable.timed_out
            && unreachable.reason.contains("does not answer")
            && unreachable.reason.contains("connection refused"),
        "{unreachable:?}"
    );
    ensure!(!bad.timed_out, "a wrong password is answered at once: {bad:?}");
    // Initializing twice is refused, not a second repository.
    let req = pb::RepositoryRequest {
        options: Some(options("init-again")),
        repository: Some(repository(&repo)),
    };
    let (_, twice) = collect(client.init(req).await?.into_inner()).await?;
    ensure!(twice.failure == FailureKind::RepositoryExists as i32, "{twice:?}");
    // And a healthy one reports its statistics.
    let (_, ok) = collect(client.stats(stats(repository(&repo), "s4")).await?.into_inner()).await?;
    ensure!(outcome(&ok) == Outcome::Succeeded && ok.stats.is_some(), "{ok:?}");
    Ok(())
}

/// The probe says whether a repository can be used, cheaply and whatever holds its locks:
/// readiness comes from it, not from statistics, which wait for an exclusive lock. (Its
/// failure reasons are checked with the statistics' in the test above.)
#[tokio::test]
async fn a_probe_opens_the_repository_whatever_holds_its_locks() -> Result<()> {
    let agent = Agent::start("probe")?;
    let repo = s3_repository(&unique_name("probe"), "repo");
    let mut client = agent.client().await?;
    let request = |repo: pb::Repository, id: &str| pb::RepositoryRequest {
        options: Some(options(id)),
        repository: Some(repo),
    };
    init(&mut client, &repo, "init").await?;

    // A check reading the data slowly holds an exclusive lock the whole time.
    let src = agent.dir.join("probe-data");
    std::fs::create_dir_all(&src)?;
    std::fs::write(src.join("f"), pseudo_random(1 << 20, 77))?;
    let out = repo.restic()?.current_dir(&src).args(["backup", "."]).output()?;
    ensure!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let mut check = repo
        .restic()?
        .args(["check", "--read-data", "--limit-download=1"])
        .spawn()?;
    restic_operator_e2e::eventually("the check's lock", Duration::from_secs(20), || async {
        let out = repo.restic()?.args(["list", "locks", "--no-lock"]).output()?;
        Ok((!out.stdout.is_empty()).then_some(()))
    })
    .await?;
    let (_, stats) = collect(client.stats(request(repository(&repo), "s")).await?.into_inner()).await?;
    let (_, probe) = collect(client.probe(request(repository(&repo), "p3")).await?.into_inner()).await?;
    let _ = check.kill();
    let _ = check.wait();
    ensure!(stats.failure == FailureKind::Locked as i32, "stats: {stats:?}");
    ensure!(outcome(&probe) == Outcome::Succeeded, "probe: {probe:?}");
    Ok(())
}

/// Without a region, restic asks S3 for the bucket's location first and retries "no such
/// bucket" for up to 15 minutes, though only `restic init` creates the bucket: the probe says
/// at once that there is no repository, and init makes one.
#[tokio::test]
async fn a_probe_of_a_bucket_that_does_not_exist_says_so_at_once_and_init_creates_it() -> Result<()> {
    let agent = Agent::start("no-bucket")?;
    let repo = s3_repository(&unique_name("no-bucket"), "repo");
    let mut client = agent.client().await?;
    let mut without_region = repository(&repo);
    without_region.env.remove("AWS_DEFAULT_REGION");
    let request = |id: &str| pb::RepositoryRequest {
        options: Some(options(id)),
        repository: Some(without_region.clone()),
    };
    let started = std::time::Instant::now();
    let (_, probe) = collect(client.probe(request("probe-1")).await?.into_inner()).await?;
    let took = started.elapsed();
    ensure!(
        probe.failure == FailureKind::RepositoryNotFound as i32,
        "{probe:?}"
    );
    ensure!(probe.reason.contains("bucket does not exist"), "{}", probe.reason);
    ensure!(took < Duration::from_secs(10), "the probe took {took:?}");
    let (_, init) = collect(client.init(request("init")).await?.into_inner()).await?;
    ensure!(outcome(&init) == Outcome::Succeeded, "{init:?}");
    let (_, probe) = collect(client.probe(request("probe-2")).await?.into_inner()).await?;
    ensure!(outcome(&probe) == Outcome::Succeeded, "{probe:?}");
    Ok(())
}

/// An S3 server that stops answering: a probe and a statistics read say so at once (restic
/// alone would retry for 15 minutes), and a backup in flight says that restic retries, waits,
/// and completes once the server is back.
#[tokio::test]
async fn a_repository_that_stops_answering_fails_a_probe_at_once_and_a_backup_waits_for_it() -> Result<()> {
    let agent = Agent::start("s3-down")?;
    let mut s3 = S3Server::start(&agent.dir.join("s3"))?;
    let repo = ResticRepo {
        url: s3.endpoint.repository("outage", "repo"),
        password: "password-of-the-outage".into(),
        s3: s3.endpoint.clone(),
    };
    let mut client = agent.client().await?;
    init(&mut client, &repo, "init").await?;
    let uid = pod_uid(1);
    let mut stream = client
        .backup(slow_backup(&agent, &uid, "through-the-outage", &repo)?)
        .await?
        .into_inner();
    let mut seen = Vec::new();
    while let Some(ev) = stream.next().await {
        let ev = ev?;
        let progressed = matches!(ev.event, Some(Event::Progress(_)));
        seen.push(ev);
        if progressed {
            break;
        }
    }
    s3.stop();

    let started = std::time::Instant::now();
    let probe = pb::RepositoryRequest {
        options: Some(options("probe-while-down")),
        repository: Some(repository(&repo)),
    };
    let (_, probe) = collect(client.probe(probe).await?.into_inner()).await?;
    let took = started.elapsed();
    ensure!(
        probe.failure == FailureKind::RepositoryUnreachable as i32,
        "{probe:?}"
    );
    ensure!(
        probe.reason.contains("does not answer") && probe.reason.contains("connection refused"),
        "{}",
        probe.reason
    );
    ensure!(took < Duration::from_secs(10), "the probe took {took:?}");
    // Statistics too: they are read again later, and the run's slot is free at once.
    let started = std::time::Instant::now();
    let stats = pb::RepositoryRequest {
        options: Some(options("stats-while-down")),
        repository: Some(repository(&repo)),
    };
    let (_, stats) = collect(client.stats(stats).await?.into_inner()).await?;
    let took = started.elapsed();
    ensure!(
        stats.failure == FailureKind::RepositoryUnreachable as i32,
        "{stats:?}"
    );
    ensure!(took < Duration::from_secs(10), "the statistics took {took:?}");

    let retrying = loop {
        let ev = tokio::time::timeout(Duration::from_secs(30), stream.next())
            .await
            .context("no Retrying event within 30 s of the outage")?
            .context("the backup's stream ended during the outage")??;
        if let Some(Event::Retrying(r)) = &ev.event {
            break r.message.clone();
        }
        ensure!(
            !matches!(ev.event, Some(Event::Result(_))),
            "the backup ended during the outage: {ev:?}"
        );
    };
    ensure!(retrying.contains("connection refused"), "{retrying}");
    ensure!(!retrying.contains("retrying after"), "{retrying}");
    tokio::time::sleep(Duration::from_secs(5)).await;
    s3.start_again()?;
    let (_, result) = collect(stream).await?;
    ensure!(
        outcome(&result) == Outcome::Succeeded,
        "{result:?}\n{}",
        agent.log()
    );
    let snapshots = restic_snapshots(&repo)?;
    ensure!(snapshots.len() == 1, "{snapshots:?}");
    Ok(())
}

#[tokio::test]
async fn grpcurl_lists_the_services_through_reflection_and_health_says_serving() -> Result<()> {
    let agent = Agent::start("grpcurl")?;
    let cert_dir = agent.dir.join("client");
    std::fs::create_dir_all(&cert_dir)?;
    std::fs::write(cert_dir.join("client.crt"), &agent.client_cert.cert_pem)?;
    std::fs::write(cert_dir.join("client.key"), &agent.client_cert.key_pem)?;
    let grpcurl = |args: &[&str]| -> Result<String> {
        let out = std::process::Command::new(tool("grpcurl")?)
            .arg("-cacert")
            .arg(agent.pki("ca.crt"))
            .arg("-cert")
            .arg(cert_dir.join("client.crt"))
            .arg("-key")
            .arg(cert_dir.join("client.key"))
            .args(["-servername", support::SERVER_NAME])
            .args(args)
            .output()?;
        ensure!(
            out.status.success(),
            "grpcurl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(String::from_utf8(out.stdout)?)
    };
    let addr = format!("127.0.0.1:{}", agent.port);
    let services = grpcurl(&[&addr, "list"])?;
    for s in [
        "resticoperator.agent.v1.Agent",
        "grpc.health.v1.Health",
        "grpc.reflection.v1.ServerReflection",
    ] {
        ensure!(services.lines().any(|l| l == s), "{s} not listed:\n{services}");
    }
    let methods = grpcurl(&[&addr, "describe", "resticoperator.agent.v1.Agent"])?;
    ensure!(
        methods.contains("rpc Backup") && methods.contains("rpc Attach"),
        "{methods}"
    );
    let health = grpcurl(&[&addr, "grpc.health.v1.Health/Check"])?;
    ensure!(health.contains("SERVING"), "{health}");
    // The agent's own metrics are served too.
    let metrics = agent.metrics()?;
    ensure!(metrics.contains("restic_agent_queue_length"), "{metrics}");
    Ok(())
}

#[tokio::test]
async fn the_debug_cli_talks_to_the_agent_and_explains_missing_certificates() -> Result<()> {
    let agent = Agent::start("debug-cli")?;
    let uid = pod_uid(1);
    agent.volume(&uid, EMPTY_DIR, "cache")?;
    agent.volume(&uid, CSI, "pvc-42")?;
    std::fs::write(agent.dir.join("client.crt"), &agent.client_cert.cert_pem)?;
    std::fs::write(agent.dir.join("client.key"), &agent.client_cert.key_pem)?;
    let debug = |with_cert: bool, args: &[&str]| -> Result<std::process::Output> {
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_restic-agent"));
        cmd.arg("debug")
            .arg(format!("--addr=https://127.0.0.1:{}", agent.port))
            .arg("--ca")
            .arg(agent.pki("ca.crt"));
        if with_cert {
            cmd.arg("--cert")
                .arg(agent.dir.join("client.crt"))
                .arg("--key")
                .arg(agent.dir.join("client.key"));
        }
        Ok(cmd.args(args).output()?)
    };
    let text = |o: &std::process::Output| {
        format!(
            "{}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        )
    };

    let health = debug(true, &["health"])?;
    ensure!(
        health.status.success() && text(&health).contains("SERVING"),
        "{}",
        text(&health)
    );
    let volumes = debug(true, &["volumes", &uid])?;
    let listing = text(&volumes);
    ensure!(
        volumes.status.success() && listing.contains("cache") && listing.contains("pvc-42"),
        "{listing}"
    );
    ensure!(
        listing.contains("kubernetes.io~csi") && listing.contains("/mount"),
        "{listing}"
    );
    let runs = debug(true, &["runs"])?;
    ensure!(
        runs.status.success() && text(&runs).contains("RUN"),
        "{}",
        text(&runs)
    );

    let missing = debug(false, &["health"])?;
    ensure!(!missing.status.success(), "served without a client certificate");
    ensure!(
        text(&missing).contains("--cert is required"),
        "{}",
        text(&missing)
    );
    Ok(())
}

#[tokio::test]
async fn a_live_lock_blocks_an_exclusive_operation_and_is_reported_not_removed() -> Result<()> {
    let agent = Agent::start("live-lock")?;
    let repo = s3_repository(&unique_name("live-lock"), "repo");
    let mut client = agent.client().await?;
    init(&mut client, &repo, "init").await?;
    // Someone else's backup, running slowly: it holds a live lock the whole time.
    let src = agent.dir.join("other-data");
    std::fs::create_dir_all(&src)?;
    for i in 0..4 {
        std::fs::write(src.join(format!("f{i}")), pseudo_random(4 << 20, 500 + i))?;
    }
    let mut other = repo
        .restic()?
        .current_dir(&src)
        .args(["backup", "--limit-upload=2048", "."])
        .spawn()?;
    tokio::time::sleep(Duration::from_secs(2)).await;

    let forget = pb::ForgetRequest {
        options: Some(options("forget-while-locked")),
        repository: Some(repository(&repo)),
        policy: Some(pb::KeepPolicy {
            last: 1,
            ..Default::default()
        }),
        ..Default::default()
    };
    let (_, result) = collect(client.forget(forget).await?.into_inner()).await?;
    ensure!(result.failure == FailureKind::Locked as i32, "{result:?}");
    ensure!(result.reason.contains("locked"), "{}", result.reason);
    // The holder was alive, so its lock was left alone and its backup finishes.
    ensure!(
        other.wait()?.success(),
        "the other backup failed: its lock was removed?"
    );
    Ok(())
}

#[tokio::test]
async fn a_restic_over_its_memory_limit_is_killed_and_reported_as_such() -> Result<()> {
    let agent = Agent::start("oom")?;
    let repo = s3_repository(&unique_name("oom"), "repo");
    let mut client = agent.client().await?;
    init(&mut client, &repo, "init").await?;
    let uid = pod_uid(1);
    let data = agent.volume(&uid, EMPTY_DIR, "data")?;
    for i in 0..8 {
        std::fs::write(data.join(format!("blob-{i}")), pseudo_random(4 << 20, 900 + i))?;
    }
    // restic needs far more than 12 MiB to pack 32 MiB; only its cgroup is limited.
    let mut req = backup("oom", &repo, &uid, "data");
    req.options.as_mut().unwrap().memory_limit_bytes = 12 << 20;
    let (_, result) = collect(client.backup(req).await?.into_inner()).await?;
    ensure!(result.failure == FailureKind::OutOfMemory as i32, "{result:?}");
    ensure!(result.reason.contains("memory limit"), "{}", result.reason);
    // The kill left restic's lock; the agent removed it at once, so the repository's
    // exclusive operations are not blocked for the 30 minutes restic would wait.
    let locks = repo.lock_ids()?;
    ensure!(locks.is_empty(), "locks left by the killed restic: {locks:?}");
    ensure!(
        agent.log().contains("removed the locks of a killed restic"),
        "{}",
        agent.log()
    );
    // The agent itself is fine and the next run, with the default limit, succeeds.
    let (_, next) = collect(
        client
            .backup(backup("after-oom", &repo, &uid, "data"))
            .await?
            .into_inner(),
    )
    .await?;
    ensure!(outcome(&next) == Outcome::Succeeded, "{next:?}");
    Ok(())
}

/// Processes whose command line mentions `needle`.
fn processes_mentioning(needle: &str) -> Vec<String> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        if cmdline.contains(needle) {
            found.push(format!("{}: {cmdline}", entry.file_name().to_string_lossy()));
        }
    }
    found
}

#[tokio::test]
async fn an_agent_killed_mid_backup_takes_restic_with_it_and_its_lock_blocks_no_forget() -> Result<()> {
    let mut agent = Agent::start("killed-agent")?;
    let repo = s3_repository(&unique_name("killed-agent"), "repo");
    let mut client = agent.client().await?;
    init(&mut client, &repo, "init").await?;
    let uid = pod_uid(1);
    let req = slow_backup(&agent, &uid, "killed-mid-backup", &repo)?;
    let mut stream = client.backup(req).await?.into_inner();
    while let Some(ev) = stream.next().await {
        if matches!(ev?.event, Some(Event::Progress(_))) {
            break;
        }
    }
    agent.kill_and_restart()?;
    // restic went with the agent, killed, so its lock stayed behind.
    let state = agent.dir.join("state").display().to_string();
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while !processes_mentioning(&format!("{state}/scratch")).is_empty() {
        ensure!(
            std::time::Instant::now() < deadline,
            "the sandbox outlived its agent: {:?}",
            processes_mentioning(&state)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let left = repo.lock_ids()?;
    ensure!(left.len() == 1, "locks after the kill: {left:?}");

    // An exclusive operation: restic's own rule would refuse it for 30 minutes.
    let mut client = agent.client().await?;
    let forget = pb::ForgetRequest {
        options: Some(options("forget-after-kill")),
        repository: Some(repository(&repo)),
        policy: Some(pb::KeepPolicy {
            last: 1,
            ..Default::default()
        }),
        ..Default::default()
    };
    let (events, result) = collect(client.forget(forget).await?.into_inner()).await?;
    ensure!(
        outcome(&result) == Outcome::Succeeded,
        "{result:?}\n{}",
        agent.log()
    );
    let said = events.iter().any(|e| {
        matches!(&e.event, Some(Event::Log(l))
            if l.line.contains("removed the repository locks left by run killed-mid-backup"))
    });
    ensure!(said, "{events:?}");
    ensure!(repo.lock_ids()?.is_empty(), "{:?}", repo.lock_ids()?);
    // The killed run itself reports how it ended.
    let (_, killed) = collect(
        client
            .attach(pb::AttachRequest {
                run_id: "killed-mid-backup".into(),
            })
            .await?
            .into_inner(),
    )
    .await?;
    ensure!(killed.failure == FailureKind::AgentRestarted as i32, "{killed:?}");
    Ok(())
}

/// Two agents on one state directory would take each other's runs, and one's live restic for
/// the other's dead one: the second refuses to start.
#[tokio::test]
async fn a_second_agent_on_the_same_state_directory_refuses_to_start() -> Result<()> {
    let agent = Agent::start("one-state")?;
    let said = agent
        .second_on_the_same_state()?
        .context("the second agent kept running")?;
    ensure!(said.contains("another agent uses the state directory"), "{said}");
    // The first one is unharmed.
    agent.client().await?.list_runs(pb::ListRunsRequest {}).await?;
    Ok(())
}

#[tokio::test]
async fn a_live_lock_of_another_run_on_the_same_agent_is_never_taken_for_a_dead_one() -> Result<()> {
    let agent = Agent::start("live-beside-dead")?;
    let repo = s3_repository(&unique_name("live-beside-dead"), "repo");
    let mut client = agent.client().await?;
    init(&mut client, &repo, "init").await?;
    // A run killed by its memory limit leaves a dead run on record...
    let uid = pod_uid(1);
    let data = agent.volume(&uid, EMPTY_DIR, "data")?;
    for i in 0..8 {
        std::fs::write(data.join(format!("blob-{i}")), pseudo_random(4 << 20, 700 + i))?;
    }
    // ...while a slow backup of this agent holds a live lock in the same repository.
    let slow_uid = pod_uid(2);
    let slow = slow_backup(&agent, &slow_uid, "live", &repo)?;
    let mut live = client.backup(slow).await?.into_inner();
    while let Some(ev) = live.next().await {
        if matches!(ev?.event, Some(Event::Progress(_))) {
            break;
        }
    }
    let mut req = backup("oom-beside-live", &repo, &uid, "data");
    req.options.as_mut().unwrap().memory_limit_bytes = 12 << 20;
    let (_, killed) = collect(client.backup(req).await?.into_inner()).await?;
    ensure!(killed.failure == FailureKind::OutOfMemory as i32, "{killed:?}");
    ensure!(
        agent.log().contains("removed the locks of a killed restic"),
        "{}",
        agent.log()
    );
    // The dead run's lock is gone, the live one stays and its backup completes.
    ensure!(repo.lock_ids()?.len() == 1, "{:?}", repo.lock_ids()?);
    let mut last = None;
    while let Some(ev) = live.next().await {
        last = ev?.event;
    }
    ensure!(
        matches!(&last, Some(Event::Result(r)) if outcome(r) == Outcome::Succeeded),
        "{last:?}"
    );
    ensure!(repo.lock_ids()?.is_empty());
    Ok(())
}

#[tokio::test]
async fn shutting_the_agent_down_stops_restic_and_leaves_nothing_in_flight() -> Result<()> {
    let agent = Agent::start("shutdown")?;
    let repo = s3_repository(&unique_name("shutdown"), "repo");
    let mut client = agent.client().await?;
    init(&mut client, &repo, "init").await?;
    let uid = pod_uid(1);
    let req = slow_backup(&agent, &uid, "interrupted", &repo)?;
    let mut stream = client.backup(req).await?.into_inner();
    while let Some(ev) = stream.next().await {
        if matches!(ev?.event, Some(Event::Progress(_))) {
            break;
        }
    }
    let started = std::time::Instant::now();
    let pid = agent.pid().to_string();
    std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()?;
    // The caller still learns how its run ended.
    let mut last = None;
    while let Some(ev) = stream.next().await {
        last = ev?.event;
    }
    ensure!(
        matches!(&last, Some(Event::Result(r)) if outcome(r) == Outcome::Cancelled),
        "{last:?}"
    );
    let (status, agent) = tokio::task::spawn_blocking(move || {
        let mut agent = agent;
        agent.terminate().map(|s| (s, agent))
    })
    .await??;
    ensure!(status.success(), "agent exit: {status}\n{}", agent.log());
    ensure!(
        started.elapsed() < Duration::from_secs(15),
        "shutdown took {:?}",
        started.elapsed()
    );
    // restic was stopped with it: nothing in flight on disk, no scratch, no half snapshot.
    let state = agent.dir.join("state");
    ensure!(
        std::fs::read_dir(state.join("runs"))?.next().is_none(),
        "run still recorded in flight"
    );
    ensure!(
        std::fs::read_dir(state.join("scratch"))?.next().is_none(),
        "scratch left behind"
    );
    ensure!(
        restic_snapshots(&repo)?.is_empty(),
        "a snapshot was written after shutdown"
    );
    ensure!(agent.log().contains("shutting down"), "{}", agent.log());
    Ok(())
}

#[tokio::test]
async fn a_path_inside_the_volume_keeps_the_owner_and_mode_of_the_directories_above_it() -> Result<()> {
    let agent = Agent::start("parents")?;
    let repo = s3_repository(&unique_name("parents"), "repo");
    let mut client = agent.client().await?;
    init(&mut client, &repo, "init").await?;
    let uid = pod_uid(1);
    let data = agent.volume(&uid, EMPTY_DIR, "data")?;
    std::fs::create_dir_all(data.join("app/config"))?;
    std::fs::write(data.join("app/config/settings"), b"x")?;
    nix::unistd::chown(&data.join("app"), Some(1000.into()), Some(1001.into()))?;
    std::fs::set_permissions(data.join("app"), std::fs::Permissions::from_mode(0o750))?;
    std::fs::set_permissions(&data, std::fs::Permissions::from_mode(0o770))?;
    let mut req = backup("parents", &repo, &uid, "data");
    req.paths = vec!["/app/config".into()];
    let (_, result) = collect(client.backup(req).await?.into_inner()).await?;
    ensure!(outcome(&result) == Outcome::Succeeded, "{result:?}");
    let out = repo
        .restic()?
        .args(["ls", "--json", "--no-lock", &result.snapshot_id])
        .output()?;
    ensure!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let nodes: Vec<serde_json::Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    let node = |path: &str| {
        nodes
            .iter()
            .find(|n| n["path"] == path)
            .cloned()
            .unwrap_or_default()
    };
    let app = node("/data/app");
    ensure!(
        (app["uid"].as_u64(), app["gid"].as_u64()) == (Some(1000), Some(1001)),
        "the snapshot records the real owner of /data/app: {app}"
    );
    ensure!(
        app["mode"].as_u64().unwrap_or(0) & 0o777 == 0o750,
        "and its mode: {app}"
    );
    let root = node("/data");
    ensure!(
        root["mode"].as_u64().unwrap_or(0) & 0o777 == 0o770,
        "and the volume's: {root}"
    );
    Ok(())
}

/// One hostile request, by the call it goes to.
enum Hostile {
    Backup(pb::BackupRequest),
    Restore(pb::RestoreRequest),
    Init(pb::RepositoryRequest),
    Forget(pb::ForgetRequest),
    Check(pb::CheckRequest),
}

/// Sends `req`; the refusal, or `None` when the agent took it.
async fn refusal(
    client: &mut restic_operator_proto::v1::agent_client::AgentClient<tonic::transport::Channel>,
    req: Hostile,
) -> Option<tonic::Status> {
    match req {
        Hostile::Backup(r) => client.backup(r).await.err(),
        Hostile::Restore(r) => client.restore(r).await.err(),
        Hostile::Init(r) => client.init(r).await.err(),
        Hostile::Forget(r) => client.forget(r).await.err(),
        Hostile::Check(r) => client.check(r).await.err(),
    }
}

/// Malformed and hostile requests, each refused with InvalidArgument and a message saying
/// what is wrong, before any run starts: empty and oversized fields, control characters and
/// NULs, unknown enum values, path tricks, forbidden options and repositories.
#[tokio::test]
async fn malformed_and_hostile_requests_are_refused_as_invalid_arguments_with_a_message() -> Result<()> {
    let agent = Agent::start("hostile")?;
    let repo = s3_repository(&unique_name("hostile"), "repo");
    let mut client = agent.client().await?;
    let uid = pod_uid(1);
    agent.volume(&uid, EMPTY_DIR, "data")?;
    let good = backup("hostile-backup", &repo, &uid, "data");
    let with = |f: &dyn Fn(&mut pb::BackupRequest)| {
        let mut r = good.clone();
        f(&mut r);
        Hostile::Backup(r)
    };
    let repo_with = |f: &dyn Fn(&mut pb::Repository)| {
        let mut r = good.clone();
        f(r.repository.as_mut().unwrap());
        Hostile::Backup(r)
    };
    let restore = |f: &dyn Fn(&mut pb::RestoreRequest)| {
        let mut r = pb::RestoreRequest {
            options: Some(options("hostile-restore")),
            repository: Some(repository(&repo)),
            volume: good.volume.clone(),
            snapshot_id: "latest".into(),
            host: "db".into(),
            snapshot_path: "/data".into(),
            ..Default::default()
        };
        f(&mut r);
        Hostile::Restore(r)
    };
    let forget = |f: &dyn Fn(&mut pb::ForgetRequest)| {
        let mut r = pb::ForgetRequest {
            options: Some(options("hostile-forget")),
            repository: Some(repository(&repo)),
            policy: Some(pb::KeepPolicy {
                last: 1,
                ..Default::default()
            }),
            ..Default::default()
        };
        f(&mut r);
        Hostile::Forget(r)
    };
    let huge = "x".repeat(1 << 20);
    let cases: Vec<(&str, &str, Hostile)> = vec![
        ("no options", "options", with(&|r| r.options = None)),
        (
            "empty run id",
            "run id",
            with(&|r| r.options.as_mut().unwrap().run_id.clear()),
        ),
        (
            "oversized run id",
            "run id",
            with(&|r| r.options.as_mut().unwrap().run_id = "r".repeat(129)),
        ),
        (
            "run id path",
            "run id",
            with(&|r| r.options.as_mut().unwrap().run_id = "../../etc".into()),
        ),
        (
            "no repository",
            "repository is required",
            with(&|r| r.repository = None),
        ),
        ("empty URL", "repository.url", repo_with(&|r| r.url.clear())),
        (
            "URL with a newline",
            "control character",
            repo_with(&|r| r.url.push_str("\nx")),
        ),
        (
            "oversized URL",
            "at most 4096",
            repo_with(&|r| r.url.push_str(&"/x".repeat(3000))),
        ),
        (
            "a node directory",
            "--allow-local-repository-dir",
            repo_with(&|r| r.url = "local:/etc".into()),
        ),
        ("empty password", "password", repo_with(&|r| r.password.clear())),
        (
            "NUL in the password",
            "NUL",
            repo_with(&|r| r.password = "a\0b".into()),
        ),
        (
            "LD_PRELOAD",
            "LD_PRELOAD",
            repo_with(&|r| {
                r.env.insert("LD_PRELOAD".into(), "/tmp/x.so".into());
            }),
        ),
        (
            "NUL in an env value",
            "NUL",
            repo_with(&|r| {
                r.env.insert("AWS_PROFILE".into(), "a\0b".into());
            }),
        ),
        (
            "too many env entries",
            "at most 256",
            repo_with(&|r| {
                for i in 0..300 {
                    r.env.insert(format!("AWS_X{i}"), "v".into());
                }
            }),
        ),
        ("empty host", "host is required", with(&|r| r.host.clear())),
        ("huge host", "at most 1024", with(&|r| r.host = huge.clone())),
        (
            "host with a newline",
            "control character",
            with(&|r| r.host = "db\nFatal: forged".into()),
        ),
        (
            "tag with a comma",
            "comma",
            with(&|r| r.tags = vec!["a,b".into()]),
        ),
        (
            "two namespace tags (a parent from either namespace)",
            "more than one restic-operator/namespace=",
            with(&|r| {
                r.tags = vec![
                    "restic-operator/namespace=a".into(),
                    "restic-operator/namespace=b".into(),
                ]
            }),
        ),
        (
            "a thousand tags",
            "at most 256",
            with(&|r| r.tags = (0..1000).map(|i| format!("t{i}")).collect()),
        ),
        (
            "path leaving the volume",
            "..",
            with(&|r| r.paths = vec!["../../etc".into()]),
        ),
        (
            "overlapping paths",
            "overlap",
            with(&|r| r.paths = vec!["a".into(), "a/b".into()]),
        ),
        (
            "relative snapshot path",
            "snapshot",
            with(&|r| r.snapshot_path = "data".into()),
        ),
        (
            "invalid exclude glob",
            "not a valid glob",
            with(&|r| r.excludes = vec!["[".into()]),
        ),
        (
            "an option running a command",
            "not allowed",
            with(&|r| {
                r.options.as_mut().unwrap().restic = Some(pb::ResticOptions {
                    extra_args: vec!["--password-command=sh -c id".into()],
                    ..Default::default()
                });
            }),
        ),
        (
            "unknown compression",
            "compression",
            with(&|r| {
                r.options.as_mut().unwrap().restic = Some(pb::ResticOptions {
                    compression: "zstd".into(),
                    ..Default::default()
                });
            }),
        ),
        (
            "volume name path",
            "..",
            with(&|r| r.volume.as_mut().unwrap().volume_name = "../../x".into()),
        ),
        (
            "pod uid path",
            "..",
            with(&|r| r.volume.as_mut().unwrap().pod_uid = "../../etc".into()),
        ),
        (
            "unknown restore mode",
            "unknown restore mode",
            restore(&|r| r.mode = 99),
        ),
        (
            "snapshot id with a command",
            "neither a snapshot id",
            restore(&|r| r.snapshot_id = "abc; rm -rf /".into()),
        ),
        (
            "oversized snapshot id",
            "longer than",
            restore(&|r| r.snapshot_id = "a".repeat(65)),
        ),
        (
            "restore target leaving the volume",
            "..",
            restore(&|r| r.target_subpath = "../..".into()),
        ),
        (
            "keep policy keeping nothing",
            "keeps nothing",
            forget(&|r| r.policy = Some(Default::default())),
        ),
        (
            "unknown group",
            "group_by",
            forget(&|r| r.group_by = vec!["hostname".into()]),
        ),
        (
            "forget tag with a comma",
            "comma",
            forget(&|r| r.tags = vec!["a,b".into()]),
        ),
        (
            "garbled check subset",
            "must look like",
            Hostile::Check(pb::CheckRequest {
                options: Some(options("hostile-check")),
                repository: Some(repository(&repo)),
                read_data_subset: "1/0x".into(),
            }),
        ),
        (
            "init without a repository",
            "repository is required",
            Hostile::Init(pb::RepositoryRequest {
                options: Some(options("hostile-init")),
                repository: None,
            }),
        ),
    ];
    ensure!(cases.len() >= 20);
    let total = cases.len();
    let mut wrong = Vec::new();
    for (name, says, req) in cases {
        match refusal(&mut client, req).await {
            Some(s) if s.code() == tonic::Code::InvalidArgument && s.message().contains(says) => {}
            Some(s) => wrong.push(format!(
                "{name}: {:?} {:?} (expected {says:?})",
                s.code(),
                s.message()
            )),
            None => wrong.push(format!("{name}: accepted")),
        }
    }
    ensure!(
        wrong.is_empty(),
        "{} of {total} cases:\n{}",
        wrong.len(),
        wrong.join("\n")
    );
    // Nothing ran, and the agent is still well.
    ensure!(
        client
            .list_runs(pb::ListRunsRequest {})
            .await?
            .into_inner()
            .runs
            .is_empty()
    );
    Ok(())
}

/// restic's cache is kept per repository on the node, shared by overlapping runs, and kept
/// within the repository's size limit after each run.
#[tokio::test]
async fn the_cache_is_shared_by_overlapping_runs_and_kept_within_its_limit() -> Result<()> {
    let agent = Agent::start("cache")?;
    let repo = s3_repository(&unique_name("cache"), "repo");
    let mut client = agent.client().await?;
    init(&mut client, &repo, "init").await?;
    let cached = |run: &str, uid: &str, limit: u64| {
        let mut req = backup(run, &repo, uid, "data");
        req.host = format!("host-{uid}");
        req.options.as_mut().unwrap().restic = Some(pb::ResticOptions {
            use_cache: true,
            cache_size_bytes: limit,
            ..Default::default()
        });
        req
    };
    let uids = [pod_uid(1), pod_uid(2)];
    for (i, uid) in uids.iter().enumerate() {
        let data = agent.volume(uid, EMPTY_DIR, "data")?;
        for f in 0..200 {
            std::fs::write(
                data.join(format!("f{f}")),
                pseudo_random(4096, (i * 1000 + f) as u64),
            )?;
        }
    }
    // Two backups of one repository at once, one cache.
    let mut a = agent.client().await?;
    let mut b = agent.client().await?;
    let (ra, rb) = tokio::join!(
        async { collect(a.backup(cached("c1", &uids[0], 0)).await?.into_inner()).await },
        async { collect(b.backup(cached("c2", &uids[1], 0)).await?.into_inner()).await },
    );
    for (_, r) in [ra?, rb?] {
        ensure!(outcome(&r) == Outcome::Succeeded, "{r:?}");
    }
    let caches: Vec<_> = std::fs::read_dir(agent.dir.join("state/cache"))?
        .flatten()
        .map(|e| e.path())
        .collect();
    ensure!(caches.len() == 1, "one cache for the repository: {caches:?}");
    let size = |dir: &std::path::Path| -> u64 {
        fn walk(d: &std::path::Path, n: &mut u64) {
            for e in std::fs::read_dir(d).into_iter().flatten().flatten() {
                let m = e.path().symlink_metadata().unwrap();
                if m.is_dir() {
                    walk(&e.path(), n)
                } else {
                    *n += m.len()
                }
            }
        }
        let mut n = 0;
        walk(dir, &mut n);
        n
    };
    let full = size(&caches[0]);
    ensure!(full > 8192, "restic filled its cache: {full} bytes");

    // The next run under a limit below what the cache holds: trimmed to it afterwards, and the
    // run after that, with a cache missing files, is still incremental.
    let limit = full / 2;
    let (_, r) = collect(client.backup(cached("c3", &uids[0], limit)).await?.into_inner()).await?;
    ensure!(outcome(&r) == Outcome::Succeeded, "{r:?}");
    ensure!(size(&caches[0]) <= limit, "{} > {limit}", size(&caches[0]));
    ensure!(
        agent.log().contains("trimmed a repository cache"),
        "{}",
        agent.log()
    );
    let (_, r) = collect(client.backup(cached("c4", &uids[0], limit)).await?.into_inner()).await?;
    ensure!(outcome(&r) == Outcome::Succeeded, "{r:?}");
    ensure!(r.backup.as_ref().unwrap().files_unmodified == 200, "{r:?}");
    Ok(())
}

/// A restore reads the repository's cache on the node but never changes it: it writes into a
/// volume its pod may change under it, so whatever restic writes goes to a layer of the
/// restore's own, removed with the run.
#[tokio::test]
async fn a_restore_reads_the_cache_and_leaves_it_as_it_was() -> Result<()> {
    let agent = Agent::start("restore-cache")?;
    let repo = s3_repository(&unique_name("rcache"), "repo");
    let mut client = agent.client().await?;
    init(&mut client, &repo, "init").await?;
    let cache_on = || {
        Some(pb::ResticOptions {
            use_cache: true,
            ..Default::default()
        })
    };
    let uid = pod_uid(1);
    let data = agent.volume(&uid, EMPTY_DIR, "data")?;
    for f in 0..50 {
        std::fs::create_dir_all(data.join(format!("d{}", f % 5)))?;
        std::fs::write(
            data.join(format!("d{}/f{f}", f % 5)),
            pseudo_random(2048, f as u64),
        )?;
    }
    let mut req = backup("b1", &repo, &uid, "data");
    req.options.as_mut().unwrap().restic = cache_on();
    let (_, r) = collect(client.backup(req).await?.into_inner()).await?;
    ensure!(outcome(&r) == Outcome::Succeeded, "{r:?}");
    let snapshot = r.snapshot_id.clone();

    // Every file of the shared cache, with its size and time.
    let listing = |dir: &std::path::Path| -> Result<Vec<(std::path::PathBuf, u64, std::time::SystemTime)>> {
        let mut out = Vec::new();
        let mut todo = vec![dir.to_path_buf()];
        while let Some(d) = todo.pop() {
            for e in std::fs::read_dir(&d)? {
                let e = e?;
                let m = e.path().symlink_metadata()?;
                if m.is_dir() {
                    todo.push(e.path());
                } else {
                    out.push((e.path(), m.len(), m.modified()?));
                }
            }
        }
        out.sort();
        Ok(out)
    };
    let caches: Vec<_> = std::fs::read_dir(agent.dir.join("state/cache"))?
        .flatten()
        .map(|e| e.path())
        .collect();
    ensure!(caches.len() == 1, "{caches:?}");
    let before = listing(&caches[0])?;
    ensure!(before.len() > 2, "the backup filled the cache: {before:?}");
    // The shared cache moved aside for a moment: a restore from an empty one.
    let aside = agent.dir.join("cache-aside");
    std::fs::rename(&caches[0], &aside)?;

    for (run, uid) in [("r0", pod_uid(4)), ("r1", pod_uid(2)), ("r2", pod_uid(3))] {
        let target = agent.volume(&uid, EMPTY_DIR, "restore")?;
        let mut options = options(run);
        options.restic = cache_on();
        let req = pb::RestoreRequest {
            options: Some(options),
            repository: Some(repository(&repo)),
            volume: Some(pb::VolumeRef {
                pod_uid: uid.clone(),
                volume_name: "restore".into(),
                pv_name: String::new(),
            }),
            snapshot_id: snapshot.clone(),
            ..Default::default()
        };
        let (_, restored) = collect(client.restore(req).await?.into_inner()).await?;
        ensure!(outcome(&restored) == Outcome::Succeeded, "{restored:?}");
        assert_trees_equal(&data, &target)?;
        // Not a file of the shared cache added, changed or removed.
        if run == "r0" {
            ensure!(
                listing(&caches[0])?.is_empty(),
                "the restore wrote to the empty cache"
            );
            std::fs::remove_dir(&caches[0])?;
            std::fs::rename(&aside, &caches[0])?;
        } else {
            ensure!(
                listing(&caches[0])? == before,
                "the restore changed the shared cache"
            );
        }
    }
    // From the empty cache restic fetched what it needed into the restore's own layer; from
    // the one the backup filled, nothing: it read the cache.
    let fetched: Vec<String> = agent
        .log()
        .lines()
        .map(without_colours)
        .filter(|l| l.contains("a restore read the repository's cache"))
        .filter_map(|l| l.split("fetched=").nth(1).map(|n| n.trim().to_owned()))
        .collect();
    ensure!(fetched.len() == 3, "{}", agent.log());
    ensure!(fetched[0] != "0" && fetched[1..] == ["0", "0"], "{fetched:?}");
    // The layer went with each run.
    let scratch: Vec<_> = walk_names(&agent.dir.join("state"))
        .into_iter()
        .filter(|n| n.contains("cache-layer"))
        .collect();
    ensure!(scratch.is_empty(), "{scratch:?}");
    Ok(())
}

/// A log line without its terminal colours.
fn without_colours(line: &str) -> String {
    let mut out = String::new();
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            // An escape sequence ends with a letter.
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// Every path below `dir`, as text.
fn walk_names(dir: &std::path::Path) -> Vec<String> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        out.push(e.path().display().to_string());
        if e.path().symlink_metadata().is_ok_and(|m| m.is_dir()) {
            out.extend(walk_names(&e.path()));
        }
    }
    out
}
