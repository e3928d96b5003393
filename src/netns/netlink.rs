//! [`PodNetwork`] over rtnetlink, for the network namespace of the thread that
//! creates the [`Netlink`].
//!
//! Every operation reads the link first and writes only what differs, so a
//! second run is a no-op and an interrupted run is finished by the next one.
//! Message parsing is in pure functions (`observe_link`, `observe_address`)
//! so the mapping from kernel attributes to [`Link`] is in one place.
//!
//! Decisions, in one place:
//! - **IPv6 address generation.** A bridge port must carry no address, but the
//!   kernel re-creates the `fe80::` link-local of an `eui64` link on the next
//!   up/carrier change. [`PodNetwork::enslave_pod_link`] therefore sets
//!   `IFLA_INET6_ADDR_GEN_MODE` to `none` *before* it deletes addresses, and
//!   [`PodNetwork::release_pod_link`] sets it back to the namespace's default
//!   (`net.ipv6.conf.default.addr_gen_mode`, read when the [`Netlink`] is
//!   created, `eui64` if unreadable). The record has no field for a link's own
//!   mode, so a link whose CNI had chosen another mode gets the default back;
//!   changing the mode does not regenerate addresses, and the recorded
//!   link-local itself is restored explicitly like every other address.
//! - **Only recorded addresses are removed.** The record in the pod link's
//!   alias is the crash-safe state; an address CNI adds after it was written
//!   is left on the link, and the planner records it before it plans the
//!   enslave again (so release can give it back).
//! - **Silent plumbing.** Bridge and tap get `addr_gen_mode none`,
//!   `accept_dad=0` and `accept_ra=0` before they are up, and the bridge is
//!   created with multicast snooping off (snooping joins 224.0.0.106 and
//!   ff02::6a and reports them): otherwise the bridge's own IGMP/MLD reports,
//!   DAD and router solicitations leave through the pod link. The pod link
//!   gets `force_mld_version=1` before its addresses go: under MLDv2 the
//!   kernel reports leaving each solicited-node group, and those reports
//!   went out after the MAC change, from the bridge's MAC. Release sets the
//!   namespace default back. Sysctls are written from a thread in the
//!   [`Netlink`]'s namespace ([`NetnsHandle::run`]).
//! - **Release does all it can.** Its sub-steps (nomaster, MAC, MTU, IPv6
//!   settings, each address) are independent: all are tried, all failures
//!   come back in one [`NetnsError::Incomplete`], and the alias keeps the
//!   record unless every one succeeded.
//! - **Learning** is turned off through `IFLA_INFO_SLAVE_DATA`
//!   (`IFLA_BRPORT_LEARNING = 0`) in an RTM_NEWLINK on the port, which is
//!   also where the kernel reports it in every link dump.
//! - **MAC changes** are tried on the live link first (veth, macvlan and most
//!   drivers allow it); only on EBUSY is the link set down, changed and set
//!   up again.
//! - **A tap that exists but differs from its spec** (not a tap, other owner,
//!   group or queue mode, no vnet header, not persistent) is deleted and
//!   created anew when no process holds it open (no carrier), because queue
//!   flags cannot be changed in place and a fresh tap is simpler than
//!   attaching to fix the owner. When QEMU holds it (carrier on), nicplug
//!   refuses with [`NetnsError::TapInUse`] rather than rip a NIC out of a
//!   running guest. A non-tun link of that name is [`NetnsError::WrongKind`].
//! - **IPv4 addresses** are restored with a broadcast address for prefixes
//!   shorter than /31, as CNI plugins (vishvananda/netlink) add them.
//! - **Routes.** [`PodNetwork::links`] lists, per link, the routes of every
//!   table (IPv4 and IPv6) whose output link it is, except those the kernel
//!   makes itself and makes again when the addresses come back (`proto
//!   kernel`: connected, local, broadcast, `fe80::/64`, multicast) and those
//!   learned from the network (`proto ra`, `redirect`). Flushing the
//!   addresses and enslaving the link drops the rest, so they go into the
//!   record and [`PodNetwork::release_pod_link`] adds them back after the
//!   addresses, in rounds (a gateway may only be reachable through another
//!   recorded route); a route that exists already (EEXIST) is success.
//!   Policy rules are not recorded: nothing nicplug does removes a rule
//!   (they name links by name, and the link keeps its name), which
//!   `tests/netns.rs` checks.

use std::net::IpAddr;

use futures::TryStreamExt;
use rtnetlink::packet_core::{DefaultNla, Nla};
use rtnetlink::packet_route::AddressFamily;
use rtnetlink::packet_route::address::{AddressAttribute, AddressFlags, AddressMessage};
use rtnetlink::packet_route::link::{
    AfSpecInet6, AfSpecUnspec, In6AddrGenMode, InfoBridge, InfoBridgePort, InfoData, InfoKind,
    InfoPortData, InfoTun, LinkAttribute, LinkExtentMask, LinkFlags, LinkInfo, LinkMessage,
};
use rtnetlink::packet_route::route::{
    RouteAddress, RouteAttribute, RouteFlags, RouteHeader, RouteMessage, RoutePreference,
    RouteProtocol, RouteScope, RouteType,
};
use rtnetlink::{Handle, LinkBridge, LinkBridgePort, LinkMessageBuilder, LinkUnspec};

use super::tap::{NetnsHandle, create_persistent_tap};
use super::{Link, LinkKind, NetnsError, PodNetwork, TapInfo, TapSpec};
use crate::model::{IfName, IpCidr, Mac, PodLinkRecord, PodRoute};

const IFLA_IFALIAS: u16 = 20;
const IFLA_TUN_OWNER: u16 = 1;
const IFLA_TUN_GROUP: u16 = 2;
const IFLA_TUN_TYPE: u16 = 3;
const IFLA_TUN_VNET_HDR: u16 = 5;
const IFLA_TUN_PERSIST: u16 = 6;
const IFLA_TUN_MULTI_QUEUE: u16 = 7;
/// IFLA_TUN_TYPE value of a tap (IFF_TAP), as opposed to a tun (IFF_TUN).
const TUN_TYPE_TAP: u8 = libc::IFF_TAP as u8;

/// The rtnetlink implementation of [`PodNetwork`].
///
/// Its netlink socket, and so every operation, stays in the network
/// namespace of the thread that called [`Netlink::new`], whichever thread
/// later polls its futures. Taps, which are created through `/dev/net/tun`
/// and land in the namespace of the creating *thread*, are created in that
/// same namespace too (see [`NetnsHandle::run`]).
#[derive(Debug)]
pub struct Netlink {
    handle: Handle,
    netns: NetnsHandle,
    default_addr_gen_mode: In6AddrGenMode,
    /// `net.ipv6.conf.default.force_mld_version` of the namespace, given
    /// back to a released pod link.
    default_force_mld_version: String,
}

/// A link as the kernel reports it, with what nicplug needs beyond [`Link`].
#[derive(Debug, Clone)]
struct Observed {
    link: Link,
    /// IFLA_TUN_TYPE of a tun link (IFF_TUN or IFF_TAP).
    tun_type: Option<u8>,
    /// IFLA_CARRIER; for a tap: whether a process holds it open.
    carrier: bool,
    /// IFLA_INET6_ADDR_GEN_MODE, absent when IPv6 is off on the link.
    addr_gen_mode: Option<In6AddrGenMode>,
    /// IFLA_BR_MCAST_SNOOPING of a bridge.
    mcast_snooping: Option<bool>,
    /// IFF_NOARP: the namespace's own stack neither sends nor answers ARP
    /// on the link.
    noarp: bool,
}

impl Netlink {
    /// Opens an rtnetlink connection in the calling thread's network
    /// namespace and spawns its driver on the current tokio runtime (must be
    /// called inside one).
    pub fn new() -> Result<Self, NetnsError> {
        let runtime = tokio::runtime::Handle::try_current()
            .map_err(|e| NetnsError::Socket(std::io::Error::other(e)))?;
        let netns = NetnsHandle::of_current_thread()?;
        let (connection, handle, _) = rtnetlink::new_connection().map_err(NetnsError::Socket)?;
        runtime.spawn(connection);
        Ok(Self {
            handle,
            netns,
            default_addr_gen_mode: default_addr_gen_mode(),
            default_force_mld_version: read_ipv6_conf("default", "force_mld_version")
                .unwrap_or_else(|| "0".to_string()),
        })
    }

    /// One link by name, without addresses; `None` if it does not exist.
    async fn get(&self, name: &IfName) -> Result<Option<Observed>, NetnsError> {
        let mut stream = self.handle.link().get().match_name(name.as_str()).execute();
        match stream.try_next().await {
            Ok(Some(msg)) => Ok(observe_link(&msg)),
            Ok(None) => Ok(None),
            Err(e) if errno(&e) == Some(libc::ENODEV) => Ok(None),
            Err(source) => Err(nl_err("get link", name, source)),
        }
    }

    async fn require(&self, name: &IfName) -> Result<Observed, NetnsError> {
        self.get(name)
            .await?
            .ok_or_else(|| NetnsError::NotFound(name.clone()))
    }

    /// Addresses of the link with `index`, IPv4 and IPv6.
    async fn addresses_of(
        &self,
        index: u32,
        name: &IfName,
    ) -> Result<Vec<(IpCidr, AddressMessage)>, NetnsError> {
        let messages: Vec<AddressMessage> = self
            .handle
            .address()
            .get()
            .set_link_index_filter(index)
            .execute()
            .try_collect()
            .await
            .map_err(|e| nl_err("dump addresses", name, e))?;
        Ok(messages
            .into_iter()
            .filter(|m| m.header.index == index)
            .filter_map(|m| observe_address(&m).map(|(_, cidr)| (cidr, m)))
            .collect())
    }

    /// RTM_SETLINK with `message` (built for `link`'s index).
    async fn set(
        &self,
        op: &'static str,
        name: &IfName,
        message: LinkMessage,
    ) -> Result<(), NetnsError> {
        self.handle
            .link()
            .set(message)
            .execute()
            .await
            .map_err(|e| nl_err(op, name, e))
    }

    async fn set_up(&self, link: &Observed) -> Result<(), NetnsError> {
        if link.link.up {
            return Ok(());
        }
        let msg = LinkUnspec::new_with_index(link.link.index).up().build();
        self.set("set up", &link.link.name, msg).await
    }

    async fn set_mtu(&self, link: &Observed, mtu: u32) -> Result<(), NetnsError> {
        if link.link.mtu == mtu {
            return Ok(());
        }
        let msg = LinkUnspec::new_with_index(link.link.index).mtu(mtu).build();
        self.set("set mtu", &link.link.name, msg).await
    }

    async fn set_master(&self, link: &Observed, master: Option<u32>) -> Result<(), NetnsError> {
        if link.link.master == master {
            return Ok(());
        }
        let builder = LinkUnspec::new_with_index(link.link.index);
        let msg = match master {
            Some(index) => builder.controller(index).build(),
            None => builder.nocontroller().build(),
        };
        let op = if master.is_some() {
            "set master"
        } else {
            "set nomaster"
        };
        self.set(op, &link.link.name, msg).await
    }

    /// Sets the MAC, live if the driver allows it, else with the link down.
    async fn set_mac(&self, link: &Observed, mac: Mac) -> Result<(), NetnsError> {
        if link.link.mac == Some(mac) {
            return Ok(());
        }
        let name = &link.link.name;
        let index = link.link.index;
        let msg = || {
            LinkUnspec::new_with_index(index)
                .address(mac.octets().to_vec())
                .build()
        };
        match self.handle.link().set(msg()).execute().await {
            Ok(()) => return Ok(()),
            Err(e) if errno(&e) == Some(libc::EBUSY) && link.link.up => {}
            Err(e) => return Err(nl_err("set mac", name, e)),
        }
        let down = LinkUnspec::new_with_index(index).down().build();
        self.set("set down to change mac", name, down).await?;
        let changed = self.set("set mac", name, msg()).await;
        // Up again even if the change failed: never leave the link down.
        let up = LinkUnspec::new_with_index(index).up().build();
        let restored = self.set("set up after mac change", name, up).await;
        changed.and(restored)
    }

    async fn set_addr_gen_mode(
        &self,
        link: &Observed,
        mode: In6AddrGenMode,
    ) -> Result<(), NetnsError> {
        match link.addr_gen_mode {
            // IPv6 is off on this link: nothing will be generated.
            None => return Ok(()),
            Some(current) if current == mode => return Ok(()),
            Some(_) => {}
        }
        let msg = LinkUnspec::new_with_index(link.link.index)
            .append_extra_attribute(LinkAttribute::AfSpecUnspec(vec![AfSpecUnspec::Inet6(
                vec![AfSpecInet6::AddrGenMode(mode)],
            )]))
            .build();
        self.set("set addrgenmode", &link.link.name, msg).await
    }

    async fn set_learning_off(&self, link: &Observed) -> Result<(), NetnsError> {
        if link.link.learning == Some(false) {
            return Ok(());
        }
        let msg = LinkBridgePort::new(link.link.index)
            .append_info_data(InfoBridgePort::Learning(false))
            .build();
        self.handle
            .link()
            .set_port(msg)
            .execute()
            .await
            .map_err(|e| nl_err("set bridge port learning off", &link.link.name, e))
    }

    /// Writes `/proc/sys/net/ipv6/conf/<link>/<knob>` where it differs, from
    /// a thread in this Netlink's namespace (`/proc/sys/net` shows the
    /// namespace of the thread that opens it). A link without IPv6 (no such
    /// file) is left alone, and so is every knob when `/proc/sys` is
    /// read-only, as container runtimes mount it for every unprivileged
    /// container (the injected sidecar's case): these knobs only back up
    /// what netlink already does (`addr_gen_mode none`), see
    /// [`sysctl_write_outcome`].
    fn set_ipv6_conf(&self, link: &IfName, knob: &str, value: &str) -> Result<(), NetnsError> {
        self.netns.run(|| {
            let path = ipv6_conf_path(link.as_str(), knob);
            match std::fs::read_to_string(&path) {
                Ok(current) if current.trim() == value => return Ok(()),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
                _ => {}
            }
            sysctl_write_outcome(std::fs::write(&path, value)).map_err(|source| {
                NetnsError::Sysctl {
                    path,
                    value: value.to_string(),
                    source,
                }
            })
        })
    }

    /// `/proc/sys/net/ipv6/conf/<link>/<knob>` in this Netlink's namespace,
    /// `None` if unreadable (no IPv6 on the link).
    fn ipv6_conf(&self, link: &IfName, knob: &str) -> Option<String> {
        self.netns
            .run(|| Ok(read_ipv6_conf(link.as_str(), knob)))
            .ok()
            .flatten()
    }

    /// Makes a link nicplug owns (bridge, tap) silent in IPv6: no address
    /// generation (so no `fe80::`, and with it no DAD, router solicitation
    /// or MLD report), no DAD and no router advertisements should an address
    /// ever appear, and any link-local address it already has removed.
    /// Called before the link is set up.
    async fn silence_ipv6(&self, link: &Observed) -> Result<(), NetnsError> {
        let name = &link.link.name;
        self.set_addr_gen_mode(link, In6AddrGenMode::None).await?;
        self.set_ipv6_conf(name, "accept_dad", "0")?;
        self.set_ipv6_conf(name, "accept_ra", "0")?;
        for (cidr, message) in self.addresses_of(link.link.index, name).await? {
            if let IpAddr::V6(v6) = cidr.addr
                && v6.is_unicast_link_local()
            {
                self.delete_address(name, &cidr, message).await?;
            }
        }
        Ok(())
    }

    /// Deletes one address; one that is already gone is success.
    async fn delete_address(
        &self,
        name: &IfName,
        cidr: &IpCidr,
        message: AddressMessage,
    ) -> Result<(), NetnsError> {
        match self.handle.address().del(message).execute().await {
            Ok(()) => Ok(()),
            Err(e) if errno(&e) == Some(libc::EADDRNOTAVAIL) => Ok(()),
            Err(e) => Err(nl_err(delete_address_op(cidr), name, e)),
        }
    }

    /// Stops the namespace's stack from answering ARP on a bridge of
    /// nicplug's. With `arp_ignore` 0 (the default) the kernel answers an
    /// ARP request arriving on any link for an address on any other: while
    /// the enslaved pod link holds an address CNI added late (nicplug waits
    /// for CNI to settle before it takes it), the namespace would answer for
    /// the VM's address with the bridge's MAC, and the node would send the
    /// VM's traffic into the pod namespace until its neighbour entry aged
    /// out. A link flag rather than the `arp_ignore` sysctl, because a
    /// container's `/proc/sys` is read-only. Bridging does not look at it.
    async fn set_arp_off(&self, bridge: &Observed) -> Result<(), NetnsError> {
        if bridge.noarp {
            return Ok(());
        }
        let msg = LinkUnspec::new_with_index(bridge.link.index)
            .arp(false)
            .build();
        self.set("set arp off", &bridge.link.name, msg).await
    }

    /// Turns multicast snooping off on a bridge that has it on.
    async fn set_snooping_off(&self, bridge: &Observed) -> Result<(), NetnsError> {
        if bridge.mcast_snooping != Some(true) {
            return Ok(());
        }
        let mut msg = LinkMessageBuilder::<LinkBridge>::new(bridge.link.name.as_str())
            .append_info_data(InfoBridge::MulticastSnooping(false))
            .build();
        msg.header.index = bridge.link.index;
        self.handle
            .link()
            .change(msg)
            .execute()
            .await
            .map_err(|e| nl_err("set multicast snooping off", &bridge.link.name, e))
    }

    async fn delete_index(&self, index: u32, name: &IfName) -> Result<(), NetnsError> {
        match self.handle.link().del(index).execute().await {
            Ok(()) => Ok(()),
            Err(e) if errno(&e) == Some(libc::ENODEV) => Ok(()),
            Err(e) => Err(nl_err("delete link", name, e)),
        }
    }

    /// Every route of every table, IPv4 then IPv6 (RT_TABLE_UNSPEC: all
    /// tables).
    async fn dump_routes(&self, link: &IfName) -> Result<Vec<RouteMessage>, NetnsError> {
        let mut out = Vec::new();
        for family in [AddressFamily::Inet, AddressFamily::Inet6] {
            let mut request = RouteMessage::default();
            request.header.address_family = family;
            request.header.table = RouteHeader::RT_TABLE_UNSPEC;
            let routes: Vec<RouteMessage> = self
                .handle
                .route()
                .get(request)
                .execute()
                .try_collect()
                .await
                .map_err(|e| nl_err("dump routes", link, e))?;
            out.extend(routes);
        }
        Ok(out)
    }

    /// Deletes one route as dumped; one already gone is success.
    async fn delete_route(&self, link: &IfName, message: RouteMessage) -> Result<(), NetnsError> {
        match self.handle.route().del(message).execute().await {
            Ok(()) => Ok(()),
            Err(e) if errno(&e) == Some(libc::ESRCH) => Ok(()),
            Err(e) => Err(nl_err("delete route", link, e)),
        }
    }

    /// Adds `routes` through link `index`, in rounds: a route whose gateway
    /// is only reachable through another recorded route succeeds once that
    /// one is in. Returns the failures of the last round.
    async fn add_routes(&self, index: u32, pod: &IfName, routes: &[PodRoute]) -> Vec<NetnsError> {
        let mut pending: Vec<&PodRoute> = routes.iter().collect();
        loop {
            let mut failed = Vec::new();
            let mut errors = Vec::new();
            for route in &pending {
                let request = route_message(index, route);
                match self.handle.route().add(request).execute().await {
                    Ok(()) => {}
                    Err(e) if errno(&e) == Some(libc::EEXIST) => {}
                    Err(source) => {
                        failed.push(*route);
                        errors.push(NetnsError::Route {
                            route: route.to_string(),
                            link: pod.clone(),
                            source,
                        });
                    }
                }
            }
            if failed.is_empty() || failed.len() == pending.len() {
                return errors;
            }
            pending = failed;
        }
    }

    /// Creates the tap in this Netlink's namespace and returns it as observed.
    async fn create_tap(&self, spec: &TapSpec) -> Result<Observed, NetnsError> {
        // The tap gets the SELinux context of the thread that creates it;
        // a no-op without SELinux (see super::selinux).
        super::selinux::admit_tap(
            &spec.name,
            &super::selinux::TapLabel::for_owner(spec.owner.uid),
        )?;
        self.netns.run(|| create_persistent_tap(spec))?;
        // Not found here means it was made in another namespace: a bug
        // worth an error, not a silent retry loop.
        self.require(&spec.name).await
    }
}

impl PodNetwork for Netlink {
    async fn links(&self) -> Result<Vec<Link>, NetnsError> {
        let all = IfName::new("all").expect("valid interface name");
        let mut request = self.handle.link().get();
        request
            .message_mut()
            .attributes
            .push(LinkAttribute::ExtMask(vec![LinkExtentMask::SkipStats]));
        let links: Vec<LinkMessage> = request
            .execute()
            .try_collect()
            .await
            .map_err(|e| nl_err("dump links", &all, e))?;
        let addresses: Vec<AddressMessage> = self
            .handle
            .address()
            .get()
            .execute()
            .try_collect()
            .await
            .map_err(|e| nl_err("dump addresses", &all, e))?;
        let mut out: Vec<Link> = links
            .iter()
            .filter_map(observe_link)
            .map(|o| o.link)
            .collect();
        for message in &addresses {
            let Some((index, cidr)) = observe_address(message) else {
                continue;
            };
            if let Some(link) = out.iter_mut().find(|l| l.index == index) {
                link.addresses.push(cidr);
                if is_tentative(message) {
                    link.tentative.push(cidr);
                }
            }
        }
        for link in &mut out {
            link.addresses.sort();
        }
        for message in self.dump_routes(&all).await? {
            for (index, route) in observe_route(&message) {
                if let Some(link) = out.iter_mut().find(|l| l.index == index) {
                    match route {
                        Ok(route) => link.routes.push(route),
                        Err(unrecordable) => link.unrecordable_routes.push(unrecordable),
                    }
                }
            }
        }
        Ok(out)
    }

    async fn set_alias(&self, link: &IfName, alias: Option<&str>) -> Result<(), NetnsError> {
        let observed = self.require(link).await?;
        let wanted = alias.filter(|a| !a.is_empty());
        if observed.link.alias.as_deref() == wanted {
            return Ok(());
        }
        let attribute = match wanted {
            Some(alias) => LinkAttribute::IfAlias(alias.to_string()),
            // An empty IFLA_IFALIAS (no NUL) frees the alias, as `ip link set
            // dev X alias ""` does.
            None => LinkAttribute::Other(DefaultNla::new(IFLA_IFALIAS, Vec::new())),
        };
        let msg = LinkUnspec::new_with_index(observed.link.index)
            .append_extra_attribute(attribute)
            .build();
        let op = if wanted.is_some() {
            "set alias"
        } else {
            "clear alias"
        };
        self.set(op, link, msg).await
    }

    async fn ensure_bridge(&self, name: &IfName, mac: Mac) -> Result<(), NetnsError> {
        let bridge = match self.get(name).await? {
            Some(existing) => existing,
            None => {
                // An explicit address at creation makes it NET_ADDR_SET, so
                // the bridge keeps it instead of taking a port's MAC. Created
                // down (`LinkBridge::new` would set it up at once): IPv6 is
                // silenced before it is up. Snooping off from the start, so
                // it never joins the snooper groups (224.0.0.106, ff02::6a).
                let msg = LinkMessageBuilder::<LinkBridge>::new(name.as_str())
                    .address(mac.octets().to_vec())
                    .append_info_data(InfoBridge::MulticastSnooping(false))
                    .arp(false)
                    .build();
                match self.handle.link().add(msg).execute().await {
                    Ok(()) => {}
                    // Lost a race with another creator: judge what is there.
                    Err(e) if errno(&e) == Some(libc::EEXIST) => {}
                    Err(e) => return Err(nl_err("create bridge", name, e)),
                }
                self.require(name).await?
            }
        };
        if bridge.link.kind != LinkKind::Bridge {
            return Err(wrong_kind(&bridge.link, "bridge"));
        }
        self.set_snooping_off(&bridge).await?;
        self.set_arp_off(&bridge).await?;
        self.silence_ipv6(&bridge).await?;
        self.set_mac(&bridge, mac).await?;
        self.set_up(&bridge).await
    }

    async fn enslave_pod_link(
        &self,
        pod: &IfName,
        bridge: &IfName,
        mac: Mac,
        recorded: &[IpCidr],
        recorded_routes: &[PodRoute],
    ) -> Result<(), NetnsError> {
        let br = self.require(bridge).await?;
        if br.link.kind != LinkKind::Bridge {
            return Err(wrong_kind(&br.link, "bridge"));
        }
        let link = self.require(pod).await?;
        // First stop the kernel from generating a new fe80::, and from
        // reporting the multicast groups the removed addresses leave (those
        // reports would go out with the new MAC), then remove the recorded
        // addresses (IPv4 and IPv6, link-local included), and only those.
        self.set_addr_gen_mode(&link, In6AddrGenMode::None).await?;
        self.set_ipv6_conf(pod, "force_mld_version", MLD_V1)?;
        for (cidr, message) in self.addresses_of(link.link.index, pod).await? {
            if recorded.contains(&cidr) {
                self.delete_address(pod, &cidr, message).await?;
            } else {
                tracing::info!(link = %pod, address = %cidr, "address not in the record yet: kept until it is recorded");
            }
        }
        // IPv4 routes went with the addresses; IPv6 routes stay. Only
        // recorded ones go, as for addresses.
        for message in self.dump_routes(pod).await? {
            for (index, route) in observe_route(&message) {
                if index == link.link.index && route.is_ok_and(|r| recorded_routes.contains(&r)) {
                    self.delete_route(pod, message.clone()).await?;
                }
            }
        }
        self.set_mac(&link, mac).await?;
        self.set_master(&link, Some(br.link.index)).await?;
        // Learning is a bridge-port attribute: read it again now that the
        // link is a port.
        let link = self.require(pod).await?;
        self.set_learning_off(&link).await?;
        self.set_up(&link).await
    }

    async fn ensure_tap(&self, spec: &TapSpec, bridge: &IfName) -> Result<(), NetnsError> {
        let br = self.require(bridge).await?;
        if br.link.kind != LinkKind::Bridge {
            return Err(wrong_kind(&br.link, "bridge"));
        }
        let tap = match self.get(&spec.name).await? {
            None => self.create_tap(spec).await?,
            Some(existing) => {
                if existing.link.kind != LinkKind::Tun {
                    return Err(wrong_kind(&existing.link, "tap"));
                }
                match tap_mismatch(&existing, spec) {
                    None => existing,
                    Some(mismatch) if existing.carrier => {
                        return Err(NetnsError::TapInUse {
                            tap: spec.name.clone(),
                            mismatch,
                        });
                    }
                    Some(mismatch) => {
                        tracing::info!(tap = %spec.name, %mismatch, "recreating unused tap");
                        self.delete_index(existing.link.index, &spec.name).await?;
                        self.create_tap(spec).await?
                    }
                }
            }
        };
        self.silence_ipv6(&tap).await?;
        self.set_mtu(&tap, spec.mtu).await?;
        self.set_master(&tap, Some(br.link.index)).await?;
        self.set_up(&tap).await
    }

    async fn release_pod_link(
        &self,
        pod: &IfName,
        record: &PodLinkRecord,
    ) -> Result<(), NetnsError> {
        let Some(link) = self.get(pod).await? else {
            tracing::debug!(link = %pod, "pod link gone: nothing to release");
            return Ok(());
        };
        // Independent sub-steps: each is tried whatever the others did.
        let mut errors = Vec::new();
        let mut keep = |result: Result<(), NetnsError>| {
            if let Err(e) = result {
                errors.push(e);
            }
        };
        keep(self.set_master(&link, None).await);
        keep(self.set_mac(&link, record.mac).await);
        keep(self.set_mtu(&link, record.mtu).await);
        if link.addr_gen_mode == Some(In6AddrGenMode::None) {
            keep(
                self.set_addr_gen_mode(&link, self.default_addr_gen_mode)
                    .await,
            );
        }
        if self.ipv6_conf(pod, "force_mld_version").as_deref() == Some(MLD_V1) {
            let default = &self.default_force_mld_version;
            keep(self.set_ipv6_conf(pod, "force_mld_version", default));
        }
        match self.addresses_of(link.link.index, pod).await {
            Err(e) => keep(Err(e)),
            Ok(present) => {
                let present: Vec<IpCidr> = present.into_iter().map(|(cidr, _)| cidr).collect();
                for cidr in record.addresses.iter().filter(|c| !present.contains(c)) {
                    let added = self
                        .handle
                        .address()
                        .add(link.link.index, cidr.addr, cidr.prefix)
                        .execute()
                        .await;
                    match added {
                        Ok(()) => {}
                        Err(e) if errno(&e) == Some(libc::EEXIST) => {}
                        Err(e) => keep(Err(nl_err(add_address_op(cidr), pod, e))),
                    }
                }
            }
        }
        errors.extend(self.add_routes(link.link.index, pod, &record.routes).await);
        if !errors.is_empty() {
            // The record stays: it is what the next pass retries from.
            return Err(NetnsError::Incomplete {
                op: "release",
                link: pod.clone(),
                errors,
            });
        }
        self.set_alias(pod, record.previous_alias.as_deref()).await
    }

    async fn delete_link(&self, name: &IfName) -> Result<(), NetnsError> {
        // RTM_DELLINK by name: no read-then-delete race with an index that
        // was reused meanwhile; ENODEV means it is already gone.
        let mut request = self.handle.link().del(0);
        request
            .message_mut()
            .attributes
            .push(LinkAttribute::IfName(name.to_string()));
        match request.execute().await {
            Ok(()) => Ok(()),
            Err(e) if errno(&e) == Some(libc::ENODEV) => Ok(()),
            Err(e) => Err(nl_err("delete link", name, e)),
        }
    }
}

/// What differs between an existing tun link and the tap `spec` asks for.
fn tap_mismatch(existing: &Observed, spec: &TapSpec) -> Option<String> {
    let id = |v: Option<u32>| v.map_or_else(|| "none".to_string(), |v| v.to_string());
    let mut problems = Vec::new();
    if existing.tun_type != Some(TUN_TYPE_TAP) {
        problems.push("is a tun, not a tap".to_string());
    }
    match &existing.link.tap {
        None => problems.push("reports no tun attributes".to_string()),
        Some(info) => {
            if info.owner != Some(spec.owner.uid) {
                problems.push(format!(
                    "has owner {}, not {}",
                    id(info.owner),
                    spec.owner.uid
                ));
            }
            if info.group != Some(spec.owner.gid) {
                problems.push(format!(
                    "has group {}, not {}",
                    id(info.group),
                    spec.owner.gid
                ));
            }
            if info.multi_queue != spec.multi_queue {
                problems.push(format!(
                    "has multi_queue {}, not {}",
                    info.multi_queue, spec.multi_queue
                ));
            }
            if !info.vnet_hdr {
                problems.push("has no vnet header".to_string());
            }
            if !info.persist {
                problems.push("is not persistent".to_string());
            }
        }
    }
    (!problems.is_empty()).then(|| problems.join(", "))
}

fn wrong_kind(link: &Link, expected: &'static str) -> NetnsError {
    NetnsError::WrongKind {
        link: link.name.clone(),
        found: link.kind.name().to_string(),
        expected,
    }
}

fn delete_address_op(cidr: &IpCidr) -> &'static str {
    if cidr.addr.is_ipv4() {
        "delete ipv4 address"
    } else {
        "delete ipv6 address"
    }
}

fn add_address_op(cidr: &IpCidr) -> &'static str {
    if cidr.addr.is_ipv4() {
        "add ipv4 address"
    } else {
        "add ipv6 address"
    }
}

fn nl_err(op: &'static str, link: &IfName, source: rtnetlink::Error) -> NetnsError {
    NetnsError::Netlink {
        op,
        link: link.to_string(),
        source,
    }
}

/// The positive errno of a netlink error answer, if it is one.
fn errno(e: &rtnetlink::Error) -> Option<i32> {
    match e {
        rtnetlink::Error::NetlinkError(msg) => Some(msg.raw_code().abs()),
        _ => None,
    }
}

/// `net.ipv6.conf.default.addr_gen_mode` of the calling thread's namespace
/// (`/proc/sys/net` follows the reading thread's netns), `eui64` if IPv6 is
/// off or the file is unreadable.
fn default_addr_gen_mode() -> In6AddrGenMode {
    std::fs::read_to_string("/proc/sys/net/ipv6/conf/default/addr_gen_mode")
        .ok()
        .and_then(|s| s.trim().parse::<u8>().ok())
        .map(In6AddrGenMode::from)
        .unwrap_or(In6AddrGenMode::Eui64)
}

/// `force_mld_version` that makes a link leave multicast groups without a
/// report (MLDv1 sends "done" only for groups it reported itself, and a
/// group joined under MLDv2 never was).
const MLD_V1: &str = "1";

fn ipv6_conf_path(link: &str, knob: &str) -> String {
    format!("/proc/sys/net/ipv6/conf/{link}/{knob}")
}

/// `/proc/sys/net/ipv6/conf/<link>/<knob>` as the calling thread's
/// namespace sees it, `None` if unreadable (no IPv6).
/// What a sysctl write's result means: a read-only `/proc/sys` (EROFS: an
/// unprivileged container) is success with nothing written, logged once;
/// every other error stays an error.
fn sysctl_write_outcome(result: std::io::Result<()>) -> std::io::Result<()> {
    static LOGGED: std::sync::Once = std::sync::Once::new();
    match result {
        Err(e) if e.raw_os_error() == Some(libc::EROFS) => {
            LOGGED.call_once(|| {
                tracing::info!(
                    "/proc/sys is read-only (a container): IPv6 sysctls (accept_dad, accept_ra, force_mld_version) are left as they are; addr_gen_mode none over netlink keeps bridge and tap without addresses"
                )
            });
            Ok(())
        }
        other => other,
    }
}

fn read_ipv6_conf(link: &str, knob: &str) -> Option<String> {
    std::fs::read_to_string(ipv6_conf_path(link, knob))
        .ok()
        .map(|s| s.trim().to_string())
}

/// Maps one RTM_NEWLINK message to an [`Observed`] link (addresses empty).
/// `None` for a link whose name is not a valid [`IfName`].
/// What IFLA_LINKINFO says of a link.
struct LinkInfoSeen {
    kind: LinkKind,
    tun_attrs: Option<Vec<(u16, Vec<u8>)>>,
    mcast_snooping: Option<bool>,
    learning: Option<bool>,
}

fn read_link_info(infos: &[LinkInfo]) -> LinkInfoSeen {
    let mut seen = LinkInfoSeen {
        kind: LinkKind::Other(String::new()),
        tun_attrs: None,
        mcast_snooping: None,
        learning: None,
    };
    for info in infos {
        match info {
            LinkInfo::Kind(k) => {
                seen.kind = match k {
                    InfoKind::Bridge => LinkKind::Bridge,
                    InfoKind::Tun => LinkKind::Tun,
                    InfoKind::Veth => LinkKind::Veth,
                    other => LinkKind::Other(other.to_string()),
                }
            }
            LinkInfo::Data(InfoData::Tun(nlas)) => {
                seen.tun_attrs = Some(nlas.iter().map(tun_attr).collect());
            }
            LinkInfo::Data(InfoData::Bridge(nlas)) => {
                seen.mcast_snooping = nlas.iter().find_map(|nla| match nla {
                    InfoBridge::MulticastSnooping(on) => Some(*on),
                    _ => None,
                });
            }
            LinkInfo::PortData(InfoPortData::BridgePort(port)) => {
                seen.learning = port.iter().find_map(|attr| match attr {
                    InfoBridgePort::Learning(on) => Some(*on),
                    _ => None,
                });
            }
            _ => {}
        }
    }
    seen
}

/// The IPv6 address generation mode, from IFLA_AF_SPEC.
fn read_addr_gen_mode(specs: &[AfSpecUnspec]) -> Option<In6AddrGenMode> {
    specs.iter().find_map(|spec| match spec {
        AfSpecUnspec::Inet6(inet6) => inet6.iter().find_map(|attr| match attr {
            AfSpecInet6::AddrGenMode(mode) => Some(*mode),
            _ => None,
        }),
        _ => None,
    })
}

fn observe_link(msg: &LinkMessage) -> Option<Observed> {
    let mut name = None;
    let mut mac = None;
    let mut mtu = 0;
    let mut master = None;
    let mut alias = None;
    let mut info = None;
    let mut carrier = false;
    let mut addr_gen_mode = None;
    for attribute in &msg.attributes {
        match attribute {
            LinkAttribute::IfName(n) => name = Some(n.clone()),
            LinkAttribute::Address(bytes) => {
                if let Ok(octets) = <[u8; 6]>::try_from(bytes.as_slice()) {
                    mac = Some(Mac::from_bytes(octets));
                }
            }
            LinkAttribute::Mtu(m) => mtu = *m,
            LinkAttribute::Controller(index) if *index != 0 => master = Some(*index),
            LinkAttribute::IfAlias(a) if !a.is_empty() => alias = Some(a.clone()),
            LinkAttribute::Carrier(c) => carrier = *c != 0,
            LinkAttribute::LinkInfo(infos) => info = Some(read_link_info(infos)),
            LinkAttribute::AfSpecUnspec(specs) => addr_gen_mode = read_addr_gen_mode(specs),
            _ => {}
        }
    }
    let LinkInfoSeen {
        kind,
        tun_attrs,
        mcast_snooping,
        learning,
    } = info.unwrap_or_else(|| read_link_info(&[]));
    let name = IfName::new(name?).ok()?;
    let (tap, tun_type) = match (&kind, tun_attrs) {
        (LinkKind::Tun, Some(attrs)) => {
            let (mut info, tun_type) = tap_info(&attrs);
            info.held = Some(carrier);
            (Some(info), tun_type)
        }
        _ => (None, None),
    };
    Some(Observed {
        link: Link {
            index: msg.header.index,
            name,
            kind,
            mac,
            mtu,
            master,
            up: msg.header.flags.contains(LinkFlags::Up),
            alias,
            addresses: Vec::new(),
            tentative: Vec::new(),
            cni: super::CniProgress::Done(super::CniDone::SettleWindow),
            routes: Vec::new(),
            unrecordable_routes: Vec::new(),
            learning,
            tap,
        },
        tun_type,
        carrier,
        addr_gen_mode,
        noarp: msg.header.flags.contains(LinkFlags::Noarp),
        mcast_snooping,
    })
}

fn tun_attr(nla: &InfoTun) -> (u16, Vec<u8>) {
    let mut value = vec![0; nla.value_len()];
    nla.emit_value(&mut value);
    (nla.kind(), value)
}

/// Decodes IFLA_TUN_* attributes; the kernel omits OWNER/GROUP when unset.
fn tap_info(attrs: &[(u16, Vec<u8>)]) -> (TapInfo, Option<u8>) {
    let u32_of = |kind| {
        attrs
            .iter()
            .find(|(k, _)| *k == kind)
            .and_then(|(_, v)| <[u8; 4]>::try_from(v.as_slice()).ok())
            .map(u32::from_ne_bytes)
    };
    let u8_of = |kind| {
        attrs
            .iter()
            .find(|(k, _)| *k == kind)
            .and_then(|(_, v)| v.first().copied())
    };
    let flag = |kind| u8_of(kind).is_some_and(|v| v != 0);
    (
        TapInfo {
            owner: u32_of(IFLA_TUN_OWNER),
            group: u32_of(IFLA_TUN_GROUP),
            multi_queue: flag(IFLA_TUN_MULTI_QUEUE),
            vnet_hdr: flag(IFLA_TUN_VNET_HDR),
            persist: flag(IFLA_TUN_PERSIST),
            held: None,
        },
        u8_of(IFLA_TUN_TYPE),
    )
}

/// Whether the address is still in duplicate address detection (and has
/// not failed it): IFA_F_TENTATIVE, in the header's flags byte or in the
/// 32-bit IFA_FLAGS attribute.
fn is_tentative(msg: &AddressMessage) -> bool {
    let mut flags = AddressFlags::from_bits_retain(u32::from(msg.header.flags.bits()));
    for attribute in &msg.attributes {
        if let AddressAttribute::Flags(all) = attribute {
            flags |= *all;
        }
    }
    flags.contains(AddressFlags::Tentative) && !flags.contains(AddressFlags::Dadfailed)
}

/// Maps one RTM_NEWADDR message to (link index, address/prefix). IFA_LOCAL
/// is the interface's own address; IFA_ADDRESS is the peer on point-to-point
/// links, so it only counts when there is no IFA_LOCAL.
fn observe_address(msg: &AddressMessage) -> Option<(u32, IpCidr)> {
    let mut local = None;
    let mut address = None;
    for attribute in &msg.attributes {
        match attribute {
            AddressAttribute::Local(ip) => local = Some(*ip),
            AddressAttribute::Address(ip) => address = Some(*ip),
            _ => {}
        }
    }
    let ip: IpAddr = local.or(address)?;
    let family_matches = matches!(
        (msg.header.family, ip),
        (AddressFamily::Inet, IpAddr::V4(_)) | (AddressFamily::Inet6, IpAddr::V6(_))
    );
    if !family_matches {
        return None;
    }
    let cidr = IpCidr::new(ip, msg.header.prefix_len).ok()?;
    Some((msg.header.index, cidr))
}

/// Maps one RTM_NEWROUTE message to the links it goes out of, each with
/// the route as a record keeps it, or a description of why a record cannot
/// keep it. Empty for what release need not give back: routes the kernel
/// makes itself (`proto kernel`, recreated with the addresses), routes
/// learned from the network (`ra`, `redirect`), cached clones, and routes
/// through no link (blackhole, unreachable, prohibit).
fn observe_route(msg: &RouteMessage) -> Vec<(u32, Result<PodRoute, String>)> {
    let header = &msg.header;
    if matches!(
        header.protocol,
        RouteProtocol::Kernel | RouteProtocol::Ra | RouteProtocol::IcmpRedirect
    ) || header.flags.contains(RouteFlags::Cloned)
    {
        return Vec::new();
    }
    let ipv4 = match header.address_family {
        AddressFamily::Inet => true,
        AddressFamily::Inet6 => false,
        _ => return Vec::new(),
    };
    let ip = |address: &RouteAddress| match address {
        RouteAddress::Inet(v4) if ipv4 => Some(IpAddr::V4(*v4)),
        RouteAddress::Inet6(v6) if !ipv4 => Some(IpAddr::V6(*v6)),
        _ => None,
    };
    let unspecified = if ipv4 {
        IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED)
    } else {
        IpAddr::V6(std::net::Ipv6Addr::UNSPECIFIED)
    };
    let mut destination = unspecified;
    let mut gateway = None;
    let mut oif = None;
    let mut table = u32::from(header.table);
    let mut metric = None;
    let mut preferred_source = None;
    let mut preference = crate::model::route::PREF_MEDIUM;
    let mut multipath = Vec::new();
    let mut problems: Vec<String> = Vec::new();
    for attribute in &msg.attributes {
        match attribute {
            RouteAttribute::Destination(a) => match ip(a) {
                Some(addr) => destination = addr,
                None => problems.push("a destination of another family".into()),
            },
            RouteAttribute::Gateway(a) => match ip(a) {
                Some(addr) => gateway = Some(addr),
                None => problems.push("a gateway of another family".into()),
            },
            RouteAttribute::Oif(index) => oif = Some(*index),
            RouteAttribute::Table(t) => table = *t,
            RouteAttribute::Priority(p) => metric = Some(*p),
            RouteAttribute::PrefSource(a) => preferred_source = ip(a),
            RouteAttribute::Preference(p) => preference = u8::from(*p),
            RouteAttribute::MultiPath(hops) => {
                multipath.extend(hops.iter().map(|h| h.interface_index));
            }
            RouteAttribute::Metrics(m) if !m.is_empty() => {
                problems.push("route metrics (mtu, window, ...)".into())
            }
            RouteAttribute::Expires(_) => problems.push("an expiry time".into()),
            RouteAttribute::NhId(_) => problems.push("a nexthop object".into()),
            RouteAttribute::Encap(_) | RouteAttribute::EncapType(_) => {
                problems.push("an encapsulation".into())
            }
            RouteAttribute::Via(_) => problems.push("a gateway of another family (via)".into()),
            RouteAttribute::Realm(_) => problems.push("a realm".into()),
            RouteAttribute::Mark(_) => problems.push("a mark".into()),
            _ => {}
        }
    }
    if header.kind != RouteType::Unicast {
        problems.push(format!("type {:?}", header.kind));
    }
    if header.tos != 0 {
        problems.push(format!("tos {}", header.tos));
    }
    if header.source_prefix_length != 0 {
        problems.push("a source prefix".into());
    }
    if !multipath.is_empty() {
        problems.push("several nexthops".into());
    }
    let links: Vec<u32> = oif.into_iter().chain(multipath).collect();
    let described = |what: String| {
        let dst = format!("{destination}/{}", header.destination_prefix_length);
        let table = if table == crate::model::route::TABLE_MAIN {
            String::new()
        } else {
            format!(" table {table}")
        };
        format!("route {dst}{table} has {what}")
    };
    let route = match IpCidr::new(destination, header.destination_prefix_length) {
        Err(_) => Err(described("an invalid prefix length".into())),
        Ok(_) if !problems.is_empty() => Err(described(problems.join(", "))),
        Ok(cidr) => {
            let mut route = PodRoute::new(cidr, gateway);
            route.table = table;
            route.protocol = u8::from(header.protocol);
            route.scope = u8::from(header.scope);
            route.metric = metric.unwrap_or(0);
            route.preferred_source = preferred_source;
            route.preference = preference;
            route.onlink = header.flags.contains(RouteFlags::Onlink);
            Ok(route)
        }
    };
    links
        .into_iter()
        .map(|index| (index, route.clone()))
        .collect()
}

/// The RTM_NEWROUTE that adds `route` through link `index`.
fn route_message(index: u32, route: &PodRoute) -> RouteMessage {
    let mut msg = RouteMessage::default();
    let header = &mut msg.header;
    header.address_family = if route.is_ipv4() {
        AddressFamily::Inet
    } else {
        AddressFamily::Inet6
    };
    header.destination_prefix_length = route.destination.prefix;
    // Tables above 255 only fit RTA_TABLE; the header says RT_TABLE_COMPAT
    // then, as iproute2 does.
    header.table = u8::try_from(route.table).unwrap_or(252);
    header.protocol = RouteProtocol::from(route.protocol);
    header.scope = RouteScope::from(route.scope);
    header.kind = RouteType::Unicast;
    if route.onlink {
        header.flags = RouteFlags::Onlink;
    }
    let attributes = &mut msg.attributes;
    attributes.push(RouteAttribute::Table(route.table));
    if route.destination.prefix != 0 {
        attributes.push(RouteAttribute::Destination(route.destination.addr.into()));
    }
    if let Some(gateway) = route.gateway {
        attributes.push(RouteAttribute::Gateway(gateway.into()));
    }
    attributes.push(RouteAttribute::Oif(index));
    attributes.push(RouteAttribute::Priority(route.metric));
    if let Some(source) = route.preferred_source {
        attributes.push(RouteAttribute::PrefSource(source.into()));
    }
    if !route.is_ipv4() {
        attributes.push(RouteAttribute::Preference(RoutePreference::from(
            route.preference,
        )));
    }
    msg
}

#[cfg(test)]
mod tests {
    use super::*;
    use rtnetlink::packet_route::link::InfoPortKind;

    #[test]
    fn a_read_only_proc_sys_is_no_error_other_failures_are() {
        let erofs = std::io::Error::from_raw_os_error(libc::EROFS);
        assert!(sysctl_write_outcome(Err(erofs)).is_ok());
        assert!(sysctl_write_outcome(Ok(())).is_ok());
        let eacces = std::io::Error::from_raw_os_error(libc::EACCES);
        assert!(sysctl_write_outcome(Err(eacces)).is_err());
        let einval = std::io::Error::from_raw_os_error(libc::EINVAL);
        assert!(sysctl_write_outcome(Err(einval)).is_err());
    }

    fn link_message(attributes: Vec<LinkAttribute>) -> LinkMessage {
        let mut msg = LinkMessage::default();
        msg.header.index = 7;
        msg.header.flags = LinkFlags::Up;
        msg.attributes = attributes;
        msg
    }

    #[test]
    fn observes_a_bridge_port() {
        let msg = link_message(vec![
            LinkAttribute::IfName("pod9a6a0c3b4d8".into()),
            LinkAttribute::Address(vec![2, 0, 0, 0, 0, 1]),
            LinkAttribute::Mtu(1400),
            LinkAttribute::Controller(3),
            LinkAttribute::IfAlias("nicplug/v1 mac=02:00:00:00:00:01 mtu=1400".into()),
            LinkAttribute::LinkInfo(vec![
                LinkInfo::Kind(InfoKind::Veth),
                LinkInfo::PortKind(InfoPortKind::Bridge),
                LinkInfo::PortData(InfoPortData::BridgePort(vec![InfoBridgePort::Learning(
                    false,
                )])),
            ]),
            LinkAttribute::AfSpecUnspec(vec![AfSpecUnspec::Inet6(vec![AfSpecInet6::AddrGenMode(
                In6AddrGenMode::None,
            )])]),
        ]);
        let o = observe_link(&msg).unwrap();
        assert_eq!(o.link.name.as_str(), "pod9a6a0c3b4d8");
        assert_eq!(o.link.kind, LinkKind::Veth);
        assert_eq!(o.link.mac, Some(Mac::from_bytes([2, 0, 0, 0, 0, 1])));
        assert_eq!(o.link.mtu, 1400);
        assert_eq!(o.link.master, Some(3));
        assert!(o.link.up);
        assert_eq!(o.link.learning, Some(false));
        assert!(o.link.alias.unwrap().starts_with("nicplug/v1"));
        assert_eq!(o.addr_gen_mode, Some(In6AddrGenMode::None));
        assert_eq!(o.link.tap, None);
    }

    #[test]
    fn observes_a_tap() {
        let nla = |k, v: Vec<u8>| InfoTun::Other(DefaultNla::new(k, v));
        let msg = link_message(vec![
            LinkAttribute::IfName("tap9a6a0c3b4d8".into()),
            LinkAttribute::Carrier(0),
            LinkAttribute::LinkInfo(vec![
                LinkInfo::Kind(InfoKind::Tun),
                LinkInfo::Data(InfoData::Tun(vec![
                    nla(IFLA_TUN_OWNER, 64055u32.to_ne_bytes().to_vec()),
                    nla(IFLA_TUN_GROUP, 107u32.to_ne_bytes().to_vec()),
                    nla(IFLA_TUN_TYPE, vec![TUN_TYPE_TAP]),
                    nla(IFLA_TUN_VNET_HDR, vec![1]),
                    nla(IFLA_TUN_PERSIST, vec![1]),
                    nla(IFLA_TUN_MULTI_QUEUE, vec![0]),
                ])),
            ]),
        ]);
        let o = observe_link(&msg).unwrap();
        assert_eq!(o.link.kind, LinkKind::Tun);
        let info = o.link.tap.clone().unwrap();
        assert_eq!(info.owner, Some(64055));
        assert_eq!(info.group, Some(107));
        assert!(info.vnet_hdr && info.persist && !info.multi_queue);
        assert_eq!(o.tun_type, Some(TUN_TYPE_TAP));
        assert!(!o.carrier);

        let spec = TapSpec {
            name: IfName::new("tap9a6a0c3b4d8").unwrap(),
            owner: "64055:107".parse().unwrap(),
            mtu: 1400,
            multi_queue: false,
        };
        assert_eq!(tap_mismatch(&o, &spec), None);
        let multi = TapSpec {
            multi_queue: true,
            owner: "107:107".parse().unwrap(),
            ..spec
        };
        let mismatch = tap_mismatch(&o, &multi).unwrap();
        assert!(mismatch.contains("has owner 64055, not 107"), "{mismatch}");
        assert!(
            mismatch.contains("multi_queue false, not true"),
            "{mismatch}"
        );
    }

    #[test]
    fn skips_links_without_a_valid_name() {
        assert!(observe_link(&link_message(vec![LinkAttribute::Mtu(1500)])).is_none());
    }

    #[test]
    fn observes_addresses_preferring_local() {
        let mut msg = AddressMessage::default();
        msg.header.family = AddressFamily::Inet;
        msg.header.prefix_len = 24;
        msg.header.index = 4;
        msg.attributes = vec![
            AddressAttribute::Address("169.254.9.1".parse().unwrap()),
            AddressAttribute::Local("169.254.9.2".parse().unwrap()),
        ];
        assert_eq!(
            observe_address(&msg),
            Some((4, "169.254.9.2/24".parse().unwrap()))
        );
        msg.header.family = AddressFamily::Inet6;
        assert_eq!(observe_address(&msg), None);
    }
}
