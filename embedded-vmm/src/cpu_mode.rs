//! Putting a vCPU straight into real mode, 32-bit protected mode or 64-bit long mode
//! (identity-paged), as a boot loader would, so that small test guests (and later a PVH
//! Linux entry) start at their first instruction.
//!
//! Guest memory layout used here (all below 1 MiB): GDT at 0x1000, PML4 at 0x2000, PDPT
//! at 0x3000, page directory at 0x4000 (the first 1 GiB in 2 MiB pages); code goes
//! wherever the caller put it.

use anyhow::Context;
use kvm_bindings::{kvm_segment, kvm_sregs};
use kvm_ioctls::VcpuFd;
use vm_memory::{Bytes, GuestAddress};

use crate::memory::GuestRam;

pub const GDT_ADDR: u64 = 0x1000;
pub const PML4_ADDR: u64 = 0x2000;
const PDPT_ADDR: u64 = 0x3000;
const PD_ADDR: u64 = 0x4000;

const CR0_PE: u64 = 1;
const CR0_PG: u64 = 1 << 31;
const CR4_PAE: u64 = 1 << 5;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CpuMode {
    /// 16-bit real mode, CS = 0: `entry` must be below 64 KiB.
    Real,
    /// 32-bit protected mode, flat segments, no paging.
    Protected32,
    /// 64-bit long mode, flat segments, the first 1 GiB identity-mapped.
    Long64,
}

/// Sets `vcpu`'s registers (and writes the GDT and page tables into `ram`) so that it
/// starts executing at `entry` in `mode`, with the stack pointer at `stack`.
pub fn enter(
    vcpu: &VcpuFd,
    ram: &GuestRam,
    mode: CpuMode,
    entry: u64,
    stack: u64,
) -> anyhow::Result<()> {
    let mut sregs = vcpu.get_sregs().context("KVM_GET_SREGS")?;
    match mode {
        CpuMode::Real => {
            anyhow::ensure!(
                entry < 0x10000,
                "real-mode entry {entry:#x} is above 64 KiB"
            );
            for s in segments(&mut sregs) {
                s.base = 0;
                s.selector = 0;
            }
        }
        CpuMode::Protected32 | CpuMode::Long64 => {
            let long = mode == CpuMode::Long64;
            // null, code, data
            let code: u64 = if long {
                0x00af_9a00_0000_ffff
            } else {
                0x00cf_9a00_0000_ffff
            };
            let gdt = [0u64, code, 0x00cf_9200_0000_ffff];
            for (i, d) in gdt.iter().enumerate() {
                ram.write_obj::<u64>(*d, GuestAddress(GDT_ADDR + 8 * i as u64))?;
            }
            sregs.gdt.base = GDT_ADDR;
            sregs.gdt.limit = (gdt.len() * 8 - 1) as u16;
            let code_seg = kvm_segment {
                base: 0,
                limit: 0xffff_ffff,
                selector: 0x08,
                type_: 0xb,
                present: 1,
                dpl: 0,
                db: u8::from(!long),
                s: 1,
                l: u8::from(long),
                g: 1,
                avl: 0,
                unusable: 0,
                padding: 0,
            };
            let data_seg = kvm_segment {
                selector: 0x10,
                type_: 0x3,
                db: 1,
                l: 0,
                ..code_seg
            };
            sregs.cs = code_seg;
            sregs.ds = data_seg;
            sregs.es = data_seg;
            sregs.fs = data_seg;
            sregs.gs = data_seg;
            sregs.ss = data_seg;
            sregs.cr0 |= CR0_PE;
            if long {
                // PML4[0] → PDPT, PDPT[0] → PD, PD[i] → 2 MiB page i (present, writable, PS).
                ram.write_obj::<u64>(PDPT_ADDR | 0x3, GuestAddress(PML4_ADDR))?;
                ram.write_obj::<u64>(PD_ADDR | 0x3, GuestAddress(PDPT_ADDR))?;
                for i in 0..512u64 {
                    ram.write_obj::<u64>((i << 21) | 0x83, GuestAddress(PD_ADDR + 8 * i))?;
                }
                sregs.cr3 = PML4_ADDR;
                sregs.cr4 |= CR4_PAE;
                sregs.cr0 |= CR0_PG;
                sregs.efer |= EFER_LME | EFER_LMA;
            }
        }
    }
    vcpu.set_sregs(&sregs).context("KVM_SET_SREGS")?;
    let mut regs = vcpu.get_regs().context("KVM_GET_REGS")?;
    regs.rip = entry;
    regs.rsp = stack;
    regs.rflags = 0x2;
    vcpu.set_regs(&regs).context("KVM_SET_REGS")?;
    Ok(())
}

fn segments(s: &mut kvm_sregs) -> [&mut kvm_segment; 6] {
    [
        &mut s.cs, &mut s.ds, &mut s.es, &mut s.fs, &mut s.gs, &mut s.ss,
    ]
}
