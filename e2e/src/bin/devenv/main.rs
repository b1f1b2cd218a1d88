//! `devenv`: the local environment for people, not tests, and the README's first command.
//! Starts the cluster tier (control plane, kubelet with containerd, a default StorageClass, an
//! S3 server on the node's bridge), installs the chart with helm, deploys a demo app with data on a PersistentVolumeClaim, backs
//! it up, restores the snapshot with restic and compares it byte for byte, then shows how to
//! look around.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use k8s_openapi::api::core::v1::{PersistentVolume, PersistentVolumeClaim};
use kube::Api;
use restic_operator_api::backup::ResticBackup;
use restic_operator_e2e::cluster::{Cluster, Images};
use restic_operator_e2e::fixtures::{assert_trees_equal, make_tree};
use restic_operator_e2e::{ResticRepo, eventually};

const USAGE: &str = "usage: devenv up [--exit] --coordinator BIN --agent BIN";

fn main() -> Result<()> {
    let mut args = std::env::args().skip(1);
    if args.next().as_deref() != Some("up") {
        bail!(USAGE);
    }
    let mut exit = false;
    let mut coordinator = None;
    let mut agent = None;
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--exit" => exit = true,
            "--coordinator" => coordinator = Some(PathBuf::from(args.next().context(USAGE)?)),
            "--agent" => agent = Some(PathBuf::from(args.next().context(USAGE)?)),
            _ => bail!(USAGE),
        }
    }
    let (Some(coordinator), Some(agent)) = (coordinator, agent) else {
        bail!(USAGE);
    };
    let dir = restic_operator_e2e::state_dir().to_path_buf();
    println!("==> building the images (coordinator, agent, pause, busybox) without a registry");
    let images = Images::build(&dir.join("images"), &coordinator, &agent)?;
    println!("==> starting a single-node cluster in {}", dir.display());
    let cluster = Cluster::start(&dir.join("cluster"), &images)?;
    let kubeconfig = dir.join("kubeconfig");
    std::fs::copy(&cluster.kubeconfig, &kubeconfig)?;
    run(cluster.kubectl()?.args(["get", "nodes", "-o", "wide"]))?;

    println!("\n==> helm install restic-operator charts/restic-operator (namespace restic-operator)");
    cluster.install_operator(
        "restic-operator",
        "restic-operator",
        &["coordinator.extraArgs={--progress-interval=1s}".into()],
    )?;
    run(cluster
        .kubectl()?
        .args(["-n", "restic-operator", "get", "pods", "-o", "wide"]))?;

    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let (volume, snapshot) = runtime.block_on(demo(&cluster, &dir))?;

    println!("==> restoring snapshot {snapshot} with restic and comparing it with the volume");
    let target = dir.join("restore");
    let repo = demo_repository(&cluster);
    let out = repo
        .restic()?
        .args(["restore", &snapshot, "--target"])
        .arg(&target)
        .output()?;
    if !out.status.success() {
        bail!("restic restore: {}", String::from_utf8_lossy(&out.stderr));
    }
    assert_trees_equal(&volume.join("site"), &target.join("data/site"))?;
    println!(
        "    restored into {}: identical to the app's volume (contents, modes, mtimes, symlinks)",
        target.join("data").display()
    );

    println!(
        "\nLook around from another shell:\n  export KUBECONFIG={}\n  \
         kubectl get restic -A\n  \
         kubectl -n demo describe resticbackup web\n  \
         kubectl -n demo get events --sort-by=.lastTimestamp\n  \
         kubectl -n demo patch rbackup web --type merge -p '{{\"spec\":{{\"manualTrigger\":\"'$(date +%s)'\"}}}}'   # back up again\n  \
         kubectl -n restic-operator logs ds/restic-operator-agent\n  \
         {agent} debug --node {node} runs      # the agent's runs, from your kubeconfig\n  \
         {agent} debug --node {node} attach RUN_ID   # a run's progress bar\n  \
         helm -n restic-operator status restic-operator\n\
         The app's volume on this machine: {}\nThe S3 server: {} (access key {})",
        kubeconfig.display(),
        volume.display(),
        cluster.s3.endpoint.url,
        cluster.s3.endpoint.access_key,
        agent = agent.display(),
        node = restic_operator_e2e::node::NODE_NAME,
    );
    if exit {
        return Ok(());
    }
    println!("\nRunning; press Ctrl-C to stop everything.");
    runtime.block_on(tokio::signal::ctrl_c())?;
    println!("stopping");
    drop(cluster);
    Ok(())
}

fn demo_repository(cluster: &Cluster) -> ResticRepo {
    ResticRepo {
        url: cluster.s3.endpoint.repository("demo", "web"),
        password: "demo-password".into(),
        s3: cluster.s3.endpoint.clone(),
    }
}

/// The demo app (a Deployment whose pod writes a small site into its claim), its repository,
/// and a backup with a pre-backup hook and a manual trigger, applied with kubectl as a user
/// would. Returns the claim's directory on this machine and the snapshot the backup made.
async fn demo(cluster: &Cluster, dir: &Path) -> Result<(PathBuf, String)> {
    let repo = demo_repository(cluster);
    let mut creds = format!("  RESTIC_PASSWORD: {}\n", repo.password);
    for (k, v) in repo.s3.env() {
        creds.push_str(&format!("  {k}: {v}\n"));
    }
    let app = format!(
        r#"apiVersion: v1
kind: Namespace
metadata: {{name: demo}}
---
apiVersion: v1
kind: PersistentVolumeClaim
metadata: {{name: web-data, namespace: demo}}
spec: {{accessModes: [ReadWriteOnce], resources: {{requests: {{storage: 1Gi}}}}}}
---
apiVersion: apps/v1
kind: Deployment
metadata: {{name: web, namespace: demo}}
spec:
  selector: {{matchLabels: {{app: web}}}}
  template:
    metadata: {{labels: {{app: web}}}}
    spec:
      terminationGracePeriodSeconds: 1
      containers:
        - name: web
          image: e2e.local/busybox:1.35
          command: [sh, -c, "trap 'exit 0' TERM; while true; do sleep 1; done"]
          volumeMounts: [{{name: data, mountPath: /data}}]
      volumes: [{{name: data, persistentVolumeClaim: {{claimName: web-data}}}}]
---
apiVersion: v1
kind: Secret
metadata: {{name: demo-repo-creds, namespace: demo}}
stringData:
{creds}---
apiVersion: backup.resticbackup.io/v1alpha1
kind: ResticRepository
metadata: {{name: demo-repo, namespace: demo}}
spec: {{repositoryURL: '{url}', credentialsSecretRef: {{name: demo-repo-creds}}}}
"#,
        url = repo.url
    );
    let file = dir.join("demo-app.yaml");
    std::fs::write(&file, app)?;
    println!(
        "\n==> kubectl apply -f {} (a web app with a claim, a repository and its credentials)",
        file.display()
    );
    run(cluster
        .kubectl()?
        .args(["apply", "--server-side", "-f"])
        .arg(&file))?;
    run(cluster.kubectl()?.args([
        "-n",
        "demo",
        "rollout",
        "status",
        "deployment/web",
        "--timeout=120s",
    ]))?;

    let client = restic_operator_e2e::client_from_kubeconfig(&cluster.kubeconfig).await?;
    let claims: Api<PersistentVolumeClaim> = Api::namespaced(client.clone(), "demo");
    let pv = claims
        .get("web-data")
        .await?
        .spec
        .and_then(|s| s.volume_name)
        .context("claim not bound")?;
    let volume = PathBuf::from(
        Api::<PersistentVolume>::all(client.clone())
            .get(&pv)
            .await?
            .spec
            .and_then(|s| s.local)
            .context("not a local volume")?
            .path,
    );
    make_tree(&volume.join("site"))?;
    println!("    the app's data: {}", volume.display());

    let backup = r#"apiVersion: backup.resticbackup.io/v1alpha1
kind: ResticBackup
metadata: {name: web, namespace: demo}
spec:
  repositoryRef: {name: demo-repo}
  schedule: "*/30 * * * *"
  source: {pvc: {claimName: web-data}}
  retention: {enabled: true, policy: {keepLast: 5}}
  hooks:
    preBackup:
      exec:
        podSelector: {matchLabels: {app: web}}
        container: web
        command: [sh, -c, "date -u > /data/backed-up-at"]
  manualTrigger: first-run
"#;
    let file = dir.join("demo-backup.yaml");
    std::fs::write(&file, backup)?;
    println!(
        "==> kubectl apply -f {} (a backup every 30 minutes, and one now)",
        file.display()
    );
    run(cluster
        .kubectl()?
        .args(["apply", "--server-side", "-f"])
        .arg(&file))?;
    let backups: Api<ResticBackup> = Api::namespaced(client.clone(), "demo");
    let last = eventually("the demo backup", Duration::from_secs(180), || async {
        Ok(backups
            .get("web")
            .await?
            .status
            .and_then(|s| s.last_backup)
            .filter(|l| l.result.is_some()))
    })
    .await?;
    run(cluster.kubectl()?.args(["get", "restic", "-A", "-o", "wide"]))?;
    let snapshot = last
        .snapshot_id
        .clone()
        .with_context(|| format!("the backup did not succeed: {:?}", last.message))?;
    Ok((volume, snapshot))
}

fn run(cmd: &mut Command) -> Result<()> {
    let status = cmd.status()?;
    if !status.success() {
        bail!("{cmd:?} failed ({status})");
    }
    Ok(())
}
