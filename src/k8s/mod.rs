//! The Kubernetes API side of `--kube`: the launcher's own VMI (and
//! optionally its own pod's Multus network-status) as inputs, and the pod
//! annotation and VMI Events as outputs for operators.
//!
//! Inputs feed the same `watch::Sender<Option<T>>` as the file sources
//! (`crate::sources`): `None` until a first good object, then always the
//! last good one, published only when what nicplug reads of it changed. The
//! watches use kube-rs' `watcher`: it lists, watches with bookmarks, resumes
//! from the last resourceVersion after a dropped connection and lists again
//! when the server answers 410 Gone; errors back off (`default_backoff`).
//!
//! Outputs never block the agent: they read the status document from a
//! `watch` channel and outcomes from an unbounded channel, and pace and
//! retry their API calls on their own.

pub mod report;
pub mod vmi_source;

/// The Kubernetes client from in-cluster credentials (the pod's projected
/// service-account token) or, outside a cluster, `KUBECONFIG`.
pub async fn client() -> Result<kube::Client, K8sError> {
    let config = kube::Config::infer().await?;
    Ok(kube::Client::try_from(config)?)
}

#[derive(Debug, thiserror::Error)]
pub enum K8sError {
    #[error("no Kubernetes credentials (neither a kubeconfig nor an in-cluster service account)")]
    Config(#[from] kube::config::InferConfigError),
    #[error("cannot create the Kubernetes client")]
    Client(#[from] kube::Error),
    #[error("the watch of {what} {namespace}/{name} ended")]
    WatchEnded {
        what: &'static str,
        namespace: String,
        name: String,
    },
}
