//! Reaching a node's agent from a kubeconfig alone, for `restic-agent debug --node NODE`:
//! the node's agent pod is found by its labels, a short-lived client certificate is asked of
//! the coordinator through a CertificateSigningRequest (signer `resticbackup.io/agent-debug`;
//! it signs only for callers who may port-forward to the agent pods, and records who in an
//! event), and the agent's gRPC port is forwarded through the API server to a loopback port
//! of this process. The private key never leaves this process.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use k8s_openapi::api::certificates::v1::{CertificateSigningRequest, CertificateSigningRequestSpec};
use k8s_openapi::api::core::v1::Pod;
use kube::api::{ListParams, ObjectMeta, PostParams};
use kube::{Api, Client, Config};
use restic_operator_proto::DEBUG_SIGNER;

/// How long to wait for the coordinator to answer a certificate request.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(30);

/// A node's agent, reachable at `addr` with `identity` (PEM certificate and key) and `ca`.
pub struct Reached {
    pub addr: String,
    pub ca: String,
    pub cert: String,
    pub key: String,
    pub pod: String,
}

pub struct Target<'a> {
    pub node: &'a str,
    pub namespace: &'a str,
    pub selector: &'a str,
    pub kubeconfig: Option<&'a PathBuf>,
    pub ttl: Duration,
}

/// Finds the agent of `target.node`, gets a debug certificate and forwards its gRPC port.
pub async fn reach(target: &Target<'_>) -> Result<Reached> {
    let client = client(target.kubeconfig).await?;
    let (pod, port) = agent_pod(&client, target).await?;
    let DebugIdentity { cert, ca, key } = certificate(&client, target.ttl).await?;
    let addr = forward(&client, target.namespace, &pod, port).await?;
    Ok(Reached {
        addr,
        ca,
        cert,
        key,
        pod,
    })
}

async fn client(kubeconfig: Option<&PathBuf>) -> Result<Client> {
    let config = match kubeconfig {
        Some(path) => {
            let kc = kube::config::Kubeconfig::read_from(path)
                .with_context(|| format!("read kubeconfig {}", path.display()))?;
            Config::from_custom_kubeconfig(kc, &kube::config::KubeConfigOptions::default()).await?
        }
        None => Config::infer()
            .await
            .context("no kubeconfig: set KUBECONFIG or pass --kubeconfig")?,
    };
    Ok(Client::try_from(config)?)
}

/// The running agent pod on the node, and its gRPC port (the container port named `grpc`).
async fn agent_pod(client: &Client, target: &Target<'_>) -> Result<(String, u16)> {
    let pods: Api<Pod> = Api::namespaced(client.clone(), target.namespace);
    let all = pods
        .list(&ListParams::default().labels(target.selector))
        .await
        .with_context(|| format!("list the agent pods in namespace {}", target.namespace))?;
    let on_node = all
        .items
        .iter()
        .filter(|p| p.spec.as_ref().and_then(|s| s.node_name.as_deref()) == Some(target.node))
        .find(|p| p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running"));
    let Some(pod) = on_node else {
        let mut nodes: Vec<&str> = all
            .items
            .iter()
            .filter_map(|p| p.spec.as_ref().and_then(|s| s.node_name.as_deref()))
            .collect();
        nodes.sort_unstable();
        bail!(
            "no running agent on node {} (pods labelled {} in namespace {}); agents run on: {}",
            target.node,
            target.selector,
            target.namespace,
            if nodes.is_empty() {
                "no node".to_owned()
            } else {
                nodes.join(", ")
            }
        );
    };
    let port = pod
        .spec
        .as_ref()
        .into_iter()
        .flat_map(|s| &s.containers)
        .flat_map(|c| c.ports.iter().flatten())
        .find(|p| p.name.as_deref() == Some("grpc"))
        .and_then(|p| u16::try_from(p.container_port).ok())
        .unwrap_or(9443);
    Ok((pod.metadata.name.clone().unwrap_or_default(), port))
}

/// A client identity for the debug session, in PEM.
struct DebugIdentity {
    cert: String,
    /// The CA that signed `cert`, which also signs the agents' certificates.
    ca: String,
    key: String,
}

/// A key made here, its certificate signed by the coordinator.
async fn certificate(client: &Client, ttl: Duration) -> Result<DebugIdentity> {
    let key = rcgen::KeyPair::generate()?;
    let mut params = rcgen::CertificateParams::new(Vec::new())?;
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "restic-agent-debug");
    let request = params.serialize_request(&key)?.pem()?;
    let csrs: Api<CertificateSigningRequest> = Api::all(client.clone());
    let csr = CertificateSigningRequest {
        metadata: ObjectMeta {
            generate_name: Some("restic-agent-debug-".into()),
            ..Default::default()
        },
        spec: CertificateSigningRequestSpec {
            request: k8s_openapi::ByteString(request.into_bytes()),
            signer_name: DEBUG_SIGNER.into(),
            usages: Some(vec!["digital signature".into(), "client auth".into()]),
            expiration_seconds: i32::try_from(ttl.as_secs()).ok(),
            ..Default::default()
        },
        status: None,
    };
    let created = csrs.create(&PostParams::default(), &csr).await.context(
        "create a CertificateSigningRequest (your kubeconfig needs `create` on certificatesigningrequests)",
    )?;
    let name = created.metadata.name.clone().unwrap_or_default();
    let deadline = tokio::time::Instant::now() + ANSWER_TIMEOUT;
    loop {
        let csr = csrs.get(&name).await?;
        let status = csr.status.unwrap_or_default();
        if let Some(denied) = status
            .conditions
            .iter()
            .flatten()
            .find(|c| matches!(c.type_.as_str(), "Denied" | "Failed"))
        {
            bail!(
                "the coordinator refused a debug certificate ({}): {}",
                denied.reason.clone().unwrap_or_default(),
                denied.message.clone().unwrap_or_default()
            );
        }
        if let Some(pem) = status.certificate {
            let pem = String::from_utf8(pem.0).context("the certificate is not PEM")?;
            let (cert, ca) = split_first(&pem).context("the issued bundle lacks the CA")?;
            let key = key.serialize_pem();
            return Ok(DebugIdentity { cert, ca, key });
        }
        if tokio::time::Instant::now() > deadline {
            bail!(
                "no answer to CertificateSigningRequest {name} in {}s: is the coordinator running? \
                 (it signs requests for {DEBUG_SIGNER})",
                ANSWER_TIMEOUT.as_secs()
            );
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

/// The first PEM certificate of a bundle, and the rest.
fn split_first(bundle: &str) -> Option<(String, String)> {
    const END: &str = "-----END CERTIFICATE-----";
    let at = bundle.find(END)? + END.len();
    let (first, rest) = bundle.split_at(at);
    let rest = rest.trim_start();
    (!rest.is_empty()).then(|| (format!("{first}\n"), rest.to_owned()))
}

/// Forwards a loopback port of this process to `port` of the pod, one port-forward stream per
/// connection, as `kubectl port-forward` does. Returns the local address.
async fn forward(client: &Client, namespace: &str, pod: &str, port: u16) -> Result<String> {
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", 0)).await?;
    let local = listener.local_addr()?;
    let pods: Api<Pod> = Api::namespaced(client.clone(), namespace);
    let pod = pod.to_owned();
    tokio::spawn(async move {
        while let Ok((mut conn, _)) = listener.accept().await {
            let pods = pods.clone();
            let pod = pod.clone();
            tokio::spawn(async move {
                let mut forwarder = match pods.portforward(&pod, &[port]).await {
                    Ok(f) => f,
                    Err(e) => {
                        eprintln!(
                            "port-forward to {pod}: {e} (your kubeconfig needs `create` on pods/portforward)"
                        );
                        return;
                    }
                };
                if let Some(mut upstream) = forwarder.take_stream(port) {
                    let _ = tokio::io::copy_bidirectional(&mut conn, &mut upstream).await;
                }
                drop(forwarder);
            });
        }
    });
    Ok(format!("https://{local}"))
}

#[cfg(test)]
mod tests {
    use super::split_first;

    #[test]
    fn a_bundle_splits_into_the_certificate_and_the_ca() {
        let a = "-----BEGIN CERTIFICATE-----\nAAA\n-----END CERTIFICATE-----\n";
        let b = "-----BEGIN CERTIFICATE-----\nBBB\n-----END CERTIFICATE-----\n";
        let (first, rest) = split_first(&format!("{a}{b}")).unwrap();
        assert_eq!(first, a);
        assert_eq!(rest, b);
        assert!(split_first(a).is_none(), "a bundle without the CA");
    }
}
