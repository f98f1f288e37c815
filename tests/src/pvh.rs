//! Kernels the tests and benchmarks assemble themselves for the embedded VMM's Linux
//! machine: an ELF with a PVH note and a few 32-bit instructions, which run on any KVM
//! (unlike Linux on hosts whose KVM cannot run it).

/// Where the code is loaded and entered (PVH: 32-bit protected mode, paging off).
pub const LOAD: u64 = 0x10_0000;

/// An ELF64 executable whose one segment is `code` at [`LOAD`], with the
/// `XEN_ELFNOTE_PHYS32_ENTRY` note pointing there.
pub fn pvh_kernel(code: &[u8]) -> Vec<u8> {
    const NOTE_AT: usize = 0x200;
    const CODE_AT: usize = 0x1000;
    let mut note = Vec::new();
    note.extend(4u32.to_le_bytes()); // name size
    note.extend(4u32.to_le_bytes()); // descriptor size
    note.extend(18u32.to_le_bytes()); // XEN_ELFNOTE_PHYS32_ENTRY
    note.extend(b"Xen\0");
    note.extend((LOAD as u32).to_le_bytes());

    let mut elf = vec![0u8; CODE_AT + code.len()];
    elf[..4].copy_from_slice(b"\x7fELF");
    elf[4] = 2; // 64-bit
    elf[5] = 1; // little endian
    elf[6] = 1; // version
    let mut put = |at: usize, bytes: &[u8]| elf[at..at + bytes.len()].copy_from_slice(bytes);
    put(16, &2u16.to_le_bytes()); // ET_EXEC
    put(18, &62u16.to_le_bytes()); // EM_X86_64
    put(20, &1u32.to_le_bytes());
    put(24, &LOAD.to_le_bytes()); // entry
    put(32, &64u64.to_le_bytes()); // program headers right after this header
    put(52, &64u16.to_le_bytes()); // header size
    put(54, &56u16.to_le_bytes()); // program header size
    put(56, &2u16.to_le_bytes()); // two of them
    let phdr = |kind: u32, flags: u32, offset: usize, addr: u64, size: usize, align: u64| {
        let mut p = Vec::new();
        p.extend(kind.to_le_bytes());
        p.extend(flags.to_le_bytes());
        p.extend((offset as u64).to_le_bytes());
        p.extend(addr.to_le_bytes());
        p.extend(addr.to_le_bytes());
        p.extend((size as u64).to_le_bytes());
        p.extend((size as u64).to_le_bytes());
        p.extend(align.to_le_bytes());
        p
    };
    put(64, &phdr(1, 5, CODE_AT, LOAD, code.len(), 0x1000)); // PT_LOAD, R+X
    put(120, &phdr(4, 4, NOTE_AT, 0, note.len(), 4)); // PT_NOTE
    put(NOTE_AT, &note);
    put(CODE_AT, code);
    elf
}

/// `mov dx, port; mov al, byte; out dx, al` for each byte.
pub fn out_bytes(port: u16, bytes: &[u8]) -> Vec<u8> {
    let mut code = vec![0x66, 0xba];
    code.extend(port.to_le_bytes());
    for b in bytes {
        code.extend([0xb0, *b, 0xee]);
    }
    code
}

/// `cli; hlt; jmp hlt`: stopped for good, as a kernel without ACPI power-off halts.
pub const HALT_FOR_GOOD: [u8; 4] = [0xfa, 0xf4, 0xeb, 0xfd];

/// Reads COM2 by polling its line status, echoing every byte to port `echo_to`, until a
/// newline has gone through.
pub fn echo_com2_until_newline(echo_to: u16) -> Vec<u8> {
    let mut code = vec![
        0x66, 0xba, 0xfd, 0x02, // 0: mov dx, 0x2fd (COM2 line status)
        0xec, // 4: in al, dx
        0xa8, 0x01, // 5: test al, 1 (data ready)
        0x74, 0xf7, // 7: jz 0
        0x66, 0xba, 0xf8, 0x02, // 9: mov dx, 0x2f8
        0xec, // 13: in al, dx
        0x66, 0xba, // 14: mov dx, echo_to
    ];
    code.extend(echo_to.to_le_bytes());
    code.extend([
        0xee, // 18: out dx, al
        0x3c, 0x0a, // 19: cmp al, '\n'
        0x75, 0xe9, // 21: jne 0
    ]);
    code
}

/// Whether KVM is here for these guests; reports the test skipped if not.
pub fn kvm_here(name: &str) -> bool {
    let ok = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok();
    if !ok {
        crate::skip(name, "/dev/kvm cannot be opened");
    }
    ok
}
