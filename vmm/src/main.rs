//! `vmbuild`: runs builds and tests inside virtual machines, from one process.

use vmbuild::{cli, exit};

use clap::Parser;

fn main() {
    let cli = cli::Cli::parse();
    init_logging();
    let code = match cli.run() {
        Ok(code) => code,
        Err(e) => {
            eprintln!("vmbuild: {e:#}");
            exit::FAILURE
        }
    };
    std::process::exit(code);
}

/// `RUST_LOG`-style filtering. Unless told otherwise: vmbuild's own notices, and only
/// warnings from the libraries (the FUSE layer logs every INIT at info).
fn init_logging() {
    use tracing_subscriber::EnvFilter;
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("warn,vmbuild=info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
}
