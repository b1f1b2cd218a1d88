//! A real S3 server on loopback (or the cluster tier's bridge): Versity's S3 gateway over a POSIX directory, the same binary
//! people run in production in front of file systems.

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};

use crate::process::{Process, free_port};
use crate::tools::tool;

/// Credentials and address of a running S3 server.
#[derive(Clone, Debug)]
pub struct S3Endpoint {
    /// `http://127.0.0.1:<port>`
    pub url: String,
    pub access_key: String,
    pub secret_key: String,
    pub region: String,
}

impl S3Endpoint {
    /// A restic repository URL for `bucket`/`prefix` on this server (restic creates the bucket).
    pub fn repository(&self, bucket: &str, prefix: &str) -> String {
        format!("s3:{}/{bucket}/{prefix}", self.url)
    }

    /// The environment restic reads for S3 credentials.
    pub fn env(&self) -> Vec<(String, String)> {
        vec![
            ("AWS_ACCESS_KEY_ID".into(), self.access_key.clone()),
            ("AWS_SECRET_ACCESS_KEY".into(), self.secret_key.clone()),
            ("AWS_DEFAULT_REGION".into(), self.region.clone()),
        ]
    }
}

pub struct S3Server {
    pub endpoint: S3Endpoint,
    pub root: PathBuf,
    dir: PathBuf,
    address: Ipv4Addr,
    port: u16,
    args: Vec<String>,
    /// How many times it was started, for the name of its log.
    starts: u32,
    /// `None` while stopped.
    process: Option<Process>,
}

impl S3Server {
    /// Starts the server on loopback.
    pub fn start(dir: &Path) -> Result<Self> {
        Self::start_on(dir, Ipv4Addr::LOCALHOST)
    }

    /// Starts the server on `address` (the cluster tier's bridge, which pods reach).
    pub fn start_on(dir: &Path, address: Ipv4Addr) -> Result<Self> {
        let root = dir.join("s3-data");
        let sidecar = dir.join("s3-metadata");
        std::fs::create_dir_all(&root)?;
        std::fs::create_dir_all(&sidecar)?;
        let port = free_port()?;
        let endpoint = S3Endpoint {
            url: format!("http://{address}:{port}"),
            access_key: "e2e-access-key".into(),
            secret_key: format!("e2e-secret-{}", std::process::id()),
            region: "us-east-1".into(),
        };
        let args: Vec<String> = vec![
            "--port".into(),
            format!("{address}:{port}"),
            "--access".into(),
            endpoint.access_key.clone(),
            "--secret".into(),
            endpoint.secret_key.clone(),
            "--region".into(),
            endpoint.region.clone(),
            "--quiet".into(),
            "posix".into(),
            // Metadata beside the data instead of in xattrs: not every file system under a
            // temp dir supports user xattrs.
            "--sidecar".into(),
            sidecar.display().to_string(),
            root.display().to_string(),
        ];
        let mut server = Self {
            endpoint,
            root,
            dir: dir.to_owned(),
            address,
            port,
            args,
            starts: 0,
            process: None,
        };
        server.start_again()?;
        Ok(server)
    }

    /// Stops the server (SIGKILL, as a crash or a pulled cable would): connections are
    /// refused until [`S3Server::start_again`]. The data stays.
    pub fn stop(&mut self) {
        if let Some(mut p) = self.process.take() {
            p.kill();
        }
    }

    /// Starts a stopped server again on the same address, port and data, and waits until it
    /// listens.
    pub fn start_again(&mut self) -> Result<()> {
        self.stop();
        self.starts += 1;
        let name = match self.starts {
            1 => "versitygw".to_owned(),
            n => format!("versitygw-{n}"),
        };
        let mut process = Process::spawn(&name, &tool("versitygw")?, &self.args, &self.dir)?;
        let deadline = Instant::now() + Duration::from_secs(30);
        while std::net::TcpStream::connect((self.address, self.port)).is_err() {
            process.check_running()?;
            if Instant::now() > deadline {
                bail!(
                    "S3 server did not listen on {} within 30s:\n{}",
                    self.port,
                    process.log_tail(20)
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        self.process = Some(process);
        Ok(())
    }

    /// Freezes the server (SIGSTOP): connections are accepted by the kernel and nothing is
    /// answered, as from a server that hangs, until [`S3Server::resume`].
    pub fn pause(&self) -> Result<()> {
        self.signal("-STOP")
    }

    /// Lets a paused server go on (SIGCONT).
    pub fn resume(&self) -> Result<()> {
        self.signal("-CONT")
    }

    fn signal(&self, signal: &str) -> Result<()> {
        let process = self.process.as_ref().context("the S3 server is stopped")?;
        let pid = process.child.id().to_string();
        let status = std::process::Command::new("kill").args([signal, &pid]).status()?;
        ensure!(status.success(), "kill {signal} {pid}: {status}");
        Ok(())
    }
}
