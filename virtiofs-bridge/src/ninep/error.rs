//! Why a request is answered `Rlerror`, and the errno it carries.

use super::wire::ParseError;

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub(crate) enum RequestError {
    /// The message is malformed: `EINVAL`, and counted (`NinepStats::malformed`).
    #[error("malformed message: {0}")]
    Malformed(#[from] ParseError),
    /// A mutation on a read-only share: `EROFS`, and counted (`NinepStats::refused_writes`).
    #[error("the share is read-only")]
    ReadOnly,
    /// A request this server does not serve (here): `EOPNOTSUPP`.
    #[error("not supported")]
    Unsupported,
    /// A fid that is unknown, already in use, or not open the way the request needs: `EBADF`.
    #[error("bad fid")]
    BadFid,
    /// A name to look up, create, remove or rename that is not one plain component (empty,
    /// `.`, `..`, a `/` or a NUL in it): `EINVAL`.
    #[error("not a plain name")]
    BadName,
    /// What the host answered, or the POSIX answer to a request that cannot be served
    /// (`EISDIR`, `ELOOP`, ...): that errno.
    #[error("{}", std::io::Error::from_raw_os_error(*.0))]
    Os(i32),
}

impl RequestError {
    /// The errno sent in `Rlerror`.
    pub fn errno(&self) -> u32 {
        let e = match self {
            RequestError::Malformed(_) | RequestError::BadName => libc::EINVAL,
            RequestError::ReadOnly => libc::EROFS,
            RequestError::Unsupported => libc::EOPNOTSUPP,
            RequestError::BadFid => libc::EBADF,
            RequestError::Os(e) => *e,
        };
        e as u32
    }

    /// The error of the host call that just failed.
    pub fn last_os() -> RequestError {
        std::io::Error::last_os_error().into()
    }
}

impl From<std::io::Error> for RequestError {
    fn from(e: std::io::Error) -> RequestError {
        RequestError::Os(e.raw_os_error().unwrap_or(libc::EIO))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_error_names_its_errno() {
        let cases = [
            (RequestError::Malformed(ParseError::Truncated), libc::EINVAL),
            (RequestError::ReadOnly, libc::EROFS),
            (RequestError::Unsupported, libc::EOPNOTSUPP),
            (RequestError::BadFid, libc::EBADF),
            (RequestError::BadName, libc::EINVAL),
            (RequestError::Os(libc::ENOENT), libc::ENOENT),
            (
                std::io::Error::from_raw_os_error(libc::EEXIST).into(),
                libc::EEXIST,
            ),
            (std::io::Error::other("no errno").into(), libc::EIO),
        ];
        for (e, errno) in cases {
            assert_eq!(e.errno(), errno as u32, "{e:?}");
        }
        assert_eq!(
            RequestError::Os(libc::ENOENT).to_string(),
            std::io::Error::from_raw_os_error(libc::ENOENT).to_string()
        );
    }
}
