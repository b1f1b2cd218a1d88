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
                self.exit_report()
            );
        }
        Ok(())
    }

    /// The error a Rust program printed before exiting, with its causes,
    /// or the log's last lines when it printed none. The tail alone is
    /// often just a backtrace.
    fn exit_report(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        match lines.iter().rposition(|line| line.starts_with("Error: ")) {
            Some(start) => lines[start..]
                .iter()
                .take_while(|line| !line.starts_with("Stack backtrace:"))
                .take(20)
                .copied()
                .collect::<Vec<_>>()
                .join("\n"),
            None => self.log_tail(8),
        }
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

/// A free TCP port on the loopback interface, for a server a test starts.
///
/// A port the kernel hands out for `bind(0)` is free only until an outgoing
/// connection takes it as its local port, and a suite opens thousands of
/// those while its servers start. So ports come from 20000 up to the
/// kernel's ephemeral range, below Kubernetes' NodePort range (30000) and
/// above the 10xxx ports of its components. One process never hands out a
/// port twice, and each process starts at its own offset, so two suites on
/// one machine rarely meet.
pub fn free_port() -> Result<u16> {
    use std::sync::atomic::{AtomicU32, Ordering};
    const FIRST: u32 = 20_000;
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let end = ephemeral_start().clamp(FIRST + 1_000, 30_000);
    let span = end - FIRST;
    let offset = (u64::from(std::process::id()) * 997 % u64::from(span)) as u32;
    for _ in 0..span {
        let port = FIRST + (offset + NEXT.fetch_add(1, Ordering::Relaxed)) % span;
        let port = u16::try_from(port)?;
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return Ok(port);
        }
    }
    anyhow::bail!("no free port between {FIRST} and {end}")
}

/// The first port of the kernel's ephemeral range, 32768 when unknown.
fn ephemeral_start() -> u32 {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|range| range.split_whitespace().next()?.parse().ok())
        .unwrap_or(32_768)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn free_ports_are_never_repeated_and_stay_out_of_the_ephemeral_range() {
        let ports: Vec<u16> = (0..500).map(|_| free_port().unwrap()).collect();
        let unique: std::collections::HashSet<_> = ports.iter().collect();
        assert_eq!(unique.len(), ports.len(), "a port was handed out twice");
        let ephemeral = ephemeral_start().max(21_000);
        assert!(
            ports
                .iter()
                .all(|&p| (20_000..30_000).contains(&p) && u32::from(p) < ephemeral)
        );
    }

    #[test]
    fn an_exited_program_is_reported_by_its_error_not_its_backtrace() {
        let dir = tempfile::tempdir().unwrap();
        let script = "echo starting; echo 'Error: listen 127.0.0.1:1: Address in use'; \
                      echo; echo 'Caused by:'; echo '    os error 98'; echo; echo 'Stack backtrace:'; \
                      for i in 1 2 3 4 5 6 7 8 9 10; do echo \"  $i: frame\"; done; exit 1";
        let args = vec!["-c".to_string(), script.to_string()];
        let mut process = Process::spawn("failing", Path::new("/bin/sh"), &args, dir.path()).unwrap();
        let _ = process.child.wait();
        let report = process.check_running().unwrap_err().to_string();
        assert!(
            report.contains("Error: listen 127.0.0.1:1: Address in use"),
            "{report}"
        );
        assert!(report.contains("os error 98"), "{report}");
        assert!(!report.contains("frame"), "{report}");
    }
}
