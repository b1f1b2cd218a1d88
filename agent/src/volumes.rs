//! Finding a pod volume's directory under the kubelet root, from a pod UID and a volume name.
//!
//! The kubelet keeps every mounted volume of a pod at
//! `<kubelet-root>/pods/<pod-uid>/volumes/<plugin>/<dir>`, where `<plugin>` is the escaped
//! plugin name (`kubernetes.io~empty-dir`, `kubernetes.io~csi`, `kubernetes.io~nfs`, ...) and
//! `<dir>` is the pod's volume name for inline volumes or the PersistentVolume's name for claims.
//! CSI volumes have their data one level down, in `mount/`. Block volumes live under
//! `volumeDevices/` instead and cannot be backed up file by file.
//!
//! This is the only place host paths are made, and it never accepts one from the network:
//! names are validated, and the result is canonicalized and must stay inside the pod's volume
//! directory, so neither `..` nor a planted symlink can lead restic elsewhere.

use std::path::{Component, Path, PathBuf};

/// Why a volume cannot be resolved; each message says what to fix.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum VolumeError {
    #[error("invalid {what} {value:?}: {why}")]
    InvalidName {
        what: &'static str,
        value: String,
        why: &'static str,
    },
    #[error("pod {0} has no volumes on this node (is the pod running here?)")]
    PodNotFound(String),
    #[error("pod {pod} has no mounted volume {name:?} on this node{hint}")]
    VolumeNotFound { pod: String, name: String, hint: String },
    #[error("volume {0:?} is a block volume; only file system volumes can be backed up")]
    BlockVolume(String),
    #[error("volume {name:?} resolves to {target}, outside the pod's volume directory; refusing")]
    Escapes { name: String, target: String },
    #[error("path {0:?} inside the volume is not allowed: {1}")]
    InvalidSubpath(String, &'static str),
    #[error("reading {path}: {message}")]
    Io { path: String, message: String },
}

/// A volume found on this node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ResolvedVolume {
    pub name: String,
    /// The escaped plugin directory, e.g. `kubernetes.io~csi`.
    pub plugin: String,
    /// The directory with the volume's data.
    pub host_path: PathBuf,
}

fn io_err(path: &Path, e: std::io::Error) -> VolumeError {
    VolumeError::Io {
        path: path.display().to_string(),
        message: e.to_string(),
    }
}

/// Pod UIDs are RFC 4122 UUIDs; accept hex, digits and dashes only.
pub fn validate_pod_uid(uid: &str) -> Result<(), VolumeError> {
    let bad = |why| {
        Err(VolumeError::InvalidName {
            what: "pod UID",
            value: uid.into(),
            why,
        })
    };
    if uid.is_empty() || uid.len() > 64 {
        return bad("must be 1 to 64 characters");
    }
    if !uid.chars().all(|c| c.is_ascii_hexdigit() || c == '-') {
        return bad("only hexadecimal digits and '-' are allowed");
    }
    Ok(())
}

/// Volume and PV names are DNS-1123 names: no `/`, no `..`, nothing that walks a path.
pub fn validate_volume_name(what: &'static str, name: &str) -> Result<(), VolumeError> {
    let bad = |why| {
        Err(VolumeError::InvalidName {
            what,
            value: name.into(),
            why,
        })
    };
    if name.is_empty() || name.len() > 253 {
        return bad("must be 1 to 253 characters");
    }
    if name.contains('/') || name.contains('\0') {
        return bad("must not contain '/'");
    }
    if name == "." || name == ".." || name.contains("..") {
        return bad("must not contain '..'");
    }
    if !name
        .chars()
        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '.')
    {
        return bad("only lowercase letters, digits, '-' and '.' are allowed");
    }
    Ok(())
}

/// The kubelet's pod directories.
#[derive(Clone, Debug)]
pub struct KubeletRoot(pub PathBuf);

impl KubeletRoot {
    fn pod_dir(&self, pod_uid: &str) -> PathBuf {
        self.0.join("pods").join(pod_uid)
    }

    /// Resolves a volume by pod UID and volume name (or the PV name for a claim).
    pub fn resolve(
        &self,
        pod_uid: &str,
        volume_name: &str,
        pv_name: Option<&str>,
    ) -> Result<ResolvedVolume, VolumeError> {
        validate_pod_uid(pod_uid)?;
        validate_volume_name("volume name", volume_name)?;
        if let Some(pv) = pv_name {
            validate_volume_name("persistent volume name", pv)?;
        }
        let candidates: Vec<&str> = std::iter::once(volume_name).chain(pv_name).collect();
        let pod = self.pod_dir(pod_uid);
        if !pod.is_dir() {
            return Err(VolumeError::PodNotFound(pod_uid.into()));
        }
        // A block volume is visible under volumeDevices/<plugin>/<name>.
        for (_, dir) in plugin_dirs(&pod.join("volumeDevices"))? {
            if candidates.iter().any(|c| dir.join(c).exists()) {
                return Err(VolumeError::BlockVolume(volume_name.into()));
            }
        }
        let volumes = pod.join("volumes");
        for (plugin, dir) in plugin_dirs(&volumes)? {
            for candidate in &candidates {
                let mut path = dir.join(candidate);
                if std::fs::symlink_metadata(&path).is_err() {
                    continue;
                }
                if plugin == "kubernetes.io~csi" {
                    path.push("mount");
                }
                let host_path = contained(&volumes, &path, volume_name)?;
                return Ok(ResolvedVolume {
                    name: volume_name.into(),
                    plugin,
                    host_path,
                });
            }
        }
        let names: Vec<String> = self.list(pod_uid)?.into_iter().map(|v| v.name).collect();
        let hint = if names.is_empty() {
            String::new()
        } else {
            format!(" (it has: {})", names.join(", "))
        };
        Err(VolumeError::VolumeNotFound {
            pod: pod_uid.into(),
            name: volume_name.into(),
            hint,
        })
    }

    /// Every file-system volume of a pod on this node (for the debug CLI), with the problem of
    /// each one that cannot be used.
    pub fn list(&self, pod_uid: &str) -> Result<Vec<ResolvedVolume>, VolumeError> {
        validate_pod_uid(pod_uid)?;
        let pod = self.pod_dir(pod_uid);
        if !pod.is_dir() {
            return Err(VolumeError::PodNotFound(pod_uid.into()));
        }
        let mut out = Vec::new();
        for (plugin, dir) in plugin_dirs(&pod.join("volumes"))? {
            let entries = std::fs::read_dir(&dir).map_err(|e| io_err(&dir, e))?;
            for entry in entries.flatten() {
                let name = entry.file_name().to_string_lossy().into_owned();
                let mut path = entry.path();
                if plugin == "kubernetes.io~csi" {
                    path.push("mount");
                }
                out.push(ResolvedVolume {
                    name,
                    plugin: plugin.clone(),
                    host_path: path,
                });
            }
        }
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }
}

/// `(plugin, path)` of each plugin directory below `dir` (none if `dir` does not exist).
fn plugin_dirs(dir: &Path) -> Result<Vec<(String, PathBuf)>, VolumeError> {
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(io_err(dir, e)),
    };
    let mut out: Vec<(String, PathBuf)> = entries
        .flatten()
        .filter(|e| e.file_type().map(|t| t.is_dir()).unwrap_or(false))
        .map(|e| (e.file_name().to_string_lossy().into_owned(), e.path()))
        .collect();
    out.sort();
    Ok(out)
}

/// Canonicalizes `path` and checks it is a directory inside `root`.
fn contained(root: &Path, path: &Path, name: &str) -> Result<PathBuf, VolumeError> {
    let root = root.canonicalize().map_err(|e| io_err(root, e))?;
    let real = path.canonicalize().map_err(|e| io_err(path, e))?;
    if !real.starts_with(&root) || real == root {
        return Err(VolumeError::Escapes {
            name: name.into(),
            target: real.display().to_string(),
        });
    }
    if !real.is_dir() {
        return Err(VolumeError::Io {
            path: real.display().to_string(),
            message: "not a directory".into(),
        });
    }
    Ok(real)
}

/// Validates a path inside a volume ("/", "config", "/config/db") and returns it relative,
/// without `.`; refuses `..`. This is only the path's form: where it leads is decided inside
/// the sandbox, where it is opened beneath the volume (a check on the host would be stale by
/// the time restic used the path).
pub fn relative(p: &str) -> Result<PathBuf, VolumeError> {
    if p.contains('\0') {
        return Err(VolumeError::InvalidSubpath(p.into(), "NUL byte"));
    }
    let mut rel = PathBuf::new();
    for c in Path::new(p).components() {
        match c {
            Component::RootDir | Component::CurDir => {}
            Component::Normal(n) => rel.push(n),
            Component::ParentDir => return Err(VolumeError::InvalidSubpath(p.into(), "'..' is not allowed")),
            Component::Prefix(_) => return Err(VolumeError::InvalidSubpath(p.into(), "not a path")),
        }
    }
    Ok(rel)
}

/// How long one file-system call on a volume may take before the run gives up on it. A hung
/// NFS server must stall one run, never the agent's runtime (health checks, Cancel).
pub const FS_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(60);

/// Runs a blocking file-system call on a volume off the async runtime, with [`FS_TIMEOUT`].
/// On a timeout the thread is left to finish (or hang) on its own.
pub async fn blocking<T: Send + 'static>(
    what: &str,
    f: impl FnOnce() -> Result<T, VolumeError> + Send + 'static,
) -> Result<T, VolumeError> {
    match tokio::time::timeout(FS_TIMEOUT, tokio::task::spawn_blocking(f)).await {
        Ok(Ok(result)) => result,
        Ok(Err(e)) => Err(VolumeError::Io {
            path: what.into(),
            message: e.to_string(),
        }),
        Err(_) => Err(VolumeError::Io {
            path: what.into(),
            message: format!(
                "no answer within {}s (a hung network volume?)",
                FS_TIMEOUT.as_secs()
            ),
        }),
    }
}

/// Whether anything is in the volume at any of `subpaths` (relative, resolved beneath the
/// volume without following symlinks out of it; a file counts as an entry). Used to tell an
/// empty volume from a backup that read nothing; an error or timeout answers "yes", so a
/// snapshot of nothing is never trusted by mistake.
pub async fn any_entries(volume: &Path, subpaths: &[PathBuf]) -> bool {
    let volume = volume.to_path_buf();
    let subpaths = subpaths.to_vec();
    blocking("the volume", move || {
        Ok(subpaths
            .iter()
            .any(|rel| entries_beneath(&volume, rel).unwrap_or(true)))
    })
    .await
    .unwrap_or(true)
}

/// Fails at start-up on a kernel without `openat2` (before Linux 5.6): every path inside a
/// volume is resolved with it, and without it every such backup and restore would fail.
pub fn check_openat2(dir: &Path) -> anyhow::Result<()> {
    match entries_beneath(dir, Path::new("")) {
        Err(nix::errno::Errno::ENOSYS) => {
            anyhow::bail!("this kernel has no openat2(2); the agent needs Linux 5.6 or newer")
        }
        _ => Ok(()),
    }
}

fn entries_beneath(volume: &Path, rel: &Path) -> nix::Result<bool> {
    use nix::fcntl::{OFlag, OpenHow, ResolveFlag, open, openat2};
    let base = open(
        volume,
        OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
        nix::sys::stat::Mode::empty(),
    )?;
    let path = if rel.as_os_str().is_empty() {
        Path::new(".")
    } else {
        rel
    };
    let beneath = ResolveFlag::RESOLVE_BENEATH | ResolveFlag::RESOLVE_NO_MAGICLINKS;
    // O_PATH first: a device or FIFO the pod planted is never opened for real by the agent
    // (no device cgroup limits it), only looked at.
    let how = OpenHow::new()
        .flags(OFlag::O_PATH | OFlag::O_CLOEXEC)
        .resolve(beneath);
    let fd = openat2(&base, path, how)?;
    use nix::sys::stat::SFlag;
    let kind = SFlag::from_bits_truncate(nix::sys::stat::fstat(&fd)?.st_mode & SFlag::S_IFMT.bits());
    if kind != SFlag::S_IFDIR {
        return Ok(true);
    }
    let how = OpenHow::new()
        .flags(OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC)
        .resolve(beneath);
    let mut dir = nix::dir::Dir::from_fd(openat2(&fd, Path::new("."), how)?)?;
    Ok(dir
        .iter()
        .flatten()
        .any(|e| !matches!(e.file_name().to_bytes(), b"." | b".." | b"lost+found")))
}

/// Validates an absolute in-snapshot path such as `/data` or `/config/app`.
pub fn snapshot_path(p: &str) -> Result<PathBuf, VolumeError> {
    let p = if p.is_empty() { "/data" } else { p };
    let path = Path::new(p);
    if !path.is_absolute() {
        return Err(VolumeError::InvalidSubpath(
            p.into(),
            "the snapshot path must be absolute",
        ));
    }
    let mut out = PathBuf::from("/");
    for c in path.components() {
        match c {
            Component::RootDir => {}
            Component::Normal(n) => out.push(n),
            _ => {
                return Err(VolumeError::InvalidSubpath(
                    p.into(),
                    "'.' and '..' are not allowed",
                ));
            }
        }
    }
    if out == Path::new("/") {
        return Err(VolumeError::InvalidSubpath(
            p.into(),
            "the snapshot path cannot be '/'",
        ));
    }
    // These hold what restic itself needs inside its sandbox.
    let first = out
        .components()
        .nth(1)
        .map(|c| c.as_os_str().to_string_lossy().into_owned());
    if matches!(
        first.as_deref(),
        Some("etc" | "dev" | "proc" | "tmp" | "usr" | "bin" | "sbin" | "lib" | "lib64" | ".restic")
    ) {
        return Err(VolumeError::InvalidSubpath(
            p.into(),
            "it would hide a directory restic needs (/etc, /usr, /tmp, ...)",
        ));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::symlink;

    use super::*;

    const UID: &str = "0f5c1d1e-1111-4222-8333-444455556666";

    fn kubelet() -> (tempfile::TempDir, KubeletRoot) {
        let dir = tempfile::tempdir().unwrap();
        let root = KubeletRoot(dir.path().to_path_buf());
        let vols = dir.path().join("pods").join(UID).join("volumes");
        std::fs::create_dir_all(vols.join("kubernetes.io~empty-dir/cache")).unwrap();
        std::fs::create_dir_all(vols.join("kubernetes.io~csi/pvc-123/mount")).unwrap();
        std::fs::create_dir_all(vols.join("kubernetes.io~nfs/media")).unwrap();
        std::fs::create_dir_all(vols.join("kubernetes.io~local-volume/local-pv-1")).unwrap();
        (dir, root)
    }

    #[test]
    fn empty_dir_resolves_by_volume_name() {
        let (_d, k) = kubelet();
        let v = k.resolve(UID, "cache", None).unwrap();
        assert_eq!(v.plugin, "kubernetes.io~empty-dir");
        assert!(v.host_path.ends_with("kubernetes.io~empty-dir/cache"));
    }

    #[test]
    fn csi_claims_resolve_by_pv_name_to_the_mount_directory() {
        let (_d, k) = kubelet();
        let v = k.resolve(UID, "data", Some("pvc-123")).unwrap();
        assert_eq!(v.plugin, "kubernetes.io~csi");
        assert!(v.host_path.ends_with("kubernetes.io~csi/pvc-123/mount"));
    }

    #[test]
    fn in_tree_plugins_and_local_volumes_resolve() {
        let (_d, k) = kubelet();
        assert_eq!(k.resolve(UID, "media", None).unwrap().plugin, "kubernetes.io~nfs");
        assert_eq!(
            k.resolve(UID, "x", Some("local-pv-1")).unwrap().plugin,
            "kubernetes.io~local-volume"
        );
    }

    #[test]
    fn names_that_walk_paths_are_refused() {
        let (_d, k) = kubelet();
        for bad in ["../cache", "a/b", "..", "Cache", ""] {
            assert!(
                matches!(k.resolve(UID, bad, None), Err(VolumeError::InvalidName { .. })),
                "{bad}"
            );
        }
        assert!(matches!(
            k.resolve("../../etc", "cache", None),
            Err(VolumeError::InvalidName { .. })
        ));
    }

    #[test]
    fn a_volume_symlinked_out_of_the_pod_is_refused() {
        let (d, k) = kubelet();
        let outside = d.path().join("outside");
        std::fs::create_dir_all(&outside).unwrap();
        let link = d
            .path()
            .join("pods")
            .join(UID)
            .join("volumes/kubernetes.io~empty-dir/evil");
        symlink(&outside, link).unwrap();
        assert!(matches!(
            k.resolve(UID, "evil", None),
            Err(VolumeError::Escapes { .. })
        ));
    }

    #[test]
    fn block_volumes_are_refused_with_a_clear_error() {
        let (d, k) = kubelet();
        let dev = d
            .path()
            .join("pods")
            .join(UID)
            .join("volumeDevices/kubernetes.io~csi");
        std::fs::create_dir_all(&dev).unwrap();
        std::fs::write(dev.join("pvc-block"), b"").unwrap();
        let err = k.resolve(UID, "raw", Some("pvc-block")).unwrap_err();
        assert_eq!(err, VolumeError::BlockVolume("raw".into()));
        assert!(err.to_string().contains("block volume"));
    }

    #[test]
    fn a_missing_volume_names_the_ones_that_exist() {
        let (_d, k) = kubelet();
        let err = k.resolve(UID, "nope", None).unwrap_err().to_string();
        assert!(err.contains("cache") && err.contains("media"), "{err}");
        let other = "aaaaaaaa-1111-4222-8333-444455556666";
        assert_eq!(
            k.resolve(other, "cache", None).unwrap_err(),
            VolumeError::PodNotFound(other.into())
        );
    }

    #[test]
    fn subpaths_are_relative_and_never_climb() {
        assert_eq!(relative("/config").unwrap(), PathBuf::from("config"));
        assert_eq!(relative("./config/db/").unwrap(), PathBuf::from("config/db"));
        assert_eq!(relative("/").unwrap(), PathBuf::new());
        assert!(relative("../x").is_err());
        assert!(relative("config/../../x").is_err());
        assert!(relative("a\0b").is_err());
    }

    #[tokio::test]
    async fn entries_are_looked_for_beneath_the_volume_only() {
        let (d, k) = kubelet();
        let vol = k.resolve(UID, "cache", None).unwrap().host_path;
        std::fs::create_dir_all(vol.join("empty")).unwrap();
        std::fs::create_dir_all(vol.join("full")).unwrap();
        std::fs::write(vol.join("full/f"), b"x").unwrap();
        std::fs::create_dir_all(d.path().join("outside")).unwrap();
        std::fs::write(d.path().join("outside/secret"), b"x").unwrap();
        symlink(d.path().join("outside"), vol.join("out")).unwrap();
        assert!(!any_entries(&vol, &["empty".into()]).await);
        assert!(any_entries(&vol, &["empty".into(), "full".into()]).await);
        assert_eq!(
            entries_beneath(&vol, Path::new("out")),
            Err(nix::errno::Errno::EXDEV)
        );
        assert!(
            any_entries(&vol, &["out".into()]).await,
            "an error is never taken for empty"
        );
    }

    #[test]
    fn snapshot_paths_are_absolute_and_do_not_hide_the_sandbox() {
        assert_eq!(snapshot_path("").unwrap(), PathBuf::from("/data"));
        assert_eq!(snapshot_path("/config/").unwrap(), PathBuf::from("/config"));
        for bad in ["data", "/", "/etc", "/a/../b", "/tmp/x"] {
            assert!(snapshot_path(bad).is_err(), "{bad}");
        }
    }
}
