//! nicplug: hot-plugs network interfaces into running KubeVirt VMs.
//!
//! See `docs/design.md` for the reconcile loop and its seams.

pub mod agent;
pub mod api;
pub mod dhcp;
pub mod error;
pub mod health;
pub mod hypervisor;
pub mod inspect;
pub mod instance;
pub mod k8s;
pub mod metrics;
pub mod model;
pub mod netns;
pub mod plan;
pub mod sources;
pub mod status;
