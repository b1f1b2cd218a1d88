//! One memory-limited cgroup per restic process, so a large backup cannot take the node (or
//! the agent) down with it, and an OOM kill is reported as such.
//!
//! Works with cgroup v1 (the `memory` controller) and v2 (`memory.max`). Run cgroups are
//! created below a parent: by default the agent's own cgroup, so restic's memory also counts
//! against the agent pod's limit (set `--cgroup-parent` to place them elsewhere).

use std::path::{Path, PathBuf};

/// Which cgroup hierarchy the node uses, and where run cgroups go.
#[derive(Clone, Debug)]
pub enum Cgroups {
    V1 {
        parent: PathBuf,
    },
    V2 {
        parent: PathBuf,
    },
    /// No usable memory controller: runs go unlimited, and the reason is logged at start-up.
    Unavailable(String),
}

impl Cgroups {
    /// Finds the memory controller and the parent for run cgroups.
    pub fn detect(parent_override: Option<&Path>) -> Self {
        let fs = Path::new("/sys/fs/cgroup");
        let own = std::fs::read_to_string("/proc/self/cgroup").unwrap_or_default();
        if fs.join("cgroup.controllers").exists() {
            let base = parent_override.map(Path::to_path_buf).unwrap_or_else(|| {
                let rel = own.lines().find_map(|l| l.strip_prefix("0::")).unwrap_or("/");
                fs.join(rel.trim_start_matches('/'))
            });
            let parent = base.join("restic-agent-runs");
            return match setup_v2(&parent) {
                Ok(()) => Self::V2 { parent },
                Err(e) => Self::Unavailable(format!("cgroup v2 at {}: {e}", parent.display())),
            };
        }
        let memory = fs.join("memory");
        if !memory.join("memory.limit_in_bytes").exists() {
            return Self::Unavailable("no cgroup memory controller mounted at /sys/fs/cgroup".into());
        }
        let base = parent_override.map(Path::to_path_buf).unwrap_or_else(|| {
            let rel = own
                .lines()
                .find_map(|l| {
                    let mut parts = l.splitn(3, ':');
                    let (_, controllers, path) = (parts.next()?, parts.next()?, parts.next()?);
                    controllers.split(',').any(|c| c == "memory").then_some(path)
                })
                .unwrap_or("/");
            let own_dir = memory.join(rel.trim_start_matches('/'));
            // In a container with its own cgroup namespace the path is relative to the mount.
            if own_dir.exists() { own_dir } else { memory.clone() }
        });
        let parent = base.join("restic-agent-runs");
        match std::fs::create_dir_all(&parent) {
            Ok(()) => Self::V1 { parent },
            Err(e) => Self::Unavailable(format!("cannot create {}: {e}", parent.display())),
        }
    }

    /// Creates the cgroup of one run with a memory limit (0 = no limit).
    pub fn create(&self, name: &str, memory_limit: u64) -> std::io::Result<Option<RunCgroup>> {
        let (dir, version) = match self {
            Self::V1 { parent } => (parent.join(name), 1),
            Self::V2 { parent } => (parent.join(name), 2),
            Self::Unavailable(_) => return Ok(None),
        };
        if dir.exists() {
            // Left over from a run killed with the agent: empty by now, so it can go.
            let _ = std::fs::remove_dir(&dir);
        }
        std::fs::create_dir(&dir)?;
        if memory_limit > 0 {
            let (file, value) = if version == 1 {
                ("memory.limit_in_bytes", memory_limit.to_string())
            } else {
                ("memory.max", memory_limit.to_string())
            };
            std::fs::write(dir.join(file), value)?;
            if version == 2 {
                // Without swap limits an "OOM" would only swap; make the limit real.
                let _ = std::fs::write(dir.join("memory.swap.max"), "0");
            }
        }
        Ok(Some(RunCgroup { dir, version }))
    }
}

fn setup_v2(parent: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(parent)?;
    // Children can only get memory limits if the controller is enabled for this subtree.
    let ctl = parent.parent().map(|p| p.join("cgroup.subtree_control"));
    if let Some(ctl) = ctl {
        let enabled = std::fs::read_to_string(&ctl).unwrap_or_default();
        if !enabled.split_whitespace().any(|c| c == "memory") {
            std::fs::write(&ctl, "+memory")?;
        }
    }
    std::fs::write(parent.join("cgroup.subtree_control"), "+memory")
}

/// The cgroup of one run; removed on drop (after its process has exited).
#[derive(Debug)]
pub struct RunCgroup {
    pub dir: PathBuf,
    version: u8,
}

impl RunCgroup {
    /// The file a process writes its pid to in order to join.
    pub fn procs_file(&self) -> PathBuf {
        self.dir.join("cgroup.procs")
    }

    /// Whether the kernel's OOM killer killed a process of this cgroup.
    pub fn oom_killed(&self) -> bool {
        let (file, key) = if self.version == 1 {
            ("memory.oom_control", "oom_kill ")
        } else {
            ("memory.events", "oom_kill ")
        };
        std::fs::read_to_string(self.dir.join(file))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.strip_prefix(key))
            .any(|n| n.trim().parse::<u64>().unwrap_or(0) > 0)
            || (self.version == 1 && self.failcnt() > 0 && self.at_limit())
    }

    fn failcnt(&self) -> u64 {
        read_u64(&self.dir.join("memory.failcnt"))
    }

    fn at_limit(&self) -> bool {
        let limit = read_u64(&self.dir.join("memory.limit_in_bytes"));
        let peak = read_u64(&self.dir.join("memory.max_usage_in_bytes"));
        limit > 0 && peak >= limit.saturating_sub(1 << 20)
    }

    /// Peak memory of the run, in bytes (0 if unknown).
    pub fn peak_memory(&self) -> u64 {
        if self.version == 1 {
            read_u64(&self.dir.join("memory.max_usage_in_bytes"))
        } else {
            read_u64(&self.dir.join("memory.peak"))
        }
    }
}

fn read_u64(path: &Path) -> u64 {
    std::fs::read_to_string(path)
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0)
}

impl Drop for RunCgroup {
    fn drop(&mut self) {
        // The process may take a moment to leave the cgroup after it was reaped.
        for _ in 0..50 {
            if std::fs::remove_dir(&self.dir).is_ok() || !self.dir.exists() {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        tracing::warn!(cgroup = %self.dir.display(), "could not remove the run's cgroup");
    }
}
