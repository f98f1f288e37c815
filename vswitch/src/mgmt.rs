//! The management console on a unix socket, modelled on vde_switch's: one command per
//! line, answered with text for people, or with one line of JSON when the command is
//! prefixed with `json ` (or given `--json`). Every answer ends with a line `.` so a
//! script knows where it stops; failures start with `error: `.
//!
//! Commands: `help`, `showinfo`, `port/print [ID]`, `port/add KIND WHERE [MODE]`, `port/remove ID`,
//! `port/setvlan ID MODE`, `hash/print`, `vlan/print`, `stats`.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use serde_json::json;

use crate::managed::ManagedSwitch;
use crate::port::VlanMode;
use crate::sockfile::SocketFile;
use crate::switch::Switch;

pub const END: &str = ".";

pub struct MgmtServer {
    file: SocketFile,
    stopping: Arc<AtomicBool>,
}

impl MgmtServer {
    /// Listens on `path` (which must not exist: see [`crate::sockfile`]) and serves each
    /// connection on a thread.
    pub fn start(switch: Arc<ManagedSwitch>, path: &Path) -> std::io::Result<MgmtServer> {
        let (listener, file) = crate::sockfile::bind_listener(path)?;
        let stopping = Arc::new(AtomicBool::new(false));
        let stop = stopping.clone();
        std::thread::Builder::new()
            .name("switch-mgmt".into())
            .spawn(move || {
                for conn in listener.incoming() {
                    if stop.load(Ordering::SeqCst) {
                        break;
                    }
                    if let Ok(conn) = conn {
                        let sw = switch.clone();
                        std::thread::spawn(move || serve(sw, conn));
                    }
                }
            })?;
        Ok(MgmtServer { file, stopping })
    }
}

impl Drop for MgmtServer {
    fn drop(&mut self) {
        self.stopping.store(true, Ordering::SeqCst);
        if self.file.is_ours() {
            let _ = UnixStream::connect(self.file.path());
        }
        // `file` removes the socket if it is still the one this server made.
    }
}

fn serve(switch: Arc<ManagedSwitch>, conn: UnixStream) {
    let Ok(mut out) = conn.try_clone() else {
        return;
    };
    for line in BufReader::new(conn).lines() {
        let Ok(line) = line else { break };
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        if line == "logout" || line == "quit" {
            break;
        }
        let reply = execute(&switch, line);
        if out.write_all(reply.as_bytes()).is_err() || writeln!(out, "{END}").is_err() {
            break;
        }
    }
}

/// Runs one console command and returns its answer (without the final `.`).
pub fn execute(switch: &ManagedSwitch, line: &str) -> String {
    let mut words: Vec<&str> = line.split_whitespace().collect();
    let json = if words.first() == Some(&"json") {
        words.remove(0);
        true
    } else if let Some(i) = words.iter().position(|w| *w == "--json") {
        words.remove(i);
        true
    } else {
        false
    };
    match run(switch, &words, json) {
        Ok(text) => text,
        Err(e) if json => format!("{}\n", json!({ "error": e })),
        Err(e) => format!("error: {e}\n"),
    }
}

fn run(managed: &ManagedSwitch, words: &[&str], json: bool) -> Result<String, String> {
    let switch: &Switch = managed.switch();
    let id = |w: Option<&&str>| -> Result<u32, String> {
        w.ok_or("which port? give its number")?
            .parse::<u32>()
            .map_err(|_| "a port number, as port/print lists them".to_owned())
    };
    match words.first().copied().unwrap_or("") {
        "help" => Ok(HELP.to_owned()),
        "showinfo" => {
            let c = switch.config();
            let vde: Vec<_> = managed
                .vde_dirs()
                .into_iter()
                .map(|(dir, ports, refused)| json!({"dir": dir, "ports_made": ports, "refused": refused}))
                .collect();
            let info = json!({
                "ports": switch.ports().len(),
                "max_ports": (c.max_ports != usize::MAX).then_some(c.max_ports),
                "vde": vde,
                "hub": c.hub,
                "mac_table_size": c.mac_table_size,
                "mac_table_used": switch.mac_table_len(),
                "aging_secs": c.aging.as_secs(),
                "max_frame": c.max_frame,
            });
            Ok(if json {
                format!("{info}\n")
            } else {
                let mut s = format!(
                    "vmbuild vswitch\nports {}{}\nmode {}\nmac table {}/{} entries, aging {} s\nmax frame {} bytes\n",
                    switch.ports().len(),
                    if c.max_ports == usize::MAX {
                        String::new()
                    } else {
                        format!(" (at most {})", c.max_ports)
                    },
                    if c.hub { "hub" } else { "switch" },
                    switch.mac_table_len(),
                    c.mac_table_size,
                    c.aging.as_secs(),
                    c.max_frame
                );
                for (dir, ports, refused) in managed.vde_dirs() {
                    s.push_str(&format!(
                        "vde dir {} ({ports} ports made, {refused} requests refused)\n",
                        dir.display()
                    ));
                }
                s
            })
        }
        "port/print" | "port/allprint" | "stats" => {
            let mut ports = switch.ports();
            if let Some(w) = words.get(1) {
                let want = id(Some(w))?;
                ports.retain(|p| p.id == want);
                if ports.is_empty() {
                    return Err(format!("no port {want}"));
                }
            }
            if json {
                return Ok(format!(
                    "{}\n",
                    serde_json::to_string(&ports).unwrap_or_default()
                ));
            }
            let mut s = String::new();
            for p in ports {
                let c = &p.counters;
                s.push_str(&format!(
                    "port {:>4} {:<10} {:<24} {}\n    rx {} frames {} bytes   tx {} frames {} bytes\n",
                    p.id,
                    p.kind,
                    p.endpoint,
                    vlan_text(&p.vlan),
                    c.rx_frames,
                    c.rx_bytes,
                    c.tx_frames,
                    c.tx_bytes
                ));
                let drops: Vec<String> = c
                    .drops
                    .iter()
                    .filter(|(_, n)| **n > 0)
                    .map(|(k, n)| format!("{k} {n}"))
                    .collect();
                if !drops.is_empty() {
                    s.push_str(&format!("    dropped: {}\n", drops.join(", ")));
                }
            }
            Ok(s)
        }
        "port/add" => {
            let kind = words
                .get(1)
                .copied()
                .ok_or("port/add tap NAME [MODE] | port/add vhost-user PATH [MODE] | port/add stream PATH [MODE]")?;
            let place = words
                .get(2)
                .copied()
                .ok_or("port/add needs a tap name or a socket path")?;
            let mode = match words.get(3) {
                Some(m) => VlanMode::parse(m)?,
                None => VlanMode::default(),
            };
            let added = match kind {
                "tap" => {
                    crate::tap::check_name(place)?;
                    managed.add_tap(place, mode)
                }
                "vhost-user" => managed.add_vhost_user(Path::new(place), mode),
                "stream" => managed.add_stream(Path::new(place), mode),
                other => {
                    return Err(format!(
                        "unknown port kind '{other}': tap, vhost-user or stream"
                    ))
                }
            };
            let id = added.map_err(|e| e.to_string())?;
            Ok(if json {
                format!("{}\n", json!({ "port": id }))
            } else {
                format!("added port {id}\n")
            })
        }
        "port/remove" => {
            let p = id(words.get(1))?;
            if managed.remove(p) {
                Ok(format!("removed port {p}\n"))
            } else {
                Err(format!("no port {p}"))
            }
        }
        "port/setvlan" => {
            let p = id(words.get(1))?;
            let mode = VlanMode::parse(
                words
                    .get(2)
                    .ok_or("which mode? access:VID or trunk[:native=VID][:VIDS]")?,
            )?;
            if switch.set_vlan(p, mode) {
                Ok(format!("port {p}: {}\n", words[2]))
            } else {
                Err(format!("no port {p}"))
            }
        }
        "hash/print" | "mac/print" => {
            let rows = switch.mac_table();
            if json {
                return Ok(format!(
                    "{}\n",
                    serde_json::to_string(&rows).unwrap_or_default()
                ));
            }
            if rows.is_empty() {
                return Ok("(empty: no MAC address learned yet)\n".to_owned());
            }
            let mut s = String::new();
            for r in rows {
                s.push_str(&format!(
                    "vlan {:>4}  {}  port {:>4}  age {:.0} s\n",
                    r.vlan, r.mac, r.port, r.age_secs
                ));
            }
            Ok(s)
        }
        "vlan/print" => {
            let ports = switch.ports();
            if json {
                let v: Vec<_> = ports
                    .iter()
                    .map(|p| json!({"port": p.id, "vlan": p.vlan}))
                    .collect();
                return Ok(format!("{}\n", serde_json::Value::Array(v)));
            }
            Ok(ports
                .iter()
                .map(|p| format!("port {:>4}  {}\n", p.id, vlan_text(&p.vlan)))
                .collect())
        }
        "" => Err("empty command".into()),
        other => Err(format!("unknown command '{other}' (try help)")),
    }
}

fn vlan_text(v: &VlanMode) -> String {
    match v {
        VlanMode::Access { vlan } => format!("access:{vlan}"),
        VlanMode::Trunk { native, allowed } => {
            let mut s = "trunk".to_owned();
            if let Some(n) = native {
                s.push_str(&format!(":native={n}"));
            }
            if let Some(a) = allowed {
                s.push(':');
                s.push_str(
                    &a.iter()
                        .map(|v| v.to_string())
                        .collect::<Vec<_>>()
                        .join(","),
                );
            }
            s
        }
    }
}

const HELP: &str = "\
help                      this text
showinfo                  switch mode, MAC table use, aging
port/print [ID]           ports with counters (also port/allprint, stats)
port/add tap NAME [MODE]  add a tap port (created, or attached if it exists)
port/add vhost-user PATH [MODE]
                          add a vhost-user-net port listening on PATH
port/add stream PATH [MODE]
                          add a port for QEMU's -netdev stream listening on PATH
port/remove ID            remove a port (its tap or socket goes with it)
port/setvlan ID MODE      access:VID | trunk[:native=VID][:VID,VID...]
hash/print                the MAC table (also mac/print)
vlan/print                VLAN membership per port
logout                    close this connection
Prefix any command with `json ` (or add --json) for one line of JSON.
";

/// Sends one command to a console and returns its answer (what came before `.`).
pub fn ctl(path: &Path, command: &str) -> std::io::Result<String> {
    let mut conn = UnixStream::connect(path)?;
    writeln!(conn, "{command}")?;
    let mut answer = String::new();
    for line in BufReader::new(conn).lines() {
        let line = line?;
        if line == END {
            break;
        }
        answer.push_str(&line);
        answer.push('\n');
    }
    Ok(answer)
}
