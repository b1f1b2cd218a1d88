//! The cluster tier: a real single-node Kubernetes cluster on this machine (control plane, a
//! node with kubelet and containerd, a default StorageClass), an S3 server pods can reach, and
//! restic-operator's images, built from this workspace's binaries and imported into the node.
//! The chart is installed with helm by the tests and the demo, as users install it.

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{Context, Result, bail};

use crate::controlplane::ControlPlane;
use crate::node::{BRIDGE_IP, Network, Node};
use crate::s3::S3Server;
use crate::tools::tool;
use crate::{EXTERNAL_KUBECONFIG_ENV, EXTERNAL_S3_ADDRESS_ENV};

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

/// The cluster the cluster tier tests: one this process started on this machine, or a user's
/// (`RESTIC_OPERATOR_E2E_KUBECONFIG`), with an S3 server on this machine that its pods reach.
/// Dropping a local one stops the node (containers first), the control plane and the S3
/// server, and removes the bridge; a user's cluster is left running.
pub struct Cluster {
    /// What this process started; `None` for a user's cluster.
    pub local: Option<LocalCluster>,
    pub s3: S3Server,
    /// Admin kubeconfig.
    pub kubeconfig: PathBuf,
    /// Scratch space on this machine.
    pub dir: PathBuf,
}

/// The control plane, node and bridge of a cluster started on this machine.
pub struct LocalCluster {
    pub node: Node,
    pub plane: ControlPlane,
    _network: Network,
}

impl Cluster {
    /// The cluster of `RESTIC_OPERATOR_E2E_KUBECONFIG` when it is set (its nodes must already
    /// have the images: see the Vagrantfile), else one started on this machine with images
    /// built from `coordinator` and `agent`. Scratch space is under `dir`.
    pub fn from_env(dir: &Path, coordinator: &Path, agent: &Path) -> Result<Self> {
        let target = external_target(
            std::env::var_os(EXTERNAL_KUBECONFIG_ENV),
            std::env::var(EXTERNAL_S3_ADDRESS_ENV).ok(),
        )?;
        match target {
            Some((kubeconfig, s3_address)) => Self::external(&dir.join("cluster"), &kubeconfig, s3_address),
            None => {
                let images = Images::build(&dir.join("images"), coordinator, agent)?;
                Self::start(&dir.join("cluster"), &images)
            }
        }
    }

    /// A user's cluster at `kubeconfig`, and an S3 server on this machine's `s3_address`.
    pub fn external(dir: &Path, kubeconfig: &Path, s3_address: Ipv4Addr) -> Result<Self> {
        std::fs::create_dir_all(dir)?;
        let s3 = S3Server::start_on(dir, s3_address)
            .with_context(|| format!("start the S3 server on {s3_address}"))?;
        let cluster = Self {
            local: None,
            s3,
            kubeconfig: kubeconfig.to_path_buf(),
            dir: dir.to_path_buf(),
        };
        let out = cluster.kubectl()?.args(["get", "nodes", "-o", "name"]).output()?;
        if !out.status.success() {
            bail!(
                "the cluster of {} does not answer: {}",
                kubeconfig.display(),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        eprintln!(
            "[e2e] testing the cluster of {} (S3 server at {})",
            kubeconfig.display(),
            cluster.s3.endpoint.url
        );
        Ok(cluster)
    }

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
            local: Some(LocalCluster {
                node,
                plane,
                _network: network,
            }),
            s3,
            dir: dir.to_path_buf(),
        })
    }

    /// A kubeconfig that acts as `user` in `groups`: the admin's, impersonating them, so it
    /// works on any cluster whose admin may impersonate (every distribution's does).
    pub fn kubeconfig_as(&self, user: &str, groups: &[&str]) -> Result<PathBuf> {
        let out = self
            .kubectl()?
            .args(["config", "view", "--raw", "--minify", "--flatten", "-o", "json"])
            .output()?;
        if !out.status.success() {
            bail!("kubectl config view: {}", String::from_utf8_lossy(&out.stderr));
        }
        let mut config: serde_json::Value = serde_json::from_slice(&out.stdout)?;
        let auth = config["users"][0]["user"]
            .as_object_mut()
            .context("the admin kubeconfig has no user")?;
        auth.insert("as".into(), user.into());
        auth.insert("as-groups".into(), groups.into());
        let path = self.dir.join(format!("{}.kubeconfig", user.replace(':', "_")));
        std::fs::write(&path, serde_json::to_vec_pretty(&config)?)?;
        Ok(path)
    }

    /// Installs (or upgrades) the chart from `charts/restic-operator` as `release` in
    /// `namespace`, with `values` (`--set` items) on top, and waits until the coordinator and
    /// every agent are ready. On a local cluster it is set up for the node (its kubelet root, a
    /// state directory of its own, the host's cgroup v1 tree); a user's cluster gets the
    /// chart's defaults.
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
            ]);
        match &self.local {
            Some(local) => {
                cmd.arg("--set-string")
                    .arg(format!("agent.kubeletRoot={}", local.node.kubelet_root.display()))
                    .arg("--set-string")
                    .arg(format!("agent.stateDir={}", state.display()))
                    .args(["--set", "agent.mountHostCgroupfs=true"]);
            }
            None => {
                cmd.arg("--values").arg(self.users_values(release, namespace)?);
            }
        }
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

    /// The values the user installed `release` with on their cluster (e.g. their kubelet
    /// root), read the first time and kept, so a test that uninstalls and installs again
    /// still installs with them. Empty if it was not installed.
    fn users_values(&self, release: &str, namespace: &str) -> Result<PathBuf> {
        let path = self.dir.join(format!("values-of-{namespace}-{release}.yaml"));
        if path.exists() {
            return Ok(path);
        }
        let out = self
            .helm()?
            .args([
                "get",
                "values",
                release,
                "--namespace",
                namespace,
                "--output",
                "yaml",
            ])
            .output()?;
        let stderr = String::from_utf8_lossy(&out.stderr);
        let values = match out.status.success() {
            true if !matches!(String::from_utf8_lossy(&out.stdout).trim(), "" | "null") => out.stdout,
            true => b"{}\n".to_vec(),
            false if stderr.contains("not found") => b"{}\n".to_vec(),
            false => bail!("helm get values {release}: {stderr}"),
        };
        std::fs::write(&path, values)?;
        Ok(path)
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

/// The user's cluster to test, from the values of `RESTIC_OPERATOR_E2E_KUBECONFIG` and
/// `RESTIC_OPERATOR_E2E_S3_ADDRESS`: its kubeconfig and the address for the S3 server, or
/// `None` to start a cluster here.
fn external_target(
    kubeconfig: Option<std::ffi::OsString>,
    s3_address: Option<String>,
) -> Result<Option<(PathBuf, Ipv4Addr)>> {
    let Some(kubeconfig) = kubeconfig else {
        return Ok(None);
    };
    let Some(address) = s3_address else {
        bail!(
            "{EXTERNAL_KUBECONFIG_ENV} is set but {EXTERNAL_S3_ADDRESS_ENV} is not: set it to an \
             IPv4 address of this machine that the cluster's pods reach (192.168.56.1 for the \
             Vagrantfile's VMs); the tests' S3 server listens there"
        );
    };
    let address: Ipv4Addr = address
        .parse()
        .with_context(|| format!("{EXTERNAL_S3_ADDRESS_ENV}={address:?} is not an IPv4 address"))?;
    Ok(Some((PathBuf::from(kubeconfig), address)))
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_users_cluster_needs_an_s3_address_its_pods_reach() {
        assert!(external_target(None, Some("10.0.0.1".into())).unwrap().is_none());
        let missing = external_target(Some("k".into()), None).unwrap_err().to_string();
        assert!(
            missing.contains("RESTIC_OPERATOR_E2E_S3_ADDRESS is not"),
            "{missing}"
        );
        let wrong = external_target(Some("k".into()), Some("vm.local".into()))
            .unwrap_err()
            .to_string();
        assert!(wrong.contains("\"vm.local\" is not an IPv4 address"), "{wrong}");
        let (kubeconfig, address) = external_target(Some("k".into()), Some("192.168.56.1".into()))
            .unwrap()
            .unwrap();
        assert_eq!(
            (kubeconfig, address),
            (PathBuf::from("k"), Ipv4Addr::new(192, 168, 56, 1))
        );
    }
}
