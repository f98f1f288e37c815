//! Socket paths named on the command line (`fs serve`, `switch`), checked before anything
//! starts. The servers underneath replace whatever is at their path when they bind, so
//! these checks are what keeps a mistyped path from deleting a file, and a second server
//! from silently taking a live server's socket (vde_switch refuses that too):
//!
//! * nothing there: free;
//! * a socket nobody answers on (left by a server that died): stale, removed;
//! * a socket something answers on: in use, refused;
//! * anything else (a file, a directory): refused, untouched;
//! * the same path twice on one command line: refused.

use std::io::ErrorKind;
use std::os::unix::fs::FileTypeExt;
use std::path::Path;

/// Checks `paths` as above and removes the stale sockets among them. The error names
/// the path and what is wrong with it, for an exit-2 line.
pub fn claim(paths: &[&Path]) -> Result<(), String> {
    for (i, path) in paths.iter().enumerate() {
        if paths[..i].contains(path) {
            return Err(format!(
                "{} is given twice: each socket needs a path of its own",
                path.display()
            ));
        }
    }
    for path in paths {
        let meta = match std::fs::symlink_metadata(path) {
            Ok(m) => m,
            Err(e) if e.kind() == ErrorKind::NotFound => continue,
            Err(e) => return Err(format!("{}: {e}", path.display())),
        };
        if meta.is_dir() {
            return Err(format!(
                "{} is a directory: name the socket file to create (e.g. {})",
                path.display(),
                path.join("fs.sock").display()
            ));
        }
        if !meta.file_type().is_socket() {
            return Err(format!(
                "{} exists and is not a socket: vmbuild will not replace it (choose another path)",
                path.display()
            ));
        }
        match std::os::unix::net::UnixStream::connect(path) {
            Ok(_) => {
                return Err(format!(
                "{} is in use: a running server answers on it (stop it, or choose another path)",
                path.display()
            ))
            }
            Err(e) if e.kind() == ErrorKind::ConnectionRefused => {
                std::fs::remove_file(path)
                    .map_err(|e| format!("removing the stale socket {}: {e}", path.display()))?;
            }
            Err(e) => return Err(format!("{}: {e}", path.display())),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::claim;

    #[test]
    fn files_live_sockets_and_repeats_are_refused_stale_sockets_removed() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("file");
        std::fs::write(&file, "keep me").unwrap();
        assert!(claim(&[&file]).unwrap_err().contains("not a socket"));
        assert_eq!(std::fs::read_to_string(&file).unwrap(), "keep me");

        let live = dir.path().join("live.sock");
        let _listener = std::os::unix::net::UnixListener::bind(&live).unwrap();
        assert!(claim(&[&live]).unwrap_err().contains("in use"));
        assert!(live.exists());

        let stale = dir.path().join("stale.sock");
        drop(std::os::unix::net::UnixListener::bind(&stale).unwrap());
        assert!(stale.exists());
        claim(&[&stale]).unwrap();
        assert!(!stale.exists());

        assert!(claim(&[dir.path()]).unwrap_err().contains("is a directory"));

        let free = dir.path().join("free.sock");
        claim(&[&free]).unwrap();
        assert!(claim(&[&free, &free]).unwrap_err().contains("given twice"));
    }
}
