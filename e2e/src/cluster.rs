//! The cluster tier: a real single-node Kubernetes cluster on this machine (control plane, a
//! node with kubelet and containerd, a default StorageClass), an S3 server pods can reach, and
//! restic-operator's images, built from this workspace's binaries and imported into the node.
//! The chart is installed with helm by the tests and the demo, as users install it.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{Context, Result, bail};

use crate::controlplane::ControlPlane;
use crate::node::{BRIDGE_IP, Network, Node};
use crate::s3::S3Server;
use crate::tools::tool;

/// The images of this workspace, assembled by `e2e/scripts/build-images.sh`.
pub struct Images {
    /// `(OCI archive, reference)` of each image.
    pub archives: Vec<(PathBuf, String)>,
    /// The tag of the coordinator and agent images (the chart's appVersion).
    pub tag: String,
}

/// The tag the images are built with: the chart's default, so the chart needs no image values.
pub const IMAGE_TAG: &str = "0.1.0";

impl Images {
    /// Builds the images from the coordinator and agent binaries into `out`.
    pub fn build(out: &Path, coordinator: &Path, agent: &Path) -> Result<Self> {
        let started = Instant::now();
        let script = repo_root().join("e2e/scripts/build-images.sh");
        let status = Command::new("bash")
            .arg(&script)
            .arg(out)
            .arg(coordinator)
            .arg(agent)
            .env("IMAGE_TAG", IMAGE_TAG)
            .status()
            .with_context(|| format!("run {}", script.display()))?;
        if !status.success() {
            bail!("{} failed ({status})", script.display());
        }
        let list = std::fs::read_to_string(out.join("images.txt"))?;
        let archives = list
            .lines()
            .filter_map(|l| l.split_once(' '))
            .map(|(a, r)| (PathBuf::from(a), r.to_string()))
            .collect();
        eprintln!("[e2e] images built in {:.1}s", started.elapsed().as_secs_f64());
        Ok(Self {
            archives,
            tag: IMAGE_TAG.into(),
        })
    }
}

/// A running cluster. Dropping it stops the node (containers first), the control plane, the S3
/// server, and removes the bridge.
pub struct Cluster {
    pub node: Node,
    pub plane: ControlPlane,
    pub s3: S3Server,
    /// Admin kubeconfig.
    pub kubeconfig: PathBuf,
    pub dir: PathBuf,
    _network: Network,
}

impl Cluster {
    /// Starts everything under `dir` and imports `images` into the node.
    pub fn start(dir: &Path, images: &Images) -> Result<Self> {
        let started = Instant::now();
        std::fs::create_dir_all(dir)?;
        let network = Network::create()?;
        let s3 = S3Server::start_on(dir, BRIDGE_IP).context("start the S3 server on the bridge")?;
        let plane = ControlPlane::start_on(&dir.join("control-plane"), BRIDGE_IP)
            .context("start the control plane on the bridge")?;
        let node = Node::start(&plane, &dir.join("node"), &images.archives).context("start the node")?;
        crate::provisioner::start(&plane.admin_kubeconfig, &dir.join("volumes"))
            .context("start the volume provisioner")?;
        eprintln!("[e2e] cluster up in {:.1}s", started.elapsed().as_secs_f64());
        Ok(Self {
            kubeconfig: plane.admin_kubeconfig.clone(),
            node,
            plane,
            s3,
            dir: dir.to_path_buf(),
            _network: network,
        })
    }

    /// Installs (or upgrades) the chart from `charts/restic-operator` as `release` in
    /// `namespace`, set up for this node (its kubelet root, a state directory of its own, the
    /// host's cgroup v1 tree), with `values` (`--set` items) on top; waits until the coordinator
    /// and every agent are ready.
    pub fn install_operator(&self, release: &str, namespace: &str, values: &[String]) -> Result<()> {
        let started = Instant::now();
        let state = self.dir.join("agent-state");
        let mut cmd = self.helm()?;
        cmd.args(["upgrade", "--install", release])
            .arg(chart_dir())
            .args([
                "--namespace",
                namespace,
                "--create-namespace",
                "--wait",
                "--timeout",
                "3m",
            ])
            .arg("--set-string")
            .arg(format!("agent.kubeletRoot={}", self.node.kubelet_root.display()))
            .arg("--set-string")
            .arg(format!("agent.stateDir={}", state.display()))
            .args(["--set", "agent.mountHostCgroupfs=true"]);
        for v in values {
            cmd.arg("--set").arg(v);
        }
        let out = cmd.output().context("run helm")?;
        if !out.status.success() {
            let pods = self
                .kubectl()?
                .args(["-n", namespace, "get", "pods", "-o", "wide"])
                .output()
                .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
                .unwrap_or_default();
            bail!(
                "helm install: {}
{pods}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        eprintln!("[e2e] chart installed in {:.1}s", started.elapsed().as_secs_f64());
        Ok(())
    }

    /// `kubectl` (the pinned one) as admin.
    pub fn kubectl(&self) -> Result<Command> {
        let mut cmd = Command::new(tool("kubectl")?);
        cmd.arg("--kubeconfig").arg(&self.kubeconfig);
        Ok(cmd)
    }

    /// `helm` (the pinned one) as admin.
    pub fn helm(&self) -> Result<Command> {
        let mut cmd = Command::new(tool("helm")?);
        cmd.arg("--kubeconfig")
            .arg(&self.kubeconfig)
            .env("HELM_CACHE_HOME", self.dir.join("helm/cache"))
            .env("HELM_CONFIG_HOME", self.dir.join("helm/config"))
            .env("HELM_DATA_HOME", self.dir.join("helm/data"));
        Ok(cmd)
    }
}

/// The repository's root directory.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("e2e/ has a parent")
        .to_path_buf()
}

/// The chart's directory.
pub fn chart_dir() -> PathBuf {
    repo_root().join("charts/restic-operator")
}

/// Builds the coordinator and agent binaries of this workspace (debug profile) and returns
/// their paths.
pub fn workspace_binaries() -> Result<(PathBuf, PathBuf)> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let status = Command::new(&cargo)
        .args([
            "build",
            "--quiet",
            "-p",
            "restic-operator-coordinator",
            "-p",
            "restic-operator-agent",
            "--bins",
        ])
        .current_dir(repo_root())
        .status()
        .context("cargo build of the coordinator and agent")?;
    if !status.success() {
        bail!("building the coordinator and agent failed ({status})");
    }
    let out = Command::new(&cargo)
        .args(["metadata", "--format-version", "1", "--no-deps"])
        .current_dir(repo_root())
        .output()?;
    let meta: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    let target = PathBuf::from(
        meta["target_directory"]
            .as_str()
            .context("cargo metadata without target_directory")?,
    )
    .join("debug");
    Ok((target.join("restic-coordinator"), target.join("restic-agent")))
}
