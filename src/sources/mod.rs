//! Where the desired state comes from. Every source feeds the same
//! `watch::Sender<Option<Vmi>>`: `None` until a first good document arrives,
//! then always the last good one.

pub mod vmi_file;
