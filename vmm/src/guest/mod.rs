//! The guest side as the host sees it: what vmbuild puts into a Linux guest (the command
//! script its init runs, the initramfs that carries it). Below the VMMs: both QEMU and
//! the embedded VMM boot the same guest.

pub mod command_script;
pub mod initrd;
