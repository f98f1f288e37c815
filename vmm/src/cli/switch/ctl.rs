//! `vmbuild switch ctl SOCKET COMMAND...`: one command to a running switch's console.

use std::path::Path;

use vswitch::mgmt;

use crate::exit;

pub const PREFIX: &str = "vmbuild switch ctl";

pub const AFTER_HELP: &str = "\
Commands: help, showinfo, port/print [ID], port/add tap|vhost-user|stream WHERE [MODE],
port/remove ID, port/setvlan ID MODE, hash/print, vlan/print, stats (`help` explains them).

--json (or `json` before the command) answers with one line of JSON on stdout, errors
included ({\"error\": ...}); without it answers go to stdout and errors to stderr.

Exit status:
  0  ok
  1  the switch refused the command
  2  cannot reach the switch, or bad command line

Environment: RUST_LOG (log filter).";

/// Sends `command` and prints the answer; returns the exit status.
pub fn ctl(socket: &Path, command: &str) -> i32 {
    match mgmt::ctl(socket, command) {
        Ok(answer) => {
            if let Some(rest) = answer.strip_prefix("error: ") {
                eprint!("{PREFIX}: {rest}");
                exit::FAILURE
            } else {
                print!("{answer}");
                if answer.starts_with("{\"error\"") {
                    exit::FAILURE
                } else {
                    exit::SUCCESS
                }
            }
        }
        Err(e) => {
            eprintln!("{PREFIX}: cannot reach {}: {e}", socket.display());
            exit::USAGE
        }
    }
}
