//! Where the desired state and the pod's CNI results come from. Every source
//! feeds a `watch::Sender<Option<T>>`: `None` until a first good document
//! arrives, then always the last good one.

pub mod network_status;
pub mod vmi_file;
pub mod watched;
