//! Running the operator on this machine without a kubelet: the real `restic-coordinator`
//! and `restic-agent` binaries, an agent announced by a pod object on a pretend node, and
//! app pods whose UIDs map to a kubelet-shaped directory the agent reads. Used by the
//! coordinator's tests and benchmark.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use k8s_openapi::api::core::v1::{Pod, Secret};
use kube::api::{Patch, PatchParams, PostParams};
use kube::{Api, Client};
use serde_json::json;

use crate::eventually;
use crate::process::{Process, free_port};
use crate::tools::tool;

/// Labels of agent pods (the coordinator's default `--agent-selector`).
pub const AGENT_LABELS: [(&str, &str); 2] = [
    ("app.kubernetes.io/name", "restic-operator"),
    ("app.kubernetes.io/component", "agent"),
];
/// The Secret the coordinator creates for the agents.
pub const AGENT_TLS_SECRET: &str = "restic-operator-agent-tls";

/// A running coordinator.
pub struct Coordinator {
    pub identity: String,
    pub metrics_port: u16,
    pub process: Process,
}

impl Coordinator {
    /// Starts `binary` against `kubeconfig`, running in `namespace`, with `extra` flags; waits
    /// for its metrics endpoint.
    pub async fn start(
        binary: &Path,
        kubeconfig: &Path,
        namespace: &str,
        identity: &str,
        log_dir: &Path,
        extra: &[String],
    ) -> Result<Self> {
        let metrics_port = free_port()?;
        let mut args: Vec<String> = vec![
            format!("--kubeconfig={}", kubeconfig.display()),
            format!("--namespace={namespace}"),
            format!("--identity={identity}"),
            format!("--metrics-listen=127.0.0.1:{metrics_port}"),
        ];
        args.extend(extra.iter().cloned());
        std::fs::create_dir_all(log_dir)?;
        let process = Process::spawn("restic-coordinator", binary, &args, log_dir)?;
        let c = Self {
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
        Ok(c)
    }

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

/// Writes `tls.crt`, `tls.key` and `ca.crt` of the agent certificate Secret into `dir`, each
/// file replaced at once (written aside, then renamed) like the kubelet's Secret volumes.
fn write_tls_files(secret: &Secret, dir: &Path) -> Result<()> {
    for key in ["tls.crt", "tls.key", "ca.crt"] {
        let v = secret
            .data
            .as_ref()
            .and_then(|d| d.get(key))
            .with_context(|| format!("agent Secret lacks {key}"))?;
        let aside = dir.join(format!(".{key}.new"));
        std::fs::write(&aside, &v.0)?;
        std::fs::rename(&aside, dir.join(key))?;
    }
    Ok(())
}

/// `GET path` on a loopback port, the whole response.
pub fn http_get(port: u16, path: &str) -> Result<String> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port))?;
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: x\r\n\r\n").as_bytes())?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    Ok(out)
}

/// A node agent on this machine.
pub struct Agent {
    pub node: String,
    pub port: u16,
    pub kubelet: PathBuf,
    pub pki: PathBuf,
    pub process: Process,
    binary: PathBuf,
    args: Vec<String>,
    log_dir: PathBuf,
    /// Its `--state-dir`.
    state: PathBuf,
}

/// Starts the agent and waits until it listens on `port`.
async fn spawn_listening(binary: &Path, args: &[String], log_dir: &Path, port: u16) -> Result<Process> {
    let mut process = Process::spawn("restic-agent", binary, args, log_dir)?;
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        process.check_running()?;
        if std::time::Instant::now() > deadline {
            bail!("the agent did not listen within 20s:\n{}", process.log_tail(20));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(process)
}

impl Agent {
    /// Starts `binary` with the certificate the coordinator put in `namespace`, reading
    /// `<dir>/kubelet`, and creates the agent pod object on `node` that announces it.
    pub async fn start(
        client: &Client,
        binary: &Path,
        namespace: &str,
        node: &str,
        dir: &Path,
    ) -> Result<Self> {
        let secrets: Api<Secret> = Api::namespaced(client.clone(), namespace);
        let secret = eventually(
            "the agent certificate Secret",
            Duration::from_secs(30),
            || async { secrets.get_opt(AGENT_TLS_SECRET).await.map_err(Into::into) },
        )
        .await?;
        let pki = dir.join("agent-pki");
        std::fs::create_dir_all(&pki)?;
        write_tls_files(&secret, &pki)?;
        let kubelet = dir.join("kubelet");
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
            "--tls-reload-interval=1s".into(),
            format!("--kubelet-root={}", kubelet.display()),
            format!("--state-dir={}", dir.join("agent-state").display()),
            format!("--restic={}", tool("restic")?.display()),
            "--grace-period=3s".into(),
        ];
        let log_dir = dir.join("agent-log");
        std::fs::create_dir_all(&log_dir)?;
        let process = spawn_listening(binary, &args, &log_dir, port).await?;
        let labels: serde_json::Map<String, serde_json::Value> = AGENT_LABELS
            .iter()
            .map(|(k, v)| (k.to_string(), json!(v)))
            .collect();
        let pod: Pod = serde_json::from_value(json!({
            "metadata": {"name": format!("restic-agent-{node}"), "labels": labels},
            "spec": {"nodeName": node, "containers": [{"name": "agent", "image": "restic-agent:local",
                "ports": [{"name": "grpc", "containerPort": port}]}]}
        }))?;
        create_running_pod(client, namespace, pod, "127.0.0.1").await?;
        Ok(Self {
            node: node.into(),
            port,
            kubelet,
            pki,
            process,
            binary: binary.to_path_buf(),
            args,
            log_dir,
            state: dir.join("agent-state"),
        })
    }

    /// Kills the agent and starts it again on the same port, as a pod restart would. With
    /// `forget_finished`, the finished runs it recorded are gone, as after `--keep-finished`.
    pub async fn restart(&mut self, forget_finished: bool) -> Result<()> {
        self.process.kill();
        if forget_finished {
            let finished = self.state.join("finished");
            if finished.exists() {
                std::fs::remove_dir_all(&finished)?;
            }
        }
        self.process = spawn_listening(&self.binary, &self.args, &self.log_dir, self.port).await?;
        Ok(())
    }

    /// Its `--state-dir`.
    pub fn state_dir(&self) -> &Path {
        &self.state
    }

    /// Copies the agent certificate Secret of `namespace` into the agent's files again, as the
    /// kubelet does some time after the Secret changed.
    pub async fn refresh_tls(&self, client: &Client, namespace: &str) -> Result<()> {
        let secret = Api::<Secret>::namespaced(client.clone(), namespace)
            .get(AGENT_TLS_SECRET)
            .await?;
        write_tls_files(&secret, &self.pki)
    }

    /// The directory of emptyDir volume `volume` of pod `uid`, created.
    pub fn empty_dir(&self, uid: &str, volume: &str) -> Result<PathBuf> {
        let dir = self
            .kubelet
            .join("pods")
            .join(uid)
            .join("volumes/kubernetes.io~empty-dir")
            .join(volume);
        std::fs::create_dir_all(&dir)?;
        Ok(dir)
    }
}

/// Creates `pod` in `namespace` and marks it Running and Ready with `ip`, as the kubelet
/// would. Returns the pod's UID.
pub async fn create_running_pod(client: &Client, namespace: &str, pod: Pod, ip: &str) -> Result<String> {
    let pods: Api<Pod> = Api::namespaced(client.clone(), namespace);
    let created = pods.create(&PostParams::default(), &pod).await?;
    mark_running(
        client,
        namespace,
        &created.metadata.name.clone().unwrap_or_default(),
        ip,
    )
    .await?;
    Ok(created.metadata.uid.unwrap_or_default())
}

/// Reports pod `name` Running and Ready with `ip`, as its kubelet would.
pub async fn mark_running(client: &Client, namespace: &str, name: &str, ip: &str) -> Result<()> {
    let status = json!({"status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}],
        "conditions": [{"type": "Ready", "status": "True"}]}});
    Api::<Pod>::namespaced(client.clone(), namespace)
        .patch_status(name, &PatchParams::default(), &Patch::Merge(&status))
        .await?;
    Ok(())
}

/// Binds pod `name` to `node` through the `pods/binding` subresource, as the scheduler would
/// (no scheduler runs here). The node object need not exist.
pub async fn bind(client: &Client, namespace: &str, name: &str, node: &str) -> Result<()> {
    let binding = json!({
        "apiVersion": "v1", "kind": "Binding", "metadata": {"name": name},
        "target": {"apiVersion": "v1", "kind": "Node", "name": node}
    });
    Api::<Pod>::namespaced(client.clone(), namespace)
        .create_subresource::<_, serde_json::Value>("binding", name, &PostParams::default(), &binding)
        .await
        .with_context(|| format!("binding pod {namespace}/{name} to node {node}"))?;
    Ok(())
}

/// An app pod `name` (label `app: <app>`) on `node` with an emptyDir volume `volume`.
/// Returns its UID.
pub async fn app_pod(
    client: &Client,
    namespace: &str,
    node: &str,
    name: &str,
    app: &str,
    volume: &str,
) -> Result<String> {
    let pod: Pod = serde_json::from_value(json!({
        "metadata": {"name": name, "labels": {"app": app}},
        "spec": {"nodeName": node, "containers": [{"name": "app", "image": "busybox"}],
                 "volumes": [{"name": volume, "emptyDir": {}}]}
    }))?;
    create_running_pod(client, namespace, pod, "10.1.0.9").await
}
