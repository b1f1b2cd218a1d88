//! Dereferencing, done once per run: a backup's `repositoryRef`, the ResticRepository it names,
//! whether the backup's namespace may use that repository (`spec.allowedNamespaces`, by name or
//! by a selector over the live Namespace's labels), and the repository's credentials Secret
//! become one [`Resolved`] value. The only way to get one is [`resolve`], which refuses what
//! the namespace may not use, and a run sends exactly the repository it holds. So the
//! repository that was checked is the repository that is used, however the spec changes in
//! between.
//!
//! Credentials: `RESTIC_PASSWORD` is required; every other key of the Secret that is a restic
//! backend setting (AWS_ACCESS_KEY_ID, B2_ACCOUNT_ID, HTTPS_PROXY, ...) is passed to restic as
//! is, and the rest is left out (see [`from_secret`]). Values are only ever sent to an agent
//! over mutual TLS.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{Namespace, Secret};
use kube::{Api, Client, ResourceExt};
use restic_operator_api::backup::ResticBackup;
use restic_operator_api::common::{RepositoryReference, reasons};
use restic_operator_api::repository::ResticRepository;
use restic_operator_proto::v1 as pb;

use crate::error::Class;

pub const PASSWORD_KEY: &str = "RESTIC_PASSWORD";
/// The old scripts' repository variable; the URL comes from the ResticRepository.
pub const REPOSITORY_KEY: &str = "RESTIC_REPOSITORY";

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
    #[error(
        "Secret {namespace}/{name} sets RESTIC_REPOSITORY to {secret_url:?}, but the ResticRepository's \
         repositoryURL is {url:?}; remove the key or make them agree"
    )]
    RepositoryMismatch {
        namespace: String,
        name: String,
        secret_url: String,
        url: String,
    },
    #[error("reading Secret {namespace}/{name}: {source}")]
    Api {
        namespace: String,
        name: String,
        source: kube::Error,
    },
}

impl CredentialsError {
    /// The condition reason.
    pub fn reason(&self) -> &'static str {
        match self {
            CredentialsError::SecretNotFound { .. } => reasons::SECRET_NOT_FOUND,
            CredentialsError::KeyMissing { .. } => reasons::SECRET_KEY_MISSING,
            CredentialsError::RepositoryMismatch { .. } => reasons::INVALID_SPEC,
            CredentialsError::Api { .. } => reasons::REPOSITORY_NOT_READY,
        }
    }
}

/// Why a backup may not use its repository now.
#[derive(Debug, thiserror::Error)]
pub enum ResolveError {
    #[error("ResticRepository {namespace}/{name} does not exist")]
    RepositoryNotFound { namespace: String, name: String },
    #[error("ResticRepository {namespace}/{name} does not allow namespace {from} (spec.allowedNamespaces)")]
    NamespaceNotAllowed {
        namespace: String,
        name: String,
        from: String,
    },
    #[error(transparent)]
    Credentials(#[from] CredentialsError),
    #[error("reading {what}: {source}")]
    Api { what: String, source: kube::Error },
}

impl ResolveError {
    /// The condition reason.
    pub fn reason(&self) -> &'static str {
        match self {
            ResolveError::RepositoryNotFound { .. } => reasons::REPOSITORY_NOT_FOUND,
            ResolveError::NamespaceNotAllowed { .. } => reasons::NAMESPACE_NOT_ALLOWED,
            ResolveError::Credentials(e) => e.reason(),
            ResolveError::Api { .. } => reasons::REPOSITORY_NOT_READY,
        }
    }

    /// Whether trying again without a change can help (the API server may recover).
    pub fn class(&self) -> Class {
        match self {
            ResolveError::Credentials(CredentialsError::Api { .. }) | ResolveError::Api { .. } => {
                Class::Temporary
            }
            _ => Class::Permanent,
        }
    }
}

/// A repository that the namespace of a backup may use, as read when it was checked.
#[derive(Clone, Debug)]
pub struct Access {
    repository: ResticRepository,
}

impl Access {
    pub fn repository(&self) -> &ResticRepository {
        &self.repository
    }

    /// Whether runs on the repository use the agent's restic cache (`spec.cache.enabled`,
    /// default true).
    pub fn use_cache(&self) -> bool {
        self.repository.spec.cache.as_ref().is_none_or(|c| c.enabled)
    }

    /// The size limit of the repository's cache on each node (`spec.cache.size`), in bytes; 0
    /// is no limit.
    pub fn cache_size_bytes(&self) -> u64 {
        self.repository
            .spec
            .cache
            .as_ref()
            .and_then(|c| c.size.as_ref())
            .and_then(|q| crate::backup::request::parse_quantity(&q.0))
            .unwrap_or(0)
    }

    /// `namespace/name` of the repository: the key of its locks.
    pub fn key(&self) -> String {
        crate::status::key_of(&self.repository)
    }
}

/// Everything a run needs from outside the backup object: the repository it may use and that
/// repository's credentials. Made only by [`resolve`].
#[derive(Clone, Debug)]
pub struct Resolved {
    access: Access,
    credentials: pb::Repository,
}

impl Resolved {
    pub fn access(&self) -> &Access {
        &self.access
    }

    /// A repository the namespace may use, with the credentials of its Secret (pure; what
    /// [`resolve`] does with the objects it reads).
    pub fn from_secret(access: Access, secret: &Secret) -> Result<Self, ResolveError> {
        let repo = access.repository();
        let namespace = repo.namespace().unwrap_or_default();
        let credentials = from_secret(&repo.spec.repository_url, secret, &namespace)?.repository;
        Ok(Self { access, credentials })
    }

    /// The repository message sent to agents: the checked repository's URL and credentials.
    pub fn agent_repository(&self) -> pb::Repository {
        self.credentials.clone()
    }
}

/// Checks that `namespace` (with labels `namespace_labels`) may use `repo` (pure).
pub fn check_namespace(
    repo: &ResticRepository,
    namespace: &str,
    namespace_labels: &BTreeMap<String, String>,
) -> Result<Access, ResolveError> {
    if repo.allows_namespace(namespace, namespace_labels) {
        Ok(Access {
            repository: repo.clone(),
        })
    } else {
        Err(ResolveError::NamespaceNotAllowed {
            namespace: repo.namespace().unwrap_or_default(),
            name: repo.name_any(),
            from: namespace.into(),
        })
    }
}

/// The objects among `objects` whose `repo_ref` names `repo` (for the repository watches of
/// the kinds that use a repository).
pub fn referencing<K>(
    objects: &[std::sync::Arc<K>],
    repo: &ResticRepository,
    repo_ref: impl Fn(&K) -> &RepositoryReference,
) -> Vec<kube::runtime::reflector::ObjectRef<K>>
where
    K: kube::Resource<DynamicType = ()>,
{
    let repo_ns = repo.namespace().unwrap_or_default();
    objects
        .iter()
        .filter(|o| {
            let r = repo_ref(o);
            let ns = o.namespace().unwrap_or_default();
            r.name == repo.name_any() && r.namespace_or(&ns) == repo_ns
        })
        .map(|o| kube::runtime::reflector::ObjectRef::from_obj(o.as_ref()))
        .collect()
}

/// Reads the repository `backup` references and checks that the backup's namespace may use
/// it (the Namespace's labels are read live for `allowedNamespaces.selector`).
pub async fn access(client: &Client, backup: &ResticBackup) -> Result<Access, ResolveError> {
    let ns = backup.namespace().unwrap_or_default();
    access_for(client, &ns, &backup.spec.repository_ref).await
}

/// Why the repository `repo_ref` (referenced from namespace `ns`) cannot take a run now, if
/// anything stops it: it does not exist, does not allow the namespace, or is not ready. Only a
/// failure to read the API is an error.
pub async fn blocked(
    client: &Client,
    ns: &str,
    repo_ref: &RepositoryReference,
) -> Result<Option<crate::plan::Blocked>, kube::Error> {
    match access_for(client, ns, repo_ref).await {
        Ok(access) => Ok(crate::plan::not_ready(&access)),
        Err(ResolveError::Api { source, .. }) => Err(source),
        Err(e) => Ok(Some(crate::plan::Blocked::of(&e))),
    }
}

/// [`access`] for any object in namespace `ns` that references a repository.
pub async fn access_for(
    client: &Client,
    ns: &str,
    repo_ref: &RepositoryReference,
) -> Result<Access, ResolveError> {
    let ns = ns.to_owned();
    let repo_ns = repo_ref.namespace_or(&ns).to_owned();
    let repo = Api::<ResticRepository>::namespaced(client.clone(), &repo_ns)
        .get_opt(&repo_ref.name)
        .await
        .map_err(|source| ResolveError::Api {
            what: format!("ResticRepository {repo_ns}/{}", repo_ref.name),
            source,
        })?
        .ok_or_else(|| ResolveError::RepositoryNotFound {
            namespace: repo_ns.clone(),
            name: repo_ref.name.clone(),
        })?;
    // The repository's own namespace needs no labels; others are matched live, so a label
    // removed from the Namespace takes effect at the next run.
    let labels = if repo_ns == ns {
        BTreeMap::new()
    } else {
        Api::<Namespace>::all(client.clone())
            .get_opt(&ns)
            .await
            .map_err(|source| ResolveError::Api {
                what: format!("Namespace {ns}"),
                source,
            })?
            .and_then(|n| n.metadata.labels)
            .unwrap_or_default()
    };
    check_namespace(&repo, &ns, &labels)
}

/// Resolves what a run of `backup` (as read live by the caller) uses: [`access`], then the
/// repository's credentials.
pub async fn resolve(client: &Client, backup: &ResticBackup) -> Result<Resolved, ResolveError> {
    let ns = backup.namespace().unwrap_or_default();
    resolve_for(client, &ns, &backup.spec.repository_ref).await
}

/// [`resolve`] for any object in namespace `ns` that references a repository.
pub async fn resolve_for(
    client: &Client,
    ns: &str,
    repo_ref: &RepositoryReference,
) -> Result<Resolved, ResolveError> {
    let access = access_for(client, ns, repo_ref).await?;
    let credentials = load_credentials(client, access.repository()).await?.repository;
    Ok(Resolved { access, credentials })
}

/// A repository's credentials as the agents get them, and the keys of its Secret left out.
#[derive(Clone, Debug)]
pub struct Credentials {
    pub repository: pb::Repository,
    /// Keys that are not restic backend settings (the agent would refuse them), sorted.
    pub ignored: Vec<String>,
}

/// Builds the agent's repository message from a Secret's data (pure). Secrets written for the
/// old scripts carry more than restic's backend settings: `RESTIC_REPOSITORY` is dropped when
/// it names the repository's own URL (and is an error when it names another), and every other
/// key the agent would refuse (see `restic_operator_args::check_env_name`) is left out and
/// listed in `ignored`, so one stray key never makes the repository unusable.
pub fn from_secret(url: &str, secret: &Secret, namespace: &str) -> Result<Credentials, CredentialsError> {
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
    let mut ignored = Vec::new();
    for (k, v) in data {
        let value = String::from_utf8_lossy(&v).into_owned();
        if k == PASSWORD_KEY {
            password = Some(value);
        } else if k == REPOSITORY_KEY {
            if value.trim() != url.trim() {
                return Err(CredentialsError::RepositoryMismatch {
                    namespace: namespace.into(),
                    name,
                    secret_url: value.trim().into(),
                    url: url.into(),
                });
            }
        } else if restic_operator_args::check_env_name(&k).is_ok() {
            env.insert(k, value);
        } else {
            ignored.push(k);
        }
    }
    ignored.sort();
    let password = password
        .filter(|p| !p.is_empty())
        .ok_or_else(|| CredentialsError::KeyMissing {
            namespace: namespace.into(),
            name,
            key: PASSWORD_KEY.into(),
        })?;
    Ok(Credentials {
        repository: pb::Repository {
            url: url.into(),
            password,
            env,
        },
        ignored,
    })
}

/// Reads the credentials of `repo` (the Secret is in the repository's namespace).
pub async fn load_credentials(
    client: &Client,
    repo: &ResticRepository,
) -> Result<Credentials, CredentialsError> {
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

    fn repository(allowed: &str) -> ResticRepository {
        serde_yaml::from_str(&format!(
            "apiVersion: backup.resticbackup.io/v1alpha1\nkind: ResticRepository\n\
             metadata: {{name: shared, namespace: backup-system}}\n\
             spec: {{repositoryURL: 's3:host/bucket', credentialsSecretRef: {{name: creds}}{allowed}}}"
        ))
        .unwrap()
    }

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn password_is_required_and_env_names_pass_through() {
        let secret: Secret = serde_yaml::from_str(
            "metadata: {name: creds}\nstringData: {RESTIC_PASSWORD: s3cret, AWS_ACCESS_KEY_ID: id, 'not-env': x}",
        )
        .unwrap();
        let creds = from_secret("s3:host/bucket", &secret, "ns").unwrap();
        assert_eq!(creds.ignored, ["not-env"]);
        let repo = creds.repository;
        assert_eq!(repo.password, "s3cret");
        assert_eq!(repo.env.get("AWS_ACCESS_KEY_ID").map(String::as_str), Some("id"));
        assert!(!repo.env.contains_key("not-env"));
        assert!(!repo.env.contains_key(PASSWORD_KEY));

        let secret: Secret =
            serde_yaml::from_str("metadata: {name: creds}\nstringData: {AWS_ACCESS_KEY_ID: id}").unwrap();
        let e = from_secret("s3:host/bucket", &secret, "ns").unwrap_err();
        assert_eq!(e.to_string(), "Secret ns/creds has no key RESTIC_PASSWORD");
    }

    /// The specification's migration scenario: the old scripts' Secret, as the seeds show it.
    #[test]
    fn a_secret_written_for_the_old_scripts_still_makes_a_usable_repository() {
        let secret: Secret = serde_yaml::from_str(
            "metadata: {name: restic-credentials}
stringData: {RESTIC_REPOSITORY: 's3:s3.wasabisys.com/k3s', \
             RESTIC_PASSWORD: pw, AWS_ACCESS_KEY_ID: id, AWS_SECRET_ACCESS_KEY: key, HTTPS_PROXY: 'http://proxy:3128', \
             NO_PROXY: '.svc', RESTIC_HOSTNAME: emby, RESTIC_PASSWORD_COMMAND: 'cat /x', LD_PRELOAD: /x.so}",
        )
        .unwrap();
        let creds = from_secret("s3:s3.wasabisys.com/k3s", &secret, "media").unwrap();
        assert_eq!(
            creds.ignored,
            ["LD_PRELOAD", "RESTIC_HOSTNAME", "RESTIC_PASSWORD_COMMAND"],
            "left out, and reported"
        );
        let env: Vec<&str> = {
            let mut keys: Vec<&str> = creds.repository.env.keys().map(String::as_str).collect();
            keys.sort();
            keys
        };
        assert_eq!(
            env,
            [
                "AWS_ACCESS_KEY_ID",
                "AWS_SECRET_ACCESS_KEY",
                "HTTPS_PROXY",
                "NO_PROXY"
            ]
        );
        // Every key sent is one the agent accepts.
        assert!(
            env.iter()
                .all(|k| restic_operator_args::check_env_name(k).is_ok())
        );

        let elsewhere = from_secret("s3:other/bucket", &secret, "media").unwrap_err();
        assert!(matches!(elsewhere, CredentialsError::RepositoryMismatch { .. }));
        assert!(
            elsewhere
                .to_string()
                .contains("repositoryURL is \"s3:other/bucket\""),
            "{elsewhere}"
        );
    }

    #[test]
    fn a_repository_is_usable_from_its_own_namespace_only_by_default() {
        let repo = repository("");
        assert!(check_namespace(&repo, "backup-system", &labels(&[])).is_ok());
        let refused = check_namespace(&repo, "team-a", &labels(&[("team", "a")])).unwrap_err();
        assert_eq!(refused.reason(), reasons::NAMESPACE_NOT_ALLOWED);
        assert_eq!(refused.class(), Class::Permanent);
        assert_eq!(
            refused.to_string(),
            "ResticRepository backup-system/shared does not allow namespace team-a (spec.allowedNamespaces)"
        );
    }

    #[test]
    fn other_namespaces_are_allowed_by_name_or_by_the_labels_of_the_namespace() {
        let by_name = repository(", allowedNamespaces: {names: [team-a]}");
        assert!(check_namespace(&by_name, "team-a", &labels(&[])).is_ok());
        assert!(check_namespace(&by_name, "team-b", &labels(&[])).is_err());

        let by_label = repository(", allowedNamespaces: {selector: {matchLabels: {backup: allowed}}}");
        let access = check_namespace(&by_label, "team-b", &labels(&[("backup", "allowed")])).unwrap();
        assert_eq!(access.key(), "backup-system/shared");
        assert!(check_namespace(&by_label, "team-b", &labels(&[("backup", "no")])).is_err());
    }
}
