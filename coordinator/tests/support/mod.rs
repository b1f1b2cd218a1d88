//! A node for the coordinator's tests: the real control plane and S3 server, the real
//! `restic-coordinator` and `restic-agent` binaries, and pod objects whose UIDs map to a
//! kubelet-shaped directory the agent reads. No kubelet runs, so the tests set pod status
//! (Running, IP, Ready) themselves, as a kubelet would.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use k8s_openapi::api::core::v1::{Pod, Secret};
use kube::api::{ListParams, Patch, PatchParams, PostParams};
use kube::{Api, Client};
use restic_operator_api::backup::ResticBackup;
use restic_operator_api::repository::ResticRepository;
use restic_operator_e2e::process::{Process, free_port};
use restic_operator_e2e::{ResticRepo, TestContext, eventually, install_crds, tools::tool};
use restic_operator_proto::v1::agent_client::AgentClient;
use serde_json::json;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};

pub const AGENT_LABELS: &str = "app.kubernetes.io/name=restic-operator,app.kubernetes.io/component=agent";

/// The agent binary, built once per test binary (it is another package of the workspace).
pub fn agent_binary() -> Result<PathBuf> {
    static BIN: OnceLock<std::result::Result<PathBuf, String>> = OnceLock::new();
    BIN.get_or_init(|| {
        let me = PathBuf::from(env!("CARGO_BIN_EXE_restic-coordinator"));
        let bin = me.with_file_name("restic-agent");
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let status = std::process::Command::new(cargo)
            .args([
                "build",
                "--quiet",
                "-p",
                "restic-operator-agent",
                "--bin",
                "restic-agent",
            ])
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .status()
            .map_err(|e| format!("cargo build of the agent: {e}"))?;
        if !status.success() || !bin.exists() {
            return Err(format!("building restic-agent failed ({status})"));
        }
        Ok(bin)
    })
    .clone()
    .map_err(anyhow::Error::msg)
}

pub struct Coordinator {
    pub identity: String,
    pub metrics_port: u16,
    pub process: Process,
}

impl Coordinator {
    pub fn metrics(&self) -> Result<String> {
        http_get(self.metrics_port, "/metrics")
    }

    /// The value of a metric series (exact text of name and labels), if present. Panics when
    /// the coordinator does not answer, so "absent" never means "not asked".
    pub fn metric(&self, series: &str) -> Option<f64> {
        let text = self.metrics().unwrap_or_else(|e| {
            panic!(
                "coordinator {} does not serve metrics: {e}\n{}",
                self.identity,
                self.log()
            )
        });
        assert!(
            text.contains("restic_operator_leader"),
            "not a metrics page: {text}"
        );
        text.lines()
            .find_map(|l| l.strip_prefix(series).and_then(|rest| rest.trim().parse().ok()))
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.process.log).unwrap_or_default()
    }

    /// SIGKILL, no goodbye.
    pub fn kill(&mut self) {
        self.process.kill();
    }
}

pub fn http_get(port: u16, path: &str) -> Result<String> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port))?;
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: x\r\n\r\n").as_bytes())?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    Ok(out)
}

pub struct Agent {
    pub port: u16,
    pub kubelet: PathBuf,
    pub process: Process,
    pub pki: PathBuf,
}

/// One test's cluster: a namespace for the operator and the apps, a node with an agent.
pub struct Node {
    pub ctx: TestContext,
    pub client: Client,
    pub ns: String,
    pub name: String,
    pub dir: PathBuf,
    pub coordinators: Vec<Coordinator>,
    pub agent: Option<Agent>,
    /// Extra namespaces the coordinator watches.
    pub watch: Vec<String>,
}

impl Node {
    /// A namespace, CRDs, one coordinator (leader) and an agent on node `<ns>-node`.
    pub async fn start(test: &str) -> Result<Self> {
        Self::start_watching(test, &[]).await
    }

    pub async fn start_watching(test: &str, extra_namespaces: &[&str]) -> Result<Self> {
        let ctx = TestContext::new(test).await?;
        let client = ctx.client.clone();
        install_crds(&client, &restic_operator_api::crds()).await?;
        let ns = ctx.namespace.clone();
        let dir = ctx.tmp.path().to_path_buf();
        let mut node = Self {
            name: format!("{ns}-node"),
            ctx,
            client,
            ns,
            dir,
            coordinators: Vec::new(),
            agent: None,
            watch: extra_namespaces.iter().map(|s| s.to_string()).collect(),
        };
        node.start_coordinator("coordinator-a").await?;
        node.wait_leader(0).await?;
        node.start_agent().await?;
        Ok(node)
    }

    /// Starts a coordinator replica with `identity`.
    pub async fn start_coordinator(&mut self, identity: &str) -> Result<usize> {
        let metrics_port = free_port()?;
        let mut watch = vec![self.ns.clone()];
        watch.extend(self.watch.iter().cloned());
        let args: Vec<String> = vec![
            format!("--kubeconfig={}", self.ctx.env.kubeconfig.display()),
            format!("--namespace={}", self.ns),
            format!("--watch-namespaces={}", watch.join(",")),
            format!("--identity={identity}"),
            format!("--metrics-listen=127.0.0.1:{metrics_port}"),
            "--lease-duration=6s".into(),
            "--lease-renew-interval=2s".into(),
            "--repository-timeout=15s".into(),
            "--progress-interval=1s".into(),
            "--agent-lost-timeout=30s".into(),
            "--starting-deadline=10m".into(),
        ];
        let log_dir = self.dir.join(identity);
        std::fs::create_dir_all(&log_dir)?;
        let process = Process::spawn(
            "restic-coordinator",
            Path::new(env!("CARGO_BIN_EXE_restic-coordinator")),
            &args,
            &log_dir,
        )?;
        let c = Coordinator {
            identity: identity.into(),
            metrics_port,
            process,
        };
        eventually(
            "the coordinator's metrics endpoint",
            Duration::from_secs(20),
            || async { Ok(http_get(metrics_port, "/healthz").ok().map(|_| ())) },
        )
        .await
        .with_context(|| c.log())?;
        self.coordinators.push(c);
        Ok(self.coordinators.len() - 1)
    }

    /// Waits until coordinator `i` reports leadership.
    pub async fn wait_leader(&self, i: usize) -> Result<()> {
        let c = &self.coordinators[i];
        eventually("leadership", Duration::from_secs(30), || async {
            Ok((c.metric("restic_operator_leader") == Some(1.0)).then_some(()))
        })
        .await
        .with_context(|| c.log())
    }

    /// Starts the real agent with the certificate the coordinator created, and the pod
    /// object that announces it (as the DaemonSet's pod on this node would).
    pub async fn start_agent(&mut self) -> Result<()> {
        let secrets: Api<Secret> = Api::namespaced(self.client.clone(), &self.ns);
        let secret = eventually(
            "the agent certificate Secret",
            Duration::from_secs(30),
            || async {
                secrets
                    .get_opt("restic-operator-agent-tls")
                    .await
                    .map_err(Into::into)
            },
        )
        .await?;
        let pki = self.dir.join("agent-pki");
        std::fs::create_dir_all(&pki)?;
        for key in ["tls.crt", "tls.key", "ca.crt"] {
            let v = secret
                .data
                .as_ref()
                .and_then(|d| d.get(key))
                .with_context(|| format!("agent Secret lacks {key}"))?;
            std::fs::write(pki.join(key), &v.0)?;
        }
        let kubelet = self.dir.join("kubelet");
        std::fs::create_dir_all(kubelet.join("pods"))?;
        let port = free_port()?;
        let p = |f: &str| pki.join(f).display().to_string();
        let args: Vec<String> = vec![
            "serve".into(),
            format!("--listen=127.0.0.1:{port}"),
            format!("--metrics-listen=127.0.0.1:{}", free_port()?),
            format!("--tls-cert={}", p("tls.crt")),
            format!("--tls-key={}", p("tls.key")),
            format!("--tls-client-ca={}", p("ca.crt")),
            format!("--kubelet-root={}", kubelet.display()),
            format!("--state-dir={}", self.dir.join("agent-state").display()),
            format!("--restic={}", tool("restic")?.display()),
            "--grace-period=3s".into(),
        ];
        let log_dir = self.dir.join("agent-log");
        std::fs::create_dir_all(&log_dir)?;
        let process = Process::spawn("restic-agent", &agent_binary()?, &args, &log_dir)?;
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            if std::time::Instant::now() > deadline {
                bail!("agent did not listen");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let pod: Pod = serde_json::from_value(json!({
            "metadata": {"name": format!("restic-agent-{}", self.name), "labels": {
                "app.kubernetes.io/name": "restic-operator", "app.kubernetes.io/component": "agent"}},
            "spec": {"nodeName": self.name, "containers": [{"name": "agent", "image": "restic-agent:test",
                "ports": [{"name": "grpc", "containerPort": port}]}]}
        }))?;
        self.create_running_pod(pod, "127.0.0.1").await?;
        self.agent = Some(Agent {
            port,
            kubelet,
            process,
            pki,
        });
        Ok(())
    }

    /// Creates `pod` in the test namespace and marks it Running and Ready with `ip`, as the
    /// kubelet would. Returns the pod's UID.
    pub async fn create_running_pod(&self, pod: Pod, ip: &str) -> Result<String> {
        let pods: Api<Pod> = Api::namespaced(self.client.clone(), &self.ns);
        let created = pods.create(&PostParams::default(), &pod).await?;
        let name = created.metadata.name.clone().unwrap_or_default();
        let status = json!({"status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}],
            "conditions": [{"type": "Ready", "status": "True"}]}});
        pods.patch_status(&name, &PatchParams::default(), &Patch::Merge(&status))
            .await?;
        Ok(created.metadata.uid.unwrap_or_default())
    }

    /// An app pod on this node with an emptyDir volume `volume` whose kubelet directory is
    /// filled by `fill`. Returns the UID and the data directory.
    pub async fn app_pod(&self, name: &str, app: &str, volume: &str) -> Result<(String, PathBuf)> {
        let pod: Pod = serde_json::from_value(json!({
            "metadata": {"name": name, "labels": {"app": app}},
            "spec": {"nodeName": self.name, "containers": [{"name": "app", "image": "busybox"}],
                     "volumes": [{"name": volume, "emptyDir": {}}]}
        }))?;
        let uid = self.create_running_pod(pod, "10.1.0.9").await?;
        let dir = self
            .agent
            .as_ref()
            .context("no agent")?
            .kubelet
            .join("pods")
            .join(&uid)
            .join("volumes/kubernetes.io~empty-dir")
            .join(volume);
        std::fs::create_dir_all(&dir)?;
        Ok((uid, dir))
    }

    /// A repository Secret + ResticRepository for an S3 repository of this test.
    pub async fn repository(&self, name: &str, repo: &ResticRepo) -> Result<()> {
        let mut data = serde_json::Map::new();
        data.insert("RESTIC_PASSWORD".into(), json!(repo.password));
        for (k, v) in repo.s3.env() {
            data.insert(k, json!(v));
        }
        self.apply_secret(&format!("{name}-creds"), data).await?;
        self.apply_yaml(&format!(
            "apiVersion: backup.resticbackup.io/v1alpha1\nkind: ResticRepository\nmetadata: {{name: {name}}}\n\
             spec: {{repositoryURL: '{}', credentialsSecretRef: {{name: {name}-creds}}}}",
            repo.url
        ))
        .await
    }

    pub async fn apply_secret(
        &self,
        name: &str,
        data: serde_json::Map<String, serde_json::Value>,
    ) -> Result<()> {
        let secret: Secret = serde_json::from_value(json!({"metadata": {"name": name}, "stringData": data}))?;
        Api::<Secret>::namespaced(self.client.clone(), &self.ns)
            .create(&PostParams::default(), &secret)
            .await?;
        Ok(())
    }

    /// Server-side applies a namespaced manifest into the test namespace.
    pub async fn apply_yaml(&self, yaml: &str) -> Result<()> {
        let value: serde_json::Value = serde_yaml::from_str(yaml)?;
        let kind = value["kind"].as_str().unwrap_or_default().to_owned();
        let name = value["metadata"]["name"].as_str().unwrap_or_default().to_owned();
        let pp = PatchParams::apply("e2e-test").force();
        match kind.as_str() {
            "ResticRepository" => {
                Api::<ResticRepository>::namespaced(self.client.clone(), &self.ns)
                    .patch(&name, &pp, &Patch::Apply(&value))
                    .await?;
            }
            "ResticBackup" => {
                Api::<ResticBackup>::namespaced(self.client.clone(), &self.ns)
                    .patch(&name, &pp, &Patch::Apply(&value))
                    .await?;
            }
            other => bail!("apply_yaml: unsupported kind {other}"),
        }
        Ok(())
    }

    pub fn backups(&self) -> Api<ResticBackup> {
        Api::namespaced(self.client.clone(), &self.ns)
    }

    pub fn repositories(&self) -> Api<ResticRepository> {
        Api::namespaced(self.client.clone(), &self.ns)
    }

    /// Sets `spec.manualTrigger` (merge patch, as `kubectl patch` would).
    pub async fn trigger(&self, backup: &str, value: &str) -> Result<()> {
        self.backups()
            .patch(
                backup,
                &PatchParams::default(),
                &Patch::Merge(json!({"spec": {"manualTrigger": value}})),
            )
            .await?;
        Ok(())
    }

    /// Waits for a repository condition `Ready` with `reason`.
    pub async fn wait_repository_reason(
        &self,
        name: &str,
        reason: &str,
        timeout: Duration,
    ) -> Result<String> {
        let api = self.repositories();
        eventually(
            &format!("repository {name} Ready reason {reason}"),
            timeout,
            || async {
                let r = api.get(name).await?;
                let c = r
                    .status
                    .as_ref()
                    .and_then(|s| s.conditions.iter().find(|c| c.type_ == "Ready").cloned());
                Ok(c.filter(|c| c.reason.as_deref() == Some(reason))
                    .map(|c| c.message.unwrap_or_default()))
            },
        )
        .await
        .with_context(|| self.coordinator_log())
    }

    /// Waits until the backup's `lastBackup.runID` is `run_id` (or any run when `None`)
    /// and returns the backup.
    pub async fn wait_finished(
        &self,
        name: &str,
        after_total: i64,
        timeout: Duration,
    ) -> Result<ResticBackup> {
        let api = self.backups();
        eventually(
            &format!("backup {name} run #{}", after_total + 1),
            timeout,
            || async {
                let b = api.get(name).await?;
                let total = b
                    .status
                    .as_ref()
                    .and_then(|s| s.statistics.as_ref())
                    .and_then(|s| s.total_backups)
                    .unwrap_or(0);
                let idle = b.status.as_ref().is_some_and(|s| s.active_run.is_none());
                Ok((total > after_total && idle).then_some(b))
            },
        )
        .await
        .with_context(|| self.coordinator_log())
    }

    pub fn coordinator_log(&self) -> String {
        let mut out = String::new();
        for c in &self.coordinators {
            let log = c.log();
            let tail: Vec<&str> = log.lines().rev().take(40).collect();
            out.push_str(&format!("--- {} ---\n", c.identity));
            for l in tail.into_iter().rev() {
                out.push_str(l);
                out.push('\n');
            }
        }
        out
    }

    /// A gRPC client for the agent, as the coordinator (from the CA Secret).
    pub async fn agent_client(&self) -> Result<AgentClient<Channel>> {
        let agent = self.agent.as_ref().context("no agent")?;
        let secrets: Api<Secret> = Api::namespaced(self.client.clone(), &self.ns);
        let ca = secrets.get("restic-operator-ca").await?;
        let get = |k: &str| String::from_utf8(ca.data.as_ref().unwrap()[k].0.clone()).unwrap();
        let ca_pem = restic_operator_coordinator::pki::Pem {
            cert: get("ca.crt"),
            key: get("ca.key"),
        };
        let client =
            restic_operator_coordinator::pki::issue(&ca_pem, "e2e-test", false, Duration::from_secs(86400))?;
        let tls = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(&ca_pem.cert))
            .identity(Identity::from_pem(&client.cert, &client.key))
            .domain_name("restic-agent");
        let channel = Channel::from_shared(format!("https://127.0.0.1:{}", agent.port))?
            .tls_config(tls)?
            .connect()
            .await?;
        Ok(AgentClient::new(channel))
    }

    /// Pods of the test namespace with `label`.
    pub async fn pods(&self, label: &str) -> Result<Vec<Pod>> {
        Ok(Api::<Pod>::namespaced(self.client.clone(), &self.ns)
            .list(&ListParams::default().labels(label))
            .await?
            .items)
    }
}

/// Snapshots in `repo` as restic lists them.
pub fn restic_snapshots(repo: &ResticRepo) -> Result<Vec<serde_json::Value>> {
    let out = repo.restic()?.args(["snapshots", "--json"]).output()?;
    if !out.status.success() {
        bail!("restic snapshots: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(serde_json::from_slice(&out.stdout)?)
}
