//! QEMU's accelerators as vmbuild uses them. Which one a guest gets is decided above, in
//! [`crate::accel`] (with the probes that know whether this host's KVM runs Linux).

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accel {
    Kvm,
    Tcg,
}

impl Accel {
    pub fn qemu_name(self) -> &'static str {
        match self {
            Accel::Kvm => "kvm",
            Accel::Tcg => "tcg",
        }
    }

    /// `host` under KVM; QEMU's default model under TCG (`max` boots ~0.1 s slower).
    pub fn cpu_model(self) -> Option<&'static str> {
        match self {
            Accel::Kvm => Some("host"),
            Accel::Tcg => None,
        }
    }
}
