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
//! 2. The MutatingAdmissionPolicy's JSON patches are parsed (their CEL is kept
//!    to literal data on purpose, see `cel` below) and applied to a launcher
//!    pod as KubeVirt v1.9.0 renders it (`fixtures/kubevirt/`); the result is
//!    parsed as a typed Pod and the injected container is checked: native
//!    sidecar, capabilities, user, mounts of volumes that exist, env, probe,
//!    resources (Burstable and Guaranteed launchers).
//! 3. RBAC grants exactly the verbs and resources nicplug needs, no wildcard;
//!    the binding, the namespace, the example VM and the Containerfile agree
//!    with each other.
//!
//! What this cannot check: that an API server accepts the CEL (no API server
//! runs here). The conditions the simulation needs are evaluated by a small
//! table in [`eval_condition`]; an expression it does not know fails the
//! test, so a changed policy forces a look at the table.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use k8s_openapi::api::admissionregistration::v1::{
    MutatingAdmissionPolicy, MutatingAdmissionPolicyBinding, ValidatingAdmissionPolicy,
    ValidatingAdmissionPolicyBinding,
};
use k8s_openapi::api::core::v1::{Container, Namespace, Pod, ServiceAccount};
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

/// `kustomize.config.k8s.io/v1beta1` Kustomization, the fields used here.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
#[allow(dead_code)]
struct Kustomization {
    api_version: String,
    kind: String,
    resources: Vec<String>,
}

// ---------------------------------------------------------------------------
// Everything in deploy/, typed
// ---------------------------------------------------------------------------

#[derive(Default)]
struct Manifests {
    namespaces: Vec<Namespace>,
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
                (Some("kustomize.config.k8s.io/v1beta1"), Some("Kustomization")) => {
                    let dir = file.parent().expect("file has a directory").to_path_buf();
                    m.kustomizations.push((dir, strict(&origin, value)));
                }
                // deploy/monitoring/: checked by tests/operator.rs (promtool).
                (Some("monitoring.coreos.com/v1"), Some("PodMonitor" | "PrometheusRule")) => {}
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
// The literal subset of CEL the policy's patches are written in
// ---------------------------------------------------------------------------

mod cel {
    //! Parses the data-only CEL the mutating policy uses: string, integer and
    //! boolean literals, lists, maps with string keys, `Type{field: value}`
    //! initialisers, references to `variables.NAME`, and one top-level
    //! conditional `CONDITION ? A : B` whose condition is kept as text.

    #[derive(Debug, Clone, PartialEq)]
    pub enum Lit {
        Str(String),
        Int(i64),
        Bool(bool),
        List(Vec<Lit>),
        Map(Vec<(String, Lit)>),
        Obj {
            ty: String,
            fields: Vec<(String, Lit)>,
        },
        Ref(String),
    }

    #[derive(Debug)]
    pub enum Expr {
        Lit(Lit),
        Cond {
            cond: String,
            then: Lit,
            otherwise: Lit,
        },
    }

    pub fn parse(src: &str) -> Result<Expr, String> {
        match top_level(src, '?') {
            None => Ok(Expr::Lit(literal(src)?)),
            Some(q) => {
                let rest = &src[q + 1..];
                let c = top_level(rest, ':').ok_or("conditional without ':'")?;
                Ok(Expr::Cond {
                    cond: normalize(&src[..q]),
                    then: literal(&rest[..c])?,
                    otherwise: literal(&rest[c + 1..])?,
                })
            }
        }
    }

    /// Whitespace collapsed to single spaces, trimmed.
    pub fn normalize(s: &str) -> String {
        s.split_whitespace().collect::<Vec<_>>().join(" ")
    }

    /// Byte offset of the first `needle` outside strings and brackets.
    fn top_level(src: &str, needle: char) -> Option<usize> {
        let mut depth = 0i32;
        let mut quote: Option<char> = None;
        let mut escaped = false;
        for (i, ch) in src.char_indices() {
            if let Some(q) = quote {
                if escaped {
                    escaped = false;
                } else if ch == '\\' {
                    escaped = true;
                } else if ch == q {
                    quote = None;
                }
                continue;
            }
            match ch {
                '"' | '\'' => quote = Some(ch),
                '(' | '[' | '{' => depth += 1,
                ')' | ']' | '}' => depth -= 1,
                c if c == needle && depth == 0 => return Some(i),
                _ => {}
            }
        }
        None
    }

    fn literal(src: &str) -> Result<Lit, String> {
        let mut p = Parser {
            chars: src.chars().collect(),
            pos: 0,
        };
        let lit = p.value()?;
        p.skip_ws();
        if p.pos != p.chars.len() {
            return Err(format!("unexpected text after literal: {:?}", p.rest()));
        }
        Ok(lit)
    }

    struct Parser {
        chars: Vec<char>,
        pos: usize,
    }

    impl Parser {
        fn rest(&self) -> String {
            self.chars[self.pos..].iter().take(40).collect()
        }

        fn skip_ws(&mut self) {
            while self.chars.get(self.pos).is_some_and(|c| c.is_whitespace()) {
                self.pos += 1;
            }
        }

        fn peek(&mut self) -> Option<char> {
            self.skip_ws();
            self.chars.get(self.pos).copied()
        }

        fn expect(&mut self, want: char) -> Result<(), String> {
            match self.peek() {
                Some(c) if c == want => {
                    self.pos += 1;
                    Ok(())
                }
                _ => Err(format!("expected {want:?} at {:?}", self.rest())),
            }
        }

        /// Comma-separated items up to `close`; a trailing comma is allowed.
        fn items<T>(
            &mut self,
            close: char,
            mut item: impl FnMut(&mut Self) -> Result<T, String>,
        ) -> Result<Vec<T>, String> {
            let mut out = Vec::new();
            loop {
                if self.peek() == Some(close) {
                    self.pos += 1;
                    return Ok(out);
                }
                out.push(item(self)?);
                match self.peek() {
                    Some(',') => self.pos += 1,
                    Some(c) if c == close => {}
                    _ => return Err(format!("expected ',' or {close:?} at {:?}", self.rest())),
                }
            }
        }

        fn value(&mut self) -> Result<Lit, String> {
            match self.peek() {
                Some('"' | '\'') => self.string().map(Lit::Str),
                Some('[') => {
                    self.pos += 1;
                    self.items(']', Self::value).map(Lit::List)
                }
                Some('{') => {
                    self.pos += 1;
                    self.items('}', |p| {
                        let key = p.string()?;
                        p.expect(':')?;
                        Ok((key, p.value()?))
                    })
                    .map(Lit::Map)
                }
                Some(c) if c.is_ascii_digit() || c == '-' => self.int(),
                Some(c) if c.is_ascii_alphabetic() || c == '_' => {
                    let ident = self.ident();
                    match ident.as_str() {
                        "true" => return Ok(Lit::Bool(true)),
                        "false" => return Ok(Lit::Bool(false)),
                        _ => {}
                    }
                    if self.peek() == Some('{') {
                        self.pos += 1;
                        let fields = self.items('}', |p| {
                            let name = p.ident();
                            if name.is_empty() || name.contains('.') {
                                return Err(format!("bad field name at {:?}", p.rest()));
                            }
                            p.expect(':')?;
                            Ok((name, p.value()?))
                        })?;
                        Ok(Lit::Obj { ty: ident, fields })
                    } else if ident.starts_with("variables.") {
                        Ok(Lit::Ref(ident))
                    } else {
                        Err(format!("not a literal: {ident}"))
                    }
                }
                _ => Err(format!("expected a literal at {:?}", self.rest())),
            }
        }

        fn ident(&mut self) -> String {
            self.skip_ws();
            let start = self.pos;
            while self
                .chars
                .get(self.pos)
                .is_some_and(|c| c.is_ascii_alphanumeric() || *c == '_' || *c == '.')
            {
                self.pos += 1;
            }
            self.chars[start..self.pos].iter().collect()
        }

        fn int(&mut self) -> Result<Lit, String> {
            self.skip_ws();
            let start = self.pos;
            if self.chars.get(self.pos) == Some(&'-') {
                self.pos += 1;
            }
            while self.chars.get(self.pos).is_some_and(|c| c.is_ascii_digit()) {
                self.pos += 1;
            }
            let text: String = self.chars[start..self.pos].iter().collect();
            text.parse()
                .map(Lit::Int)
                .map_err(|e| format!("bad integer {text:?}: {e}"))
        }

        fn string(&mut self) -> Result<String, String> {
            let quote = match self.peek() {
                Some(q @ ('"' | '\'')) => q,
                _ => return Err(format!("expected a string at {:?}", self.rest())),
            };
            self.pos += 1;
            let mut out = String::new();
            loop {
                let c = *self.chars.get(self.pos).ok_or("unterminated string")?;
                self.pos += 1;
                match c {
                    '\\' => {
                        let e = *self.chars.get(self.pos).ok_or("unterminated escape")?;
                        self.pos += 1;
                        out.push(match e {
                            'n' => '\n',
                            't' => '\t',
                            '\\' | '"' | '\'' => e,
                            _ => return Err(format!("unsupported escape \\{e}")),
                        });
                    }
                    c if c == quote => return Ok(out),
                    c => out.push(c),
                }
            }
        }
    }
}

use cel::{Expr, Lit};

/// What the simulation knows about the policy's CEL beyond literal data:
/// each condition the policy uses, evaluated on the pod being admitted.
/// Unknown conditions fail loudly: teach this table when the policy changes.
fn eval_condition(cond: &str, pod: &Value) -> bool {
    match cond {
        "has(object.spec.initContainers)" => pod["spec"].get("initContainers").is_some(),
        "has(object.spec.volumes)" => pod["spec"].get("volumes").is_some(),
        // Same meaning as the policy's `guaranteed` variable: the compute
        // container has cpu and memory requests equal to its limits.
        "variables.guaranteed" => pod["spec"]["containers"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|c| c["name"] == "compute")
            .any(|c| {
                let (req, lim) = (&c["resources"]["requests"], &c["resources"]["limits"]);
                ["cpu", "memory"]
                    .iter()
                    .all(|r| !req[r].is_null() && req[r] == lim[r])
            }),
        other => panic!("the simulation does not know the CEL condition {other:?}"),
    }
}

struct Policy<'a> {
    variables: BTreeMap<String, String>,
    pod: &'a Value,
}

impl Policy<'_> {
    fn choose(&self, expr: Expr) -> Lit {
        match expr {
            Expr::Lit(l) => l,
            Expr::Cond {
                cond,
                then,
                otherwise,
            } => {
                if eval_condition(&cond, self.pod) {
                    then
                } else {
                    otherwise
                }
            }
        }
    }

    fn resolve(&self, reference: &str) -> Lit {
        let name = reference.trim_start_matches("variables.");
        let expr = self
            .variables
            .get(name)
            .unwrap_or_else(|| panic!("{reference} is not a variable of the policy"));
        self.choose(cel::parse(expr).unwrap_or_else(|e| panic!("variable {name}: {e}")))
    }

    /// JSON for a literal; `ty` is the Object type name the position
    /// requires (`Object.spec.volumes` for an element of spec.volumes), as
    /// the API server checks for apply configurations.
    fn to_json(&self, lit: &Lit, ty: Option<&str>) -> Value {
        match lit {
            Lit::Str(s) => Value::String(s.clone()),
            Lit::Int(i) => Value::from(*i),
            Lit::Bool(b) => Value::Bool(*b),
            Lit::List(items) => Value::Array(items.iter().map(|i| self.to_json(i, ty)).collect()),
            Lit::Map(entries) => Value::Object(
                entries
                    .iter()
                    .map(|(k, v)| (k.clone(), self.to_json(v, None)))
                    .collect(),
            ),
            Lit::Ref(r) => self.to_json(&self.resolve(r), ty),
            Lit::Obj { ty: got, fields } => {
                if let Some(want) = ty {
                    assert_eq!(got, want, "Object type name does not match its field path");
                }
                Value::Object(
                    fields
                        .iter()
                        .map(|(k, v)| (k.clone(), self.to_json(v, Some(&format!("{got}.{k}")))))
                        .collect(),
                )
            }
        }
    }
}

/// `Object.spec.volumes` for `/spec/volumes/-` or `/spec/volumes/3`.
fn object_type_for_path(path: &str) -> String {
    let mut ty = String::from("Object");
    for seg in path.split('/').skip(1) {
        if seg != "-" && seg.parse::<usize>().is_err() {
            ty.push('.');
            ty.push_str(seg);
        }
    }
    ty
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

/// Admits `pod` through the mutating policy: match conditions as the table
/// knows them, then every mutation in order, each seeing the previous result.
fn admit(policy: &MutatingAdmissionPolicy, mut pod: Value) -> Value {
    let spec = policy.spec.as_ref().expect("policy spec");
    let variables: BTreeMap<String, String> = spec
        .variables
        .iter()
        .flatten()
        .map(|v| (v.name.clone(), v.expression.clone()))
        .collect();
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
        let parsed = cel::parse(expression).unwrap_or_else(|e| panic!("mutation: {e}"));
        let ops = {
            let ctx = Policy {
                variables: variables.clone(),
                pod: &pod,
            };
            let Lit::List(ops) = ctx.choose(parsed) else {
                panic!("a JSON patch expression must give a list");
            };
            ops.iter()
                .map(|op| {
                    let Lit::Obj { ty, fields } = op else {
                        panic!("JSON patch items must be JSONPatch{{...}}")
                    };
                    assert_eq!(ty, "JSONPatch");
                    let field = |name: &str| {
                        fields
                            .iter()
                            .find(|(k, _)| k == name)
                            .map(|(_, v)| v)
                            .unwrap_or_else(|| panic!("JSONPatch without {name}"))
                    };
                    let (Lit::Str(op), Lit::Str(path)) = (field("op"), field("path")) else {
                        panic!("JSONPatch op and path must be strings")
                    };
                    let value = ctx.to_json(field("value"), Some(&object_type_for_path(path)));
                    (op.clone(), path.clone(), value)
                })
                .collect::<Vec<_>>()
        };
        for (op, path, value) in ops {
            assert_eq!(op, "add", "only JSON patch add is simulated");
            json_patch_add(&mut pod, &path, value);
        }
    }
    pod
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
        let listed: BTreeSet<&str> = k.resources.iter().map(String::as_str).collect();
        for r in &listed {
            assert!(
                dir.join(r).is_file(),
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

    // Exactly NET_ADMIN, everything else dropped, non-root as QEMU's user.
    let sc = c.security_context.as_ref().expect("securityContext");
    let caps = sc.capabilities.as_ref().expect("capabilities");
    assert_eq!(caps.add.as_deref(), Some(&["NET_ADMIN".to_owned()][..]));
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

    // Probes: readiness only; a startup probe would hold back the compute
    // container (native sidecars must be started before the next container).
    assert!(c.startup_probe.is_none(), "no startupProbe on the sidecar");
    let exec = c
        .readiness_probe
        .as_ref()
        .and_then(|p| p.exec.as_ref())
        .expect("exec readiness probe");
    let cmd = exec.command.as_deref().expect("probe command");
    assert_eq!(&cmd[..2], ["nicplug", "status"]);
    let socket_arg = |args: &[String], flag: &str| {
        args.iter()
            .position(|a| a == flag)
            .and_then(|i| args.get(i + 1))
            .cloned()
    };
    let args = c.args.as_deref().expect("args");
    assert_eq!(
        socket_arg(cmd, "--socket"),
        socket_arg(args, "--api-socket"),
        "the probe asks the socket the agent serves"
    );
    assert!(
        !args.iter().any(|a| a == "--listen"),
        "no TCP listener: the API stays on the unix socket"
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
    assert!(has("setcap cap_net_admin=ep /usr/local/bin/nicplug"));
}
