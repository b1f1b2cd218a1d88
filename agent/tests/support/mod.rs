//! Runs the real `restic-agent` binary for a test: its own PKI, ports, kubelet-shaped
//! directory tree and state dir; the real restic and the shared S3 server.

#![allow(dead_code)]

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use restic_operator_e2e::certs::{Ca, CertPair};
use restic_operator_e2e::process::{Process, free_port};
use restic_operator_e2e::{ResticRepo, state_dir, tools::tool, unique_name};
use restic_operator_proto::v1::agent_client::AgentClient;
use restic_operator_proto::v1::{self as pb, run_event::Event};
use tokio_stream::StreamExt;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};

pub const SERVER_NAME: &str = "restic-agent";

pub struct Agent {
    pub name: String,
    pub dir: PathBuf,
    pub kubelet: PathBuf,
    pub port: u16,
    pub metrics_port: u16,
    pub ca: Ca,
    pub client_cert: CertPair,
    args: Vec<String>,
    process: Process,
}

impl Agent {
    /// Starts an agent with mutual TLS on free loopback ports.
    pub fn start(name: &str) -> Result<Self> {
        Self::start_with(name, &[])
    }

    pub fn start_with(name: &str, extra: &[&str]) -> Result<Self> {
        Self::start_with_restic(name, &tool("restic")?, extra)
    }

    /// An agent whose "restic" is another program (the sandbox probe).
    pub fn start_with_restic(name: &str, restic: &Path, extra: &[&str]) -> Result<Self> {
        let name = unique_name(name);
        let dir = state_dir().join(&name);
        let kubelet = dir.join("kubelet");
        let pki = dir.join("pki");
        std::fs::create_dir_all(&kubelet)?;
        std::fs::create_dir_all(&pki)?;
        let ca = Ca::new("agent-test-ca")?;
        let server = ca.server(SERVER_NAME, &[SERVER_NAME, "127.0.0.1"])?;
        let client_cert = ca.client("restic-operator-coordinator", None)?;
        std::fs::write(pki.join("ca.crt"), ca.pair().cert_pem)?;
        std::fs::write(pki.join("server.crt"), &server.cert_pem)?;
        std::fs::write(pki.join("server.key"), &server.key_pem)?;
        let port = free_port()?;
        let metrics_port = free_port()?;
        let p = |f: &str| pki.join(f).display().to_string();
        let mut args: Vec<String> = vec![
            "serve".into(),
            format!("--listen=127.0.0.1:{port}"),
            format!("--metrics-listen=127.0.0.1:{metrics_port}"),
            format!("--tls-cert={}", p("server.crt")),
            format!("--tls-key={}", p("server.key")),
            format!("--tls-client-ca={}", p("ca.crt")),
            format!("--kubelet-root={}", kubelet.display()),
            format!("--state-dir={}", dir.join("state").display()),
            format!("--restic={}", restic.display()),
            "--grace-period=3s".into(),
        ];
        args.extend(extra.iter().map(|s| s.to_string()));
        let process = spawn_agent(&args, &dir, port)?;
        Ok(Self {
            name,
            dir,
            kubelet,
            port,
            metrics_port,
            ca,
            client_cert,
            args,
            process,
        })
    }

    /// Starts a second agent process on this one's state directory (other ports) and returns
    /// what it printed once it exited; `None` if it was still running after 20 s (then killed).
    pub fn second_on_the_same_state(&self) -> Result<Option<String>> {
        let mut args = self.args.clone();
        for a in &mut args {
            if a.starts_with("--listen=") {
                *a = format!("--listen=127.0.0.1:{}", free_port()?);
            } else if a.starts_with("--metrics-listen=") {
                *a = format!("--metrics-listen=127.0.0.1:{}", free_port()?);
            }
        }
        let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_restic-agent"))
            .args(&args)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()?;
        let deadline = Instant::now() + Duration::from_secs(20);
        while child.try_wait()?.is_none() {
            if Instant::now() > deadline {
                child.kill()?;
                child.wait()?;
                return Ok(None);
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let out = child.wait_with_output()?;
        Ok(Some(format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )))
    }

    /// SIGKILL, as an OOM kill or a lost node would end it, then a new agent process on the
    /// same state directory, ports and certificates. The old log is kept beside the new one.
    pub fn kill_and_restart(&mut self) -> Result<()> {
        self.process.child.kill()?;
        self.process.child.wait()?;
        let old = self
            .dir
            .join(format!("restic-agent.log.{}", self.process.child.id()));
        std::fs::rename(&self.process.log, old)?;
        self.process = spawn_agent(&self.args, &self.dir, self.port)?;
        Ok(())
    }

    pub fn pid(&self) -> u32 {
        self.process.child.id()
    }

    /// SIGTERM, as the kubelet stops a pod, and wait for the agent to exit.
    pub fn terminate(&mut self) -> Result<std::process::ExitStatus> {
        let pid = self.process.child.id().to_string();
        std::process::Command::new("kill")
            .args(["-TERM", &pid])
            .status()?;
        Ok(self.process.child.wait()?)
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.process.log).unwrap_or_default()
    }

    pub fn pki(&self, file: &str) -> PathBuf {
        self.dir.join("pki").join(file)
    }

    /// Replaces one of the agent's TLS files (`server.crt`, `server.key`, `ca.crt`) the way
    /// the kubelet updates a mounted Secret: written aside, then renamed over it.
    pub fn replace_pki_file(&self, file: &str, contents: &str) -> Result<()> {
        let aside = self.pki(&format!(".{file}.new"));
        std::fs::write(&aside, contents)?;
        std::fs::rename(&aside, self.pki(file))?;
        Ok(())
    }

    /// Gives the agent a serving certificate from `ca` and makes `ca` the only client CA.
    pub fn replace_pki(&self, ca: &Ca) -> Result<()> {
        let server = ca.server(SERVER_NAME, &[SERVER_NAME, "127.0.0.1"])?;
        self.replace_pki_file("server.key", &server.key_pem)?;
        self.replace_pki_file("server.crt", &server.cert_pem)?;
        self.replace_pki_file("ca.crt", &ca.pair().cert_pem)
    }

    /// A client with the coordinator's certificate.
    pub async fn client(&self) -> Result<AgentClient<Channel>> {
        self.client_with(Some(&self.client_cert)).await
    }

    /// A client presenting `identity` (or no certificate at all).
    pub async fn client_with(&self, identity: Option<&CertPair>) -> Result<AgentClient<Channel>> {
        self.client_trusting(&self.ca, identity).await
    }

    /// A client that accepts only an agent certificate from `ca`, presenting `identity`.
    pub async fn client_trusting(
        &self,
        ca: &Ca,
        identity: Option<&CertPair>,
    ) -> Result<AgentClient<Channel>> {
        let mut tls = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(ca.pair().cert_pem))
            .domain_name(SERVER_NAME);
        if let Some(id) = identity {
            tls = tls.identity(Identity::from_pem(&id.cert_pem, &id.key_pem));
        }
        let channel = Channel::from_shared(format!("https://127.0.0.1:{}", self.port))?
            .tls_config(tls)?
            .connect()
            .await?;
        Ok(AgentClient::new(channel))
    }

    /// Creates `pods/<uid>/volumes/<plugin>/<dir>` (CSI volumes get their `mount/`) and returns
    /// the data directory.
    pub fn volume(&self, pod_uid: &str, plugin: &str, dir: &str) -> Result<PathBuf> {
        let mut path = self
            .kubelet
            .join("pods")
            .join(pod_uid)
            .join("volumes")
            .join(plugin)
            .join(dir);
        if plugin == "kubernetes.io~csi" {
            path.push("mount");
        }
        std::fs::create_dir_all(&path)?;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755))?;
        Ok(path)
    }

    pub fn pod_dir(&self, pod_uid: &str) -> PathBuf {
        self.kubelet.join("pods").join(pod_uid)
    }

    /// Fetches the agent's metrics text.
    pub fn metrics(&self) -> Result<String> {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(("127.0.0.1", self.metrics_port))?;
        s.write_all(b"GET /metrics HTTP/1.0\r\nHost: x\r\n\r\n")?;
        let mut out = String::new();
        s.read_to_string(&mut out)?;
        Ok(out)
    }
}

/// A fresh pod UID.
fn spawn_agent(args: &[String], dir: &Path, port: u16) -> Result<Process> {
    let mut process = Process::spawn(
        "restic-agent",
        Path::new(env!("CARGO_BIN_EXE_restic-agent")),
        args,
        dir,
    )?;
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        process.check_running()?;
        if Instant::now() > deadline {
            bail!("agent did not listen within 20s:\n{}", process.log_tail(20));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(process)
}

pub fn pod_uid(n: u32) -> String {
    let salt = std::process::id();
    format!(
        "{salt:08x}-{n:04x}-4000-8000-{:012x}",
        rand_u64() & 0xffff_ffff_ffff
    )
}

fn rand_u64() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos(),
    );
    h.finish()
}

pub fn repository(repo: &ResticRepo) -> pb::Repository {
    pb::Repository {
        url: repo.url.clone(),
        password: repo.password.clone(),
        env: repo.s3.env().into_iter().collect(),
    }
}

pub fn options(run_id: &str) -> pb::RunOptions {
    pb::RunOptions {
        run_id: run_id.into(),
        ..Default::default()
    }
}

pub fn backup(run_id: &str, repo: &ResticRepo, pod_uid: &str, volume: &str) -> pb::BackupRequest {
    pb::BackupRequest {
        options: Some(options(run_id)),
        repository: Some(repository(repo)),
        volume: Some(pb::VolumeRef {
            pod_uid: pod_uid.into(),
            volume_name: volume.into(),
            pv_name: String::new(),
        }),
        host: "app".into(),
        tags: vec!["e2e".into()],
        ..Default::default()
    }
}

/// Reads a run's events to the end; the last one must be its result.
pub async fn collect(stream: tonic::Streaming<pb::RunEvent>) -> Result<(Vec<pb::RunEvent>, pb::Result)> {
    let events: Vec<pb::RunEvent> = stream
        .collect::<Result<Vec<_>, _>>()
        .await
        .context("run stream")?;
    match events.last().and_then(|e| e.event.clone()) {
        Some(Event::Result(r)) => Ok((events, r)),
        other => bail!("stream ended without a result (last: {other:?})"),
    }
}

/// Initializes `repo` through the agent and checks it worked.
pub async fn init(client: &mut AgentClient<Channel>, repo: &ResticRepo, run_id: &str) -> Result<()> {
    let req = pb::RepositoryRequest {
        options: Some(options(run_id)),
        repository: Some(repository(repo)),
    };
    let (_, result) = collect(client.init(req).await?.into_inner()).await?;
    if result.outcome != pb::Outcome::Succeeded as i32 {
        bail!("init failed: {}", result.reason);
    }
    Ok(())
}

/// The snapshots restic itself lists (not through the agent).
pub fn restic_snapshots(repo: &ResticRepo) -> Result<Vec<serde_json::Value>> {
    let out = repo.restic()?.args(["snapshots", "--json"]).output()?;
    if !out.status.success() {
        bail!("restic snapshots: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(serde_json::from_slice(&out.stdout)?)
}
