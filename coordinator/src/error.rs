//! Errors of the reconcilers, each with a class that decides the retry: permanent errors
//! wait for the object to change, temporary ones back off.

use std::time::Duration;

/// Whether trying again without a change can help.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Class {
    /// Retrying cannot help until the spec or a referenced object changes.
    Permanent,
    /// The API server, an agent or the repository may recover.
    Temporary,
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error("agent: {0}")]
    Agent(String),
    #[error("{0}")]
    Invalid(String),
    #[error("status serialization: {0}")]
    Json(#[from] serde_json::Error),
}

impl Error {
    pub fn class(&self) -> Class {
        match self {
            Error::Invalid(_) | Error::Json(_) => Class::Permanent,
            Error::Kube(_) | Error::Agent(_) => Class::Temporary,
        }
    }

    /// The metric label of this error.
    pub fn metric_label(&self) -> &'static str {
        match self.class() {
            Class::Permanent => "permanent_error",
            Class::Temporary => "error",
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Exponential backoff for consecutive failures of one object: 5 s, 10 s, 20 s ... 5 min.
pub fn backoff(failures: u32) -> Duration {
    let secs = 5u64.saturating_mul(1 << failures.min(6));
    Duration::from_secs(secs.min(300))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_and_is_capped() {
        assert_eq!(backoff(0), Duration::from_secs(5));
        assert_eq!(backoff(1), Duration::from_secs(10));
        assert_eq!(backoff(5), Duration::from_secs(160));
        assert_eq!(backoff(6), Duration::from_secs(300));
        assert_eq!(backoff(60), Duration::from_secs(300));
    }
}
