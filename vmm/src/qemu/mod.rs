//! Driving QEMU: finding it, starting it with the sockets vmbuild listens on, and talking
//! to it over QMP. QEMU is the VMM for guests that need a full PC (Windows) and for Linux
//! guests on hosts whose KVM cannot run them (TCG).

pub mod accel;
pub mod argv;
pub mod binary;
pub mod console_guest;
pub mod migration;
pub mod process;
pub mod qmp;
pub mod recorded_channels;

pub use accel::Accel;
pub use argv::QemuCommand;
pub use binary::QemuBinary;
pub use migration::StateFormat;
pub use process::{accept_all, stopped, ChardevListener, QemuProcess, QemuStopped};
pub use qmp::{Qmp, QmpEvent, ShutdownReason};
