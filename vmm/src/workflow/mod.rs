//! What vmbuild does for its users over several VMs, built from the parts: `bootstrap`
//! (install a target once and suspend it to a snapshot) and `build` (revive the snapshot,
//! run a command over SSH, collect its exit status). `run`, one VM, is [`crate::vm`].

pub mod bootstrap;
pub mod build;
