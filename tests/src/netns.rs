//! Network namespaces a test makes for itself (and removes), and running code inside them.
//! Addresses used inside are the test's own, in namespaces nobody else can reach.

use std::fs::File;
use std::process::Command;

use anyhow::{bail, Context};

pub struct Netns {
    pub name: String,
}

impl Netns {
    /// `ip netns add` a uniquely named namespace with its loopback up.
    pub fn create(tag: &str) -> anyhow::Result<Netns> {
        let name = format!("vmbt-{tag}-{}", std::process::id());
        let _ = Command::new("ip")
            .args(["netns", "del", &name])
            .stderr(std::process::Stdio::null())
            .status();
        ip(&["netns", "add", &name])?;
        let ns = Netns { name };
        ns.exec(&["ip", "link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// Runs a command inside the namespace; fails with its output if it fails.
    pub fn exec(&self, args: &[&str]) -> anyhow::Result<String> {
        let out = Command::new("ip")
            .args(["netns", "exec", &self.name])
            .args(args)
            .output()
            .with_context(|| format!("ip netns exec {} {args:?}", self.name))?;
        if !out.status.success() {
            bail!(
                "{args:?} in {} failed: {}{}",
                self.name,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Moves interface `ifname` into this namespace and gives it `addr` (CIDR), up.
    pub fn adopt(&self, ifname: &str, addr: &str) -> anyhow::Result<()> {
        ip(&["link", "set", ifname, "netns", &self.name])?;
        // No IPv6: its router solicitations and DAD would put unasked-for frames on the
        // wire and keep MAC entries fresh.
        let _ = self.exec(&[
            "sysctl",
            "-qw",
            &format!("net.ipv6.conf.{ifname}.disable_ipv6=1"),
        ]);
        self.exec(&["ip", "addr", "add", addr, "dev", ifname])?;
        self.exec(&["ip", "link", "set", ifname, "up"])?;
        Ok(())
    }

    /// Runs `f` on a thread that lives in this namespace.
    pub fn run<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> std::thread::JoinHandle<anyhow::Result<T>> {
        let path = format!("/var/run/netns/{}", self.name);
        std::thread::spawn(move || {
            let file = File::open(&path).with_context(|| format!("opening {path}"))?;
            nix::sched::setns(file, nix::sched::CloneFlags::CLONE_NEWNET).context("setns")?;
            Ok(f())
        })
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

pub fn ip(args: &[&str]) -> anyhow::Result<()> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .context("running ip (iproute2)")?;
    if !out.status.success() {
        bail!(
            "ip {args:?}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}
