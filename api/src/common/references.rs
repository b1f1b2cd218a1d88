//! References to other objects (a repository, a Secret or a key of one, an object in the same
//! namespace, an object the operator created) and the matching of label selectors.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::defaults::default_ntfy_secret_key;

/// Reference to a ResticRepository, possibly in another namespace.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RepositoryReference {
    /// Name of the ResticRepository.
    #[schemars(length(min = 1))]
    pub name: String,
    /// Namespace of the ResticRepository. Default: the namespace of the referring object. A
    /// repository in another namespace must list this namespace in its `spec.allowedNamespaces`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
}

impl RepositoryReference {
    /// The namespace the repository lives in, given the namespace of the referring object.
    pub fn namespace_or<'a>(&'a self, own_namespace: &'a str) -> &'a str {
        self.namespace
            .as_deref()
            .filter(|ns| !ns.is_empty())
            .unwrap_or(own_namespace)
    }
}

/// Reference to an object in the same namespace.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct LocalObjectReference {
    /// Name of the object, in the namespace of the referring object.
    #[schemars(length(min = 1))]
    pub name: String,
}

/// Reference to an object the operator created or used, written to status.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ObjectReference {
    /// Kind of the object, e.g. `Pod`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    /// Name of the object.
    pub name: String,
    /// Namespace of the object.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
}

/// Reference to a Secret in the namespace of the referring object.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SecretReference {
    /// Name of the Secret, in the namespace of the referring object.
    #[schemars(length(min = 1))]
    pub name: String,
}

/// Reference to one key of a Secret in the namespace of the referring object.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SecretKeyReference {
    /// Name of the Secret, in the namespace of the referring object.
    #[schemars(length(min = 1))]
    pub name: String,
    /// Key within the Secret. Default: `auth-header`.
    #[serde(default = "default_ntfy_secret_key")]
    #[schemars(length(min = 1))]
    pub key: String,
}

/// Whether `labels` match a Kubernetes label selector (`matchLabels` and `matchExpressions` with
/// `In`, `NotIn`, `Exists`, `DoesNotExist`). An empty selector matches everything; an unknown
/// operator matches nothing.
pub fn label_selector_matches(selector: &LabelSelector, labels: &BTreeMap<String, String>) -> bool {
    let labels_match = selector
        .match_labels
        .iter()
        .flatten()
        .all(|(key, value)| labels.get(key) == Some(value));
    let expressions_match = selector.match_expressions.iter().flatten().all(|req| {
        let value = labels.get(&req.key);
        let values = req.values.as_deref().unwrap_or_default();
        match req.operator.as_str() {
            "In" => value.is_some_and(|v| values.contains(v)),
            "NotIn" => value.is_none_or(|v| !values.contains(v)),
            "Exists" => value.is_some(),
            "DoesNotExist" => value.is_none(),
            _ => false,
        }
    });
    labels_match && expressions_match
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn label_selectors_match_labels_and_expressions() {
        use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelectorRequirement;
        let labels: BTreeMap<String, String> = [("app", "emby"), ("tier", "media")]
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .into();
        let requirement = |key: &str, operator: &str, values: &[&str]| LabelSelectorRequirement {
            key: key.into(),
            operator: operator.into(),
            values: Some(values.iter().map(|v| v.to_string()).collect()),
        };
        let selector = |reqs: Vec<LabelSelectorRequirement>| LabelSelector {
            match_labels: Some([("app".to_owned(), "emby".to_owned())].into()),
            match_expressions: Some(reqs),
        };
        assert!(label_selector_matches(&LabelSelector::default(), &labels));
        assert!(label_selector_matches(
            &selector(vec![requirement("tier", "In", &["media"])]),
            &labels
        ));
        assert!(!label_selector_matches(
            &selector(vec![requirement("tier", "NotIn", &["media"])]),
            &labels
        ));
        assert!(label_selector_matches(
            &selector(vec![requirement("zone", "DoesNotExist", &[])]),
            &labels
        ));
        assert!(!label_selector_matches(
            &selector(vec![requirement("zone", "Exists", &[])]),
            &labels
        ));
        assert!(!label_selector_matches(
            &selector(vec![requirement("tier", "Near", &["media"])]),
            &labels
        ));
    }

    #[test]
    fn repository_reference_defaults_to_the_referring_namespace() {
        let local = RepositoryReference {
            name: "repo".into(),
            namespace: None,
        };
        assert_eq!(local.namespace_or("media"), "media");
        let remote = RepositoryReference {
            name: "repo".into(),
            namespace: Some("backup-system".into()),
        };
        assert_eq!(remote.namespace_or("media"), "backup-system");
    }
}
