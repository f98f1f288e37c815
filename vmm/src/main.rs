//! `vmbuild`: runs builds and tests inside virtual machines, from one process.

use vmbuild::{cli, exit};

use clap::Parser;

fn main() {
    let cli = cli::Cli::parse();
    init_logging();
    let prefix = cli.prefix();
    let code = match cli.run() {
        Ok(code) => code,
        Err(e) => {
            eprintln!("{prefix}: {e:#}");
            exit::FAILURE
        }
    };
    std::process::exit(code);
}

/// `RUST_LOG`-style filtering. Unless told otherwise: vmbuild's own notices, and only
/// warnings from the libraries (the FUSE layer logs every INIT at info). Colours only on
/// a terminal, and never with `NO_COLOR` set (no-color.org).
fn init_logging() {
    use std::io::IsTerminal;
    use tracing_subscriber::EnvFilter;
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("warn,vmbuild=info"));
    let colour = std::io::stderr().is_terminal()
        && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty());
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(colour)
        .with_writer(std::io::stderr)
        .init();
}
