//! What the workflow subcommands share: SIGINT/SIGTERM as messages on a channel for their
//! wait loops, and `--timings` output.

use std::sync::mpsc::{self, Receiver};

use crate::signals::TermSignals;

/// Blocks SIGINT/SIGTERM in this thread (call before any other thread exists, so that
/// every thread inherits the mask) and delivers them on the returned channel.
pub fn signal_channel() -> anyhow::Result<Receiver<()>> {
    let signals = TermSignals::block()?;
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        while signals.wait().is_ok() {
            if tx.send(()).is_err() {
                break;
            }
        }
    });
    Ok(rx)
}

/// `--timings FILE` checked before anything starts: FILE can be written (it is created
/// now, empty), so that a bad path is a usage error, not a failure after the whole run.
pub fn check_timings_dest(dest: Option<&std::path::Path>) -> Result<(), String> {
    match dest {
        Some(d) if d.as_os_str() != "-" => std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(d)
            .map(drop)
            .map_err(|e| format!("--timings {}: {e}", d.display())),
        _ => Ok(()),
    }
}

/// `--timings[=FILE]`: one line of JSON on stderr (`-`) or in FILE, seconds to the
/// microsecond (`1.741733`, not `1.7417334009999998`).
pub fn write_timings(
    dest: &std::path::Path,
    timings: &impl serde::Serialize,
) -> anyhow::Result<()> {
    let mut value = serde_json::to_value(timings)?;
    round_to_microseconds(&mut value);
    let json = serde_json::to_string(&value)?;
    if dest.as_os_str() == "-" {
        eprintln!("{json}");
    } else {
        std::fs::write(dest, format!("{json}\n"))?;
    }
    Ok(())
}

fn round_to_microseconds(value: &mut serde_json::Value) {
    use serde_json::Value;
    match value {
        Value::Number(n) if n.is_f64() => {
            let rounded = (n.as_f64().unwrap_or(0.0) * 1e6).round() / 1e6;
            if let Some(r) = serde_json::Number::from_f64(rounded) {
                *n = r;
            }
        }
        Value::Object(map) => map.values_mut().for_each(round_to_microseconds),
        Value::Array(items) => items.iter_mut().for_each(round_to_microseconds),
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn timings_are_rounded_to_microseconds() {
        let mut v = serde_json::json!({"total": 1.7417334009999998, "n": 3, "x": null});
        super::round_to_microseconds(&mut v);
        assert_eq!(v.to_string(), r#"{"n":3,"total":1.741733,"x":null}"#);
    }
}
