//! 9P over TCP: how a host-side client, or a guest with `trans=tcp`, reaches the server.

use std::io::{Read, Write};
use std::net::TcpListener;
use std::sync::Arc;

use super::wire::HEADER;
use super::{NinepServer, MAX_MSIZE};

/// Serves 9p over TCP (9P's own framing: every message starts with its size), one
/// thread per connection. Runs until the listener fails.
pub fn serve_tcp(listener: TcpListener, server: Arc<NinepServer>) {
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { break };
            let _ = conn.set_nodelay(true);
            let server = server.clone();
            std::thread::spawn(move || loop {
                let mut size = [0u8; 4];
                if conn.read_exact(&mut size).is_err() {
                    break;
                }
                let n = u32::from_le_bytes(size) as usize;
                if !(HEADER..=MAX_MSIZE as usize + 4096).contains(&n) {
                    break;
                }
                let mut msg = size.to_vec();
                msg.resize(n, 0);
                if conn.read_exact(&mut msg[4..]).is_err() {
                    break;
                }
                if let Some(reply) = server.handle(&msg) {
                    if conn.write_all(&reply).is_err() {
                        break;
                    }
                }
            });
        }
    });
}
