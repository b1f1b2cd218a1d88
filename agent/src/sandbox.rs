//! The private mount namespace restic runs in.
//!
//! A pod's kubelet path changes with its UID, and restic only recognises an unchanged file at
//! the same path as in the parent snapshot. So restic never sees kubelet paths: the agent starts
//! itself again as `restic-agent sandbox <spec>`, which joins the run's cgroup, unshares its
//! mount namespace, builds a small root on a tmpfs with the volume bind-mounted at a stable path
//! (read-only for backups), chroots into it and execs restic. Nothing propagates to the host,
//! and the namespace with all its mounts disappears when restic exits: no stale mounts, even
//! after a SIGKILL.
//!
//! Inside, restic sees only: the volume at its snapshot path, `/etc` (DNS, CA certificates,
//! user names), `/usr` and the library directories (for ssh or rclone backends), all read-only;
//! `/dev`, `/proc`, its own binary, its cache and a scratch `/tmp`.

use std::ffi::CString;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use nix::mount::{MsFlags, mount};
use nix::sched::{CloneFlags, unshare};
use serde::{Deserialize, Serialize};

/// One bind mount into the sandbox.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Bind {
    pub source: PathBuf,
    /// Absolute path inside the sandbox.
    pub target: PathBuf,
    pub read_only: bool,
}

/// Everything the sandbox needs; passed as one JSON argument (it holds no secrets: those are
/// in the environment restic inherits).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Spec {
    /// An empty directory on the host; the sandbox's root tmpfs is mounted on it.
    pub root: PathBuf,
    pub binds: Vec<Bind>,
    /// `cgroup.procs` of the run's cgroup, joined before anything else.
    pub cgroup_procs: Option<PathBuf>,
    /// The program to exec, as seen inside the sandbox, and its arguments.
    pub program: PathBuf,
    pub args: Vec<String>,
    /// Working directory inside the sandbox.
    pub cwd: PathBuf,
    /// Drop to this user and group (no supplementary groups) before exec.
    #[serde(default)]
    pub run_as: Option<(u32, u32)>,
}

/// Where restic's binary, cache and scratch space appear inside the sandbox.
pub const RESTIC_IN_SANDBOX: &str = "/.restic/restic";
pub const CACHE_IN_SANDBOX: &str = "/.restic/cache";

impl Spec {
    /// The standard layout: the host's /etc, /dev and /proc, restic, its cache and scratch dir,
    /// plus the given volume binds.
    pub fn standard(
        root: PathBuf,
        restic: &Path,
        cache: Option<&Path>,
        tmp: &Path,
        volumes: Vec<Bind>,
    ) -> Self {
        let mut binds = vec![
            Bind {
                source: "/etc".into(),
                target: "/etc".into(),
                read_only: true,
            },
            Bind {
                source: "/dev".into(),
                target: "/dev".into(),
                read_only: false,
            },
            Bind {
                source: "/proc".into(),
                target: "/proc".into(),
                read_only: true,
            },
            Bind {
                source: restic.to_path_buf(),
                target: RESTIC_IN_SANDBOX.into(),
                read_only: true,
            },
            Bind {
                source: tmp.to_path_buf(),
                target: "/tmp".into(),
                read_only: false,
            },
        ];
        // Programs restic may start itself (ssh for sftp:, rclone for rclone:), read-only.
        for dir in ["/usr", "/bin", "/sbin", "/lib", "/lib64"] {
            if Path::new(dir).is_dir() {
                binds.push(Bind {
                    source: dir.into(),
                    target: dir.into(),
                    read_only: true,
                });
            }
        }
        if let Some(cache) = cache {
            binds.push(Bind {
                source: cache.to_path_buf(),
                target: CACHE_IN_SANDBOX.into(),
                read_only: false,
            });
        }
        binds.extend(volumes);
        Self {
            root,
            binds,
            cgroup_procs: None,
            program: RESTIC_IN_SANDBOX.into(),
            args: Vec::new(),
            cwd: "/".into(),
            run_as: None,
        }
    }
}

/// Entry point of `restic-agent sandbox`: never returns on success (it becomes restic).
pub fn enter(spec_json: &str) -> Result<std::convert::Infallible> {
    let spec: Spec = serde_json::from_str(spec_json).context("sandbox spec")?;
    if let Some(procs) = &spec.cgroup_procs {
        std::fs::write(procs, std::process::id().to_string())
            .with_context(|| format!("join cgroup {}", procs.display()))?;
    }
    unshare(CloneFlags::CLONE_NEWNS).context("unshare the mount namespace (needs CAP_SYS_ADMIN)")?;
    // Nothing mounted here may propagate back to the host.
    mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_REC | MsFlags::MS_PRIVATE,
        None::<&str>,
    )
    .context("make mounts private")?;
    mount(
        Some("tmpfs"),
        &spec.root,
        Some("tmpfs"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        Some("mode=0755,size=16m"),
    )
    .with_context(|| format!("mount the sandbox root on {}", spec.root.display()))?;
    for bind in &spec.binds {
        bind_mount(&spec.root, bind)?;
    }
    nix::unistd::chroot(&spec.root).context("chroot into the sandbox")?;
    std::env::set_current_dir(&spec.cwd).with_context(|| format!("chdir {}", spec.cwd.display()))?;
    if let Some((uid, gid)) = spec.run_as {
        use nix::unistd::{Gid, Uid, setgid, setgroups, setuid};
        // Groups first: once the uid is dropped, changing them is no longer allowed.
        setgroups(&[]).context("drop supplementary groups")?;
        setgid(Gid::from_raw(gid)).with_context(|| format!("setgid {gid}"))?;
        setuid(Uid::from_raw(uid)).with_context(|| format!("setuid {uid}"))?;
    }
    let program = CString::new(spec.program.as_os_str().as_encoded_bytes())?;
    let mut argv = vec![program.clone()];
    for a in &spec.args {
        argv.push(CString::new(a.as_str())?);
    }
    nix::unistd::execv(&program, &argv).with_context(|| format!("exec {}", spec.program.display()))
}

fn bind_mount(root: &Path, bind: &Bind) -> Result<()> {
    if !bind.target.is_absolute() {
        bail!("sandbox target {} is not absolute", bind.target.display());
    }
    let target = root.join(bind.target.strip_prefix("/")?);
    let meta =
        std::fs::metadata(&bind.source).with_context(|| format!("bind source {}", bind.source.display()))?;
    if meta.is_dir() {
        std::fs::create_dir_all(&target)?;
    } else {
        std::fs::create_dir_all(target.parent().context("file target without parent")?)?;
        std::fs::write(&target, b"")?;
    }
    let rec = MsFlags::MS_BIND | MsFlags::MS_REC;
    mount(Some(&bind.source), &target, None::<&str>, rec, None::<&str>)
        .with_context(|| format!("bind {} at {}", bind.source.display(), bind.target.display()))?;
    if bind.read_only {
        // A bind mount is made read-only by remounting it.
        let flags = MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY | MsFlags::MS_NOSUID;
        mount(None::<&str>, &target, None::<&str>, flags, None::<&str>)
            .with_context(|| format!("make {} read-only", bind.target.display()))?;
    }
    Ok(())
}
