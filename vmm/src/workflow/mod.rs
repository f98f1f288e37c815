//! What vmbuild does for its users, built from the parts: `run` (a command in a fresh
//! Linux VM); later `bootstrap`, `build` and `collect`.

pub mod guest_script;
pub mod initrd;
pub mod run;
pub mod timings;
