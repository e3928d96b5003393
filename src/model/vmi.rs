//! The subset of a KubeVirt VirtualMachineInstance that nicplug reads:
//! `metadata`, `spec.domain.devices.interfaces`, `spec.networks` and the CPU
//! topology (for multiqueue). Everything else of the document is ignored.

use std::collections::BTreeMap;

use serde::Deserialize;

use super::names::{
    IfName, Mac, NameError, check_namespace, check_network_name, check_object_name,
    hashed_pod_iface, ordinal_pod_iface,
};

/// Deepest nesting a VMI document may have. Real ones stay below 20
/// (`spec.affinity...matchExpressions[].values[]` is the deepest); the limit
/// keeps a hostile document from costing time and stack in the parser.
pub const MAX_DEPTH: usize = 64;

/// Most vCPUs (`cores x sockets x threads`) nicplug accepts: KVM's limit on
/// x86 (KVM_MAX_VCPUS), far above what QEMU's q35 machine boots.
pub const MAX_VCPUS: u32 = 4096;

/// Interface models KubeVirt's admission accepts (`validInterfaceModels`).
const MODELS: [&str; 7] = [
    "e1000", "e1000e", "igb", "ne2k_pci", "pcnet", "rtl8139", "virtio",
];

/// Why a VMI document is refused. Every variant but the parser errors
/// names the offending field as a JSON path (`spec.networks[2].name`).
#[derive(Debug, thiserror::Error)]
pub enum VmiError {
    #[error("invalid VMI JSON")]
    Json(#[source] serde_json::Error),
    #[error("invalid VMI YAML")]
    Yaml(#[source] serde_saphyr::Error),
    #[error("nesting deeper than {MAX_DEPTH} levels at byte {at}")]
    TooDeep { at: usize },
    #[error("{field} is missing")]
    Missing { field: String },
    #[error("{field} is {found:?}, expected VirtualMachineInstance")]
    Kind { field: String, found: String },
    #[error("{field}: invalid name")]
    Name {
        field: String,
        #[source]
        source: NameError,
    },
    #[error("{field}: {what} {value:?} also appears at {first}")]
    Duplicate {
        field: String,
        what: &'static str,
        value: String,
        first: String,
    },
    #[error("{field}: interface {name:?} has no network of that name in spec.networks")]
    NoNetwork { field: String, name: String },
    #[error("{field}: multus network {name:?} has no interface of that name")]
    NoInterface { field: String, name: String },
    #[error("{field}: interface has {count} bindings ({bindings}), expected one")]
    Bindings {
        field: String,
        count: usize,
        bindings: String,
    },
    #[error("{field}: network has {has}, expected exactly one of pod and multus")]
    NetworkSource { field: String, has: &'static str },
    #[error("{field}: invalid macAddress")]
    Mac {
        field: String,
        #[source]
        source: NameError,
    },
    #[error("{field}: model {value:?} is not one of {}", MODELS.join(", "))]
    Model { field: String, value: String },
    #[error("{field}: {problem}")]
    Cpu { field: String, problem: String },
    #[error("{field}: port {value} is not in 1..=65535")]
    Port { field: String, value: i64 },
}

impl VmiError {
    /// The JSON path of the offending field, for every error but malformed
    /// JSON/YAML and too deep a document.
    pub fn field(&self) -> Option<&str> {
        match self {
            Self::Json(_) | Self::Yaml(_) | Self::TooDeep { .. } => None,
            Self::Missing { field }
            | Self::Kind { field, .. }
            | Self::Name { field, .. }
            | Self::Duplicate { field, .. }
            | Self::NoNetwork { field, .. }
            | Self::NoInterface { field, .. }
            | Self::Bindings { field, .. }
            | Self::NetworkSource { field, .. }
            | Self::Mac { field, .. }
            | Self::Model { field, .. }
            | Self::Cpu { field, .. }
            | Self::Port { field, .. } => Some(field),
        }
    }
}

/// What the spec asks of an interface's link.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SpecState {
    #[default]
    Up,
    Down,
    Absent,
}

/// How an interface connects the VM to its network.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Binding {
    Bridge,
    /// The pod link is a macvtap (macvtap-cni's) that the device opens as
    /// its tap: a binding plugin mapped to [`PluginKind::Macvtap`] (see
    /// [`BindingPlugins`]).
    Macvtap,
    /// The pod network's primary interface as CNI made it, reached through
    /// passt, which libvirt starts in the pod for the device: a binding
    /// plugin mapped to [`PluginKind::Passt`].
    Passt,
    /// A network binding plugin (`binding: {name}`) not resolved to a kind
    /// nicplug hot-plugs (yet: see [`Vmi::resolve_plugins`]).
    Plugin(String),
    /// Any other binding (masquerade, sriov, slirp, ...): never hot-plugged.
    Other(String),
}

/// What a network binding plugin renders, among the ones nicplug hot-plugs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PluginKind {
    /// KubeVirt's macvtap binding (`domainAttachmentType: tap` on a
    /// macvtap-cni network).
    Macvtap,
    /// KubeVirt's passt binding (its sidecar renders an `<interface
    /// type='user'>` with a passt backend on the pod network).
    Passt,
}

/// The kinds `--binding-plugin` knows, for messages.
pub const PLUGIN_KINDS: &str = "macvtap, passt";

impl std::str::FromStr for PluginKind {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "macvtap" => Ok(Self::Macvtap),
            "passt" => Ok(Self::Passt),
            other => Err(format!(
                "unknown binding kind {other:?} (known: {PLUGIN_KINDS})"
            )),
        }
    }
}

/// KubeVirt's CR names binding plugins freely (`spec.configuration.network.
/// binding.<name>`): which names stand for which kind. By default the
/// names KubeVirt's documentation registers, `macvtap` and `passt`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BindingPlugins(BTreeMap<String, PluginKind>);

impl Default for BindingPlugins {
    fn default() -> Self {
        Self(BTreeMap::from([
            ("macvtap".to_string(), PluginKind::Macvtap),
            ("passt".to_string(), PluginKind::Passt),
        ]))
    }
}

impl BindingPlugins {
    /// Maps plugin `name` to `kind` (a later mapping of the same name wins).
    pub fn insert(&mut self, name: &str, kind: PluginKind) {
        self.0.insert(name.to_string(), kind);
    }

    pub fn kind(&self, name: &str) -> Option<PluginKind> {
        self.0.get(name).copied()
    }
}

/// `NAME=KIND`, as `--binding-plugin` takes it.
pub fn parse_plugin_mapping(text: &str) -> Result<(String, PluginKind), String> {
    let (name, kind) = text
        .split_once('=')
        .ok_or_else(|| format!("{text:?}: expected NAME=KIND, e.g. macvtap=macvtap"))?;
    if name.is_empty() {
        return Err(format!("{text:?}: the plugin name is empty"));
    }
    Ok((name.to_string(), kind.parse()?))
}

/// Where a network comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NetworkSource {
    Pod,
    Multus { network_name: String, default: bool },
}

/// A port of the interface's `ports` (what passt forwards to the guest).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ForwardedPort {
    /// `protocol` in upper case; default `TCP`.
    pub protocol: String,
    pub port: u16,
}

/// One interface of the VMI spec, joined with its network.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpecInterface {
    /// The interface (and network) name.
    pub name: String,
    pub binding: Binding,
    pub source: NetworkSource,
    /// `macAddress`, when set (an invalid one makes the whole document invalid,
    /// as KubeVirt's admission rejects it).
    pub mac: Option<Mac>,
    /// `model`, default `virtio`.
    pub model: String,
    pub state: SpecState,
    /// Position among the secondary Multus networks in `spec.networks`
    /// (1-based), for legacy ordinal pod interface names.
    pub ordinal: Option<usize>,
    /// `ports`: with passt, the ones forwarded (none: every port).
    pub ports: Vec<ForwardedPort>,
}

impl SpecInterface {
    /// Whether nicplug hot-plugs this interface: bridge or macvtap binding
    /// on a secondary Multus network, passt on the pod network.
    pub fn is_hotpluggable(&self) -> bool {
        match self.binding {
            Binding::Bridge | Binding::Macvtap => {
                matches!(self.source, NetworkSource::Multus { default: false, .. })
            }
            Binding::Passt => self.source == NetworkSource::Pod,
            Binding::Plugin(_) | Binding::Other(_) => false,
        }
    }

    /// Why nicplug leaves this interface alone, if it does.
    pub fn unsupported_reason(&self) -> Option<String> {
        match (&self.binding, &self.source) {
            (Binding::Passt, NetworkSource::Pod) => None,
            (Binding::Passt, NetworkSource::Multus { .. }) => Some(
                "binding passt is for the pod network only (KubeVirt's passt plugin binds the pod's primary interface)".into(),
            ),
            (_, NetworkSource::Pod) => Some("the pod network is not hot-pluggable".into()),
            (_, NetworkSource::Multus { default: true, .. }) => {
                Some("the default Multus network is not hot-pluggable".into())
            }
            (Binding::Other(b), _) => Some(format!("binding {b} is not hot-pluggable")),
            (Binding::Plugin(name), _) => Some(format!(
                "binding plugin {name} is not one nicplug hot-plugs (map it with --binding-plugin {name}=KIND; known kinds: {PLUGIN_KINDS})"
            )),
            (Binding::Bridge | Binding::Macvtap, NetworkSource::Multus { .. }) => None,
        }
    }

    /// The pod interface name CNI gives this network, in either scheme.
    pub fn pod_iface(&self, scheme: PodIfaceScheme) -> IfName {
        match (scheme, self.ordinal) {
            (PodIfaceScheme::Ordinal, Some(n)) => ordinal_pod_iface(n),
            _ => hashed_pod_iface(&self.name),
        }
    }

    /// The libvirt device alias, `ua-<name>`.
    pub fn alias(&self) -> String {
        format!("ua-{}", self.name)
    }
}

/// KubeVirt's two pod interface naming schemes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PodIfaceScheme {
    /// `pod<sha256(name)[..11]>` (KubeVirt v1.1+).
    Hashed,
    /// `net1`, `net2`, ... (pods created by older KubeVirt).
    Ordinal,
}

/// The VMI as nicplug needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Vmi {
    pub namespace: String,
    pub name: String,
    /// `metadata.uid`, when the document has a plausible one (for the
    /// status; never used to decide anything).
    pub uid: Option<String>,
    pub interfaces: Vec<SpecInterface>,
    /// Queues per multiqueue interface (the vCPU count) when
    /// `networkInterfaceMultiqueue` is set.
    pub multiqueue: Option<u32>,
}

impl Vmi {
    /// Parses a `kubectl get vmi -o json` or `-o yaml` document.
    ///
    /// Nesting is bounded before serde sees the text: JSON by a scan of its
    /// brackets (serde_json would stop at 128 levels itself, this gives the
    /// error a name), YAML by serde-saphyr's depth budget, which fails while
    /// streaming instead of after building the whole event list.
    pub fn parse(text: &str) -> Result<Self, VmiError> {
        let doc: Document = if text.trim_start().starts_with('{') {
            if let Some(at) = super::depth::json_depth_exceeds(text, MAX_DEPTH) {
                return Err(VmiError::TooDeep { at });
            }
            serde_json::from_str(text).map_err(VmiError::Json)?
        } else {
            serde_saphyr::from_str_with_options(text, yaml_options()).map_err(VmiError::Yaml)?
        };
        doc.into_vmi()
    }

    /// Reads a VMI object as the Kubernetes API serves it (already parsed,
    /// within serde_json's own depth limit).
    pub fn from_json_value(value: serde_json::Value) -> Result<Self, VmiError> {
        let doc: Document = serde_json::from_value(value).map_err(VmiError::Json)?;
        doc.into_vmi()
    }

    /// The spec with each binding plugin resolved to the kind `plugins`
    /// maps its name to; unmapped plugins stay [`Binding::Plugin`].
    pub fn resolve_plugins(&self, plugins: &BindingPlugins) -> Vmi {
        let mut vmi = self.clone();
        for iface in &mut vmi.interfaces {
            if let Binding::Plugin(name) = &iface.binding {
                match plugins.kind(name) {
                    Some(PluginKind::Macvtap) => iface.binding = Binding::Macvtap,
                    Some(PluginKind::Passt) => iface.binding = Binding::Passt,
                    None => {}
                }
            }
        }
        vmi
    }

    /// KubeVirt's libvirt domain name, `<namespace>_<name>`.
    pub fn domain_name(&self) -> String {
        format!("{}_{}", self.namespace, self.name)
    }
}

fn yaml_options() -> serde_saphyr::Options {
    let mut budget = serde_saphyr::Budget::default();
    budget.max_depth = MAX_DEPTH;
    serde_saphyr::options! { budget: Some(budget) }
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Document {
    kind: Option<String>,
    #[serde(default)]
    metadata: Metadata,
    // Missing is an error, not "no interfaces": that would unplug every NIC.
    spec: Option<Spec>,
}

#[derive(Deserialize, Default)]
struct Metadata {
    name: Option<String>,
    namespace: Option<String>,
    /// Any JSON value: a strange uid is dropped, never a reason to refuse
    /// the spec.
    #[serde(default)]
    uid: Option<serde_json::Value>,
}

#[derive(Deserialize)]
struct Spec {
    domain: Option<DomainSpec>,
    #[serde(default)]
    networks: Vec<Network>,
}

#[derive(Deserialize)]
struct DomainSpec {
    devices: Option<Devices>,
    cpu: Option<Cpu>,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase")]
struct Devices {
    #[serde(default)]
    interfaces: Vec<Interface>,
    #[serde(default)]
    network_interface_multiqueue: bool,
}

// Numbers as JSON values, so a negative or fractional count is refused with
// the field's name instead of a bare serde message.
#[derive(Deserialize, Default)]
struct Cpu {
    cores: Option<serde_json::Value>,
    sockets: Option<serde_json::Value>,
    threads: Option<serde_json::Value>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Interface {
    name: String,
    mac_address: Option<String>,
    model: Option<String>,
    #[serde(default)]
    state: SpecState,
    bridge: Option<serde_json::Value>,
    binding: Option<PluginBinding>,
    #[serde(default)]
    ports: Vec<Port>,
    // Every other key (masquerade, sriov, passt, ports, ...) lands here, so
    // the binding of an interface is whichever known key it has.
    #[serde(flatten)]
    other: BTreeMap<String, serde_json::Value>,
}

#[derive(Deserialize)]
struct PluginBinding {
    name: String,
}

#[derive(Deserialize)]
struct Port {
    protocol: Option<String>,
    port: i64,
}

#[derive(Deserialize)]
struct Network {
    name: String,
    pod: Option<serde_json::Value>,
    multus: Option<Multus>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Multus {
    network_name: String,
    #[serde(default)]
    default: bool,
}

const OTHER_BINDINGS: [&str; 5] = ["masquerade", "sriov", "slirp", "passt", "macvtap"];

const INTERFACES: &str = "spec.domain.devices.interfaces";

fn name_error(field: String) -> impl FnOnce(NameError) -> VmiError {
    move |source| VmiError::Name { field, source }
}

/// Remembers the first path of each value and refuses a second one.
/// A network's source and its ordinal among the secondary Multus networks.
type Sources = BTreeMap<String, (NetworkSource, Option<usize>)>;

fn check_kind(kind: Option<&str>) -> Result<(), VmiError> {
    match kind {
        Some("VirtualMachineInstance") => Ok(()),
        None => Err(VmiError::Missing {
            field: "kind".into(),
        }),
        Some(other) => Err(VmiError::Kind {
            field: "kind".into(),
            found: other.to_string(),
        }),
    }
}

/// Checks every interface on its own (name, binding, model, MAC) and
/// against the others (names and MACs unique); returns the names and MACs.
fn check_interfaces(interfaces: &[Interface]) -> Result<(Unique, Vec<Option<Mac>>), VmiError> {
    let mut iface_names = Unique::new("interface name");
    let mut macs = Unique::new("macAddress");
    let mut parsed_macs: Vec<Option<Mac>> = Vec::with_capacity(interfaces.len());
    for (index, iface) in interfaces.iter().enumerate() {
        let at = format!("{INTERFACES}[{index}]");
        check_network_name("interface name", &iface.name)
            .map_err(name_error(format!("{at}.name")))?;
        iface_names.insert(&iface.name, format!("{at}.name"))?;
        let bindings = iface.bindings();
        if bindings.len() > 1 {
            return Err(VmiError::Bindings {
                field: at,
                count: bindings.len(),
                bindings: bindings.join(", "),
            });
        }
        if let Some(model) = &iface.model
            && !MODELS.contains(&model.as_str())
        {
            return Err(VmiError::Model {
                field: format!("{at}.model"),
                value: model.clone(),
            });
        }
        let mac = match &iface.mac_address {
            None => None,
            Some(text) => {
                let field = format!("{at}.macAddress");
                let mac = text.parse::<Mac>().map_err(|source| VmiError::Mac {
                    field: field.clone(),
                    source,
                })?;
                // Compared in canonical form: 02:AA.. and 02-aa.. are one MAC.
                macs.insert(&mac.to_string(), field)?;
                Some(mac)
            }
        };
        parsed_macs.push(mac);
    }

    Ok((iface_names, parsed_macs))
}

/// Each network's source; a Multus network must have an interface.
fn network_sources(networks: &[Network], iface_names: &Unique) -> Result<Sources, VmiError> {
    let mut net_names = Unique::new("network name");
    let mut ordinal = 0;
    let mut sources = BTreeMap::new();
    for (index, net) in networks.iter().enumerate() {
        let at = format!("spec.networks[{index}]");
        check_network_name("network name", &net.name).map_err(name_error(format!("{at}.name")))?;
        net_names.insert(&net.name, format!("{at}.name"))?;
        let source = match (&net.pod, &net.multus) {
            (Some(_), Some(_)) => {
                return Err(VmiError::NetworkSource {
                    field: at,
                    has: "both pod and multus",
                });
            }
            (None, None) => {
                return Err(VmiError::NetworkSource {
                    field: at,
                    has: "neither pod nor multus",
                });
            }
            (Some(_), None) => (NetworkSource::Pod, None),
            (None, Some(m)) => {
                if !iface_names.seen.contains_key(net.name.as_str()) {
                    return Err(VmiError::NoInterface {
                        field: format!("{at}.name"),
                        name: net.name.clone(),
                    });
                }
                let position = (!m.default).then(|| {
                    ordinal += 1;
                    ordinal
                });
                (
                    NetworkSource::Multus {
                        network_name: m.network_name.clone(),
                        default: m.default,
                    },
                    position,
                )
            }
        };
        sources.insert(net.name.clone(), source);
    }

    Ok(sources)
}

/// The interfaces joined with their networks.
fn join_networks(
    interfaces: Vec<Interface>,
    macs: Vec<Option<Mac>>,
    sources: &Sources,
) -> Result<Vec<SpecInterface>, VmiError> {
    let mut joined = Vec::with_capacity(interfaces.len());
    let with_macs = interfaces.into_iter().zip(macs);
    for (index, (i, mac)) in with_macs.enumerate() {
        let Some((source, ordinal)) = sources.get(&i.name).cloned() else {
            return Err(VmiError::NoNetwork {
                field: format!("{INTERFACES}[{index}].name"),
                name: i.name,
            });
        };
        let binding = if i.bridge.is_some() {
            Binding::Bridge
        } else if let Some(plugin) = &i.binding {
            Binding::Plugin(plugin.name.clone())
        } else if i.other.contains_key("macvtap") {
            // The core binding the macvtap plugin replaced (KubeVirt < 1.3):
            // the same domain device.
            Binding::Macvtap
        } else if i.other.contains_key("passt") {
            // Likewise the core passt binding.
            Binding::Passt
        } else {
            let known = OTHER_BINDINGS.iter().find(|b| i.other.contains_key(**b));
            Binding::Other(known.map_or("unknown", |b| b).to_string())
        };
        let ports = forwarded_ports(&i.ports, index)?;
        joined.push(SpecInterface {
            ports,
            mac,
            model: i.model.unwrap_or_else(|| "virtio".into()),
            state: i.state,
            name: i.name,
            binding,
            source,
            ordinal,
        });
    }

    Ok(joined)
}

fn forwarded_ports(ports: &[Port], index: usize) -> Result<Vec<ForwardedPort>, VmiError> {
    ports
        .iter()
        .enumerate()
        .map(|(n, p)| {
            let port = u16::try_from(p.port)
                .ok()
                .filter(|port| *port > 0)
                .ok_or_else(|| VmiError::Port {
                    field: format!("{INTERFACES}[{index}].ports[{n}].port"),
                    value: p.port,
                })?;
            let protocol = p.protocol.as_deref().unwrap_or("TCP").to_ascii_uppercase();
            Ok(ForwardedPort { protocol, port })
        })
        .collect()
}

struct Unique {
    what: &'static str,
    seen: BTreeMap<String, String>,
}

impl Unique {
    fn new(what: &'static str) -> Self {
        Self {
            what,
            seen: BTreeMap::new(),
        }
    }

    fn insert(&mut self, value: &str, field: String) -> Result<(), VmiError> {
        if let Some(first) = self.seen.get(value) {
            return Err(VmiError::Duplicate {
                field,
                what: self.what,
                value: value.to_string(),
                first: first.clone(),
            });
        }
        self.seen.insert(value.to_string(), field);
        Ok(())
    }
}

impl Interface {
    /// Every binding the interface names: KubeVirt wants exactly one.
    fn bindings(&self) -> Vec<&str> {
        let mut found = Vec::new();
        if self.bridge.is_some() {
            found.push("bridge");
        }
        if self.binding.is_some() {
            found.push("binding");
        }
        found.extend(
            OTHER_BINDINGS
                .iter()
                .filter(|b| self.other.contains_key(**b)),
        );
        found
    }
}

impl Cpu {
    /// `cores x sockets x threads`, each defaulting to 1, checked.
    fn vcpus(&self) -> Result<u32, VmiError> {
        let count = |value: &Option<serde_json::Value>, name: &str| -> Result<u32, VmiError> {
            let field = format!("spec.domain.cpu.{name}");
            match value {
                None => Ok(1),
                Some(v) => match v.as_u64().map(u32::try_from) {
                    Some(Ok(n)) if n >= 1 => Ok(n),
                    _ => Err(VmiError::Cpu {
                        field,
                        problem: format!("{v} is not a count from 1 to {}", u32::MAX),
                    }),
                },
            }
        };
        let (cores, sockets, threads) = (
            count(&self.cores, "cores")?,
            count(&self.sockets, "sockets")?,
            count(&self.threads, "threads")?,
        );
        let too_many = || VmiError::Cpu {
            field: "spec.domain.cpu".into(),
            problem: format!(
                "cores x sockets x threads = {cores} x {sockets} x {threads} is more than {MAX_VCPUS} vCPUs"
            ),
        };
        let product = cores
            .checked_mul(sockets)
            .and_then(|n| n.checked_mul(threads))
            .ok_or_else(too_many)?;
        if product > MAX_VCPUS {
            return Err(too_many());
        }
        Ok(product)
    }
}

impl Document {
    /// Validates the document as KubeVirt's admission would (the parts
    /// nicplug reads) and joins interfaces with their networks. Any problem
    /// refuses the whole document: the source keeps the last good spec,
    /// where a half-read spec could unplug what it failed to read.
    fn into_vmi(self) -> Result<Vmi, VmiError> {
        check_kind(self.kind.as_deref())?;
        let name = self.metadata.name.ok_or_else(|| VmiError::Missing {
            field: "metadata.name".into(),
        })?;
        check_object_name("name", &name).map_err(name_error("metadata.name".into()))?;
        let namespace = self.metadata.namespace.unwrap_or_else(|| "default".into());
        let uid = match self.metadata.uid {
            Some(serde_json::Value::String(uid))
                if !uid.is_empty()
                    && uid.len() <= 64
                    && uid.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-') =>
            {
                Some(uid)
            }
            _ => None,
        };
        check_namespace("namespace", &namespace)
            .map_err(name_error("metadata.namespace".into()))?;

        let missing = |field: &str| VmiError::Missing {
            field: field.to_string(),
        };
        let spec = self.spec.ok_or_else(|| missing("spec"))?;
        let domain = spec.domain.ok_or_else(|| missing("spec.domain"))?;
        let devices = domain
            .devices
            .ok_or_else(|| missing("spec.domain.devices"))?;

        let (iface_names, parsed_macs) = check_interfaces(&devices.interfaces)?;
        let sources = network_sources(&spec.networks, &iface_names)?;

        let multiqueue = if devices.network_interface_multiqueue {
            Some(domain.cpu.unwrap_or_default().vcpus()?)
        } else {
            None
        };

        let interfaces = join_networks(devices.interfaces, parsed_macs, &sources)?;

        Ok(Vmi {
            namespace,
            name,
            uid,
            interfaces,
            multiqueue,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_kubectl_json() {
        let vmi = Vmi::parse(include_str!("../../fixtures/vmi/two-secondaries.json")).unwrap();
        assert_eq!(vmi.domain_name(), "default_vmi-fedora");
        assert_eq!(vmi.multiqueue, Some(4));
        let names: Vec<_> = vmi.interfaces.iter().map(|i| i.name.as_str()).collect();
        assert_eq!(names, ["default", "dyniface1", "dyniface2", "sriovnet"]);
        assert!(!vmi.interfaces[0].is_hotpluggable());
        assert_eq!(
            vmi.interfaces[0].binding,
            Binding::Other("masquerade".into())
        );
        let dyn1 = &vmi.interfaces[1];
        assert!(dyn1.is_hotpluggable());
        assert_eq!(dyn1.alias(), "ua-dyniface1");
        assert_eq!(
            dyn1.pod_iface(PodIfaceScheme::Hashed).as_str(),
            "pod9a6a0c3b4d8"
        );
        assert_eq!(dyn1.pod_iface(PodIfaceScheme::Ordinal).as_str(), "net1");
        assert_eq!(dyn1.mac, Some("02:00:00:aa:bb:01".parse().unwrap()));
        let dyn2 = &vmi.interfaces[2];
        assert_eq!(dyn2.state, SpecState::Down);
        assert_eq!(dyn2.model, "e1000e");
        assert_eq!(dyn2.pod_iface(PodIfaceScheme::Ordinal).as_str(), "net2");
        assert_eq!(vmi.interfaces[3].binding, Binding::Other("sriov".into()));
    }

    #[test]
    fn parses_kubectl_yaml() {
        let yaml = "apiVersion: kubevirt.io/v1\nkind: VirtualMachineInstance\nmetadata:\n  name: vm1\n  namespace: ns1\nspec:\n  domain:\n    devices:\n      interfaces:\n      - name: blue\n        bridge: {}\n        state: absent\n  networks:\n  - name: blue\n    multus:\n      networkName: ns1/blue-nad\n";
        let vmi = Vmi::parse(yaml).unwrap();
        assert_eq!(vmi.domain_name(), "ns1_vm1");
        assert_eq!(vmi.interfaces[0].state, SpecState::Absent);
        assert_eq!(vmi.multiqueue, None);
    }

    /// A valid document with `interfaces` and `networks` spliced in.
    fn doc(interfaces: &str, networks: &str) -> String {
        format!(
            r#"{{"kind":"VirtualMachineInstance","metadata":{{"name":"vm","namespace":"ns"}},"spec":{{"domain":{{"devices":{{"interfaces":[{interfaces}]}}}},"networks":[{networks}]}}}}"#
        )
    }

    fn field_of(text: &str) -> String {
        let err = Vmi::parse(text).expect_err("document must be refused");
        err.field()
            .unwrap_or_else(|| panic!("no field in {err}"))
            .to_string()
    }

    #[test]
    fn bad_documents_say_what_is_wrong() {
        assert!(matches!(Vmi::parse("{\"kind\":"), Err(VmiError::Json(_))));
        assert!(matches!(
            Vmi::parse("{\"kind\":\"Pod\",\"metadata\":{\"name\":\"x\"}}"),
            Err(VmiError::Kind { .. })
        ));
        assert!(matches!(Vmi::parse("a: [b"), Err(VmiError::Yaml(_))));
        assert_eq!(field_of(r#"{"spec":{}}"#), "kind");
        assert_eq!(
            field_of(r#"{"kind":"VirtualMachineInstance","spec":{}}"#),
            "metadata.name"
        );
    }

    #[test]
    fn a_document_without_its_spec_is_not_an_empty_spec() {
        // Read as "no interfaces", these would unplug every NIC.
        let meta = r#""kind":"VirtualMachineInstance","metadata":{"name":"vm"}"#;
        assert_eq!(field_of(&format!("{{{meta}}}")), "spec");
        assert_eq!(
            field_of(&format!(r#"{{{meta},"spec":{{}}}}"#)),
            "spec.domain"
        );
        assert_eq!(
            field_of(&format!(r#"{{{meta},"spec":{{"domain":{{}}}}}}"#)),
            "spec.domain.devices"
        );
        // Devices without interfaces is a VMI without NICs: valid.
        let vmi = Vmi::parse(&format!(
            r#"{{{meta},"spec":{{"domain":{{"devices":{{}}}}}}}}"#
        ))
        .unwrap();
        assert!(vmi.interfaces.is_empty());
    }

    #[test]
    fn names_must_be_kubernetes_names() {
        for bad in ["", "--help", "VM", "vm 1", "vmé", "a..b", "-a", "a-"] {
            let text = format!(
                r#"{{"kind":"VirtualMachineInstance","metadata":{{"name":"{bad}"}},"spec":{{"domain":{{"devices":{{}}}}}}}}"#
            );
            assert_eq!(field_of(&text), "metadata.name", "{bad:?}");
        }
        let long = "a".repeat(254);
        let text = format!(
            r#"{{"kind":"VirtualMachineInstance","metadata":{{"name":"{long}"}},"spec":{{"domain":{{"devices":{{}}}}}}}}"#
        );
        assert_eq!(field_of(&text), "metadata.name");
        let text = format!(
            r#"{{"kind":"VirtualMachineInstance","metadata":{{"name":"a","namespace":"{}"}},"spec":{{"domain":{{"devices":{{}}}}}}}}"#,
            "n".repeat(64)
        );
        assert_eq!(field_of(&text), "metadata.namespace");
        // The empty-name message says it is empty, not "contains whitespace".
        let err = Vmi::parse(
            r#"{"kind":"VirtualMachineInstance","metadata":{"name":""},"spec":{"domain":{"devices":{}}}}"#,
        )
        .unwrap_err();
        let chain = format!("{err}: {}", std::error::Error::source(&err).unwrap());
        assert_eq!(chain, "metadata.name: invalid name: name is empty");
    }

    #[test]
    fn interface_and_network_names() {
        let long = "n".repeat(64);
        for bad in [
            "--help",
            long.as_str(),
            "a b",
            "blé",
            "a.b",
            "a'b",
            "a\\u0001",
        ] {
            let text = doc(
                &format!(r#"{{"name":"{bad}","bridge":{{}}}}"#),
                &format!(r#"{{"name":"{bad}","multus":{{"networkName":"x"}}}}"#),
            );
            assert_eq!(
                field_of(&text),
                "spec.domain.devices.interfaces[0].name",
                "{bad:?}"
            );
        }
        // KubeVirt's own charset is accepted: upper case and '_'.
        let ok = doc(
            r#"{"name":"Net_1","bridge":{}}"#,
            r#"{"name":"Net_1","multus":{"networkName":"x"}}"#,
        );
        assert_eq!(Vmi::parse(&ok).unwrap().interfaces[0].name, "Net_1");
        let text = doc(
            r#"{"name":"a","bridge":{}}"#,
            r#"{"name":"a","multus":{"networkName":"x"}},{"name":"b c","pod":{}}"#,
        );
        assert_eq!(field_of(&text), "spec.networks[1].name");
    }

    #[test]
    fn structure_kubevirt_rejects_is_rejected() {
        let bridge = |n: &str| format!(r#"{{"name":"{n}","bridge":{{}}}}"#);
        let multus = |n: &str| format!(r#"{{"name":"{n}","multus":{{"networkName":"{n}"}}}}"#);
        let cases = [
            (
                doc(&format!("{},{}", bridge("a"), bridge("a")), &multus("a")),
                "spec.domain.devices.interfaces[1].name",
                "also appears at spec.domain.devices.interfaces[0].name",
            ),
            (
                doc(&bridge("a"), &format!("{},{}", multus("a"), multus("a"))),
                "spec.networks[1].name",
                "network name",
            ),
            (
                doc(&format!("{},{}", bridge("a"), bridge("b")), &multus("a")),
                "spec.domain.devices.interfaces[1].name",
                "no network",
            ),
            (
                doc(&bridge("a"), &format!("{},{}", multus("a"), multus("b"))),
                "spec.networks[1].name",
                "no interface",
            ),
            (
                doc(r#"{"name":"a","bridge":{},"sriov":{}}"#, &multus("a")),
                "spec.domain.devices.interfaces[0]",
                "2 bindings (bridge, sriov)",
            ),
            (
                doc(
                    &bridge("a"),
                    r#"{"name":"a","pod":{},"multus":{"networkName":"a"}}"#,
                ),
                "spec.networks[0]",
                "both pod and multus",
            ),
            (
                doc(&bridge("a"), r#"{"name":"a"}"#),
                "spec.networks[0]",
                "neither pod nor multus",
            ),
            (
                doc(
                    r#"{"name":"a","bridge":{},"model":"virtio'/><x"}"#,
                    &multus("a"),
                ),
                "spec.domain.devices.interfaces[0].model",
                "is not one of",
            ),
        ];
        for (text, field, message) in cases {
            let err = Vmi::parse(&text).unwrap_err();
            assert_eq!(err.field(), Some(field), "{text}");
            assert!(err.to_string().contains(message), "{err}");
        }
    }

    #[test]
    fn mac_addresses() {
        let net = r#"{"name":"a","multus":{"networkName":"a"}},{"name":"b","multus":{"networkName":"b"}}"#;
        let two = |m1: &str, m2: &str| {
            doc(
                &format!(
                    r#"{{"name":"a","bridge":{{}},"macAddress":"{m1}"}},{{"name":"b","bridge":{{}},"macAddress":"{m2}"}}"#
                ),
                net,
            )
        };
        // The same MAC in two spellings is a duplicate.
        let err = Vmi::parse(&two("02:00:00:00:00:01", "02-00-00-00-00-01")).unwrap_err();
        assert_eq!(
            err.field(),
            Some("spec.domain.devices.interfaces[1].macAddress")
        );
        for bad in [
            "00:00:00:00:00:00",
            "01:00:5e:00:00:01",
            "ff:ff:ff:ff:ff:ff",
            "zz",
            "+2:00:00:00:00:01",
        ] {
            let err = Vmi::parse(&two(bad, "02:00:00:00:00:02")).unwrap_err();
            assert_eq!(
                err.field(),
                Some("spec.domain.devices.interfaces[0].macAddress"),
                "{bad}"
            );
        }
        let vmi = Vmi::parse(&two("02:00:00:00:00:01", "02:00:00:00:00:02")).unwrap();
        assert_eq!(
            vmi.interfaces[1].mac,
            Some("02:00:00:00:00:02".parse().unwrap())
        );
    }

    #[test]
    fn cpu_topology_is_checked_arithmetic() {
        let cpu = |c: &str| {
            format!(
                r#"{{"kind":"VirtualMachineInstance","metadata":{{"name":"vm"}},"spec":{{"domain":{{"cpu":{c},"devices":{{"networkInterfaceMultiqueue":true}}}}}}}}"#
            )
        };
        // 65536 x 65536 overflows u32: an error, not a wrapped or panicking product.
        let err = Vmi::parse(&cpu(r#"{"cores":65536,"sockets":65536,"threads":2}"#)).unwrap_err();
        assert_eq!(err.field(), Some("spec.domain.cpu"));
        let err = Vmi::parse(&cpu(r#"{"cores":4097}"#)).unwrap_err();
        assert_eq!(err.field(), Some("spec.domain.cpu"));
        for (c, field) in [
            (r#"{"cores":0}"#, "spec.domain.cpu.cores"),
            (r#"{"sockets":-1}"#, "spec.domain.cpu.sockets"),
            (r#"{"threads":4294967296}"#, "spec.domain.cpu.threads"),
            (r#"{"threads":"2"}"#, "spec.domain.cpu.threads"),
        ] {
            assert_eq!(Vmi::parse(&cpu(c)).unwrap_err().field(), Some(field), "{c}");
        }
        assert_eq!(
            Vmi::parse(&cpu(r#"{"cores":16,"sockets":16,"threads":16}"#))
                .unwrap()
                .multiqueue,
            Some(4096)
        );
    }

    #[test]
    fn deep_documents_stop_at_the_depth_limit() {
        let deep_json = format!("{{\"a\":{}{}}}", "[".repeat(60_000), "]".repeat(60_000));
        assert!(matches!(
            Vmi::parse(&deep_json),
            Err(VmiError::TooDeep { .. })
        ));
        let deep_yaml = format!("a: {}{}\n", "[".repeat(60_000), "]".repeat(60_000));
        assert!(matches!(Vmi::parse(&deep_yaml), Err(VmiError::Yaml(_))));
        let mut block = String::from("kind: VirtualMachineInstance\n");
        for level in 0..200 {
            block.push_str(&format!("{}k{level}:\n", "  ".repeat(level)));
        }
        assert!(matches!(Vmi::parse(&block), Err(VmiError::Yaml(_))));
    }
}
