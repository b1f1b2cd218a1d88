//! Long-lived child processes (etcd, kube-apiserver, the S3 server, ...) that die with the test
//! process, however it ends.
//!
//! Each child is started under `setpriv --pdeathsig KILL`, so the kernel kills it when its
//! parent *thread* exits. Test harnesses run every test on a short-lived thread, so all children
//! are spawned from one keeper thread that lives as long as the process: when `cargo test`
//! finishes (or is killed), no stray etcd or API server is left behind.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::sync::{Mutex, OnceLock};

use anyhow::{Context, Result};

type Request = (Command, mpsc::Sender<std::io::Result<Child>>);

fn keeper() -> &'static Mutex<mpsc::Sender<Request>> {
    static KEEPER: OnceLock<Mutex<mpsc::Sender<Request>>> = OnceLock::new();
    KEEPER.get_or_init(|| {
        let (tx, rx) = mpsc::channel::<Request>();
        std::thread::Builder::new()
            .name("child-keeper".into())
            .spawn(move || {
                for (mut cmd, reply) in rx {
                    let _ = reply.send(cmd.spawn());
                }
                // All senders are gone only at process exit; park so the thread (and with it
                // the children's parent-death signal) outlives every test.
                loop {
                    std::thread::park();
                }
            })
            .expect("spawn keeper thread");
        Mutex::new(tx)
    })
}

/// A running child with its log file.
pub struct Process {
    pub name: String,
    pub child: Child,
    pub log: PathBuf,
}

impl Process {
    /// Starts `program args...` with stdout and stderr appended to `<log_dir>/<name>.log`.
    pub fn spawn(name: &str, program: &Path, args: &[String], log_dir: &Path) -> Result<Self> {
        Self::spawn_with_death_signal(name, program, args, log_dir, "KILL")
    }

    /// Like [`Process::spawn`], with `signal` (e.g. `TERM`) sent when this process exits, for
    /// a child that has to clean up.
    pub fn spawn_with_death_signal(
        name: &str,
        program: &Path,
        args: &[String],
        log_dir: &Path,
        signal: &str,
    ) -> Result<Self> {
        let log = log_dir.join(format!("{name}.log"));
        let out = File::create(&log).with_context(|| format!("create {}", log.display()))?;
        let mut cmd = Command::new("setpriv");
        cmd.arg("--pdeathsig")
            .arg(signal)
            .arg("--")
            .arg(program)
            .args(args)
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out);
        let (tx, rx) = mpsc::channel();
        keeper()
            .lock()
            .unwrap()
            .send((cmd, tx))
            .context("keeper thread is gone")?;
        let child = rx
            .recv()
            .context("keeper thread is gone")?
            .with_context(|| format!("start {} (is util-linux's setpriv installed?)", program.display()))?;
        Ok(Self {
            name: name.to_string(),
            child,
            log,
        })
    }

    /// Fails with the tail of the log when the process has exited.
    pub fn check_running(&mut self) -> Result<()> {
        if let Some(status) = self.child.try_wait()? {
            anyhow::bail!(
                "{} exited with {status}; last lines of {}:\n{}",
                self.name,
                self.log.display(),
                self.log_tail(8)
            );
        }
        Ok(())
    }

    pub fn log_tail(&self, lines: usize) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    /// SIGKILL and reap.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A free TCP port on the loopback interface.
pub fn free_port() -> Result<u16> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(listener.local_addr()?.port())
}
