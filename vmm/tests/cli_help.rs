//! Every subcommand documents its exit statuses and the environment it reads in `--help`
//! (issue 13: one table of exit codes, the same as the README's).

use std::process::Command;

fn help(args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_vmbuild"))
        .args(args)
        .arg("--help")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{args:?}");
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn every_subcommand_documents_its_exit_status() {
    for args in [
        &["run"][..],
        &["build"],
        &["bootstrap"],
        &["doctor"],
        &["snapshot", "inspect"],
        &["snapshot", "verify"],
        &["fs", "serve"],
        &["switch"],
        &["switch", "ctl"],
        &["bench"],
    ] {
        let text = help(args);
        assert!(text.contains("Exit status"), "{args:?}:\n{text}");
        // Bad input is 2 everywhere, and says so.
        assert!(
            text.lines()
                .any(|l| l.trim_start().starts_with('2') && l.contains("bad command line")),
            "{args:?}: no line for exit 2:\n{text}"
        );
    }
}

#[test]
fn the_environment_is_named_where_it_is_read() {
    for (args, vars) in [
        (
            &["run"][..],
            &[
                "VMBUILD_QEMU",
                "VMBUILD_GUEST_KIT",
                "XDG_RUNTIME_DIR",
                "TMPDIR",
                "RUST_LOG",
            ][..],
        ),
        (
            &["build"],
            &[
                "VMBUILD_QEMU",
                "VMBUILD_JOBS",
                "XDG_RUNTIME_DIR",
                "RUST_LOG",
            ],
        ),
        (
            &["bootstrap"],
            &["VMBUILD_QEMU", "VMBUILD_GUEST_KIT", "RUST_LOG"],
        ),
        (&["doctor"], &["VMBUILD_QEMU", "VMBUILD_GUEST_KIT"]),
        (&["fs", "serve"], &["RUST_LOG"]),
        (&["switch"], &["RUST_LOG"]),
        (&["bench"], &["VMBUILD_QEMU", "VMBUILD_GUEST_KIT", "PATH"]),
    ] {
        let text = help(args);
        for var in vars {
            assert!(text.contains(var), "{args:?} does not name {var}:\n{text}");
        }
    }
}

/// The README's table and the subcommands' help agree on the codes they document.
#[test]
fn the_readme_lists_the_same_exit_codes() {
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../README.md")).unwrap();
    let table: Vec<&str> = readme
        .split("## Exit status (every subcommand)")
        .nth(1)
        .expect("README has the exit status table")
        .lines()
        .filter(|l| l.starts_with("| "))
        .collect();
    for (args, codes) in [
        (&["run"][..], &[2, 123, 124, 125, 127, 130][..]),
        (
            &["build"],
            &[2, 119, 120, 121, 122, 123, 124, 125, 127, 130],
        ),
        (&["bootstrap"], &[2, 122, 125, 130]),
    ] {
        let text = help(args);
        for code in codes {
            assert!(
                text.lines()
                    .any(|l| l.trim_start().starts_with(&format!("{code} "))),
                "{args:?} --help lacks {code}"
            );
            assert!(
                table.iter().any(|l| l.starts_with(&format!("| {code} |"))),
                "README's table lacks {code}"
            );
        }
    }
}
