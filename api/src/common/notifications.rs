//! Where the outcome of runs is reported: a Prometheus Pushgateway, an ntfy server and email.

use kube::KubeSchema;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::defaults::{
    default_ntfy_priority, default_ntfy_server_url, default_pushgateway_job_name, default_true,
};
use super::references::SecretKeyReference;

/// Where to report the outcome of each run. Not sent yet: accepted and validated, for a later
/// release.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Notifications {
    /// Prometheus Pushgateway to push run metrics to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pushgateway: Option<PushgatewayNotification>,
    /// ntfy server to publish a push notification to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ntfy: Option<NtfyNotification>,
    /// SMTP server and addresses of an email report.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub email: Option<EmailNotification>,
}

/// Prometheus Pushgateway settings.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("!self.enabled || has(self.url)")
    .message("pushgateway.url is required when the pushgateway is enabled"))]
pub struct PushgatewayNotification {
    /// Whether this block is switched on; false keeps the settings without using them.
    /// Default: true.
    #[serde(default = "default_true")]
    pub enabled: bool,
    /// Base URL of the Pushgateway, e.g. `http://prometheus-pushgateway.monitoring.svc:9091`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    /// Job name the metrics are grouped under in the Pushgateway. Default: `backup`.
    #[serde(default = "default_pushgateway_job_name")]
    pub job_name: String,
}

/// ntfy (https://ntfy.sh) push notification settings.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("!self.enabled || has(self.topic)")
    .message("ntfy.topic is required when ntfy is enabled"))]
pub struct NtfyNotification {
    /// Whether this block is switched on; false keeps the settings without using them.
    /// Default: true.
    #[serde(default = "default_true")]
    pub enabled: bool,
    /// Base URL of the ntfy server. Default: `https://ntfy.sh`.
    #[serde(default = "default_ntfy_server_url", rename = "serverURL")]
    pub server_url: String,
    /// Topic to publish to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub topic: Option<String>,
    /// Secret key holding the credentials for the ntfy server. Its value is sent as the HTTP
    /// `Authorization` header (`Bearer tk_...` or `Basic ...`); a value of the form
    /// `user:password` is sent as basic authentication. Default key: `auth-header`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credentials_secret_ref: Option<SecretKeyReference>,
    /// Notify only when a run fails or partially fails. Default: true.
    #[serde(default = "default_true")]
    pub only_on_failure: bool,
    /// ntfy message priority, 1 (min) to 5 (max). Default: 4.
    #[serde(default = "default_ntfy_priority")]
    #[schemars(range(min = 1, max = 5))]
    pub priority: i32,
    /// ntfy tags (emoji short codes or labels) added to the message, e.g. `warning`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tags: Vec<String>,
    /// Message title. Default: `<hostname> - Backup failed` on failure and
    /// `<hostname> - Backup succeeded` otherwise (`Retention` instead of `Backup` for retention
    /// runs).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub title: Option<String>,
}

/// Email report settings.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("!self.enabled || has(self.to) || has(self.recipient)")
    .message("email needs a recipient: set email.to (or email.recipient)"))]
pub struct EmailNotification {
    /// Whether this block is switched on; false keeps the settings without using them.
    /// Default: true.
    #[serde(default = "default_true")]
    pub enabled: bool,
    /// SMTP server as `host:port`, e.g. `postfix.mail.svc:25`. Mail is sent without
    /// authentication, with STARTTLS when the server offers it.
    #[schemars(length(min = 1))]
    pub smtp_server: String,
    /// Sender address, e.g. `Restic Operator <no-reply@example.com>`. Default:
    /// `restic-operator@<SMTP server host>`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from: Option<String>,
    /// Recipient address; several addresses may be separated by commas. Same as `recipient`;
    /// when both are set, both receive the mail.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to: Option<String>,
    /// Recipient address (the name an earlier version of the specification used for `to`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub recipient: Option<String>,
    /// Subject line. Default: `<name> - <result>` of the run, e.g. `emby - Backup failed`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subject: Option<String>,
}

impl EmailNotification {
    /// All recipient addresses from `to` and `recipient`, split at commas, trimmed, without
    /// duplicates, in the order written.
    pub fn recipients(&self) -> Vec<String> {
        let mut out: Vec<String> = Vec::new();
        for list in [&self.to, &self.recipient].into_iter().flatten() {
            for addr in list.split(',').map(str::trim).filter(|a| !a.is_empty()) {
                if !out.iter().any(|known| known == addr) {
                    out.push(addr.to_owned());
                }
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn email_recipients_merge_to_and_recipient() {
        let email = EmailNotification {
            enabled: true,
            smtp_server: "postfix:25".into(),
            from: None,
            to: Some("a@example.com, b@example.com".into()),
            recipient: Some("b@example.com".into()),
            subject: None,
        };
        assert_eq!(email.recipients(), ["a@example.com", "b@example.com"]);
    }
}
