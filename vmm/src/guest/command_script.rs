//! The script `vmbuild run` hands the guest's init: sets the environment exactly, changes
//! directory, runs the command with its output on the guest's second and third serial
//! ports (host stdout and stderr), and marks the phases on the console for `--timings`.

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;

use crate::guest::console::{phase, phase_line};

/// Exit status the script uses when it cannot even start the command (bad directory).
pub const SETUP_FAILED: i32 = 125;
/// The command is not in the guest (as a shell says it).
pub const NOT_FOUND: i32 = 127;

pub struct GuestCommand<'a> {
    pub argv: &'a [std::ffi::OsString],
    pub env: &'a [(String, Vec<u8>)],
    pub cwd: Option<&'a str>,
    /// Where the command's output goes and the markers are printed.
    pub io: CommandIo,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CommandIo {
    /// `vmbuild run`: output on ttyS1/ttyS2, markers on the script's stdout (the console).
    SerialPorts,
    /// A session (SSH in the snapshot lifecycle): output is the script's own stdout and
    /// stderr, markers go to file descriptor 3 (which the caller opens on the console).
    Session,
}

/// Single-quotes any bytes for a POSIX shell: `'` becomes `'\''`; newlines, spaces, `$`
/// and non-ASCII bytes need nothing inside single quotes.
pub fn shell_quote(bytes: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(bytes.len() + 2);
    out.push(b'\'');
    for &b in bytes {
        if b == b'\'' {
            out.extend_from_slice(b"'\\''");
        } else {
            out.push(b);
        }
    }
    out.push(b'\'');
    out
}

/// A valid environment variable name for the guest's shell.
pub fn valid_env_name(name: &str) -> bool {
    let mut chars = name.chars();
    matches!(chars.next(), Some(c) if c == '_' || c.is_ascii_alphabetic())
        && chars.all(|c| c == '_' || c.is_ascii_alphanumeric())
}

impl GuestCommand<'_> {
    pub fn script(&self) -> Vec<u8> {
        let mut s: Vec<u8> = Vec::new();
        // `to_stderr`: where vmbuild's own lines for the user go: the command's stderr.
        let (markers, redirect, to_stderr) = match self.io {
            CommandIo::SerialPorts => ("", " </dev/null >/dev/ttyS1 2>/dev/ttyS2\n", ">/dev/ttyS2"),
            CommandIo::Session => (" >&3", " </dev/null\n", ">&2"),
        };
        s.extend_from_slice(b"# written by vmbuild\n");
        if self.io == CommandIo::SerialPorts {
            // The command's output travels on ttyS1 (stdout) and ttyS2 (stderr); raw mode
            // so the tty does not turn \n into \r\n. Closing them at exit drains them.
            s.extend_from_slice(b"stty -F /dev/ttyS1 raw -echo 2>/dev/null\n");
            s.extend_from_slice(b"stty -F /dev/ttyS2 raw -echo 2>/dev/null\n");
        }
        for (name, value) in self.env {
            s.extend_from_slice(b"export ");
            s.extend_from_slice(name.as_bytes());
            s.push(b'=');
            s.extend(shell_quote(value));
            s.push(b'\n');
        }
        if let Some(dir) = self.cwd {
            s.extend_from_slice(b"cd ");
            s.extend(shell_quote(dir.as_bytes()));
            s.extend_from_slice(
                format!(
                    " || {{ echo \"vmbuild: cannot change to the working directory\" {to_stderr}; exit {SETUP_FAILED}; }}\n"
                )
                .as_bytes(),
            );
        }
        // A program the guest does not have is named as such, not as a line of this
        // script ("/etc/vmbuild/cmd.sh: line 5: cc: not found").
        if let Some(name) = self.argv.first() {
            let name = shell_quote(OsStr::as_bytes(name));
            s.extend_from_slice(b"command -v ");
            s.extend_from_slice(&name);
            s.extend_from_slice(
                b" >/dev/null 2>&1 || { printf 'vmbuild: %s: no such command in the guest\\n' ",
            );
            s.extend_from_slice(&name);
            s.extend_from_slice(format!(" {to_stderr}; exit {NOT_FOUND}; }}\n").as_bytes());
        }
        let start = phase_line(phase::COMMAND_START);
        s.extend_from_slice(format!("echo {start}{markers}\n").as_bytes());
        for (i, arg) in self.argv.iter().enumerate() {
            if i > 0 {
                s.push(b' ');
            }
            s.extend(shell_quote(OsStr::as_bytes(arg)));
        }
        s.extend_from_slice(redirect.as_bytes());
        s.extend_from_slice(b"status=$?\n");
        let end = phase_line(phase::COMMAND_END);
        s.extend_from_slice(format!("echo {end}{markers}\n").as_bytes());
        s.extend_from_slice(b"exit $status\n");
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    /// The script's quoting, checked by a real shell: each value comes back byte for byte.
    #[test]
    fn values_survive_a_real_shell() {
        let values: [&[u8]; 6] = [
            b"plain",
            b"with spaces  and\ttabs",
            b"quotes ' \" and $HOME `date` \\",
            b"new\nlines\n",
            "utf-8: \u{e9}\u{e8} \u{1f600}".as_bytes(),
            b"",
        ];
        for v in values {
            let script = [b"printf %s ".as_slice(), &shell_quote(v)].concat();
            let out = Command::new("sh")
                .arg("-c")
                .arg(std::ffi::OsStr::from_bytes(&script))
                .output()
                .unwrap();
            assert_eq!(out.stdout, v);
        }
    }

    #[test]
    fn env_names_are_checked() {
        assert!(valid_env_name("PATH"));
        assert!(valid_env_name("_x1"));
        assert!(!valid_env_name("1x"));
        assert!(!valid_env_name("A-B"));
        assert!(!valid_env_name(""));
        assert!(!valid_env_name("A=B"));
    }
}
