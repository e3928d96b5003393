//! CNI networks of the rig: the real `bridge` plugin with `host-local` IPAM on a
//! link-local subnet, run inside the rig's node netns (as Multus would delegate).

use serde_json::{Value, json};

/// Where Debian's containernetworking-plugins live.
pub const CNI_PATH: &str = "/usr/lib/cni";

/// A NetworkAttachmentDefinition-like network: a node-side bridge and a link-local subnet.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CniNet {
    /// The network (NAD) name, also the CNI config `name`.
    pub name: String,
    /// The bridge in the node netns (at most 15 characters).
    pub bridge: String,
    /// `169.254.N.0/24`.
    pub subnet: String,
    /// Whether the plugin runs IPAM (`host-local`); without, the pod link gets no
    /// address: a pure L2 network.
    pub ipam: bool,
    /// Whether IPAM also gives IPv6: an address from `fe80::<N>:2` to
    /// `fe80::<N>:fe` in fe80::/64 (link-local, as every address the rig uses),
    /// gateway `fe80::<N>:1` and a default route through it.
    pub ipv6: bool,
    /// Whether IPAM's routes include a default route through the gateway:
    /// the pod network's primary CNI gives one (and passt needs one).
    pub default_route: bool,
}

impl CniNet {
    /// A distinct network per `index` (0..=253): `dyniface<index>`, bridge `nicbr<index>`,
    /// subnet `169.254.<index + 1>.0/24` (169.254.0.0/24 is reserved by RFC 3927).
    pub fn new(index: u8) -> CniNet {
        assert!(index <= 253, "CniNet index {index} > 253");
        CniNet {
            name: format!("dyniface{index}"),
            bridge: format!("nicbr{index}"),
            subnet: format!("169.254.{}.0/24", index as u16 + 1),
            ipam: true,
            ipv6: false,
            default_route: false,
        }
    }

    /// The pod network (`eth0`, from the node's primary CNI): like
    /// [`CniNet::new`], with a default route through the gateway, inside
    /// the pod netns only.
    pub fn pod_network(index: u8) -> CniNet {
        CniNet {
            name: format!("podnet{index}"),
            default_route: true,
            ..CniNet::new(index)
        }
    }

    /// Like [`CniNet::new`], with IPv6 too. IPAM's IPv6 range lies in fe80::/64
    /// because the rig's traffic must stay link-local; nicplug tells it from the
    /// kernel's own link-local address by the MAC (see `dhcp::lease6`).
    pub fn dual_stack(index: u8) -> CniNet {
        CniNet {
            ipv6: true,
            ..CniNet::new(index)
        }
    }

    /// `fe80::<N>:<host>` (N in hex).
    pub fn addr6(&self, host: u8) -> String {
        format!("fe80::{:x}:{host:x}", self.octet())
    }

    /// The node side's IPv6 address, IPAM's IPv6 gateway: `fe80::<N>:1/64`.
    pub fn node_addr6(&self) -> String {
        format!("{}/64", self.addr6(1))
    }

    /// Like [`CniNet::new`], without IPAM: the pod link carries no address or route.
    pub fn l2(index: u8) -> CniNet {
        CniNet {
            ipam: false,
            ..CniNet::new(index)
        }
    }

    /// The subnet's third octet.
    pub fn octet(&self) -> u8 {
        self.subnet
            .split('.')
            .nth(2)
            .and_then(|s| s.parse().ok())
            .expect("subnet is 169.254.N.0/24")
    }

    /// `169.254.N.<host>`.
    pub fn addr(&self, host: u8) -> String {
        format!("169.254.{}.{host}", self.octet())
    }

    /// The address the node side (its bridge) holds for traffic checks: `.1/24`,
    /// which host-local reserves as the gateway and never hands out.
    pub fn node_addr(&self) -> String {
        format!("{}/24", self.addr(1))
    }

    /// The gateway IPAM gives the pod link: `169.254.N.1`, the node side's address.
    pub fn gateway(&self) -> String {
        self.addr(1)
    }

    /// The route IPAM puts on the pod link, via [`CniNet::gateway`]: a host route to
    /// `169.254.255.N/32` (link-local, and no namespace holds it: nothing is sent
    /// there), so that before/after snapshots of the pod namespace have a route of
    /// CNI's to compare and a DHCP server has a router and a classless route to give.
    pub fn route(&self) -> String {
        format!("169.254.255.{}/32", self.octet())
    }

    /// The CNI network configuration (cniVersion 0.4.0), IPAM state under `ipam_dir`.
    /// IPAM has a gateway and one route (see [`CniNet::route`]); the bridge itself is
    /// no gateway, no masquerading, no default route.
    pub fn config(&self, ipam_dir: &str) -> Value {
        let mut config = json!({
            "cniVersion": "0.4.0",
            "name": self.name,
            "type": "bridge",
            "bridge": self.bridge,
            "isGateway": false,
            "isDefaultGateway": false,
            "ipMasq": false,
        });
        if self.ipam && self.ipv6 {
            config["ipam"] = json!({
                "type": "host-local",
                "ranges": [
                    [{ "subnet": self.subnet, "gateway": self.gateway() }],
                    [{
                        "subnet": "fe80::/64",
                        "rangeStart": self.addr6(2),
                        "rangeEnd": self.addr6(0xfe),
                        "gateway": self.addr6(1),
                    }],
                ],
                "routes": [{ "dst": self.route() }, { "dst": "::/0" }],
                "dataDir": ipam_dir,
            });
        } else if self.ipam {
            let mut routes = vec![json!({ "dst": self.route() })];
            if self.default_route {
                routes.push(json!({ "dst": "0.0.0.0/0" }));
            }
            config["ipam"] = json!({
                "type": "host-local",
                "subnet": self.subnet,
                "gateway": self.gateway(),
                "routes": routes,
                "dataDir": ipam_dir,
            });
        }
        config
    }
}

/// The parsed result of a CNI ADD.
#[derive(Clone, Debug)]
pub struct CniResult {
    /// The interface name in the pod netns.
    pub ifname: String,
    /// Its MAC (lowercase), as the plugin reported it.
    pub mac: String,
    /// Its addresses with prefix, e.g. `169.254.2.2/24`.
    pub ips: Vec<String>,
    /// The whole result document.
    pub raw: Value,
}

impl CniResult {
    pub fn parse(raw: Value, ifname: &str) -> Result<CniResult, String> {
        let ifaces = raw["interfaces"].as_array().cloned().unwrap_or_default();
        let idx = ifaces
            .iter()
            .position(|i| i["name"] == ifname && i.get("sandbox").is_some())
            .ok_or_else(|| format!("CNI result has no sandbox interface {ifname}: {raw}"))?;
        let mac = ifaces[idx]["mac"]
            .as_str()
            .ok_or_else(|| format!("CNI result interface {ifname} has no mac: {raw}"))?
            .to_ascii_lowercase();
        let ips = raw["ips"]
            .as_array()
            .cloned()
            .unwrap_or_default()
            .iter()
            .filter(|ip| ip["interface"].as_u64().is_none_or(|i| i as usize == idx))
            .filter_map(|ip| ip["address"].as_str().map(str::to_string))
            .collect();
        Ok(CniResult {
            ifname: ifname.to_string(),
            mac,
            ips,
            raw,
        })
    }
}

/// A node LAN for macvtap networks (macvtap-cni's lower device and a host
/// on it), `169.254.<n + 1>.0/24`, the node host at `.1`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MacvtapLan {
    pub n: u8,
    /// The macvtaps' lower link in the node netns.
    pub lower: String,
    /// The other end, with the node-side host's address.
    pub peer: String,
}

impl MacvtapLan {
    pub fn new(n: u8) -> MacvtapLan {
        assert!(n <= 253, "MacvtapLan index {n} > 253");
        MacvtapLan {
            n,
            lower: format!("lanlow{n}"),
            peer: format!("lanhost{n}"),
        }
    }

    /// The NAD's name.
    pub fn name(&self) -> String {
        format!("lan{}", self.n)
    }

    /// `169.254.<n + 1>.<host>`.
    pub fn addr(&self, host: u8) -> String {
        format!("169.254.{}.{host}", self.n as u16 + 1)
    }

    /// The node-side host: `.1/24`.
    pub fn node_addr(&self) -> String {
        format!("{}/24", self.addr(1))
    }
}
