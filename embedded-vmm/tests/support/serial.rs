//! The console: the output side of a 16550 UART at the usual COM1 ports. Bytes written to
//! the transmit register are collected; the line status register always reports the
//! transmitter empty, so a polling driver (Linux's early console, the test guests) never
//! waits. Receive and interrupts come with the virtio devices that need them.

use std::sync::Mutex;

pub const COM1: u16 = 0x3f8;
const THR: u16 = 0;
const LSR: u16 = 5;
/// Transmit holding register and transmitter empty.
const LSR_THR_EMPTY: u8 = 0x60;

#[derive(Default)]
pub struct SerialConsole {
    out: Mutex<Vec<u8>>,
}

impl SerialConsole {
    /// Handles a port write; false if the port is not this UART's.
    pub fn write(&self, port: u16, data: &[u8]) -> bool {
        if !(COM1..COM1 + 8).contains(&port) {
            return false;
        }
        if port - COM1 == THR {
            self.out.lock().unwrap().extend_from_slice(data);
        }
        true
    }

    /// Handles a port read; false if the port is not this UART's.
    pub fn read(&self, port: u16, data: &mut [u8]) -> bool {
        if !(COM1..COM1 + 8).contains(&port) {
            return false;
        }
        data.fill(0);
        if port - COM1 == LSR {
            data[0] = LSR_THR_EMPTY;
        }
        true
    }

    /// Everything the guest wrote so far.
    pub fn output(&self) -> Vec<u8> {
        self.out.lock().unwrap().clone()
    }
}
