//! One message in, one reply out: the header is read, the share's policy applied to the
//! message type, the request parsed, and its handler called; any error becomes `Rlerror`.

use std::sync::atomic::Ordering::Relaxed;

use super::error::RequestError;
use super::request::{Request, Type};
use super::wire::{lerror, Header, Out};
use super::NinepServer;

impl NinepServer {
    /// One request message in, one reply out (`None` when the request is too broken to
    /// carry a tag to answer).
    pub fn handle(&self, msg: &[u8]) -> Option<Vec<u8>> {
        self.requests.fetch_add(1, Relaxed);
        self.recorder.record(msg);
        let Some(header) = Header::read(msg) else {
            self.malformed.fetch_add(1, Relaxed);
            return None;
        };
        let reply = match self.answer(&header, msg) {
            Ok(reply) => reply,
            Err(e) => {
                let counted = match e {
                    RequestError::Malformed(_) => Some(&self.malformed),
                    RequestError::ReadOnly => Some(&self.refused),
                    _ => None,
                };
                if let Some(counter) = counted {
                    counter.fetch_add(1, Relaxed);
                }
                lerror(header.tag, e.errno())
            }
        };
        Some(reply)
    }

    fn answer(&self, header: &Header, msg: &[u8]) -> Result<Vec<u8>, RequestError> {
        let body = header.body(msg)?;
        let kind = Type::from_wire(header.kind).ok_or(RequestError::Unsupported)?;
        // A read-only share refuses by type before parsing: a mutation is EROFS whatever
        // its fields hold, and Tfsync and the locks are not served.
        if self.read_only && kind.is_mutation() {
            return Err(RequestError::ReadOnly);
        }
        if self.read_only && !kind.served_read_only() {
            return Err(RequestError::Unsupported);
        }
        let request = Request::parse(kind, body)?;
        if self.read_only && request.is_mutation() {
            return Err(RequestError::ReadOnly);
        }
        let out = self.dispatch(request)?;
        if kind.is_mutation() {
            self.mutations.fetch_add(1, Relaxed);
        }
        Ok(out.finish(kind.reply(), header.tag))
    }

    /// The reply to a parsed request, by its handler.
    fn dispatch(&self, request: Request) -> Result<Out, RequestError> {
        use Request as R;
        match request {
            R::Version { msize, version } => self.version(msize, version),
            R::Attach { fid, .. } => self.attach(fid),
            R::Walk { fid, newfid, names } => self.walk(fid, newfid, &names),
            R::Lopen { fid, flags } => self.lopen(fid, flags),
            R::Read { fid, offset, count } => self.read(fid, offset, count),
            R::Readdir { fid, offset, count } => self.readdir(fid, offset, count),
            R::Getattr { fid, .. } => self.getattr(fid),
            R::Readlink { fid } => self.readlink(fid),
            R::Statfs { fid } => self.statfs(fid),
            R::Clunk { fid } => self.clunk(fid),
            R::Flush => Ok(Out::message()),
            R::Lcreate {
                fid,
                name,
                flags,
                mode,
                ..
            } => self.lcreate(fid, name, flags, mode),
            R::Symlink {
                dfid, name, target, ..
            } => self.symlink(dfid, name, target),
            R::Mknod {
                dfid, name, mode, ..
            } => self.mknod(dfid, name, mode),
            R::Rename { fid, dfid, name } => self.rename(fid, dfid, name),
            R::Setattr { fid, attr } => self.setattr(fid, &attr),
            R::Xattrcreate { .. } => Err(RequestError::Unsupported),
            R::Fsync { fid, datasync } => self.fsync(fid, datasync),
            R::Lock { fid, .. } => self.lock(fid),
            R::Getlock {
                fid,
                start,
                length,
                proc_id,
                client,
                ..
            } => self.getlock(fid, start, length, proc_id, client),
            R::Link { dfid, fid, name } => self.link(dfid, fid, name),
            R::Mkdir {
                dfid, name, mode, ..
            } => self.mkdir(dfid, name, mode),
            R::Renameat {
                olddfid,
                oldname,
                newdfid,
                newname,
            } => self.renameat(olddfid, oldname, newdfid, newname),
            R::Unlinkat { dfid, name, flags } => self.unlinkat(dfid, name, flags),
            R::Write { fid, offset, data } => self.write(fid, offset, data),
            R::Remove { fid } => self.remove(fid),
        }
    }
}
