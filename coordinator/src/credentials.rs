//! Repository credentials from the referenced Secret: `RESTIC_PASSWORD` is required; every
//! other key that is a valid environment variable name (AWS_ACCESS_KEY_ID, B2_ACCOUNT_ID,
//! ...) is passed to restic as is. Values are only ever sent to an agent over mutual TLS.

use k8s_openapi::api::core::v1::Secret;
use kube::{Api, Client};
use restic_operator_api::repository::ResticRepository;
use restic_operator_proto::v1 as pb;

pub const PASSWORD_KEY: &str = "RESTIC_PASSWORD";

#[derive(Debug, thiserror::Error)]
pub enum CredentialsError {
    #[error("Secret {namespace}/{name} does not exist")]
    SecretNotFound { namespace: String, name: String },
    #[error("Secret {namespace}/{name} has no key {key}")]
    KeyMissing {
        namespace: String,
        name: String,
        key: String,
    },
    #[error("reading Secret {namespace}/{name}: {source}")]
    Api {
        namespace: String,
        name: String,
        source: kube::Error,
    },
}

fn is_env_name(key: &str) -> bool {
    !key.is_empty()
        && !key.starts_with(|c: char| c.is_ascii_digit())
        && key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// Builds the agent's repository message from a Secret's data (pure).
pub fn from_secret(url: &str, secret: &Secret, namespace: &str) -> Result<pb::Repository, CredentialsError> {
    let name = secret.metadata.name.clone().unwrap_or_default();
    let mut data: Vec<(String, Vec<u8>)> = secret
        .data
        .iter()
        .flatten()
        .map(|(k, v)| (k.clone(), v.0.clone()))
        .collect();
    data.extend(
        secret
            .string_data
            .iter()
            .flatten()
            .map(|(k, v)| (k.clone(), v.clone().into_bytes())),
    );
    let mut password = None;
    let mut env = std::collections::HashMap::new();
    for (k, v) in data {
        let value = String::from_utf8_lossy(&v).into_owned();
        if k == PASSWORD_KEY {
            password = Some(value);
        } else if is_env_name(&k) {
            env.insert(k, value);
        }
    }
    let password = password
        .filter(|p| !p.is_empty())
        .ok_or_else(|| CredentialsError::KeyMissing {
            namespace: namespace.into(),
            name,
            key: PASSWORD_KEY.into(),
        })?;
    Ok(pb::Repository {
        url: url.into(),
        password,
        env,
    })
}

/// Reads the credentials of `repo` (the Secret is in the repository's namespace).
pub async fn load(client: &Client, repo: &ResticRepository) -> Result<pb::Repository, CredentialsError> {
    let namespace = repo.metadata.namespace.clone().unwrap_or_default();
    let name = repo.spec.credentials_secret_ref.name.clone();
    let api: Api<Secret> = Api::namespaced(client.clone(), &namespace);
    match api.get_opt(&name).await {
        Ok(Some(secret)) => from_secret(&repo.spec.repository_url, &secret, &namespace),
        Ok(None) => Err(CredentialsError::SecretNotFound { namespace, name }),
        Err(source) => Err(CredentialsError::Api {
            namespace,
            name,
            source,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn password_is_required_and_env_names_pass_through() {
        let secret: Secret = serde_yaml::from_str(
            "metadata: {name: creds}\nstringData: {RESTIC_PASSWORD: s3cret, AWS_ACCESS_KEY_ID: id, 'not-env': x}",
        )
        .unwrap();
        let repo = from_secret("s3:host/bucket", &secret, "ns").unwrap();
        assert_eq!(repo.password, "s3cret");
        assert_eq!(repo.env.get("AWS_ACCESS_KEY_ID").map(String::as_str), Some("id"));
        assert!(!repo.env.contains_key("not-env"));
        assert!(!repo.env.contains_key(PASSWORD_KEY));

        let secret: Secret =
            serde_yaml::from_str("metadata: {name: creds}\nstringData: {AWS_ACCESS_KEY_ID: id}").unwrap();
        let e = from_secret("s3:host/bucket", &secret, "ns").unwrap_err();
        assert_eq!(e.to_string(), "Secret ns/creds has no key RESTIC_PASSWORD");
    }
}
