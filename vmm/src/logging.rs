//! Logging: `RUST_LOG`-style filtering through `tracing`, colours only on a terminal, and
//! a filter a subcommand may replace once its own flags are read (`fs serve --log-level`,
//! virtiofsd's spelling).

use std::io::IsTerminal;
use std::sync::OnceLock;

use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{reload, EnvFilter, Registry};

static FILTER: OnceLock<reload::Handle<EnvFilter, Registry>> = OnceLock::new();

/// Unless `RUST_LOG` says otherwise: vmbuild's own notices, and only warnings from the
/// libraries (the FUSE layer logs every INIT at info). Colours only on a terminal, and
/// never with `NO_COLOR` set (no-color.org).
pub fn init() {
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("warn,vmbuild=info"));
    let (filter, handle) = reload::Layer::new(filter);
    let colour = std::io::stderr().is_terminal()
        && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty());
    let fmt = tracing_subscriber::fmt::layer()
        .with_ansi(colour)
        .with_writer(std::io::stderr);
    if tracing_subscriber::registry()
        .with(filter)
        .with(fmt)
        .try_init()
        .is_ok()
    {
        let _ = FILTER.set(handle);
    }
}

/// Replaces the filter (`RUST_LOG` syntax) for the rest of the process.
pub fn set_filter(filter: &str) -> Result<(), String> {
    let parsed = EnvFilter::try_new(filter).map_err(|e| format!("log filter '{filter}': {e}"))?;
    match FILTER.get() {
        Some(handle) => handle
            .reload(parsed)
            .map_err(|e| format!("setting the log filter: {e}")),
        // No subscriber of ours (a library caller): nothing to filter.
        None => Ok(()),
    }
}
