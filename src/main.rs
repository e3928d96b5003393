//! The `nicplug` binary: argument parsing, logging, signals; the work is in
//! the library.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};
use tokio::sync::{Notify, broadcast, watch};
use tokio_util::sync::CancellationToken;
use tracing::{error, info};

use nicplug::agent::{Agent, AgentConfig, error_chain};
use nicplug::hypervisor::libvirt::{Libvirt, default_uri};
use nicplug::model::Owner;
use nicplug::netns::netlink::Netlink;
use nicplug::netns::watch::LinkEvents;
use nicplug::sources::vmi_file;

#[derive(Parser)]
#[command(
    version,
    about = "Hot-plugs network interfaces into running KubeVirt VMs"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
    /// Log format.
    #[arg(long, value_enum, default_value_t = LogFormat::Text, global = true)]
    log_format: LogFormat,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Run the agent in the current network namespace (the launcher pod's).
    Run(RunArgs),
}

#[derive(clap::Args)]
struct RunArgs {
    /// VirtualMachineInstance document (`kubectl get vmi NAME -o json|yaml`), watched.
    #[arg(long)]
    vmi: PathBuf,
    /// libvirt URI [default: KubeVirt's non-root socket if present, else qemu:///system].
    #[arg(long)]
    libvirt_uri: Option<String>,
    /// libvirt domain [default: <namespace>_<name> of the VMI].
    #[arg(long)]
    domain: Option<String>,
    /// Where to write the status document (JSON, replaced atomically).
    #[arg(long)]
    status_file: Option<PathBuf>,
    /// UID:GID owning the taps [default: the user the domain's QEMU runs as].
    #[arg(long)]
    tap_owner: Option<Owner>,
    /// Seconds to wait for DEVICE_ADDED after an attach.
    #[arg(long, default_value_t = 10.0)]
    attach_timeout: f64,
    /// Seconds to wait for the guest to release a device after a detach.
    #[arg(long, default_value_t = 30.0)]
    detach_timeout: f64,
    /// Seconds between reconciles without any trigger.
    #[arg(long, default_value_t = 30.0)]
    resync: f64,
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    init_logging(cli.log_format);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            error!(error = %e, "cannot start the runtime");
            return std::process::ExitCode::FAILURE;
        }
    };
    let result = match cli.command {
        Command::Run(args) => runtime.block_on(run(args)),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            error!(error = %format!("{e:#}"), "nicplug failed");
            std::process::ExitCode::FAILURE
        }
    }
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("NICPLUG_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

fn seconds(value: f64, flag: &str) -> anyhow::Result<Duration> {
    Duration::try_from_secs_f64(value)
        .with_context(|| format!("{flag} must be a non-negative number of seconds"))
}

async fn run(args: RunArgs) -> anyhow::Result<()> {
    let shutdown = CancellationToken::new();
    let wake = Arc::new(Notify::new());
    let config = AgentConfig {
        attach_timeout: seconds(args.attach_timeout, "--attach-timeout")?,
        detach_timeout: seconds(args.detach_timeout, "--detach-timeout")?,
        resync: seconds(args.resync, "--resync")?,
        tap_owner: args.tap_owner,
        domain: args.domain,
        status_file: args.status_file,
        ..AgentConfig::default()
    };

    // 1. Link events first, so nothing between the subscription and the
    //    first dump is missed.
    let link_events = LinkEvents::subscribe()
        .await
        .context("cannot subscribe to link events")?;
    let net = Netlink::new().context("cannot open rtnetlink")?;

    // 2. libvirt, with its event loop and callbacks registered.
    let uri = args.libvirt_uri.unwrap_or_else(default_uri);
    let (events_tx, mut events) = broadcast::channel(256);
    let hyp = connect_libvirt(&uri, events_tx, &shutdown).await?;
    info!(%uri, "connected to libvirt");

    // 3. The spec.
    let (spec_tx, spec_rx) = watch::channel(None);
    let mut tasks = tokio::task::JoinSet::new();
    tasks.spawn(link_events.run(wake.clone()));
    {
        let wake = wake.clone();
        tasks.spawn(async move {
            // Any domain event is only a trigger; the loop reads the state.
            loop {
                match events.recv().await {
                    Ok(event) => {
                        tracing::debug!(?event, "libvirt event");
                        wake.notify_one();
                    }
                    Err(broadcast::error::RecvError::Lagged(_)) => wake.notify_one(),
                    Err(broadcast::error::RecvError::Closed) => break,
                }
            }
        });
    }
    {
        let shutdown = shutdown.clone();
        tasks.spawn(async move {
            if let Err(e) = vmi_file::watch_file(args.vmi, spec_tx, shutdown).await {
                error!(error = %error_chain(&e), "VMI file source stopped");
            }
        });
    }
    {
        let shutdown = shutdown.clone();
        tasks.spawn(async move {
            wait_for_signal().await;
            info!("stop requested");
            shutdown.cancel();
        });
    }

    Agent::new(net, hyp, config)
        .run(spec_rx, wake, shutdown.clone())
        .await;
    shutdown.cancel();
    tasks.abort_all();
    Ok(())
}

async fn connect_libvirt(
    uri: &str,
    events: broadcast::Sender<nicplug::hypervisor::events::DomainEvent>,
    shutdown: &CancellationToken,
) -> anyhow::Result<Libvirt> {
    let mut delay = Duration::from_millis(200);
    loop {
        match Libvirt::connect(uri, events.clone()) {
            Ok(hyp) => return Ok(hyp),
            Err(e) => {
                error!(error = %error_chain(&e), %uri, retry_in = ?delay, "cannot connect to libvirt")
            }
        }
        tokio::select! {
            _ = shutdown.cancelled() => anyhow::bail!("stopped before libvirt was reachable"),
            _ = wait_for_signal() => anyhow::bail!("stopped before libvirt was reachable"),
            _ = tokio::time::sleep(delay) => {}
        }
        delay = (delay * 2).min(Duration::from_secs(10));
    }
}

async fn wait_for_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) {
        (Ok(mut term), Ok(mut int)) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
        }
        _ => std::future::pending().await,
    }
}
