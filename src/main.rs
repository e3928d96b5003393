//! The `nicplug` binary: argument parsing, logging, signals and task wiring;
//! the work is in the library.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::{CommandFactory, Parser, Subcommand, ValueEnum};
use tokio::sync::{Notify, broadcast, watch};
use tokio_util::sync::CancellationToken;
use tracing::{error, info};

use nicplug::agent::{Agent, AgentConfig, ReportConfig, observe_and_plan};
use nicplug::api::client::{ClientError, Format};
use nicplug::api::{ApiState, DEFAULT_SOCKET, Readiness, Server};
use nicplug::error::error_chain;
use nicplug::health::Part;
use nicplug::hypervisor::libvirt::{Libvirt, check_uri, default_uri};
use nicplug::inspect::PlanReport;
use nicplug::instance::InstanceLock;
use nicplug::k8s::Kube;
use nicplug::metrics::Metrics;
use nicplug::model::Owner;
use nicplug::model::network_status::NetworkStatus;
use nicplug::model::vmi::{BindingPlugins, PluginKind, parse_plugin_mapping};
use nicplug::netns::netlink::Netlink;
use nicplug::netns::watch::LinkEvents;
use nicplug::sources::{network_status, vmi_file};
use nicplug::status::StatusDocument;

#[derive(Parser)]
#[command(
    name = "nicplug",
    version,
    about = "Hot-plugs network interfaces into running KubeVirt VMs",
    after_help = "Exit codes: 0 success; 1 failure; 2 usage error (and `plan`: steps to \
take); 3 `status`: the agent is not ready. docs/troubleshooting.md explains every message."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
    /// Log format (to stderr).
    #[arg(long, value_enum, default_value_t = LogFormat::Text, global = true)]
    log_format: LogFormat,
    /// Log level or tracing filter directives, e.g. `debug` or
    /// `nicplug=debug,info`, also from the environment variable NICPLUG_LOG
    /// [default: info for `run`, warn otherwise].
    #[arg(long, env = "NICPLUG_LOG", global = true, value_name = "FILTER")]
    log_level: Option<String>,
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
    /// Show the running agent: what it follows, whether it is ready, and
    /// every interface (exit 3 when the agent is not ready).
    Status(StatusArgs),
    /// Show what `run` would do now, changing nothing (exit 0 when
    /// converged, 2 when there are steps to take or an interface fails).
    Plan(Box<PlanArgs>),
    /// Print a shell completion script.
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Print the man page (roff).
    Man,
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

/// Where the spec comes from, shared by `run` and `plan`.
#[derive(clap::Args)]
#[command(group(clap::ArgGroup::new("spec_source").required(true).args(["vmi", "kube"])))]
struct SpecArgs {
    /// VirtualMachineInstance document (`kubectl get vmi NAME -o json|yaml`), watched.
    #[arg(long, conflicts_with = "kube")]
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
    /// libvirt URI [default: KubeVirt's non-root socket if present, else qemu:///system].
    #[arg(long)]
    libvirt_uri: Option<String>,
    /// libvirt domain [default: <namespace>_<name> of the VMI].
    #[arg(long)]
    domain: Option<String>,
    /// UID:GID owning the taps [default: the user the domain's QEMU runs as].
    #[arg(long)]
    tap_owner: Option<Owner>,
    /// With --kube: turn off coexistence with KubeVirt's own hotplug (on by default).
    #[arg(long, requires = "kube")]
    no_coexist: bool,
    /// A network binding plugin as KubeVirt's CR names it, and the kind it is
    /// hot-plugged as (kinds: macvtap, passt); repeatable, added to
    /// macvtap=macvtap and passt=passt.
    #[arg(long = "binding-plugin", value_name = "NAME=KIND", value_parser = parse_plugin_mapping)]
    binding_plugins: Vec<(String, PluginKind)>,
}

impl SpecArgs {
    fn binding_plugins(&self) -> BindingPlugins {
        let mut plugins = BindingPlugins::default();
        for (name, kind) in &self.binding_plugins {
            plugins.insert(name, *kind);
        }
        plugins
    }
}

#[derive(clap::Args)]
struct RunArgs {
    #[command(flatten)]
    spec: SpecArgs,
    /// With --kube: read Multus network-status from this pod's annotation in the API.
    #[arg(long, requires = "kube", conflicts_with = "network_status")]
    kube_network_status: bool,
    /// Multus network-status: the raw JSON array or a downward-API annotations file, watched.
    #[arg(long)]
    network_status: Option<PathBuf>,
    /// Where to write the status document (JSON, replaced atomically).
    #[arg(long)]
    status_file: Option<PathBuf>,
    /// How long to wait for DEVICE_ADDED after an attach (`10s`, `500ms`;
    /// a bare number is seconds).
    #[arg(long, default_value = "10s", value_parser = positive_duration)]
    attach_timeout: Duration,
    /// How long to wait for the guest to release a device after a detach.
    #[arg(long, default_value = "30s", value_parser = positive_duration)]
    detach_timeout: Duration,
    /// Time between reconciles without any trigger.
    #[arg(long, default_value = "30s", value_parser = positive_duration)]
    resync: Duration,
    /// Time between guest-agent refreshes when nothing else prompts one.
    #[arg(long, default_value = "30s", value_parser = positive_duration)]
    guest_refresh: Duration,
    /// The resolv.conf whose name servers and search domains the VM gets by
    /// DHCP (the pod's own, as KubeVirt's bridge binding does).
    #[arg(long, default_value = "/etc/resolv.conf")]
    resolv_conf: PathBuf,
    /// Serve no DHCPv4 to the VM (on an IPAM network the guest then has to
    /// be configured some other way).
    #[arg(long)]
    no_dhcp: bool,
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
    /// Print again on every change the agent publishes (until interrupted).
    #[arg(short, long)]
    watch: bool,
}

#[derive(clap::Args)]
struct PlanArgs {
    #[command(flatten)]
    spec: SpecArgs,
    /// Output format.
    #[arg(short = 'o', long = "output", value_enum, default_value_t = PlanOutput::Table)]
    output: PlanOutput,
}

#[derive(Clone, Copy, ValueEnum)]
enum Output {
    Table,
    Json,
    Yaml,
}

#[derive(Clone, Copy, ValueEnum)]
enum PlanOutput {
    Table,
    Json,
}

/// A duration with a unit (`10s`, `500ms`, `2m`) or a bare number of
/// seconds; zero is refused (every duration nicplug takes is a timeout or
/// an interval).
fn positive_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let duration = match text.parse::<f64>() {
        Ok(seconds) => Duration::try_from_secs_f64(seconds)
            .map_err(|_| format!("{text:?} is not a number of seconds"))?,
        Err(_) => humantime::parse_duration(text)
            .map_err(|e| format!("{text:?} is not a duration such as 10s or 500ms: {e}"))?,
    };
    if duration.is_zero() {
        return Err("must be more than zero".into());
    }
    Ok(duration)
}

/// Exit codes besides 0 and 1.
const EXIT_USAGE_OR_STEPS: u8 = 2;
const EXIT_NOT_READY: u8 = 3;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let default_level = if matches!(cli.command, Command::Run(_)) {
        "info"
    } else {
        "warn"
    };
    if let Err(e) = init_logging(
        cli.log_format,
        cli.log_level.as_deref().unwrap_or(default_level),
    ) {
        eprintln!("nicplug: --log-level: {e}");
        return ExitCode::from(EXIT_USAGE_OR_STEPS);
    }
    match cli.command {
        Command::Completions { shell } => {
            let mut cmd = Cli::command();
            clap_complete::generate(shell, &mut cmd, "nicplug", &mut std::io::stdout());
            ExitCode::SUCCESS
        }
        Command::Man => {
            match clap_mangen::Man::new(Cli::command()).render(&mut std::io::stdout()) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("nicplug man: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Run(args) => with_runtime(|runtime| run_command(runtime, *args)),
        Command::Probe(args) => with_runtime(|runtime| probe_command(runtime, &args)),
        Command::Status(args) => with_runtime(|runtime| status_cmd(runtime, &args)),
        Command::Plan(args) => with_runtime(|runtime| plan_command(runtime, &args)),
    }
}

/// Runs `command` on the runtime every command but completions and man needs.
/// One thread runs the loop and its triggers: a netlink event wakes the
/// reconcile without a hand-off between threads; libvirt calls run on
/// their own worker threads, libvirt's events on theirs.
fn with_runtime(command: impl FnOnce(&tokio::runtime::Runtime) -> ExitCode) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            error!(error = %e, "cannot start the runtime");
            return ExitCode::FAILURE;
        }
    };
    let code = command(&runtime);
    // Whatever still runs on the blocking pool is not waited for.
    runtime.shutdown_timeout(Duration::from_millis(500));
    code
}

fn run_command(runtime: &tokio::runtime::Runtime, args: RunArgs) -> ExitCode {
    abort_on_panic();
    match runtime.block_on(run(args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            error!(error = %format!("{e:#}"), "nicplug failed");
            ExitCode::FAILURE
        }
    }
}

fn probe_command(runtime: &tokio::runtime::Runtime, args: &ProbeArgs) -> ExitCode {
    let path = match args.endpoint {
        Endpoint::Healthz => "/healthz",
        Endpoint::Readyz => "/readyz",
    };
    match runtime.block_on(nicplug::api::client::fetch(&args.socket, path)) {
        Ok((200, body)) => {
            print!("{body}");
            ExitCode::SUCCESS
        }
        Ok((code, body)) => {
            eprint!("nicplug probe: {path}: {code} {body}");
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("nicplug probe: {path}: {}", error_chain(&e));
            ExitCode::FAILURE
        }
    }
}

fn status_cmd(runtime: &tokio::runtime::Runtime, args: &StatusArgs) -> ExitCode {
    let format = match args.output {
        Output::Table => Format::Table,
        Output::Json => Format::Json,
        Output::Yaml => Format::Yaml,
    };
    let result = if args.watch {
        runtime.block_on(watch(&args.socket, format))
    } else {
        runtime
            .block_on(nicplug::api::client::status_command(&args.socket, format))
            .map(|printed| {
                print!("{}", printed.text);
                printed.ready
            })
    };
    match result {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(EXIT_NOT_READY),
        Err(e) => {
            eprintln!("nicplug status: {}", error_chain(&e));
            ExitCode::FAILURE
        }
    }
}

fn plan_command(runtime: &tokio::runtime::Runtime, args: &PlanArgs) -> ExitCode {
    let report = match runtime.block_on(plan(&args.spec)) {
        Ok(report) => report,
        Err(e) => {
            eprintln!("nicplug plan: {e:#}");
            return ExitCode::FAILURE;
        }
    };
    if matches!(args.output, PlanOutput::Json) {
        match serde_json::to_string_pretty(&report) {
            Ok(text) => println!("{text}"),
            Err(e) => {
                eprintln!("nicplug plan: {e}");
                return ExitCode::FAILURE;
            }
        }
    } else {
        print!("{}", report.render());
    }
    if report.converged {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(EXIT_USAGE_OR_STEPS)
    }
}

/// `status --watch`: redraws on every change (clearing the screen when
/// stdout is a terminal; otherwise documents follow each other). Ends when
/// the agent goes away; the exit code is the last document's readiness.
async fn watch(socket: &std::path::Path, format: Format) -> Result<bool, ClientError> {
    use std::io::{IsTerminal, Write};
    let terminal = std::io::stdout().is_terminal();
    let mut ready = false;
    let result = nicplug::api::client::watch_status(socket, format, |printed| {
        ready = printed.ready;
        let mut out = std::io::stdout().lock();
        let separator = match (terminal, format) {
            (true, _) => "\x1b[H\x1b[2J",
            (false, Format::Yaml) => "---\n",
            (false, _) => "\n",
        };
        let _ = write!(out, "{separator}{}", printed.text);
        let _ = out.flush();
    });
    tokio::select! {
        r = result => r.map(|()| ready),
        _ = wait_for_signal() => Ok(ready),
    }
}

/// `nicplug plan`: the spec, then one observation and plan exactly as a
/// pass of `run` makes them.
async fn plan(args: &SpecArgs) -> anyhow::Result<PlanReport> {
    let uri = args.libvirt_uri.clone().unwrap_or_else(default_uri);
    check_uri(&uri).map_err(|reason| anyhow::anyhow!("--libvirt-uri {uri}: {reason}"))?;
    let vmi = read_spec_once(args).await?;
    let net = Netlink::new().context("cannot open rtnetlink")?;
    let (events_tx, _events) = broadcast::channel(16);
    let hyp = Libvirt::new(&uri, events_tx);
    let config = AgentConfig {
        tap_owner: args.tap_owner,
        domain: args.domain.clone(),
        coexist: args.kube && !args.no_coexist,
        binding_plugins: args.binding_plugins(),
        ..AgentConfig::default()
    };
    let (observation, plans) = observe_and_plan(&net, &hyp, &vmi, &config)
        .await
        .map_err(|e| anyhow::anyhow!(error_chain(&e)))?;
    let domain = args.domain.clone().unwrap_or_else(|| vmi.domain_name());
    Ok(PlanReport::new(&vmi, &domain, &observation, &plans))
}

/// The spec as `run` would read it first: the file, or the VMI from the API.
async fn read_spec_once(args: &SpecArgs) -> anyhow::Result<nicplug::model::vmi::Vmi> {
    if let Some(path) = &args.vmi {
        let text = nicplug::sources::watched::read_bounded(
            "VMI",
            path,
            nicplug::sources::vmi_file::MAX_FILE_BYTES,
        )
        .map_err(|e| anyhow::anyhow!(error_chain(&e)))?;
        return nicplug::model::vmi::Vmi::parse(&text)
            .map_err(|e| anyhow::anyhow!("VMI {}: {}", path.display(), error_chain(&e)));
    }
    let kube = connect_kube(args).await?;
    let (tx, mut rx) = watch::channel(None);
    let stop = CancellationToken::new();
    let (namespace, name) = (kube.namespace.clone(), kube.vmi.clone());
    let watcher =
        nicplug::k8s::vmi_source::watch_vmi(kube.client, &namespace, &name, tx, stop.clone());
    let first = async {
        rx.wait_for(Option::is_some)
            .await
            .ok()
            .and_then(|v| v.clone())
    };
    let vmi = tokio::select! {
        vmi = first => vmi,
        r = watcher => {
            r.map_err(|e| anyhow::anyhow!(error_chain(&e)))?;
            None
        }
        _ = tokio::time::sleep(Duration::from_secs(20)) => None,
    };
    stop.cancel();
    vmi.with_context(|| {
        format!("no valid VMI {namespace}/{name} from the Kubernetes API within 20s")
    })
}

async fn connect_kube(args: &SpecArgs) -> anyhow::Result<Kube> {
    Ok(Kube::connect(
        args.vmi_name
            .clone()
            .context("--kube needs the VMI's name (--vmi-name or VMI_NAME)")?,
        args.pod_name
            .clone()
            .context("--kube needs this pod's name (--pod-name or POD_NAME)")?,
        args.namespace.clone(),
    )
    .await?)
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

/// Logs to stderr; colour only when stderr is a terminal and `NO_COLOR`
/// is not set.
fn init_logging(format: LogFormat, level: &str) -> Result<(), String> {
    use std::io::IsTerminal;
    let filter = tracing_subscriber::EnvFilter::try_new(level).map_err(|e| e.to_string())?;
    let ansi = std::io::stderr().is_terminal()
        && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(ansi);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
    Ok(())
}

async fn run(args: RunArgs) -> anyhow::Result<()> {
    // Signals first: a stop at any moment, the start included, exits 0.
    let shutdown = CancellationToken::new();
    let mut tasks = tokio::task::JoinSet::new();
    tasks.spawn(stop_on_signal(shutdown.clone()));

    // Mistakes no retry can fix fail the start, with the reason.
    let uri = args.spec.libvirt_uri.clone().unwrap_or_else(default_uri);
    check_uri(&uri).map_err(|reason| anyhow::anyhow!("--libvirt-uri {uri}: {reason}"))?;
    if let Some(path) = &args.spec.vmi {
        // Later a missing file keeps the last good spec; at the start there
        // is none to keep.
        std::fs::metadata(path).with_context(|| format!("--vmi {}", path.display()))?;
    }

    let started = tokio::select! {
        started = start(&args, &uri, &mut tasks, &shutdown) => started?,
        _ = shutdown.cancelled() => {
            info!("stopped before the agent ran");
            return Ok(());
        }
    };
    let Started {
        agent,
        spec,
        wake,
        api_task,
        _instance,
    } = started;
    let outcome = agent.run(spec, wake, shutdown.clone()).await;
    shutdown.cancel();
    tasks.abort_all();
    match api_task.await {
        Ok(Err(e)) => error!(error = %error_chain(&e), "API stopped with an error"),
        Err(e) => error!(error = %e, "API task failed"),
        Ok(Ok(())) => {}
    }
    outcome.map_err(|e| anyhow::anyhow!(error_chain(&e)))?;
    info!("stopped");
    Ok(())
}

/// What [`start`] sets up for the loop.
struct Started {
    agent: Agent<Netlink, Libvirt>,
    spec: watch::Receiver<Option<nicplug::model::vmi::Vmi>>,
    wake: Arc<Notify>,
    api_task: tokio::task::JoinHandle<Result<(), nicplug::api::ApiError>>,
    _instance: InstanceLock,
}

/// Everything before the loop: the instance lock, the API, link events,
/// libvirt (lazily), the inputs. Raced against a stop by the caller.
async fn start(
    args: &RunArgs,
    uri: &str,
    tasks: &mut tokio::task::JoinSet<()>,
    shutdown: &CancellationToken,
) -> anyhow::Result<Started> {
    // Before anything is touched: a second agent in the pod would fight
    // this one over every device and link.
    let instance = InstanceLock::acquire()?;
    let wake = Arc::new(Notify::new());

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
    metrics.follow_netlink_overflows(link_events.overflows());
    let net = Netlink::new().context("cannot open rtnetlink")?;
    readiness.set(Part::Netlink, Ok(()));

    // 2. libvirt: connected by the first pass, on its own thread, and again
    // whenever the connection is lost; each pass reports whether it answers.
    let (events_tx, events) = broadcast::channel(256);
    let hyp = Libvirt::new(uri, events_tx);
    info!(%uri, "libvirt");

    // 3. The spec and the CNI results.
    // The agent marks the spec ready when its loop first holds one.
    let inputs = spawn_inputs(args, tasks, status_rx, shutdown).await?;

    let config = AgentConfig {
        attach_timeout: args.attach_timeout,
        detach_timeout: args.detach_timeout,
        resync: args.resync,
        tap_owner: args.spec.tap_owner,
        domain: args.spec.domain.clone(),
        report: ReportConfig {
            outcomes: inputs.outcomes,
            status_file: args.status_file.clone(),
            status_tx: Some(status_tx),
            metrics: Some(metrics),
            network_status: inputs.network_status,
            guest_refresh: args.guest_refresh,
        },
        coexist: inputs.coexist,
        readiness: Some(readiness),
        resolv_conf: Some(args.resolv_conf.clone()),
        dhcp: !args.no_dhcp,
        binding_plugins: args.spec.binding_plugins(),
        ..AgentConfig::default()
    };
    let agent = Agent::new(net, hyp, config);
    tasks.spawn(link_events.run(wake.clone()));
    tasks.spawn(agent.forward_domain_events(events, wake.clone()));
    Ok(Started {
        agent,
        spec: inputs.spec,
        wake,
        api_task,
        _instance: instance,
    })
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
    if args.spec.kube {
        let kube = connect_kube(&args.spec).await?;
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
        inputs.coexist = !args.spec.no_coexist;
    } else if let Some(path) = args.spec.vmi.clone() {
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
