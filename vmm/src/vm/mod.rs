//! One Linux VM with its shares, run to the end of a command: what it needs
//! ([`run::RunSpec`]) and the two back-ends that run it, QEMU ([`run::run`]) and the
//! embedded KVM VMM ([`run_embedded::run_embedded`]), with the console-driven loop of the
//! latter and the phase marks both report. Used by `vmbuild run` and by the snapshot
//! lifecycle's controllers.

pub mod embedded_guest;
pub mod run;
pub mod run_embedded;
pub mod timings;
