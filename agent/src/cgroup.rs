//! One memory-limited cgroup per restic process, so a large backup cannot take the node (or
//! the agent) down with it, and an OOM kill is reported as such.
//!
//! Works with cgroup v1 (the `memory` controller) and v2 (`memory.max`). Run cgroups are
//! created below a parent: by default the agent's own cgroup, so restic's memory also counts
//! against the agent pod's limit (set `--cgroup-parent` to place them elsewhere).
//!
//! cgroup v2 has a rule v1 lacks: a cgroup that hands controllers to its children
//! (`cgroup.subtree_control`) may hold no process itself ("no internal processes"). The agent
//! lives in its container's cgroup, so before it can give run cgroups a memory controller it
//! moves itself into a leaf child, `<own>/agent`, and only then enables `+memory` for `<own>`
//! and for `<own>/restic-agent-runs`. Without that move the write to `subtree_control` fails
//! with EBUSY and every run would go unlimited.

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
            return match setup_v2(&base, &parent, std::process::id()) {
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

/// Prepares cgroup v2 below `base` (the agent's own cgroup): moves its processes (`pid`, the
/// agent, last) into the leaf `base/agent`, enables the memory controller for `base` and for `parent`
/// (`base/restic-agent-runs`). Plain file operations, so a scratch directory can stand in for
/// the cgroup file system in tests.
fn setup_v2(base: &Path, parent: &Path, pid: u32) -> std::io::Result<()> {
    let procs = std::fs::read_to_string(base.join("cgroup.procs")).unwrap_or_default();
    let procs: Vec<&str> = procs.split_whitespace().collect();
    if !procs.is_empty() {
        // Every process, not only the agent: an init such as tini, or anything exec'd into
        // the container, would keep the cgroup "internal" and +memory would fail with EBUSY.
        let leaf = base.join("agent");
        std::fs::create_dir_all(&leaf)?;
        for p in procs
            .iter()
            .filter(|p| **p != pid.to_string())
            .chain([&pid.to_string().as_str()])
        {
            // One that exited meanwhile cannot be moved, and needs not be.
            let _ = std::fs::write(leaf.join("cgroup.procs"), p);
        }
    }
    enable_memory(base)?;
    std::fs::create_dir_all(parent)?;
    enable_memory(parent)
}

/// Adds `+memory` to a cgroup's `subtree_control` unless it is there.
fn enable_memory(cgroup: &Path) -> std::io::Result<()> {
    let ctl = cgroup.join("cgroup.subtree_control");
    let enabled = std::fs::read_to_string(&ctl).unwrap_or_default();
    if enabled
        .split_whitespace()
        .any(|c| c == "memory" || c == "+memory")
    {
        return Ok(());
    }
    std::fs::write(&ctl, "+memory")
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

    /// Kills every process still in the cgroup (something restic started, or restic itself
    /// if its sandbox parent was killed first).
    pub fn kill_all(&self) {
        if self.version == 2 && std::fs::write(self.dir.join("cgroup.kill"), "1").is_ok() {
            return;
        }
        let procs = std::fs::read_to_string(self.procs_file()).unwrap_or_default();
        for pid in procs.split_whitespace().filter_map(|p| p.parse::<i32>().ok()) {
            let _ =
                nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL);
        }
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

#[cfg(test)]
mod tests {
    use super::*;

    /// cgroup v2's files on a scratch directory: what the agent writes, and what it reads back.
    #[test]
    fn on_cgroup_v2_the_agent_moves_into_a_leaf_before_enabling_memory() {
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path().join("pod");
        std::fs::create_dir_all(&base).unwrap();
        std::fs::write(base.join("cgroup.procs"), "7\n4242\n").unwrap();
        let parent = base.join("restic-agent-runs");
        setup_v2(&base, &parent, 4242).unwrap();
        assert_eq!(
            std::fs::read_to_string(base.join("agent/cgroup.procs")).unwrap(),
            "4242"
        );
        assert_eq!(
            std::fs::read_to_string(base.join("cgroup.subtree_control")).unwrap(),
            "+memory"
        );
        assert_eq!(
            std::fs::read_to_string(parent.join("cgroup.subtree_control")).unwrap(),
            "+memory"
        );

        // A second start finds the controller enabled and writes nothing again.
        std::fs::write(base.join("cgroup.subtree_control"), "cpu memory").unwrap();
        setup_v2(&base, &parent, 4242).unwrap();
        assert_eq!(
            std::fs::read_to_string(base.join("cgroup.subtree_control")).unwrap(),
            "cpu memory"
        );

        let cgroups = Cgroups::V2 {
            parent: parent.clone(),
        };
        let run = cgroups.create("run-1", 64 << 20).unwrap().unwrap();
        assert_eq!(
            std::fs::read_to_string(run.dir.join("memory.max")).unwrap(),
            (64u64 << 20).to_string()
        );
        assert_eq!(
            std::fs::read_to_string(run.dir.join("memory.swap.max")).unwrap(),
            "0"
        );
        assert_eq!(run.procs_file(), parent.join("run-1/cgroup.procs"));
        std::fs::write(
            run.dir.join("memory.events"),
            "low 0\nhigh 0\nmax 3\noom 1\noom_kill 1\n",
        )
        .unwrap();
        std::fs::write(run.dir.join("memory.peak"), "1048576\n").unwrap();
        assert!(run.oom_killed());
        assert_eq!(run.peak_memory(), 1 << 20);
        run.kill_all();
        assert_eq!(std::fs::read_to_string(run.dir.join("cgroup.kill")).unwrap(), "1");
        // Not a real cgroup, so remove its files for Drop's remove_dir.
        for f in std::fs::read_dir(&run.dir).unwrap() {
            std::fs::remove_file(f.unwrap().path()).unwrap();
        }
    }
}
