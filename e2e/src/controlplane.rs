//! A real Kubernetes control plane on loopback: etcd, kube-apiserver (RBAC on, service-account
//! token signing) and kube-controller-manager (garbage collection, namespaces, service accounts,
//! Jobs, CronJobs). Flags follow controller-runtime's envtest and `hack/local-up-cluster.sh`.

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::certs::{Ca, CertPair, key_pair_pem};
use crate::process::{Process, free_port};
use crate::tools::tool;

/// The service CIDR; the first address is the `kubernetes` Service.
pub const SERVICE_CIDR: &str = "10.0.0.0/24";

/// A running control plane. Dropping it stops every process.
pub struct ControlPlane {
    pub dir: PathBuf,
    pub server: String,
    /// kubeconfig of `admin` in `system:masters`.
    pub admin_kubeconfig: PathBuf,
    ca: Ca,
    // Dropped (killed) in reverse start order: controller-manager, apiserver, etcd.
    processes: std::sync::Mutex<Vec<Process>>,
    /// kube-apiserver's command line, to start it again.
    apiserver_args: Vec<String>,
    /// How many times kube-apiserver was started, for the name of its log.
    apiserver_starts: std::sync::atomic::AtomicU32,
}

/// Where kube-apiserver is in [`ControlPlane`]'s processes.
const APISERVER: usize = 1;

impl ControlPlane {
    /// Starts etcd, kube-apiserver and kube-controller-manager with state under `dir`, and waits
    /// until the API server is ready and the controllers run. The API server listens on loopback,
    /// for tests with pretend nodes.
    pub fn start(dir: &Path) -> Result<Self> {
        Self::start_on(dir, Ipv4Addr::LOCALHOST)
    }

    /// Like [`ControlPlane::start`], with the API server listening on `address`: the cluster
    /// tier's bridge address, which pods reach through the `kubernetes` Service (kube-proxy)
    /// and which the API server advertises as that Service's endpoint. The controllers that
    /// need real kubelets (node lifecycle, pod garbage collection) only run then.
    pub fn start_on(dir: &Path, address: Ipv4Addr) -> Result<Self> {
        let real_nodes = !address.is_loopback();
        let started = Instant::now();
        std::fs::create_dir_all(dir)?;
        let pki = dir.join("pki");
        std::fs::create_dir_all(&pki)?;
        let ca = Ca::new("restic-operator-e2e-ca")?;
        write_pair(&pki, "ca", &ca.pair())?;
        let serving = ca.server(
            "kube-apiserver",
            &[
                "127.0.0.1",
                &address.to_string(),
                "10.0.0.1",
                "localhost",
                "kubernetes",
                "kubernetes.default",
                "kubernetes.default.svc",
                "kubernetes.default.svc.cluster.local",
            ],
        )?;
        write_pair(&pki, "apiserver", &serving)?;
        let (sa_key, sa_pub) = key_pair_pem()?;
        std::fs::write(pki.join("sa.key"), sa_key)?;
        std::fs::write(pki.join("sa.pub"), sa_pub)?;

        let etcd_port = free_port()?;
        let peer_port = free_port()?;
        let api_port = free_port()?;
        let server = format!("https://{address}:{api_port}");
        // The API server's identity towards kubelets (exec, logs, port-forward).
        write_pair(
            &pki,
            "apiserver-kubelet-client",
            &ca.client("kube-apiserver-kubelet-client", Some("system:masters"))?,
        )?;
        let mut processes = Vec::new();

        let etcd_url = format!("http://127.0.0.1:{etcd_port}");
        processes.push(Process::spawn(
            "etcd",
            &tool("etcd")?,
            &args(&[
                ("--data-dir", dir.join("etcd").display().to_string()),
                ("--listen-client-urls", etcd_url.clone()),
                ("--advertise-client-urls", etcd_url.clone()),
                ("--listen-peer-urls", format!("http://127.0.0.1:{peer_port}")),
                (
                    "--initial-advertise-peer-urls",
                    format!("http://127.0.0.1:{peer_port}"),
                ),
                (
                    "--initial-cluster",
                    format!("default=http://127.0.0.1:{peer_port}"),
                ),
                // Test data: durability across power loss buys nothing and costs seconds.
                ("--unsafe-no-fsync", "true".into()),
                ("--log-level", "warn".into()),
            ]),
            dir,
        )?);

        let p = |name: &str| pki.join(name).display().to_string();
        // With real nodes, what every ServiceAccount does is written to an audit log, so tests
        // can hold the operator's RBAC to what it really uses.
        let audit: Vec<(&str, String)> = if real_nodes {
            let policy = dir.join("audit-policy.yaml");
            std::fs::write(
                &policy,
                "apiVersion: audit.k8s.io/v1\nkind: Policy\nomitStages: [RequestReceived]\nrules:\n\
                 - level: Metadata\n  userGroups: [\"system:serviceaccounts\"]\n- level: None\n",
            )?;
            vec![
                ("--audit-policy-file", policy.display().to_string()),
                ("--audit-log-path", dir.join("audit.log").display().to_string()),
                ("--audit-log-format", "json".into()),
            ]
        } else {
            Vec::new()
        };
        let mut apiserver_args = args(&audit);
        apiserver_args.extend(args(&[
            ("--etcd-servers", etcd_url),
            ("--bind-address", address.to_string()),
            ("--advertise-address", address.to_string()),
            ("--kubelet-client-certificate", p("apiserver-kubelet-client.crt")),
            ("--kubelet-client-key", p("apiserver-kubelet-client.key")),
            // The node's name resolves nowhere; its InternalIP is the bridge address.
            ("--kubelet-preferred-address-types", "InternalIP".into()),
            ("--secure-port", api_port.to_string()),
            ("--cert-dir", p("")),
            ("--tls-cert-file", p("apiserver.crt")),
            ("--tls-private-key-file", p("apiserver.key")),
            ("--client-ca-file", p("ca.crt")),
            ("--authorization-mode", "Node,RBAC".into()),
            (
                "--service-account-issuer",
                "https://kubernetes.default.svc.cluster.local".into(),
            ),
            ("--service-account-key-file", p("sa.pub")),
            ("--service-account-signing-key-file", p("sa.key")),
            ("--service-cluster-ip-range", SERVICE_CIDR.into()),
            ("--allow-privileged", "true".into()),
            ("--storage-backend", "etcd3".into()),
            // The loopback address cannot be an endpoint of the `kubernetes` Service.
            (
                "--endpoint-reconciler-type",
                if real_nodes { "lease" } else { "none" }.into(),
            ),
            ("--v", "1".into()),
        ]));
        processes.push(Process::spawn(
            "kube-apiserver",
            &tool("kube-apiserver")?,
            &apiserver_args,
            dir,
        )?);

        let admin_kubeconfig = dir.join("admin.kubeconfig");
        write_kubeconfig(
            &admin_kubeconfig,
            &server,
            &ca,
            &ca.client("admin", Some("system:masters"))?,
        )?;
        let cm_kubeconfig = dir.join("controller-manager.kubeconfig");
        write_kubeconfig(
            &cm_kubeconfig,
            &server,
            &ca,
            &ca.client("system:kube-controller-manager", None)?,
        )?;

        let plane = Self {
            dir: dir.to_path_buf(),
            server,
            admin_kubeconfig,
            ca,
            processes: std::sync::Mutex::new(processes),
            apiserver_args,
            apiserver_starts: std::sync::atomic::AtomicU32::new(1),
        };
        plane
            .wait_ready(Duration::from_secs(90))
            .context("kube-apiserver did not become ready")?;

        plane.processes.lock().unwrap().push(Process::spawn(
            "kube-controller-manager",
            &tool("kube-controller-manager")?,
            &args(&[
                ("--kubeconfig", cm_kubeconfig.display().to_string()),
                ("--authentication-kubeconfig", cm_kubeconfig.display().to_string()),
                ("--authorization-kubeconfig", cm_kubeconfig.display().to_string()),
                ("--bind-address", "127.0.0.1".into()),
                ("--secure-port", free_port()?.to_string()),
                ("--leader-elect", "false".into()),
                ("--use-service-account-credentials", "true".into()),
                ("--service-account-private-key-file", p("sa.key")),
                ("--root-ca-file", p("ca.crt")),
                ("--cluster-signing-cert-file", p("ca.crt")),
                ("--cluster-signing-key-file", p("ca.key")),
                ("--service-cluster-ip-range", SERVICE_CIDR.into()),
                // Without kubelets, node lifecycle would mark the tests' pods not ready and pod
                // GC would delete pods bound to the nodes the tests pretend exist.
                (
                    "--controllers",
                    if real_nodes {
                        "*"
                    } else {
                        "*,-nodelifecycle,-podgc"
                    }
                    .into(),
                ),
                // Garbage collection and Job bookkeeping should feel instant in tests.
                ("--concurrent-gc-syncs", "5".into()),
                ("--v", "1".into()),
            ]),
            dir,
        )?);
        plane.wait_controllers(Duration::from_secs(60))?;
        eprintln!(
            "[e2e] control plane up at {} in {:.1}s (state in {})",
            plane.server,
            started.elapsed().as_secs_f64(),
            dir.display()
        );
        Ok(plane)
    }

    /// The API server's audit log (JSON lines) of what ServiceAccounts did; only with real nodes.
    pub fn audit_log(&self) -> PathBuf {
        self.dir.join("audit.log")
    }

    /// The CA that signs the API server and client certificates.
    pub fn ca(&self) -> &Ca {
        &self.ca
    }

    /// Stops kube-apiserver (SIGKILL, as a crashed or unreachable control plane): clients are
    /// refused until [`ControlPlane::start_apiserver`]. etcd and the controllers stay.
    pub fn stop_apiserver(&self) {
        self.processes.lock().unwrap()[APISERVER].kill();
    }

    /// Starts kube-apiserver again on the same port, flags and etcd, and waits until it is
    /// ready.
    pub fn start_apiserver(&self) -> Result<()> {
        let n = 1 + self
            .apiserver_starts
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let process = Process::spawn(
            &format!("kube-apiserver-{n}"),
            &tool("kube-apiserver")?,
            &self.apiserver_args,
            &self.dir,
        )?;
        // The old one was killed and reaped; dropping it does nothing more.
        self.processes.lock().unwrap()[APISERVER] = process;
        self.wait_ready(Duration::from_secs(90))
    }

    fn check_processes(&self) -> Result<()> {
        for p in self.processes.lock().unwrap().iter_mut() {
            p.check_running()?;
        }
        Ok(())
    }

    fn kubectl(&self, args: &[&str]) -> Result<std::process::Output> {
        Ok(std::process::Command::new(tool("kubectl")?)
            .arg("--kubeconfig")
            .arg(&self.admin_kubeconfig)
            .args(args)
            .output()?)
    }

    fn wait_ready(&self, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            self.check_processes()?;
            let out = self.kubectl(&["get", "--raw", "/readyz"])?;
            if out.status.success() {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "not ready after {timeout:?}: {}\nkube-apiserver log:\n{}",
                    String::from_utf8_lossy(&out.stderr),
                    self.processes.lock().unwrap()[APISERVER].log_tail(8)
                );
            }
            std::thread::sleep(Duration::from_millis(250));
        }
    }

    /// The controllers are running once the service-account controller has created the
    /// `default` ServiceAccount of `default`.
    fn wait_controllers(&self, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            self.check_processes()?;
            if self
                .kubectl(&["-n", "default", "get", "serviceaccount", "default"])?
                .status
                .success()
            {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("kube-controller-manager did not create the default ServiceAccount in {timeout:?}");
            }
            std::thread::sleep(Duration::from_millis(250));
        }
    }
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        let processes = self.processes.get_mut().unwrap_or_else(|e| e.into_inner());
        while let Some(mut p) = processes.pop() {
            p.kill();
        }
    }
}

fn args(pairs: &[(&str, String)]) -> Vec<String> {
    pairs.iter().map(|(k, v)| format!("{k}={v}")).collect()
}

fn write_pair(dir: &Path, name: &str, pair: &CertPair) -> Result<()> {
    std::fs::write(dir.join(format!("{name}.crt")), &pair.cert_pem)?;
    std::fs::write(dir.join(format!("{name}.key")), &pair.key_pem)?;
    Ok(())
}

/// Writes a kubeconfig with the credentials embedded, so it can be copied elsewhere.
pub fn write_kubeconfig(path: &Path, server: &str, ca: &Ca, client: &CertPair) -> Result<()> {
    use std::fmt::Write as _;
    let b64 = |s: &str| base64(s.as_bytes());
    let mut y = String::new();
    writeln!(
        y,
        "apiVersion: v1\nkind: Config\nclusters:\n- name: e2e\n  cluster:"
    )?;
    writeln!(
        y,
        "    server: {server}\n    certificate-authority-data: {}",
        b64(&ca.pair().cert_pem)
    )?;
    writeln!(y, "users:\n- name: user\n  user:")?;
    writeln!(y, "    client-certificate-data: {}", b64(&client.cert_pem))?;
    writeln!(y, "    client-key-data: {}", b64(&client.key_pem))?;
    writeln!(
        y,
        "contexts:\n- name: e2e\n  context:\n    cluster: e2e\n    user: user"
    )?;
    writeln!(y, "current-context: e2e")?;
    std::fs::write(path, y).with_context(|| format!("write {}", path.display()))
}

fn base64(data: &[u8]) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(data)
}
