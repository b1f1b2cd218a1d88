//! `devenv`: the local environment for people, not tests. Starts the same real control plane and
//! S3 server the tests use, installs the CRDs, applies the samples, shows `kubectl get restic`,
//! and keeps everything running until Ctrl-C (or exits at once with `--exit`).

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};
use restic_operator_e2e::controlplane::ControlPlane;
use restic_operator_e2e::s3::S3Server;
use restic_operator_e2e::tools::tool;

const USAGE: &str = "usage: devenv up [--dir DIR] [--exit]";

fn main() -> Result<()> {
    let mut args = std::env::args().skip(1);
    if args.next().as_deref() != Some("up") {
        bail!(USAGE);
    }
    let mut dir = default_dir();
    let mut exit = false;
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--dir" => dir = PathBuf::from(args.next().context(USAGE)?),
            "--exit" => exit = true,
            _ => bail!(USAGE),
        }
    }
    let repo_root = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .context("repository root")?
        .to_path_buf();

    // A fresh environment every time: state from an earlier run would only confuse.
    if dir.exists() {
        std::fs::remove_dir_all(&dir).with_context(|| format!("remove old state in {}", dir.display()))?;
    }
    std::fs::create_dir_all(&dir)?;
    println!(
        "==> starting the S3 server and the Kubernetes control plane in {}",
        dir.display()
    );
    let s3 = S3Server::start(&dir)?;
    let plane = ControlPlane::start(&dir.join("control-plane"))?;
    let kubeconfig = dir.join("kubeconfig");
    std::fs::copy(&plane.admin_kubeconfig, &kubeconfig)?;
    let kubectl = |args: &[&str]| -> Result<()> {
        let status = Command::new(tool("kubectl")?)
            .arg("--kubeconfig")
            .arg(&kubeconfig)
            .args(args)
            .status()?;
        if !status.success() {
            bail!("kubectl {} failed", args.join(" "));
        }
        Ok(())
    };

    println!("==> installing the CRDs from crds/");
    let crds = repo_root.join("crds").display().to_string();
    kubectl(&["apply", "--server-side", "-f", &crds])?;
    kubectl(&[
        "wait",
        "--for",
        "condition=Established",
        "--timeout",
        "60s",
        "-f",
        &crds,
    ])?;

    println!("==> applying the specification's sample resources from samples/spec/");
    for ns in ["backup-system", "media"] {
        kubectl(&["create", "namespace", ns])?;
    }
    kubectl(&[
        "apply",
        "--server-side",
        "-f",
        &repo_root.join("samples/spec").display().to_string(),
    ])?;
    kubectl(&["get", "restic", "--all-namespaces"])?;

    println!(
        "\nS3 server: {} (access key {})",
        s3.endpoint.url, s3.endpoint.access_key
    );
    println!(
        "Use the cluster from another shell:\n  export KUBECONFIG={}",
        kubeconfig.display()
    );
    println!("  kubectl get restic -A; kubectl explain resticbackup.spec");
    if exit {
        return Ok(());
    }
    println!("\nRunning; press Ctrl-C to stop everything.");
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?
        .block_on(tokio::signal::ctrl_c())?;
    println!("stopping");
    drop(plane);
    drop(s3);
    Ok(())
}

fn default_dir() -> PathBuf {
    let cache = std::env::var_os("RESTIC_OPERATOR_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            std::env::var_os("XDG_CACHE_HOME")
                .map(PathBuf::from)
                .unwrap_or_else(|| PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(".cache"))
                .join("restic-operator")
        });
    cache.join("devenv")
}
