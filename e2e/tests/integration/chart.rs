//! The Helm chart (`charts/restic-operator`) and the Kustomize path (`deploy/kustomize`), rendered
//! with the pinned helm and kubectl; no cluster needed. The chart must lint strictly, render the
//! same bytes every time (no hooks, no `lookup`, nothing random, so GitOps tools see no drift),
//! ship the generated CRDs and exactly the RBAC of `coordinator/rbac/`, refuse misspelt values,
//! and wire the coordinator to the agents it deploys.

use restic_operator_e2e::output_text as text;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use anyhow::{Context, Result, bail, ensure};
use k8s_openapi::api::apps::v1::{DaemonSet, Deployment};
use k8s_openapi::api::core::v1::Container;
// serde itself is no dependency of this crate; k8s-openapi re-exports it.
use k8s_openapi::serde::Deserialize;
use restic_operator_e2e::tools::tool;
use serde_yaml::Value;

const RELEASE: &str = "restic-operator";
const NAMESPACE: &str = "backup-system";
/// Every optional template switched on.
const EVERY_OPTION: &[&str] = &[
    "--set",
    "networkPolicy.enabled=true",
    "--set",
    "ciliumNetworkPolicy.enabled=true",
    "--set",
    "metrics.serviceMonitor.enabled=true",
];

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn chart() -> PathBuf {
    repo().join("charts/restic-operator")
}

/// The Kubernetes version to render for: the pinned one. `helm template` cannot ask a cluster,
/// and the pinned helm's built-in default (v1.20.0) is older than the chart's `kubeVersion`.
fn kube_version() -> Result<String> {
    let versions = std::fs::read_to_string(repo().join("e2e/versions.env"))?;
    versions
        .lines()
        .find_map(|l| l.strip_prefix("K8S_VERSION="))
        .and_then(|v| v.split_whitespace().next())
        .map(str::to_owned)
        .context("no K8S_VERSION in e2e/versions.env")
}

fn helm(args: &[&str]) -> Result<Output> {
    Command::new(tool("helm")?)
        .args(args)
        .output()
        .context("run helm")
}

/// `helm template` of the chart as release `release` in `backup-system`; the error carries
/// helm's output.
fn try_template(release: &str, extra: &[&str]) -> Result<std::result::Result<String, String>> {
    let chart = chart();
    let version = kube_version()?;
    let mut args = vec![
        "template",
        release,
        chart.to_str().context("chart path")?,
        "--namespace",
        NAMESPACE,
        "--kube-version",
        &version,
    ];
    args.extend_from_slice(extra);
    let out = helm(&args)?;
    Ok(if out.status.success() {
        Ok(String::from_utf8(out.stdout)?)
    } else {
        Err(text(&out))
    })
}

fn template(extra: &[&str]) -> Result<String> {
    try_template(RELEASE, extra)?.map_err(|e| anyhow::anyhow!("helm template {extra:?} failed:\n{e}"))
}

/// The objects of a multi-document YAML stream (empty documents left out).
fn documents(yaml: &str) -> Result<Vec<Value>> {
    let mut docs = Vec::new();
    for doc in serde_yaml::Deserializer::from_str(yaml) {
        let value = Value::deserialize(doc)?;
        if !value.is_null() {
            docs.push(value);
        }
    }
    Ok(docs)
}

fn find<'a>(docs: &'a [Value], kind: &str, name: &str) -> Result<&'a Value> {
    docs.iter()
        .find(|d| d["kind"].as_str() == Some(kind) && d["metadata"]["name"].as_str() == Some(name))
        .with_context(|| {
            let present: Vec<String> = docs
                .iter()
                .map(|d| format!("{:?}/{:?}", d["kind"].as_str(), d["metadata"]["name"].as_str()))
                .collect();
            format!("no {kind} {name} in the rendered chart; it has {present:?}")
        })
}

fn file_object(relative: &str) -> Result<Value> {
    let path = repo().join(relative);
    let text = std::fs::read_to_string(&path).with_context(|| format!("read {}", path.display()))?;
    Ok(serde_yaml::from_str(&text)?)
}

fn yaml_files(dir: &Path) -> Result<BTreeMap<String, Vec<u8>>> {
    let mut files = BTreeMap::new();
    for entry in std::fs::read_dir(dir).with_context(|| format!("read {}", dir.display()))? {
        let path = entry?.path();
        if path.extension().is_some_and(|e| e == "yaml") {
            let name = path.file_name().unwrap().to_string_lossy().into_owned();
            files.insert(name, std::fs::read(&path)?);
        }
    }
    Ok(files)
}

fn container<'a>(containers: &'a [Container], name: &str) -> Result<&'a Container> {
    containers
        .iter()
        .find(|c| c.name == name)
        .with_context(|| format!("no container {name}"))
}

/// The value of `--flag=value` in `args`.
fn flag<'a>(args: &'a [String], flag: &str) -> Option<&'a str> {
    args.iter().find_map(|a| a.strip_prefix(&format!("{flag}=")))
}

#[test]
fn helm_lint_strict_passes_with_the_defaults_and_with_every_option_on() -> Result<()> {
    let chart = chart();
    for (what, extra) in [("the default values", &[][..]), ("every option on", EVERY_OPTION)] {
        let mut args = vec!["lint", "--strict", chart.to_str().context("chart path")?];
        args.extend_from_slice(extra);
        let out = helm(&args)?;
        ensure!(
            out.status.success(),
            "helm lint --strict with {what} failed:\n{}",
            text(&out)
        );
    }
    Ok(())
}

#[test]
fn helm_template_renders_the_same_bytes_every_time() -> Result<()> {
    let mut extra = EVERY_OPTION.to_vec();
    extra.push("--include-crds");
    let first = template(&extra)?;
    let second = template(&extra)?;
    if first != second {
        let (n, (a, b)) = first
            .lines()
            .zip(second.lines())
            .enumerate()
            .find(|(_, (a, b))| a != b)
            .unwrap_or((0, ("(lengths differ)", "")));
        bail!(
            "two runs of helm template differ (something random, generated or cluster-dependent \
             crept in); first difference at line {}:\n  {a}\n  {b}",
            n + 1
        );
    }
    Ok(())
}

#[test]
fn the_charts_crds_are_the_generated_ones_byte_for_byte() -> Result<()> {
    let generated = yaml_files(&repo().join("crds"))?;
    let shipped = yaml_files(&chart().join("crds"))?;
    let refresh = "regenerate both from the repository root with \
                   `cargo run -p restic-operator-api --bin crdgen`";
    ensure!(
        generated.keys().eq(shipped.keys()),
        "the chart ships CRDs {:?} but crds/ has {:?}; {refresh}",
        shipped.keys().collect::<Vec<_>>(),
        generated.keys().collect::<Vec<_>>()
    );
    let stale: Vec<&String> = generated
        .iter()
        .filter(|(name, bytes)| shipped.get(*name) != Some(*bytes))
        .map(|(name, _)| name)
        .collect();
    ensure!(
        stale.is_empty(),
        "charts/restic-operator/crds/ differs from crds/ in {stale:?}; {refresh}"
    );
    Ok(())
}

#[test]
fn the_rendered_roles_carry_exactly_the_rules_of_coordinator_rbac() -> Result<()> {
    let docs = documents(&template(&[])?)?;
    for (kind, file) in [
        ("ClusterRole", "coordinator/rbac/clusterrole.yaml"),
        ("Role", "coordinator/rbac/role.yaml"),
    ] {
        let expected = file_object(file)?;
        let rendered = find(&docs, kind, "restic-operator-coordinator")?;
        ensure!(
            rendered["rules"] == expected["rules"],
            "the chart's {kind} rules differ from {file}; change both together.\nchart: {}\nfile: {}",
            serde_yaml::to_string(&rendered["rules"])?,
            serde_yaml::to_string(&expected["rules"])?
        );
    }
    // The user-facing roles: same names (for this release name), rules and aggregation labels.
    let aggregated = std::fs::read_to_string(repo().join("coordinator/rbac/aggregated.yaml"))?;
    for expected in documents(&aggregated)? {
        let name = expected["metadata"]["name"]
            .as_str()
            .context("aggregated role without a name")?;
        let rendered = find(&docs, "ClusterRole", name)?;
        ensure!(
            rendered["rules"] == expected["rules"],
            "the chart's {name} rules differ from coordinator/rbac/aggregated.yaml"
        );
        let aggregation = |role: &Value| -> BTreeMap<String, String> {
            role["metadata"]["labels"]
                .as_mapping()
                .into_iter()
                .flatten()
                .filter_map(|(k, v)| Some((k.as_str()?.to_owned(), v.as_str()?.to_owned())))
                .filter(|(k, _)| k.starts_with("rbac.authorization.k8s.io/"))
                .collect()
        };
        ensure!(
            aggregation(rendered) == aggregation(&expected),
            "the chart's {name} aggregates into {:?}, coordinator/rbac/aggregated.yaml into {:?}",
            aggregation(rendered),
            aggregation(&expected)
        );
    }
    // Who may set customSource: the admission policy the integration tests check.
    let policy = std::fs::read_to_string(repo().join("coordinator/rbac/custom-source-policy.yaml"))?;
    for expected in documents(&policy)? {
        let kind = expected["kind"].as_str().unwrap_or_default();
        let name = expected["metadata"]["name"].as_str().unwrap_or_default();
        let rendered = find(&docs, kind, name)?;
        ensure!(
            rendered["spec"] == expected["spec"],
            "the chart's {kind} {name} differs from coordinator/rbac/custom-source-policy.yaml"
        );
    }
    Ok(())
}

#[test]
fn the_values_schema_refuses_a_misspelt_key_and_a_wrong_type() -> Result<()> {
    for (value, expect) in [
        ("replicaCount=2", "replicaCount"),
        ("agent.kubeletroot=/var/lib/k0s/kubelet", "kubeletroot"),
        ("coordinator.replicas=two", "/coordinator/replicas"),
        ("networkPolicy.enabled=yes please", "/networkPolicy/enabled"),
    ] {
        match try_template(RELEASE, &["--set", value])? {
            Ok(_) => bail!("helm template accepted --set {value}; values.schema.json should refuse it"),
            Err(said) => ensure!(
                said.contains("schema") && said.contains(expect),
                "--set {value} failed, but not with a schema error naming {expect:?}:\n{said}"
            ),
        }
    }
    Ok(())
}

#[test]
fn kustomize_renders_the_agent_daemonset_into_backup_system() -> Result<()> {
    let out = Command::new(tool("kubectl")?)
        .args(["kustomize", "--enable-helm", "--helm-command"])
        .arg(tool("helm")?)
        .args(["--helm-kube-version", &kube_version()?])
        .arg(repo().join("deploy/kustomize"))
        .output()?;
    ensure!(
        out.status.success(),
        "kubectl kustomize --enable-helm deploy/kustomize failed:\n{}",
        text(&out)
    );
    let docs = documents(&String::from_utf8(out.stdout)?)?;
    let agent = find(&docs, "DaemonSet", "restic-operator-agent")?;
    ensure!(
        agent["metadata"]["namespace"].as_str() == Some(NAMESPACE),
        "the agent DaemonSet is in namespace {:?}, not {NAMESPACE}",
        agent["metadata"]["namespace"]
    );
    let namespace = find(&docs, "Namespace", NAMESPACE)?;
    ensure!(
        namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce"].as_str() == Some("privileged"),
        "namespace {NAMESPACE} must allow the agents (Pod Security level privileged)"
    );
    let crds = docs
        .iter()
        .filter(|d| d["kind"].as_str() == Some("CustomResourceDefinition"))
        .count();
    ensure!(
        crds == 4,
        "the Kustomize output has {crds} CRDs, not the chart's 4 (includeCRDs)"
    );
    Ok(())
}

#[test]
fn no_rendered_manifest_carries_a_helm_hook() -> Result<()> {
    let mut extra = EVERY_OPTION.to_vec();
    extra.push("--include-crds");
    let hooked: Vec<String> = documents(&template(&extra)?)?
        .iter()
        .filter(|d| {
            d["metadata"]["annotations"].as_mapping().is_some_and(|a| {
                a.keys()
                    .any(|k| k.as_str().is_some_and(|k| k.starts_with("helm.sh/hook")))
            })
        })
        .map(|d| format!("{:?} {:?}", d["kind"].as_str(), d["metadata"]["name"].as_str()))
        .collect();
    ensure!(
        hooked.is_empty(),
        "{hooked:?} carry helm.sh/hook annotations; Argo CD and Kustomize mishandle hooks"
    );
    Ok(())
}

/// The coordinator is told the names of the agents' Secret, the CA Secret and its Lease, and
/// the agents' labels, by the same values that name and label what the chart creates, so
/// renaming them or installing under another release keeps the two sides together.
#[test]
fn the_coordinator_finds_and_trusts_the_agents_the_chart_runs() -> Result<()> {
    let rendered = try_template(
        "backups",
        &[
            "--set",
            "tls.caSecretName=custom-ca",
            "--set",
            "tls.agentSecretName=custom-agent-tls",
            "--set",
            "leaderElection.leaseName=custom-lease",
        ],
    )?
    .map_err(|e| anyhow::anyhow!("helm template failed:\n{e}"))?;
    let docs = documents(&rendered)?;
    let deployment: Deployment =
        serde_yaml::from_value(find(&docs, "Deployment", "backups-restic-operator-coordinator")?.clone())?;
    let daemonset: DaemonSet =
        serde_yaml::from_value(find(&docs, "DaemonSet", "backups-restic-operator-agent")?.clone())?;
    let coordinator_pod = deployment
        .spec
        .context("Deployment spec")?
        .template
        .spec
        .context("pod spec")?;
    let agent_template = daemonset.spec.context("DaemonSet spec")?.template;
    let agent_pod = agent_template.spec.context("pod spec")?;
    let coordinator = container(&coordinator_pod.containers, "coordinator")?;
    let agent = container(&agent_pod.containers, "agent")?;
    let args = coordinator.args.clone().unwrap_or_default();

    ensure!(
        coordinator.command.as_deref() == Some(&["/usr/local/bin/restic-coordinator".to_owned()][..]),
        "coordinator command: {:?}",
        coordinator.command
    );
    ensure!(
        flag(&args, "--ca-secret") == Some("custom-ca")
            && flag(&args, "--agent-tls-secret") == Some("custom-agent-tls")
            && flag(&args, "--lease-name") == Some("custom-lease"),
        "the coordinator is not told the values' Secret and Lease names: {args:?}"
    );
    let mounted = agent_pod
        .volumes
        .iter()
        .flatten()
        .find(|v| v.name == "tls")
        .and_then(|v| v.secret.as_ref())
        .and_then(|s| s.secret_name.as_deref());
    ensure!(
        mounted == Some("custom-agent-tls"),
        "the agents mount {mounted:?}, the coordinator writes custom-agent-tls"
    );
    let role = find(&docs, "Role", "backups-restic-operator-coordinator")?;
    let names: Vec<&str> = role["rules"]
        .as_sequence()
        .into_iter()
        .flatten()
        .flat_map(|r| r["resourceNames"].as_sequence().into_iter().flatten())
        .filter_map(Value::as_str)
        .collect();
    ensure!(
        names == ["custom-ca", "custom-agent-tls", "custom-lease"],
        "the Role's resourceNames {names:?} do not follow the values"
    );

    // --agent-selector picks exactly this release's agent pods.
    let selector = flag(&args, "--agent-selector").context("no --agent-selector")?;
    let labels = agent_template.metadata.and_then(|m| m.labels).unwrap_or_default();
    for pair in selector.split(',') {
        let (key, value) = pair
            .split_once('=')
            .with_context(|| format!("selector term {pair}"))?;
        ensure!(
            labels.get(key).map(String::as_str) == Some(value),
            "--agent-selector wants {key}={value}, the agent pods carry {labels:?}"
        );
    }
    ensure!(
        selector.contains("app.kubernetes.io/instance=backups")
            && selector.contains("app.kubernetes.io/component=agent"),
        "--agent-selector {selector} does not single out this release's agents"
    );

    // The agents serve gRPC on the port the coordinator dials, with the files the Secret holds.
    let agent_args = agent.args.clone().unwrap_or_default();
    ensure!(
        agent.command.as_deref() == Some(&["/usr/local/bin/restic-agent".to_owned()][..])
            && agent_args.first().map(String::as_str) == Some("serve")
            && flag(&agent_args, "--restic") == Some("/usr/local/bin/restic"),
        "the agent must start as `/usr/local/bin/restic-agent serve --restic=/usr/local/bin/restic`: {:?} {agent_args:?}",
        agent.command
    );
    let grpc = agent
        .ports
        .iter()
        .flatten()
        .find(|p| p.name.as_deref() == Some("grpc"))
        .map(|p| p.container_port);
    ensure!(
        grpc == Some(9443) && flag(&agent_args, "--listen") == Some("0.0.0.0:9443"),
        "the agent's port named grpc is {grpc:?}, its --listen {:?}",
        flag(&agent_args, "--listen")
    );
    ensure!(
        agent_pod.automount_service_account_token == Some(false),
        "the agent never talks to the API server; its pod must not mount a token"
    );
    Ok(())
}

/// Every value in values.yaml has a row in the chart's README table (maps are followed down,
/// except the ones given whole: security contexts and resources).
#[test]
fn every_value_has_a_row_in_the_chart_readme() -> Result<()> {
    fn keys(prefix: &str, value: &Value, out: &mut Vec<String>) {
        let whole = ["securityContext", "podSecurityContext", "resources"];
        match value.as_mapping() {
            Some(map) if !map.is_empty() && !whole.iter().any(|w| prefix.ends_with(w)) => {
                for (k, v) in map {
                    let k = k.as_str().unwrap_or_default();
                    let path = if prefix.is_empty() {
                        k.to_owned()
                    } else {
                        format!("{prefix}.{k}")
                    };
                    keys(&path, v, out);
                }
            }
            _ => out.push(prefix.to_owned()),
        }
    }
    let values = file_object("charts/restic-operator/values.yaml")?;
    let readme = std::fs::read_to_string(chart().join("README.md"))?;
    let mut all = Vec::new();
    keys("", &values, &mut all);
    let missing: Vec<&String> = all
        .iter()
        .filter(|k| !readme.contains(&format!("| `{k}` |")))
        .collect();
    ensure!(
        missing.is_empty(),
        "charts/restic-operator/README.md has no row for {missing:?}"
    );
    Ok(())
}

/// The Vagrantfile users start a k3s VM with (one or two nodes) is valid, as Vagrant reads it.
#[test]
fn the_vagrantfile_validates_with_one_and_two_nodes() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    for nodes in ["1", "2"] {
        let home = tempfile::tempdir().unwrap();
        let out = std::process::Command::new("vagrant")
            .arg("validate")
            .current_dir(root)
            .env("RESTIC_OPERATOR_NODES", nodes)
            .env("VAGRANT_HOME", home.path())
            .env("VAGRANT_DOTFILE_PATH", home.path().join("dot"))
            .output()
            .expect("run vagrant (e2e/scripts/install-deps.sh installs Debian's vagrant)");
        let text = String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
        assert!(
            out.status.success() && text.contains("validated successfully"),
            "{nodes} node(s): {text}"
        );
    }
}
