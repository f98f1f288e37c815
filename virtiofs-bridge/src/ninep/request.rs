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
    pub const ALL: [Type; 26] = {
        use Type::*;
        [
            Statfs,
            Lopen,
            Lcreate,
            Symlink,
            Mknod,
            Rename,
            Readlink,
            Getattr,
            Setattr,
            Xattrcreate,
            Readdir,
            Fsync,
            Lock,
            Getlock,
            Link,
            Mkdir,
            Renameat,
            Unlinkat,
            Version,
            Attach,
            Flush,
            Walk,
            Read,
            Write,
            Clunk,
            Remove,
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
