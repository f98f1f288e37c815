//! A full 16550A for guests that probe it (Linux's 8250 driver): vm-superio's emulation,
//! its interrupt raised on a GSI through an irqfd. What the guest transmits is kept (for
//! tests and error messages) and copied to an optional sink (the user's terminal, a log).

use std::io::{self, Write};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use vm_superio::serial::NoEvents;
use vm_superio::{Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

pub const COM1_BASE: u16 = 0x3f8;
pub const COM1_GSI: u32 = 4;

/// Raises the UART's interrupt line.
pub struct IrqTrigger(pub Arc<EventFd>);

impl Trigger for IrqTrigger {
    type E = io::Error;
    fn trigger(&self) -> io::Result<()> {
        self.0.write(1)
    }
}

/// Everything transmitted, plus an optional live copy.
#[derive(Clone)]
pub struct Transcript {
    kept: Arc<Mutex<Vec<u8>>>,
    live: Option<Arc<Mutex<Box<dyn Write + Send>>>>,
}

impl Transcript {
    pub fn new(live: Option<Box<dyn Write + Send>>) -> Transcript {
        Transcript {
            kept: Arc::new(Mutex::new(Vec::new())),
            live: live.map(|w| Arc::new(Mutex::new(w))),
        }
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.kept.lock().unwrap()).into_owned()
    }

    /// What was kept, as bytes.
    pub fn bytes(&self) -> Vec<u8> {
        self.kept.lock().unwrap().clone()
    }
}

/// The transcript keeps the last this many bytes (a long build's console must not grow
/// memory without bound); the live copy gets everything.
const KEPT_BYTES: usize = 1 << 20;

impl Write for Transcript {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        {
            let mut kept = self.kept.lock().unwrap();
            kept.extend_from_slice(buf);
            if kept.len() > 2 * KEPT_BYTES {
                let cut = kept.len() - KEPT_BYTES;
                kept.drain(..cut);
            }
        }
        if let Some(live) = &self.live {
            let _ = live.lock().unwrap().write_all(buf);
        }
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        if let Some(live) = &self.live {
            let _ = live.lock().unwrap().flush();
        }
        Ok(())
    }
}

pub struct Uart {
    serial: Mutex<Serial<IrqTrigger, NoEvents, Transcript>>,
    /// Notified when the guest reads the receive register: room in the FIFO for
    /// [`Uart::feed_wait`].
    drained: Condvar,
    /// While a snapshot is taken, host input waits.
    quiesced: std::sync::atomic::AtomicBool,
    base: u16,
}

/// A UART's registers, for snapshots (vm-superio's `SerialState`, which has no serde).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct UartState {
    pub regs: [u8; 9],
    pub in_buffer: Vec<u8>,
}

impl Uart {
    pub fn new(base: u16, irq: Arc<EventFd>, out: Transcript) -> Uart {
        Uart {
            serial: Mutex::new(Serial::new(IrqTrigger(irq), out)),
            drained: Condvar::new(),
            quiesced: std::sync::atomic::AtomicBool::new(false),
            base,
        }
    }

    pub fn save(&self) -> UartState {
        let s = self.lock().state();
        UartState {
            regs: [
                s.baud_divisor_low,
                s.baud_divisor_high,
                s.interrupt_enable,
                s.interrupt_identification,
                s.line_control,
                s.line_status,
                s.modem_control,
                s.modem_status,
                s.scratch,
            ],
            in_buffer: s.in_buffer,
        }
    }

    pub fn restore(
        base: u16,
        irq: Arc<EventFd>,
        out: Transcript,
        saved: &UartState,
    ) -> anyhow::Result<Uart> {
        let r = saved.regs;
        let state = vm_superio::serial::SerialState {
            baud_divisor_low: r[0],
            baud_divisor_high: r[1],
            interrupt_enable: r[2],
            interrupt_identification: r[3],
            line_control: r[4],
            line_status: r[5],
            modem_control: r[6],
            modem_status: r[7],
            scratch: r[8],
            in_buffer: saved.in_buffer.clone(),
        };
        let serial = Serial::from_state(&state, IrqTrigger(irq), NoEvents, out)
            .map_err(|e| anyhow::anyhow!("the saved UART state is invalid: {e:?}"))?;
        Ok(Uart {
            serial: Mutex::new(serial),
            drained: Condvar::new(),
            quiesced: std::sync::atomic::AtomicBool::new(false),
            base,
        })
    }

    fn offset(&self, port: u16) -> Option<u8> {
        port.checked_sub(self.base)
            .filter(|o| *o < 8)
            .map(|o| o as u8)
    }

    /// Handles a port write; false if the port is not this UART's.
    pub fn pio_write(&self, port: u16, data: &[u8]) -> bool {
        let Some(off) = self.offset(port) else {
            return false;
        };
        // `rep outsb` hands over several bytes in one exit: each is a register write.
        let mut serial = self.serial.lock().unwrap();
        for &b in data {
            if let Err(e) = serial.write(off, b) {
                tracing::debug!("uart: {e:?}");
            }
        }
        // Linux's 8250 driver turns the receive interrupt off while the tty is
        // throttled and on again later; a 16550 with bytes waiting interrupts at once
        // then, vm-superio does not, and the guest would never read them.
        if off == IER && data.last().is_some_and(|ier| ier & IER_RDA != 0) {
            reraise_received_data(&mut serial);
        }
        true
    }

    /// Puts host bytes in the receive FIFO (raising the guest's interrupt if it asked for
    /// one); returns how many fitted. The FIFO holds 16550A's 64 bytes: the rest waits
    /// until the guest has read some.
    pub fn feed(&self, bytes: &[u8]) -> usize {
        self.feed_wait(bytes, Duration::ZERO)
    }

    /// As [`Uart::feed`], but waits up to `wait` for the guest to make room when the
    /// FIFO is full.
    pub fn feed_wait(&self, bytes: &[u8], wait: Duration) -> usize {
        use std::sync::atomic::Ordering;
        let mut serial = self.lock();
        if serial.fifo_capacity() == 0 && !wait.is_zero() {
            serial = self
                .drained
                .wait_timeout(serial, wait)
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .0;
        }
        // Checked under the lock a snapshot takes to save this UART.
        if self.quiesced.load(Ordering::Acquire) || serial.fifo_capacity() == 0 {
            return 0;
        }
        serial.enqueue_raw_bytes(bytes).unwrap_or(0)
    }

    /// While set, [`Uart::feed_wait`] takes nothing (a snapshot is being taken).
    pub fn set_quiesced(&self, quiesced: bool) {
        let _serial = self.lock();
        self.quiesced
            .store(quiesced, std::sync::atomic::Ordering::Release);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Serial<IrqTrigger, NoEvents, Transcript>> {
        self.serial
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Handles a port read; false if the port is not this UART's.
    pub fn pio_read(&self, port: u16, data: &mut [u8]) -> bool {
        let Some(off) = self.offset(port) else {
            return false;
        };
        let mut serial = self.serial.lock().unwrap();
        for b in data.iter_mut() {
            *b = serial.read(off);
        }
        if off == DATA && !dlab(&mut serial) {
            // vm-superio clears "received data available" on every byte read, even when
            // bytes remain; a 16550 keeps it up until the FIFO is empty.
            reraise_received_data(&mut serial);
            self.drained.notify_all();
        }
        true
    }
}

const DATA: u8 = 0;
const IER: u8 = 1;
const IER_RDA: u8 = 1;
const LCR: u8 = 3;
const LCR_DLAB: u8 = 0x80;
const MCR: u8 = 4;
const MCR_LOOP: u8 = 0x10;
const FIFO_BYTES: usize = 64;

fn dlab(serial: &mut Serial<IrqTrigger, NoEvents, Transcript>) -> bool {
    serial.read(LCR) & LCR_DLAB != 0
}

/// Raises the receive interrupt again if bytes wait in the FIFO and the guest enabled
/// it. vm-superio raises it only when bytes arrive: taking the waiting bytes out and
/// putting them back in, in order, makes it raise it now.
fn reraise_received_data(serial: &mut Serial<IrqTrigger, NoEvents, Transcript>) {
    let waiting = FIFO_BYTES - serial.fifo_capacity();
    // In loopback mode vm-superio would drop bytes put back in.
    let loopback = serial.read(MCR) & MCR_LOOP != 0;
    if waiting == 0 || loopback || dlab(serial) || serial.read(IER) & IER_RDA == 0 {
        return;
    }
    let bytes: Vec<u8> = (0..waiting).map(|_| serial.read(DATA)).collect();
    if let Err(e) = serial.enqueue_raw_bytes(&bytes) {
        tracing::debug!("uart: re-raising the receive interrupt: {e:?}");
    }
}
