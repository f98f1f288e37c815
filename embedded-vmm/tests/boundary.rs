//! The embedded VMM is below the application: it may use the rust-vmm crates, the switch
//! and the file server, never the `vmm` crate (workflows, CLI, the QEMU driver). Cargo
//! would refuse the cycle only once `vmm` depends on this crate, which it does; this test
//! names the rule where someone adding the dependency would see it.

#[test]
fn the_embedded_vmm_does_not_depend_on_the_application() {
    let manifest = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/Cargo.toml"))
        .expect("reading embedded-vmm/Cargo.toml");
    let mut section = String::new();
    for line in manifest.lines() {
        let line = line.trim();
        if line.starts_with('[') {
            section = line.to_string();
            continue;
        }
        let name = line.split(['=', ' ', '.']).next().unwrap_or("");
        if section == "[dependencies]" {
            assert!(
                !["vmm", "vmbuild"].contains(&name),
                "embedded-vmm depends on the application ({line}): move what it needs down"
            );
        }
    }
    assert!(manifest.contains("[dependencies]"));
}
