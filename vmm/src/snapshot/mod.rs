//! The snapshot lifecycle's parts: a target installed once by a [`profile`], suspended to
//! a snapshot directory described by its [`manifest`], revived for every build as a
//! [`target`] VM on a private [`segment`], and driven over SSH by a [`controller`].
//! The workflows that put them together are `workflow::bootstrap` and `workflow::build`.

pub mod access;
pub mod controller;
pub mod dropbear;
pub mod manifest;
pub mod profile;
pub mod segment;
pub mod target;

/// Files of a snapshot directory besides the profile's disk and boot files.
pub const STATE_FILE: &str = "state";
pub const CONTROLLER_CPIO: &str = "controller.cpio";
pub const CLIENT_KEY: &str = "ssh/client_key";
/// The target's console during bootstrap, kept for diagnosis (not checksummed).
pub const BOOTSTRAP_LOG: &str = "bootstrap-console.log";
/// The guest kit's kernel and initramfs as of the bootstrap: they boot every build's
/// controller, and the `linux` target.
pub const KIT_KERNEL: &str = "vmlinux";
pub const KIT_INITRD: &str = "initrd.img";
/// The embedded VMM's snapshot of the controller, a directory (optional: made where the
/// embedded VMM boots Linux).
pub const EMBEDDED_CONTROLLER_DIR: &str = "controller-kvm";
