//! ACPI tables for an embedded-VMM Linux guest: how a distribution kernel, which cannot
//! take virtio-mmio devices from its command line (Debian builds without
//! `CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES`), finds them. Hardware-reduced ACPI, as
//! microVMs use it:
//!
//! RSDP → XSDT → FADT (HW_REDUCED_ACPI, → DSDT) and MADT (one local APIC per vCPU, the
//! IOAPIC, IRQ0 → GSI2). The DSDT holds one `LNRO0005` device (the virtio-mmio ACPI ID)
//! per window, with its registers and its interrupt in `_CRS`.
//!
//! Power-off: a hardware-reduced platform has no PM1 registers, so the FADT names a
//! sleep control and a sleep status register (one byte each, I/O ports) and the DSDT an
//! `\_S5_` object. Linux registers `acpi_power_off` only when both exist; it then writes
//! `SLP_TYP << 2 | SLP_EN` to the control register, which the VMM takes as "power off".
//! Without them `poweroff` halts the CPU with interrupts off, which under an in-kernel
//! LAPIC never leaves KVM_RUN: the VM would hang instead of ending.
//!
//! Generation ID: a `VMGENCTR` device whose `ADDR` names 16 bytes of guest memory, and a
//! Generic Event Device (`ACPI0013`, the hardware-reduced way to raise ACPI events) whose
//! interrupt runs `Notify (VGEN, 0x80)`. A restored VM gets a new ID and that interrupt;
//! Linux's vmgenid driver then reseeds its RNG, so VMs restored from one snapshot do not
//! share random numbers (an SSH client's keys among them).
//!
//! The AML is encoded here by hand (a few opcodes); the tests check every table with
//! ACPICA's disassembler (`iasl -d`) where it is installed.

pub const LOCAL_APIC_ADDRESS: u32 = 0xfee0_0000;
pub const IOAPIC_ADDRESS: u32 = 0xfec0_0000;
const OEM_ID: &[u8; 6] = b"VMBLD ";
/// The sleep control and status registers (FADT): ports no PC device claims (0x3c0, the
/// first choice, is VGA's attribute controller), where Cloud Hypervisor has them too.
pub const SLEEP_CONTROL_PORT: u16 = 0x600;
pub const SLEEP_STATUS_PORT: u16 = 0x601;
/// `\_S5_`'s sleep type.
const S5_SLEEP_TYPE: u8 = 5;
/// What the guest writes to the sleep control register to enter S5 (soft off): the sleep
/// type in bits 2–4, SLP_EN (bit 5).
pub const S5_POWER_OFF: u8 = (S5_SLEEP_TYPE << 2) | (1 << 5);
const OEM_TABLE_ID: &[u8; 8] = b"VMBUILD ";

/// A virtio-mmio window: its registers and the GSI it interrupts on.
#[derive(Debug, Clone, Copy)]
pub struct MmioDevice {
    pub base: u32,
    pub size: u32,
    pub gsi: u32,
}

/// A 16550 at a legacy port, described to the guest (`PNP0501`). Under hardware-reduced
/// ACPI Linux installs no legacy PIC and maps no ISA interrupts: a serial port the DSDT
/// does not list gets no working interrupt (its tty fails with EIO; only the polled
/// console output gets through).
#[derive(Debug, Clone, Copy)]
pub struct LegacySerial {
    pub base: u16,
    pub gsi: u32,
}

/// Where the VM generation ID lives (16 bytes) and the GSI that announces a new one.
#[derive(Debug, Clone, Copy)]
pub struct GenerationId {
    pub addr: u64,
    pub gsi: u32,
}

/// The tables, laid out from `base` (guest physical): where the RSDP is, and the bytes.
pub struct Tables {
    pub rsdp: u64,
    pub bytes: Vec<u8>,
}

/// Builds RSDP, XSDT, FADT, MADT and DSDT for `vcpus` vCPUs and `devices`, to be written
/// at guest physical address `base`.
pub fn build(
    base: u64,
    vcpus: u8,
    devices: &[MmioDevice],
    serials: &[LegacySerial],
    generation: Option<GenerationId>,
) -> Tables {
    let dsdt = dsdt(devices, serials, generation);
    let madt = madt(vcpus);
    // Layout: RSDP (36, padded to 64), XSDT, FADT, MADT, DSDT, each 16-byte aligned.
    let mut out = vec![0u8; 64];
    let place = |out: &mut Vec<u8>, table: Vec<u8>| -> u64 {
        while !out.len().is_multiple_of(16) {
            out.push(0);
        }
        let at = base + out.len() as u64;
        out.extend_from_slice(&table);
        at
    };
    let dsdt_at = place(&mut out, dsdt);
    let madt_at = place(&mut out, madt);
    let fadt_at = place(&mut out, fadt(dsdt_at));
    let xsdt_at = place(&mut out, xsdt(&[fadt_at, madt_at]));
    out[..36].copy_from_slice(&rsdp(xsdt_at));
    Tables {
        rsdp: base,
        bytes: out,
    }
}

fn checksum(bytes: &[u8]) -> u8 {
    0u8.wrapping_sub(bytes.iter().fold(0u8, |a, b| a.wrapping_add(*b)))
}

fn rsdp(xsdt: u64) -> [u8; 36] {
    let mut r = [0u8; 36];
    r[0..8].copy_from_slice(b"RSD PTR ");
    r[9..15].copy_from_slice(OEM_ID);
    r[15] = 2; // ACPI 2.0+
    r[20..24].copy_from_slice(&36u32.to_le_bytes());
    r[24..32].copy_from_slice(&xsdt.to_le_bytes());
    r[8] = checksum(&r[..20]);
    r[32] = checksum(&r);
    r
}

/// A table: the standard header around `body`, with length and checksum filled in.
fn sdt(signature: &[u8; 4], revision: u8, body: &[u8]) -> Vec<u8> {
    let mut t = Vec::with_capacity(36 + body.len());
    t.extend_from_slice(signature);
    t.extend_from_slice(&((36 + body.len()) as u32).to_le_bytes());
    t.push(revision);
    t.push(0); // checksum
    t.extend_from_slice(OEM_ID);
    t.extend_from_slice(OEM_TABLE_ID);
    t.extend_from_slice(&1u32.to_le_bytes()); // OEM revision
    t.extend_from_slice(b"VMBL"); // creator
    t.extend_from_slice(&1u32.to_le_bytes());
    t.extend_from_slice(body);
    t[9] = checksum(&t);
    t
}

fn xsdt(entries: &[u64]) -> Vec<u8> {
    let body: Vec<u8> = entries.iter().flat_map(|e| e.to_le_bytes()).collect();
    sdt(b"XSDT", 1, &body)
}

fn fadt(dsdt: u64) -> Vec<u8> {
    // ACPI 6.x FADT: 276 bytes in all, 240 after the header.
    let mut b = vec![0u8; 276 - 36];
    let at = |off: usize| off - 36;
    b[at(40)..at(44)].copy_from_slice(&(dsdt as u32).to_le_bytes());
    // IAPC_BOOT_ARCH: no VGA (bit 2), no CMOS RTC (bit 5: Linux then takes the wall
    // clock from kvm-clock instead of probing an RTC, which cost ~3.7 s of a nested
    // boot); no MSI disable, no ASPM; leave legacy devices implied.
    b[at(109)..at(111)].copy_from_slice(&(1u16 << 2 | 1u16 << 5).to_le_bytes());
    // Flags: HW_REDUCED_ACPI (bit 20), so no PM timer, GPE or fixed hardware is expected.
    b[at(112)..at(116)].copy_from_slice(&(1u32 << 20).to_le_bytes());
    b[at(131)] = 3; // FADT minor version (6.3)
    b[at(244)..at(256)].copy_from_slice(&io_register(SLEEP_CONTROL_PORT));
    b[at(256)..at(268)].copy_from_slice(&io_register(SLEEP_STATUS_PORT));
    b[at(140)..at(148)].copy_from_slice(&dsdt.to_le_bytes()); // X_DSDT
    b[at(268)..at(276)].copy_from_slice(b"VMBUILD "); // hypervisor vendor identity
    sdt(b"FACP", 6, &b)
}

/// A Generic Address Structure for a one-byte I/O port register.
fn io_register(port: u16) -> [u8; 12] {
    let mut g = [0u8; 12];
    g[0] = 1; // system I/O space
    g[1] = 8; // register width in bits
    g[3] = 1; // byte access
    g[4..12].copy_from_slice(&u64::from(port).to_le_bytes());
    g
}

fn madt(vcpus: u8) -> Vec<u8> {
    let mut b = Vec::new();
    b.extend_from_slice(&LOCAL_APIC_ADDRESS.to_le_bytes());
    b.extend_from_slice(&1u32.to_le_bytes()); // PCAT_COMPAT: the 8259s are there
    for id in 0..vcpus {
        b.extend_from_slice(&[0, 8, id, id]); // Processor Local APIC
        b.extend_from_slice(&1u32.to_le_bytes()); // enabled
    }
    b.extend_from_slice(&[1, 12, 0, 0]); // I/O APIC, id 0
    b.extend_from_slice(&IOAPIC_ADDRESS.to_le_bytes());
    b.extend_from_slice(&0u32.to_le_bytes()); // GSI base
                                              // ISA IRQ0 (PIT) is IOAPIC pin 2 on a PC.
    b.extend_from_slice(&[2, 10, 0, 0]);
    b.extend_from_slice(&2u32.to_le_bytes());
    b.extend_from_slice(&0u16.to_le_bytes());
    sdt(b"APIC", 5, &b)
}

fn dsdt(
    devices: &[MmioDevice],
    serials: &[LegacySerial],
    generation: Option<GenerationId>,
) -> Vec<u8> {
    let mut sb = Vec::new();
    for (i, port) in serials.iter().enumerate() {
        sb.extend(serial_device(i, port));
    }
    for (i, d) in devices.iter().enumerate() {
        sb.extend(virtio_mmio_device(i, d));
    }
    if let Some(g) = generation {
        sb.extend(generation_devices(g));
    }
    // Name (\_S5_, Package (2) { 5, 5 }): SLP_TYPa and SLP_TYPb.
    let mut s5 = vec![2u8];
    s5.extend(aml_integer(S5_SLEEP_TYPE.into()));
    s5.extend(aml_integer(S5_SLEEP_TYPE.into()));
    let mut aml = name_op(b"_S5_", &package(&s5));
    aml.push(0x10); // ScopeOp
    let mut inner = b"\\_SB_".to_vec();
    inner.extend(sb);
    aml.extend(pkg_length(inner.len()));
    aml.extend(inner);
    sdt(b"DSDT", 2, &aml)
}

fn virtio_mmio_device(index: usize, d: &MmioDevice) -> Vec<u8> {
    let mut body = format!("V{index:03X}").into_bytes();
    body.extend(name_op(b"_HID", &aml_string("LNRO0005")));
    body.extend(name_op(b"_UID", &aml_integer(index as u64)));
    let mut res = Vec::new();
    // Memory32Fixed (ReadWrite, base, size)
    res.extend_from_slice(&[0x86, 0x09, 0x00, 0x01]);
    res.extend_from_slice(&d.base.to_le_bytes());
    res.extend_from_slice(&d.size.to_le_bytes());
    res.extend(interrupt(d.gsi));
    res.extend_from_slice(&[0x79, 0x00]); // EndTag
    body.extend(name_op(b"_CRS", &aml_buffer(&res)));
    device(body)
}

fn serial_device(index: usize, port: &LegacySerial) -> Vec<u8> {
    let mut body = format!("COM{}", index + 1).into_bytes();
    // EisaId ("PNP0501"): a 16550A-compatible serial port.
    body.extend(name_op(b"_HID", &aml_integer(0x0105_d041)));
    body.extend(name_op(b"_UID", &aml_integer(index as u64)));
    let mut res = vec![0x47, 0x01]; // IO (Decode16, ...)
    res.extend_from_slice(&port.base.to_le_bytes()); // minimum
    res.extend_from_slice(&port.base.to_le_bytes()); // maximum
    res.extend_from_slice(&[0x01, 0x08]); // alignment, length
    res.extend(interrupt(port.gsi));
    res.extend_from_slice(&[0x79, 0x00]); // EndTag
    body.extend(name_op(b"_CRS", &aml_buffer(&res)));
    device(body)
}

/// Interrupt (ResourceConsumer, Edge, ActiveHigh, Exclusive) { gsi }
fn interrupt(gsi: u32) -> Vec<u8> {
    let mut res = vec![0x89, 0x06, 0x00, 0x03, 0x01];
    res.extend_from_slice(&gsi.to_le_bytes());
    res
}

/// `VGEN` (the generation ID's address) and `GED0` (its change interrupt).
fn generation_devices(g: GenerationId) -> Vec<u8> {
    let mut vgen = b"VGEN".to_vec();
    vgen.extend(name_op(b"_HID", &aml_string("VMGENCTR")));
    let mut addr = vec![2u8];
    addr.extend(aml_integer(g.addr & 0xffff_ffff));
    addr.extend(aml_integer(g.addr >> 32));
    vgen.extend(name_op(b"ADDR", &package(&addr)));
    let mut out = device(vgen);

    let mut ged = b"GED0".to_vec();
    ged.extend(name_op(b"_HID", &aml_string("ACPI0013")));
    ged.extend(name_op(b"_UID", &aml_integer(0)));
    let mut res = interrupt(g.gsi);
    res.extend_from_slice(&[0x79, 0x00]); // EndTag
    ged.extend(name_op(b"_CRS", &aml_buffer(&res)));
    // Method (_EVT, 1, Serialized) { Notify (\_SB.VGEN, 0x80) }
    let mut body = b"_EVT".to_vec();
    body.push(0x09); // one argument, serialized
    body.push(0x86); // NotifyOp
    body.extend_from_slice(b"\\\x2e_SB_VGEN"); // \_SB_.VGEN (DualNamePrefix)
    body.extend(aml_integer(0x80));
    let mut method = vec![0x14]; // MethodOp
    method.extend(pkg_length(body.len()));
    method.extend(body);
    ged.extend(method);
    out.extend(device(ged));
    out
}

fn device(body: Vec<u8>) -> Vec<u8> {
    let mut dev = vec![0x5b, 0x82]; // DeviceOp
    dev.extend(pkg_length(body.len()));
    dev.extend(body);
    dev
}

/// A Package from its NumElements byte and encoded elements.
fn package(contents: &[u8]) -> Vec<u8> {
    let mut p = vec![0x12]; // PackageOp
    p.extend(pkg_length(contents.len()));
    p.extend_from_slice(contents);
    p
}

fn name_op(name: &[u8; 4], value: &[u8]) -> Vec<u8> {
    let mut v = vec![0x08];
    v.extend_from_slice(name);
    v.extend_from_slice(value);
    v
}

fn aml_string(s: &str) -> Vec<u8> {
    let mut v = vec![0x0d];
    v.extend_from_slice(s.as_bytes());
    v.push(0);
    v
}

fn aml_integer(n: u64) -> Vec<u8> {
    match n {
        0 => vec![0x00],
        1 => vec![0x01],
        2..=0xff => vec![0x0a, n as u8],
        0x100..=0xffff => [vec![0x0b], (n as u16).to_le_bytes().to_vec()].concat(),
        0x1_0000..=0xffff_ffff => [vec![0x0c], (n as u32).to_le_bytes().to_vec()].concat(),
        _ => [vec![0x0e], n.to_le_bytes().to_vec()].concat(),
    }
}

fn aml_buffer(data: &[u8]) -> Vec<u8> {
    let mut inner = aml_integer(data.len() as u64);
    inner.extend_from_slice(data);
    let mut v = vec![0x11];
    v.extend(pkg_length(inner.len()));
    v.extend(inner);
    v
}

/// AML PkgLength for a package whose contents (after the PkgLength) are `len` bytes; the
/// encoded length counts the PkgLength bytes themselves.
fn pkg_length(len: usize) -> Vec<u8> {
    if len + 1 < 0x40 {
        return vec![(len + 1) as u8];
    }
    for extra in 1..=3usize {
        let total = len + 1 + extra;
        if total < 1 << (4 + 8 * extra) {
            let mut v = vec![((extra as u8) << 6) | (total & 0xf) as u8];
            for i in 0..extra {
                v.push((total >> (4 + 8 * i)) as u8);
            }
            return v;
        }
    }
    panic!("AML package of {len} bytes is too large");
}

#[cfg(test)]
mod tests {
    use super::*;

    fn devices() -> Vec<MmioDevice> {
        (0..3)
            .map(|i| MmioDevice {
                base: 0xd000_0000 + i * 0x1000,
                size: 0x1000,
                gsi: 5 + i,
            })
            .collect()
    }

    /// Each table's checksum makes its bytes sum to zero; the RSDP points at the XSDT.
    #[test]
    fn checksums_and_pointers_hold() {
        let base = 0xe0000u64;
        let t = build(base, 2, &devices(), &[], None);
        let r = &t.bytes[..36];
        assert_eq!(&r[..8], b"RSD PTR ");
        assert_eq!(r[..20].iter().fold(0u8, |a, b| a.wrapping_add(*b)), 0);
        assert_eq!(r.iter().fold(0u8, |a, b| a.wrapping_add(*b)), 0);
        let xsdt = u64::from_le_bytes(r[24..32].try_into().unwrap()) - base;
        let table = |at: u64| {
            let at = at as usize;
            let len = u32::from_le_bytes(t.bytes[at + 4..at + 8].try_into().unwrap()) as usize;
            &t.bytes[at..at + len]
        };
        let x = table(xsdt);
        assert_eq!(&x[..4], b"XSDT");
        for entry in x[36..].chunks(8) {
            let tab = table(u64::from_le_bytes(entry.try_into().unwrap()) - base);
            assert_eq!(
                tab.iter().fold(0u8, |a, b| a.wrapping_add(*b)),
                0,
                "{:?}",
                &tab[..4]
            );
        }
    }

    #[test]
    fn pkg_lengths_encode_as_the_spec_says() {
        assert_eq!(pkg_length(10), vec![11]);
        assert_eq!(pkg_length(62), vec![63]);
        // 63 contents + 2 length bytes = 65 = 0x41: low nibble 1 in byte 0, 0x04 after.
        assert_eq!(pkg_length(63), vec![0x41, 0x04]);
    }

    /// ACPICA's disassembler reads the DSDT and finds every device with its resources.
    #[test]
    fn iasl_reads_the_dsdt() {
        if std::process::Command::new("iasl")
            .arg("-v")
            .output()
            .is_err()
        {
            eprintln!(
                "vmbuild-test-skipped: iasl_reads_the_dsdt: iasl not installed (acpica-tools)"
            );
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        use crate::linux::{GENERATION_ID, SERIAL_PORTS};
        let d = dsdt(&devices(), &SERIAL_PORTS, Some(GENERATION_ID));
        let aml = dir.path().join("dsdt.aml");
        std::fs::write(&aml, &d).unwrap();
        let out = std::process::Command::new("iasl")
            .arg("-d")
            .arg(&aml)
            .current_dir(dir.path())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let dsl = std::fs::read_to_string(dir.path().join("dsdt.dsl")).unwrap();
        assert_eq!(dsl.matches("\"LNRO0005\"").count(), 3, "{dsl}");
        assert!(dsl.contains("0xD0002000"), "{dsl}");
        assert!(
            dsl.contains("Interrupt (ResourceConsumer, Edge, ActiveHigh, Exclusive"),
            "{dsl}"
        );
        assert!(
            dsl.contains("Name (_S5, Package (0x02)") && dsl.contains("0x05, "),
            "{dsl}"
        );
        let generation_at = format!("0x{:08X}", GENERATION_ID.addr);
        let generation_gsi = format!("0x{:08X},", GENERATION_ID.gsi);
        for expected in [
            "Device (VGEN)",
            "\"VMGENCTR\"",
            "Name (ADDR, Package (0x02)",
            &generation_at,
            "Device (GED0)",
            "\"ACPI0013\"",
            "Method (_EVT, 1, Serialized)",
            "Notify (\\_SB.VGEN, 0x80)",
            &generation_gsi,
        ] {
            assert!(dsl.contains(expected), "no {expected:?} in {dsl}");
        }
        // The serial ports, each with its I/O range and its own interrupt.
        assert_eq!(dsl.matches("EisaId (\"PNP0501\")").count(), 3, "{dsl}");
        for (i, port) in SERIAL_PORTS.iter().enumerate() {
            let io = format!("0x{:04X},             // Range Minimum", port.base);
            assert!(dsl.contains(&format!("Device (COM{})", i + 1)), "{dsl}");
            assert!(dsl.contains(&io), "no {io:?} in {dsl}");
            assert!(dsl.contains(&format!("0x{:08X},", port.gsi)), "{dsl}");
        }
        for (table, expect) in [
            (madt(2), vec![]),
            (
                fadt(0x1000),
                vec![
                    "Hardware Reduced (V5) : 1",
                    "Address : 0000000000000600",
                    "Address : 0000000000000601",
                ],
            ),
        ] {
            let f = dir.path().join("t.dat");
            std::fs::write(&f, &table).unwrap();
            let out = std::process::Command::new("iasl")
                .arg("-d")
                .arg(&f)
                .current_dir(dir.path())
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
            let text = std::fs::read_to_string(dir.path().join("t.dsl")).unwrap();
            for e in expect {
                assert!(text.contains(e), "{e:?} not in {text}");
            }
        }
    }
}
