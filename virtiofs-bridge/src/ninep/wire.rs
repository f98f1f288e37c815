//! 9P's wire format: the message header, bounds-checked reading of a request's fields
//! ([`In`]), building a reply ([`Out`]), and what the numbers in the messages mean (qid
//! types, open flags). Every integer is little-endian; a string is a u16 length and its
//! bytes.

/// The header: `size[4] type[1] tag[2]`.
pub(super) const HEADER: usize = 7;
pub(super) const NOFID: u32 = u32::MAX;
/// The type of an error reply.
pub(super) const RLERROR: u8 = 7;

pub(super) const QTDIR: u8 = 0x80;
pub(super) const QTSYMLINK: u8 = 0x02;

// Open flags on the wire (P9_DOTL_*; they happen to equal x86 Linux's, but are mapped
// one by one so that nothing else ever reaches the host's open).
pub(super) const P9_WRONLY: u32 = 0o1;
pub(super) const P9_RDWR: u32 = 0o2;
pub(super) const P9_CREATE: u32 = 0o100;
pub(super) const P9_EXCL: u32 = 0o200;
pub(super) const P9_TRUNC: u32 = 0o1000;
const P9_APPEND: u32 = 0o2000;
const P9_DSYNC: u32 = 0o10000;
const P9_SYNC: u32 = 0o4000000;

/// Host open flags for a Tlopen/Tlcreate's flags, and whether the file is open for
/// writing. Only the access mode, O_TRUNC, O_APPEND and the sync flags pass; O_CREAT,
/// O_DIRECT, O_NOATIME and the rest are never handed on.
pub(super) fn open_flags(flags: u32) -> (i32, bool) {
    let (mut host, writes) = match flags & 3 {
        P9_WRONLY => (libc::O_WRONLY, true),
        P9_RDWR => (libc::O_RDWR, true),
        _ => (libc::O_RDONLY, false),
    };
    if flags & P9_TRUNC != 0 {
        host |= libc::O_TRUNC;
    }
    if flags & P9_APPEND != 0 {
        host |= libc::O_APPEND;
    }
    if flags & P9_DSYNC != 0 {
        host |= libc::O_DSYNC;
    }
    if flags & P9_SYNC != 0 {
        host |= libc::O_SYNC;
    }
    (host, writes)
}

/// A node's identity as 9P gives it: type, version, path (the inode).
pub(super) type Qid = (u8, u32, u64);

/// A message's header.
pub(super) struct Header {
    pub size: usize,
    pub kind: u8,
    pub tag: u16,
}

impl Header {
    /// The header of `msg`, or `None` when it is too short to hold one (not even a tag to
    /// answer).
    pub fn read(msg: &[u8]) -> Option<Header> {
        let head = msg.get(..HEADER)?;
        Some(Header {
            size: u32::from_le_bytes(head[..4].try_into().unwrap()) as usize,
            kind: head[4],
            tag: u16::from_le_bytes([head[5], head[6]]),
        })
    }

    /// The message's fields after the header: what its size field covers, which must lie
    /// within `msg` (bytes past it are ignored).
    pub fn body<'a>(&self, msg: &'a [u8]) -> Result<&'a [u8], ParseError> {
        if self.size < HEADER || self.size > msg.len() {
            return Err(ParseError::Size);
        }
        Ok(&msg[HEADER..self.size])
    }
}

/// What makes a message malformed: it is answered `Rlerror(EINVAL)` and counted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub(crate) enum ParseError {
    /// The size field is smaller than a header or larger than the bytes received.
    #[error("the size field does not match the message")]
    Size,
    /// A field runs past the end of the message (or a string's length does).
    #[error("a field runs past the end of the message")]
    Truncated,
    /// Twalk names more than 16 components.
    #[error("{0} names to walk, more than 16")]
    TooManyNames(u16),
    /// Twrite carries more data than the negotiated msize allows.
    #[error("{0} bytes to write do not fit the negotiated msize")]
    OverMsize(usize),
}

/// A request's fields being read; every read is bounds-checked.
pub(super) struct In<'a> {
    b: &'a [u8],
    at: usize,
}

impl<'a> In<'a> {
    pub fn new(b: &'a [u8]) -> In<'a> {
        In { b, at: 0 }
    }
    pub fn take(&mut self, n: usize) -> Result<&'a [u8], ParseError> {
        let end = self.at.checked_add(n).ok_or(ParseError::Truncated)?;
        let s = self.b.get(self.at..end).ok_or(ParseError::Truncated)?;
        self.at = end;
        Ok(s)
    }
    fn array<const N: usize>(&mut self) -> Result<[u8; N], ParseError> {
        Ok(self.take(N)?.try_into().unwrap())
    }
    pub fn u8(&mut self) -> Result<u8, ParseError> {
        Ok(self.take(1)?[0])
    }
    pub fn u16(&mut self) -> Result<u16, ParseError> {
        Ok(u16::from_le_bytes(self.array()?))
    }
    pub fn u32(&mut self) -> Result<u32, ParseError> {
        Ok(u32::from_le_bytes(self.array()?))
    }
    pub fn u64(&mut self) -> Result<u64, ParseError> {
        Ok(u64::from_le_bytes(self.array()?))
    }
    pub fn str(&mut self) -> Result<&'a [u8], ParseError> {
        let n = self.u16()? as usize;
        self.take(n)
    }
}

/// A message being built (a reply; a request in tests): [`Out::message`] leaves room for
/// the header, which [`Out::finish`] fills in once the size is known. `Out::default()`
/// builds bare fields (Rreaddir's entries).
#[derive(Default)]
pub(super) struct Out(Vec<u8>);

impl Out {
    pub fn message() -> Out {
        Out(vec![0u8; HEADER])
    }
    pub fn u8(&mut self, v: u8) -> &mut Self {
        self.0.push(v);
        self
    }
    pub fn u16(&mut self, v: u16) -> &mut Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    pub fn u32(&mut self, v: u32) -> &mut Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    pub fn u64(&mut self, v: u64) -> &mut Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    pub fn str(&mut self, s: &[u8]) -> &mut Self {
        self.u16(s.len() as u16);
        self.0.extend_from_slice(s);
        self
    }
    pub fn qid(&mut self, q: Qid) -> &mut Self {
        self.u8(q.0).u32(q.1).u64(q.2)
    }
    /// Raw bytes (Rread's data, Rreaddir's entries).
    pub fn bytes(&mut self, b: &[u8]) -> &mut Self {
        self.0.extend_from_slice(b);
        self
    }
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }
    /// The message, with its header: its size, `kind` and `tag`.
    pub fn finish(mut self, kind: u8, tag: u16) -> Vec<u8> {
        let len = self.0.len() as u32;
        self.0[..4].copy_from_slice(&len.to_le_bytes());
        self.0[4] = kind;
        self.0[5..HEADER].copy_from_slice(&tag.to_le_bytes());
        self.0
    }
}

/// Rlerror: the request failed with `errno`.
pub(super) fn lerror(tag: u16, errno: u32) -> Vec<u8> {
    let mut o = Out::message();
    o.u32(errno);
    o.finish(RLERROR, tag)
}
