//! virtio-blk over an image file that is never written: reads come from the file, and
//! writes go to a copy-on-write overlay in host memory that goes away with the device
//! (as QEMU's `snapshot=on`). This is how `vmbuild run --image` gives a distribution image
//! to a guest of the embedded VMM. Requests that do not fit the device (outside the disk,
//! not whole sectors, a malformed chain) are answered with an error status or dropped and
//! counted; the guest's other requests go on.

use std::collections::HashMap;
use std::fs::File;
use std::io::{Read, Write};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;

use anyhow::Context;
use virtio_queue::{Queue, QueueT};
use vm_memory::GuestMemoryMmap;

use super::{IrqLine, VirtioDevice, VIRTIO_F_VERSION_1};

pub const SECTOR: u64 = 512;
/// The overlay's unit: a write of part of one copies the rest from the image first.
const CHUNK: u64 = 4096;
/// The largest request served (the driver's default limit is far below).
const MAX_REQUEST: usize = 4 << 20;

const T_IN: u32 = 0;
const T_OUT: u32 = 1;
const T_FLUSH: u32 = 4;
const T_GET_ID: u32 = 8;
const S_OK: u8 = 0;
const S_IOERR: u8 = 1;
const S_UNSUPP: u8 = 2;
/// VIRTIO_BLK_F_FLUSH: the driver sends flushes (answered at once: nothing is kept).
const F_FLUSH: u64 = 1 << 9;

struct Active {
    mem: GuestMemoryMmap,
    queue: Queue,
    irq: IrqLine,
}

pub struct BlockDevice {
    image: File,
    capacity: u64,
    overlay: HashMap<u64, Box<[u8]>>,
    config: [u8; 8],
    active: Option<Active>,
    bad_chains: Arc<AtomicU64>,
}

impl BlockDevice {
    /// The image at `path`, opened read-only; its size is rounded down to whole sectors.
    pub fn open(path: &Path) -> anyhow::Result<BlockDevice> {
        let image = File::open(path).with_context(|| format!("opening {}", path.display()))?;
        let len = image.metadata()?.len();
        anyhow::ensure!(
            len >= SECTOR,
            "{} is smaller than one sector",
            path.display()
        );
        let capacity = len / SECTOR;
        Ok(BlockDevice {
            image,
            capacity,
            overlay: HashMap::new(),
            config: capacity.to_le_bytes(),
            active: None,
            bad_chains: Arc::new(AtomicU64::new(0)),
        })
    }

    /// Chains that could not carry a request or its status.
    pub fn bad_chains(&self) -> Arc<AtomicU64> {
        self.bad_chains.clone()
    }

    /// Reads `buf.len()` bytes at byte `at`, the overlay over the image.
    fn read_at(&self, mut at: u64, mut buf: &mut [u8]) -> std::io::Result<()> {
        while !buf.is_empty() {
            let chunk = at / CHUNK;
            let within = (at % CHUNK) as usize;
            let n = buf.len().min(CHUNK as usize - within);
            match self.overlay.get(&chunk) {
                Some(data) => buf[..n].copy_from_slice(&data[within..within + n]),
                None => self.image.read_exact_at(&mut buf[..n], at)?,
            }
            at += n as u64;
            buf = &mut buf[n..];
        }
        Ok(())
    }

    fn write_at(&mut self, mut at: u64, mut data: &[u8]) -> std::io::Result<()> {
        while !data.is_empty() {
            let chunk = at / CHUNK;
            let within = (at % CHUNK) as usize;
            let n = data.len().min(CHUNK as usize - within);
            if !self.overlay.contains_key(&chunk) {
                let mut copy = vec![0u8; CHUNK as usize].into_boxed_slice();
                let start = chunk * CHUNK;
                let end = (start + CHUNK).min(self.capacity * SECTOR);
                self.image
                    .read_exact_at(&mut copy[..(end - start) as usize], start)?;
                self.overlay.insert(chunk, copy);
            }
            let slot = self.overlay.get_mut(&chunk).expect("inserted above");
            slot[within..within + n].copy_from_slice(&data[..n]);
            at += n as u64;
            data = &data[n..];
        }
        Ok(())
    }

    /// The status of one request whose header is `header`; `data_in` is what an OUT
    /// request carries, `data_out` where an IN request's data goes.
    fn serve(&mut self, kind: u32, sector: u64, data_in: &[u8], data_out: &mut [u8]) -> u8 {
        let len = (data_in.len() + data_out.len()) as u64;
        let in_range = |len: u64| {
            len.is_multiple_of(SECTOR)
                && sector
                    .checked_add(len / SECTOR)
                    .is_some_and(|end| end <= self.capacity)
        };
        match kind {
            T_IN if in_range(len) => match self.read_at(sector * SECTOR, data_out) {
                Ok(()) => S_OK,
                Err(_) => S_IOERR,
            },
            T_OUT if in_range(len) => match self.write_at(sector * SECTOR, data_in) {
                Ok(()) => S_OK,
                Err(_) => S_IOERR,
            },
            T_IN | T_OUT => S_IOERR,
            T_FLUSH => S_OK,
            T_GET_ID => {
                let id = b"vmbuild-image";
                let n = id.len().min(data_out.len());
                data_out[..n].copy_from_slice(&id[..n]);
                S_OK
            }
            _ => S_UNSUPP,
        }
    }
}

impl VirtioDevice for BlockDevice {
    fn device_type(&self) -> u32 {
        2
    }

    fn features(&self) -> u64 {
        VIRTIO_F_VERSION_1 | F_FLUSH
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[128]
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        super::read_config_bytes(&self.config, offset, data);
    }

    fn activate(
        &mut self,
        mem: GuestMemoryMmap,
        mut queues: Vec<Queue>,
        irq: IrqLine,
    ) -> anyhow::Result<()> {
        anyhow::ensure!(queues.len() == 1, "virtio-blk has one queue here");
        self.active = Some(Active {
            mem,
            queue: queues.pop().expect("one queue"),
            irq,
        });
        Ok(())
    }

    fn queue_notify(&mut self, index: u16) {
        let Some(mut a) = self.active.take() else {
            return;
        };
        if index == 0 {
            let mut returned = false;
            let mut budget = a.queue.size();
            while budget > 0 {
                let Some(chain) = a.queue.pop_descriptor_chain(&a.mem) else {
                    break;
                };
                budget -= 1;
                let head = chain.head_index();
                let used = self.one_request(&a.mem, chain);
                let _ = a.queue.add_used(&a.mem, head, used);
                returned = true;
            }
            if returned {
                a.irq.signal_used();
            }
        }
        self.active = Some(a);
    }

    fn reset(&mut self) {
        self.active = None;
    }

    fn queue_states(&self) -> Vec<virtio_queue::QueueState> {
        self.active
            .as_ref()
            .map(|a| vec![a.queue.state()])
            .unwrap_or_default()
    }

    fn snapshot_blocker(&self) -> Option<String> {
        (!self.overlay.is_empty()).then(|| {
            "the disk image's overlay (the guest's writes) is not saved in snapshots".into()
        })
    }
}

impl BlockDevice {
    /// Serves one chain; returns the bytes written into it (0 for a dropped chain).
    fn one_request(
        &mut self,
        mem: &GuestMemoryMmap,
        chain: virtio_queue::DescriptorChain<&GuestMemoryMmap>,
    ) -> u32 {
        let bad = |d: &Self| {
            d.bad_chains.fetch_add(1, Relaxed);
            0
        };
        let (Ok(mut reader), Ok(mut writer)) = (chain.clone().reader(mem), chain.writer(mem))
        else {
            return bad(self);
        };
        let mut header = [0u8; 16];
        if reader.read_exact(&mut header).is_err() || writer.available_bytes() < 1 {
            return bad(self);
        }
        let kind = u32::from_le_bytes(header[0..4].try_into().expect("4 bytes"));
        let sector = u64::from_le_bytes(header[8..16].try_into().expect("8 bytes"));
        let data_in_len = reader.available_bytes();
        let data_out_len = writer.available_bytes() - 1;
        if data_in_len > MAX_REQUEST || data_out_len > MAX_REQUEST {
            return bad(self);
        }
        let mut data_in = vec![0u8; data_in_len];
        if reader.read_exact(&mut data_in).is_err() {
            return bad(self);
        }
        let mut data_out = vec![0u8; data_out_len];
        let status = self.serve(kind, sector, &data_in, &mut data_out);
        if writer.write_all(&data_out).is_err() || writer.write_all(&[status]).is_err() {
            return bad(self);
        }
        (data_out_len + 1) as u32
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn device(bytes: &[u8]) -> (tempfile::NamedTempFile, BlockDevice) {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(bytes).unwrap();
        let d = BlockDevice::open(f.path()).unwrap();
        (f, d)
    }

    #[test]
    fn writes_stay_in_the_overlay_and_the_image_is_never_changed() {
        let image: Vec<u8> = (0..8192u32).map(|i| (i % 251) as u8).collect();
        let (file, mut d) = device(&image);
        assert_eq!(d.read_config_u64(), 16);
        let mut out = vec![0u8; 1024];
        assert_eq!(d.serve(T_IN, 1, &[], &mut out), S_OK);
        assert_eq!(out, image[512..1536]);
        // A write across the chunk boundary, then read back over it.
        assert_eq!(d.serve(T_OUT, 7, &[0xaa; 1024], &mut []), S_OK);
        let mut back = vec![0u8; 2048];
        assert_eq!(d.serve(T_IN, 6, &[], &mut back), S_OK);
        assert_eq!(back[..512], image[3072..3584]);
        assert!(back[512..1536].iter().all(|b| *b == 0xaa));
        assert_eq!(back[1536..], image[4608..5120]);
        assert_eq!(std::fs::read(file.path()).unwrap(), image);
        assert!(d.snapshot_blocker().is_some());
    }

    #[test]
    fn requests_outside_the_disk_or_of_part_sectors_fail_without_harm() {
        let (_f, mut d) = device(&[7u8; 4096]);
        let mut out = vec![0u8; 512];
        assert_eq!(d.serve(T_IN, 8, &[], &mut out), S_IOERR);
        assert_eq!(d.serve(T_IN, u64::MAX, &[], &mut out), S_IOERR);
        assert_eq!(d.serve(T_OUT, 0, &[1; 100], &mut []), S_IOERR);
        assert_eq!(d.serve(99, 0, &[], &mut []), S_UNSUPP);
        assert_eq!(d.serve(T_FLUSH, 0, &[], &mut []), S_OK);
        assert_eq!(d.serve(T_IN, 7, &[], &mut out), S_OK);
        assert_eq!(out, [7u8; 512]);
        assert!(d.overlay.is_empty());
    }

    impl BlockDevice {
        fn read_config_u64(&self) -> u64 {
            let mut b = [0u8; 8];
            self.read_config(0, &mut b);
            u64::from_le_bytes(b)
        }
    }
}
