//! Where a hot-plugged interface goes: an explicit PCIe root port, chosen
//! from the interface's position in the spec, so guest NIC names (`enp<bus>s0`)
//! do not depend on plug order or on which port was freed last.
//!
//! The rule (docs/design.md, "Stable guest NIC placement"):
//! - the **pool** is the domain's hot-pluggable `pcie-root-port`s, ordered by
//!   index, without those another kind of device sits on (the primary NIC,
//!   disks, host devices): free ports and ports of secondary interfaces;
//! - the **preferred port** of a spec interface is `pool[k]`, `k` its position
//!   among the spec's hot-pluggable (bridge, secondary Multus) interfaces,
//!   absent ones included, so one network's state never shifts another's;
//! - when the preferred port is taken, or `k` is beyond the pool, the
//!   interface gets the lowest free port that is nobody's preferred port
//!   (else the lowest free port at all), and its status says so;
//! - devices already attached are never moved.

use std::fmt;

use crate::hypervisor::domain_xml::{Occupant, PciAddress, RootPortIndex, RootPorts};

/// The root ports hot-plugged interfaces are placed on, as this pass leaves them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PortPool {
    /// Ordered by index; `true` when free.
    ports: Vec<(RootPortIndex, bool)>,
    /// Preferred ports of spec interfaces that are not on them (no device
    /// yet, or one elsewhere that may come back after an unplug): a
    /// fallback avoids them while it can.
    reserved: Vec<RootPortIndex>,
}

/// Why an interface did not get its preferred port.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fallback {
    /// Another device sits on the preferred port.
    Taken { preferred: RootPortIndex },
    /// The spec has more hot-pluggable interfaces before this one than the
    /// pool has ports.
    BeyondPool { position: usize, pool: usize },
}

/// The port an interface is attached on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Placement {
    pub port: RootPortIndex,
    pub fallback: Option<Fallback>,
}

impl Placement {
    pub fn address(&self) -> PciAddress {
        PciAddress::on_root_port(self.port)
    }
}

impl fmt::Display for Placement {
    /// The status message of a fallback.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "placed on root port {}", self.port)?;
        match self.fallback {
            None => Ok(()),
            Some(Fallback::Taken { preferred }) => {
                write!(f, ": preferred port {preferred} is taken")
            }
            Some(Fallback::BeyondPool { position, pool }) => write!(
                f,
                ": it is hot-plug interface {} of the spec, the domain has {pool} hot-plug root ports",
                position + 1
            ),
        }
    }
}

impl PortPool {
    /// The pool of `ports`; `secondary(alias)` tells whether an interface
    /// device is a secondary network's (its port belongs to the pool).
    pub fn new(ports: &RootPorts, secondary: impl Fn(Option<&str>) -> bool) -> Self {
        let ports = ports
            .ports
            .iter()
            .filter_map(|p| match &p.occupant {
                Occupant::Free => Some((p.index, true)),
                Occupant::Interface { alias } if secondary(alias.as_deref()) => {
                    Some((p.index, false))
                }
                _ => None,
            })
            .collect();
        Self {
            ports,
            reserved: Vec::new(),
        }
    }

    /// The preferred port of the hot-pluggable interface at `position`.
    pub fn preferred(&self, position: usize) -> Option<RootPortIndex> {
        self.ports.get(position).map(|p| p.0)
    }

    /// Keeps the preferred ports of these positions for their interfaces:
    /// a fallback takes them only when no other port is free.
    pub fn reserve(&mut self, positions: impl IntoIterator<Item = usize>) {
        let reserved: Vec<RootPortIndex> = positions
            .into_iter()
            .filter_map(|k| self.preferred(k))
            .collect();
        self.reserved = reserved;
    }

    pub fn free(&self) -> usize {
        self.ports.iter().filter(|p| p.1).count()
    }

    /// Takes a port for the interface at `position`: its preferred one if
    /// free, else the fallback; `None` when no port is free.
    pub fn take(&mut self, position: usize) -> Option<Placement> {
        let preferred = self.preferred(position);
        let free = |index: RootPortIndex| self.ports.iter().any(|p| p.0 == index && p.1);
        let placement = match preferred {
            Some(port) if free(port) => Placement {
                port,
                fallback: None,
            },
            _ => {
                let fallback = match preferred {
                    Some(preferred) => Fallback::Taken { preferred },
                    None => Fallback::BeyondPool {
                        position,
                        pool: self.ports.len(),
                    },
                };
                let unreserved = self
                    .ports
                    .iter()
                    .find(|p| p.1 && !self.reserved.contains(&p.0));
                let port = unreserved.or_else(|| self.ports.iter().find(|p| p.1))?.0;
                Placement {
                    port,
                    fallback: Some(fallback),
                }
            }
        };
        if let Some(p) = self.ports.iter_mut().find(|p| p.0 == placement.port) {
            p.1 = false;
        }
        self.reserved.retain(|r| *r != placement.port);
        Some(placement)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hypervisor::domain_xml::RootPort;

    fn ports(occupants: &[(u8, Occupant)]) -> RootPorts {
        RootPorts {
            ports: occupants
                .iter()
                .map(|(i, o)| RootPort {
                    index: RootPortIndex(*i),
                    occupant: o.clone(),
                })
                .collect(),
        }
    }

    fn nic(alias: &str) -> Occupant {
        Occupant::Interface {
            alias: Some(alias.into()),
        }
    }

    fn secondary(alias: Option<&str>) -> bool {
        alias.is_some_and(|a| a.starts_with("ua-") && a != "ua-default")
    }

    fn port(i: u8) -> RootPortIndex {
        RootPortIndex(i)
    }

    #[test]
    fn the_pool_leaves_out_ports_of_other_devices() {
        let pool = PortPool::new(
            &ports(&[
                (1, nic("ua-default")),
                (2, Occupant::OtherDevice),
                (3, nic("ua-blue")),
                (4, Occupant::Free),
                (5, Occupant::Free),
            ]),
            secondary,
        );
        assert_eq!(pool.preferred(0), Some(port(3)));
        assert_eq!(pool.preferred(1), Some(port(4)));
        assert_eq!(pool.preferred(2), Some(port(5)));
        assert_eq!(pool.preferred(3), None);
        assert_eq!(pool.free(), 2);
    }

    #[test]
    fn the_preferred_port_when_free() {
        let mut pool = PortPool::new(
            &ports(&[(1, Occupant::Free), (2, Occupant::Free)]),
            secondary,
        );
        let p = pool.take(1).unwrap();
        assert_eq!((p.port, p.fallback), (port(2), None));
        assert_eq!(p.address().to_string(), "0000:02:00.0");
        assert_eq!(p.to_string(), "placed on root port 2");
        // Taken by this pass now: the next one falls back.
        let p = pool.take(1).unwrap();
        assert_eq!(p.port, port(1));
        assert_eq!(
            p.to_string(),
            "placed on root port 1: preferred port 2 is taken"
        );
        assert_eq!(pool.take(0), None);
    }

    #[test]
    fn a_fallback_avoids_the_ports_others_will_want() {
        let mut pool = PortPool::new(
            &ports(&[
                (1, nic("ua-departed")),
                (2, Occupant::Free),
                (3, Occupant::Free),
                (4, Occupant::Free),
            ]),
            secondary,
        );
        // Positions 1 and 2 are spec interfaces that are not plugged yet.
        pool.reserve([1, 2]);
        let p = pool.take(0).unwrap();
        assert_eq!(p.port, port(4));
        assert_eq!(p.fallback, Some(Fallback::Taken { preferred: port(1) }));
        assert_eq!(pool.take(1).unwrap().port, port(2));
        // Only reserved ports left: a fallback takes one rather than fail.
        let mut pool = PortPool::new(
            &ports(&[(1, Occupant::Free), (2, Occupant::Free)]),
            secondary,
        );
        pool.reserve([0, 1]);
        let p = pool.take(5).unwrap();
        assert_eq!(p.port, port(1));
        assert_eq!(
            p.to_string(),
            "placed on root port 1: it is hot-plug interface 6 of the spec, the domain has 2 hot-plug root ports"
        );
    }

    #[test]
    fn a_port_a_fallback_took_is_no_longer_reserved() {
        let mut pool = PortPool::new(&ports(&[(1, Occupant::Free)]), secondary);
        pool.reserve([0]);
        assert_eq!(pool.take(3).unwrap().port, port(1));
        assert!(pool.reserved.is_empty());
        assert_eq!(pool.take(0), None);
    }
}
