//! Short-lived client certificates for the person on call (`restic-agent debug --node`),
//! through the Kubernetes CertificateSigningRequest API with the signer
//! `resticbackup.io/agent-debug`. The coordinator holds the operator CA, so it is the signer:
//! it approves and signs a request only when its requester (the user the API server recorded,
//! which nobody can forge) may port-forward to the agent pods, the access the CLI needs anyway,
//! asked with a SubjectAccessReview. Denied requests say why. Every decision is an event in the
//! operator's namespace, naming the user.
//!
//! A debug certificate carries the organization [`DEBUG_ORGANIZATION`]; agents serve it only
//! read-only calls, a dry-run backup and cancel, never a backup, restore or repository change.

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::ByteString;
use k8s_openapi::api::authorization::v1::{ResourceAttributes, SubjectAccessReview, SubjectAccessReviewSpec};
use k8s_openapi::api::certificates::v1::{
    CertificateSigningRequest, CertificateSigningRequestCondition, CertificateSigningRequestStatus,
};
use kube::api::{Patch, PatchParams, PostParams};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Resource, ResourceExt};
use rcgen::{
    CertificateSigningRequestParams, DnType, ExtendedKeyUsagePurpose, Issuer, KeyPair, KeyUsagePurpose,
};

use crate::context::Context;
use crate::pki::Pem;

/// The signer name of agent debug certificates.
pub const SIGNER: &str = restic_operator_proto::DEBUG_SIGNER;
/// The organization (O) of debug certificates, which agents serve read-only.
pub const DEBUG_ORGANIZATION: &str = restic_operator_proto::DEBUG_ORGANIZATION;
/// Validity when the request does not ask (`spec.expirationSeconds`), and the most granted.
const DEFAULT_TTL: Duration = Duration::from_secs(15 * 60);
const MAX_TTL: Duration = Duration::from_secs(60 * 60);
const MIN_TTL: Duration = Duration::from_secs(10 * 60);

/// Why a request is denied: the message of its `Denied` condition and of the audit event.
#[derive(Debug, thiserror::Error)]
pub enum DebugCertError {
    /// The SubjectAccessReview could not be made.
    #[error("could not ask the API server whether the requester may: {source}")]
    Review { source: kube::Error },
    /// The requester may not port-forward to the agent pods; `review_reason` is the
    /// SubjectAccessReview's reason, if it gave one.
    #[error(
        "{user} may not create pods/portforward in namespace {namespace}, which reaching an agent needs{}",
        in_parens(.review_reason)
    )]
    NotAllowed {
        user: String,
        namespace: String,
        review_reason: Option<String>,
    },
    #[error("the request is not PEM")]
    NotPem,
    #[error("the request is not a valid certificate signing request: {source}")]
    InvalidRequest { source: rcgen::Error },
    #[error("random serial: {source}")]
    RandomSerial { source: std::io::Error },
    /// The operator CA's key or certificate cannot be read.
    #[error("the operator CA: {source}")]
    Ca { source: rcgen::Error },
    #[error("signing failed: {source}")]
    Signing { source: rcgen::Error },
}

/// ` (reason)`, or nothing.
fn in_parens(reason: &Option<String>) -> String {
    reason.as_deref().map(|r| format!(" ({r})")).unwrap_or_default()
}

/// Watches requests for the debug signer and answers each once.
pub async fn run(ctx: Arc<Context>) {
    let api: Api<CertificateSigningRequest> = Api::all(ctx.client.clone());
    let config = watcher::Config::default().fields(&format!("spec.signerName={SIGNER}"));
    let recorder = Recorder::new(
        ctx.client.clone(),
        Reporter {
            controller: "restic-operator-coordinator".into(),
            instance: Some(ctx.config.identity()),
        },
    );
    let mut events = watcher::watcher(api.clone(), config).default_backoff().boxed();
    while let Some(event) = events.next().await {
        let csr = match event {
            Ok(watcher::Event::Apply(csr) | watcher::Event::InitApply(csr)) => csr,
            Ok(_) => continue,
            Err(e) => {
                tracing::warn!(error = %e, "watching debug certificate requests");
                continue;
            }
        };
        if answered(&csr) {
            continue;
        }
        // The event may be older than the object: our own approval is an event too.
        let csr = match api.get(&csr.name_any()).await {
            Ok(fresh) if !answered(&fresh) => fresh,
            Ok(_) => continue,
            Err(e) => {
                tracing::warn!(csr = %csr.name_any(), error = %e, "reading a debug certificate request");
                continue;
            }
        };
        if let Err(e) = answer(&ctx, &api, &recorder, &csr).await {
            tracing::warn!(csr = %csr.name_any(), error = %e, "answering a debug certificate request");
        }
    }
}

fn has_condition(csr: &CertificateSigningRequest, type_: &str) -> bool {
    csr.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|c| c.iter().any(|c| c.type_ == type_))
}

fn answered(csr: &CertificateSigningRequest) -> bool {
    let status = csr.status.as_ref();
    status.and_then(|s| s.certificate.as_ref()).is_some()
        || status
            .and_then(|s| s.conditions.as_ref())
            .is_some_and(|c| c.iter().any(|c| matches!(c.type_.as_str(), "Denied" | "Failed")))
}

/// The requester, as the API server recorded it.
fn requester(csr: &CertificateSigningRequest) -> String {
    csr.spec.username.clone().unwrap_or_else(|| "(unknown)".into())
}

/// Decides one request: signs it when the requester may debug, denies it otherwise.
async fn answer(
    ctx: &Context,
    api: &Api<CertificateSigningRequest>,
    recorder: &Recorder,
    csr: &CertificateSigningRequest,
) -> Result<(), kube::Error> {
    let decision = match may_debug(ctx, csr).await {
        Ok(()) => sign(&ctx.pki().ca, csr),
        Err(denied) => Err(denied),
    };
    match decision {
        Ok((cert, ttl)) => grant(ctx, api, recorder, csr, cert, ttl).await,
        Err(denied) => deny(ctx, api, recorder, csr, &denied).await,
    }
}

/// Approves the request (unless it is), stores the signed `cert`, and logs and records it.
async fn grant(
    ctx: &Context,
    api: &Api<CertificateSigningRequest>,
    recorder: &Recorder,
    csr: &CertificateSigningRequest,
    cert: String,
    ttl: Duration,
) -> Result<(), kube::Error> {
    let name = csr.name_any();
    let user = requester(csr);
    // Approved already (by us before a failed status write, or by an administrator):
    // the requester was asked about again all the same, and only the signing is left.
    if !has_condition(csr, "Approved") {
        set_condition(
            api,
            &name,
            "Approved",
            "AgentDebugAllowed",
            &format!(
                "{user} may port-forward to the agent pods in {}",
                ctx.config.namespace
            ),
        )
        .await?;
    }
    let status = CertificateSigningRequestStatus {
        certificate: Some(ByteString(cert.into_bytes())),
        ..Default::default()
    };
    api.patch_status(
        &name,
        &PatchParams::default(),
        &Patch::Merge(serde_json::json!({ "status": status })),
    )
    .await?;
    tracing::info!(csr = %name, user = %user, ttl = ttl.as_secs(), "issued an agent debug certificate");
    audit(
        ctx,
        recorder,
        csr,
        EventType::Normal,
        "DebugCertificateIssued",
        format!(
            "Issued a {}-minute agent debug certificate to {user}",
            ttl.as_secs() / 60
        ),
    )
    .await;
    Ok(())
}

/// Marks the request `Denied` with why, and logs and records the refusal.
async fn deny(
    ctx: &Context,
    api: &Api<CertificateSigningRequest>,
    recorder: &Recorder,
    csr: &CertificateSigningRequest,
    denied: &DebugCertError,
) -> Result<(), kube::Error> {
    let name = csr.name_any();
    let user = requester(csr);
    let reason = denied.to_string();
    set_condition(api, &name, "Denied", "AgentDebugDenied", &reason).await?;
    tracing::info!(csr = %name, user = %user, reason = %reason, "denied an agent debug certificate");
    audit(
        ctx,
        recorder,
        csr,
        EventType::Warning,
        "DebugCertificateDenied",
        format!("Denied an agent debug certificate to {user}: {reason}"),
    )
    .await;
    Ok(())
}

/// Whether the requester may port-forward to pods in the operator's namespace.
async fn may_debug(ctx: &Context, csr: &CertificateSigningRequest) -> Result<(), DebugCertError> {
    let spec = &csr.spec;
    let review = SubjectAccessReview {
        spec: SubjectAccessReviewSpec {
            user: spec.username.clone(),
            groups: spec.groups.clone(),
            uid: spec.uid.clone(),
            extra: spec.extra.clone(),
            resource_attributes: Some(ResourceAttributes {
                namespace: Some(ctx.config.namespace.clone()),
                verb: Some("create".into()),
                resource: Some("pods".into()),
                subresource: Some("portforward".into()),
                ..Default::default()
            }),
            ..Default::default()
        },
        ..Default::default()
    };
    let answer = Api::<SubjectAccessReview>::all(ctx.client.clone())
        .create(&PostParams::default(), &review)
        .await
        .map_err(|source| DebugCertError::Review { source })?;
    let status = answer.status.unwrap_or_default();
    if status.allowed {
        Ok(())
    } else {
        Err(DebugCertError::NotAllowed {
            user: requester(csr),
            namespace: ctx.config.namespace.clone(),
            review_reason: status.reason.filter(|r| !r.is_empty()),
        })
    }
}

/// Signs the request's public key into a client certificate for `debug:<user>`, whatever
/// subject it asked for, and returns the certificate followed by the CA (so the CLI can check
/// the agent's serving certificate) and its validity.
fn sign(ca: &Pem, csr: &CertificateSigningRequest) -> Result<(String, Duration), DebugCertError> {
    let pem = String::from_utf8(csr.spec.request.0.clone()).map_err(|_| DebugCertError::NotPem)?;
    let mut params = CertificateSigningRequestParams::from_pem(&pem)
        .map_err(|source| DebugCertError::InvalidRequest { source })?;
    let ttl = csr
        .spec
        .expiration_seconds
        .map(|s| Duration::from_secs(u64::try_from(s).unwrap_or(0)))
        .unwrap_or(DEFAULT_TTL)
        .clamp(MIN_TTL, MAX_TTL);
    let p = &mut params.params;
    p.distinguished_name = rcgen::DistinguishedName::new();
    p.distinguished_name
        .push(DnType::CommonName, format!("debug:{}", requester(csr)));
    p.distinguished_name
        .push(DnType::OrganizationName, DEBUG_ORGANIZATION);
    p.subject_alt_names = Vec::new();
    p.is_ca = rcgen::IsCa::ExplicitNoCa;
    p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    p.custom_extensions = Vec::new();
    // Serial numbers must not repeat; rcgen's default derives one from the public key.
    let mut serial = [0u8; 16];
    std::io::Read::read_exact(
        &mut std::fs::File::open("/dev/urandom").map_err(|source| DebugCertError::RandomSerial { source })?,
        &mut serial,
    )
    .map_err(|source| DebugCertError::RandomSerial { source })?;
    serial[0] &= 0x7f;
    p.serial_number = Some(rcgen::SerialNumber::from_slice(&serial));
    let now = time::OffsetDateTime::now_utc();
    p.not_before = now - Duration::from_secs(300);
    p.not_after = now + ttl;
    let ca_key = KeyPair::from_pem(&ca.key).map_err(|source| DebugCertError::Ca { source })?;
    let issuer =
        Issuer::from_ca_cert_pem(&ca.cert, ca_key).map_err(|source| DebugCertError::Ca { source })?;
    let cert = params
        .signed_by(&issuer)
        .map_err(|source| DebugCertError::Signing { source })?;
    Ok((format!("{}{}", cert.pem(), ca.cert), ttl))
}

async fn set_condition(
    api: &Api<CertificateSigningRequest>,
    name: &str,
    type_: &str,
    reason: &str,
    message: &str,
) -> Result<(), kube::Error> {
    let now = crate::repository::to_time(chrono::Utc::now());
    let condition = CertificateSigningRequestCondition {
        type_: type_.into(),
        status: "True".into(),
        reason: Some(reason.into()),
        message: Some(message.into()),
        last_update_time: Some(now.clone()),
        last_transition_time: Some(now),
    };
    let patch = serde_json::json!({ "status": { "conditions": [condition] } });
    api.patch_approval(name, &PatchParams::default(), &Patch::Merge(patch))
        .await?;
    Ok(())
}

/// An event in the operator's namespace about the request, naming the user: who got access
/// to the agents, and who was refused, stays visible (`kubectl get events`).
async fn audit(
    ctx: &Context,
    recorder: &Recorder,
    csr: &CertificateSigningRequest,
    type_: EventType,
    reason: &str,
    note: String,
) {
    let mut reference = csr.object_ref(&());
    // Events of a cluster-scoped object go to `default`; ours to the operator's namespace.
    reference.namespace = Some(ctx.config.namespace.clone());
    let event = Event {
        type_,
        reason: reason.into(),
        note: Some(note),
        action: "Sign".into(),
        secondary: None,
    };
    if let Err(e) = recorder.publish(&event, &reference).await {
        tracing::warn!(error = %e, "could not record the debug certificate event");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(subject: &str, expiration: Option<i32>) -> CertificateSigningRequest {
        let key = KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(vec!["evil.example".into()]).unwrap();
        params.distinguished_name.push(DnType::CommonName, subject);
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let csr = params.serialize_request(&key).unwrap();
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": "r"},
            "spec": {
                "request": k8s_openapi::ByteString(csr.pem().unwrap().into_bytes()),
                "signerName": SIGNER,
                "usages": ["client auth"],
                "username": "alice",
                "expirationSeconds": expiration,
            }
        }))
        .unwrap()
    }

    #[test]
    fn a_debug_certificate_names_the_requester_is_short_lived_and_can_do_nothing_else() {
        let ca = crate::pki::new_ca(Duration::from_secs(86400)).unwrap();
        let (pem, ttl) = sign(&ca, &request("system:masters-wannabe", Some(86400))).unwrap();
        assert_eq!(ttl, MAX_TTL, "a day was asked, an hour is the most");
        let (_, first) = x509_parser::pem::parse_x509_pem(pem.as_bytes()).unwrap();
        let cert = first.parse_x509().unwrap();
        let subject = cert.subject().to_string();
        assert!(subject.contains("CN=debug:alice"), "{subject}");
        assert!(subject.contains(&format!("O={DEBUG_ORGANIZATION}")), "{subject}");
        assert!(!cert.is_ca(), "the request asked to be a CA");
        assert!(
            cert.subject_alternative_name().unwrap().is_none(),
            "SANs were copied"
        );
        let eku = cert.extended_key_usage().unwrap().unwrap().value;
        assert!(eku.client_auth && !eku.server_auth);
        let lifetime = cert.validity().not_after.timestamp() - chrono::Utc::now().timestamp();
        assert!((3500..=3600).contains(&lifetime), "{lifetime}");
        assert!(pem.ends_with(&ca.cert), "the CA follows the certificate");
        let (_, short) = sign(&ca, &request("x", None)).unwrap();
        assert_eq!(short, DEFAULT_TTL);
    }

    #[test]
    fn garbage_is_refused_with_a_reason() {
        let ca = crate::pki::new_ca(Duration::from_secs(86400)).unwrap();
        let mut csr = request("x", None);
        csr.spec.request = ByteString(
            b"-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n".to_vec(),
        );
        let err = sign(&ca, &csr).unwrap_err();
        assert!(matches!(err, DebugCertError::InvalidRequest { .. }), "{err:?}");
        assert!(
            err.to_string()
                .starts_with("the request is not a valid certificate signing request: "),
            "{err}"
        );
        csr.spec.request = ByteString(vec![0xff, 0xfe]);
        let err = sign(&ca, &csr).unwrap_err();
        assert_eq!(err.to_string(), "the request is not PEM");
    }

    #[test]
    fn a_denial_names_the_user_and_the_review_reason_if_any() {
        let denied = |review_reason: Option<&str>| DebugCertError::NotAllowed {
            user: "alice".into(),
            namespace: "restic-operator".into(),
            review_reason: review_reason.map(Into::into),
        };
        assert_eq!(
            denied(None).to_string(),
            "alice may not create pods/portforward in namespace restic-operator, which reaching an agent \
             needs"
        );
        assert_eq!(
            denied(Some("no RBAC policy matched")).to_string(),
            "alice may not create pods/portforward in namespace restic-operator, which reaching an agent \
             needs (no RBAC policy matched)"
        );
    }
}
