//! `vmbuild`: runs builds and tests inside virtual machines, from one process.

use vmbuild::{cli, exit};

use clap::Parser;

fn main() {
    let cli = cli::Cli::parse();
    vmbuild::logging::init();
    vmbuild::fd_limit::raise();
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
