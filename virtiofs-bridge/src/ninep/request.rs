//! The 9P2000.L requests this server handles, parsed from the wire into [`Request`]
//! before anything is done with them. A request whose fields do not fit its message is a
//! [`ParseError`]; bytes after the last field are ignored (as a v9fs client never sends
//! any). Any other message type is not a [`Type`]: it is answered `EOPNOTSUPP` (Txattrwalk
//! among them: the guest's tools carry on without xattrs).

use super::wire::{In, ParseError, P9_CREATE, P9_RDWR, P9_TRUNC, P9_WRONLY};

/// The T-message types handled, by their number on the wire (the reply's is one more).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub(super) enum Type {
    Statfs = 8,
    Lopen = 12,
    Lcreate = 14,
    Symlink = 16,
    Mknod = 18,
    Rename = 20,
    Readlink = 22,
    Getattr = 24,
    Setattr = 26,
    Xattrcreate = 32,
    Readdir = 40,
    Fsync = 50,
    Lock = 52,
    Getlock = 54,
    Link = 70,
    Mkdir = 72,
    Renameat = 74,
    Unlinkat = 76,
    Version = 100,
    Attach = 104,
    Flush = 108,
    Walk = 110,
    Read = 116,
    Write = 118,
    Clunk = 120,
    Remove = 122,
}

impl Type {
    /// Every type, by wire number.
    #[rustfmt::skip]
    pub const ALL: [Type; 26] = {
        use Type::*;
        [
            Statfs, Lopen, Lcreate, Symlink, Mknod, Rename, Readlink, Getattr, Setattr,
            Xattrcreate, Readdir, Fsync, Lock, Getlock, Link, Mkdir, Renameat, Unlinkat,
            Version, Attach, Flush, Walk, Read, Write, Clunk, Remove,
        ]
    };

    /// The type a message's type byte names, if it is one this server handles.
    pub fn from_wire(b: u8) -> Option<Type> {
        Type::ALL.into_iter().find(|t| *t as u8 == b)
    }

    /// The type of the reply.
    pub fn reply(self) -> u8 {
        self as u8 + 1
    }

    /// Whether every request of this type changes the share: a read-only share answers it
    /// `EROFS` whatever its fields hold (without parsing them). Tlopen is decided by its
    /// flags ([`Request::is_mutation`]).
    pub fn is_mutation(self) -> bool {
        use Type::*;
        matches!(
            self,
            Lcreate
                | Symlink
                | Mknod
                | Rename
                | Setattr
                | Xattrcreate
                | Link
                | Mkdir
                | Renameat
                | Unlinkat
                | Write
                | Remove
        )
    }

    /// Whether a read-only share serves this type: not the mutations, and not Tfsync or
    /// the locks either (nothing to sync; answered `EOPNOTSUPP`).
    pub fn served_read_only(self) -> bool {
        !self.is_mutation() && !matches!(self, Type::Fsync | Type::Lock | Type::Getlock)
    }
}

/// Tsetattr's fields after the fid: which attributes to set (`valid`) and their values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct SetAttr {
    pub valid: u32,
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub size: u64,
    /// Seconds and nanoseconds.
    pub atime: (u64, u64),
    pub mtime: (u64, u64),
}

/// A request, with its fields as the wire has them, in wire order (names are raw bytes:
/// they are checked where they are used). Fields the server reads but does not use (a
/// gid for new nodes, Tattach's user names, lock ranges) are kept so that the type says
/// the whole message.
#[derive(Debug, Clone, PartialEq, Eq)]
#[allow(dead_code)] // the unused fields above: parsed, checked for presence, not acted on
#[rustfmt::skip] // one line per message: the table of the format
pub(super) enum Request<'a> {
    Version { msize: u32, version: &'a [u8] },
    Attach { fid: u32, afid: u32, uname: &'a [u8], aname: &'a [u8] },
    /// At most 16 names.
    Walk { fid: u32, newfid: u32, names: Vec<&'a [u8]> },
    Lopen { fid: u32, flags: u32 },
    Read { fid: u32, offset: u64, count: u32 },
    Readdir { fid: u32, offset: u64, count: u32 },
    /// Every attribute is answered, whatever the mask.
    Getattr { fid: u32, mask: u64 },
    Readlink { fid: u32 },
    Statfs { fid: u32 },
    Clunk { fid: u32 },
    /// Its oldtag is not read: each request is answered before the next one is taken, so
    /// there is never one in flight to flush.
    Flush,
    Lcreate { fid: u32, name: &'a [u8], flags: u32, mode: u32, gid: u32 },
    Symlink { dfid: u32, name: &'a [u8], target: &'a [u8], gid: u32 },
    Mknod { dfid: u32, name: &'a [u8], mode: u32, major: u32, minor: u32, gid: u32 },
    Rename { fid: u32, dfid: u32, name: &'a [u8] },
    Setattr { fid: u32, attr: SetAttr },
    Xattrcreate { fid: u32, name: &'a [u8], size: u64, flags: u32 },
    /// Older clients send no datasync field: it is then false.
    Fsync { fid: u32, datasync: bool },
    Lock { fid: u32, kind: u8, flags: u32, start: u64, length: u64, proc_id: u32, client: &'a [u8] },
    Getlock { fid: u32, kind: u8, start: u64, length: u64, proc_id: u32, client: &'a [u8] },
    Link { dfid: u32, fid: u32, name: &'a [u8] },
    Mkdir { dfid: u32, name: &'a [u8], mode: u32, gid: u32 },
    Renameat { olddfid: u32, oldname: &'a [u8], newdfid: u32, newname: &'a [u8] },
    Unlinkat { dfid: u32, name: &'a [u8], flags: u32 },
    /// The data is what the count field says, all of it in the message.
    Write { fid: u32, offset: u64, data: &'a [u8] },
    Remove { fid: u32 },
}

/// The most names one Twalk may carry (MAXWELEM).
const MAX_WALK: u16 = 16;

impl<'a> Request<'a> {
    /// The request of type `kind` whose fields are `body` (the message after its header).
    /// One line per message, each field in wire order (a struct expression evaluates its
    /// fields in the order written): the table of the format.
    #[rustfmt::skip]
    pub fn parse(kind: Type, body: &'a [u8]) -> Result<Request<'a>, ParseError> {
        use Request as R;
        let r = &mut In::new(body);
        Ok(match kind {
            Type::Version => R::Version { msize: r.u32()?, version: r.str()? },
            Type::Attach => R::Attach { fid: r.u32()?, afid: r.u32()?, uname: r.str()?, aname: r.str()? },
            Type::Walk => R::Walk { fid: r.u32()?, newfid: r.u32()?, names: walk_names(r)? },
            Type::Lopen => R::Lopen { fid: r.u32()?, flags: r.u32()? },
            Type::Read => R::Read { fid: r.u32()?, offset: r.u64()?, count: r.u32()? },
            Type::Readdir => R::Readdir { fid: r.u32()?, offset: r.u64()?, count: r.u32()? },
            Type::Getattr => R::Getattr { fid: r.u32()?, mask: r.u64()? },
            Type::Readlink => R::Readlink { fid: r.u32()? },
            Type::Statfs => R::Statfs { fid: r.u32()? },
            Type::Clunk => R::Clunk { fid: r.u32()? },
            Type::Flush => R::Flush,
            Type::Lcreate => R::Lcreate { fid: r.u32()?, name: r.str()?, flags: r.u32()?, mode: r.u32()?, gid: r.u32()? },
            Type::Symlink => R::Symlink { dfid: r.u32()?, name: r.str()?, target: r.str()?, gid: r.u32()? },
            Type::Mknod => R::Mknod { dfid: r.u32()?, name: r.str()?, mode: r.u32()?, major: r.u32()?, minor: r.u32()?, gid: r.u32()? },
            Type::Rename => R::Rename { fid: r.u32()?, dfid: r.u32()?, name: r.str()? },
            Type::Setattr => R::Setattr { fid: r.u32()?, attr: SetAttr {
                valid: r.u32()?, mode: r.u32()?, uid: r.u32()?, gid: r.u32()?, size: r.u64()?,
                atime: (r.u64()?, r.u64()?), mtime: (r.u64()?, r.u64()?),
            } },
            Type::Xattrcreate => R::Xattrcreate { fid: r.u32()?, name: r.str()?, size: r.u64()?, flags: r.u32()? },
            Type::Fsync => R::Fsync { fid: r.u32()?, datasync: r.u32().unwrap_or(0) != 0 },
            Type::Lock => R::Lock { fid: r.u32()?, kind: r.u8()?, flags: r.u32()?, start: r.u64()?, length: r.u64()?, proc_id: r.u32()?, client: r.str()? },
            Type::Getlock => R::Getlock { fid: r.u32()?, kind: r.u8()?, start: r.u64()?, length: r.u64()?, proc_id: r.u32()?, client: r.str()? },
            Type::Link => R::Link { dfid: r.u32()?, fid: r.u32()?, name: r.str()? },
            Type::Mkdir => R::Mkdir { dfid: r.u32()?, name: r.str()?, mode: r.u32()?, gid: r.u32()? },
            Type::Renameat => R::Renameat { olddfid: r.u32()?, oldname: r.str()?, newdfid: r.u32()?, newname: r.str()? },
            Type::Unlinkat => R::Unlinkat { dfid: r.u32()?, name: r.str()?, flags: r.u32()? },
            Type::Write => R::Write { fid: r.u32()?, offset: r.u64()?, data: { let n = r.u32()?; r.take(n as usize)? } },
            Type::Remove => R::Remove { fid: r.u32()? },
        })
    }

    pub fn kind(&self) -> Type {
        use Request as R;
        match self {
            R::Version { .. } => Type::Version,
            R::Attach { .. } => Type::Attach,
            R::Walk { .. } => Type::Walk,
            R::Lopen { .. } => Type::Lopen,
            R::Read { .. } => Type::Read,
            R::Readdir { .. } => Type::Readdir,
            R::Getattr { .. } => Type::Getattr,
            R::Readlink { .. } => Type::Readlink,
            R::Statfs { .. } => Type::Statfs,
            R::Clunk { .. } => Type::Clunk,
            R::Flush => Type::Flush,
            R::Lcreate { .. } => Type::Lcreate,
            R::Symlink { .. } => Type::Symlink,
            R::Mknod { .. } => Type::Mknod,
            R::Rename { .. } => Type::Rename,
            R::Setattr { .. } => Type::Setattr,
            R::Xattrcreate { .. } => Type::Xattrcreate,
            R::Fsync { .. } => Type::Fsync,
            R::Lock { .. } => Type::Lock,
            R::Getlock { .. } => Type::Getlock,
            R::Link { .. } => Type::Link,
            R::Mkdir { .. } => Type::Mkdir,
            R::Renameat { .. } => Type::Renameat,
            R::Unlinkat { .. } => Type::Unlinkat,
            R::Write { .. } => Type::Write,
            R::Remove { .. } => Type::Remove,
        }
    }

    /// Whether serving this request would change the share (a read-only share answers it
    /// `EROFS`): every request of a mutating type, and a Tlopen that asks to write,
    /// truncate or create.
    pub fn is_mutation(&self) -> bool {
        match self {
            Request::Lopen { flags, .. } => {
                flags & (P9_WRONLY | P9_RDWR | P9_TRUNC | P9_CREATE) != 0
            }
            other => other.kind().is_mutation(),
        }
    }
}

fn walk_names<'a>(r: &mut In<'a>) -> Result<Vec<&'a [u8]>, ParseError> {
    let n = r.u16()?;
    if n > MAX_WALK {
        return Err(ParseError::TooManyNames(n));
    }
    (0..n).map(|_| r.str()).collect()
}

#[cfg(test)]
mod tests {
    use super::super::wire::{Header, Out, HEADER};
    use super::*;

    /// The message for `req`, each field in wire order: the parser's inverse.
    #[rustfmt::skip] // one line per message, as in the parser
    fn encode(req: &Request, tag: u16) -> Vec<u8> {
        use Request as R;
        let mut o = Out::message();
        match req {
            R::Version { msize, version } => o.u32(*msize).str(version),
            R::Attach { fid, afid, uname, aname } => o.u32(*fid).u32(*afid).str(uname).str(aname),
            R::Walk { fid, newfid, names } => {
                o.u32(*fid).u32(*newfid).u16(names.len() as u16);
                names.iter().fold(&mut o, |o, n| o.str(n))
            }
            R::Lopen { fid, flags } => o.u32(*fid).u32(*flags),
            R::Read { fid, offset, count } => o.u32(*fid).u64(*offset).u32(*count),
            R::Readdir { fid, offset, count } => o.u32(*fid).u64(*offset).u32(*count),
            R::Getattr { fid, mask } => o.u32(*fid).u64(*mask),
            R::Readlink { fid } | R::Statfs { fid } | R::Clunk { fid } | R::Remove { fid } => o.u32(*fid),
            R::Flush => &mut o,
            R::Lcreate { fid, name, flags, mode, gid } => o.u32(*fid).str(name).u32(*flags).u32(*mode).u32(*gid),
            R::Symlink { dfid, name, target, gid } => o.u32(*dfid).str(name).str(target).u32(*gid),
            R::Mknod { dfid, name, mode, major, minor, gid } => o.u32(*dfid).str(name).u32(*mode).u32(*major).u32(*minor).u32(*gid),
            R::Rename { fid, dfid, name } => o.u32(*fid).u32(*dfid).str(name),
            R::Setattr { fid, attr: a } => o.u32(*fid).u32(a.valid).u32(a.mode).u32(a.uid).u32(a.gid).u64(a.size)
                .u64(a.atime.0).u64(a.atime.1).u64(a.mtime.0).u64(a.mtime.1),
            R::Xattrcreate { fid, name, size, flags } => o.u32(*fid).str(name).u64(*size).u32(*flags),
            R::Fsync { fid, datasync } => o.u32(*fid).u32(*datasync as u32),
            R::Lock { fid, kind, flags, start, length, proc_id, client } => {
                o.u32(*fid).u8(*kind).u32(*flags).u64(*start).u64(*length).u32(*proc_id).str(client)
            }
            R::Getlock { fid, kind, start, length, proc_id, client } => {
                o.u32(*fid).u8(*kind).u64(*start).u64(*length).u32(*proc_id).str(client)
            }
            R::Link { dfid, fid, name } => o.u32(*dfid).u32(*fid).str(name),
            R::Mkdir { dfid, name, mode, gid } => o.u32(*dfid).str(name).u32(*mode).u32(*gid),
            R::Renameat { olddfid, oldname, newdfid, newname } => o.u32(*olddfid).str(oldname).u32(*newdfid).str(newname),
            R::Unlinkat { dfid, name, flags } => o.u32(*dfid).str(name).u32(*flags),
            R::Write { fid, offset, data } => o.u32(*fid).u64(*offset).u32(data.len() as u32).bytes(data),
        };
        o.finish(req.kind() as u8, tag)
    }

    /// One request of every type, with values that differ from field to field.
    #[rustfmt::skip] // one line per message
    fn samples() -> Vec<Request<'static>> {
        use Request as R;
        let attr = SetAttr { valid: 0x1ff, mode: 0o755, uid: 1000, gid: 1001, size: 12345, atime: (1, 2), mtime: (3, 4) };
        vec![
            R::Version { msize: 65536, version: b"9P2000.L" },
            R::Attach { fid: 1, afid: u32::MAX, uname: b"root", aname: b"" },
            R::Walk { fid: 1, newfid: 2, names: vec![b"a", b"..", b"c"] },
            R::Lopen { fid: 2, flags: 0o1002 },
            R::Read { fid: 3, offset: 1 << 40, count: 4096 },
            R::Readdir { fid: 4, offset: 7, count: 8192 },
            R::Getattr { fid: 5, mask: 0x3fff },
            R::Readlink { fid: 6 },
            R::Statfs { fid: 7 },
            R::Clunk { fid: 8 },
            R::Flush,
            R::Lcreate { fid: 9, name: b"new", flags: 0o102, mode: 0o644, gid: 100 },
            R::Symlink { dfid: 10, name: b"link", target: b"../t", gid: 101 },
            R::Mknod { dfid: 11, name: b"fifo", mode: 0o10600, major: 1, minor: 2, gid: 102 },
            R::Rename { fid: 12, dfid: 13, name: b"moved" },
            R::Setattr { fid: 14, attr },
            R::Xattrcreate { fid: 15, name: b"user.x", size: 9, flags: 1 },
            R::Fsync { fid: 16, datasync: true },
            R::Lock { fid: 17, kind: 1, flags: 2, start: 3, length: 4, proc_id: 5, client: b"guest" },
            R::Getlock { fid: 18, kind: 0, start: 6, length: 7, proc_id: 8, client: b"g" },
            R::Link { dfid: 19, fid: 20, name: b"hard" },
            R::Mkdir { dfid: 21, name: b"dir", mode: 0o700, gid: 103 },
            R::Renameat { olddfid: 22, oldname: b"a", newdfid: 23, newname: b"b" },
            R::Unlinkat { dfid: 24, name: b"gone", flags: 0x200 },
            R::Write { fid: 25, offset: 99, data: b"some bytes" },
            R::Remove { fid: 26 },
        ]
    }

    fn parse_message(msg: &[u8]) -> Result<Request<'_>, ParseError> {
        let header = Header::read(msg).expect("a header");
        let kind = Type::from_wire(header.kind).expect("a handled type");
        Request::parse(kind, header.body(msg)?)
    }

    #[test]
    fn every_type_has_a_sample() {
        let mut kinds: Vec<Type> = samples().iter().map(Request::kind).collect();
        kinds.sort_by_key(|t| *t as u8);
        assert_eq!(kinds, Type::ALL);
    }

    #[test]
    fn each_request_round_trips() {
        for req in samples() {
            let msg = encode(&req, 0x1234);
            let header = Header::read(&msg).unwrap();
            assert_eq!((header.size, header.tag), (msg.len(), 0x1234));
            assert_eq!(parse_message(&msg), Ok(req));
        }
    }

    #[test]
    fn types_are_read_from_their_wire_numbers() {
        for t in Type::ALL {
            assert_eq!(Type::from_wire(t as u8), Some(t));
            assert_eq!(t.reply(), t as u8 + 1);
        }
        // Txattrwalk and Tauth are not handled; nor is any R-message or unknown number.
        for b in [0, 7, 30, 102, 101, 9, 255] {
            assert_eq!(Type::from_wire(b), None, "{b}");
        }
    }

    #[test]
    fn a_truncated_request_is_a_parse_error() {
        for req in samples() {
            let msg = encode(&req, 1);
            let body = &msg[HEADER..];
            for cut in 0..body.len() {
                let got = Request::parse(req.kind(), &body[..cut]);
                match &req {
                    // Older clients send Tfsync without its datasync field.
                    Request::Fsync { fid, .. } if cut >= 4 => {
                        assert_eq!(
                            got,
                            Ok(Request::Fsync {
                                fid: *fid,
                                datasync: false
                            })
                        )
                    }
                    _ => assert_eq!(got, Err(ParseError::Truncated), "{req:?} cut at {cut}"),
                }
            }
        }
    }

    #[test]
    fn bytes_after_the_last_field_are_ignored() {
        for req in samples() {
            let mut msg = encode(&req, 1);
            msg.extend_from_slice(b"trailing");
            let size = msg.len() as u32;
            msg[..4].copy_from_slice(&size.to_le_bytes());
            assert_eq!(parse_message(&msg), Ok(req));
        }
    }

    #[test]
    fn a_string_longer_than_the_message_is_a_parse_error() {
        let mut o = Out::message();
        o.u32(1).u16(50).bytes(b"abc");
        let msg = o.finish(Type::Mkdir as u8, 1);
        assert_eq!(parse_message(&msg), Err(ParseError::Truncated));
    }

    #[test]
    fn a_walk_of_more_than_16_names_is_a_parse_error() {
        let names = vec![&b"d"[..]; 17];
        let req = Request::Walk {
            fid: 0,
            newfid: 1,
            names,
        };
        assert_eq!(
            parse_message(&encode(&req, 1)),
            Err(ParseError::TooManyNames(17))
        );
        let names = vec![&b"d"[..]; 16];
        let req = Request::Walk {
            fid: 0,
            newfid: 1,
            names,
        };
        assert_eq!(parse_message(&encode(&req, 1)), Ok(req));
    }

    #[test]
    fn a_size_field_that_lies_is_a_parse_error() {
        let msg = encode(&Request::Clunk { fid: 3 }, 1);
        for size in [0u32, 6, msg.len() as u32 + 1, u32::MAX] {
            let mut m = msg.clone();
            m[..4].copy_from_slice(&size.to_le_bytes());
            let header = Header::read(&m).unwrap();
            assert_eq!(header.body(&m), Err(ParseError::Size), "size {size}");
        }
        // Shorter than a header: not even a tag to answer.
        assert!(Header::read(&msg[..HEADER - 1]).is_none());
    }

    #[test]
    fn the_mutations_are_the_types_that_change_a_share() {
        let mutating: Vec<u8> = Type::ALL
            .into_iter()
            .filter(|t| t.is_mutation())
            .map(|t| t as u8)
            .collect();
        assert_eq!(mutating, [14, 16, 18, 20, 26, 32, 70, 72, 74, 76, 118, 122]);
        let read_only: Vec<u8> = Type::ALL
            .into_iter()
            .filter(|t| t.served_read_only())
            .map(|t| t as u8)
            .collect();
        assert_eq!(read_only, [8, 12, 22, 24, 40, 100, 104, 108, 110, 116, 120]);
        for req in samples() {
            let expected = req.kind().is_mutation() || matches!(req, Request::Lopen { .. });
            assert_eq!(req.is_mutation(), expected, "{req:?}");
        }
        let lopen = |flags| Request::Lopen { fid: 1, flags }.is_mutation();
        assert!(!lopen(0) && !lopen(0o2000) && !lopen(0o4000000));
        assert!(lopen(0o1) && lopen(0o2) && lopen(0o100) && lopen(0o1000));
    }
}
