//! The `nicplug` binary: argument parsing, logging, signals and task wiring;
//! the work is in the library.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};
use tokio::sync::{Notify, broadcast, watch};
use tokio_util::sync::CancellationToken;
use tracing::{error, info};

use nicplug::agent::{Agent, AgentConfig, ReportConfig};
use nicplug::api::{ApiState, DEFAULT_SOCKET, Readiness, Server};
use nicplug::error::error_chain;
use nicplug::health::Part;
use nicplug::hypervisor::libvirt::{Libvirt, default_uri};
use nicplug::instance::InstanceLock;
use nicplug::k8s::Kube;
use nicplug::metrics::Metrics;
use nicplug::model::Owner;
use nicplug::model::network_status::NetworkStatus;
use nicplug::netns::netlink::Netlink;
use nicplug::netns::watch::LinkEvents;
use nicplug::sources::{network_status, vmi_file};
use nicplug::status::StatusDocument;

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
    Run(Box<RunArgs>),
    /// Show the interfaces of the running agent.
    Status(StatusArgs),
    /// Exit 0 when the running agent's /healthz or /readyz answers 200 (exec probes).
    Probe(ProbeArgs),
}

#[derive(clap::Args)]
struct ProbeArgs {
    /// healthz: the agent serves requests; readyz: libvirt, netlink and the spec are available.
    #[arg(value_enum)]
    endpoint: Endpoint,
    /// The agent's API socket.
    #[arg(long, default_value = DEFAULT_SOCKET)]
    socket: PathBuf,
}

#[derive(Clone, Copy, ValueEnum)]
enum Endpoint {
    Healthz,
    Readyz,
}

#[derive(clap::Args)]
struct RunArgs {
    /// VirtualMachineInstance document (`kubectl get vmi NAME -o json|yaml`), watched.
    #[arg(long, required_unless_present = "kube", conflicts_with = "kube")]
    vmi: Option<PathBuf>,
    /// Follow the VMI through the Kubernetes API (in-cluster credentials or
    /// KUBECONFIG); annotate this pod with the status, record Events on the VMI.
    #[arg(long)]
    kube: bool,
    /// With --kube: the VMI's name.
    #[arg(long, env = "VMI_NAME")]
    vmi_name: Option<String>,
    /// With --kube: the namespace of the VMI and this pod [default: the service account's].
    #[arg(long, env = "POD_NAMESPACE")]
    namespace: Option<String>,
    /// With --kube: this (virt-launcher) pod's name, for the annotation and Events.
    #[arg(long, env = "POD_NAME")]
    pod_name: Option<String>,
    /// With --kube: read Multus network-status from this pod's annotation in the API.
    #[arg(long, requires = "kube", conflicts_with = "network_status")]
    kube_network_status: bool,
    /// With --kube: turn off coexistence with KubeVirt's own hotplug (on by default).
    #[arg(long, requires = "kube")]
    no_coexist: bool,
    /// Multus network-status: the raw JSON array or a downward-API annotations file, watched.
    #[arg(long)]
    network_status: Option<PathBuf>,
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
    /// Seconds between guest-agent refreshes when nothing else prompts one.
    #[arg(long, default_value_t = 30.0)]
    guest_refresh: f64,
    /// Unix socket of the status/health/metrics API (owner-only, mode 0600).
    #[arg(long, default_value = DEFAULT_SOCKET)]
    api_socket: PathBuf,
    /// Also serve the API on this TCP address (for probes and scrapes). Off
    /// unless given; anything that reaches the address can read the status.
    #[arg(long)]
    listen: Option<SocketAddr>,
}

#[derive(clap::Args)]
struct StatusArgs {
    /// The agent's API socket.
    #[arg(long, default_value = DEFAULT_SOCKET)]
    socket: PathBuf,
    /// Output format.
    #[arg(short = 'o', long = "output", value_enum, default_value_t = Output::Table)]
    output: Output,
}

#[derive(Clone, Copy, ValueEnum)]
enum Output {
    Table,
    Json,
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    init_logging(cli.log_format);
    // One thread runs the loop and its triggers: a netlink event wakes the
    // reconcile without a hand-off between threads. Blocking libvirt calls
    // go to tokio's blocking pool, libvirt's events to their own thread.
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            error!(error = %e, "cannot start the runtime");
            return std::process::ExitCode::FAILURE;
        }
    };
    match cli.command {
        Command::Run(args) => {
            abort_on_panic();
            let result = runtime.block_on(run(*args));
            // Whatever still runs on the blocking pool is not waited for.
            runtime.shutdown_timeout(Duration::from_millis(500));
            match result {
                Ok(()) => std::process::ExitCode::SUCCESS,
                Err(e) => {
                    error!(error = %format!("{e:#}"), "nicplug failed");
                    std::process::ExitCode::FAILURE
                }
            }
        }
        Command::Probe(args) => {
            let path = match args.endpoint {
                Endpoint::Healthz => "/healthz",
                Endpoint::Readyz => "/readyz",
            };
            match runtime.block_on(nicplug::api::client::fetch(&args.socket, path)) {
                Ok((200, body)) => {
                    print!("{body}");
                    std::process::ExitCode::SUCCESS
                }
                Ok((code, body)) => {
                    eprint!("nicplug probe: {path}: {code} {body}");
                    std::process::ExitCode::FAILURE
                }
                Err(e) => {
                    eprintln!("nicplug probe: {path}: {}", error_chain(&e));
                    std::process::ExitCode::FAILURE
                }
            }
        }
        Command::Status(args) => {
            let json = matches!(args.output, Output::Json);
            match runtime.block_on(nicplug::api::client::status_command(&args.socket, json)) {
                Ok(text) => {
                    print!("{text}");
                    std::process::ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("nicplug status: {}", error_chain(&e));
                    std::process::ExitCode::FAILURE
                }
            }
        }
    }
}

/// A panic anywhere ends the process. On a single-threaded runtime a
/// panicking task would otherwise just vanish (the link watcher, say) and
/// leave the agent running without it; a crash instead gets the container
/// restarted, and a restart reconciles from what it observes.
fn abort_on_panic() {
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        error!(panic = %info, "nicplug panicked; exiting so that a restart reconciles from scratch");
        default(info);
        std::process::abort();
    }));
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
    // Before anything is touched: a second agent in the pod would fight
    // this one over every device and link.
    let _instance = InstanceLock::acquire()?;
    let shutdown = CancellationToken::new();
    let wake = Arc::new(Notify::new());
    let mut tasks = tokio::task::JoinSet::new();
    tasks.spawn(stop_on_signal(shutdown.clone()));

    // The API first: /healthz answers and /readyz says what is missing
    // while the rest comes up.
    let readiness = Arc::new(Readiness::new());
    let metrics = Arc::new(Metrics::new());
    let (status_tx, status_rx) = watch::channel(StatusDocument::default());
    let api = Server::bind(
        ApiState {
            status: status_rx.clone(),
            readiness: readiness.clone(),
            metrics: metrics.clone(),
        },
        &args.api_socket,
        args.listen,
    )
    .await
    .context("cannot start the API")?;
    let api_task = tokio::spawn(api.run(shutdown.clone()));

    // 1. Link events before the first dump, so nothing in between is missed.
    let link_events = LinkEvents::subscribe()
        .await
        .context("cannot subscribe to link events")?;
    let net = Netlink::new().context("cannot open rtnetlink")?;
    readiness.set(Part::Netlink, Ok(()));

    // 2. libvirt: connected by the first pass, on its own thread, and again
    // whenever the connection is lost; each pass reports whether it answers.
    let uri = args.libvirt_uri.clone().unwrap_or_else(default_uri);
    let (events_tx, events) = broadcast::channel(256);
    let hyp = Libvirt::new(&uri, events_tx);
    info!(%uri, "libvirt");

    // 3. The spec and the CNI results.
    let inputs = spawn_inputs(&args, &mut tasks, status_rx, &shutdown).await?;
    let mut spec = inputs.spec.clone();
    let spec_readiness = readiness.clone();
    tasks.spawn(async move {
        if spec.wait_for(Option::is_some).await.is_ok() {
            spec_readiness.set(Part::Spec, Ok(()));
        }
    });

    let config = AgentConfig {
        attach_timeout: seconds(args.attach_timeout, "--attach-timeout")?,
        detach_timeout: seconds(args.detach_timeout, "--detach-timeout")?,
        resync: seconds(args.resync, "--resync")?,
        tap_owner: args.tap_owner,
        domain: args.domain.clone(),
        report: ReportConfig {
            outcomes: inputs.outcomes,
            status_file: args.status_file.clone(),
            status_tx: Some(status_tx),
            metrics: Some(metrics),
            network_status: inputs.network_status,
            guest_refresh: seconds(args.guest_refresh, "--guest-refresh")?,
        },
        coexist: inputs.coexist,
        readiness: Some(readiness),
        ..AgentConfig::default()
    };
    let agent = Agent::new(net, hyp, config);
    tasks.spawn(link_events.run(wake.clone()));
    tasks.spawn(agent.forward_domain_events(events, wake.clone()));

    agent.run(inputs.spec, wake, shutdown.clone()).await;
    shutdown.cancel();
    info!("stopped");
    tasks.abort_all();
    match api_task.await {
        Ok(Err(e)) => error!(error = %error_chain(&e), "API stopped with an error"),
        Err(e) => error!(error = %e, "API task failed"),
        Ok(Ok(())) => {}
    }
    Ok(())
}

/// What the agent reads besides the pod and the domain.
struct Inputs {
    spec: watch::Receiver<Option<nicplug::model::vmi::Vmi>>,
    network_status: Option<watch::Receiver<Option<Vec<NetworkStatus>>>>,
    outcomes: Option<tokio::sync::mpsc::UnboundedSender<nicplug::agent::Outcome>>,
    coexist: bool,
}

/// Starts the spec source (the watched VMI file, or the Kubernetes API:
/// bad credentials fail the start) and the network-status source.
async fn spawn_inputs(
    args: &RunArgs,
    tasks: &mut tokio::task::JoinSet<()>,
    status: watch::Receiver<StatusDocument>,
    shutdown: &CancellationToken,
) -> anyhow::Result<Inputs> {
    let (spec_tx, spec) = watch::channel(None);
    let mut inputs = Inputs {
        spec,
        network_status: None,
        outcomes: None,
        coexist: false,
    };
    if args.kube {
        let kube = Kube::connect(
            args.vmi_name
                .clone()
                .context("--kube needs the VMI's name (--vmi-name or VMI_NAME)")?,
            args.pod_name
                .clone()
                .context("--kube needs this pod's name (--pod-name or POD_NAME)")?,
            args.namespace.clone(),
        )
        .await?;
        info!(namespace = %kube.namespace, vmi = %kube.vmi, pod = %kube.pod, "following the VMI through the Kubernetes API");
        let spawned = kube.spawn(
            tasks,
            spec_tx,
            status,
            args.kube_network_status,
            shutdown.clone(),
        );
        inputs.outcomes = Some(spawned.outcomes);
        inputs.network_status = spawned.network_status;
        inputs.coexist = !args.no_coexist;
    } else if let Some(path) = args.vmi.clone() {
        let shutdown = shutdown.clone();
        tasks.spawn(async move {
            if let Err(e) = vmi_file::watch_file(path, spec_tx, shutdown).await {
                error!(error = %error_chain(&e), "VMI file source stopped");
            }
        });
    }
    if inputs.network_status.is_none()
        && let Some(path) = args.network_status.clone()
    {
        let (tx, rx) = watch::channel(None);
        let shutdown = shutdown.clone();
        tasks.spawn(async move {
            if let Err(e) = network_status::watch_file(path, tx, shutdown).await {
                error!(error = %error_chain(&e), "network-status source stopped");
            }
        });
        inputs.network_status = Some(rx);
    }
    Ok(inputs)
}

async fn stop_on_signal(shutdown: CancellationToken) {
    wait_for_signal().await;
    info!("stop requested");
    shutdown.cancel();
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
