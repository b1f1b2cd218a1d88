//! `devenv`: the local environment for people, not tests. Starts the same real control plane and
//! S3 server the tests use, installs the CRDs, applies the samples, shows `kubectl get restic`;
//! with `--coordinator` and `--agent` it also runs the operator: a backup of a demo app on a
//! manual trigger and a restore of its snapshot checked against the volume. Everything keeps
//! running until Ctrl-C (or stops at once with `--exit`).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use kube::Api;
use restic_operator_api::backup::ResticBackup;
use restic_operator_e2e::controlplane::ControlPlane;
use restic_operator_e2e::fixtures::{assert_trees_equal, make_tree};
use restic_operator_e2e::operator::{Agent, Coordinator, app_pod};
use restic_operator_e2e::s3::S3Server;
use restic_operator_e2e::tools::tool;
use restic_operator_e2e::{ResticRepo, eventually};

const USAGE: &str = "usage: devenv up [--dir DIR] [--exit] [--coordinator BIN --agent BIN]";

fn main() -> Result<()> {
    let mut args = std::env::args().skip(1);
    if args.next().as_deref() != Some("up") {
        bail!(USAGE);
    }
    let mut dir = default_dir();
    let mut exit = false;
    let mut coordinator_bin = None;
    let mut agent_bin = None;
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--dir" => dir = PathBuf::from(args.next().context(USAGE)?),
            "--exit" => exit = true,
            "--coordinator" => coordinator_bin = Some(PathBuf::from(args.next().context(USAGE)?)),
            "--agent" => agent_bin = Some(PathBuf::from(args.next().context(USAGE)?)),
            _ => bail!(USAGE),
        }
    }
    let repo_root = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .context("repository root")?
        .to_path_buf();

    // A fresh environment every time: state from an earlier run would only confuse.
    if dir.exists() {
        std::fs::remove_dir_all(&dir).with_context(|| format!("remove old state in {}", dir.display()))?;
    }
    std::fs::create_dir_all(&dir)?;
    println!(
        "==> starting the S3 server and the Kubernetes control plane in {}",
        dir.display()
    );
    let s3 = S3Server::start(&dir)?;
    let plane = ControlPlane::start(&dir.join("control-plane"))?;
    let kubeconfig = dir.join("kubeconfig");
    std::fs::copy(&plane.admin_kubeconfig, &kubeconfig)?;
    let kubectl = |args: &[&str]| -> Result<()> {
        let status = Command::new(tool("kubectl")?)
            .arg("--kubeconfig")
            .arg(&kubeconfig)
            .args(args)
            .status()?;
        if !status.success() {
            bail!("kubectl {} failed", args.join(" "));
        }
        Ok(())
    };

    println!("==> installing the CRDs from crds/");
    let crds = repo_root.join("crds").display().to_string();
    kubectl(&["apply", "--server-side", "-f", &crds])?;
    kubectl(&[
        "wait",
        "--for",
        "condition=Established",
        "--timeout",
        "60s",
        "-f",
        &crds,
    ])?;

    println!("==> applying the specification's sample resources from samples/spec/");
    for ns in ["backup-system", "media"] {
        kubectl(&["create", "namespace", ns])?;
    }
    kubectl(&[
        "apply",
        "--server-side",
        "-f",
        &repo_root.join("samples/spec").display().to_string(),
    ])?;
    kubectl(&["get", "restic", "--all-namespaces"])?;

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let operator = match (&coordinator_bin, &agent_bin) {
        (Some(c), Some(a)) => Some(runtime.block_on(run_operator(&kubeconfig, &dir, &s3, c, a, &kubectl))?),
        (None, None) => None,
        _ => bail!(USAGE),
    };

    println!(
        "\nS3 server: {} (access key {})",
        s3.endpoint.url, s3.endpoint.access_key
    );
    println!(
        "Use the cluster from another shell:\n  export KUBECONFIG={}",
        kubeconfig.display()
    );
    println!("  kubectl get restic -A; kubectl explain resticbackup.spec");
    if operator.is_some() {
        println!(
            "  kubectl -n demo patch rbackup web --type merge -p '{{\"spec\":{{\"manualTrigger\":\"'$(date -Is)'\"}}}}'  # back up again"
        );
    }
    if exit {
        return Ok(());
    }
    println!("\nRunning; press Ctrl-C to stop everything.");
    runtime.block_on(tokio::signal::ctrl_c())?;
    println!("stopping");
    drop(operator);
    drop(plane);
    drop(s3);
    Ok(())
}

/// Runs the operator for real: the coordinator and an agent on a pretend node, a demo app
/// whose volume is a directory here, a repository on the S3 server, a backup run on a manual
/// trigger, and a restore of its snapshot compared byte for byte with the volume.
async fn run_operator(
    kubeconfig: &Path,
    dir: &Path,
    s3: &S3Server,
    coordinator_bin: &Path,
    agent_bin: &Path,
    kubectl: &dyn Fn(&[&str]) -> Result<()>,
) -> Result<(Coordinator, Agent)> {
    println!("\n==> starting the coordinator (namespace restic-operator) and a node agent");
    kubectl(&["create", "namespace", "restic-operator"])?;
    kubectl(&["create", "namespace", "demo"])?;
    let client = restic_operator_e2e::client_from_kubeconfig(kubeconfig).await?;
    let coordinator = Coordinator::start(
        coordinator_bin,
        kubeconfig,
        "restic-operator",
        "coordinator-0",
        &dir.join("coordinator"),
        &["--repository-timeout=20s".into(), "--progress-interval=1s".into()],
    )
    .await?;
    let agent = Agent::start(&client, agent_bin, "restic-operator", "devenv-node", dir).await?;
    println!(
        "    coordinator log: {}\n    agent log: {}",
        coordinator.process.log.display(),
        agent.process.log.display()
    );

    println!("==> a demo app (namespace demo, pod web-0) whose volume 'data' is a directory on this machine");
    let uid = app_pod(&client, "demo", &agent.node, "web-0", "web", "data").await?;
    let data = agent.empty_dir(&uid, "data")?;
    make_tree(&data)?;
    std::fs::write(data.join("README"), b"backed up by restic-operator\n")?;
    println!("    {}", data.display());

    let repo = ResticRepo {
        url: s3.endpoint.repository("demo", "web"),
        password: "demo-password".into(),
        s3: s3.endpoint.clone(),
    };
    let mut creds = format!("  RESTIC_PASSWORD: {}\n", repo.password);
    for (k, v) in repo.s3.env() {
        creds.push_str(&format!("  {k}: {v}\n"));
    }
    let manifest = format!(
        "apiVersion: v1\nkind: Secret\nmetadata: {{name: demo-repo-creds, namespace: demo}}\nstringData:\n{creds}---\n\
         apiVersion: backup.resticbackup.io/v1alpha1\nkind: ResticRepository\nmetadata: {{name: demo-repo, namespace: demo}}\n\
         spec: {{repositoryURL: '{}', credentialsSecretRef: {{name: demo-repo-creds}}}}\n---\n\
         apiVersion: backup.resticbackup.io/v1alpha1\nkind: ResticBackup\nmetadata: {{name: web, namespace: demo}}\n\
         spec:\n  repositoryRef: {{name: demo-repo}}\n  schedule: '*/15 * * * *'\n  \
         source: {{podVolumeBackup: {{selector: {{matchLabels: {{app: web}}}}, volumeName: data}}}}\n  \
         retention: {{enabled: true, policy: {{keepLast: 5}}}}\n  manualTrigger: first-run\n",
        repo.url
    );
    let file = dir.join("demo.yaml");
    std::fs::write(&file, manifest)?;
    println!(
        "==> applying {} (repository, credentials, a backup with a manual trigger)",
        file.display()
    );
    kubectl(&["apply", "--server-side", "-f", &file.display().to_string()])?;

    let backups: Api<ResticBackup> = Api::namespaced(client.clone(), "demo");
    let last = eventually("the demo backup", Duration::from_secs(180), || async {
        Ok(backups
            .get("web")
            .await?
            .status
            .and_then(|s| s.last_backup)
            .filter(|l| l.result.is_some()))
    })
    .await
    .with_context(|| coordinator.log())?;
    kubectl(&["get", "resticrepository,resticbackup", "-n", "demo"])?;
    let snapshot = last
        .snapshot_id
        .clone()
        .with_context(|| format!("the backup did not succeed: {:?}", last.message))?;

    println!("==> restoring snapshot {snapshot} with restic and comparing it with the volume");
    let target = dir.join("restore");
    let out = repo
        .restic()?
        .args(["restore", &snapshot, "--target"])
        .arg(&target)
        .output()?;
    if !out.status.success() {
        bail!("restic restore: {}", String::from_utf8_lossy(&out.stderr));
    }
    assert_trees_equal(&data, &target.join("data"))?;
    println!(
        "    restored into {}: identical to the volume (contents, modes, mtimes, symlinks)",
        target.join("data").display()
    );
    Ok((coordinator, agent))
}

fn default_dir() -> PathBuf {
    let cache = std::env::var_os("RESTIC_OPERATOR_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            std::env::var_os("XDG_CACHE_HOME")
                .map(PathBuf::from)
                .unwrap_or_else(|| PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(".cache"))
                .join("restic-operator")
        });
    cache.join("devenv")
}
