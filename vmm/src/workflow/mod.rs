//! What vmbuild does for its users, built from the parts: `run` (a command in a fresh
//! Linux VM), `bootstrap` (install a target once and suspend it to a snapshot) and
//! `build` (revive the snapshot, run a command over SSH, collect its exit status).

pub mod bootstrap;
pub mod build;
pub mod embedded_guest;
pub mod guest_script;
pub mod initrd;
pub mod run;
pub mod run_embedded;
pub mod timings;
