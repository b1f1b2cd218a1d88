//! Where the pinned binaries live. The install script (e2e/scripts/install-tools.sh) builds them
//! into a cache outside the repository; on a warm cache it only prints the directory.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use anyhow::{Context, Result, bail};

/// The directory holding kube-apiserver, etcd, kubectl, helm, restic and the S3 server.
pub fn bin_dir() -> Result<&'static Path> {
    static DIR: OnceLock<std::result::Result<PathBuf, String>> = OnceLock::new();
    DIR.get_or_init(|| install().map_err(|e| format!("{e:#}")))
        .as_deref()
        .map_err(|e| anyhow::anyhow!("{e}"))
}

fn install() -> Result<PathBuf> {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/install-tools.sh");
    let out = Command::new("bash")
        .arg(&script)
        .stderr(std::process::Stdio::inherit())
        .output()
        .with_context(|| format!("run {}", script.display()))?;
    if !out.status.success() {
        bail!(
            "{} failed ({}); the tests need its tools",
            script.display(),
            out.status
        );
    }
    let dir = String::from_utf8(out.stdout)?
        .lines()
        .last()
        .unwrap_or_default()
        .trim()
        .to_string();
    Ok(PathBuf::from(dir))
}

/// The path of one pinned binary, e.g. `tool("restic")`.
pub fn tool(name: &str) -> Result<PathBuf> {
    let path = bin_dir()?.join(name);
    if !path.exists() {
        bail!("{} is missing; run e2e/scripts/install-tools.sh", path.display());
    }
    Ok(path)
}
