//! The cluster tier's real node: a Linux bridge for pod traffic, containerd with runc, the CNI
//! bridge plugin, kubelet, kube-scheduler and kube-proxy, joined to a [`ControlPlane`] that
//! listens on the bridge. Images come from OCI archives imported into containerd; nothing is
//! pulled. A default StorageClass is served by [`crate::provisioner`].
//!
//! One cluster per machine at a time: the bridge, the `kubepods` cgroups and kube-proxy's
//! iptables chains are the machine's. A lock file says who runs it; a cluster left behind by a
//! killed test run (containers keep running under their shims) is swept when the next starts.

use std::fs::File;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::controlplane::{ControlPlane, SERVICE_CIDR, write_kubeconfig};
use crate::process::{Process, free_port};
use crate::tools::tool;

/// The bridge pods are attached to, and its address (the node's IP, where the API server and
/// the S3 server listen for pods).
pub const BRIDGE: &str = "ro-e2e0";
pub const BRIDGE_IP: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 1);
pub const POD_CIDR: &str = "10.77.0.0/24";
/// The node's name.
pub const NODE_NAME: &str = "e2e-node";
/// containerd's namespace of the CRI.
const CRI_NAMESPACE: &str = "k8s.io";
/// The kubelet's `cgroupRoot`: the pods' cgroups are beneath it, apart from any other kubelet's
/// on the machine, so the sweep after a killed run touches only ours.
const CGROUP_ROOT: &str = "/restic-operator-e2e";
/// Where the lock of the machine's one cluster lives.
const LOCK: &str = "/tmp/restic-operator-e2e-cluster.lock";

/// The machine's bridge, held by the lock of the one cluster. Dropping it removes the bridge.
pub struct Network {
    _lock: File,
}

impl Network {
    /// Takes the machine's cluster lock (failing at once, with the holder, when another cluster
    /// runs), sweeps what a killed run left behind, and creates the bridge.
    pub fn create() -> Result<Self> {
        let uid = Command::new("id").arg("-u").output()?;
        if String::from_utf8_lossy(&uid.stdout).trim() != "0" {
            bail!(
                "the cluster tier needs root: it creates a bridge, mounts volumes and cgroups, and \
                 runs containerd and a kubelet (run the tests as root, e.g. in CI or a VM)"
            );
        }
        let lock = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .read(true)
            .open(LOCK)
            .with_context(|| format!("open {LOCK}"))?;
        if lock.try_lock().is_err() {
            let holder = std::fs::read_to_string(LOCK).unwrap_or_default();
            bail!(
                "another cluster tier runs on this machine (process {}): one at a time, since the \
                 bridge {BRIDGE}, the kubepods cgroups and kube-proxy's iptables chains are shared",
                holder.trim()
            );
        }
        std::fs::write(LOCK, std::process::id().to_string())?;
        sweep_leftovers();
        run("ip", &["link", "add", BRIDGE, "type", "bridge"])?;
        run("ip", &["addr", "add", &format!("{BRIDGE_IP}/24"), "dev", BRIDGE])?;
        run("ip", &["link", "set", BRIDGE, "up"])?;
        Ok(Self { _lock: lock })
    }
}

impl Drop for Network {
    fn drop(&mut self) {
        let _ = run("ip", &["link", "del", BRIDGE]);
    }
}

/// A running node. Dropping it stops the pods' containers, the node's processes, and unmounts
/// what the kubelet and containerd mounted under its directory.
pub struct Node {
    pub name: String,
    pub dir: PathBuf,
    /// The kubelet's root directory (`--root-dir`): the agent's `--kubelet-root`.
    pub kubelet_root: PathBuf,
    /// containerd's socket.
    pub containerd: PathBuf,
    // Dropped (killed) in reverse start order.
    processes: Vec<Process>,
}

impl Node {
    /// Starts containerd, imports `images` (`(OCI archive, reference)`), then kubelet,
    /// kube-scheduler and kube-proxy against `plane`, and waits until the node is Ready.
    pub fn start(plane: &ControlPlane, dir: &Path, images: &[(PathBuf, String)]) -> Result<Self> {
        let started = Instant::now();
        std::fs::create_dir_all(dir)?;
        let mut node = Self {
            name: NODE_NAME.into(),
            dir: dir.to_path_buf(),
            kubelet_root: dir.join("kubelet"),
            containerd: dir.join("containerd.sock"),
            processes: Vec::new(),
        };
        // First, so that nothing the node starts outlives the test process.
        node.processes.push(Process::spawn_with_death_signal(
            "node-reaper",
            Path::new("bash"),
            &[
                crate::cluster::repo_root()
                    .join("e2e/scripts/node-reaper.sh")
                    .display()
                    .to_string(),
                dir.display().to_string(),
                CGROUP_ROOT.into(),
            ],
            dir,
            "TERM",
        )?);
        node.start_containerd()?;
        node.import(images)?;
        node.start_kubelet(plane)?;
        node.start_scheduler(plane)?;
        node.start_proxy(plane)?;
        node.wait_ready(plane, Duration::from_secs(120))?;
        eprintln!(
            "[e2e] node {} ready in {:.1}s (kubelet root {})",
            node.name,
            started.elapsed().as_secs_f64(),
            node.kubelet_root.display()
        );
        Ok(node)
    }

    fn start_containerd(&mut self) -> Result<()> {
        let d = &self.dir;
        let cni_conf = d.join("cni");
        std::fs::create_dir_all(&cni_conf)?;
        std::fs::write(
            cni_conf.join("10-e2e.conflist"),
            serde_json::to_string_pretty(&serde_json::json!({
                "cniVersion": "0.4.0",
                "name": "e2e",
                "plugins": [
                    {
                        "type": "bridge",
                        "bridge": BRIDGE,
                        "isGateway": true,
                        "ipMasq": false,
                        "hairpinMode": true,
                        "ipam": {
                            "type": "host-local",
                            "ranges": [[{"subnet": POD_CIDR, "gateway": BRIDGE_IP.to_string()}]],
                            "routes": [{"dst": "0.0.0.0/0"}],
                            "dataDir": d.join("cni-ipam").display().to_string(),
                        }
                    },
                    {"type": "portmap", "capabilities": {"portMappings": true}}
                ]
            }))?,
        )?;
        let config = d.join("containerd.toml");
        std::fs::write(
            &config,
            format!(
                r#"version = 2
root = "{root}"
state = "{state}"
[grpc]
  address = "{sock}"
[ttrpc]
  address = "{sock}.ttrpc"
[plugins."io.containerd.grpc.v1.cri"]
  # The pause image built from source and imported; never pulled.
  sandbox_image = "registry.k8s.io/pause:3.10.1"
  # This machine denies lowering oom_score_adj.
  restrict_oom_score_adj = true
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = "{cni}"
[plugins."io.containerd.internal.v1.opt"]
  path = "{opt}"
"#,
                root = d.join("containerd/root").display(),
                state = d.join("containerd/state").display(),
                sock = self.containerd.display(),
                cni = cni_conf.display(),
                opt = d.join("containerd/opt").display(),
            ),
        )?;
        let mut p = Process::spawn(
            "containerd",
            Path::new("containerd"),
            &["--config".into(), config.display().to_string()],
            d,
        )?;
        let deadline = Instant::now() + Duration::from_secs(30);
        while !self.ctr(&["version"])?.status.success() {
            p.check_running()?;
            if Instant::now() > deadline {
                bail!("containerd did not answer in 30s:\n{}", p.log_tail(20));
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        self.processes.push(p);
        Ok(())
    }

    fn ctr(&self, args: &[&str]) -> Result<std::process::Output> {
        Command::new("ctr")
            .arg("--address")
            .arg(&self.containerd)
            .args(["--namespace", CRI_NAMESPACE])
            .args(args)
            .output()
            .context("run ctr (Debian's containerd package)")
    }

    /// Imports OCI archives; each archive's one tag becomes `reference`.
    pub fn import(&self, images: &[(PathBuf, String)]) -> Result<()> {
        for (archive, reference) in images {
            let base = reference
                .rsplit_once(':')
                .map(|(b, _)| b)
                .context("image reference without a tag")?;
            let out = self.ctr(&[
                "images",
                "import",
                "--base-name",
                base,
                &archive.display().to_string(),
            ])?;
            if !out.status.success() {
                bail!(
                    "import {} as {reference}: {}",
                    archive.display(),
                    String::from_utf8_lossy(&out.stderr)
                );
            }
        }
        Ok(())
    }

    fn start_kubelet(&mut self, plane: &ControlPlane) -> Result<()> {
        let d = &self.dir;
        let kubeconfig = d.join("kubelet.kubeconfig");
        write_kubeconfig(
            &kubeconfig,
            &plane.server,
            plane.ca(),
            &plane
                .ca()
                .client(&format!("system:node:{}", self.name), Some("system:nodes"))?,
        )?;
        std::fs::write(d.join("ca.crt"), &plane.ca().pair().cert_pem)?;
        std::fs::write(d.join("resolv.conf"), "nameserver 127.0.0.1\n")?;
        let config = d.join("kubelet.yaml");
        std::fs::write(
            &config,
            format!(
                r#"apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
address: "{ip}"
port: {port}
readOnlyPort: 0
healthzPort: 0
authentication:
  anonymous: {{enabled: false}}
  webhook: {{enabled: true}}
  x509: {{clientCAFile: "{ca}"}}
authorization: {{mode: Webhook}}
cgroupDriver: cgroupfs
cgroupRoot: "{cgroup_root}"
# This machine has cgroup v1 only.
failCgroupV1: false
failSwapOn: false
containerRuntimeEndpoint: "unix://{sock}"
resolvConf: "{resolv}"
# No DNS add-on runs: pods reach Services by their IP and environment variables.
clusterDomain: cluster.local
# A test machine's disk and memory are what they are; never evict or collect images (the
# images were imported, not pulled, and could not come back).
evictionHard: {{memory.available: "1Mi", nodefs.available: "1%", imagefs.available: "1%"}}
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
protectKernelDefaults: false
serializeImagePulls: false
nodeStatusUpdateFrequency: 4s
syncFrequency: 10s
fileCheckFrequency: 10s
"#,
                ip = crate::node::BRIDGE_IP,
                port = free_port()?,
                ca = d.join("ca.crt").display(),
                sock = self.containerd.display(),
                resolv = d.join("resolv.conf").display(),
                cgroup_root = CGROUP_ROOT,
            ),
        )?;
        std::fs::create_dir_all(&self.kubelet_root)?;
        create_cgroup_root()?;
        self.processes.push(Process::spawn(
            "kubelet",
            &tool("kubelet")?,
            &[
                format!("--config={}", config.display()),
                format!("--kubeconfig={}", kubeconfig.display()),
                format!("--root-dir={}", self.kubelet_root.display()),
                format!("--cert-dir={}", d.join("kubelet-pki").display()),
                format!("--hostname-override={}", self.name),
                format!("--node-ip={BRIDGE_IP}"),
                "--v=1".into(),
            ],
            d,
        )?);
        Ok(())
    }

    fn start_scheduler(&mut self, plane: &ControlPlane) -> Result<()> {
        let kubeconfig = self.dir.join("scheduler.kubeconfig");
        write_kubeconfig(
            &kubeconfig,
            &plane.server,
            plane.ca(),
            &plane.ca().client("system:kube-scheduler", None)?,
        )?;
        let k = kubeconfig.display().to_string();
        self.processes.push(Process::spawn(
            "kube-scheduler",
            &tool("kube-scheduler")?,
            &[
                format!("--kubeconfig={k}"),
                format!("--authentication-kubeconfig={k}"),
                format!("--authorization-kubeconfig={k}"),
                "--leader-elect=false".into(),
                "--bind-address=127.0.0.1".into(),
                format!("--secure-port={}", free_port()?),
                "--v=1".into(),
            ],
            &self.dir,
        )?);
        Ok(())
    }

    /// kube-proxy in iptables mode, so pods reach the `kubernetes` Service and the chart's.
    fn start_proxy(&mut self, plane: &ControlPlane) -> Result<()> {
        let kubeconfig = self.dir.join("proxy.kubeconfig");
        write_kubeconfig(
            &kubeconfig,
            &plane.server,
            plane.ca(),
            &plane.ca().client("system:kube-proxy", None)?,
        )?;
        self.processes.push(Process::spawn(
            "kube-proxy",
            &tool("kube-proxy")?,
            &[
                format!("--kubeconfig={}", kubeconfig.display()),
                format!("--hostname-override={}", self.name),
                format!("--cluster-cidr={POD_CIDR}"),
                "--proxy-mode=iptables".into(),
                // Leave the machine's conntrack table size alone.
                "--conntrack-max-per-core=0".into(),
                format!("--metrics-bind-address=127.0.0.1:{}", free_port()?),
                format!("--healthz-bind-address=127.0.0.1:{}", free_port()?),
                "--v=1".into(),
            ],
            &self.dir,
        )?);
        let _ = SERVICE_CIDR;
        Ok(())
    }

    fn wait_ready(&mut self, plane: &ControlPlane, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            for p in &mut self.processes {
                p.check_running()?;
            }
            let out = Command::new(tool("kubectl")?)
                .arg("--kubeconfig")
                .arg(&plane.admin_kubeconfig)
                .args([
                    "get",
                    "node",
                    &self.name,
                    "-o",
                    "jsonpath={.status.conditions[?(@.type==\"Ready\")].status}",
                ])
                .output()?;
            if String::from_utf8_lossy(&out.stdout).trim() == "True" {
                return Ok(());
            }
            if Instant::now() > deadline {
                let kubelet = self.processes.iter().find(|p| p.name == "kubelet");
                bail!(
                    "node {} not Ready after {timeout:?}; kubelet log:\n{}",
                    self.name,
                    kubelet.map(|p| p.log_tail(30)).unwrap_or_default()
                );
            }
            std::thread::sleep(Duration::from_millis(500));
        }
    }

    /// A process of the node by name (`containerd`, `kubelet`, `kube-scheduler`, `kube-proxy`).
    pub fn log_tail(&self, name: &str, lines: usize) -> String {
        self.processes
            .iter()
            .find(|p| p.name == name)
            .map(|p| p.log_tail(lines))
            .unwrap_or_default()
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        // The kubelet first, so it restarts nothing; then every container and shim; then
        // containerd; then the mounts, so nobody removes a volume's host data through them.
        while let Some(mut p) = self.processes.pop() {
            if p.name == "containerd" {
                kill_containers(&self.dir);
            }
            p.kill();
        }
        unmount_beneath(&self.dir);
    }
}

/// Kills every process of the `kubepods` cgroups and every containerd shim of `dir` (a shim
/// outlives containerd on purpose, and its containers outlive the shim).
fn kill_containers(dir: &Path) {
    let dir = dir.display().to_string();
    for _ in 0..3 {
        for pid in kubepods_pids() {
            let _ = nix_kill(pid);
        }
        for pid in pids_with_arg(&dir, "containerd-shim") {
            let _ = nix_kill(pid);
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn nix_kill(pid: i32) -> std::io::Result<()> {
    let status = Command::new("kill").args(["-KILL", &pid.to_string()]).status()?;
    if status.success() {
        Ok(())
    } else {
        Err(std::io::Error::other("kill failed"))
    }
}

/// The kubelet wants its `cgroupRoot` to exist in every v1 hierarchy (cpuset's with the
/// parent's CPUs and memory nodes, as a fresh cpuset has none).
fn create_cgroup_root() -> Result<()> {
    let Ok(hierarchies) = std::fs::read_dir("/sys/fs/cgroup") else {
        return Ok(());
    };
    for h in hierarchies.flatten() {
        let path = h.path();
        if h.file_name() == "unified" || !path.is_dir() {
            continue;
        }
        let dir = path.join(CGROUP_ROOT.trim_start_matches('/'));
        std::fs::create_dir_all(&dir).with_context(|| format!("create {}", dir.display()))?;
        if h.file_name() == "cpuset" {
            for f in ["cpuset.cpus", "cpuset.mems"] {
                let v = std::fs::read_to_string(path.join(f))?;
                std::fs::write(dir.join(f), v.trim())?;
            }
        }
    }
    Ok(())
}

/// Processes in the node's cgroups (`CGROUP_ROOT`) of any hierarchy.
fn kubepods_pids() -> Vec<i32> {
    let mut pids = Vec::new();
    let Ok(hierarchies) = std::fs::read_dir("/sys/fs/cgroup") else {
        return pids;
    };
    for h in hierarchies.flatten() {
        collect_procs(&h.path().join(CGROUP_ROOT.trim_start_matches('/')), &mut pids);
    }
    pids.sort_unstable();
    pids.dedup();
    pids
}

fn collect_procs(dir: &Path, pids: &mut Vec<i32>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    if let Ok(text) = std::fs::read_to_string(dir.join("cgroup.procs")) {
        pids.extend(text.lines().filter_map(|l| l.trim().parse::<i32>().ok()));
    }
    for e in entries.flatten() {
        if e.file_type().is_ok_and(|t| t.is_dir()) {
            collect_procs(&e.path(), pids);
        }
    }
}

/// Processes whose command line has an argument containing `needle` and whose program name
/// contains `program`.
fn pids_with_arg(needle: &str, program: &str) -> Vec<i32> {
    let mut pids = Vec::new();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return pids;
    };
    for e in entries.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
            continue;
        };
        let Ok(cmdline) = std::fs::read(e.path().join("cmdline")) else {
            continue;
        };
        let args: Vec<String> = cmdline
            .split(|b| *b == 0)
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect();
        if args.first().is_some_and(|a| a.contains(program)) && args.iter().any(|a| a.contains(needle)) {
            pids.push(pid);
        }
    }
    pids
}

/// Unmounts (lazily, deepest first) every mount at or beneath `dir`, so removing `dir` never
/// reaches into a volume's host directory through a bind mount.
pub fn unmount_beneath(dir: &Path) {
    let prefix = dir.display().to_string();
    for _ in 0..3 {
        let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") else {
            return;
        };
        let mut points: Vec<String> = info
            .lines()
            .filter_map(|l| l.split(' ').nth(4))
            .map(unescape_mount_path)
            .filter(|p| p == &prefix || p.starts_with(&format!("{prefix}/")))
            .collect();
        if points.is_empty() {
            return;
        }
        points.sort_by_key(|p| std::cmp::Reverse(p.len()));
        for p in points {
            let _ = Command::new("umount").args(["-l", &p]).status();
        }
    }
}

fn unescape_mount_path(p: &str) -> String {
    p.replace("\\040", " ")
        .replace("\\011", "\t")
        .replace("\\012", "\n")
        .replace("\\134", "\\")
}

/// What a killed run leaves: containers under their shims, mounts under its state directory,
/// kube-proxy's iptables chains and the bridge. Called with the cluster lock held, so nothing
/// found belongs to a live cluster.
fn sweep_leftovers() {
    let base = std::env::temp_dir().join("restic-operator-e2e");
    let stale: Vec<PathBuf> = std::fs::read_dir(&base)
        .map(|entries| {
            entries
                .flatten()
                .filter(|e| {
                    !e.file_name()
                        .to_str()
                        .and_then(|n| n.parse::<u32>().ok())
                        .is_some_and(|pid| Path::new(&format!("/proc/{pid}")).exists())
                })
                .map(|e| e.path())
                .collect()
        })
        .unwrap_or_default();
    let mut killed = kubepods_pids();
    for dir in &stale {
        let dir = format!("{}/", dir.display());
        killed.extend(pids_with_arg(&dir, "containerd"));
        killed.extend(pids_with_arg(&dir, "kube"));
    }
    for pid in &killed {
        let _ = nix_kill(*pid);
    }
    if !killed.is_empty() {
        eprintln!(
            "[e2e] killed {} processes a previous cluster left behind",
            killed.len()
        );
        std::thread::sleep(Duration::from_millis(300));
    }
    for dir in &stale {
        unmount_beneath(dir);
    }
    if let Ok(kube_proxy) = tool("kube-proxy") {
        let _ = Command::new(kube_proxy)
            .arg("--cleanup")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status();
    }
    let _ = Command::new("ip")
        .args(["link", "del", BRIDGE])
        .stderr(std::process::Stdio::null())
        .status();
}

fn run(program: &str, args: &[&str]) -> Result<()> {
    let out = Command::new(program)
        .args(args)
        .output()
        .with_context(|| format!("run {program}"))?;
    if !out.status.success() {
        bail!(
            "{program} {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}
