//! The operator's own PKI for agent gRPC: a CA, the agents' serving certificate (in a Secret
//! the agent DaemonSet mounts) and the coordinator's client certificate (kept in memory).
//! Created at start-up when missing, not by Helm templates, so GitOps tools see no drift;
//! renewed before expiry.

use std::collections::BTreeMap;
use std::time::Duration;

use chrono::{Datelike, Utc};
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use kube::api::{ObjectMeta, PostParams};
use kube::{Api, Client};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};

pub const CA_CERT: &str = "ca.crt";
pub const CA_KEY: &str = "ca.key";
pub const TLS_CERT: &str = "tls.crt";
pub const TLS_KEY: &str = "tls.key";
/// Common name of the coordinator's client certificate.
pub const CLIENT_NAME: &str = restic_operator_proto::OPERATOR_CLIENT_NAME;

#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error("certificate: {0}")]
    Cert(#[from] rcgen::Error),
    #[error("Secret {0}: {1}")]
    Malformed(String, String),
}

/// A certificate and its key, PEM encoded.
#[derive(Clone, Debug)]
pub struct Pem {
    pub cert: String,
    pub key: String,
}

/// The CA and the coordinator's client identity.
#[derive(Clone, Debug)]
pub struct Pki {
    pub ca: Pem,
    pub client: Pem,
    /// When the client certificate expires (Unix seconds).
    pub client_not_after: i64,
}

/// Sets a certificate's validity: from yesterday (clock skew) to `validity` from now.
fn set_validity(params: &mut CertificateParams, validity: Duration) {
    let ymd = |t: chrono::DateTime<Utc>| rcgen::date_time_ymd(t.year(), t.month() as u8, t.day() as u8);
    params.not_before = ymd(Utc::now() - chrono::Duration::days(1));
    params.not_after =
        ymd(Utc::now() + chrono::Duration::from_std(validity).unwrap_or(chrono::Duration::days(365)));
}

pub(crate) fn new_ca(validity: Duration) -> Result<Pem, PkiError> {
    let mut params = CertificateParams::new(Vec::new())?;
    params
        .distinguished_name
        .push(DnType::CommonName, "restic-operator-ca");
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    set_validity(&mut params, validity);
    let key = KeyPair::generate()?;
    let cert = params.self_signed(&key)?;
    Ok(Pem {
        cert: cert.pem(),
        key: key.serialize_pem(),
    })
}

/// Signs a leaf certificate with the CA: a server certificate for `dns_name`, or a client one.
pub fn issue(ca: &Pem, common_name: &str, server: bool, validity: Duration) -> Result<Pem, PkiError> {
    let ca_key = KeyPair::from_pem(&ca.key)?;
    let issuer = Issuer::from_ca_cert_pem(&ca.cert, ca_key)?;
    let mut params = CertificateParams::new(Vec::new())?;
    params.distinguished_name.push(DnType::CommonName, common_name);
    set_validity(&mut params, validity);
    params.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    if server {
        params.subject_alt_names =
            vec![SanType::DnsName(common_name.try_into().map_err(
                |e: rcgen::Error| PkiError::Malformed(common_name.into(), e.to_string()),
            )?)];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    } else {
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    }
    let key = KeyPair::generate()?;
    let cert = params.signed_by(&key, &issuer)?;
    Ok(Pem {
        cert: cert.pem(),
        key: key.serialize_pem(),
    })
}

/// Expiry of a PEM certificate, in Unix seconds.
pub fn not_after(cert_pem: &str) -> Option<i64> {
    let (_, pem) = x509_parser::pem::parse_x509_pem(cert_pem.as_bytes()).ok()?;
    let cert = pem.parse_x509().ok()?;
    Some(cert.validity().not_after.timestamp())
}

fn get(secret: &Secret, key: &str) -> Option<String> {
    secret
        .data
        .as_ref()?
        .get(key)
        .and_then(|v| String::from_utf8(v.0.clone()).ok())
}

fn secret(name: &str, namespace: &str, type_: &str, data: &[(&str, &str)]) -> Secret {
    Secret {
        metadata: ObjectMeta {
            name: Some(name.into()),
            namespace: Some(namespace.into()),
            labels: Some(BTreeMap::from([(
                "app.kubernetes.io/managed-by".to_owned(),
                "restic-operator".to_owned(),
            )])),
            ..Default::default()
        },
        type_: Some(type_.into()),
        data: Some(
            data.iter()
                .map(|(k, v)| ((*k).to_owned(), ByteString(v.as_bytes().to_vec())))
                .collect(),
        ),
        ..Default::default()
    }
}

/// Creates `secret` unless it exists; either way returns what is stored (two replicas
/// starting at once agree on one CA).
async fn create_or_get(api: &Api<Secret>, secret: Secret) -> Result<Secret, PkiError> {
    let name = secret.metadata.name.clone().unwrap_or_default();
    match api.create(&PostParams::default(), &secret).await {
        Ok(s) => {
            tracing::info!(secret = %name, "created");
            Ok(s)
        }
        Err(kube::Error::Api(e)) if e.code == 409 => Ok(api.get(&name).await?),
        Err(e) => Err(e.into()),
    }
}

/// Makes sure the CA and the agent certificate exist and are not about to expire, and issues
/// a fresh client certificate for this process.
pub async fn ensure(client: &Client, config: &crate::config::Config) -> Result<Pki, PkiError> {
    let api: Api<Secret> = Api::namespaced(client.clone(), &config.namespace);
    let ca = ensure_ca(&api, config).await?;
    ensure_agent_certificate(&api, config, &ca).await?;
    let client_cert = issue(&ca, CLIENT_NAME, false, config.cert_validity)?;
    let client_not_after = not_after(&client_cert.cert).unwrap_or(0);
    Ok(Pki {
        ca,
        client: client_cert,
        client_not_after,
    })
}

/// Reads the CA from its Secret, making a new CA (and the Secret) first when there is none.
async fn ensure_ca(api: &Api<Secret>, config: &crate::config::Config) -> Result<Pem, PkiError> {
    let ca_secret = match api.get_opt(&config.ca_secret).await? {
        Some(s) => s,
        None => {
            let ca = new_ca(Duration::from_secs(10 * 365 * 86400))?;
            create_or_get(
                api,
                secret(
                    &config.ca_secret,
                    &config.namespace,
                    "Opaque",
                    &[(CA_CERT, &ca.cert), (CA_KEY, &ca.key)],
                ),
            )
            .await?
        }
    };
    match (get(&ca_secret, CA_CERT), get(&ca_secret, CA_KEY)) {
        (Some(cert), Some(key)) => Ok(Pem { cert, key }),
        _ => Err(PkiError::Malformed(
            config.ca_secret.clone(),
            format!("needs the keys {CA_CERT} and {CA_KEY}; delete it to have a new CA made"),
        )),
    }
}

/// Whether `agent_secret` holds a key and a certificate from `ca` valid past `renew_at` (pure).
fn agent_certificate_current(agent_secret: Option<&Secret>, ca: &Pem, renew_at: i64) -> bool {
    agent_secret
        .and_then(|s| {
            let cert = get(s, TLS_CERT)?;
            let expires = not_after(&cert)?;
            let same_ca = get(s, CA_CERT).as_deref() == Some(ca.cert.as_str());
            (same_ca && expires > renew_at && get(s, TLS_KEY).is_some()).then_some(())
        })
        .is_some()
}

/// Issues and stores a new agent serving certificate unless the stored one is current.
async fn ensure_agent_certificate(
    api: &Api<Secret>,
    config: &crate::config::Config,
    ca: &Pem,
) -> Result<(), PkiError> {
    let renew_at = Utc::now().timestamp() + config.cert_renew_before.as_secs() as i64;
    let agent_secret = api.get_opt(&config.agent_tls_secret).await?;
    if agent_certificate_current(agent_secret.as_ref(), ca, renew_at) {
        return Ok(());
    }
    let server = issue(ca, &config.agent_server_name, true, config.cert_validity)?;
    let desired = secret(
        &config.agent_tls_secret,
        &config.namespace,
        "kubernetes.io/tls",
        &[
            (TLS_CERT, &server.cert),
            (TLS_KEY, &server.key),
            (CA_CERT, &ca.cert),
        ],
    );
    match agent_secret {
        None => {
            create_or_get(api, desired).await?;
        }
        Some(old) => {
            let mut s = desired;
            s.metadata.resource_version = old.metadata.resource_version;
            api.replace(&config.agent_tls_secret, &PostParams::default(), &s)
                .await?;
            tracing::info!(secret = %config.agent_tls_secret, "renewed the agent certificate");
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn issued_certificates_chain_to_the_ca_and_expire_when_asked() {
        let ca = new_ca(Duration::from_secs(3650 * 86400)).unwrap();
        let server = issue(&ca, "restic-agent", true, Duration::from_secs(30 * 86400)).unwrap();
        let expires = not_after(&server.cert).unwrap();
        let in_30_days = Utc::now().timestamp() + 30 * 86400;
        assert!(
            (expires - in_30_days).abs() < 2 * 86400,
            "{expires} vs {in_30_days}"
        );
        assert!(not_after(&ca.cert).unwrap() > in_30_days + 3000 * 86400);
    }
}
