//! Test-only fault injection at step boundaries, so the crash-safety
//! promise ("a restart finishes or undoes whatever a killed run left") can
//! be checked at every boundary of a plug and an unplug.
//!
//! `NICPLUG_TEST_FAULT` is a comma-separated list of
//! - `abort-after=<step>[#<n>]`: `abort()` right after the n-th (default
//!   first) successful `<step>` of this process;
//! - `pause-before=<step>:<ms>`: sleep before every `<step>`.
//!
//! Step names are [`crate::plan::Step::name`]'s; `detach-device` completes
//! when the device is gone. Only debug builds read the variable: release
//! builds compile these hooks to nothing.

#[cfg(debug_assertions)]
mod enabled {
    use std::collections::HashMap;
    use std::sync::{Mutex, OnceLock};
    use std::time::Duration;

    #[derive(Debug, PartialEq, Eq)]
    enum Fault {
        AbortAfter { step: String, nth: u32 },
        PauseBefore { step: String, pause: Duration },
    }

    fn parse(spec: &str) -> Vec<Fault> {
        spec.split(',')
            .filter_map(|item| {
                let (kind, arg) = item.trim().split_once('=')?;
                match kind {
                    "abort-after" => {
                        let (step, nth) = arg.split_once('#').unwrap_or((arg, "1"));
                        Some(Fault::AbortAfter {
                            step: step.to_string(),
                            nth: nth.parse().ok()?,
                        })
                    }
                    "pause-before" => {
                        let (step, ms) = arg.split_once(':')?;
                        Some(Fault::PauseBefore {
                            step: step.to_string(),
                            pause: Duration::from_millis(ms.parse().ok()?),
                        })
                    }
                    _ => None,
                }
            })
            .collect()
    }

    fn faults() -> &'static [Fault] {
        static FAULTS: OnceLock<Vec<Fault>> = OnceLock::new();
        FAULTS.get_or_init(|| {
            let faults = std::env::var("NICPLUG_TEST_FAULT")
                .map(|s| parse(&s))
                .unwrap_or_default();
            if !faults.is_empty() {
                tracing::warn!(?faults, "test faults armed (NICPLUG_TEST_FAULT)");
            }
            faults
        })
    }

    pub async fn before(step: &str) {
        for fault in faults() {
            if let Fault::PauseBefore { step: s, pause } = fault
                && s == step
            {
                tracing::warn!(step, ?pause, "test fault: pause");
                tokio::time::sleep(*pause).await;
            }
        }
    }

    pub fn after(step: &str) {
        static DONE: Mutex<Option<HashMap<String, u32>>> = Mutex::new(None);
        if !faults()
            .iter()
            .any(|f| matches!(f, Fault::AbortAfter { step: s, .. } if s == step))
        {
            return;
        }
        let count = {
            let mut done = DONE.lock().unwrap_or_else(|p| p.into_inner());
            let n = done.get_or_insert_default().entry(step.into()).or_default();
            *n += 1;
            *n
        };
        for fault in faults() {
            if let Fault::AbortAfter { step: s, nth } = fault
                && s == step
                && *nth == count
            {
                eprintln!("test fault: abort after {step}#{count}");
                std::process::abort();
            }
        }
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn parses_the_fault_list() {
            assert_eq!(
                parse("abort-after=delete-link#2, pause-before=attach-device:3000,bogus"),
                [
                    Fault::AbortAfter {
                        step: "delete-link".into(),
                        nth: 2
                    },
                    Fault::PauseBefore {
                        step: "attach-device".into(),
                        pause: Duration::from_secs(3)
                    },
                ]
            );
            assert_eq!(
                parse("abort-after=ensure-tap"),
                [Fault::AbortAfter {
                    step: "ensure-tap".into(),
                    nth: 1
                }]
            );
        }
    }
}

#[cfg(debug_assertions)]
pub use enabled::{after, before};

#[cfg(not(debug_assertions))]
pub async fn before(_step: &str) {}

#[cfg(not(debug_assertions))]
pub fn after(_step: &str) {}
