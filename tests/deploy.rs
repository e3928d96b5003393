//! Offline validation of `deploy/`: no cluster, no root.
//!
//! 1. Every manifest under `deploy/` (multi-document YAML) is parsed into a
//!    typed object: Kubernetes types from `k8s-openapi` (feature `v1_36`, the
//!    first release with `admissionregistration.k8s.io/v1`
//!    MutatingAdmissionPolicy), and deliberately partial structs of our own,
//!    with `deny_unknown_fields`, for the custom resources
//!    (NetworkAttachmentDefinition, VirtualMachine, Kustomization). A field
//!    the typed object does not know fails the test (`serde_ignored` reports
//!    what `k8s-openapi` would silently drop), so a typo cannot hide.
//! 2. The MutatingAdmissionPolicy's CEL is run by a CEL interpreter
//!    (`cel-interpreter`): matchConditions, variables in order, each JSON
//!    patch expression on the result of the ones before, with `object` = a
//!    launcher pod as KubeVirt v1.9.0 renders it (`fixtures/kubevirt/`) and
//!    `params` = the settings ConfigMap (`deploy/vms/config.yaml`, or as a
//!    kustomize overlay renders it). The result is parsed as a typed Pod and
//!    the injected container is checked: native sidecar, capabilities, user,
//!    mounts of volumes that exist, env, probes, network-status volume,
//!    settings, resources (Burstable and Guaranteed launchers).
//! 3. RBAC grants exactly the verbs and resources nicplug needs, no wildcard;
//!    the binding, the namespace, the example VM and the Containerfile agree
//!    with each other.
//! 4. `kubectl kustomize` renders `deploy/` and a namespace overlay of
//!    `deploy/vms` (SKIP when kubectl is missing): cluster-scoped objects
//!    never get a namespace, `images:` reaches the container.
//!
//! What this cannot check: that an API server's CEL environment accepts the
//! expressions exactly as this interpreter does (see `cel` for the one
//! rewrite: `Type{..}` initialisers become maps).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use k8s_openapi::api::admissionregistration::v1::{
    MutatingAdmissionPolicy, MutatingAdmissionPolicyBinding, ValidatingAdmissionPolicy,
    ValidatingAdmissionPolicyBinding,
};
use k8s_openapi::api::core::v1::{ConfigMap, Container, Namespace, Pod, ServiceAccount};
use k8s_openapi::api::rbac::v1::{Role, RoleBinding};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
use serde::Deserialize;
use serde::de::DeserializeOwned;
use serde_json::Value;

const CONTAINER: &str = "nicplug";
const LAUNCHER_FIXTURE: &str = "fixtures/kubevirt/virt-launcher-pod.yaml";
/// The uid/gid KubeVirt's non-root launcher runs QEMU and virtqemud as.
const QEMU_UID: i64 = 107;

// ---------------------------------------------------------------------------
// Loading
// ---------------------------------------------------------------------------

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Every `.yaml`/`.yml` file under `dir`, sorted.
fn yaml_files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).unwrap_or_else(|e| panic!("read {}: {e}", d.display())) {
            let path = entry.expect("dir entry").path();
            if path.is_dir() {
                stack.push(path);
            } else if matches!(
                path.extension().and_then(|e| e.to_str()),
                Some("yaml" | "yml")
            ) {
                out.push(path);
            }
        }
    }
    out.sort();
    out
}

/// One document of a manifest file, with where it came from.
struct Doc {
    origin: String,
    value: serde_yaml::Value,
}

fn documents(path: &Path) -> Vec<Doc> {
    let text =
        std::fs::read_to_string(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    let rel = path
        .strip_prefix(repo())
        .unwrap_or(path)
        .display()
        .to_string();
    serde_yaml::Deserializer::from_str(&text)
        .enumerate()
        .filter_map(|(i, de)| {
            let value = serde_yaml::Value::deserialize(de)
                .unwrap_or_else(|e| panic!("{rel}: document {i}: {e}"));
            (!value.is_null()).then(|| Doc {
                origin: format!("{rel}#{i}"),
                value,
            })
        })
        .collect()
}

/// Deserializes `value` as `T`, failing on any field `T` does not have.
fn strict<T: DeserializeOwned>(origin: &str, value: serde_yaml::Value) -> T {
    let mut unknown = Vec::new();
    let parsed: Result<T, _> =
        serde_ignored::deserialize(value, |path| unknown.push(path.to_string()));
    let parsed = parsed.unwrap_or_else(|e| panic!("{origin}: {e}"));
    assert!(
        unknown.is_empty(),
        "{origin}: unknown fields (a typo, or a field this API version lacks): {unknown:?}"
    );
    parsed
}

fn strict_json<T: DeserializeOwned>(origin: &str, value: &Value) -> T {
    let yaml: serde_yaml::Value =
        serde_yaml::to_value(value).unwrap_or_else(|e| panic!("{origin}: {e}"));
    strict(origin, yaml)
}

// ---------------------------------------------------------------------------
// Custom resources: partial mirrors, strict
// ---------------------------------------------------------------------------

/// `k8s.cni.cncf.io/v1` NetworkAttachmentDefinition (its whole schema).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
#[allow(dead_code)]
struct NetworkAttachmentDefinition {
    api_version: String,
    kind: String,
    metadata: ObjectMeta,
    spec: NadSpec,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct NadSpec {
    config: String,
}

/// The subset of `kubevirt.io/v1` VirtualMachine the examples use. A field
/// outside it fails the test: extend the mirror (from KubeVirt's API types)
/// rather than loosen it.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
#[allow(dead_code)]
struct VirtualMachine {
    api_version: String,
    kind: String,
    metadata: ObjectMeta,
    spec: VmSpec,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct VmSpec {
    run_strategy: String,
    template: VmiTemplate,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct VmiTemplate {
    metadata: ObjectMeta,
    spec: VmiSpec,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct VmiSpec {
    service_account_name: Option<String>,
    domain: Domain,
    networks: Vec<Network>,
    volumes: Vec<VmVolume>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
#[allow(dead_code)]
struct Domain {
    cpu: Option<Cpu>,
    memory: Option<Memory>,
    devices: Devices,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
#[allow(dead_code)]
struct Cpu {
    cores: u32,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
#[allow(dead_code)]
struct Memory {
    guest: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Devices {
    disks: Vec<Disk>,
    interfaces: Vec<Interface>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
#[allow(dead_code)]
struct Disk {
    name: String,
    disk: DiskTarget,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
#[allow(dead_code)]
struct DiskTarget {
    bus: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
#[allow(dead_code)]
struct Interface {
    name: String,
    bridge: Option<Empty>,
    masquerade: Option<Empty>,
    mac_address: Option<String>,
    state: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Empty {}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Network {
    name: String,
    pod: Option<Empty>,
    multus: Option<Multus>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct Multus {
    network_name: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
#[allow(dead_code)]
struct VmVolume {
    name: String,
    container_disk: Option<ContainerDisk>,
    cloud_init_no_cloud: Option<CloudInit>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
#[allow(dead_code)]
struct ContainerDisk {
    image: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
#[allow(dead_code)]
struct CloudInit {
    user_data: String,
}

/// `kustomize.config.k8s.io/v1beta1` Kustomization and `v1alpha1`
/// Component, the fields used here.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
#[allow(dead_code)]
struct Kustomization {
    api_version: String,
    kind: String,
    namespace: Option<String>,
    #[serde(default)]
    resources: Vec<String>,
    #[serde(default)]
    configurations: Vec<String>,
    #[serde(default)]
    patches: Vec<serde_yaml::Value>,
}

/// `monitoring.coreos.com/v1` PodMonitor, the fields used here.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
#[allow(dead_code)]
struct PodMonitor {
    api_version: String,
    kind: String,
    metadata: ObjectMeta,
    spec: PodMonitorSpec,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct PodMonitorSpec {
    selector: LabelSelector,
    pod_metrics_endpoints: Vec<PodMetricsEndpoint>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
#[allow(dead_code)]
struct PodMetricsEndpoint {
    port: String,
    path: String,
    interval: Option<String>,
}

// ---------------------------------------------------------------------------
// Everything in deploy/, typed
// ---------------------------------------------------------------------------

#[derive(Default)]
struct Manifests {
    namespaces: Vec<Namespace>,
    config_maps: Vec<ConfigMap>,
    pod_monitors: Vec<PodMonitor>,
    service_accounts: Vec<ServiceAccount>,
    roles: Vec<Role>,
    role_bindings: Vec<RoleBinding>,
    mutating: Vec<MutatingAdmissionPolicy>,
    mutating_bindings: Vec<MutatingAdmissionPolicyBinding>,
    validating: Vec<ValidatingAdmissionPolicy>,
    validating_bindings: Vec<ValidatingAdmissionPolicyBinding>,
    nads: Vec<NetworkAttachmentDefinition>,
    vms: Vec<VirtualMachine>,
    /// Directory of the kustomization file, and the file.
    kustomizations: Vec<(PathBuf, Kustomization)>,
}

fn load_deploy() -> Manifests {
    let mut m = Manifests::default();
    let files = yaml_files(&repo().join("deploy"));
    assert!(!files.is_empty(), "deploy/ has no manifests");
    for file in files {
        for Doc { origin, value } in documents(&file) {
            let api_version = value.get("apiVersion").and_then(|v| v.as_str());
            let kind = value.get("kind").and_then(|v| v.as_str());
            match (api_version, kind) {
                (Some("v1"), Some("Namespace")) => m.namespaces.push(strict(&origin, value)),
                (Some("v1"), Some("ConfigMap")) => m.config_maps.push(strict(&origin, value)),
                (Some("monitoring.coreos.com/v1"), Some("PodMonitor")) => {
                    m.pod_monitors.push(strict(&origin, value))
                }
                // kustomize's own configuration, not a resource.
                (None, None) if file.ends_with("kustomizeconfig.yaml") => {}
                (Some("v1"), Some("ServiceAccount")) => {
                    m.service_accounts.push(strict(&origin, value))
                }
                (Some("rbac.authorization.k8s.io/v1"), Some("Role")) => {
                    m.roles.push(strict(&origin, value))
                }
                (Some("rbac.authorization.k8s.io/v1"), Some("RoleBinding")) => {
                    m.role_bindings.push(strict(&origin, value))
                }
                (Some("admissionregistration.k8s.io/v1"), Some("MutatingAdmissionPolicy")) => {
                    m.mutating.push(strict(&origin, value))
                }
                (
                    Some("admissionregistration.k8s.io/v1"),
                    Some("MutatingAdmissionPolicyBinding"),
                ) => m.mutating_bindings.push(strict(&origin, value)),
                (Some("admissionregistration.k8s.io/v1"), Some("ValidatingAdmissionPolicy")) => {
                    m.validating.push(strict(&origin, value))
                }
                (
                    Some("admissionregistration.k8s.io/v1"),
                    Some("ValidatingAdmissionPolicyBinding"),
                ) => m.validating_bindings.push(strict(&origin, value)),
                (Some("k8s.cni.cncf.io/v1"), Some("NetworkAttachmentDefinition")) => {
                    m.nads.push(strict(&origin, value))
                }
                (Some("kubevirt.io/v1"), Some("VirtualMachine")) => {
                    m.vms.push(strict(&origin, value))
                }
                (Some("kustomize.config.k8s.io/v1beta1"), Some("Kustomization"))
                | (Some("kustomize.config.k8s.io/v1alpha1"), Some("Component")) => {
                    let dir = file.parent().expect("file has a directory").to_path_buf();
                    m.kustomizations.push((dir, strict(&origin, value)));
                }
                // deploy/monitoring/: checked by tests/operator.rs (promtool).
                (Some("monitoring.coreos.com/v1"), Some("PrometheusRule")) => {}
                other => panic!("{origin}: no typed check for apiVersion/kind {other:?}"),
            }
        }
    }
    m
}

fn the<'a, T>(items: &'a [T], what: &str) -> &'a T {
    assert_eq!(items.len(), 1, "expected exactly one {what} in deploy/");
    &items[0]
}

fn fixture_pod_json() -> Value {
    let text = std::fs::read_to_string(repo().join(LAUNCHER_FIXTURE)).expect("read fixture");
    let value: Value = serde_yaml::from_str(&text).expect("fixture is YAML");
    // The fixture itself must be a valid Pod, or the checks below prove little.
    let _: Pod = strict_json(LAUNCHER_FIXTURE, &value);
    value
}

// ---------------------------------------------------------------------------
// The policy's CEL, evaluated by a CEL interpreter
// ---------------------------------------------------------------------------

mod cel {
    //! One rewrite before the interpreter sees an expression: cel-interpreter
    //! 0.10 parses `Type{field: value}` initialisers but cannot evaluate them
    //! (its interpreter has a `todo!` there), so `JSONPatch{op: "add"}` and
    //! `Object.spec.volumes{name: "x"}` become the maps `{"op": "add"}` and
    //! `{"name": "x"}`. On the way, each `Object.*` type name is checked
    //! against the field it fills (`Object.spec.volumes.emptyDir` inside
    //! `Object.spec.volumes` at field `emptyDir`), as the API server's type
    //! checker does. Everything else (conditions, `has`, `in`, the variables,
    //! list concatenation, `int()`, `?:`) runs in the interpreter unchanged.

    enum Open {
        Struct { ty: String, field: Option<String> },
        Map,
        Other,
    }

    pub fn structs_as_maps(src: &str) -> Result<String, String> {
        let chars: Vec<char> = src.chars().collect();
        let mut out = String::new();
        let mut stack: Vec<Open> = Vec::new();
        let mut expect_field = false;
        let mut i = 0;
        while i < chars.len() {
            let c = chars[i];
            if c == '"' || c == '\'' {
                let start = i;
                i += 1;
                while i < chars.len() && chars[i] != c {
                    if chars[i] == '\\' {
                        i += 1;
                    }
                    i += 1;
                }
                i += 1;
                out.extend(&chars[start..i.min(chars.len())]);
                continue;
            }
            if expect_field {
                if c.is_whitespace() {
                    out.push(c);
                    i += 1;
                    continue;
                }
                expect_field = false;
                if c.is_ascii_alphabetic() || c == '_' {
                    let start = i;
                    while i < chars.len() && (chars[i].is_ascii_alphanumeric() || chars[i] == '_') {
                        i += 1;
                    }
                    let name: String = chars[start..i].iter().collect();
                    let mut j = i;
                    while j < chars.len() && chars[j].is_whitespace() {
                        j += 1;
                    }
                    if chars.get(j) != Some(&':') {
                        return Err(format!("field {name} without ':'"));
                    }
                    if let Some(Open::Struct { field, .. }) = stack.last_mut() {
                        *field = Some(name.clone());
                    }
                    out.push_str(&format!("{name:?}"));
                    continue;
                }
            }
            match c {
                '{' => {
                    let ident_len = out
                        .chars()
                        .rev()
                        .take_while(|c| c.is_ascii_alphanumeric() || *c == '_' || *c == '.')
                        .count();
                    let ident: String = out.chars().skip(out.chars().count() - ident_len).collect();
                    if ident.starts_with(|c: char| c.is_ascii_uppercase()) {
                        check_type(&stack, &ident)?;
                        out.truncate(out.len() - ident.len());
                        stack.push(Open::Struct {
                            ty: ident,
                            field: None,
                        });
                        expect_field = true;
                    } else {
                        stack.push(Open::Map);
                    }
                    out.push('{');
                }
                '[' | '(' => {
                    stack.push(Open::Other);
                    out.push(c);
                }
                '}' | ']' | ')' => {
                    stack.pop().ok_or("unbalanced brackets")?;
                    out.push(c);
                }
                ',' => {
                    expect_field = matches!(stack.last(), Some(Open::Struct { .. }));
                    out.push(c);
                }
                _ => out.push(c),
            }
            i += 1;
        }
        if !stack.is_empty() {
            return Err("unbalanced brackets".into());
        }
        Ok(out)
    }

    /// A `Type{...}` opened where `stack` says: `JSONPatch` anywhere, an
    /// `Object.*` value of a JSONPatch, or `Object.<parent>.<field>`.
    fn check_type(stack: &[Open], ty: &str) -> Result<(), String> {
        if ty == "JSONPatch" {
            return Ok(());
        }
        let parent = stack.iter().rev().find_map(|o| match o {
            Open::Struct { ty, field } => Some((ty.as_str(), field.as_deref())),
            Open::Map => Some(("map", None)),
            Open::Other => None,
        });
        match parent {
            Some(("JSONPatch", Some("value"))) if ty.starts_with("Object.") => Ok(()),
            Some((p, Some(f))) if p.starts_with("Object") && ty == format!("{p}.{f}") => Ok(()),
            other => Err(format!("type {ty} where {other:?} is open")),
        }
    }

    #[test]
    fn rewrites_initialisers_and_checks_their_types() {
        let src = r#"[JSONPatch{op: "a{b", value: Object.spec{x: [Object.spec.x{y: {"k": 1}}]}}]"#;
        assert_eq!(
            structs_as_maps(src).unwrap(),
            r#"[{"op": "a{b", "value": {"x": [{"y": {"k": 1}}]}}]"#
        );
        assert!(structs_as_maps("[JSONPatch{value: Object.spec{x: Object.spec.z{}}}]").is_err());
    }
}

use cel_interpreter::{Context, Program, Value as Cel};

/// The ConfigMap the policy reads, as `deploy/vms` ships it.
fn default_params() -> Value {
    let text = std::fs::read_to_string(repo().join("deploy/vms/config.yaml")).expect("config.yaml");
    serde_json::to_value(serde_yaml::from_str::<serde_yaml::Value>(&text).expect("YAML"))
        .expect("JSON")
}

fn cel_to_json(v: &Cel) -> Value {
    match v {
        Cel::List(items) => Value::Array(items.iter().map(cel_to_json).collect()),
        Cel::Map(m) => Value::Object(
            m.map
                .iter()
                .map(|(k, v)| (k.to_string(), cel_to_json(v)))
                .collect(),
        ),
        Cel::Int(i) => Value::from(*i),
        Cel::UInt(u) => Value::from(*u),
        Cel::Float(f) => Value::from(*f),
        Cel::String(s) => Value::String(s.to_string()),
        Cel::Bool(b) => Value::Bool(*b),
        Cel::Null => Value::Null,
        other => panic!("CEL value without a JSON form: {other:?}"),
    }
}

fn eval(expr: &str, ctx: &Context) -> Cel {
    let src = cel::structs_as_maps(expr).unwrap_or_else(|e| panic!("{e}: {expr}"));
    let program =
        Program::compile(&src).unwrap_or_else(|e| panic!("CEL does not compile: {expr}\n{e:?}"));
    program
        .execute(ctx)
        .unwrap_or_else(|e| panic!("CEL fails: {expr}\n{e:?}"))
}

/// The context of one evaluation: `object`, `params`, `request`, and the
/// policy's variables in order (each may use the ones before).
fn context(policy: &MutatingAdmissionPolicy, params: &Value, pod: &Value) -> Context<'static> {
    let spec = policy.spec.as_ref().expect("policy spec");
    let mut ctx = Context::default();
    ctx.add_variable("object", pod).expect("object");
    ctx.add_variable("params", params).expect("params");
    ctx.add_variable("request", serde_json::json!({"operation": "CREATE"}))
        .expect("request");
    let mut variables = std::collections::HashMap::<String, Cel>::new();
    ctx.add_variable_from_value("variables", variables.clone());
    for var in spec.variables.iter().flatten() {
        let value = eval(&var.expression, &ctx);
        variables.insert(var.name.clone(), value);
        ctx.add_variable_from_value("variables", variables.clone());
    }
    ctx
}

/// Whether the policy's matchConditions select `pod`.
fn matches(policy: &MutatingAdmissionPolicy, pod: &Value) -> bool {
    let ctx = context(policy, &default_params(), pod);
    let spec = policy.spec.as_ref().expect("policy spec");
    spec.match_conditions
        .iter()
        .flatten()
        .all(|c| match eval(&c.expression, &ctx) {
            Cel::Bool(b) => b,
            other => panic!("matchCondition {} gives {other:?}", c.name),
        })
}

/// Admits `pod` through the mutating policy with the shipped settings.
fn admit(policy: &MutatingAdmissionPolicy, pod: Value) -> Value {
    admit_with(policy, &default_params(), pod)
}

/// Admits `pod` with `params` as the ConfigMap: the matchConditions must
/// select it, then every mutation in order, each evaluated (variables
/// included) on the result of the ones before.
fn admit_with(policy: &MutatingAdmissionPolicy, params: &Value, mut pod: Value) -> Value {
    assert!(
        matches(policy, &pod),
        "the policy's matchConditions select the pod"
    );
    let spec = policy.spec.as_ref().expect("policy spec");
    for mutation in spec.mutations.as_deref().expect("mutations") {
        assert_eq!(
            mutation.patch_type, "JSONPatch",
            "only JSON patches are used"
        );
        let expression = mutation
            .json_patch
            .as_ref()
            .and_then(|j| j.expression.as_deref())
            .expect("JSON patch expression");
        let ctx = context(policy, params, &pod);
        let Value::Array(ops) = cel_to_json(&eval(expression, &ctx)) else {
            panic!("a JSON patch expression must give a list");
        };
        for op in ops {
            assert_eq!(op["op"], "add", "only JSON patch add is applied here");
            let path = op["path"].as_str().expect("JSONPatch path").to_owned();
            json_patch_add(&mut pod, &path, op["value"].clone());
        }
    }
    pod
}

fn json_patch_add(doc: &mut Value, path: &str, value: Value) {
    let segs: Vec<&str> = path.split('/').skip(1).collect();
    let (last, parents) = segs.split_last().expect("non-empty JSON pointer");
    let mut cur = doc;
    for seg in parents {
        cur = match cur {
            Value::Object(m) => m.get_mut(*seg),
            Value::Array(a) => seg.parse::<usize>().ok().and_then(|i| a.get_mut(i)),
            _ => None,
        }
        .unwrap_or_else(|| panic!("JSON patch add {path}: no {seg}"));
    }
    match cur {
        Value::Object(m) => {
            m.insert((*last).to_owned(), value);
        }
        Value::Array(a) if *last == "-" => a.push(value),
        Value::Array(a) => {
            let i: usize = last.parse().expect("array index");
            assert!(i <= a.len(), "JSON patch add {path}: index out of range");
            a.insert(i, value);
        }
        _ => panic!("JSON patch add {path}: parent is not a container"),
    }
}

fn injected(pod: &Pod) -> &Container {
    let init = pod.spec.as_ref().and_then(|s| s.init_containers.as_ref());
    let matches: Vec<_> = init
        .into_iter()
        .flatten()
        .filter(|c| c.name == CONTAINER)
        .collect();
    assert_eq!(matches.len(), 1, "exactly one {CONTAINER} init container");
    matches[0]
}

fn label_selector_matches(sel: &LabelSelector, labels: &BTreeMap<String, String>) -> bool {
    assert!(
        sel.match_expressions.is_none(),
        "matchExpressions are not evaluated by this test"
    );
    sel.match_labels
        .iter()
        .flatten()
        .all(|(k, v)| labels.get(k) == Some(v))
}

// ---------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------

#[test]
fn every_manifest_parses_strictly() {
    let m = load_deploy();
    assert!(!m.mutating.is_empty() && !m.mutating_bindings.is_empty());
    assert!(!m.roles.is_empty() && !m.role_bindings.is_empty());
    assert!(!m.nads.is_empty() && !m.vms.is_empty());
}

#[test]
fn kustomizations_list_every_manifest_next_to_them() {
    let m = load_deploy();
    assert!(
        !m.kustomizations.is_empty(),
        "deploy/ has no kustomization.yaml"
    );
    for (dir, k) in &m.kustomizations {
        let listed: BTreeSet<&str> = k
            .resources
            .iter()
            .chain(&k.configurations)
            .map(String::as_str)
            .collect();
        for r in &listed {
            let target = dir.join(r);
            assert!(
                target.is_file() || target.join("kustomization.yaml").is_file(),
                "{}: lists missing {r}",
                dir.display()
            );
        }
        for entry in std::fs::read_dir(dir).expect("read dir") {
            let path = entry.expect("entry").path();
            let name = path
                .file_name()
                .and_then(|n| n.to_str())
                .unwrap_or_default();
            if path.is_file() && name.ends_with(".yaml") && name != "kustomization.yaml" {
                assert!(
                    listed.contains(name),
                    "{}: {name} is not in kustomization.yaml",
                    dir.display()
                );
            }
        }
    }
}

#[test]
fn injected_container_is_a_least_privilege_native_sidecar() {
    let m = load_deploy();
    let policy = the(&m.mutating, "MutatingAdmissionPolicy");
    let before = fixture_pod_json();
    let pod: Pod = strict_json(
        "launcher pod after admission",
        &admit(policy, before.clone()),
    );
    let c = injected(&pod);
    let spec = pod.spec.as_ref().expect("pod spec");

    // A native sidecar, after KubeVirt's own init containers.
    assert_eq!(c.restart_policy.as_deref(), Some("Always"));
    let inits = spec.init_containers.as_ref().expect("init containers");
    assert_eq!(inits.last().map(|c| c.name.as_str()), Some(CONTAINER));
    assert_eq!(
        inits.len(),
        before["spec"]["initContainers"]
            .as_array()
            .map_or(0, Vec::len)
            + 1,
        "KubeVirt's init containers are kept"
    );

    // Exactly NET_ADMIN and NET_RAW (the DHCP server's packet socket),
    // everything else dropped, non-root as QEMU's user.
    let sc = c.security_context.as_ref().expect("securityContext");
    let caps = sc.capabilities.as_ref().expect("capabilities");
    assert_eq!(
        caps.add.as_deref(),
        Some(&["NET_ADMIN".to_owned(), "NET_RAW".to_owned()][..])
    );
    assert_eq!(caps.drop.as_deref(), Some(&["ALL".to_owned()][..]));
    assert_eq!(sc.allow_privilege_escalation, Some(false));
    assert_eq!(sc.read_only_root_filesystem, Some(true));
    assert_eq!(sc.run_as_non_root, Some(true));
    assert_eq!(sc.run_as_user, Some(QEMU_UID));
    assert_eq!(sc.run_as_group, Some(QEMU_UID));
    assert!(sc.privileged.is_none_or(|p| !p));
    assert_eq!(
        sc.seccomp_profile.as_ref().map(|s| s.type_.as_str()),
        Some("RuntimeDefault")
    );

    // Probes: liveness on /healthz, readiness on /readyz, both over the
    // API's unix socket (`nicplug probe`); no startup probe, which would hold
    // back the compute container (native sidecars must be started before the
    // next container).
    assert!(c.startup_probe.is_none(), "no startupProbe on the sidecar");
    let socket_arg = |args: &[String], flag: &str| {
        args.iter()
            .position(|a| a == flag)
            .and_then(|i| args.get(i + 1))
            .cloned()
    };
    let args = c.args.as_deref().expect("args");
    for (which, probe, endpoint) in [
        ("liveness", c.liveness_probe.as_ref(), "healthz"),
        ("readiness", c.readiness_probe.as_ref(), "readyz"),
    ] {
        let probe = probe.unwrap_or_else(|| panic!("a {which} probe"));
        let cmd = probe
            .exec
            .as_ref()
            .and_then(|e| e.command.as_deref())
            .unwrap_or_else(|| panic!("an exec {which} probe"));
        assert_eq!(&cmd[..3], ["nicplug", "probe", endpoint], "{which}");
        assert_eq!(
            socket_arg(cmd, "--socket"),
            socket_arg(args, "--api-socket"),
            "the {which} probe asks the socket the agent serves"
        );
        assert!(
            probe.failure_threshold.unwrap_or(3) >= 3,
            "{which}: no flapping on one slow answer"
        );
        assert!(probe.http_get.is_none() && probe.tcp_socket.is_none());
    }
    assert!(
        !args.iter().any(|a| a == "--listen"),
        "no TCP listener: the API stays on the unix socket"
    );
    assert!(
        c.ports.as_deref().is_none_or(|p| p.is_empty()),
        "no port unless metrics are on"
    );
    assert_eq!(
        c.image.as_deref(),
        default_params()["data"]["image"].as_str(),
        "the image comes from the settings ConfigMap"
    );
}

#[test]
fn injected_mounts_name_volumes_the_pod_really_has() {
    let m = load_deploy();
    let policy = the(&m.mutating, "MutatingAdmissionPolicy");
    let before: Pod = strict_json(LAUNCHER_FIXTURE, &fixture_pod_json());
    let after: Pod = strict_json("after admission", &admit(policy, fixture_pod_json()));
    let c = injected(&after);
    let volumes = |p: &Pod| -> Vec<String> {
        p.spec
            .as_ref()
            .and_then(|s| s.volumes.as_ref())
            .into_iter()
            .flatten()
            .map(|v| v.name.clone())
            .collect()
    };
    let (old, new) = (volumes(&before), volumes(&after));
    let unique: BTreeSet<_> = new.iter().collect();
    assert_eq!(unique.len(), new.len(), "duplicate volume names: {new:?}");
    assert!(new.starts_with(&old), "KubeVirt's volumes are kept");
    let added: Vec<_> = new[old.len()..].to_vec();

    let compute = after
        .spec
        .as_ref()
        .expect("spec")
        .containers
        .iter()
        .find(|c| c.name == "compute")
        .expect("compute container");
    for mount in c.volume_mounts.iter().flatten() {
        let from_kubevirt = old.contains(&mount.name);
        assert!(
            from_kubevirt || added.contains(&mount.name),
            "mount {} names no volume of the launcher pod (has {old:?}, policy adds {added:?})",
            mount.name
        );
        if from_kubevirt {
            // A KubeVirt volume is shared with the compute container at the
            // same path, and never written by nicplug.
            let theirs = compute
                .volume_mounts
                .iter()
                .flatten()
                .find(|v| v.name == mount.name)
                .unwrap_or_else(|| panic!("compute does not mount {}", mount.name));
            assert_eq!(theirs.mount_path, mount.mount_path);
            assert_eq!(mount.read_only, Some(true), "{} read-only", mount.name);
        }
    }
    let path_of = |name: &str| {
        c.volume_mounts
            .iter()
            .flatten()
            .find(|v| v.name == name)
            .map(|v| v.mount_path.clone())
    };
    assert_eq!(
        path_of("libvirt-runtime").as_deref(),
        Some("/var/run/libvirt")
    );

    // The token: projected, default audience, about an hour, where in-cluster
    // clients look for it.
    let token_volume = after
        .spec
        .as_ref()
        .and_then(|s| s.volumes.as_ref())
        .into_iter()
        .flatten()
        .find(|v| {
            v.projected.as_ref().is_some_and(|p| {
                p.sources
                    .iter()
                    .flatten()
                    .any(|s| s.service_account_token.is_some())
            })
        })
        .expect("a projected service-account token volume");
    let sat = token_volume
        .projected
        .as_ref()
        .and_then(|p| p.sources.as_ref())
        .into_iter()
        .flatten()
        .find_map(|s| s.service_account_token.as_ref())
        .expect("token source");
    assert!(sat.audience.is_none(), "default audience (the API server)");
    assert_eq!(sat.expiration_seconds, Some(3600));
    let token_mount = c
        .volume_mounts
        .iter()
        .flatten()
        .find(|v| v.name == token_volume.name)
        .expect("token is mounted");
    assert_eq!(
        token_mount.mount_path,
        "/var/run/secrets/kubernetes.io/serviceaccount"
    );
    assert_eq!(token_mount.read_only, Some(true));
    assert_eq!(
        before
            .spec
            .as_ref()
            .and_then(|s| s.automount_service_account_token),
        Some(false),
        "the launcher has no token of its own: the projection is needed"
    );
}

#[test]
fn env_and_args_come_from_the_pod_kubevirt_renders() {
    let m = load_deploy();
    let policy = the(&m.mutating, "MutatingAdmissionPolicy");
    let before = fixture_pod_json();
    let after: Pod = strict_json("after admission", &admit(policy, before.clone()));
    let c = injected(&after);
    let env: BTreeMap<&str, _> = c
        .env
        .iter()
        .flatten()
        .map(|e| (e.name.as_str(), e))
        .collect();
    let field_path = |name: &str| {
        env.get(name)
            .and_then(|e| e.value_from.as_ref())
            .and_then(|v| v.field_ref.as_ref())
            .map(|f| f.field_path.clone())
            .unwrap_or_else(|| panic!("{name} from the downward API"))
    };
    // The VMI name: the kubevirt.io/domain annotation is the VMI name;
    // vm.kubevirt.io/name is the (sanitised) hostname and may differ.
    assert_eq!(
        field_path("VMI_NAME"),
        "metadata.annotations['kubevirt.io/domain']"
    );
    assert_eq!(
        before["metadata"]["annotations"]["kubevirt.io/domain"],
        "demo"
    );
    assert_eq!(field_path("POD_NAMESPACE"), "metadata.namespace");
    assert_eq!(field_path("POD_NAME"), "metadata.name");

    // Every $(VAR) in the args is an env var of the container (kubelet leaves
    // unknown references as they are, silently).
    let args = c.args.as_deref().expect("args");
    for arg in args {
        let mut rest = arg.as_str();
        while let Some(start) = rest.find("$(") {
            let end = rest[start..].find(')').expect("closing paren") + start;
            let var = &rest[start + 2..end];
            assert!(env.contains_key(var), "arg {arg} uses undefined {var}");
            rest = &rest[end + 1..];
        }
    }
    assert_eq!(args.first().map(String::as_str), Some("run"));
    assert!(args.iter().any(|a| a == "--kube"));
    assert!(
        args.iter()
            .any(|a| a.contains("/var/run/libvirt/virtqemud-sock")),
        "KubeVirt's non-root virtqemud socket"
    );
}

#[test]
fn resources_are_small_and_keep_the_launcher_qos() {
    let m = load_deploy();
    let policy = the(&m.mutating, "MutatingAdmissionPolicy");
    let quantity = |c: &Container, which: &str, r: &str| -> Option<String> {
        let res = c.resources.as_ref()?;
        let list = if which == "requests" {
            res.requests.as_ref()
        } else {
            res.limits.as_ref()
        }?;
        list.get(r).map(|q| q.0.clone())
    };

    // KubeVirt's default launcher is Burstable: small requests, capped.
    let burstable: Pod = strict_json("burstable", &admit(policy, fixture_pod_json()));
    let c = injected(&burstable);
    assert_eq!(quantity(c, "requests", "cpu").as_deref(), Some("10m"));
    assert_eq!(quantity(c, "requests", "memory").as_deref(), Some("32Mi"));
    assert_eq!(quantity(c, "limits", "cpu").as_deref(), Some("100m"));
    assert_eq!(quantity(c, "limits", "memory").as_deref(), Some("64Mi"));
    for which in ["requests", "limits"] {
        assert_eq!(
            quantity(c, which, "devices.kubevirt.io/tun").as_deref(),
            Some("1"),
            "/dev/net/tun through KubeVirt's device plugin ({which})"
        );
    }

    // A Guaranteed launcher (dedicated CPUs) must stay Guaranteed.
    let mut guaranteed = fixture_pod_json();
    let compute = &mut guaranteed["spec"]["containers"][0];
    assert_eq!(compute["name"], "compute");
    compute["resources"]["limits"]["cpu"] = "1".into();
    compute["resources"]["requests"]["cpu"] = "1".into();
    compute["resources"]["limits"]["memory"] = "1294Mi".into();
    let pod: Pod = strict_json("guaranteed", &admit(policy, guaranteed));
    let c = injected(&pod);
    for r in ["cpu", "memory", "devices.kubevirt.io/tun"] {
        assert_eq!(
            quantity(c, "requests", r),
            quantity(c, "limits", r),
            "{r}: requests == limits"
        );
    }
}

#[test]
fn a_launcher_without_init_containers_gets_the_array_created() {
    let m = load_deploy();
    let policy = the(&m.mutating, "MutatingAdmissionPolicy");
    let mut pod = fixture_pod_json();
    pod["spec"]
        .as_object_mut()
        .expect("spec")
        .remove("initContainers");
    let pod: Pod = strict_json("no init containers", &admit(policy, pod));
    assert_eq!(
        pod.spec
            .as_ref()
            .and_then(|s| s.init_containers.as_ref())
            .map(Vec::len),
        Some(1)
    );
    injected(&pod);
}

#[test]
fn the_policy_matches_opted_in_launchers_only() {
    let m = load_deploy();
    let policy = the(&m.mutating, "MutatingAdmissionPolicy");
    let binding = the(&m.mutating_bindings, "MutatingAdmissionPolicyBinding");
    let spec = policy.spec.as_ref().expect("spec");
    let bspec = binding.spec.as_ref().expect("binding spec");
    assert_eq!(
        bspec.policy_name.as_deref(),
        policy.metadata.name.as_deref()
    );

    let rules = spec
        .match_constraints
        .as_ref()
        .and_then(|c| c.resource_rules.as_ref())
        .expect("resource rules");
    for r in rules {
        assert_eq!(r.operations.as_deref(), Some(&["CREATE".to_owned()][..]));
        assert_eq!(r.resources.as_deref(), Some(&["pods".to_owned()][..]));
    }
    let conditions: BTreeSet<_> = spec
        .match_conditions
        .iter()
        .flatten()
        .map(|c| c.name.as_str())
        .collect();
    assert!(
        conditions.contains("not-injected-yet"),
        "no double injection"
    );

    let mr = bspec.match_resources.as_ref().expect("matchResources");
    let objects = mr.object_selector.as_ref().expect("objectSelector");
    let fixture = fixture_pod_json();
    let labels: BTreeMap<String, String> =
        serde_json::from_value(fixture["metadata"]["labels"].clone()).expect("labels");
    assert!(
        label_selector_matches(objects, &labels),
        "the opted-in launcher matches"
    );
    let mut plain = labels.clone();
    plain.remove("nicplug.kubevirt.io/inject");
    assert!(
        !label_selector_matches(objects, &plain),
        "a launcher without the label does not"
    );
    let mut other = labels.clone();
    other.insert("kubevirt.io".into(), "hotplug-disk".into());
    assert!(
        !label_selector_matches(objects, &other),
        "KubeVirt's other pods do not"
    );

    // The example VM carries the label on its template (VMI labels are copied
    // onto the launcher pod), and its namespace is selected.
    let vm = the(&m.vms, "VirtualMachine");
    let vm_labels = vm.spec.template.metadata.labels.clone().unwrap_or_default();
    let inject = objects
        .match_labels
        .as_ref()
        .and_then(|l| l.get("nicplug.kubevirt.io/inject"))
        .expect("the opt-in label is selected");
    assert_eq!(vm_labels.get("nicplug.kubevirt.io/inject"), Some(inject));
    let ns = m
        .namespaces
        .iter()
        .find(|n| n.metadata.name == vm.metadata.namespace)
        .expect("the VM's namespace is in deploy/");
    let ns_labels = ns.metadata.labels.clone().unwrap_or_default();
    assert!(label_selector_matches(
        mr.namespace_selector.as_ref().expect("namespaceSelector"),
        &ns_labels
    ));
}

#[test]
fn rbac_grants_exactly_what_nicplug_uses() {
    let m = load_deploy();
    let role = the(&m.roles, "Role");
    let mut got = BTreeSet::new();
    for rule in role.rules.iter().flatten() {
        assert!(rule.resource_names.is_none() && rule.non_resource_urls.is_none());
        for group in rule.api_groups.iter().flatten() {
            for resource in rule.resources.iter().flatten() {
                for verb in &rule.verbs {
                    for s in [group, resource, verb] {
                        assert!(!s.contains('*'), "no wildcards in RBAC: {s}");
                    }
                    assert!(
                        got.insert((group.clone(), resource.clone(), verb.clone())),
                        "duplicate grant {group}/{resource} {verb}"
                    );
                }
            }
        }
    }
    let want: BTreeSet<(String, String, String)> = [
        ("kubevirt.io", "virtualmachineinstances", "get"),
        ("kubevirt.io", "virtualmachineinstances", "list"),
        ("kubevirt.io", "virtualmachineinstances", "watch"),
        ("", "pods", "get"),
        ("", "pods", "patch"),
        ("", "events", "create"),
        ("", "events", "patch"),
        ("events.k8s.io", "events", "create"),
        ("events.k8s.io", "events", "patch"),
    ]
    .iter()
    .map(|(g, r, v)| (g.to_string(), r.to_string(), v.to_string()))
    .collect();
    assert_eq!(got, want);

    // Bound to the ServiceAccount the example VM's launcher runs as.
    let binding = the(&m.role_bindings, "RoleBinding");
    let sa = the(&m.service_accounts, "ServiceAccount");
    assert_eq!(binding.role_ref.kind, "Role");
    assert_eq!(Some(&binding.role_ref.name), role.metadata.name.as_ref());
    assert_eq!(binding.metadata.namespace, role.metadata.namespace);
    assert_eq!(sa.metadata.namespace, role.metadata.namespace);
    let subjects = binding.subjects.as_deref().expect("subjects");
    assert_eq!(subjects.len(), 1);
    assert_eq!(subjects[0].kind, "ServiceAccount");
    assert_eq!(Some(&subjects[0].name), sa.metadata.name.as_ref());
    assert_eq!(subjects[0].namespace, sa.metadata.namespace);
    let vm = the(&m.vms, "VirtualMachine");
    assert_eq!(vm.metadata.namespace, sa.metadata.namespace);
    assert_eq!(
        vm.spec.template.spec.service_account_name.as_ref(),
        sa.metadata.name.as_ref(),
        "the VM runs its launcher as nicplug's ServiceAccount"
    );

    // The guard narrows pod updates by exactly that account.
    let guard = the(&m.validating, "ValidatingAdmissionPolicy");
    let gspec = guard.spec.as_ref().expect("guard spec");
    let sa_name = sa.metadata.name.as_deref().expect("sa name");
    assert!(
        gspec
            .match_conditions
            .iter()
            .flatten()
            .any(|c| c.expression.contains(&format!(":{sa_name}'"))),
        "the guard matches requests by the {sa_name} ServiceAccount"
    );
    let gbinding = the(&m.validating_bindings, "ValidatingAdmissionPolicyBinding");
    let gb = &gbinding.spec;
    assert_eq!(Some(&gb.policy_name), guard.metadata.name.as_ref());
    assert_eq!(gb.validation_actions, vec!["Deny".to_owned()]);
}

#[test]
fn the_namespace_allows_what_the_sidecar_adds() {
    // Pod Security Standards, baseline: the only capabilities a container may add.
    const BASELINE_CAPS: &[&str] = &[
        "AUDIT_WRITE",
        "CHOWN",
        "DAC_OVERRIDE",
        "FOWNER",
        "FSETID",
        "KILL",
        "MKNOD",
        "NET_BIND_SERVICE",
        "SETFCAP",
        "SETGID",
        "SETPCAP",
        "SETUID",
        "SYS_CHROOT",
    ];
    let m = load_deploy();
    let policy = the(&m.mutating, "MutatingAdmissionPolicy");
    let pod: Pod = strict_json("after admission", &admit(policy, fixture_pod_json()));
    let added = injected(&pod)
        .security_context
        .as_ref()
        .and_then(|s| s.capabilities.as_ref())
        .and_then(|c| c.add.clone())
        .unwrap_or_default();
    let needs_privileged = added.iter().any(|c| !BASELINE_CAPS.contains(&c.as_str()));
    let ns_name = pod.metadata.namespace.clone().expect("fixture namespace");
    let ns = m
        .namespaces
        .iter()
        .find(|n| n.metadata.name.as_ref() == Some(&ns_name))
        .expect("the launcher's namespace is in deploy/");
    let labels = ns.metadata.labels.clone().unwrap_or_default();
    let enforce = labels
        .get("pod-security.kubernetes.io/enforce")
        .map(String::as_str);
    assert!(needs_privileged, "NET_ADMIN is outside baseline");
    assert_eq!(enforce, Some("privileged"));
}

#[test]
fn the_nad_and_the_vm_are_consistent() {
    let m = load_deploy();
    for nad in &m.nads {
        let config: Value = serde_json::from_str(&nad.spec.config).expect("NAD config is JSON");
        assert_eq!(config["type"], "bridge", "a bridge CNI network");
        assert_eq!(
            config["name"].as_str(),
            nad.metadata.name.as_deref(),
            "CNI network name = NAD name"
        );
    }
    let vm = the(&m.vms, "VirtualMachine");
    assert_eq!(
        vm.spec.run_strategy, "Always",
        "the example VM runs once applied"
    );
    let spec = &vm.spec.template.spec;
    let disks: BTreeSet<_> = spec.domain.devices.disks.iter().map(|d| &d.name).collect();
    let volumes: BTreeSet<_> = spec.volumes.iter().map(|v| &v.name).collect();
    assert_eq!(disks, volumes, "every disk has a volume");
    for iface in &spec.domain.devices.interfaces {
        let net = spec
            .networks
            .iter()
            .find(|n| n.name == iface.name)
            .unwrap_or_else(|| panic!("interface {} has no network", iface.name));
        if let Some(multus) = &net.multus {
            assert!(
                iface.bridge.is_some(),
                "secondary networks use bridge binding"
            );
            assert!(
                m.nads
                    .iter()
                    .any(|n| n.metadata.name.as_deref() == Some(&multus.network_name)),
                "network {} names a NAD in deploy/",
                multus.network_name
            );
        } else {
            assert!(net.pod.is_some());
        }
    }
}

#[test]
fn the_containerfile_matches_the_manifests() {
    let path = ["Containerfile", "deploy/Containerfile"]
        .iter()
        .map(|p| repo().join(p))
        .find(|p| p.is_file())
        .expect("a Containerfile");
    let text = std::fs::read_to_string(&path).expect("read Containerfile");
    let lines: Vec<&str> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.starts_with('#'))
        .collect();
    let has = |needle: &str| lines.iter().any(|l| l.contains(needle));
    assert!(has(r#"ENTRYPOINT ["nicplug"]"#));
    assert!(has("/usr/local/bin/nicplug"));
    assert!(has("--locked"), "reproducible build from Cargo.lock");
    assert!(has(&format!("USER {QEMU_UID}:{QEMU_UID}")));
    // Non-root with NET_ADMIN works only through a file capability: added
    // capabilities do not survive exec for a non-root user otherwise.
    assert!(has(
        "setcap cap_net_admin,cap_net_raw=ep /usr/local/bin/nicplug"
    ));
}

#[test]
fn the_policy_selects_only_launchers_not_injected_yet() {
    let m = load_deploy();
    let policy = the(&m.mutating, "MutatingAdmissionPolicy");
    let launcher = fixture_pod_json();
    assert!(matches(policy, &launcher));
    let mut other = launcher.clone();
    other["metadata"]["labels"]["kubevirt.io"] = "hotplug-disk".into();
    assert!(!matches(policy, &other), "KubeVirt's other pods");
    let mut unlabelled = launcher.clone();
    unlabelled["metadata"]
        .as_object_mut()
        .expect("metadata")
        .remove("labels");
    assert!(!matches(policy, &unlabelled), "a pod without labels");
    let injected_once = admit(policy, launcher);
    assert!(!matches(policy, &injected_once), "no second injection");
}

#[test]
fn network_status_comes_from_a_downward_api_volume_not_the_api() {
    let m = load_deploy();
    let policy = the(&m.mutating, "MutatingAdmissionPolicy");
    let pod: Pod = strict_json("after admission", &admit(policy, fixture_pod_json()));
    let c = injected(&pod);
    let args = c.args.as_deref().expect("args");
    assert!(
        !args.iter().any(|a| a == "--kube-network-status"),
        "no pod reads through the API"
    );
    let file = args
        .iter()
        .position(|a| a == "--network-status")
        .and_then(|i| args.get(i + 1))
        .expect("--network-status FILE");
    let volume = pod
        .spec
        .as_ref()
        .and_then(|s| s.volumes.as_ref())
        .into_iter()
        .flatten()
        .find(|v| v.name == "nicplug-podinfo")
        .expect("the podinfo volume");
    let items = volume
        .downward_api
        .as_ref()
        .and_then(|d| d.items.as_ref())
        .expect("a downwardAPI volume");
    assert_eq!(items.len(), 1, "only the one annotation, not all of them");
    let field = items[0].field_ref.as_ref().expect("fieldRef");
    assert_eq!(
        field.field_path,
        "metadata.annotations['k8s.v1.cni.cncf.io/network-status']"
    );
    let mount = c
        .volume_mounts
        .iter()
        .flatten()
        .find(|v| v.name == "nicplug-podinfo")
        .expect("mounted");
    assert_eq!(mount.read_only, Some(true));
    assert_eq!(*file, format!("{}/{}", mount.mount_path, items[0].path));

    // And so RBAC needs no read of pods beyond `get` (the pod's own, for the
    // patch): no list, no watch (a Role cannot name the generated pod name).
    let role = the(&m.roles, "Role");
    for rule in role.rules.iter().flatten() {
        if rule.resources.iter().flatten().any(|r| r == "pods") {
            assert!(!rule.verbs.iter().any(|v| v == "list" || v == "watch"));
        }
    }
}

#[test]
fn settings_come_from_a_configmap_in_the_launchers_namespace() {
    let m = load_deploy();
    let policy = the(&m.mutating, "MutatingAdmissionPolicy");
    let spec = policy.spec.as_ref().expect("spec");
    let kind = spec.param_kind.as_ref().expect("paramKind");
    assert_eq!(
        (kind.api_version.as_deref(), kind.kind.as_deref()),
        (Some("v1"), Some("ConfigMap"))
    );
    let binding = the(&m.mutating_bindings, "MutatingAdmissionPolicyBinding");
    let param_ref = binding
        .spec
        .as_ref()
        .and_then(|s| s.param_ref.as_ref())
        .expect("paramRef");
    assert!(
        param_ref.namespace.is_none() && param_ref.selector.is_none(),
        "looked up in the admitted pod's namespace, by name"
    );
    assert_eq!(
        param_ref.parameter_not_found_action.as_deref(),
        Some("Deny")
    );
    let cm = the(&m.config_maps, "ConfigMap");
    assert_eq!(cm.metadata.name, param_ref.name);
    let sa = the(&m.service_accounts, "ServiceAccount");
    assert_eq!(
        cm.metadata.namespace, sa.metadata.namespace,
        "next to the RBAC"
    );

    // Every setting reaches the container.
    let mut params = default_params();
    params["data"] = serde_json::json!({
        "image": "registry.internal/nicplug:9.9",
        "imagePullPolicy": "Always",
        "logFormat": "text",
        "metricsPort": "9464"
    });
    let pod: Pod = strict_json(
        "with settings",
        &admit_with(policy, &params, fixture_pod_json()),
    );
    let c = injected(&pod);
    assert_eq!(c.image.as_deref(), Some("registry.internal/nicplug:9.9"));
    assert_eq!(c.image_pull_policy.as_deref(), Some("Always"));
    let args = c.args.as_deref().expect("args");
    assert!(args.windows(2).any(|w| w == ["--log-format", "text"]));
    assert!(args.windows(2).any(|w| w == ["--listen", "0.0.0.0:9464"]));
    let ports = c.ports.as_deref().expect("ports");
    assert_eq!(ports.len(), 1);
    assert_eq!(ports[0].name.as_deref(), Some("metrics"));
    assert_eq!(ports[0].container_port, 9464);

    // Only the image is required.
    params["data"] = serde_json::json!({"image": "x/nicplug:1"});
    let pod: Pod = strict_json(
        "image only",
        &admit_with(policy, &params, fixture_pod_json()),
    );
    let c = injected(&pod);
    assert_eq!(c.image_pull_policy.as_deref(), Some("IfNotPresent"));
    let args = c.args.as_deref().expect("args");
    assert!(args.windows(2).any(|w| w == ["--log-format", "json"]));
    assert!(!args.iter().any(|a| a == "--listen"));
}

// ---------------------------------------------------------------------------
// kustomize, as `kubectl kustomize` renders deploy/
// ---------------------------------------------------------------------------

/// Renders `dir` with `kubectl kustomize`; None (and a loud SKIP) when
/// kubectl is not installed.
fn kustomize(test: &str, dir: &Path) -> Option<Vec<Value>> {
    let out = match std::process::Command::new("kubectl")
        .arg("kustomize")
        .arg(dir)
        .output()
    {
        Ok(out) => out,
        Err(e) => {
            eprintln!("\n*** SKIP {test}: kubectl kustomize unavailable: {e} ***\n");
            return None;
        }
    };
    assert!(
        out.status.success(),
        "kubectl kustomize {}: {}",
        dir.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).expect("UTF-8");
    Some(
        serde_yaml::Deserializer::from_str(&text)
            .map(|de| {
                serde_json::to_value(serde_yaml::Value::deserialize(de).expect("YAML"))
                    .expect("JSON")
            })
            .filter(|v| !v.is_null())
            .collect(),
    )
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("mkdir");
    for entry in std::fs::read_dir(from).expect("read dir") {
        let path = entry.expect("entry").path();
        let dest = to.join(path.file_name().expect("name"));
        if path.is_dir() {
            copy_dir(&path, &dest);
        } else {
            std::fs::copy(&path, &dest).expect("copy");
        }
    }
}

/// A scratch directory with a copy of deploy/ and an overlay `overlay/`
/// holding `kustomization`.
struct Scratch(PathBuf);

impl Scratch {
    fn new(name: &str, kustomization: &str) -> Self {
        let dir =
            std::env::temp_dir().join(format!("nicplug-deploy-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        copy_dir(&repo().join("deploy"), &dir.join("deploy"));
        std::fs::create_dir_all(dir.join("overlay")).expect("mkdir");
        std::fs::write(dir.join("overlay/kustomization.yaml"), kustomization).expect("write");
        Scratch(dir)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

const CLUSTER_SCOPED: &[&str] = &[
    "Namespace",
    "MutatingAdmissionPolicy",
    "MutatingAdmissionPolicyBinding",
    "ValidatingAdmissionPolicy",
    "ValidatingAdmissionPolicyBinding",
];

fn kind_of(v: &Value) -> &str {
    v["kind"].as_str().expect("kind")
}

#[test]
fn the_shipped_kustomization_renders_cluster_objects_without_a_namespace() {
    let test = "the_shipped_kustomization_renders_cluster_objects_without_a_namespace";
    let Some(objects) = kustomize(test, &repo().join("deploy")) else {
        return;
    };
    let kinds: BTreeSet<&str> = objects.iter().map(kind_of).collect();
    for k in CLUSTER_SCOPED {
        assert!(kinds.contains(k), "deploy/ renders a {k}");
    }
    for o in &objects {
        let ns = o["metadata"].get("namespace");
        if CLUSTER_SCOPED.contains(&kind_of(o)) {
            assert!(
                ns.is_none(),
                "{} {} has a namespace",
                kind_of(o),
                o["metadata"]["name"]
            );
        } else {
            assert_eq!(ns, Some(&Value::from("vms")), "{} in vms", kind_of(o));
        }
    }
}

#[test]
fn a_namespace_overlay_of_vms_moves_only_namespaced_objects() {
    let test = "a_namespace_overlay_of_vms_moves_only_namespaced_objects";
    // What docs/deploy.md tells an operator to write for another namespace,
    // with an image override and the metrics component.
    let scratch = Scratch::new(
        "overlay",
        "apiVersion: kustomize.config.k8s.io/v1beta1\n\
         kind: Kustomization\n\
         namespace: team-a\n\
         resources: [../deploy/vms]\n\
         components: [../deploy/metrics]\n\
         images:\n\
         \x20 - name: registry.example.com/nicplug\n\
         \x20   newName: registry.internal/nicplug\n\
         \x20   newTag: \"0.1.1\"\n",
    );
    let Some(objects) = kustomize(test, &scratch.0.join("overlay")) else {
        return;
    };
    for o in &objects {
        let kind = kind_of(o);
        assert!(
            !CLUSTER_SCOPED[1..].contains(&kind),
            "the namespace part holds no admission object ({kind})"
        );
        if kind == "Namespace" {
            assert_eq!(o["metadata"]["name"], "team-a", "the Namespace is renamed");
            assert!(o["metadata"].get("namespace").is_none());
        } else {
            assert_eq!(o["metadata"]["namespace"], "team-a", "{kind} moved");
        }
        if kind == "RoleBinding" {
            assert_eq!(
                o["subjects"][0]["namespace"], "team-a",
                "the subject moves too"
            );
        }
    }
    let cm = objects
        .iter()
        .find(|o| kind_of(o) == "ConfigMap")
        .expect("the settings");
    assert_eq!(
        cm["data"]["image"], "registry.internal/nicplug:0.1.1",
        "`images:` applies"
    );
    assert_eq!(cm["data"]["metricsPort"], "9464", "the metrics component");

    // That ConfigMap through the policy: the overridden image, the port the
    // PodMonitor scrapes, in the launcher the PodMonitor selects.
    let m = load_deploy();
    let policy = the(&m.mutating, "MutatingAdmissionPolicy");
    let mut launcher = fixture_pod_json();
    launcher["metadata"]["namespace"] = "team-a".into();
    let pod: Pod = strict_json("overlay", &admit_with(policy, cm, launcher));
    let c = injected(&pod);
    assert_eq!(c.image.as_deref(), Some("registry.internal/nicplug:0.1.1"));
    let monitor = objects
        .iter()
        .find(|o| kind_of(o) == "PodMonitor")
        .expect("a PodMonitor");
    let monitor: PodMonitor = strict_json("PodMonitor", monitor);
    let port = &monitor.spec.pod_metrics_endpoints[0].port;
    assert!(
        c.ports
            .iter()
            .flatten()
            .any(|p| p.name.as_ref() == Some(port)),
        "the container declares the port {port} the PodMonitor scrapes"
    );
    let labels = pod.metadata.labels.clone().unwrap_or_default();
    assert!(label_selector_matches(&monitor.spec.selector, &labels));
}

#[test]
fn no_kustomization_sets_a_namespace_over_the_cluster_part() {
    // Without kubectl: every kustomization in deploy/ that sets `namespace:`
    // reaches no cluster-scoped manifest through its resources.
    let m = load_deploy();
    fn kinds_under(dir: &Path, out: &mut Vec<String>) {
        let text = std::fs::read_to_string(dir.join("kustomization.yaml")).expect("kustomization");
        let k: Kustomization = serde_yaml::from_str(&text).expect("kustomization");
        for r in &k.resources {
            let p = dir.join(r);
            if p.is_dir() {
                kinds_under(&p, out);
            } else {
                for d in documents(&p) {
                    out.push(d.value["kind"].as_str().unwrap_or_default().to_owned());
                }
            }
        }
    }
    for (dir, k) in &m.kustomizations {
        if k.namespace.is_some() {
            let mut kinds = Vec::new();
            kinds_under(dir, &mut kinds);
            for kind in kinds {
                assert!(
                    !CLUSTER_SCOPED[1..].contains(&kind.as_str()),
                    "{}: sets a namespace over a {kind}",
                    dir.display()
                );
            }
        }
    }
    let cluster = m
        .kustomizations
        .iter()
        .find(|(d, _)| d.ends_with("cluster"))
        .expect("deploy/cluster");
    assert!(cluster.1.namespace.is_none());
}
