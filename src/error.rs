//! The one error type of the runtime side: every variant says which cluster
//! and what was being done.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cluster {cluster}: cannot read kubeconfig {}: {source}", path.display())]
    ReadKubeconfig {
        cluster: String,
        path: PathBuf,
        #[source]
        source: kube::config::KubeconfigError,
    },

    #[error("cluster {cluster}: cannot use context {context:?}: {source}")]
    KubeconfigContext {
        cluster: String,
        context: String,
        #[source]
        source: kube::config::KubeconfigError,
    },

    #[error("cluster {cluster}: cannot build a client: {source}")]
    BuildClient {
        cluster: String,
        #[source]
        source: kube::Error,
    },

    #[error("cluster {cluster}: {action}: {}", describe_kube_error(source))]
    Kube {
        cluster: String,
        action: String,
        #[source]
        source: kube::Error,
    },
}

impl Error {
    pub fn kube(cluster: &str, action: impl Into<String>, source: kube::Error) -> Self {
        Error::Kube {
            cluster: cluster.to_string(),
            action: action.into(),
            source,
        }
    }
}

/// The HTTP status of an API error, if the server answered at all.
pub fn api_status_code(error: &kube::Error) -> Option<u16> {
    match error {
        kube::Error::Api(status) => Some(status.code),
        _ => None,
    }
}

/// True when the API server could not be reached or said it cannot serve
/// now (5xx, 429): a request that failed for that says nothing about what
/// it asked for, and is to be retried once the server is back.
pub fn is_server_unavailable(error: &kube::Error) -> bool {
    match api_status_code(error) {
        Some(code) => code == 429 || code >= 500,
        None => matches!(
            error,
            kube::Error::HyperError(_) | kube::Error::Service(_) | kube::Error::HttpError(_)
        ),
    }
}

/// True when RBAC refused the request (`User "x" cannot create resource
/// "pods" ...`): the grant is missing, which says nothing about the request
/// itself. Other 403s (an exceeded ResourceQuota, PodSecurity) are not.
pub fn is_rbac_refusal(error: &kube::Error) -> bool {
    matches!(error, kube::Error::Api(status) if status.code == 403 && status.message.contains(" cannot "))
}

/// A short, readable text for a client error: the server's message when it
/// answered, the innermost cause otherwise (connection refused, TLS, ...).
pub fn describe_kube_error(error: &kube::Error) -> String {
    if let kube::Error::Api(status) = error {
        return format!("{} (HTTP {})", status.message, status.code);
    }
    let mut text = error.to_string();
    let mut source = std::error::Error::source(error);
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text = format!("{text}: {cause_text}");
        }
        source = cause.source();
    }
    text
}

/// A readable text for a watch error (the underlying client error when there is one).
pub fn describe_watch_error(error: &kube::runtime::watcher::Error) -> String {
    match error {
        kube::runtime::watcher::Error::InitialListFailed(source)
        | kube::runtime::watcher::Error::WatchStartFailed(source)
        | kube::runtime::watcher::Error::WatchFailed(source) => describe_kube_error(source),
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn api_error(code: u16) -> kube::Error {
        kube::Error::Api(
            kube::core::Status::failure("refused", "Reason")
                .with_code(code)
                .boxed(),
        )
    }

    #[test]
    fn only_an_absent_or_overloaded_server_is_unavailable() {
        for code in [500, 503, 504, 429] {
            assert!(is_server_unavailable(&api_error(code)), "{code}");
        }
        for code in [400, 403, 404, 409, 422] {
            assert!(!is_server_unavailable(&api_error(code)), "{code}");
        }
        let refused = kube::Error::Service("tcp connect error: Connection refused".into());
        assert!(is_server_unavailable(&refused));
    }

    #[test]
    fn rbac_refusals_are_told_from_other_forbidden_answers() {
        let rbac = |message: &str| {
            kube::Error::Api(
                kube::core::Status::failure(message, "Forbidden")
                    .with_code(403)
                    .boxed(),
            )
        };
        assert!(is_rbac_refusal(&rbac(
            r#"pods is forbidden: User "operator" cannot create resource "pods" in API group "" in the namespace "ns""#
        )));
        assert!(!is_rbac_refusal(&rbac(
            r#"pods "p" is forbidden: exceeded quota: no-pods, requested: pods=1, used: pods=0, limited: pods=0"#
        )));
        assert!(!is_rbac_refusal(&api_error(500)));
    }
}
