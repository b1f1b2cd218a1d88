//! The sandbox every restic process runs in.
//!
//! restic runs on behalf of tenants, with their arguments, on volumes whose contents they
//! control, while the agent is privileged. So restic gets a world of its own, built fresh for
//! each process and gone when it exits (even after a SIGKILL: nothing propagates to the host):
//!
//! - **its own PID namespace and no `/proc`**: restic could see no other process even through
//!   a procfs; none is mounted, because restic does not need one and a procfs would offer its
//!   own environment (the repository's password) to a symlink swapped into a volume, and
//!   `/proc/sys` and `/proc/sysrq-trigger` to a root process. The namespace's first process
//!   only holds it open, so restic is PID 2 (see [`Spec::spare_pids`]);
//! - **its own host name**, never used before ([`Spec::hostname`]): restic's locks name the
//!   host and PID of their holder, so the locks of a restic that was killed can be told apart
//!   from every live one and removed (see `crate::locks`);
//! - **a minimal root**, a private tmpfs entered with `pivot_root` and then made read-only,
//!   holding only restic, the CA certificates and name-resolution files, a few device nodes,
//!   scratch space, restic's cache, and the volume at its stable snapshot path. What is writable
//!   is never executable (`noexec`), and only restic itself can be executed. The node's
//!   `/usr`, `/lib` and `/etc` are there only for backends that start a program (sftp:
//!   `ssh`, rclone:), which the agent refuses unless it is told to allow them. An absolute or
//!   relative symlink planted in a volume therefore resolves inside this root;
//! - **volume paths resolved inside**: a path inside a volume is opened with `openat2`
//!   `RESOLVE_BENEATH` from the volume's directory, and exactly the directory opened is
//!   bind-mounted, `nosuid,nodev,noexec`. A symlink swapped in before or after that cannot
//!   redirect restic; a path that leaves the volume is refused (exit code [`EXIT_REFUSED`]);
//! - **least privilege**: the capability bounding set is cut to what the operation needs
//!   (reading any file for a backup; ownership and modes for a restore; nothing else for the
//!   rest), `no_new_privs` is set, a seccomp filter refuses the system calls restic never makes
//!   and a compromised restic would reach for (see [`DENIED_SYSCALLS`]), and restic dies with
//!   its parent (`PR_SET_PDEATHSIG`).
//!
//! Three processes, all this binary: `sandbox` joins the run's cgroup, unshares the PID
//! namespace, starts `sandbox-holder` as the namespace's first process and then
//! `sandbox-init`, forwarding SIGTERM, SIGINT and SIGHUP to it and exiting as it does.
//! `sandbox-init` builds the root and execs restic. The holder does nothing but wait for its
//! stdin to close, which happens when `sandbox` exits however it ends; the namespace, and
//! everything left in it, goes with the holder.

use std::convert::Infallible;
use std::ffi::CString;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::process::ExitStatusExt;
use std::path::{Component, Path, PathBuf};
use std::sync::atomic::{AtomicI32, Ordering};

use anyhow::{Context, Result, bail};
use nix::errno::Errno;
use nix::fcntl::{OFlag, OpenHow, ResolveFlag, open, openat2};
use nix::mount::{MntFlags, MsFlags, mount, umount2};
use nix::sched::{CloneFlags, unshare};
use nix::sys::signal::{SigSet, Signal, kill, raise};
use nix::sys::stat::{Mode, SFlag, fstat, mkdirat};
use nix::unistd::Pid;
use serde::{Deserialize, Serialize};

/// `sandbox-init` refused a volume path (it leaves the volume, does not exist, or a restore
/// target is not empty); stderr says which and why.
pub const EXIT_REFUSED: i32 = 122;
/// The sandbox could not be set up (a bug or a node problem, not the request).
pub const EXIT_SETUP: i32 = 125;
/// The agent that started the sandbox is gone; restic was stopped with it.
pub const EXIT_ORPHANED: i32 = 124;

/// Where restic's binary, cache and scratch space appear inside the sandbox.
pub const RESTIC_IN_SANDBOX: &str = "/.restic/restic";
pub const CACHE_IN_SANDBOX: &str = "/.restic/cache";

/// A trusted bind mount into the sandbox: a path the agent chose, never one from a request.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Bind {
    pub source: PathBuf,
    /// Absolute path inside the sandbox.
    pub target: PathBuf,
    pub read_only: bool,
}

/// A volume (or a path inside one) to show restic. `source` is the volume's directory as the
/// agent resolved it from the kubelet's pod directory; `subpath` comes from the request and is
/// resolved beneath `source` inside the sandbox, never on the host.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct VolumeBind {
    pub source: PathBuf,
    /// Relative path inside the volume, already free of `..` and `.`; empty for the volume.
    pub subpath: PathBuf,
    /// Absolute path inside the sandbox.
    pub target: PathBuf,
    pub read_only: bool,
    /// Create missing directories of `subpath` (a restore into a new subdirectory).
    #[serde(default)]
    pub create: bool,
    /// Refuse unless the directory is empty (a restore in `IfEmpty` mode).
    #[serde(default)]
    pub require_empty: bool,
}

/// What restic may do beyond what any unprivileged process may.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub enum Access {
    /// Talk to the repository only (init, snapshots, forget, prune, check, stats, unlock).
    Repository,
    /// Read every file of a volume, whoever owns it (backup).
    ReadVolume,
    /// Write files with their recorded owners and modes (restore).
    WriteVolume,
}

impl Access {
    /// The capabilities kept in the bounding set.
    pub fn capabilities(self) -> &'static [caps::Capability] {
        use caps::Capability::*;
        match self {
            Access::Repository => &[],
            Access::ReadVolume => &[CAP_DAC_READ_SEARCH],
            Access::WriteVolume => &[
                CAP_CHOWN,
                CAP_DAC_OVERRIDE,
                CAP_DAC_READ_SEARCH,
                CAP_FOWNER,
                CAP_FSETID,
            ],
        }
    }
}

/// Everything the sandbox needs; passed as one JSON argument (it holds no secrets: those are
/// in the environment restic inherits).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Spec {
    /// An empty directory on the host; the sandbox's root tmpfs is mounted on it.
    pub root: PathBuf,
    pub binds: Vec<Bind>,
    pub volumes: Vec<VolumeBind>,
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
    pub access: Access,
    /// The sandbox's host name, which restic writes into its locks: unique to the process, so
    /// that the locks of a restic that was killed can be judged dead (see
    /// [`valid_hostname`]).
    pub hostname: String,
    /// PIDs used up before restic starts, so restic is PID `2 + spare_pids`. A run's restic is
    /// always PID 2; removing a dead process's locks is done by a restic under its host name
    /// with `spare_pids: 1`, to which PID 2 is a process that does not exist, which is what
    /// restic's `unlock` takes as proof that a lock is stale.
    #[serde(default)]
    pub spare_pids: u32,
    /// The repository's cache shown read-only, with restic's writes going to a layer of the
    /// run's own (a restore): see [`CacheLayer`].
    #[serde(default)]
    pub cache_layer: Option<CacheLayer>,
}

/// A cache restic reads but cannot change: the shared cache as the lower layer of an overlay
/// at [`CACHE_IN_SANDBOX`], the run's own `upper` directory taking every write (`work` is
/// overlayfs's scratch, on the same filesystem as `upper`). If the overlay cannot be
/// mounted, `upper` alone is the cache, so the run starts with an empty one and still
/// leaves the shared cache alone.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct CacheLayer {
    pub lower: PathBuf,
    pub upper: PathBuf,
    pub work: PathBuf,
}

/// A host name the kernel and restic take as is: 1 to 64 characters of letters, digits, `-`
/// and `.`.
pub fn valid_hostname(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
}

/// Files of the node's `/etc` that name resolution and TLS need. Everything else of `/etc`
/// (shadow, the node's configuration, ...) stays out.
const ETC_FILES: &[&str] = &[
    "/etc/resolv.conf",
    "/etc/hosts",
    "/etc/nsswitch.conf",
    "/etc/ssl/certs",
    "/etc/pki/tls/certs",
    // Red Hat family images: the two above are links into this.
    "/etc/pki/ca-trust/extracted",
    "/etc/ssl/cert.pem",
];

/// Device nodes restic (and Go's runtime) may open. Never the node's whole `/dev`.
const DEVICES: &[&str] = &["/dev/null", "/dev/zero", "/dev/random", "/dev/urandom"];

/// The node's system directories, for backends that start `ssh` or `rclone`.
const SYSTEM_DIRS: &[&str] = &["/usr", "/bin", "/sbin", "/lib", "/lib64", "/etc"];

impl Spec {
    /// The minimal layout: restic, its scratch `/tmp`, CA certificates, name resolution and a
    /// few device nodes. Add the cache, volumes and system directories with the `with_` methods.
    pub fn minimal(root: PathBuf, restic: &Path, tmp: &Path, access: Access, hostname: String) -> Self {
        let ro = |source: &str| Bind {
            source: source.into(),
            target: source.into(),
            read_only: true,
        };
        let mut binds: Vec<Bind> = ETC_FILES
            .iter()
            .filter(|f| Path::new(f).exists())
            .map(|f| ro(f))
            .collect();
        binds.extend(DEVICES.iter().filter(|d| Path::new(d).exists()).map(|d| Bind {
            read_only: false,
            ..ro(d)
        }));
        binds.push(Bind {
            source: restic.to_path_buf(),
            target: RESTIC_IN_SANDBOX.into(),
            read_only: true,
        });
        binds.push(Bind {
            source: tmp.to_path_buf(),
            target: "/tmp".into(),
            read_only: false,
        });
        Self {
            root,
            binds,
            volumes: Vec::new(),
            cgroup_procs: None,
            program: RESTIC_IN_SANDBOX.into(),
            args: Vec::new(),
            cwd: "/".into(),
            run_as: None,
            access,
            hostname,
            spare_pids: 0,
            cache_layer: None,
        }
    }

    pub fn with_cache(mut self, cache: &Path) -> Self {
        self.binds.push(Bind {
            source: cache.to_path_buf(),
            target: CACHE_IN_SANDBOX.into(),
            read_only: false,
        });
        self
    }

    /// The cache `layer.lower`, which restic reads but does not change (see [`CacheLayer`]).
    pub fn with_cache_layer(mut self, layer: CacheLayer) -> Self {
        self.cache_layer = Some(layer);
        self
    }

    /// The node's `/usr`, `/lib`, `/etc`..., read-only, for `ssh` or `rclone`.
    pub fn with_system_dirs(mut self) -> Self {
        self.binds.retain(|b| !b.target.starts_with("/etc"));
        for dir in SYSTEM_DIRS.iter().filter(|d| Path::new(d).is_dir()) {
            self.binds.push(Bind {
                source: dir.into(),
                target: dir.into(),
                read_only: true,
            });
        }
        self
    }

    pub fn with_bind(mut self, bind: Bind) -> Self {
        self.binds.push(bind);
        self
    }

    pub fn with_volumes(mut self, volumes: Vec<VolumeBind>) -> Self {
        self.volumes.extend(volumes);
        self
    }
}

/// A refusal caused by the request (a volume path), as opposed to a setup failure.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct Refused(pub String);

/// Entry point of `restic-agent sandbox` (stage 1): never returns on success; exits as
/// restic did.
pub fn enter(spec_json: &str) -> Result<Infallible> {
    let spec: Spec = serde_json::from_str(spec_json).context("sandbox spec")?;
    if let Some(procs) = &spec.cgroup_procs {
        std::fs::write(procs, std::process::id().to_string())
            .with_context(|| format!("join cgroup {}", procs.display()))?;
    }
    // Signals meant for restic (the agent sends them to this process) are taken by a thread
    // and passed on. The thread starts first: once the PID namespace is unshared, no thread
    // can be created.
    let mut forwarded = SigSet::empty();
    for sig in [Signal::SIGTERM, Signal::SIGINT, Signal::SIGHUP] {
        forwarded.add(sig);
    }
    forwarded.thread_block().context("block signals")?;
    // The agent holds this process's stdin open for as long as it lives. When it dies, even
    // by SIGKILL, the stdin ends and so does the sandbox: no restic goes on unwatched, holding
    // a lock that the next agent takes for the lock of a dead run (see `crate::locks`).
    std::thread::spawn(|| {
        let mut buf = [0u8; 64];
        while matches!(std::io::Read::read(&mut std::io::stdin(), &mut buf), Ok(n) if n > 0) {}
        std::process::exit(EXIT_ORPHANED)
    });
    std::thread::spawn(move || {
        while let Ok(sig) = forwarded.wait() {
            forward(Some(sig));
        }
    });
    unshare(CloneFlags::CLONE_NEWPID).context("unshare the PID namespace (needs CAP_SYS_ADMIN)")?;
    let exe = std::env::current_exe().context("own binary")?;
    // The first child is the namespace's init: it holds the namespace until its stdin, a pipe
    // only this process writes to, closes.
    let mut holder = std::process::Command::new(&exe)
        .arg("sandbox-holder")
        .stdin(std::process::Stdio::piped())
        .spawn()
        .context("start the sandbox's first process")?;
    for _ in 0..spec.spare_pids {
        std::process::Command::new(&exe)
            .arg("sandbox-holder")
            .stdin(std::process::Stdio::null())
            .status()
            .context("use up a PID")?;
    }
    // std resets the signal mask of the child.
    let mut child = std::process::Command::new(&exe)
        .arg("sandbox-init")
        .arg(spec_json)
        .stdin(std::process::Stdio::null())
        .spawn()
        .context("start restic's process")?;
    CHILD.store(i32::try_from(child.id()).context("pid")?, Ordering::SeqCst);
    forward(None);
    let status = child.wait().context("wait for the sandbox")?;
    // Reaped: its PID may be anyone's now, so no signal may follow it there.
    CHILD.store(0, Ordering::SeqCst);
    drop(holder.stdin.take());
    let _ = holder.wait();
    if let Some(code) = status.code() {
        std::process::exit(code);
    }
    // Die the way restic died, so the agent sees the signal (an OOM kill is SIGKILL).
    let sig = status.signal().unwrap_or(Signal::SIGKILL as i32);
    if let Ok(sig) = Signal::try_from(sig) {
        let _ = forwarded.thread_unblock();
        let _ = raise(sig);
    }
    // A signal this process ignores (SIGPIPE): exit as a shell would report it.
    std::process::exit(128 + sig)
}

/// Entry point of `restic-agent sandbox-holder`, the PID namespace's first process: waits
/// until its stdin reaches its end (at once for a PID only used up) and exits, which ends the
/// namespace. It has no signal handlers, so, as the namespace's init, it ignores any signal
/// sent from inside.
pub fn hold() -> ! {
    let mut buf = [0u8; 64];
    while matches!(std::io::Read::read(&mut std::io::stdin(), &mut buf), Ok(n) if n > 0) {}
    std::process::exit(0)
}

/// The sandbox's first process once it runs, and a signal that arrived before it did.
static CHILD: AtomicI32 = AtomicI32::new(0);
static PENDING: AtomicI32 = AtomicI32::new(0);

/// Passes `sig` (or one that arrived before the child existed) on to the child. The child's
/// pid and a pending signal are each read by swapping, so a signal is sent once.
fn forward(sig: Option<Signal>) {
    if let Some(sig) = sig {
        PENDING.store(sig as i32, Ordering::SeqCst);
    }
    let child = CHILD.load(Ordering::SeqCst);
    if child == 0 {
        return;
    }
    let pending = PENDING.swap(0, Ordering::SeqCst);
    if let Ok(sig) = Signal::try_from(pending) {
        let _ = kill(Pid::from_raw(child), sig);
    }
}

/// Entry point of `restic-agent sandbox-init` (PID 2 of the new namespace, or later with
/// spare PIDs): builds the root and becomes restic.
pub fn init(spec_json: &str) -> Result<Infallible> {
    let spec: Spec = serde_json::from_str(spec_json).context("sandbox spec")?;
    // Die with the sandbox's first stage from the start (set again after the credentials
    // change, which clears it).
    nix::sys::prctl::set_pdeathsig(Signal::SIGKILL).context("set the parent-death signal")?;
    unshare(CloneFlags::CLONE_NEWNS | CloneFlags::CLONE_NEWUTS)
        .context("unshare the mount and UTS namespaces (needs CAP_SYS_ADMIN)")?;
    if !valid_hostname(&spec.hostname) {
        bail!("sandbox host name {:?} is not a plain host name", spec.hostname);
    }
    nix::unistd::sethostname(&spec.hostname).context("set the sandbox's host name")?;
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
    if let Some(layer) = &spec.cache_layer {
        mount_cache_layer(&spec.root, layer)?;
    }
    if !spec.binds.iter().any(|b| b.target == Path::new("/etc")) {
        write_identity(&spec.root)?;
    }
    for volume in &spec.volumes {
        mount_volume(&spec.root, volume)?;
    }
    // After every mount point exists: creating one changes its parent's times.
    for volume in &spec.volumes {
        copy_parent_metadata(&spec.root, volume)?;
    }
    enter_root(&spec.root)?;
    std::env::set_current_dir(&spec.cwd).with_context(|| format!("chdir {}", spec.cwd.display()))?;
    drop_privileges(&spec)?;
    let program = CString::new(spec.program.as_os_str().as_encoded_bytes())?;
    // Last: after this, the only call this process makes is the exec.
    install_seccomp()?;
    let mut argv = vec![program.clone()];
    for a in &spec.args {
        argv.push(CString::new(a.as_str())?);
    }
    nix::unistd::execv(&program, &argv).with_context(|| format!("exec {}", spec.program.display()))
}

/// `/etc/passwd` and `/etc/group` with root and nobody only: restic records a user name in
/// snapshots, and the node's own files have no business in the sandbox.
fn write_identity(root: &Path) -> Result<()> {
    let etc = root.join("etc");
    std::fs::create_dir_all(&etc)?;
    std::fs::write(
        etc.join("passwd"),
        "root:x:0:0:root:/tmp:/nonexistent\nnobody:x:65534:65534:nobody:/nonexistent:/nonexistent\n",
    )?;
    std::fs::write(etc.join("group"), "root:x:0:\nnogroup:x:65534:\n")?;
    Ok(())
}

/// The host path of `target` (absolute, inside the sandbox) under `root`.
fn inside(root: &Path, target: &Path) -> Result<PathBuf> {
    if !target.is_absolute() || target.components().any(|c| matches!(c, Component::ParentDir)) {
        bail!("sandbox target {} is not a plain absolute path", target.display());
    }
    Ok(root.join(target.strip_prefix("/")?))
}

/// Creates the mount point for a directory or a file on the sandbox's tmpfs.
fn mount_point(target: &Path, is_dir: bool) -> Result<()> {
    if is_dir {
        std::fs::create_dir_all(target)?;
    } else {
        std::fs::create_dir_all(target.parent().context("file target without parent")?)?;
        std::fs::write(target, b"")?;
    }
    Ok(())
}

fn bind_mount(root: &Path, bind: &Bind) -> Result<()> {
    let target = inside(root, &bind.target)?;
    let meta =
        std::fs::metadata(&bind.source).with_context(|| format!("bind source {}", bind.source.display()))?;
    mount_point(&target, meta.is_dir())?;
    let rec = MsFlags::MS_BIND | MsFlags::MS_REC;
    mount(Some(&bind.source), &target, None::<&str>, rec, None::<&str>)
        .with_context(|| format!("bind {} at {}", bind.source.display(), bind.target.display()))?;
    let mut flags = MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_NOSUID;
    if bind.read_only {
        flags |= MsFlags::MS_RDONLY;
    } else if !DEVICES.iter().any(|d| bind.target == Path::new(d)) {
        // Writable means not executable: nothing restic (or anything it is tricked into)
        // writes can be run.
        flags |= MsFlags::MS_NOEXEC | MsFlags::MS_NODEV;
    }
    // A bind mount takes its flags by remounting it.
    mount(None::<&str>, &target, None::<&str>, flags, None::<&str>)
        .with_context(|| format!("restrict {}", bind.target.display()))?;
    Ok(())
}

/// Mounts the overlay of `layer` at [`CACHE_IN_SANDBOX`]; where overlayfs is not available
/// (or the paths cannot be said in its options), binds `layer.upper` there instead.
fn mount_cache_layer(root: &Path, layer: &CacheLayer) -> Result<()> {
    let target = inside(root, Path::new(CACHE_IN_SANDBOX))?;
    mount_point(&target, true)?;
    let flags = MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC;
    let plain = |p: &Path| {
        p.to_str()
            .filter(|s| !s.contains([',', ':', '\\']))
            .map(str::to_owned)
    };
    let options = match (plain(&layer.lower), plain(&layer.upper), plain(&layer.work)) {
        (Some(lower), Some(upper), Some(work)) => {
            Some(format!("lowerdir={lower},upperdir={upper},workdir={work}"))
        }
        _ => None,
    };
    let overlay = options
        .is_some_and(|o| mount(Some("overlay"), &target, Some("overlay"), flags, Some(o.as_str())).is_ok());
    if !overlay {
        bind_mount(
            root,
            &Bind {
                source: layer.upper.clone(),
                target: CACHE_IN_SANDBOX.into(),
                read_only: false,
            },
        )?;
    }
    Ok(())
}

/// Opens `subpath` beneath the volume directory and mounts exactly what was opened.
fn mount_volume(root: &Path, v: &VolumeBind) -> Result<()> {
    let base = open(
        &v.source,
        OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .with_context(|| format!("open the volume directory {}", v.source.display()))?;
    let shown = format!("/{}", v.subpath.display());
    let fd = if v.subpath.as_os_str().is_empty() {
        base
    } else if v.create {
        create_beneath(base, &v.subpath, &shown)?
    } else {
        open_beneath(&base, &v.subpath, OFlag::O_PATH).map_err(|e| refusal(&shown, e))?
    };
    let is_dir = SFlag::from_bits_truncate(fstat(&fd)?.st_mode & SFlag::S_IFMT.bits()) == SFlag::S_IFDIR;
    if v.require_empty && is_dir && has_entries(&fd)? {
        let what = if v.subpath.as_os_str().is_empty() {
            "volume".to_string()
        } else {
            format!("directory {shown}")
        };
        return Err(Refused(format!(
            "the target {what} is not empty; choose mode Overwrite or Mirror, or restore into an empty subdirectory"
        ))
        .into());
    }
    let target = inside(root, &v.target)?;
    mount_point(&target, is_dir)?;
    // The magic link names the open file itself, not a path that could be swapped.
    let source = PathBuf::from(format!("/proc/self/fd/{}", fd.as_raw_fd()));
    mount(
        Some(&source),
        &target,
        None::<&str>,
        MsFlags::MS_BIND | MsFlags::MS_REC,
        None::<&str>,
    )
    .with_context(|| format!("bind the volume path {shown} at {}", v.target.display()))?;
    let mut flags =
        MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC;
    if v.read_only {
        flags |= MsFlags::MS_RDONLY;
    }
    mount(None::<&str>, &target, None::<&str>, flags, None::<&str>)
        .with_context(|| format!("restrict {}", v.target.display()))?;
    Ok(())
}

/// A path inside a volume is mounted on its own, so the directories above it in the sandbox
/// (the snapshot path itself, `app` for `app/config`) are the sandbox's. restic records them
/// in the snapshot and a restore writes them back, so they get the owner, mode and times of
/// the volume's real directories (each opened beneath the volume).
fn copy_parent_metadata(root: &Path, v: &VolumeBind) -> Result<()> {
    use nix::sys::stat::{UtimensatFlags, fchmodat, utimensat};
    use nix::sys::time::TimeSpec;
    let depth = v.subpath.components().count();
    if depth == 0 {
        return Ok(());
    }
    let Some(top) = v.target.ancestors().nth(depth) else {
        return Ok(());
    };
    let base = open(
        &v.source,
        OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
        Mode::empty(),
    )?;
    let mut prefix = PathBuf::new();
    let mut parents = vec![PathBuf::new()];
    for c in v.subpath.components().take(depth - 1) {
        prefix.push(c);
        parents.push(prefix.clone());
    }
    for rel in parents {
        let real = if rel.as_os_str().is_empty() {
            fstat(&base)?
        } else {
            match open_beneath(&base, &rel, OFlag::O_PATH | OFlag::O_DIRECTORY) {
                Ok(fd) => fstat(&fd)?,
                // The path itself was opened already; a parent swapped since then only loses
                // its metadata here.
                Err(_) => continue,
            }
        };
        let dir = inside(root, &top.join(&rel))?;
        nix::unistd::chown(&dir, Some(real.st_uid.into()), Some(real.st_gid.into()))?;
        fchmodat(
            nix::fcntl::AT_FDCWD,
            &dir,
            Mode::from_bits_truncate(real.st_mode & 0o7777),
            nix::sys::stat::FchmodatFlags::FollowSymlink,
        )?;
        let atime = TimeSpec::new(real.st_atime, real.st_atime_nsec);
        let mtime = TimeSpec::new(real.st_mtime, real.st_mtime_nsec);
        utimensat(
            nix::fcntl::AT_FDCWD,
            &dir,
            &atime,
            &mtime,
            UtimensatFlags::NoFollowSymlink,
        )?;
    }
    Ok(())
}

/// `openat2` with `RESOLVE_BENEATH`: `..`, absolute symlinks and symlinks leading out of `dir`
/// fail instead of being followed out.
fn open_beneath(dir: &OwnedFd, path: &Path, flags: OFlag) -> nix::Result<OwnedFd> {
    let how = OpenHow::new()
        .flags(flags | OFlag::O_CLOEXEC)
        .resolve(ResolveFlag::RESOLVE_BENEATH | ResolveFlag::RESOLVE_NO_MAGICLINKS);
    openat2(dir.as_fd(), path, how)
}

/// Opens `subpath`, creating missing directories one component at a time, each opened without
/// following any symlink.
fn create_beneath(base: OwnedFd, subpath: &Path, shown: &str) -> Result<OwnedFd> {
    let mut dir = base;
    for c in subpath.components() {
        let Component::Normal(name) = c else {
            bail!("volume path {shown} is not normalized");
        };
        match mkdirat(dir.as_fd(), name, Mode::from_bits_truncate(0o755)) {
            Ok(()) | Err(Errno::EEXIST) => {}
            Err(e) => return Err(refusal(shown, e).into()),
        }
        let how = OpenHow::new()
            .flags(OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC | OFlag::O_NOFOLLOW)
            .resolve(ResolveFlag::RESOLVE_BENEATH | ResolveFlag::RESOLVE_NO_SYMLINKS);
        dir = openat2(dir.as_fd(), Path::new(name), how).map_err(|e| refusal(shown, e))?;
    }
    Ok(dir)
}

fn refusal(shown: &str, e: Errno) -> Refused {
    Refused(match e {
        Errno::ENOENT => format!("path {shown} does not exist in the volume"),
        Errno::EXDEV => format!("path {shown} leaves the volume (through a symbolic link or '..'); refusing"),
        Errno::ELOOP => format!(
            "path {shown} goes through a symbolic link, which a restore target may not (or through too many links)"
        ),
        Errno::ENOTDIR => format!("path {shown} runs through something that is not a directory"),
        e => format!("path {shown} in the volume cannot be opened: {e}"),
    })
}

/// Whether a directory (by descriptor) has anything in it; `lost+found` does not count.
fn has_entries(fd: &OwnedFd) -> Result<bool> {
    let dir = open_beneath(fd, Path::new("."), OFlag::O_RDONLY | OFlag::O_DIRECTORY)?;
    let mut dir = nix::dir::Dir::from_fd(dir)?;
    Ok(dir.iter().flatten().any(|e| {
        let name = e.file_name().to_bytes();
        !matches!(name, b"." | b".." | b"lost+found")
    }))
}

/// `pivot_root` into the sandbox and make its root read-only: the old root is detached, so
/// nothing of the host is reachable except what was bound in.
fn enter_root(root: &Path) -> Result<()> {
    std::env::set_current_dir(root).context("chdir into the sandbox root")?;
    nix::unistd::pivot_root(".", ".").context("pivot_root into the sandbox")?;
    umount2(".", MntFlags::MNT_DETACH).context("detach the host's root")?;
    std::env::set_current_dir("/")?;
    let flags =
        MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY | MsFlags::MS_NOSUID | MsFlags::MS_NODEV;
    mount(None::<&str>, "/", None::<&str>, flags, None::<&str>).context("make the sandbox root read-only")?;
    Ok(())
}

/// The capabilities, user and flags restic runs with. For root, the bounding set is what an
/// exec grants, so cutting it to the operation's needs is what limits restic.
fn drop_privileges(spec: &Spec) -> Result<()> {
    use caps::CapSet;
    let keep: caps::CapsHashSet = spec.access.capabilities().iter().copied().collect();
    // Only what this kernel knows: dropping an unknown capability fails.
    for cap in caps::runtime::thread_all_supported() {
        if !keep.contains(&cap) {
            caps::drop(None, CapSet::Bounding, cap)
                .with_context(|| format!("drop {cap} from the bounding set"))?;
        }
    }
    if let Some((uid, gid)) = spec.run_as {
        use nix::unistd::{Gid, Uid, setgid, setgroups, setuid};
        // Groups first: once the uid is dropped, changing them is no longer allowed.
        setgroups(&[]).context("drop supplementary groups")?;
        setgid(Gid::from_raw(gid)).with_context(|| format!("setgid {gid}"))?;
        setuid(Uid::from_raw(uid)).with_context(|| format!("setuid {uid}"))?;
    }
    caps::clear(None, CapSet::Ambient).context("clear ambient capabilities")?;
    caps::clear(None, CapSet::Inheritable).context("clear inheritable capabilities")?;
    let current = caps::read(None, CapSet::Permitted)?;
    let kept: caps::CapsHashSet = keep.intersection(&current).copied().collect();
    caps::set(None, CapSet::Effective, &kept).context("set effective capabilities")?;
    caps::set(None, CapSet::Permitted, &kept).context("set permitted capabilities")?;
    nix::sys::prctl::set_no_new_privs().context("set no_new_privs")?;
    // Set last: a change of credentials clears it.
    nix::sys::prctl::set_pdeathsig(Signal::SIGKILL).context("set the parent-death signal")?;
    Ok(())
}

/// System calls restic never makes, refused with EPERM: handles that open any inode of a
/// file system (`open_by_handle_at`, which `CAP_DAC_READ_SEARCH` would otherwise allow on the
/// volume's whole file system), kernel keyrings, namespaces and mounts, kernel modules and
/// images, BPF, tracing other processes, and other node-wide switches.
pub const DENIED_SYSCALLS: &[i64] = {
    use nix::libc::*;
    &[
        SYS_open_by_handle_at,
        SYS_name_to_handle_at,
        SYS_keyctl,
        SYS_add_key,
        SYS_request_key,
        SYS_unshare,
        SYS_setns,
        SYS_mount,
        SYS_umount2,
        SYS_pivot_root,
        SYS_chroot,
        SYS_open_tree,
        SYS_move_mount,
        SYS_fsopen,
        SYS_fsconfig,
        SYS_fsmount,
        SYS_fspick,
        SYS_mount_setattr,
        SYS_bpf,
        SYS_userfaultfd,
        SYS_perf_event_open,
        SYS_ptrace,
        SYS_process_vm_readv,
        SYS_process_vm_writev,
        SYS_kexec_load,
        SYS_kexec_file_load,
        SYS_init_module,
        SYS_finit_module,
        SYS_delete_module,
        SYS_reboot,
        SYS_swapon,
        SYS_swapoff,
        SYS_syslog,
        SYS_acct,
        SYS_quotactl,
    ]
};

/// `clone` flags that make a new namespace; `clone` with any of them is refused too.
const NAMESPACE_FLAGS: &[i32] = {
    use nix::libc::*;
    &[
        CLONE_NEWNS,
        CLONE_NEWCGROUP,
        CLONE_NEWUTS,
        CLONE_NEWIPC,
        CLONE_NEWUSER,
        CLONE_NEWPID,
        CLONE_NEWNET,
    ]
};

/// The seccomp filters restic runs under (inherited across exec; `no_new_privs` is set).
fn seccomp_filters() -> Result<Vec<seccompiler::BpfProgram>> {
    use std::collections::BTreeMap;

    use seccompiler::{
        SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter, SeccompRule,
    };
    let arch = std::env::consts::ARCH
        .try_into()
        .map_err(|e| anyhow::anyhow!("seccomp on {}: {e}", std::env::consts::ARCH))?;
    let mut denied: BTreeMap<i64, Vec<SeccompRule>> =
        DENIED_SYSCALLS.iter().map(|nr| (*nr, Vec::new())).collect();
    let mut clone_rules = Vec::new();
    for flag in NAMESPACE_FLAGS {
        let flag = u64::from(flag.cast_unsigned());
        let has_flag = SeccompCondition::new(0, SeccompCmpArgLen::Qword, SeccompCmpOp::MaskedEq(flag), flag)?;
        clone_rules.push(SeccompRule::new(vec![has_flag])?);
    }
    denied.insert(nix::libc::SYS_clone, clone_rules);
    let deny = SeccompFilter::new(
        denied,
        SeccompAction::Allow,
        SeccompAction::Errno(1 /* EPERM */),
        arch,
    )?;
    // clone3 passes its flags in memory a filter cannot read: answer "not implemented", and
    // callers fall back to clone, whose flags the first filter checks.
    let clone3 = [(nix::libc::SYS_clone3, Vec::new())].into_iter().collect();
    let clone3 = SeccompFilter::new(
        clone3,
        SeccompAction::Allow,
        SeccompAction::Errno(38 /* ENOSYS */),
        arch,
    )?;
    Ok(vec![deny.try_into()?, clone3.try_into()?])
}

fn install_seccomp() -> Result<()> {
    for filter in seccomp_filters()? {
        seccompiler::apply_filter(&filter).context("install the seccomp filter")?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_minimal_root_holds_no_system_directory_and_not_the_whole_etc_or_dev() {
        let spec = Spec::minimal(
            "/r".into(),
            Path::new("/bin/restic"),
            Path::new("/t"),
            Access::Repository,
            "node-0123456789abcdef".into(),
        );
        for b in &spec.binds {
            assert!(
                !["/usr", "/bin", "/lib", "/etc", "/dev", "/proc", "/sbin"]
                    .iter()
                    .any(|d| b.target == Path::new(d)),
                "{b:?}"
            );
        }
        assert!(
            spec.binds
                .iter()
                .any(|b| b.target == Path::new(RESTIC_IN_SANDBOX) && b.read_only)
        );
        let system = spec.with_system_dirs();
        assert!(
            system
                .binds
                .iter()
                .any(|b| b.target == Path::new("/usr") && b.read_only)
        );
        assert!(
            system
                .binds
                .iter()
                .any(|b| b.target == Path::new("/etc") && b.read_only)
        );
    }

    #[test]
    fn only_backups_may_read_and_only_restores_may_chown() {
        use caps::Capability::*;
        assert!(Access::Repository.capabilities().is_empty());
        assert_eq!(Access::ReadVolume.capabilities(), &[CAP_DAC_READ_SEARCH]);
        assert!(Access::WriteVolume.capabilities().contains(&CAP_CHOWN));
        for a in [Access::Repository, Access::ReadVolume, Access::WriteVolume] {
            for cap in [
                CAP_SYS_ADMIN,
                CAP_SYS_PTRACE,
                CAP_NET_ADMIN,
                CAP_SETUID,
                CAP_MKNOD,
                CAP_SYS_CHROOT,
            ] {
                assert!(!a.capabilities().contains(&cap), "{a:?} {cap}");
            }
        }
    }

    #[test]
    fn the_seccomp_filters_compile_for_this_machine() {
        let filters = seccomp_filters().unwrap();
        assert_eq!(filters.len(), 2);
        assert!(filters.iter().all(|f| !f.is_empty()));
    }

    #[test]
    fn host_names_are_plain() {
        assert!(valid_hostname("node-1.example-0123456789abcdef"));
        for bad in ["", "a b", "a/b", "a\nb", &"x".repeat(65)] {
            assert!(!valid_hostname(bad), "{bad:?}");
        }
    }

    #[test]
    fn targets_must_be_plain_absolute_paths() {
        assert!(inside(Path::new("/r"), Path::new("data")).is_err());
        assert!(inside(Path::new("/r"), Path::new("/data/../etc")).is_err());
        assert_eq!(
            inside(Path::new("/r"), Path::new("/data/a")).unwrap(),
            Path::new("/r/data/a")
        );
    }
}
