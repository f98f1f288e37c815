//! Parsers for values that several subcommands take, so that `--memory 1G` means the same
//! in `run` and `bootstrap` and a bad value gets the same message everywhere.

/// Guest memory: a number of MiB (`512`), or a size with a unit (`512M`, `2G`, `2GiB`), as
/// QEMU's `-m` takes it.
pub fn memory_mib(text: &str) -> Result<u32, String> {
    let mib = size_mib(text)
        .ok_or_else(|| format!("'{text}' is not a size: give MiB (512) or a unit (512M, 2G)"))?;
    u32::try_from(mib).map_err(|_| format!("'{text}' is more than any guest can have"))
}

/// `N`, `NM`, `NMiB`, `NG`, `NGiB`, `NT` (case-insensitive) → MiB; None if it is not one,
/// or overflows.
pub fn size_mib(text: &str) -> Option<u64> {
    let t = text.trim();
    let digits = t.bytes().take_while(u8::is_ascii_digit).count();
    let (num, unit) = t.split_at(digits);
    let n: u64 = num.parse().ok()?;
    let factor: u64 = match unit.to_ascii_lowercase().as_str() {
        "" | "m" | "mb" | "mib" => 1,
        "g" | "gb" | "gib" => 1024,
        "t" | "tb" | "tib" => 1024 * 1024,
        _ => return None,
    };
    n.checked_mul(factor)
}

/// An image size in MiB (`4G`, `512M`, `800`).
pub fn image_size_mib(text: &str) -> Result<u64, String> {
    size_mib(text).ok_or_else(|| format!("'{text}' is not a size: give MiB (800) or a unit (4G)"))
}

/// vCPUs, 1 to 255 (what the guest's APIC IDs allow).
pub fn cpus(text: &str) -> Result<u32, String> {
    match text.trim().parse::<i64>() {
        Ok(n @ 1..=255) => Ok(n as u32),
        _ => Err(format!("'{text}' is not a vCPU count: use 1 to 255")),
    }
}

/// This host's RAM in MiB, for refusing a guest bigger than the host before QEMU tries.
pub fn host_memory_mib() -> Option<u64> {
    let info = nix::sys::sysinfo::sysinfo().ok()?;
    Some(info.ram_total() / (1024 * 1024))
}

/// Refuses `mib` above the host's RAM: QEMU maps guest memory lazily, so an oversized
/// guest starts and then takes the host down with it when the build fills its memory.
pub fn check_fits_host(mib: u32) -> Result<(), String> {
    match host_memory_mib() {
        Some(host) if u64::from(mib) > host => Err(format!(
            "--memory {mib} MiB is more than this host's {host} MiB of RAM"
        )),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_takes_mib_or_a_unit() {
        assert_eq!(memory_mib("512"), Ok(512));
        assert_eq!(memory_mib("512M"), Ok(512));
        assert_eq!(memory_mib("2G"), Ok(2048));
        assert_eq!(memory_mib("2gib"), Ok(2048));
        assert!(memory_mib("-1").unwrap_err().contains("not a size"));
        assert!(memory_mib("1X").unwrap_err().contains("not a size"));
        assert!(memory_mib("99999999T")
            .unwrap_err()
            .contains("more than any guest"));
        assert_eq!(size_mib("99999999999999999999T"), None);
    }

    #[test]
    fn cpus_are_1_to_255() {
        assert_eq!(cpus("4"), Ok(4));
        for bad in ["0", "-1", "256", "x"] {
            assert!(cpus(bad).unwrap_err().contains("1 to 255"), "{bad}");
        }
    }
}
