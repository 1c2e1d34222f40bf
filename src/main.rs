//! The `marketgate` command: parses the command line, loads the configuration and hands over
//! to the library. Nothing here decides anything a test would want to check; `anyhow` lives
//! here only.
//!
//! An error ends the command with one line on stderr, `marketgate: error: …` with its causes
//! joined by `: `, and exit status 1; the full chain with a backtrace only on request (`-v`,
//! or `MARKETGATE_BACKTRACE=1`), not because `RUST_BACKTRACE` happens to be set.

use std::path::PathBuf;
use std::process::ExitCode;

use std::io::Write as _;

use anyhow::Context;
use clap::{Parser, Subcommand};
use marketgate::config::{self, Config, LogFormat};
use marketgate::log_writer::LogWriter;
use marketgate::shutdown::{Shutdown, ShutdownTrigger};

/// Environment variable that asks for an error's full chain and backtrace, as `-v` does.
const BACKTRACE_VARIABLE: &str = "MARKETGATE_BACKTRACE";

#[derive(Parser)]
#[command(name = "marketgate", version, about = "API-marketplace gateway", after_help = overview_help())]
struct Cli {
    /// On an error, print its full chain of causes and a backtrace (as MARKETGATE_BACKTRACE=1).
    #[arg(short, long, global = true)]
    verbose: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Control plane and one data plane in one process on the embedded store (try it here).
    #[command(after_long_help = serve_help(), after_help = "Ports, data dir, trial credentials and overrides: --help")]
    Serve {
        /// TOML config (keys: docs/operations.md; example: deploy/config/serve.toml).
        /// Without it: built-in loopback defaults and the trial credentials.
        #[arg(long, value_name = "FILE")]
        config: Option<PathBuf>,
    },
    /// Data plane only: serves buyers from the snapshots the control plane pushes to it.
    #[command(after_long_help = plane_help("proxy"), after_help = "Config, ports and overrides: --help")]
    Proxy {
        /// TOML config (keys: docs/operations.md; example: deploy/config/proxy.toml).
        #[arg(long, value_name = "FILE")]
        config: PathBuf,
    },
    /// Control plane only: market and management API, snapshots and leases for proxies.
    #[command(after_long_help = plane_help("control"), after_help = "Config, ports and overrides: --help")]
    Control {
        /// TOML config (keys: docs/operations.md; example: deploy/config/control.toml).
        #[arg(long, value_name = "FILE")]
        config: PathBuf,
    },
    /// Buyer tool: sign a request with an APP's key and secret and print it as a curl command.
    #[command(after_long_help = buyer_help("sign"))]
    Sign(BuyerArgs),
    /// Buyer tool: sign a request and send it (plain HTTP); exits 1 on a 4xx or 5xx answer.
    #[command(after_long_help = buyer_help("call"))]
    Call(BuyerArgs),
}

#[derive(clap::Args)]
struct BuyerArgs {
    /// The APP's AppKey (the purchase answer's app_key).
    #[arg(long, env = "MARKETGATE_APP_KEY")]
    key: String,
    /// The APP's AppSecret (prefer the environment variable: it stays out of shell history).
    #[arg(long, env = "MARKETGATE_APP_SECRET", hide_env_values = true)]
    secret: String,
    /// HTTP method.
    #[arg(short = 'X', long, default_value = "GET")]
    method: String,
    /// Extra header to send and sign, `Name: value`; repeatable. The group's market domain
    /// goes here as `-H 'Host: weather.market.local'`.
    #[arg(short = 'H', long = "header", value_name = "HEADER")]
    headers: Vec<String>,
    /// Request body.
    #[arg(short = 'd', long)]
    data: Option<String>,
    /// Do not sign the body (`X-Sdk-Content-Sha256: UNSIGNED-PAYLOAD`).
    #[arg(long)]
    unsigned_payload: bool,
    /// Absolute URL of the gateway's buyer listener and the API's path, e.g.
    /// http://127.0.0.1:8080/today (the group's domain goes in a Host header, -H).
    url: String,
}

/// `marketgate --help`: where to start.
fn overview_help() -> String {
    "Start here: `marketgate serve --help` (README.md's quickstart). Config keys and their \
     MARKETGATE_* overrides: docs/operations.md."
        .to_owned()
}

/// `marketgate serve --help`: what a newcomer needs to reach it.
fn serve_help() -> String {
    format!(
        "\
Without --config, serve listens on loopback only:
  buyers (data plane)           {gateway}   gateway.listen   MARKETGATE_GATEWAY__LISTEN
  market + management API       {control}   control.listen   MARKETGATE_CONTROL__LISTEN
  admin (health, metrics)       {admin}   admin.listen     MARKETGATE_ADMIN__LISTEN
and keeps its data in {data_dir} (relative to the current directory: run it from the same
place every time; MARKETGATE_DATA_DIR moves it).

Trial credentials (public: only when no credentials are configured; never on a shared machine):
  the cloud market     X-Auth-Token: {market}
  a seller             X-Auth-Token: {seller} (domain {seller_domain}, project {seller_project}),
                       or AK {ak} / SK {sk} with Huawei's SDK
  the admin listener   Authorization: Bearer {admin_token}

Every config key can be set in the environment as MARKETGATE_SECTION__KEY (top-level keys as
MARKETGATE_KEY, e.g. MARKETGATE_DATA_DIR); an unknown MARKETGATE_* variable is an error. Keys
and defaults: docs/operations.md; an example file: deploy/config/serve.toml. RUST_LOG overrides
[log] level.",
        gateway = config::DEFAULT_GATEWAY_LISTEN,
        control = config::DEFAULT_CONTROL_LISTEN,
        admin = config::DEFAULT_ADMIN_LISTEN,
        data_dir = config::DEFAULT_DATA_DIR,
        market = config::TRIAL_MARKET_TOKEN,
        seller = config::TRIAL_SELLER_TOKEN,
        seller_domain = config::TRIAL_SELLER_DOMAIN,
        seller_project = config::TRIAL_SELLER_PROJECT,
        ak = config::TRIAL_SELLER_AK,
        sk = config::TRIAL_SELLER_SK,
        admin_token = config::TRIAL_ADMIN_TOKEN,
    )
}

/// `marketgate proxy --help` and `marketgate control --help`.
fn plane_help(role: &str) -> String {
    let listeners = match role {
        "proxy" => format!(
            "  buyers                        {}   gateway.listen   MARKETGATE_GATEWAY__LISTEN\n  \
             admin (snapshots, health)     {}   admin.listen     MARKETGATE_ADMIN__LISTEN",
            config::DEFAULT_GATEWAY_LISTEN,
            config::DEFAULT_ADMIN_LISTEN
        ),
        _ => format!(
            "  market + management API       {}   control.listen   MARKETGATE_CONTROL__LISTEN\n  \
             admin (leases, health)        {}   admin.listen     MARKETGATE_ADMIN__LISTEN",
            config::DEFAULT_CONTROL_LISTEN,
            config::DEFAULT_ADMIN_LISTEN
        ),
    };
    format!(
        "\
It listens on (defaults shown; set them in the config file or the environment):
{listeners}
It needs admin tokens and has no trial credentials: [admin] token (MARKETGATE_ADMIN__TOKEN)
is the one-token shorthand, accepted on every plane; [[admin.tokens]] (role = \"operator\" or
\"proxy\") accept several at once for rotation, and a proxy presents [proxy] control_token.
The planes may speak HTTPS to each other ([admin] tls_cert, [proxy] control_ca).
Its data_dir (default {data_dir}, relative to the current directory) must be on local disk
that survives restarts.

Every config key can be set in the environment as MARKETGATE_SECTION__KEY (top-level keys as
MARKETGATE_KEY); an unknown MARKETGATE_* variable is an error. Keys and defaults:
docs/operations.md; an example: deploy/config/{role}.toml; a fleet on one machine: README.md.",
        data_dir = config::DEFAULT_DATA_DIR,
    )
}

/// `marketgate sign --help` and `marketgate call --help`.
fn buyer_help(command: &str) -> String {
    format!(
        "\
Example (README.md's quickstart, with the key and secret of a purchase in the environment):
  export MARKETGATE_APP_KEY=... MARKETGATE_APP_SECRET=...
  marketgate {command} -H 'Host: weather.market.local' http://127.0.0.1:8080/today

The request is signed with Huawei's SDK-HMAC-SHA256 (Authorization, X-Sdk-Date, Host and every
-H header signed)."
    )
}

impl BuyerArgs {
    fn sign(&self) -> anyhow::Result<marketgate::buyer::SignedRequest> {
        let spec = marketgate::buyer::RequestSpec {
            method: self.method.clone(),
            url: self.url.clone(),
            headers: self.headers.clone(),
            body: self.data.clone().unwrap_or_default().into_bytes(),
            unsigned_payload: self.unsigned_payload,
        };
        Ok(marketgate::buyer::sign_request(
            &spec,
            &self.key,
            &self.secret,
            time::OffsetDateTime::now_utc(),
        )?)
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let verbose = cli.verbose || std::env::var_os(BACKTRACE_VARIABLE).is_some_and(|v| v != "0");
    if verbose {
        // anyhow captures a backtrace only when asked through the environment.
        std::env::set_var("RUST_LIB_BACKTRACE", "1");
    } else {
        // RUST_BACKTRACE=1 in a Rust user's shell is not a request for one on every error.
        std::env::set_var("RUST_LIB_BACKTRACE", "0");
    }
    match execute(cli.command) {
        Ok(code) => code,
        Err(err) => {
            if verbose {
                eprintln!("marketgate: error: {err:?}");
            } else {
                eprintln!("marketgate: error: {err:#}");
            }
            ExitCode::FAILURE
        }
    }
}

fn execute(command: Command) -> anyhow::Result<ExitCode> {
    match command {
        Command::Serve { config } => {
            let config = match config {
                Some(path) => Config::load(&path)?,
                None => Config::builtin()?,
            };
            run(config, marketgate::serve::run_serve)
        }
        Command::Proxy { config } => {
            let config = Config::load(&config)?;
            config.require_proxy_tokens()?;
            run(config, marketgate::gateway::run_proxy)
        }
        Command::Control { config } => {
            let config = Config::load(&config)?;
            config.require_control_tokens()?;
            run(config, marketgate::control::run_control)
        }
        Command::Sign(args) => {
            let curl = marketgate::buyer::to_curl(&args.sign()?);
            print_quietly(|out| writeln!(out, "{curl}"))?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Call(args) => {
            let request = args.sign()?;
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .context("starting the runtime")?;
            let response = runtime.block_on(marketgate::buyer::send(request))?;
            print_quietly(|out| {
                writeln!(out, "{:?} {}", http::Version::HTTP_11, response.status)?;
                for (name, value) in &response.headers {
                    writeln!(out, "{}: {}", name, value.to_str().unwrap_or("<binary>"))?;
                }
                writeln!(out)?;
                writeln!(out, "{}", String::from_utf8_lossy(&response.body))
            })?;
            Ok(if response.status.as_u16() >= 400 {
                ExitCode::FAILURE
            } else {
                ExitCode::SUCCESS
            })
        }
    }
}

/// Writes to stdout; a reader that went away (`marketgate call … | head -1`) is not an error.
fn print_quietly(
    write: impl FnOnce(&mut std::io::StdoutLock<'_>) -> std::io::Result<()>,
) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    match write(&mut out).and_then(|()| out.flush()) {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => {
            Err(anyhow::Error::new(e).context("writing to standard output"))
        }
        _ => Ok(()),
    }
}

type RunResult = Result<(), Box<dyn std::error::Error + Send + Sync>>;

/// Sets up logging and a runtime, wires SIGTERM/Ctrl-C to a [`Shutdown`], runs `role`.
fn run<F, Fut>(config: Config, role: F) -> anyhow::Result<ExitCode>
where
    F: FnOnce(Config, Shutdown) -> Fut,
    Fut: std::future::Future<Output = RunResult>,
{
    // Written out when `run` returns, however it returns: the access lines still buffered.
    let _log = marketgate::log_writer::FlushOnDrop(init_logging(&config));
    if config.trial_credentials {
        tracing::warn!(
            "running on built-in trial credentials (see README): for a local trial only, never on a shared machine"
        );
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the runtime")?;
    runtime.block_on(async move {
        let (trigger, shutdown) = ShutdownTrigger::new();
        tokio::spawn(async move {
            wait_for_signal().await;
            tracing::info!("shutdown requested: draining");
            trigger.fire();
        });
        role(config, shutdown).await.map_err(|e| anyhow::anyhow!(e))
    })?;
    Ok(ExitCode::SUCCESS)
}

async fn wait_for_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("installing a SIGTERM handler");
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}

/// Logs to standard output, the access log's lines buffered (`marketgate::log_writer`).
fn init_logging(config: &Config) -> LogWriter {
    use std::io::IsTerminal;
    use tracing_subscriber::EnvFilter;
    let (filter, directives) = match EnvFilter::try_from_default_env() {
        Ok(filter) => (filter, std::env::var("RUST_LOG").unwrap_or_default()),
        Err(_) => (EnvFilter::new(&config.log.level), config.log.level.clone()),
    };
    let ansi = std::io::stdout().is_terminal();
    let writer = LogWriter::stdout();
    // The access log's lines may skip the fmt layer (the same bytes) where nothing but their
    // target and level decides whether they are written: no span or field directives.
    if matches!(config.log.format, LogFormat::Text) && !ansi && !directives.contains('[') {
        writer.offer_direct_text();
    }
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(writer.clone())
        .fmt_fields(marketgate::log_writer::LogFields)
        .with_ansi(ansi);
    match config.log.format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.init(),
    }
    writer
}
