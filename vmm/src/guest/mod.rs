//! The guest side as the host sees it, below both VMMs (QEMU and the embedded VMM boot
//! the same guest): the guest kit and its `kit.json` ([`kit`]), what vmbuild puts into
//! a Linux guest (the command script its init runs, the initramfs that carries it), what
//! the kit's guests print on their console ([`console`]) and what their kernel command
//! line says ([`cmdline`]). The host code that reads or writes these and the scripts
//! vmbuild generates for the guest take them from here, so the two sides cannot drift.

pub mod cmdline;
pub mod command_script;
pub mod console;
pub mod initrd;
pub mod kit;
