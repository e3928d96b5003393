//! The launcher's own VMI (and optionally its own pod) from the API.
//!
//! Protocol, per watched object:
//!
//! 1. `watcher` lists with `fieldSelector=metadata.name=<name>` and
//!    publishes what it found (`InitApply`), then watches from the list's
//!    resourceVersion with `allowWatchBookmarks=true`.
//! 2. Every ADDED/MODIFIED object is parsed the way the file source parses
//!    `kubectl get vmi -o json`; the result is sent only when it differs from
//!    the last one (`send_if_modified`), so status-only updates, bookmarks and
//!    re-lists of an unchanged object never wake the agent.
//! 3. A malformed object is logged with its resourceVersion and skipped: the
//!    last good spec stays.
//! 4. DELETED keeps the last spec: the VMI going away takes the launcher pod
//!    (and nicplug) with it; tearing down the NICs first would only race it.
//! 5. A dropped connection resumes the watch from the last resourceVersion
//!    seen (an event's or a bookmark's); a 410 Gone lists again. kube-rs
//!    re-lists for a 410 sent as a watch ERROR event (what the API server
//!    does) but retries the same resourceVersion forever when the watch
//!    request itself is answered with HTTP 410; this loop restarts the
//!    watcher (and so lists again) in that case.

use std::fmt::Debug;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{ApiResource, DynamicObject};
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher::{self, Event, watcher};
use kube::{Api, Client, Resource};
use serde::de::DeserializeOwned;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use super::K8sError;
use crate::error::error_chain;
use crate::model::network_status::{self, NetworkStatus};
use crate::model::vmi::Vmi;

/// kubevirt.io/v1 VirtualMachineInstance.
pub fn vmi_resource() -> ApiResource {
    ApiResource {
        group: "kubevirt.io".into(),
        version: "v1".into(),
        api_version: "kubevirt.io/v1".into(),
        kind: "VirtualMachineInstance".into(),
        plural: "virtualmachineinstances".into(),
    }
}

/// How long to wait before listing again after the watch request itself was
/// answered 410 Gone.
const RELIST_DELAY: Duration = Duration::from_secs(1);

/// Publishes the spec of VMI `namespace/name` into `tx` now and after every
/// change of what nicplug reads of it, until `shutdown`.
pub async fn watch_vmi(
    client: Client,
    namespace: &str,
    name: &str,
    tx: watch::Sender<Option<Vmi>>,
    shutdown: CancellationToken,
) -> Result<(), K8sError> {
    watch_vmi_and_uid(client, namespace, name, tx, None, shutdown).await
}

/// [`watch_vmi`], and the VMI's `metadata.uid` into `uid_tx` (for Events
/// that name the VMI exactly), also sent only when it changes.
pub async fn watch_vmi_and_uid(
    client: Client,
    namespace: &str,
    name: &str,
    tx: watch::Sender<Option<Vmi>>,
    uid_tx: Option<watch::Sender<Option<String>>>,
    shutdown: CancellationToken,
) -> Result<(), K8sError> {
    let api: Api<DynamicObject> = Api::namespaced_with(client, namespace, &vmi_resource());
    let apply = |mut obj: DynamicObject| {
        // The VMI endpoint only serves VMIs, but list items may come without
        // apiVersion/kind, which `Vmi::from_json_value` requires.
        if obj.types.is_none() {
            let resource = vmi_resource();
            obj.types = Some(kube::api::TypeMeta {
                api_version: resource.api_version,
                kind: resource.kind,
            });
        }
        let version = obj.metadata.resource_version.clone().unwrap_or_default();
        if let (Some(uid_tx), Some(uid)) = (&uid_tx, &obj.metadata.uid) {
            publish(uid_tx, uid.clone());
        }
        let value = match serde_json::to_value(&obj) {
            Ok(value) => value,
            Err(e) => {
                error!(vmi = %name, resource_version = %version, error = %e, "cannot re-encode the VMI object; keeping the last good spec");
                return;
            }
        };
        match Vmi::from_json_value(value) {
            Ok(vmi) => {
                let interfaces = vmi.interfaces.len();
                if publish(&tx, vmi) {
                    info!(vmi = %name, resource_version = %version, interfaces, "VMI spec changed");
                } else {
                    debug!(vmi = %name, resource_version = %version, "VMI update without a spec change");
                }
            }
            Err(e) => error!(
                vmi = %name,
                resource_version = %version,
                error = %error_chain(&e),
                "malformed VMI object from the API; keeping the last good spec"
            ),
        }
    };
    follow(api, "VMI", namespace, name, apply, &shutdown).await
}

/// Publishes the Multus network-status annotation
/// (`k8s.v1.cni.cncf.io/network-status`) of pod `namespace/name` into `tx`
/// now and after every change, until `shutdown`. A missing or unparsable
/// annotation is logged and the last good value stays.
pub async fn watch_own_pod(
    client: Client,
    namespace: &str,
    name: &str,
    tx: watch::Sender<Option<Vec<NetworkStatus>>>,
    shutdown: CancellationToken,
) -> Result<(), K8sError> {
    let api: Api<Pod> = Api::namespaced(client, namespace);
    let apply = |pod: Pod| {
        let version = pod.metadata.resource_version.clone().unwrap_or_default();
        let text = pod
            .metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(network_status::ANNOTATION));
        let Some(text) = text else {
            warn!(pod = %name, resource_version = %version, "pod has no {} annotation yet", network_status::ANNOTATION);
            return;
        };
        match network_status::parse(text) {
            Ok(status) => {
                let networks = status.len();
                if publish(&tx, status) {
                    info!(pod = %name, resource_version = %version, networks, "network-status changed");
                }
            }
            Err(e) => error!(
                pod = %name,
                resource_version = %version,
                error = %error_chain(&e),
                "malformed network-status annotation; keeping the last good one"
            ),
        }
    };
    follow(api, "pod", namespace, name, apply, &shutdown).await
}

/// Sends `value` unless it equals the current one; true when sent.
fn publish<T: PartialEq>(tx: &watch::Sender<Option<T>>, value: T) -> bool {
    tx.send_if_modified(|current| {
        if current.as_ref() == Some(&value) {
            false
        } else {
            *current = Some(value);
            true
        }
    })
}

/// Runs `watcher` on the one object `name`, handing every listed, added or
/// modified object to `apply`, until `shutdown`.
async fn follow<K>(
    api: Api<K>,
    what: &'static str,
    namespace: &str,
    name: &str,
    mut apply: impl FnMut(K),
    shutdown: &CancellationToken,
) -> Result<(), K8sError>
where
    K: Resource + Clone + DeserializeOwned + Debug + Send + 'static,
{
    let config = watcher::Config::default().fields(&format!("metadata.name={name}"));
    loop {
        let mut events = watcher(api.clone(), config.clone())
            .default_backoff()
            .boxed();
        let mut listed = false;
        loop {
            let event = tokio::select! {
                _ = shutdown.cancelled() => return Ok(()),
                event = events.next() => event,
            };
            match event {
                None => {
                    return Err(K8sError::WatchEnded {
                        what,
                        namespace: namespace.to_string(),
                        name: name.to_string(),
                    });
                }
                Some(Ok(Event::Init)) => {
                    debug!(what, %name, "listing");
                    listed = false;
                }
                Some(Ok(Event::InitApply(obj))) => {
                    listed = true;
                    apply(obj);
                }
                Some(Ok(Event::InitDone)) => {
                    if listed {
                        debug!(what, %name, "listed; watching");
                    } else {
                        warn!(what, %namespace, %name, "not found; waiting for it to appear");
                    }
                }
                Some(Ok(Event::Apply(obj))) => apply(obj),
                Some(Ok(Event::Delete(_))) => warn!(
                    what,
                    %namespace,
                    %name,
                    "deleted; keeping the last spec (the launcher pod goes away with it)"
                ),
                Some(Err(e)) => {
                    if is_gone(&e) {
                        info!(what, %name, "watch resourceVersion expired (410 Gone); listing again");
                    } else {
                        warn!(what, %name, error = %error_chain(&e), "watch failed; retrying with backoff");
                    }
                    if is_watch_start_gone(&e) {
                        break;
                    }
                }
            }
        }
        // Only for an HTTP 410 on the watch request: a fresh watcher lists again.
        tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            _ = tokio::time::sleep(RELIST_DELAY) => {}
        }
    }
}

fn is_gone(e: &watcher::Error) -> bool {
    match e {
        watcher::Error::WatchError(status) => status.code == 410,
        _ => is_watch_start_gone(e),
    }
}

/// The watch request (not an event in its stream) was answered 410 Gone.
fn is_watch_start_gone(e: &watcher::Error) -> bool {
    matches!(e, watcher::Error::WatchStartFailed(kube::Error::Api(status)) if status.code == 410)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn publish_only_on_change() {
        let (tx, mut rx) = watch::channel(None);
        assert!(publish(&tx, 1));
        assert!(rx.has_changed().unwrap());
        rx.borrow_and_update();
        assert!(!publish(&tx, 1));
        assert!(!rx.has_changed().unwrap());
        assert!(publish(&tx, 2));
        assert_eq!(*rx.borrow(), Some(2));
    }

    #[test]
    fn vmi_resource_path() {
        let url = DynamicObject::url_path(&vmi_resource(), Some("ns1"));
        assert_eq!(
            url,
            "/apis/kubevirt.io/v1/namespaces/ns1/virtualmachineinstances"
        );
    }
}
