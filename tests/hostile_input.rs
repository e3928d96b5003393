//! Hostile input: every case of `fixtures/hostile/cases.json` (VMI
//! documents, Multus network-status arrays and downward-API files, pod link
//! records, domain XML), plus huge and deep documents generated here, must
//! be refused with an error that names the field, never panic, and, through
//! the real file sources, leave the last good value published.

use std::error::Error;
use std::fmt::{Debug, Write as _};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use nicplug::hypervisor::domain_xml::parse_devices;
use nicplug::model::PodLinkRecord;
use nicplug::model::network_status::{self, NetworkStatus};
use nicplug::model::vmi::Vmi;
use nicplug::sources::network_status::{MAX_FILE_BYTES, watch_file};
use nicplug::sources::vmi_file;
use serde::Deserialize;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::field::{Field, Visit};
use tracing_subscriber::layer::{Context, Layer, SubscriberExt};

const HOSTILE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/fixtures/hostile");

#[derive(Deserialize)]
struct Manifest {
    cases: Vec<Case>,
}

#[derive(Deserialize, Clone)]
struct Case {
    file: String,
    parser: Parser,
    /// Strings the error (with its sources) must contain.
    expect: Vec<String>,
    /// For VMIs: what `VmiError::field()` must say.
    field: Option<String>,
}

#[derive(Deserialize, Clone, Copy, PartialEq, Eq, Debug)]
#[serde(rename_all = "kebab-case")]
enum Parser {
    Vmi,
    NetworkStatus,
    Record,
    Domain,
}

fn cases() -> Vec<Case> {
    let text = std::fs::read_to_string(Path::new(HOSTILE).join("cases.json")).unwrap();
    serde_json::from_str::<Manifest>(&text).unwrap().cases
}

/// An error with all its sources, as the agent logs it.
fn chain(err: &dyn Error) -> String {
    let mut out = err.to_string();
    let mut source = err.source();
    while let Some(s) = source {
        let _ = write!(out, ": {s}");
        source = s.source();
    }
    out
}

/// Parses `text` with the case's parser: `Err(message)` when refused,
/// `Ok(())` when (wrongly) accepted. A VMI's field is checked here too.
fn refuse(case: &Case, text: &str) -> Result<(), String> {
    match case.parser {
        Parser::Vmi => match Vmi::parse(text) {
            Ok(_) => Ok(()),
            Err(e) => {
                if let Some(field) = &case.field
                    && e.field() != Some(field.as_str())
                {
                    return Err(format!(
                        "{}: field {:?}, expected {field:?}",
                        chain(&e),
                        e.field()
                    ));
                }
                Err(chain(&e))
            }
        },
        Parser::NetworkStatus => network_status::parse(text).map(drop).map_err(|e| chain(&e)),
        Parser::Record => PodLinkRecord::from_alias(text)
            .map(drop)
            .map_err(|e| chain(&e)),
        Parser::Domain => parse_devices(text).map(drop).map_err(|e| chain(&e)),
    }
}

#[test]
fn every_case_is_refused_naming_the_field() {
    let cases = cases();
    assert!(cases.len() >= 60, "only {} cases", cases.len());
    let mut failures = Vec::new();
    for case in &cases {
        let bytes = std::fs::read(Path::new(HOSTILE).join(&case.file)).unwrap();
        let Ok(text) = String::from_utf8(bytes) else {
            // Not text at all: only the file sources see these (below).
            assert!(
                case.expect.iter().any(|e| e == "not UTF-8"),
                "{}",
                case.file
            );
            continue;
        };
        match catch_unwind(AssertUnwindSafe(|| refuse(case, &text))) {
            Err(_) => failures.push(format!("{}: PANICKED", case.file)),
            Ok(Ok(())) => failures.push(format!("{}: accepted", case.file)),
            Ok(Err(message)) => {
                let missing: Vec<_> = case
                    .expect
                    .iter()
                    .filter(|e| !message.contains(e.as_str()))
                    .collect();
                if !missing.is_empty()
                    || message.contains("field Some")
                    || message.contains("field None")
                {
                    failures.push(format!("{}: {message:?} lacks {missing:?}", case.file));
                }
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} cases failed:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n")
    );
}

// Generated documents: too big to commit, or too big by design.

/// A valid VMI of one bridge interface named `net`, `name`d.
fn vmi_doc(name: &str, padding: usize) -> String {
    format!(
        r#"{{"kind":"VirtualMachineInstance","metadata":{{"name":"{name}","namespace":"ns","annotations":{{"pad":"{}"}}}},"spec":{{"domain":{{"devices":{{"interfaces":[{{"name":"net","bridge":{{}}}}]}}}},"networks":[{{"name":"net","multus":{{"networkName":"ns/net"}}}}]}}}}"#,
        "x".repeat(padding)
    )
}

fn status_doc(name: &str, entries: usize) -> String {
    let entry = format!(
        r#"{{"name":"ns/{name}","interface":"pod9a6a0c3b4d8","ips":["169.254.2.2"],"mac":"76:44:89:e5:ff:34","dns":{{}}}}"#
    );
    format!("[{}]", vec![entry; entries].join(","))
}

fn deep_json(levels: usize) -> String {
    format!(
        r#"{{"kind":"VirtualMachineInstance","metadata":{{"name":"vm"}},"x":{}{}}}"#,
        "[".repeat(levels),
        "]".repeat(levels)
    )
}

fn deep_yaml_flow(levels: usize) -> String {
    format!(
        "kind: VirtualMachineInstance\nmetadata: {{name: vm}}\nx: {}{}\n",
        "[".repeat(levels),
        "]".repeat(levels)
    )
}

fn deep_yaml_block(levels: usize) -> String {
    let mut text = String::from("kind: VirtualMachineInstance\nmetadata: {name: vm}\nx:\n");
    for level in 0..levels {
        let _ = writeln!(text, "{}- ", " ".repeat(level * 2 + 2));
    }
    text
}

/// What a case writes: bytes (not always UTF-8), or a sparse file of a size.
enum Content {
    Bytes(Vec<u8>),
    Sparse(u64),
}

#[allow(non_snake_case)]
fn Text(text: String) -> Content {
    Content::Bytes(text.into_bytes())
}

struct Generated {
    what: &'static str,
    parser: Parser,
    content: Content,
    expect: &'static str,
}

fn generated() -> Vec<Generated> {
    use Content::Sparse;
    let over_vmi = vmi_file::MAX_FILE_BYTES as usize;
    let over_status = MAX_FILE_BYTES as usize;
    vec![
        Generated {
            what: "valid VMI over the size limit",
            parser: Parser::Vmi,
            content: Text(vmi_doc("big", over_vmi)),
            expect: "is larger than 1048576 bytes",
        },
        Generated {
            what: "100 MB sparse VMI file (never read)",
            parser: Parser::Vmi,
            content: Sparse(100 << 20),
            expect: "is larger than 1048576 bytes",
        },
        Generated {
            what: "60 000 levels of JSON",
            parser: Parser::Vmi,
            content: Text(deep_json(60_000)),
            expect: "nesting deeper than 64 levels",
        },
        Generated {
            what: "60 000 levels of YAML flow",
            parser: Parser::Vmi,
            content: Text(deep_yaml_flow(60_000)),
            expect: "recursion limit exceeded",
        },
        Generated {
            what: "200 levels of YAML block",
            parser: Parser::Vmi,
            content: Text(deep_yaml_block(200)),
            expect: "depth",
        },
        Generated {
            what: "valid network-status over the size limit",
            parser: Parser::NetworkStatus,
            content: Text(status_doc("big", over_status / 100 + 1)),
            expect: "is larger than 262144 bytes",
        },
        Generated {
            what: "60 000 levels of network-status",
            parser: Parser::NetworkStatus,
            content: Text(format!("[{}{}]", "[".repeat(60_000), "]".repeat(60_000))),
            expect: "nesting deeper than 16 levels",
        },
    ]
}

#[test]
fn generated_deep_documents_are_refused_by_the_parsers() {
    for (what, text) in [
        ("json", deep_json(60_000)),
        ("yaml flow", deep_yaml_flow(60_000)),
        ("yaml flow 200k", deep_yaml_flow(200_000)),
        ("yaml block", deep_yaml_block(200)),
    ] {
        let err = Vmi::parse(&text).expect_err(what);
        let message = chain(&err);
        eprintln!("{what}: {}", message.lines().next().unwrap_or_default());
        assert!(
            ["nesting deeper", "depth", "recursion limit"]
                .iter()
                .any(|m| message.contains(m)),
            "{what}: {message}"
        );
    }
    // Within the limits a large document is fine: the limits are not a
    // refusal of everything big.
    assert!(Vmi::parse(&vmi_doc("vm", 512 * 1024)).is_ok());
    assert_eq!(
        network_status::parse(&status_doc("n", 500)).unwrap().len(),
        500
    );
}

// Through the real file sources.

/// Error events the agent logs, captured for the current thread.
#[derive(Clone, Default)]
struct Errors(Arc<Mutex<Vec<String>>>);

impl<S: tracing::Subscriber> Layer<S> for Errors {
    fn on_event(&self, event: &tracing::Event<'_>, _: Context<'_, S>) {
        struct Line(String);
        impl Visit for Line {
            fn record_debug(&mut self, field: &Field, value: &dyn Debug) {
                let _ = write!(self.0, "{}={value:?} ", field.name());
            }
        }
        if *event.metadata().level() == tracing::Level::ERROR {
            let mut line = Line(String::new());
            event.record(&mut line);
            self.0.lock().unwrap().push(line.0);
        }
    }
}

impl Errors {
    fn clear(&self) {
        self.0.lock().unwrap().clear();
    }

    /// Waits (bounded) for a logged error containing `expect`.
    async fn wait_for(&self, expect: &str, what: &str) {
        for _ in 0..2000 {
            if self.0.lock().unwrap().iter().any(|l| l.contains(expect)) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        panic!(
            "{what}: no error containing {expect:?} was logged; got {:?}",
            self.0.lock().unwrap()
        );
    }
}

fn temp_dir(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("nicplug-hostile-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Replaces `path` by rename, as kubelet and editors do.
fn replace(path: &Path, content: &Content) {
    let tmp = path.with_extension("tmp");
    match content {
        Content::Bytes(bytes) => std::fs::write(&tmp, bytes).unwrap(),
        Content::Sparse(len) => std::fs::File::create(&tmp).unwrap().set_len(*len).unwrap(),
    }
    std::fs::rename(&tmp, path).unwrap();
}

async fn wait_value<T: PartialEq + Debug>(
    rx: &mut watch::Receiver<Option<T>>,
    pred: impl Fn(&T) -> bool,
    what: &str,
) {
    let wait = rx.wait_for(|v| v.as_ref().is_some_and(&pred));
    tokio::time::timeout(Duration::from_secs(10), wait)
        .await
        .unwrap_or_else(|_| panic!("{what}: the good document was never published"))
        .unwrap();
}

/// Every bad document of `parser` (files and generated) replaces a good one
/// in a watched file: the error is logged, the good value stays published.
async fn through_the_source<T: PartialEq + Debug>(
    parser: Parser,
    path: &Path,
    rx: &mut watch::Receiver<Option<T>>,
    good: impl Fn(usize) -> String,
    is_good: impl Fn(&T, usize) -> bool,
    errors: &Errors,
) -> usize {
    let mut bad: Vec<(String, Content, String)> = Vec::new();
    for case in cases().into_iter().filter(|c| c.parser == parser) {
        let bytes = std::fs::read(Path::new(HOSTILE).join(&case.file)).unwrap();
        bad.push((case.file, Content::Bytes(bytes), case.expect[0].clone()));
    }
    for generated in generated().into_iter().filter(|g| g.parser == parser) {
        bad.push((
            generated.what.to_string(),
            generated.content,
            generated.expect.to_string(),
        ));
    }
    for (k, (what, content, expect)) in bad.iter().enumerate() {
        replace(path, &Text(good(k)));
        wait_value(rx, |v| is_good(v, k), what).await;
        errors.clear();
        replace(path, content);
        errors.wait_for(expect, what).await;
        // Give a wrongly accepted document every chance to be published.
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(
            rx.borrow().as_ref().is_some_and(|v| is_good(v, k)),
            "{what}: the last good value was replaced by {:?}",
            rx.borrow()
        );
    }
    bad.len()
}

#[tokio::test]
async fn bad_vmi_files_keep_the_last_good_spec() {
    let errors = Errors::default();
    let _guard =
        tracing::subscriber::set_default(tracing_subscriber::registry().with(errors.clone()));
    let dir = temp_dir("vmi");
    let path = dir.join("vmi.json");
    let (tx, mut rx) = watch::channel(None);
    let stop = CancellationToken::new();
    let task = tokio::spawn(vmi_file::watch_file(path.clone(), tx, stop.clone()));

    let count = through_the_source(
        Parser::Vmi,
        &path,
        &mut rx,
        |k| vmi_doc(&format!("good-{k}"), 0),
        |v: &Vmi, k| v.name == format!("good-{k}"),
        &errors,
    )
    .await;
    assert!(count >= 60, "{count}");

    stop.cancel();
    task.await.unwrap().unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
}

#[tokio::test]
async fn bad_network_status_files_keep_the_last_good_status() {
    let errors = Errors::default();
    let _guard =
        tracing::subscriber::set_default(tracing_subscriber::registry().with(errors.clone()));
    let dir = temp_dir("status");
    let path = dir.join("annotations");
    let (tx, mut rx) = watch::channel(None);
    let stop = CancellationToken::new();
    let task = tokio::spawn(watch_file(path.clone(), tx, stop.clone()));

    let count = through_the_source(
        Parser::NetworkStatus,
        &path,
        &mut rx,
        |k| status_doc(&format!("good-{k}"), 1),
        |v: &Vec<NetworkStatus>, k| v.len() == 1 && v[0].name == format!("ns/good-{k}"),
        &errors,
    )
    .await;
    assert!(count >= 30, "{count}");

    stop.cancel();
    task.await.unwrap().unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Threads the parser below ran on.
static PARSED_ON: Mutex<Vec<std::thread::ThreadId>> = Mutex::new(Vec::new());

fn recording_parse(text: &str) -> Result<String, Box<dyn Error + Send + Sync>> {
    PARSED_ON.lock().unwrap().push(std::thread::current().id());
    Ok(text.to_string())
}

/// The agent's runtime is single-threaded: a document that takes long to
/// parse must not stall it, so parsing runs on the blocking pool.
#[tokio::test(flavor = "current_thread")]
async fn parsing_runs_off_the_runtime_thread() {
    use nicplug::sources::watched::{Document, watch_file};
    let dir = temp_dir("thread");
    let path = dir.join("doc");
    std::fs::write(&path, "one").unwrap();
    let doc = Document {
        what: "test",
        max_bytes: 16,
        parse: recording_parse,
        summary: |s: &String| s.clone(),
    };
    let (tx, mut rx) = watch::channel(None);
    let stop = CancellationToken::new();
    let task = tokio::spawn(watch_file(path.clone(), doc, tx, stop.clone()));
    wait_value(&mut rx, |v: &String| v == "one", "first document").await;

    let runtime_thread = std::thread::current().id();
    let threads = PARSED_ON.lock().unwrap().clone();
    assert!(!threads.is_empty());
    assert!(
        threads.iter().all(|t| *t != runtime_thread),
        "parsed on the runtime thread"
    );
    stop.cancel();
    task.await.unwrap().unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
}

/// The DHCP fuzz targets' committed seeds (fuzz/seeds/, made by
/// make-dhcp-seeds.py) are frames the parsers take, one per message kind:
/// a seed the parser refuses would start the fuzzer from nothing.
#[test]
fn every_dhcp_fuzz_seed_parses_as_the_request_it_is_named_for() {
    use nicplug::dhcp::frame::parse;
    use nicplug::dhcp::frame6::{Request6, parse6};
    let seeds = |target: &str| -> Vec<(String, Vec<u8>)> {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("fuzz/seeds")
            .join(target);
        let mut out: Vec<_> = std::fs::read_dir(&dir)
            .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|x| x == "bin"))
            .map(|p| {
                let name = p.file_stem().unwrap().to_string_lossy().into_owned();
                (name, std::fs::read(&p).unwrap())
            })
            .collect();
        out.sort();
        out
    };
    let v4 = seeds("dhcp_request");
    assert_eq!(
        v4.len(),
        8,
        "{:?}",
        v4.iter().map(|s| &s.0).collect::<Vec<_>>()
    );
    for (name, bytes) in &v4 {
        let received = parse(bytes).unwrap_or_else(|e| panic!("{name}: {e}"));
        let kind = format!("{:?}", received.message.opts().msg_type()).to_lowercase();
        let want = name
            .split('-')
            .next()
            .unwrap()
            .replace("foreign", "discover");
        assert!(kind.contains(&want), "{name}: {kind}");
    }
    let v6 = seeds("dhcp6_request");
    assert_eq!(v6.len(), 6);
    for (name, bytes) in &v6 {
        let received = parse6(bytes).unwrap_or_else(|e| panic!("{name}: {e}"));
        match received.request {
            Request6::RouterSolicitation => assert_eq!(name, "router-solicitation"),
            Request6::Dhcp(m) => {
                let kind = format!("{:?}", m.msg_type()).to_lowercase();
                assert_eq!(kind, name.replace('-', ""), "{name}");
            }
        }
    }
}
