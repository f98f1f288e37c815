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
//! The tables and the AML come from rust-vmm's `acpi_tables` crate; each device describes
//! itself ([`AcpiDevice`]). The tests check every table with ACPICA's disassembler
//! (`iasl -d`).

use acpi_tables::aml::{
    Device, EISAName, Interrupt, Memory32Fixed, Method, Name, Notify, Package, Path,
    ResourceTemplate, Scope, IO,
};
use acpi_tables::fadt::{FADTBuilder, Flags};
use acpi_tables::gas::{AccessSize, AddressSpace, GAS};
use acpi_tables::madt::{EnabledStatus, IoApic, ProcessorLocalApic};
use acpi_tables::rsdp::Rsdp;
use acpi_tables::sdt::Sdt;
use acpi_tables::xsdt::XSDT;
use acpi_tables::{Aml, AmlSink};

pub const LOCAL_APIC_ADDRESS: u32 = 0xfee0_0000;
pub const IOAPIC_ADDRESS: u32 = 0xfec0_0000;
const OEM_ID: [u8; 6] = *b"VMBLD ";
const OEM_TABLE_ID: [u8; 8] = *b"VMBUILD ";
const OEM_REVISION: u32 = 1;
/// The sleep control and status registers (FADT): ports no PC device claims (0x3c0, the
/// first choice, is VGA's attribute controller), where Cloud Hypervisor has them too.
pub const SLEEP_CONTROL_PORT: u16 = 0x600;
pub const SLEEP_STATUS_PORT: u16 = 0x601;
/// `\_S5_`'s sleep type.
const S5_SLEEP_TYPE: u8 = 5;
/// What the guest writes to the sleep control register to enter S5 (soft off): the sleep
/// type in bits 2–4, SLP_EN (bit 5).
pub const S5_POWER_OFF: u8 = (S5_SLEEP_TYPE << 2) | (1 << 5);

/// A device that describes itself in the DSDT, under `\_SB_`.
pub trait AcpiDevice {
    /// Appends the device's AML; `index` tells it from others of its kind (its name and
    /// `_UID`).
    fn append_aml(&self, index: usize, sink: &mut dyn AmlSink);
}

/// A virtio-mmio window: its registers and the GSI it interrupts on.
#[derive(Debug, Clone, Copy)]
pub struct MmioDevice {
    pub base: u32,
    pub size: u32,
    pub gsi: u32,
}

impl AcpiDevice for MmioDevice {
    fn append_aml(&self, index: usize, sink: &mut dyn AmlSink) {
        let name = format!("V{index:03X}");
        let uid = index as u64;
        let registers = Memory32Fixed::new(true, self.base, self.size);
        let irq = edge_interrupt(self.gsi);
        let resources = ResourceTemplate::new(vec![&registers, &irq]);
        Device::new(
            Path::new(&name),
            vec![
                &Name::new("_HID".into(), &"LNRO0005"),
                &Name::new("_UID".into(), &uid),
                &Name::new("_CRS".into(), &resources),
            ],
        )
        .to_aml_bytes(sink);
    }
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

impl AcpiDevice for LegacySerial {
    fn append_aml(&self, index: usize, sink: &mut dyn AmlSink) {
        let name = format!("COM{}", index + 1);
        let uid = index as u64;
        let ports = IO::new(self.base, self.base, 1, 8);
        let irq = edge_interrupt(self.gsi);
        let resources = ResourceTemplate::new(vec![&ports, &irq]);
        Device::new(
            Path::new(&name),
            vec![
                &Name::new("_HID".into(), &EISAName::new("PNP0501")),
                &Name::new("_UID".into(), &uid),
                &Name::new("_CRS".into(), &resources),
            ],
        )
        .to_aml_bytes(sink);
    }
}

/// Where the VM generation ID lives (16 bytes) and the GSI that announces a new one.
#[derive(Debug, Clone, Copy)]
pub struct GenerationId {
    pub addr: u64,
    pub gsi: u32,
}

impl AcpiDevice for GenerationId {
    /// `VGEN` (the generation ID's address) and `GED0` (its change interrupt, whose
    /// `_EVT` runs `Notify (\_SB.VGEN, 0x80)`).
    fn append_aml(&self, _index: usize, sink: &mut dyn AmlSink) {
        let (low, high) = (self.addr & 0xffff_ffff, self.addr >> 32);
        let addr = Package::new(vec![&low, &high]);
        Device::new(
            "VGEN".into(),
            vec![
                &Name::new("_HID".into(), &"VMGENCTR"),
                &Name::new("ADDR".into(), &addr),
            ],
        )
        .to_aml_bytes(sink);
        let irq = edge_interrupt(self.gsi);
        let resources = ResourceTemplate::new(vec![&irq]);
        let vgen = Path::new("\\_SB_.VGEN");
        let notify = Notify::new(&vgen, &0x80u8);
        Device::new(
            "GED0".into(),
            vec![
                &Name::new("_HID".into(), &"ACPI0013"),
                &Name::new("_UID".into(), &0u8),
                &Name::new("_CRS".into(), &resources),
                &Method::new("_EVT".into(), 1, true, vec![&notify]),
            ],
        )
        .to_aml_bytes(sink);
    }
}

/// Interrupt (ResourceConsumer, Edge, ActiveHigh, Exclusive) { gsi }
fn edge_interrupt(gsi: u32) -> Interrupt {
    Interrupt::new(true, true, false, false, gsi)
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
    // Layout: RSDP (padded to 64), DSDT, MADT, FADT, XSDT, each 16-byte aligned.
    let mut out = vec![0u8; 64];
    let place = |out: &mut Vec<u8>, table: &dyn Aml| -> u64 {
        while !out.len().is_multiple_of(16) {
            out.push(0);
        }
        let at = base + out.len() as u64;
        table.to_aml_bytes(out);
        at
    };
    let dsdt_at = place(&mut out, &dsdt(devices, serials, generation));
    let madt_at = place(&mut out, &madt(vcpus));
    let fadt_at = place(&mut out, &fadt(dsdt_at));
    let mut xsdt = XSDT::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    xsdt.add_entry(fadt_at);
    xsdt.add_entry(madt_at);
    let xsdt_at = place(&mut out, &xsdt);
    let mut rsdp = Vec::new();
    Rsdp::new(OEM_ID, xsdt_at).to_aml_bytes(&mut rsdp);
    out[..rsdp.len()].copy_from_slice(&rsdp);
    Tables {
        rsdp: base,
        bytes: out,
    }
}

fn fadt(dsdt: u64) -> impl Aml {
    let mut fadt = FADTBuilder::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION)
        .dsdt_64(dsdt)
        // No PM timer, GPE or fixed hardware is expected.
        .flag(Flags::HwReducedAcpi);
    // IAPC_BOOT_ARCH: no VGA (bit 2), no CMOS RTC (bit 5: Linux then takes the wall
    // clock from kvm-clock instead of probing an RTC, which cost ~3.7 s of a nested
    // boot); no MSI disable, no ASPM; leave legacy devices implied.
    fadt.iapc_boot_arch = (1u16 << 2 | 1u16 << 5).into();
    fadt.sleep_control_reg = io_register(SLEEP_CONTROL_PORT);
    fadt.sleep_status_reg = io_register(SLEEP_STATUS_PORT);
    fadt.hypervisor_vendor_identity = u64::from_le_bytes(*b"VMBUILD ").into();
    fadt.finalize()
}

/// A one-byte I/O port register.
fn io_register(port: u16) -> GAS {
    GAS::new(
        AddressSpace::SystemIo,
        8,
        0,
        AccessSize::ByteAccess,
        port.into(),
    )
}

/// The MADT: one local APIC per vCPU (APIC ID = vCPU index), the IOAPIC, and ISA IRQ0
/// (the PIT) on IOAPIC pin 2, as on a PC. The table is a generic `Sdt` because the
/// crate's MADT type leaves its flags at 0, and this one says PCAT_COMPAT (the 8259s are
/// there, masked).
fn madt(vcpus: u8) -> Sdt {
    const PCAT_COMPAT: u32 = 1;
    let mut madt = Sdt::new(*b"APIC", 44, 5, OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    madt.write_u32(36, LOCAL_APIC_ADDRESS);
    madt.write_u32(40, PCAT_COMPAT);
    let mut structures = Vec::new();
    for id in 0..vcpus {
        ProcessorLocalApic::new(id, id, EnabledStatus::Enabled).to_aml_bytes(&mut structures);
    }
    IoApic::new(0, IOAPIC_ADDRESS, 0).to_aml_bytes(&mut structures);
    InterruptSourceOverride { irq: 0, gsi: 2 }.to_aml_bytes(&mut structures);
    madt.append_slice(&structures);
    madt.update_checksum();
    madt
}

/// MADT type 2, which the crate does not have: an ISA IRQ wired to another GSI
/// (conforming polarity and trigger).
struct InterruptSourceOverride {
    irq: u8,
    gsi: u32,
}

impl Aml for InterruptSourceOverride {
    fn to_aml_bytes(&self, sink: &mut dyn AmlSink) {
        sink.vec(&[2, 10, 0, self.irq]); // type, length, bus 0 (ISA), source
        sink.dword(self.gsi);
        sink.word(0); // flags: conforming
    }
}

/// `\_S5_` (for power-off) and every device under `\_SB_`.
fn dsdt(devices: &[MmioDevice], serials: &[LegacySerial], generation: Option<GenerationId>) -> Sdt {
    let mut described = Vec::new();
    for (i, port) in serials.iter().enumerate() {
        port.append_aml(i, &mut described);
    }
    for (i, device) in devices.iter().enumerate() {
        device.append_aml(i, &mut described);
    }
    if let Some(g) = generation {
        g.append_aml(0, &mut described);
    }
    let mut aml = Vec::new();
    // Name (\_S5_, Package (2) { 5, 5 }): SLP_TYPa and SLP_TYPb.
    Name::new(
        "_S5_".into(),
        &Package::new(vec![&S5_SLEEP_TYPE, &S5_SLEEP_TYPE]),
    )
    .to_aml_bytes(&mut aml);
    Scope::new("\\_SB_".into(), vec![&RawAml(&described)]).to_aml_bytes(&mut aml);
    let mut dsdt = Sdt::new(*b"DSDT", 36, 2, OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    dsdt.append_slice(&aml);
    dsdt.update_checksum();
    dsdt
}

/// AML already encoded (the devices' own), placed inside a scope.
struct RawAml<'a>(&'a [u8]);

impl Aml for RawAml<'_> {
    fn to_aml_bytes(&self, sink: &mut dyn AmlSink) {
        sink.vec(self.0);
    }
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

    /// ACPICA's disassembler reads the DSDT and finds every device with its resources.
    #[test]
    fn iasl_reads_the_dsdt() {
        // Not skipped when missing: the tables are only checked if ACPICA reads them.
        assert!(
            std::process::Command::new("iasl")
                .arg("-v")
                .output()
                .is_ok(),
            "iasl is not installed: install acpica-tools (scripts/install-host-deps.sh does)"
        );
        let dir = tempfile::tempdir().unwrap();
        use crate::linux::{GENERATION_ID, SERIAL_PORTS};
        let d = dsdt(&devices(), &SERIAL_PORTS, Some(GENERATION_ID));
        let aml = dir.path().join("dsdt.aml");
        std::fs::write(&aml, d.as_slice()).unwrap();
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
        let bytes = |table: &dyn Aml| {
            let mut v = Vec::new();
            table.to_aml_bytes(&mut v);
            v
        };
        for (table, expect) in [
            (
                bytes(&madt(2)),
                vec![
                    "Local Apic Address : FEE00000",
                    "PC-AT Compatibility : 1",
                    "Local Apic ID : 01",
                    "Address : FEC00000",
                    "Interrupt : 00000002",
                ],
            ),
            (
                bytes(&fadt(0x1000)),
                vec![
                    "Hardware Reduced (V5) : 1",
                    "Address : 0000000000000600",
                    "Address : 0000000000000601",
                    "CMOS RTC Not Present (V5) : 1",
                    "VGA Not Present (V4) : 1",
                    "Hypervisor ID : 20444C4955424D56",
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
