//! The `marketgate` command: parses the command line, loads the configuration and hands over
//! to the library. Nothing here decides anything a test would want to check; `anyhow` lives
//! here only.

use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};
use marketgate::config::{Config, LogFormat};
use marketgate::shutdown::{Shutdown, ShutdownTrigger};

#[derive(Parser)]
#[command(name = "marketgate", version, about = "API-marketplace gateway")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Control plane and one data plane in one process on the embedded store.
    Serve {
        /// TOML config; built-in loopback defaults when omitted.
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// Data plane only: takes snapshots pushed to its admin listener.
    Proxy {
        #[arg(long)]
        config: PathBuf,
    },
    /// Control plane only: market and management API, pushes to proxies.
    Control {
        #[arg(long)]
        config: PathBuf,
    },
    /// Buyer tool: sign a request with an APP's key and secret and print it as curl.
    Sign(BuyerArgs),
    /// Buyer tool: sign a request and send it (plain HTTP); exits 1 on a 4xx or 5xx answer.
    Call(BuyerArgs),
}

#[derive(clap::Args)]
struct BuyerArgs {
    /// The APP's AppKey.
    #[arg(long, env = "MARKETGATE_APP_KEY")]
    key: String,
    /// The APP's AppSecret (prefer the environment variable: it stays out of shell history).
    #[arg(long, env = "MARKETGATE_APP_SECRET", hide_env_values = true)]
    secret: String,
    /// HTTP method.
    #[arg(short = 'X', long, default_value = "GET")]
    method: String,
    /// Extra header to send and sign, `Name: value`; repeatable.
    #[arg(short = 'H', long = "header")]
    headers: Vec<String>,
    /// Request body.
    #[arg(short = 'd', long)]
    data: Option<String>,
    /// Do not sign the body (`X-Sdk-Content-Sha256: UNSIGNED-PAYLOAD`).
    #[arg(long)]
    unsigned_payload: bool,
    /// Absolute URL, e.g. http://127.0.0.1:8080/v1/hello with the group's domain in --host.
    url: String,
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

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Serve { config } => {
            let config = match config {
                Some(path) => Config::load(&path)?,
                None => Config::builtin()?,
            };
            run(config, marketgate::serve::run_serve)
        }
        Command::Proxy { config } => {
            let config = Config::load(&config)?;
            config.require_admin_token()?;
            run(config, marketgate::gateway::run_proxy)
        }
        Command::Control { config } => {
            let config = Config::load(&config)?;
            config.require_admin_token()?;
            run(config, marketgate::control::run_control)
        }
        Command::Sign(args) => {
            println!("{}", marketgate::buyer::to_curl(&args.sign()?));
            Ok(())
        }
        Command::Call(args) => {
            let request = args.sign()?;
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .context("starting the runtime")?;
            let response = runtime.block_on(marketgate::buyer::send(request))?;
            println!("{:?} {}", http::Version::HTTP_11, response.status);
            for (name, value) in &response.headers {
                println!("{}: {}", name, value.to_str().unwrap_or("<binary>"));
            }
            println!();
            println!("{}", String::from_utf8_lossy(&response.body));
            if response.status.as_u16() >= 400 {
                std::process::exit(1);
            }
            Ok(())
        }
    }
}

type RunResult = Result<(), Box<dyn std::error::Error + Send + Sync>>;

/// Sets up logging and a runtime, wires SIGTERM/Ctrl-C to a [`Shutdown`], runs `role`.
fn run<F, Fut>(config: Config, role: F) -> anyhow::Result<()>
where
    F: FnOnce(Config, Shutdown) -> Fut,
    Fut: std::future::Future<Output = RunResult>,
{
    init_logging(&config);
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
    })
}

async fn wait_for_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("installing a SIGTERM handler");
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}

fn init_logging(config: &Config) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(&config.log.level));
    use std::io::IsTerminal;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stdout().is_terminal());
    match config.log.format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.init(),
    }
}
