//! The `--kube` side against a local Kubernetes API stand-in.
//!
//! No real API server runs here (no cluster, no network): `StandIn` is a
//! small HTTP/1.1 server on 127.0.0.1 that answers the few requests nicplug
//! makes with the documents in `fixtures/kube/` (VMI and pod objects, list
//! responses, newline-delimited watch streams in the API server's wire
//! shape), records every request (method, path, decoded query, content type,
//! authorization, body) for the assertions, and lets a test feed a watch
//! stream line by line, drop the connection mid-stream, or answer a request
//! with an error status. The client is the real kube-rs client built from a
//! kubeconfig that points at `http://127.0.0.1:PORT` (no TLS), as `--kube`
//! builds it from KUBECONFIG outside a cluster.
//!
//! "Exactly once" is counted on the watch channel the agent reads: every
//! value the source sends is recorded by a task that wakes on each change.
//! Steps are spaced by `SETTLE`, far longer than the source needs locally,
//! so two sends never merge into one wake-up unnoticed.

use std::collections::{BTreeMap, VecDeque};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::{HeaderMap, Method, StatusCode, header};
use axum::response::Response;
use serde_json::{Value, json};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use nicplug::agent::{Outcome, OutcomeKind};
use nicplug::k8s::report::{self, VmiRef};
use nicplug::k8s::vmi_source;
use nicplug::model::network_status::NetworkStatus;
use nicplug::model::vmi::{SpecState, Vmi};
use nicplug::plan::Phase;
use nicplug::status::{InterfaceStatus, PhaseTransition, StatusDocument, Timestamp};

const NS: &str = "default";
const VMI: &str = "vmi-fedora";
const POD: &str = "virt-launcher-vmi-fedora-x7k2p";
const VMI_UID: &str = "5a4b1c2e-7c53-4a2c-9d8e-0c0f0a1b2c3d";
const TOKEN: &str = "stand-in-token";
const VMIS_PATH: &str = "/apis/kubevirt.io/v1/namespaces/default/virtualmachineinstances";
const PODS_PATH: &str = "/api/v1/namespaces/default/pods";
const EVENTS_PATH: &str = "/apis/events.k8s.io/v1/namespaces/default/events";
/// How long a step is given to show (or not show) its effect.
const SETTLE: Duration = Duration::from_millis(400);

fn fixture(name: &str) -> String {
    let path = format!("{}/fixtures/kube/{name}", env!("CARGO_MANIFEST_DIR"));
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
}

fn fixture_json(name: &str) -> Value {
    serde_json::from_str(&fixture(name)).unwrap()
}

fn fixture_lines(name: &str) -> Vec<String> {
    fixture(name).lines().map(str::to_string).collect()
}

// ---------------------------------------------------------------------------
// The stand-in

/// One request as the stand-in saw it.
#[derive(Debug, Clone)]
struct Seen {
    method: Method,
    path: String,
    query: BTreeMap<String, String>,
    content_type: Option<String>,
    authorization: Option<String>,
    body: Vec<u8>,
}

impl Seen {
    fn is_watch(&self) -> bool {
        self.query
            .get("watch")
            .is_some_and(|v| v == "true" || v == "1")
    }
    fn q(&self, key: &str) -> Option<&str> {
        self.query.get(key).map(String::as_str)
    }
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap()
    }
}

/// What a watch stream does next.
enum Frame {
    Line(String),
    /// Break the connection mid-body (no terminating chunk).
    Drop,
}

/// The answer to the next watch request.
enum WatchReply {
    /// A 200 stream fed by the test; ends cleanly when the sender is dropped.
    Stream(mpsc::UnboundedReceiver<Frame>),
    /// An error status with a `Status` body.
    Status(StatusCode, Value),
}

#[derive(Default)]
struct Shared {
    seen: Mutex<Vec<Seen>>,
    /// List responses in order; the last one repeats.
    lists: Mutex<VecDeque<Value>>,
    /// Replies to watch requests in order; none left: a stream that stays
    /// open and silent.
    watches: Mutex<VecDeque<WatchReply>>,
    /// The pod served at `GET/PATCH pods/<POD>`; PATCH merges annotations.
    pod: Mutex<Option<Value>>,
    /// Fail this many PATCH requests with 500 first.
    failing_patches: Mutex<u32>,
}

#[derive(Clone)]
struct StandIn {
    addr: SocketAddr,
    shared: Arc<Shared>,
}

impl StandIn {
    async fn start() -> Self {
        init_logging();
        let shared = Arc::new(Shared::default());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let app = axum::Router::new()
            .fallback(handle)
            .with_state(shared.clone());
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        Self { addr, shared }
    }

    /// A kube-rs client from a kubeconfig naming this server, like `--kube`
    /// with KUBECONFIG (the file is read, not the environment, so parallel
    /// tests do not share a variable).
    async fn client(&self) -> kube::Client {
        use kube::config::{KubeConfigOptions, Kubeconfig};
        let dir = std::env::temp_dir().join(format!(
            "nicplug-kube-api-{}-{}",
            std::process::id(),
            self.addr.port()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("kubeconfig");
        std::fs::write(
            &path,
            format!(
                "apiVersion: v1\nkind: Config\n\
                 clusters:\n- name: stand-in\n  cluster:\n    server: http://{}\n\
                 users:\n- name: nicplug\n  user:\n    token: {TOKEN}\n\
                 contexts:\n- name: stand-in\n  context:\n    cluster: stand-in\n    user: nicplug\n    namespace: {NS}\n\
                 current-context: stand-in\n",
                self.addr
            ),
        )
        .unwrap();
        let kubeconfig = Kubeconfig::read_from(&path).unwrap();
        let config =
            kube::Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
                .await
                .unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
        kube::Client::try_from(config).unwrap()
    }

    fn push_list(&self, list: Value) {
        self.shared.lists.lock().unwrap().push_back(list);
    }

    /// Queues a fed stream for the next watch request; returns its feeder.
    fn push_watch_stream(&self) -> mpsc::UnboundedSender<Frame> {
        let (tx, rx) = mpsc::unbounded_channel();
        self.shared
            .watches
            .lock()
            .unwrap()
            .push_back(WatchReply::Stream(rx));
        tx
    }

    fn push_watch_status(&self, code: StatusCode, body: Value) {
        self.shared
            .watches
            .lock()
            .unwrap()
            .push_back(WatchReply::Status(code, body));
    }

    fn set_pod(&self, pod: Value) {
        *self.shared.pod.lock().unwrap() = Some(pod);
    }

    fn pod(&self) -> Value {
        self.shared.pod.lock().unwrap().clone().unwrap()
    }

    fn seen(&self) -> Vec<Seen> {
        self.shared.seen.lock().unwrap().clone()
    }

    fn seen_where(&self, f: impl Fn(&Seen) -> bool) -> Vec<Seen> {
        self.seen().into_iter().filter(|s| f(s)).collect()
    }

    fn lists_of(&self, path: &str) -> Vec<Seen> {
        self.seen_where(|s| s.method == Method::GET && s.path == path && !s.is_watch())
    }

    fn watches_of(&self, path: &str) -> Vec<Seen> {
        self.seen_where(|s| s.method == Method::GET && s.path == path && s.is_watch())
    }

    fn patches(&self) -> Vec<Seen> {
        self.seen_where(|s| s.method == Method::PATCH)
    }

    fn events(&self) -> Vec<Value> {
        self.seen_where(|s| s.method == Method::POST && s.path == EVENTS_PATH)
            .iter()
            .map(Seen::json)
            .collect()
    }
}

fn status_body(code: StatusCode, reason: &str, message: &str) -> Value {
    json!({
        "kind": "Status", "apiVersion": "v1", "metadata": {},
        "status": "Failure", "message": message, "reason": reason, "code": code.as_u16()
    })
}

fn respond(code: StatusCode, body: &Value) -> Response {
    Response::builder()
        .status(code)
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from(body.to_string()))
        .unwrap()
}

fn decode_query(raw: &str) -> BTreeMap<String, String> {
    fn unescape(s: &str) -> String {
        let bytes = s.as_bytes();
        let mut out = Vec::with_capacity(bytes.len());
        let mut i = 0;
        while i < bytes.len() {
            match bytes[i] {
                b'%' if i + 2 < bytes.len() => {
                    let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).unwrap();
                    out.push(u8::from_str_radix(hex, 16).unwrap());
                    i += 3;
                }
                b'+' => {
                    out.push(b' ');
                    i += 1;
                }
                b => {
                    out.push(b);
                    i += 1;
                }
            }
        }
        String::from_utf8(out).unwrap()
    }
    raw.split('&')
        .filter(|kv| !kv.is_empty())
        .map(|kv| {
            let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
            (unescape(k), unescape(v))
        })
        .collect()
}

fn header_str(headers: &HeaderMap, name: header::HeaderName) -> Option<String> {
    headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
}

async fn handle(State(shared): State<Arc<Shared>>, req: Request) -> Response {
    let (parts, body) = req.into_parts();
    let body = axum::body::to_bytes(body, 1 << 20).await.unwrap().to_vec();
    let seen = Seen {
        method: parts.method.clone(),
        path: parts.uri.path().to_string(),
        query: decode_query(parts.uri.query().unwrap_or("")),
        content_type: header_str(&parts.headers, header::CONTENT_TYPE),
        authorization: header_str(&parts.headers, header::AUTHORIZATION),
        body,
    };
    shared.seen.lock().unwrap().push(seen.clone());
    let pod_path = format!("{PODS_PATH}/{POD}");
    match (&seen.method, seen.path.as_str()) {
        (&Method::GET, VMIS_PATH | PODS_PATH) if seen.is_watch() => {
            let reply = shared.watches.lock().unwrap().pop_front();
            match reply {
                Some(WatchReply::Status(code, body)) => respond(code, &body),
                Some(WatchReply::Stream(rx)) => watch_response(Some(rx)),
                None => watch_response(None),
            }
        }
        (&Method::GET, VMIS_PATH | PODS_PATH) => {
            let mut lists = shared.lists.lock().unwrap();
            let list = if lists.len() > 1 {
                lists.pop_front()
            } else {
                lists.front().cloned()
            };
            match list {
                Some(list) => respond(StatusCode::OK, &list),
                None => respond(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    &status_body(
                        StatusCode::INTERNAL_SERVER_ERROR,
                        "InternalError",
                        "no list queued",
                    ),
                ),
            }
        }
        (&Method::GET, path) if path == pod_path => match shared.pod.lock().unwrap().clone() {
            Some(pod) => respond(StatusCode::OK, &pod),
            None => respond(
                StatusCode::NOT_FOUND,
                &status_body(StatusCode::NOT_FOUND, "NotFound", "pods not found"),
            ),
        },
        (&Method::PATCH, path) if path == pod_path => {
            {
                let mut failing = shared.failing_patches.lock().unwrap();
                if *failing > 0 {
                    *failing -= 1;
                    let code = StatusCode::INTERNAL_SERVER_ERROR;
                    return respond(
                        code,
                        &status_body(code, "InternalError", "etcdserver: request timed out"),
                    );
                }
            }
            let patch: Value = serde_json::from_slice(&seen.body).unwrap();
            let mut guard = shared.pod.lock().unwrap();
            let pod = guard.as_mut().unwrap();
            if let Some(annotations) = patch["metadata"]["annotations"].as_object() {
                for (k, v) in annotations {
                    pod["metadata"]["annotations"][k] = v.clone();
                }
            }
            respond(StatusCode::OK, pod)
        }
        (&Method::POST, EVENTS_PATH) => {
            let mut event: Value = serde_json::from_slice(&seen.body).unwrap();
            event["metadata"]["uid"] = json!("00000000-0000-4000-8000-000000000001");
            event["metadata"]["resourceVersion"] = json!("49000");
            respond(StatusCode::CREATED, &event)
        }
        _ => respond(
            StatusCode::NOT_FOUND,
            &status_body(
                StatusCode::NOT_FOUND,
                "NotFound",
                "the stand-in does not serve this",
            ),
        ),
    }
}

fn watch_response(rx: Option<mpsc::UnboundedReceiver<Frame>>) -> Response {
    let stream = futures::stream::unfold(rx, |rx| async move {
        let Some(mut rx) = rx else {
            std::future::pending::<()>().await;
            return None;
        };
        match rx.recv().await {
            Some(Frame::Line(line)) => Some((Ok(Bytes::from(format!("{line}\n"))), Some(rx))),
            Some(Frame::Drop) => Some((
                Err(std::io::Error::new(
                    std::io::ErrorKind::ConnectionReset,
                    "stand-in drops the connection",
                )),
                None,
            )),
            None => None,
        }
    });
    Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from_stream(stream))
        .unwrap()
}

// ---------------------------------------------------------------------------
// Helpers

/// nicplug's logs in the test output (shown for failing tests), filtered by
/// NICPLUG_LOG (default: nicplug at debug).
fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("NICPLUG_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("nicplug=debug"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_test_writer()
        .try_init();
}

async fn eventually(what: &str, timeout: Duration, mut ok: impl FnMut() -> bool) {
    let start = Instant::now();
    while !ok() {
        assert!(start.elapsed() < timeout, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Every value sent on `rx` after it was created, in order.
fn record<T: Clone + Send + Sync + 'static>(
    mut rx: watch::Receiver<Option<T>>,
) -> Arc<Mutex<Vec<T>>> {
    let values = Arc::new(Mutex::new(Vec::new()));
    let out = values.clone();
    tokio::spawn(async move {
        while rx.changed().await.is_ok() {
            if let Some(v) = rx.borrow_and_update().clone() {
                values.lock().unwrap().push(v);
            }
        }
    });
    out
}

struct VmiWatch {
    specs: Arc<Mutex<Vec<Vmi>>>,
    uids: Arc<Mutex<Vec<String>>>,
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

impl VmiWatch {
    async fn start(standin: &StandIn) -> Self {
        let client = standin.client().await;
        let (tx, rx) = watch::channel(None);
        let (uid_tx, uid_rx) = watch::channel(None);
        let specs = record(rx);
        let uids = record(uid_rx);
        let shutdown = CancellationToken::new();
        let task = {
            let shutdown = shutdown.clone();
            tokio::spawn(async move {
                vmi_source::watch_vmi_and_uid(client, NS, VMI, tx, Some(uid_tx), shutdown)
                    .await
                    .unwrap()
            })
        };
        Self {
            specs,
            uids,
            shutdown,
            task,
        }
    }

    fn count(&self) -> usize {
        self.specs.lock().unwrap().len()
    }

    fn last(&self) -> Vmi {
        self.specs.lock().unwrap().last().cloned().unwrap()
    }

    async fn wait_count(&self, n: usize) {
        eventually(
            &format!("{n} published specs"),
            Duration::from_secs(10),
            || self.count() >= n,
        )
        .await;
        tokio::time::sleep(SETTLE).await;
        assert_eq!(self.count(), n, "published more than once");
    }

    /// `n` published so far, and still `n` after a settle time.
    async fn still(&self, n: usize) {
        tokio::time::sleep(SETTLE).await;
        assert_eq!(
            self.count(),
            n,
            "an update without a spec change was published"
        );
    }

    async fn stop(self) {
        self.shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(5), self.task)
            .await
            .expect("watch_vmi stops on shutdown")
            .unwrap();
    }
}

fn names(vmi: &Vmi) -> Vec<&str> {
    vmi.interfaces.iter().map(|i| i.name.as_str()).collect()
}

// ---------------------------------------------------------------------------
// VMI source

#[tokio::test]
async fn list_publishes_once_then_only_spec_changes_wake_the_agent() {
    let standin = StandIn::start().await;
    standin.push_list(fixture_json("vmi-list.json"));
    let feed = standin.push_watch_stream();
    let w = VmiWatch::start(&standin).await;

    // The list: one spec.
    w.wait_count(1).await;
    assert_eq!(names(&w.last()), ["default", "dyniface1", "dyniface2"]);
    assert_eq!(w.last().namespace, NS);
    assert_eq!(*w.uids.lock().unwrap(), [VMI_UID]);

    // What was asked: one VMI by name, then a watch from the list's version
    // with bookmarks, with the kubeconfig's token.
    let lists = standin.lists_of(VMIS_PATH);
    assert_eq!(lists.len(), 1);
    assert_eq!(
        lists[0].q("fieldSelector"),
        Some("metadata.name=vmi-fedora")
    );
    assert_eq!(
        lists[0].authorization.as_deref(),
        Some("Bearer stand-in-token")
    );
    eventually("the watch request", Duration::from_secs(5), || {
        standin.watches_of(VMIS_PATH).len() == 1
    })
    .await;
    let watch = &standin.watches_of(VMIS_PATH)[0];
    assert_eq!(watch.q("fieldSelector"), Some("metadata.name=vmi-fedora"));
    assert_eq!(watch.q("resourceVersion"), Some("48300"));
    assert_eq!(watch.q("allowWatchBookmarks"), Some("true"));

    let lines = fixture_lines("watch-changes.ndjson");
    let [added, status_only, malformed, add_iface, bookmark] = lines.as_slice() else {
        panic!("watch-changes.ndjson has 5 events");
    };
    // ADDED with the same spec: nothing.
    feed.send(Frame::Line(added.clone())).unwrap();
    w.still(1).await;
    // MODIFIED, status only (guest agent connected, IPs): nothing.
    feed.send(Frame::Line(status_only.clone())).unwrap();
    w.still(1).await;
    // MODIFIED with a spec nicplug cannot read: logged, last good spec stays.
    feed.send(Frame::Line(malformed.clone())).unwrap();
    w.still(1).await;
    // MODIFIED adding dyniface3: exactly one publish.
    feed.send(Frame::Line(add_iface.clone())).unwrap();
    w.wait_count(2).await;
    assert_eq!(
        names(&w.last()),
        ["default", "dyniface1", "dyniface2", "dyniface3"]
    );
    // BOOKMARK: nothing.
    feed.send(Frame::Line(bookmark.clone())).unwrap();
    w.still(2).await;

    // No re-list or re-watch happened along the way.
    assert_eq!(standin.lists_of(VMIS_PATH).len(), 1);
    assert_eq!(standin.watches_of(VMIS_PATH).len(), 1);
    assert_eq!(w.uids.lock().unwrap().len(), 1, "the uid is sent once");
    w.stop().await;
}

#[tokio::test]
async fn watch_error_410_relists_without_a_duplicate_publish() {
    let standin = StandIn::start().await;
    standin.push_list(fixture_json("vmi-list.json"));
    // The re-list: the same VMI at a newer version (a status-only change).
    standin.push_list(fixture_json("vmi-list-relisted.json"));
    let feed = standin.push_watch_stream();
    let feed_after = standin.push_watch_stream();
    let w = VmiWatch::start(&standin).await;
    w.wait_count(1).await;
    eventually("the watch request", Duration::from_secs(5), || {
        standin.watches_of(VMIS_PATH).len() == 1
    })
    .await;

    // The API server's answer to an expired version: an ERROR event, code 410.
    feed.send(Frame::Line(fixture_lines("watch-gone.ndjson")[0].clone()))
        .unwrap();
    eventually("a second list", Duration::from_secs(10), || {
        standin.lists_of(VMIS_PATH).len() == 2
    })
    .await;
    eventually(
        "the watch after the re-list",
        Duration::from_secs(10),
        || standin.watches_of(VMIS_PATH).len() == 2,
    )
    .await;
    let rewatch = &standin.watches_of(VMIS_PATH)[1];
    assert_eq!(rewatch.q("resourceVersion"), Some("48502"));
    // The re-listed VMI has the same spec: no second publish.
    w.still(1).await;

    // The next spec change after the re-list is published once.
    feed_after
        .send(Frame::Line(
            fixture_lines("watch-changes.ndjson")[3].clone(),
        ))
        .unwrap();
    w.wait_count(2).await;
    assert_eq!(names(&w.last()).len(), 4);
    w.stop().await;
}

#[tokio::test]
async fn http_410_on_the_watch_request_relists() {
    let standin = StandIn::start().await;
    standin.push_list(fixture_json("vmi-list.json"));
    standin.push_list(fixture_json("vmi-list-relisted.json"));
    standin.push_watch_status(StatusCode::GONE, fixture_json("status-410-gone.json"));
    let feed_after = standin.push_watch_stream();
    let w = VmiWatch::start(&standin).await;
    w.wait_count(1).await;

    // kube-rs alone would retry the watch with the expired version forever;
    // the source starts over with a list.
    eventually("a second list", Duration::from_secs(10), || {
        standin.lists_of(VMIS_PATH).len() == 2
    })
    .await;
    eventually(
        "the watch after the re-list",
        Duration::from_secs(10),
        || standin.watches_of(VMIS_PATH).len() == 2,
    )
    .await;
    let watches = standin.watches_of(VMIS_PATH);
    assert_eq!(watches[0].q("resourceVersion"), Some("48300"));
    assert_eq!(watches[1].q("resourceVersion"), Some("48502"));
    w.still(1).await;

    feed_after
        .send(Frame::Line(
            fixture_lines("watch-changes.ndjson")[3].clone(),
        ))
        .unwrap();
    w.wait_count(2).await;
    w.stop().await;
}

#[tokio::test]
async fn dropped_connection_resumes_from_the_last_resource_version() {
    let standin = StandIn::start().await;
    standin.push_list(fixture_json("vmi-list.json"));
    let feed = standin.push_watch_stream();
    let feed_resumed = standin.push_watch_stream();
    let w = VmiWatch::start(&standin).await;
    w.wait_count(1).await;

    let lines = fixture_lines("watch-changes.ndjson");
    feed.send(Frame::Line(lines[3].clone())).unwrap(); // dyniface3 added, rv 48342
    w.wait_count(2).await;
    feed.send(Frame::Line(lines[4].clone())).unwrap(); // BOOKMARK, rv 48400
    w.still(2).await;
    feed.send(Frame::Drop).unwrap();

    eventually("the resumed watch", Duration::from_secs(10), || {
        standin.watches_of(VMIS_PATH).len() == 2
    })
    .await;
    let resumed = &standin.watches_of(VMIS_PATH)[1];
    // From the bookmark's version, not the list's: no re-list needed.
    assert_eq!(resumed.q("resourceVersion"), Some("48400"));
    assert_eq!(resumed.q("fieldSelector"), Some("metadata.name=vmi-fedora"));
    assert_eq!(standin.lists_of(VMIS_PATH).len(), 1);
    w.still(2).await;

    // The next change (dyniface2 unplugged) is published once.
    feed_resumed
        .send(Frame::Line(
            fixture_lines("watch-resumed.ndjson")[0].clone(),
        ))
        .unwrap();
    w.wait_count(3).await;
    let unplugged = w.last();
    let dyniface2 = unplugged
        .interfaces
        .iter()
        .find(|i| i.name == "dyniface2")
        .unwrap();
    assert_eq!(dyniface2.state, SpecState::Absent);
    w.stop().await;
}

#[tokio::test]
async fn own_pod_network_status_published_only_when_it_changes() {
    let standin = StandIn::start().await;
    standin.push_list(fixture_json("pod-list.json"));
    let feed = standin.push_watch_stream();
    let client = standin.client().await;
    let (tx, rx) = watch::channel(None);
    let published: Arc<Mutex<Vec<Vec<NetworkStatus>>>> = record(rx);
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(vmi_source::watch_own_pod(
        client,
        NS,
        POD,
        tx,
        shutdown.clone(),
    ));
    let count = || published.lock().unwrap().len();
    eventually("the listed network-status", Duration::from_secs(10), || {
        count() == 1
    })
    .await;
    let first = published.lock().unwrap()[0].clone();
    assert_eq!(first.len(), 3);
    assert_eq!(first[1].name, "default/dyn-nad-1");
    assert_eq!(first[1].interface.as_deref(), Some("pod9a6a0c3b4d8"));
    let list = &standin.lists_of(PODS_PATH)[0];
    assert_eq!(
        list.q("fieldSelector"),
        Some("metadata.name=virt-launcher-vmi-fedora-x7k2p")
    );

    let lines = fixture_lines("pod-watch.ndjson");
    feed.send(Frame::Line(lines[0].clone())).unwrap(); // a label changed
    tokio::time::sleep(SETTLE).await;
    assert_eq!(count(), 1);
    feed.send(Frame::Line(lines[1].clone())).unwrap(); // Multus adds dyn-nad-3
    eventually("the new network-status", Duration::from_secs(5), || {
        count() == 2
    })
    .await;
    tokio::time::sleep(SETTLE).await;
    assert_eq!(count(), 2);
    let second = published.lock().unwrap()[1].clone();
    assert_eq!(second[3].interface.as_deref(), Some("pode516db4ecde"));
    shutdown.cancel();
    task.await.unwrap().unwrap();
}

// ---------------------------------------------------------------------------
// Events

fn vmi_ref(uid: Option<&str>) -> VmiRef {
    let (_tx, rx) = watch::channel(uid.map(str::to_string));
    VmiRef {
        namespace: NS.into(),
        name: VMI.into(),
        uid: rx,
    }
}

async fn start_events(
    standin: &StandIn,
) -> (
    mpsc::UnboundedSender<Outcome>,
    CancellationToken,
    tokio::task::JoinHandle<()>,
) {
    let client = standin.client().await;
    let (tx, rx) = mpsc::unbounded_channel();
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(report::publish_events(
        client,
        vmi_ref(Some(VMI_UID)),
        POD.into(),
        rx,
        shutdown.clone(),
    ));
    (tx, shutdown, task)
}

fn outcome(interface: &str, kind: OutcomeKind, message: &str) -> Outcome {
    Outcome {
        interface: interface.into(),
        kind,
        message: message.into(),
    }
}

#[tokio::test]
async fn an_event_per_outcome_kind_on_the_vmi() {
    let standin = StandIn::start().await;
    let (tx, shutdown, task) = start_events(&standin).await;
    tx.send(outcome(
        "dyniface1",
        OutcomeKind::Plugged,
        "plugged in 0.162s: plumbed 0.004s, attached 0.031s, ready 0.127s",
    ))
    .unwrap();
    tx.send(outcome(
        "dyniface2",
        OutcomeKind::Unplugged,
        "unplugged in 1.204s",
    ))
    .unwrap();
    tx.send(outcome(
        "dyniface3",
        OutcomeKind::Failed,
        "no free PCIe root port for hotplug: 4 of 4 in use",
    ))
    .unwrap();
    eventually("3 events", Duration::from_secs(5), || {
        standin.events().len() == 3
    })
    .await;
    let seen = standin.seen_where(|s| s.method == Method::POST);
    assert!(seen.iter().all(|s| s.path == EVENTS_PATH));
    assert!(
        seen.iter()
            .all(|s| s.content_type.as_deref() == Some("application/json"))
    );
    let events = standin.events();
    let expected = [
        (
            "NicHotplugged",
            "Normal",
            "Attach",
            "dyniface1: plugged in 0.162s: plumbed 0.004s, attached 0.031s, ready 0.127s",
        ),
        (
            "NicUnplugged",
            "Normal",
            "Detach",
            "dyniface2: unplugged in 1.204s",
        ),
        (
            "NicHotplugFailed",
            "Warning",
            "Reconcile",
            "dyniface3: no free PCIe root port for hotplug: 4 of 4 in use",
        ),
    ];
    for (event, (reason, type_, action, note)) in events.iter().zip(expected) {
        assert_eq!(event["apiVersion"], "events.k8s.io/v1");
        assert_eq!(event["kind"], "Event");
        assert_eq!(event["reason"], reason);
        assert_eq!(event["type"], type_);
        assert_eq!(event["action"], action);
        assert_eq!(event["note"], note);
        assert_eq!(
            event["regarding"],
            json!({
                "apiVersion": "kubevirt.io/v1",
                "kind": "VirtualMachineInstance",
                "name": VMI,
                "namespace": NS,
                "uid": VMI_UID,
            })
        );
        assert_eq!(event["reportingController"], "nicplug");
        assert_eq!(event["reportingInstance"], POD);
        assert_eq!(event["metadata"]["namespace"], NS);
        assert!(
            event["metadata"]["name"]
                .as_str()
                .unwrap()
                .starts_with("vmi-fedora.")
        );
        assert!(event["eventTime"].as_str().unwrap().ends_with('Z'));
    }
    shutdown.cancel();
    task.await.unwrap();
}

#[tokio::test]
async fn a_failure_burst_is_one_event_and_one_folded_follow_up() {
    let standin = StandIn::start().await;
    let (tx, shutdown, task) = start_events(&standin).await;
    let started = Instant::now();
    for n in 1..=5 {
        tx.send(outcome(
            "dyniface1",
            OutcomeKind::Failed,
            &format!("attach failed: internal error: unable to execute QEMU command 'device_add' (try {n})"),
        ))
        .unwrap();
    }
    eventually("the first event", Duration::from_secs(5), || {
        !standin.events().is_empty()
    })
    .await;
    tokio::time::sleep(SETTLE).await;
    assert_eq!(standin.events().len(), 1, "the burst is held back");
    assert!(
        standin.events()[0]["note"]
            .as_str()
            .unwrap()
            .ends_with("(try 1)")
    );

    // The window ends: one folded Event with the latest message and the count.
    eventually("the folded event", report::EVENT_WINDOW * 2, || {
        standin.events().len() == 2
    })
    .await;
    assert!(started.elapsed() >= report::EVENT_WINDOW - Duration::from_millis(100));
    let folded = &standin.events()[1];
    assert_eq!(folded["reason"], "NicHotplugFailed");
    assert_eq!(folded["type"], "Warning");
    assert_eq!(
        folded["note"],
        "dyniface1: attach failed: internal error: unable to execute QEMU command 'device_add' (try 5) (4 times in the last 10s)"
    );
    tokio::time::sleep(SETTLE).await;
    assert_eq!(standin.events().len(), 2, "at most one folded follow-up");
    shutdown.cancel();
    task.await.unwrap();
}

// ---------------------------------------------------------------------------
// Pod annotation

fn doc(phase: Phase, message: Option<&str>) -> StatusDocument {
    let mut iface = InterfaceStatus::new("dyniface1", phase);
    iface.mac = Some("02:00:00:aa:bb:01".into());
    iface.pod_interface_name = Some("pod9a6a0c3b4d8".into());
    iface.message = message.map(str::to_string);
    iface.pod_interface_seen = Some(Timestamp::now());
    iface.phase_transitions = vec![PhaseTransition {
        phase,
        at: Timestamp::now(),
    }];
    StatusDocument {
        interfaces: vec![iface],
        ..StatusDocument::default()
    }
}

fn annotation_of(patch: &Seen) -> String {
    let body = patch.json();
    assert_eq!(
        body.as_object().unwrap().keys().collect::<Vec<_>>(),
        ["metadata"],
        "the patch touches nothing but the annotation"
    );
    let annotations = body["metadata"]["annotations"].as_object().unwrap();
    assert_eq!(annotations.len(), 1);
    annotations[report::ANNOTATION]
        .as_str()
        .unwrap()
        .to_string()
}

async fn start_annotation(
    standin: &StandIn,
) -> (
    watch::Sender<StatusDocument>,
    CancellationToken,
    tokio::task::JoinHandle<()>,
) {
    let client = standin.client().await;
    let (tx, rx) = watch::channel(StatusDocument::default());
    let shutdown = CancellationToken::new();
    let task = {
        let shutdown = shutdown.clone();
        tokio::spawn(async move { report::publish_annotation(client, NS, POD, rx, shutdown).await })
    };
    (tx, shutdown, task)
}

#[tokio::test]
async fn annotation_patched_once_per_change() {
    let standin = StandIn::start().await;
    standin.set_pod(fixture_json("pod.json"));
    let (tx, shutdown, task) = start_annotation(&standin).await;

    let attached = doc(Phase::Attached, None);
    tx.send(attached.clone()).unwrap();
    eventually("the first patch", Duration::from_secs(5), || {
        standin.patches().len() == 1
    })
    .await;
    let patch = &standin.patches()[0];
    assert_eq!(patch.method, Method::PATCH);
    assert_eq!(patch.path, format!("{PODS_PATH}/{POD}"));
    assert_eq!(patch.q("fieldManager"), Some("nicplug"));
    assert_eq!(
        patch.content_type.as_deref(),
        Some("application/merge-patch+json")
    );
    let expected = r#"[{"name":"dyniface1","mac":"02:00:00:aa:bb:01","podInterfaceName":"pod9a6a0c3b4d8","phase":"Attached"}]"#;
    assert_eq!(annotation_of(patch), expected);
    assert_eq!(
        standin.pod()["metadata"]["annotations"][report::ANNOTATION],
        expected
    );

    // The same document again, and the same state with new timestamps: no patch.
    tx.send(attached.clone()).unwrap();
    tx.send(doc(Phase::Attached, None)).unwrap();
    tokio::time::sleep(report::ANNOTATION_MIN_INTERVAL + SETTLE).await;
    assert_eq!(standin.patches().len(), 1);

    // A change: patched again.
    tx.send(doc(Phase::Failed, Some("attach failed: device busy")))
        .unwrap();
    eventually("the second patch", Duration::from_secs(5), || {
        standin.patches().len() == 2
    })
    .await;
    assert_eq!(
        annotation_of(&standin.patches()[1]),
        r#"[{"name":"dyniface1","mac":"02:00:00:aa:bb:01","podInterfaceName":"pod9a6a0c3b4d8","phase":"Failed","message":"attach failed: device busy"}]"#
    );

    // A burst right after: one patch, with the latest, no sooner than the
    // minimum interval after the previous one.
    let second_at = Instant::now();
    for phase in [Phase::Plumbed, Phase::Attached, Phase::Ready] {
        tx.send(doc(phase, None)).unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    eventually("the burst's patch", Duration::from_secs(5), || {
        standin.patches().len() == 3
    })
    .await;
    assert!(second_at.elapsed() >= report::ANNOTATION_MIN_INTERVAL - Duration::from_millis(200));
    tokio::time::sleep(report::ANNOTATION_MIN_INTERVAL + SETTLE).await;
    assert_eq!(standin.patches().len(), 3, "the burst coalesced");
    assert!(annotation_of(&standin.patches()[2]).contains(r#""phase":"Ready""#));
    shutdown.cancel();
    task.await.unwrap();
}

#[tokio::test]
async fn annotation_survives_restart_and_api_errors() {
    let standin = StandIn::start().await;
    let mut pod = fixture_json("pod.json");
    let attached = doc(Phase::Attached, None);
    pod["metadata"]["annotations"][report::ANNOTATION] = json!(report::annotation_value(&attached));
    standin.set_pod(pod);
    *standin.shared.failing_patches.lock().unwrap() = 2;
    let (tx, shutdown, task) = start_annotation(&standin).await;

    // A restarted nicplug finds its value on the pod: nothing to write.
    eventually("the pod read", Duration::from_secs(5), || {
        !standin
            .seen_where(|s| s.method == Method::GET && s.path.ends_with(POD))
            .is_empty()
    })
    .await;
    tx.send(attached).unwrap();
    tokio::time::sleep(report::ANNOTATION_MIN_INTERVAL + SETTLE).await;
    assert!(standin.patches().is_empty());

    // A change while the API fails twice: retried with backoff until written.
    tx.send(doc(Phase::Ready, None)).unwrap();
    eventually("the patch to go through", Duration::from_secs(10), || {
        standin.patches().len() == 3
    })
    .await;
    let patches = standin.patches();
    assert!(patches.iter().all(|p| annotation_of(p).contains("Ready")));
    assert_eq!(
        standin.pod()["metadata"]["annotations"][report::ANNOTATION],
        annotation_of(&patches[2])
    );
    tokio::time::sleep(SETTLE).await;
    assert_eq!(standin.patches().len(), 3);
    shutdown.cancel();
    task.await.unwrap();
}

// ---------------------------------------------------------------------------
// The `--kube` wiring

#[tokio::test]
async fn kube_spawn_feeds_the_spec_and_names_the_watched_vmi_uid_in_events() {
    let standin = StandIn::start().await;
    standin.push_list(fixture_json("vmi-list.json"));
    standin.set_pod(fixture_json("pod.json"));
    let kube = nicplug::k8s::Kube {
        client: standin.client().await,
        namespace: NS.into(),
        vmi: VMI.into(),
        pod: POD.into(),
    };
    let (spec_tx, spec_rx) = watch::channel(None);
    let specs = record(spec_rx);
    let (status_tx, status_rx) = watch::channel(StatusDocument::default());
    let shutdown = CancellationToken::new();
    let mut tasks = tokio::task::JoinSet::new();
    let spawned = kube.spawn(&mut tasks, spec_tx, status_rx, false, shutdown.clone());
    assert!(spawned.network_status.is_none());

    eventually("the spec", Duration::from_secs(10), || {
        specs.lock().unwrap().len() == 1
    })
    .await;
    // The uid comes from the watched object, not from configuration.
    spawned
        .outcomes
        .send(outcome(
            "dyniface1",
            OutcomeKind::Plugged,
            "plugged in 0.2s",
        ))
        .unwrap();
    status_tx.send(doc(Phase::Ready, None)).unwrap();
    eventually("the event and the patch", Duration::from_secs(5), || {
        standin.events().len() == 1 && standin.patches().len() == 1
    })
    .await;
    assert_eq!(standin.events()[0]["regarding"]["uid"], VMI_UID);
    assert!(annotation_of(&standin.patches()[0]).contains(r#""phase":"Ready""#));

    shutdown.cancel();
    let all = async { while tasks.join_next().await.is_some() {} };
    tokio::time::timeout(Duration::from_secs(5), all)
        .await
        .expect("every task stops on shutdown");
}
