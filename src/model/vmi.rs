//! The subset of a KubeVirt VirtualMachineInstance that nicplug reads:
//! `metadata`, `spec.domain.devices.interfaces`, `spec.networks` and the CPU
//! topology (for multiqueue). Everything else of the document is ignored.

use std::collections::BTreeMap;

use serde::Deserialize;

use super::names::{IfName, Mac, hashed_pod_iface, ordinal_pod_iface};

#[derive(Debug, thiserror::Error)]
pub enum VmiError {
    #[error("invalid VMI JSON")]
    Json(#[from] serde_json::Error),
    #[error("invalid VMI YAML")]
    Yaml(#[from] serde_yaml::Error),
    #[error("kind is {0:?}, expected VirtualMachineInstance")]
    Kind(String),
    #[error("metadata.name is missing")]
    NoName,
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
    /// Any other binding (masquerade, sriov, passt, a plugin): never hot-plugged.
    Other(String),
}

/// Where a network comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NetworkSource {
    Pod,
    Multus {
        network_name: String,
        default: bool,
    },
    /// The interface names a network that `spec.networks` does not list.
    Missing,
}

/// One interface of the VMI spec, joined with its network.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpecInterface {
    /// The interface (and network) name.
    pub name: String,
    pub binding: Binding,
    pub source: NetworkSource,
    /// `macAddress`, when set. An unparsable one is an error of this interface only.
    pub mac: Option<Result<Mac, String>>,
    /// `model`, default `virtio`.
    pub model: String,
    pub state: SpecState,
    /// Position among the secondary Multus networks in `spec.networks`
    /// (1-based), for legacy ordinal pod interface names.
    pub ordinal: Option<usize>,
}

impl SpecInterface {
    /// Whether nicplug hot-plugs this interface: bridge binding on a
    /// secondary Multus network.
    pub fn is_hotpluggable(&self) -> bool {
        self.binding == Binding::Bridge
            && matches!(self.source, NetworkSource::Multus { default: false, .. })
    }

    /// Why nicplug leaves this interface alone, if it does.
    pub fn unsupported_reason(&self) -> Option<String> {
        match (&self.binding, &self.source) {
            (_, NetworkSource::Missing) => Some(format!(
                "interface {} has no network of that name in spec.networks",
                self.name
            )),
            (_, NetworkSource::Pod) => Some("the pod network is not hot-pluggable".into()),
            (_, NetworkSource::Multus { default: true, .. }) => {
                Some("the default Multus network is not hot-pluggable".into())
            }
            (Binding::Other(b), _) => Some(format!("binding {b} is not hot-pluggable")),
            (Binding::Bridge, NetworkSource::Multus { .. }) => None,
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
    pub interfaces: Vec<SpecInterface>,
    /// Queues per multiqueue interface (the vCPU count) when
    /// `networkInterfaceMultiqueue` is set.
    pub multiqueue: Option<u32>,
}

impl Vmi {
    /// Parses a `kubectl get vmi -o json` or `-o yaml` document.
    pub fn parse(text: &str) -> Result<Self, VmiError> {
        let doc: Document = if text.trim_start().starts_with('{') {
            serde_json::from_str(text)?
        } else {
            serde_yaml::from_str(text)?
        };
        doc.into_vmi()
    }

    /// Reads a VMI object as the Kubernetes API serves it.
    pub fn from_json_value(value: serde_json::Value) -> Result<Self, VmiError> {
        let doc: Document = serde_json::from_value(value)?;
        doc.into_vmi()
    }

    /// KubeVirt's libvirt domain name, `<namespace>_<name>`.
    pub fn domain_name(&self) -> String {
        format!("{}_{}", self.namespace, self.name)
    }
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Document {
    kind: Option<String>,
    #[serde(default)]
    metadata: Metadata,
    #[serde(default)]
    spec: Spec,
}

#[derive(Deserialize, Default)]
struct Metadata {
    name: Option<String>,
    namespace: Option<String>,
}

#[derive(Deserialize, Default)]
struct Spec {
    #[serde(default)]
    domain: DomainSpec,
    #[serde(default)]
    networks: Vec<Network>,
}

#[derive(Deserialize, Default)]
struct DomainSpec {
    #[serde(default)]
    devices: Devices,
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

#[derive(Deserialize, Default)]
struct Cpu {
    cores: Option<u32>,
    sockets: Option<u32>,
    threads: Option<u32>,
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

impl Document {
    fn into_vmi(self) -> Result<Vmi, VmiError> {
        if let Some(kind) = self.kind.filter(|k| k != "VirtualMachineInstance") {
            return Err(VmiError::Kind(kind));
        }
        let name = self.metadata.name.ok_or(VmiError::NoName)?;
        let namespace = self.metadata.namespace.unwrap_or_else(|| "default".into());

        let mut ordinal = 0;
        let mut sources = BTreeMap::new();
        for net in self.spec.networks {
            let source = match (net.pod, net.multus) {
                (Some(_), _) => (NetworkSource::Pod, None),
                (None, Some(m)) if !m.default => {
                    ordinal += 1;
                    (
                        NetworkSource::Multus {
                            network_name: m.network_name,
                            default: false,
                        },
                        Some(ordinal),
                    )
                }
                (None, Some(m)) => (
                    NetworkSource::Multus {
                        network_name: m.network_name,
                        default: true,
                    },
                    None,
                ),
                (None, None) => (NetworkSource::Missing, None),
            };
            sources.insert(net.name, source);
        }

        let interfaces = self
            .spec
            .domain
            .devices
            .interfaces
            .into_iter()
            .map(|i| {
                let binding = if i.bridge.is_some() {
                    Binding::Bridge
                } else if let Some(plugin) = i.binding {
                    Binding::Other(plugin.name)
                } else {
                    let known = OTHER_BINDINGS.iter().find(|b| i.other.contains_key(**b));
                    Binding::Other(known.map_or("unknown", |b| b).to_string())
                };
                let (source, ordinal) = sources
                    .get(&i.name)
                    .cloned()
                    .unwrap_or((NetworkSource::Missing, None));
                SpecInterface {
                    mac: i
                        .mac_address
                        .map(|m| m.parse::<Mac>().map_err(|e| e.to_string())),
                    model: i.model.unwrap_or_else(|| "virtio".into()),
                    state: i.state,
                    name: i.name,
                    binding,
                    source,
                    ordinal,
                }
            })
            .collect();

        let multiqueue = self
            .spec
            .domain
            .devices
            .network_interface_multiqueue
            .then(|| {
                let cpu = self.spec.domain.cpu.unwrap_or_default();
                cpu.cores.unwrap_or(1) * cpu.sockets.unwrap_or(1) * cpu.threads.unwrap_or(1)
            });
        Ok(Vmi {
            namespace,
            name,
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
        assert_eq!(dyn1.mac, Some(Ok("02:00:00:aa:bb:01".parse().unwrap())));
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

    #[test]
    fn bad_documents_say_what_is_wrong() {
        assert!(matches!(Vmi::parse("{\"kind\":"), Err(VmiError::Json(_))));
        assert!(matches!(
            Vmi::parse("{\"kind\":\"Pod\",\"metadata\":{\"name\":\"x\"}}"),
            Err(VmiError::Kind(_))
        ));
        assert!(matches!(Vmi::parse("{\"spec\":{}}"), Err(VmiError::NoName)));
        assert!(matches!(Vmi::parse("a: [b"), Err(VmiError::Yaml(_))));
    }

    #[test]
    fn interface_errors_stay_with_the_interface() {
        let json = r#"{"metadata":{"name":"v"},"spec":{"domain":{"devices":{"interfaces":[
            {"name":"a","bridge":{},"macAddress":"zz"},{"name":"b","bridge":{}}]}},
            "networks":[{"name":"a","multus":{"networkName":"a"}}]}}"#;
        let vmi = Vmi::parse(json).unwrap();
        assert!(matches!(vmi.interfaces[0].mac, Some(Err(_))));
        assert_eq!(vmi.interfaces[1].source, NetworkSource::Missing);
        assert!(
            vmi.interfaces[1]
                .unsupported_reason()
                .unwrap()
                .contains("no network")
        );
    }
}
