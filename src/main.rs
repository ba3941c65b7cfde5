//! The `courier` command: `serve`, `migrate`, `config`.

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use courier::Config;

#[derive(Parser)]
#[command(
    name = "courier",
    version,
    about = "Realtime message broker for end-to-end encrypted messengers"
)]
struct Cli {
    /// TOML configuration file; every key can be overridden by a COURIER_* variable.
    #[arg(long, short, global = true, env = "COURIER_CONFIG")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Run the broker (the default).
    Serve,
    /// Apply pending database migrations and exit.
    Migrate,
    /// Print the effective configuration, secrets masked.
    Config,
    /// Sealed-sender certificates.
    #[command(subcommand)]
    Certificates(CertificatesCommand),
}

#[derive(Subcommand)]
enum CertificatesCommand {
    /// Make a trust root and a server key with its certificate in DIR.
    /// Keep trust-root.key offline; every node needs trust-root.pub,
    /// server.key and server.crt (COURIER_CERTIFICATES_DIR).
    Generate {
        /// Where to write the set; it must not hold one already.
        #[arg(long)]
        out: PathBuf,
        /// The server certificate's key id.
        #[arg(long, default_value_t = courier::service::certificates::DEFAULT_KEY_ID)]
        key_id: u32,
    },
}

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    let cli = Cli::parse();
    let env: Vec<(String, String)> = courier::config::process_env()
        .into_iter()
        .filter(|(k, _)| k != "COURIER_CONFIG")
        .collect();
    let config = match Config::load(cli.config.as_deref(), env) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("courier: {e}");
            return ExitCode::from(78); // EX_CONFIG
        }
    };
    match cli.command.unwrap_or(Command::Serve) {
        Command::Config => {
            print!("{}", config.to_masked_toml());
            ExitCode::SUCCESS
        }
        Command::Migrate => match courier::app::migrate(&config) {
            Ok((_, ran)) => {
                println!("applied {ran} migrations");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("courier: {e}");
                ExitCode::FAILURE
            }
        },
        Command::Serve => serve(config),
        Command::Certificates(CertificatesCommand::Generate { out, key_id }) => {
            match courier::service::certificates::generate(&out, key_id) {
                Ok(root) => {
                    println!("trust root public key: {root}");
                    println!(
                        "keep {} offline; give the server the rest of {}",
                        out.join("trust-root.key").display(),
                        out.display()
                    );
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("courier: {e}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}

fn serve(config: Config) -> ExitCode {
    let listener = match listen(&config.bind) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("courier: cannot listen on {}: {e}", config.bind);
            return ExitCode::FAILURE;
        }
    };
    match listener.local_addr() {
        Ok(addr) => log::info!("listening on {addr}"),
        Err(_) => log::info!("listening on {}", config.bind),
    }
    let result =
        actix_web::rt::System::new().block_on(courier::run(config, listener, shutdown_signal()));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e @ courier::app::RunError::Config(_)) => {
            eprintln!("courier: {e}");
            ExitCode::from(78) // EX_CONFIG
        }
        Err(e) => {
            eprintln!("courier: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Pending connections the kernel queues before `accept` (std's `bind`
/// uses 128, which a reconnect storm overflows).
const LISTEN_BACKLOG: i32 = 4096;

fn listen(bind: &str) -> std::io::Result<TcpListener> {
    use socket2::{Domain, Socket, Type};
    let addr: std::net::SocketAddr = std::net::ToSocketAddrs::to_socket_addrs(bind)?
        .next()
        .ok_or_else(|| std::io::Error::other("bind address resolves to nothing"))?;
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
    socket.set_reuse_address(true)?;
    socket.bind(&addr.into())?;
    socket.listen(LISTEN_BACKLOG)?;
    Ok(socket.into())
}

/// Resolves on SIGTERM or SIGINT.
async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        log::error!("cannot install signal handlers; stop with SIGKILL");
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => log::info!("SIGTERM received"),
        _ = int.recv() => log::info!("SIGINT received"),
    }
}
