//! `nicplug plan`: what a reconcile pass would do now, for people and
//! scripts. The observation and the plan are the agent's own
//! ([`crate::agent::observe_and_plan`]); this only describes them.

use serde::Serialize;

use crate::agent::Observation;
use crate::hypervisor::{DeviceBackend, DomainLifecycle};
use crate::model::vmi::Vmi;
use crate::plan::{InterfacePlan, Phase, Step};

/// One step, named as in logs and metrics, with what it would touch.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PlannedStep {
    pub step: &'static str,
    pub detail: String,
}

/// One interface of the plan.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PlannedInterface {
    pub name: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pod_interface_name: Option<String>,
    /// The phase once the steps are done (the current one without steps).
    pub phase: Phase,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    pub steps: Vec<PlannedStep>,
    /// The network left the spec; nicplug unplugs what it plugged for it.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub departed: bool,
}

/// What `nicplug plan` prints (`-o json`: this, serialized).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PlanReport {
    pub vmi: String,
    pub domain: String,
    pub domain_state: DomainLifecycle,
    /// Free hot-pluggable PCIe root ports of the domain.
    pub root_ports_free: usize,
    /// Nothing to do and nothing failing.
    pub converged: bool,
    pub interfaces: Vec<PlannedInterface>,
}

impl PlanReport {
    pub fn new(
        vmi: &Vmi,
        domain: &str,
        observation: &Observation,
        plans: &[InterfacePlan],
    ) -> Self {
        let interfaces: Vec<PlannedInterface> = plans
            .iter()
            .map(|p| PlannedInterface {
                name: p.name.clone(),
                pod_interface_name: p.pod_iface.as_ref().map(ToString::to_string),
                phase: p.phase,
                message: p.message.clone(),
                steps: p
                    .steps
                    .iter()
                    .map(|s| PlannedStep {
                        step: s.name(),
                        detail: describe(s),
                    })
                    .collect(),
                departed: p.departed,
            })
            .collect();
        let converged = interfaces
            .iter()
            .all(|i| i.steps.is_empty() && i.phase != Phase::Failed);
        Self {
            vmi: format!("{}/{}", vmi.namespace, vmi.name),
            domain: domain.to_string(),
            domain_state: observation.lifecycle,
            root_ports_free: observation
                .domain
                .as_ref()
                .map_or(0, |d| d.root_ports.free()),
            converged,
            interfaces,
        }
    }

    /// The table: a header, one line per interface, its steps indented
    /// below it, then the messages.
    pub fn render(&self) -> String {
        let mut out = format!(
            "vmi {}   domain {} {}   free root ports {}   {}\n\n",
            self.vmi,
            self.domain,
            self.domain_state,
            self.root_ports_free,
            if self.converged {
                "converged: nothing to do"
            } else {
                "not converged"
            }
        );
        let width = self
            .interfaces
            .iter()
            .map(|i| i.name.chars().count())
            .max()
            .unwrap_or(0)
            .max("NAME".len());
        let pod_width = self
            .interfaces
            .iter()
            .map(|i| i.pod_interface_name.as_deref().unwrap_or("-").len())
            .max()
            .unwrap_or(0)
            .max("POD IFACE".len());
        out.push_str(&format!(
            "{:width$}   {:pod_width$}   {:13}   STEPS\n",
            "NAME", "POD IFACE", "PHASE"
        ));
        for i in &self.interfaces {
            let steps = if i.steps.is_empty() {
                "-".to_string()
            } else {
                i.steps.len().to_string()
            };
            let line = format!(
                "{:width$}   {:pod_width$}   {:13}   {steps}",
                i.name,
                i.pod_interface_name.as_deref().unwrap_or("-"),
                i.phase.to_string(),
            );
            out.push_str(line.trim_end());
            out.push('\n');
            for (n, s) in i.steps.iter().enumerate() {
                out.push_str(&format!("    {}. {} {}\n", n + 1, s.step, s.detail));
            }
        }
        let messages: Vec<String> = self
            .interfaces
            .iter()
            .filter_map(|i| Some(format!("{}: {}\n", i.name, i.message.as_deref()?)))
            .collect();
        if !messages.is_empty() {
            out.push('\n');
            out.extend(messages);
        }
        out
    }
}

/// What a step would touch, in a few words.
pub fn describe(step: &Step) -> String {
    match step {
        Step::RecordPodLink { pod, alias } => format!("{pod}: ifalias {alias:?}"),
        Step::EnsureBridge { bridge, mac } => format!("{bridge} (mac {mac})"),
        Step::EnslavePodLink {
            pod,
            bridge,
            mac,
            addresses,
            routes,
        } => {
            let mut text = format!("{pod} into {bridge} (mac {mac}");
            if !addresses.is_empty() {
                let list: Vec<String> = addresses.iter().map(ToString::to_string).collect();
                text.push_str(&format!(", removing {}", list.join(" ")));
            }
            if !routes.is_empty() {
                let list: Vec<String> = routes.iter().map(ToString::to_string).collect();
                text.push_str(&format!(", routes {}", list.join(" ")));
            }
            text.push(')');
            text
        }
        Step::EnsureTap { spec, bridge } => format!(
            "{} into {bridge} (owner {}:{}, mtu {}{})",
            spec.name,
            spec.owner.uid,
            spec.owner.gid,
            spec.mtu,
            if spec.multi_queue { ", multiqueue" } else { "" }
        ),
        Step::Attach { device, persistent } => format!(
            "{} (mac {}, {} {}, model {}{})",
            device.alias(),
            device.mac,
            match device.backend {
                DeviceBackend::Tap => "tap",
                DeviceBackend::Passt { .. } => "passt on",
            },
            device.link,
            device.model,
            if *persistent {
                ", live and config"
            } else {
                ", live"
            }
        ),
        Step::Detach { alias, persistent } => format!(
            "{alias}{}",
            if *persistent {
                " (live and config)"
            } else {
                " (live)"
            }
        ),
        Step::SetLinkState { device, up, .. } => format!(
            "{} link {}",
            device.alias.as_deref().unwrap_or("-"),
            if *up { "up" } else { "down" }
        ),
        Step::RefreshLink { device } => format!(
            "{} link down and up (live)",
            device.alias.as_deref().unwrap_or("-")
        ),
        Step::ReleasePodLink { pod, record } => {
            let list: Vec<String> = record.addresses.iter().map(ToString::to_string).collect();
            format!(
                "{pod} back to mac {}, mtu {}{}",
                record.mac,
                record.mtu,
                if list.is_empty() {
                    String::new()
                } else {
                    format!(", addresses {}", list.join(" "))
                }
            )
        }
        Step::DeleteLink { name } => name.to_string(),
    }
}
