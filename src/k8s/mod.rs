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

use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::error;

use crate::agent::Outcome;
use crate::error::error_chain;
use crate::model::network_status::NetworkStatus;
use crate::model::vmi::Vmi;
use crate::status::StatusDocument;

/// The Kubernetes client from in-cluster credentials (the pod's projected
/// service-account token) or, outside a cluster, `KUBECONFIG`.
pub async fn client() -> Result<kube::Client, K8sError> {
    let config = kube::Config::infer().await.map_err(K8sError::Config)?;
    Ok(kube::Client::try_from(config)?)
}

#[derive(Debug, thiserror::Error)]
pub enum K8sError {
    /// kube's message already holds both attempts' causes (its source
    /// chain repeats them), so it is shown once here instead of as a source.
    #[error("no Kubernetes credentials: {0}")]
    Config(kube::config::InferConfigError),
    #[error("cannot create the Kubernetes client")]
    Client(#[from] kube::Error),
    #[error("the watch of {what} {namespace}/{name} ended")]
    WatchEnded {
        what: &'static str,
        namespace: String,
        name: String,
    },
}

/// `--kube`: the client and the objects it is about.
pub struct Kube {
    pub client: kube::Client,
    pub namespace: String,
    /// The VMI's name.
    pub vmi: String,
    /// This (virt-launcher) pod's name.
    pub pod: String,
}

/// What the agent reads from the tasks [`Kube::spawn`] starts.
pub struct Spawned {
    /// Outcomes for Events; goes into `ReportConfig::outcomes`.
    pub outcomes: mpsc::UnboundedSender<Outcome>,
    /// The pod's network-status, when asked for.
    pub network_status: Option<watch::Receiver<Option<Vec<NetworkStatus>>>>,
}

impl Kube {
    /// Connects with [`client`]; `namespace` defaults to the client's (the
    /// service account's namespace in a pod).
    pub async fn connect(
        vmi: String,
        pod: String,
        namespace: Option<String>,
    ) -> Result<Self, K8sError> {
        let client = client().await?;
        let namespace = namespace.unwrap_or_else(|| client.default_namespace().to_string());
        Ok(Self {
            client,
            namespace,
            vmi,
            pod,
        })
    }

    /// Starts, into `tasks`, the VMI watch feeding `spec_tx` (and the VMI's
    /// uid for Events), the Events and pod annotation publishers, and with
    /// `network_status` the watch of the pod's network-status annotation.
    pub fn spawn(
        self,
        tasks: &mut JoinSet<()>,
        spec_tx: watch::Sender<Option<Vmi>>,
        status_rx: watch::Receiver<StatusDocument>,
        network_status: bool,
        shutdown: CancellationToken,
    ) -> Spawned {
        let (uid_tx, uid_rx) = watch::channel(None);
        let (outcomes, outcomes_rx) = mpsc::unbounded_channel();
        let (namespace, vmi) = (self.namespace.clone(), self.vmi.clone());
        self.spawn_api_task(
            tasks,
            &shutdown,
            "VMI API source",
            |client, shutdown| async move {
                vmi_source::watch_vmi_and_uid(
                    client,
                    &namespace,
                    &vmi,
                    spec_tx,
                    Some(uid_tx),
                    shutdown,
                )
                .await
            },
        );
        let network_status = network_status.then(|| {
            let (tx, rx) = watch::channel(None);
            let (namespace, pod) = (self.namespace.clone(), self.pod.clone());
            self.spawn_api_task(
                tasks,
                &shutdown,
                "network-status API source",
                |client, shutdown| async move {
                    vmi_source::watch_own_pod(client, &namespace, &pod, tx, shutdown).await
                },
            );
            rx
        });
        let (namespace, pod) = (self.namespace.clone(), self.pod.clone());
        self.spawn_api_task(
            tasks,
            &shutdown,
            "pod annotation",
            |client, shutdown| async move {
                report::publish_annotation(client, &namespace, &pod, status_rx, shutdown).await;
                Ok::<(), std::convert::Infallible>(())
            },
        );
        let vmi = report::VmiRef {
            namespace: self.namespace,
            name: self.vmi,
            uid: uid_rx,
        };
        tasks.spawn(report::publish_events(
            self.client,
            vmi,
            self.pod,
            outcomes_rx,
            shutdown,
        ));
        Spawned {
            outcomes,
            network_status,
        }
    }

    /// Starts one task that talks to the API with its own client and stop
    /// token; an error ends it with a log line naming `what`.
    fn spawn_api_task<F, E>(
        &self,
        tasks: &mut JoinSet<()>,
        shutdown: &CancellationToken,
        what: &'static str,
        task: impl FnOnce(kube::Client, CancellationToken) -> F,
    ) where
        F: Future<Output = Result<(), E>> + Send + 'static,
        E: std::error::Error + 'static,
    {
        let run = task(self.client.clone(), shutdown.clone());
        tasks.spawn(async move {
            if let Err(e) = run.await {
                error!(error = %error_chain(&e), "{what} stopped");
            }
        });
    }
}
