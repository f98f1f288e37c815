//! The application crate's layers, as DESIGN.md draws them, held by a test (issue 14): a
//! module may use its own layer and the ones below, never one above, and modules do not
//! depend on each other in circles. It reads the sources as text: every `crate::a::b`
//! path (in `use` lines, `use crate::{a, b}` groups and inline paths) outside test code
//! is an edge.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Bottom to top. A module not listed here fails the test: a new module takes a place.
const LAYERS: &[&[&str]] = &[
    // Paths, processes, exit codes, logging: no knowledge of guests.
    &[
        "exit",
        "signals",
        "cache_dir",
        "owned_dir",
        "runtime_dir",
        "logging",
        "progress",
    ],
    // What goes into a guest: the kit, the kernel command line, the console protocol, the
    // command script, the initramfs.
    &["guest"],
    // QEMU, driven over QMP.
    &["qemu"],
    // One Linux VM with its shares, under QEMU or the embedded VMM.
    &["vm"],
    // Which accelerator and which VMM, with the probes that decide.
    &["accel"],
    // Distribution images: resolved, downloaded, installed in a builder VM, cached.
    &["image"],
    // The snapshot format, its profiles, targets and controllers.
    &["snapshot"],
    // bootstrap and build.
    &["workflow"],
    // `vmbuild bench`: the suites' engines, their samples, the report and plots.
    &["bench"],
    // The command line.
    &["cli"],
];

fn layer_of(module: &str) -> Option<usize> {
    LAYERS.iter().position(|l| l.contains(&module))
}

fn sources(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap().flatten() {
        let path = entry.path();
        if path.is_dir() {
            sources(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// `cli::run` for src/cli/run.rs, `snapshot::controller` for src/snapshot/controller/mod.rs.
fn module_path(src: &Path, file: &Path) -> Vec<String> {
    let rel = file.strip_prefix(src).unwrap().with_extension("");
    let mut parts: Vec<String> = rel
        .components()
        .map(|c| c.as_os_str().to_string_lossy().into_owned())
        .collect();
    if parts.last().is_some_and(|p| p == "mod") {
        parts.pop();
    }
    parts
}

/// The code of a file without its `#[cfg(test)]` module (tests may reach anywhere) and
/// without comments (a doc link to a module above is not a dependency).
fn non_test_code(text: &str) -> String {
    let code = match text.find("#[cfg(test)]") {
        Some(i) => &text[..i],
        None => text,
    };
    code.lines()
        .filter(|l| !l.trim_start().starts_with("//"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// Every `crate::…` path in `code`, as its first two segments; `use crate::{a::b, c}`
/// and `use crate::a::{b, c}` groups are expanded (one level, which is all this crate
/// writes).
fn crate_paths(code: &str) -> Vec<Vec<String>> {
    let segments = |text: &str| -> Vec<String> {
        text.split("::")
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(str::to_owned)
            .collect()
    };
    let mut out = Vec::new();
    let mut rest = code;
    while let Some(i) = rest.find("crate::") {
        let before = rest[..i].chars().last();
        rest = &rest[i + "crate::".len()..];
        // `my_crate::` is not `crate::`.
        if before.is_some_and(|c| c.is_alphanumeric() || c == '_') {
            continue;
        }
        let path: String = rest
            .chars()
            .take_while(|c| c.is_alphanumeric() || *c == '_' || *c == ':')
            .collect();
        let prefix = segments(&path);
        let after = &rest[path.len()..];
        let mut found: Vec<Vec<String>> = Vec::new();
        if let Some(group) = after.strip_prefix('{') {
            let end = group.find('}').unwrap_or(group.len());
            for item in group[..end].split(',') {
                let item = item.split(" as ").next().unwrap_or("");
                let mut segs = prefix.clone();
                segs.extend(segments(item).into_iter().filter(|s| s != "self"));
                found.push(segs);
            }
        } else {
            found.push(prefix);
        }
        for mut segs in found {
            segs.truncate(2);
            if !segs.is_empty() {
                out.push(segs);
            }
        }
    }
    out
}

struct Graph {
    /// (file's module path, the crate path it names) for every edge, with the file.
    edges: Vec<(Vec<String>, Vec<String>, PathBuf)>,
    /// Second-level modules (`snapshot::manifest`, `cli::run`, …).
    submodules: BTreeSet<String>,
}

fn graph() -> Graph {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    sources(&src, &mut files);
    let mut edges = Vec::new();
    let mut submodules = BTreeSet::new();
    for file in files {
        let module = module_path(&src, &file);
        if module.len() > 1 {
            submodules.insert(format!("{}::{}", module[0], module[1]));
        }
        let text = std::fs::read_to_string(&file).unwrap();
        // `super::x` is the parent module's x: a sibling, for the cycle check.
        let parent = &module[..module.len().saturating_sub(1)];
        let spelled_out = if parent.is_empty() {
            "crate::".to_owned()
        } else {
            format!("crate::{}::", parent.join("::"))
        };
        let code = non_test_code(&text).replace("super::", &spelled_out);
        for target in crate_paths(&code) {
            edges.push((module.clone(), target, file.clone()));
        }
    }
    Graph { edges, submodules }
}

#[test]
fn no_module_uses_a_layer_above_its_own() {
    let graph = graph();
    let mut wrong = Vec::new();
    for (from, to, file) in &graph.edges {
        let (Some(from_top), Some(to_top)) = (from.first(), to.first()) else {
            continue;
        };
        if from.is_empty() || from_top == "main" || from_top == "lib" {
            continue;
        }
        let from_layer = layer_of(from_top)
            .unwrap_or_else(|| panic!("{from_top} has no layer: add it to LAYERS"));
        let Some(to_layer) = layer_of(to_top) else {
            continue; // A re-exported item of lib.rs, not a module.
        };
        if to_layer > from_layer {
            wrong.push(format!(
                "{} ({}) uses crate::{} ({})",
                file.display(),
                LAYERS[from_layer][0],
                to.join("::"),
                LAYERS[to_layer][0]
            ));
        }
    }
    wrong.sort();
    wrong.dedup();
    assert!(
        wrong.is_empty(),
        "imports against the layers:\n{}",
        wrong.join("\n")
    );
}

/// Modules named by their first two segments where that is a module
/// (`snapshot::manifest`), else by the top one (`exit`; `qemu` for `qemu::Qmp`, an item
/// its mod.rs re-exports).
fn node(path: &[String], submodules: &BTreeSet<String>) -> String {
    match path {
        [top, sub, ..] if submodules.contains(&format!("{top}::{sub}")) => {
            format!("{top}::{sub}")
        }
        [top, ..] => top.clone(),
        [] => String::new(),
    }
}

#[test]
fn modules_do_not_depend_on_each_other_in_circles() {
    let graph = graph();
    let mut deps: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (from, to, _) in &graph.edges {
        let (a, b) = (node(from, &graph.submodules), node(to, &graph.submodules));
        // Within one module, and a parent's mod.rs re-exporting its children: no edge.
        if a == b || a.is_empty() || b.starts_with(&format!("{a}::")) || a == "lib" {
            continue;
        }
        // An edge to a parent module's own items counts as an edge to the parent.
        deps.entry(a).or_default().insert(b);
    }
    let mut cycles = Vec::new();
    for start in deps.keys() {
        // Depth-first search for a path from start's dependencies back to start.
        let mut stack: Vec<(String, Vec<String>)> = deps[start]
            .iter()
            .map(|d| (d.clone(), vec![start.clone(), d.clone()]))
            .collect();
        let mut seen = BTreeSet::new();
        while let Some((at, path)) = stack.pop() {
            if at == *start {
                cycles.push(path.join(" -> "));
                break;
            }
            if !seen.insert(at.clone()) {
                continue;
            }
            for next in deps.get(&at).into_iter().flatten() {
                let mut p = path.clone();
                p.push(next.clone());
                stack.push((next.clone(), p));
            }
        }
    }
    assert!(
        cycles.is_empty(),
        "modules in circles:\n{}",
        cycles.join("\n")
    );
}

#[test]
fn crate_paths_are_read_as_written() {
    let code = "use crate::qemu::{Qmp, QmpEvent};\nuse crate::{exit, vm::run::RunSpec};\n\
                let x = crate::owned_dir::sweep(p);\nmy_crate::nope::x();\n\
                use crate::snapshot::{self, manifest::Manifest};";
    let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
    assert_eq!(
        crate_paths(code),
        vec![
            s(&["qemu", "Qmp"]),
            s(&["qemu", "QmpEvent"]),
            s(&["exit"]),
            s(&["vm", "run"]),
            s(&["owned_dir", "sweep"]),
            s(&["snapshot"]),
            s(&["snapshot", "manifest"]),
        ]
    );
}
