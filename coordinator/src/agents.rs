//! The node agents: found by watching the agent pods (one per node, by label) and dialed
//! with mutual TLS. Channels are cached per address and made lazily, so a dead agent costs
//! a failed call, not a stuck reconcile.

use std::collections::HashMap;
use std::sync::{Mutex, RwLock};
use std::time::Duration;

use k8s_openapi::api::core::v1::Pod;
use kube::ResourceExt;
use kube::runtime::reflector::Store;
use restic_operator_proto::MAX_MESSAGE_SIZE;
use restic_operator_proto::v1::agent_client::AgentClient;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

use crate::error::Class;
use crate::pki::Pki;

/// Why no agent (or no client for one) is at hand.
#[derive(Debug, thiserror::Error)]
pub enum AgentsError {
    #[error("no ready restic agent on node {node}")]
    NoAgentOnNode { node: String },
    /// [`Agents::wait_on_node`] waited `secs` seconds for an agent on `node`, in vain.
    #[error("no ready restic agent on node {node} (waited {secs}s)")]
    Waited { node: String, secs: u64 },
    #[error("no ready restic agent in the cluster")]
    NoneReady,
    #[error("agent address {address}: {source}")]
    Address {
        address: String,
        source: tonic::transport::Error,
    },
    /// The client TLS configuration (the operator's certificates) was refused.
    #[error("agent TLS: {0}")]
    Tls(#[source] tonic::transport::Error),
}

impl AgentsError {
    /// Whether trying again without a change can help: an agent pod comes back (rollouts,
    /// restarts), a malformed address or TLS configuration does not.
    pub fn class(&self) -> Class {
        match self {
            AgentsError::NoAgentOnNode { .. } | AgentsError::Waited { .. } | AgentsError::NoneReady => {
                Class::Temporary
            }
            AgentsError::Address { .. } | AgentsError::Tls(_) => Class::Permanent,
        }
    }
}

/// Where one agent is reached.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AgentEndpoint {
    pub node: String,
    pub pod: String,
    pub namespace: String,
    pub address: String,
}

pub struct Agents {
    store: Store<Pod>,
    default_port: u16,
    server_name: String,
    tls: RwLock<ClientTlsConfig>,
    channels: Mutex<HashMap<String, Channel>>,
}

/// Whether a pod can take runs: running, with an IP, ready, not terminating.
pub fn pod_is_serving(pod: &Pod) -> bool {
    let Some(status) = &pod.status else { return false };
    pod.metadata.deletion_timestamp.is_none()
        && status.phase.as_deref() == Some("Running")
        && status.pod_ip.as_deref().is_some_and(|ip| !ip.is_empty())
        && status
            .conditions
            .iter()
            .flatten()
            .any(|c| c.type_ == "Ready" && c.status == "True")
}

/// The gRPC port of a pod: its container port named `grpc`, else `default`.
pub fn grpc_port(pod: &Pod, default: u16) -> u16 {
    pod.spec
        .iter()
        .flat_map(|s| &s.containers)
        .flat_map(|c| c.ports.iter().flatten())
        .find(|p| p.name.as_deref() == Some("grpc"))
        .and_then(|p| u16::try_from(p.container_port).ok())
        .unwrap_or(default)
}

/// `https://ip:port`, with IPv6 addresses bracketed.
pub fn address(ip: &str, port: u16) -> String {
    if ip.contains(':') {
        format!("https://[{ip}]:{port}")
    } else {
        format!("https://{ip}:{port}")
    }
}

fn endpoint_of(pod: &Pod, default_port: u16) -> Option<AgentEndpoint> {
    let node = pod.spec.as_ref()?.node_name.clone()?;
    let ip = pod.status.as_ref()?.pod_ip.clone()?;
    Some(AgentEndpoint {
        node,
        pod: pod.name_any(),
        namespace: pod.namespace().unwrap_or_default(),
        address: address(&ip, grpc_port(pod, default_port)),
    })
}

fn tls_config(pki: &Pki, server_name: &str) -> ClientTlsConfig {
    ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(&pki.ca.cert))
        .identity(Identity::from_pem(&pki.client.cert, &pki.client.key))
        .domain_name(server_name)
}

impl Agents {
    pub fn new(store: Store<Pod>, pki: &Pki, default_port: u16, server_name: &str) -> Self {
        Self {
            store,
            default_port,
            server_name: server_name.into(),
            tls: RwLock::new(tls_config(pki, server_name)),
            channels: Mutex::new(HashMap::new()),
        }
    }

    /// Switches to new client credentials (after certificate renewal).
    pub fn set_pki(&self, pki: &Pki) {
        *self.tls.write().expect("tls lock") = tls_config(pki, &self.server_name);
        self.channels.lock().expect("channel lock").clear();
    }

    fn serving(&self) -> Vec<AgentEndpoint> {
        let mut all: Vec<AgentEndpoint> = self
            .store
            .state()
            .iter()
            .filter(|p| pod_is_serving(p))
            .filter_map(|p| endpoint_of(p, self.default_port))
            .collect();
        all.sort_by(|a, b| (&a.node, &a.pod).cmp(&(&b.node, &b.pod)));
        all
    }

    /// Number of agents that can take runs.
    pub fn count(&self) -> usize {
        self.serving().len()
    }

    /// The agent of `node`.
    pub fn on_node(&self, node: &str) -> Result<AgentEndpoint, AgentsError> {
        self.serving()
            .into_iter()
            .find(|a| a.node == node)
            .ok_or_else(|| AgentsError::NoAgentOnNode { node: node.into() })
    }

    /// The agent of `node`, waiting up to `timeout` for one to serve there: an agent pod being
    /// replaced (a rollout, a restart, a deleted pod) is back within seconds, and a run should
    /// not fail for that.
    pub async fn wait_on_node(
        &self,
        node: &str,
        timeout: std::time::Duration,
    ) -> Result<AgentEndpoint, AgentsError> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            match self.on_node(node) {
                Ok(agent) => return Ok(agent),
                Err(_) if tokio::time::Instant::now() >= deadline => {
                    return Err(AgentsError::Waited {
                        node: node.into(),
                        secs: timeout.as_secs(),
                    });
                }
                Err(_) => tokio::time::sleep(std::time::Duration::from_millis(500)).await,
            }
        }
    }

    /// An agent for repository-wide work (init, stats, check, forget): the first by node
    /// name, so the choice is stable.
    pub fn any(&self) -> Result<AgentEndpoint, AgentsError> {
        self.serving().into_iter().next().ok_or(AgentsError::NoneReady)
    }

    /// A client for the agent at `address`. Channels are kept per address, and those of
    /// agents that no longer serve are dropped whenever a new one is made, so agent pods that
    /// come and go (rollouts, node churn) do not pile up connections.
    pub fn client(&self, address: &str) -> Result<AgentClient<Channel>, AgentsError> {
        if let Some(ch) = self.channels.lock().expect("channel lock").get(address) {
            return Ok(AgentClient::new(ch.clone()).max_decoding_message_size(MAX_MESSAGE_SIZE));
        }
        let tls = self.tls.read().expect("tls lock").clone();
        let channel = Endpoint::from_shared(address.to_owned())
            .map_err(|source| AgentsError::Address {
                address: address.to_owned(),
                source,
            })?
            .tls_config(tls)
            .map_err(AgentsError::Tls)?
            .connect_timeout(Duration::from_secs(5))
            // A frozen or cut-off agent answers no ping: its runs' streams break after about
            // 20 s, and their runs are reported as out of contact and attached to again.
            .http2_keep_alive_interval(Duration::from_secs(10))
            .keep_alive_timeout(Duration::from_secs(10))
            .keep_alive_while_idle(true)
            .connect_lazy();
        let serving: Vec<String> = self.serving().into_iter().map(|a| a.address).collect();
        let mut channels = self.channels.lock().expect("channel lock");
        channels.retain(|known, _| serving.contains(known));
        channels.insert(address.to_owned(), channel.clone());
        Ok(AgentClient::new(channel).max_decoding_message_size(MAX_MESSAGE_SIZE))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(yaml: &str) -> Pod {
        serde_yaml::from_str(yaml).unwrap()
    }

    #[test]
    fn only_running_ready_pods_with_an_ip_serve() {
        let ready = pod(
            "metadata: {name: a}\nspec: {nodeName: n1, containers: [{name: agent, ports: [{name: grpc, containerPort: 7000}]}]}\n\
             status: {phase: Running, podIP: 10.0.0.5, conditions: [{type: Ready, status: 'True'}]}",
        );
        assert!(pod_is_serving(&ready));
        assert_eq!(grpc_port(&ready, 9443), 7000);
        assert_eq!(
            endpoint_of(&ready, 9443).unwrap().address,
            "https://10.0.0.5:7000"
        );
        let pending =
            pod("metadata: {name: a}\nspec: {nodeName: n1, containers: []}\nstatus: {phase: Pending}");
        assert!(!pod_is_serving(&pending));
        let not_ready = pod(
            "metadata: {name: a}\nspec: {containers: []}\nstatus: {phase: Running, podIP: 10.0.0.5, conditions: [{type: Ready, status: 'False'}]}",
        );
        assert!(!pod_is_serving(&not_ready));
        assert_eq!(address("fd00::1", 9443), "https://[fd00::1]:9443");
    }

    fn test_pki() -> Pki {
        let ca = crate::pki::new_ca(Duration::from_secs(3600)).unwrap();
        let client =
            crate::pki::issue(&ca, crate::pki::CLIENT_NAME, false, Duration::from_secs(3600)).unwrap();
        Pki {
            ca,
            client,
            client_not_after: 0,
        }
    }

    #[tokio::test]
    async fn a_missing_agent_is_temporary_and_says_where() {
        let (store, _writer) = kube::runtime::reflector::store::<Pod>();
        let pki = test_pki();
        let agents = Agents::new(store, &pki, 9443, "restic-agent");
        let e = agents.on_node("n1").unwrap_err();
        assert_eq!(e.to_string(), "no ready restic agent on node n1");
        assert_eq!(e.class(), Class::Temporary);
        let e = agents.any().unwrap_err();
        assert_eq!(e.to_string(), "no ready restic agent in the cluster");
        let e = agents.wait_on_node("n1", Duration::ZERO).await.unwrap_err();
        assert_eq!(e.to_string(), "no ready restic agent on node n1 (waited 0s)");
        assert_eq!(e.class(), Class::Temporary);
        let e = agents.client("not a uri").unwrap_err();
        assert!(matches!(e, AgentsError::Address { .. }), "{e:?}");
        assert!(e.to_string().starts_with("agent address not a uri: "), "{e}");
        assert_eq!(e.class(), Class::Permanent);
    }

    #[tokio::test]
    async fn channels_of_agents_that_are_gone_are_dropped() {
        use kube::runtime::watcher::Event;
        let (store, mut writer) = kube::runtime::reflector::store::<Pod>();
        let agent = |name: &str, ip: &str| {
            pod(&format!(
                "metadata: {{name: {name}, namespace: ops}}\nspec: {{nodeName: {name}, containers: []}}\n\
                 status: {{phase: Running, podIP: {ip}, conditions: [{{type: Ready, status: 'True'}}]}}"
            ))
        };
        let (a, b) = (agent("a", "10.0.0.1"), agent("b", "10.0.0.2"));
        writer.apply_watcher_event(&Event::Apply(a.clone()));
        writer.apply_watcher_event(&Event::Apply(b.clone()));
        let pki = test_pki();
        let agents = Agents::new(store, &pki, 9443, "restic-agent");
        let known = |agents: &Agents| {
            let mut k: Vec<String> = agents.channels.lock().unwrap().keys().cloned().collect();
            k.sort();
            k
        };
        agents.client("https://10.0.0.1:9443").unwrap();
        agents.client("https://10.0.0.2:9443").unwrap();
        assert_eq!(known(&agents), ["https://10.0.0.1:9443", "https://10.0.0.2:9443"]);
        // Agent a's pod goes; the next new channel drops its channel.
        writer.apply_watcher_event(&Event::Delete(a));
        let c = agent("c", "10.0.0.3");
        writer.apply_watcher_event(&Event::Apply(c));
        agents.client("https://10.0.0.3:9443").unwrap();
        assert_eq!(known(&agents), ["https://10.0.0.2:9443", "https://10.0.0.3:9443"]);
    }
}
