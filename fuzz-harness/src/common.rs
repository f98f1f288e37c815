//! What every harness shares: reading the fuzzer's bytes, the shares on disk (a read-only
//! store, a read-write xchg rebuilt for every input, and a directory *outside* both with a
//! secret in it), and the invariant checks on them: which files the process has open,
//! whether the store changed, whether a reply leaked the secret, whether a thread other
//! than the harness's panicked.

use std::collections::{BTreeMap, HashMap};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::OnceLock;

/// The fuzzer's bytes, read front to back; past the end every read yields zeros (or an
/// empty slice), so any input decodes to something.
pub struct Input<'a> {
    data: &'a [u8],
    at: usize,
}

impl<'a> Input<'a> {
    pub fn new(data: &'a [u8]) -> Input<'a> {
        Input { data, at: 0 }
    }
    pub fn is_empty(&self) -> bool {
        self.at >= self.data.len()
    }
    pub fn remaining(&self) -> usize {
        self.data.len().saturating_sub(self.at)
    }
    /// Up to `n` bytes.
    pub fn take(&mut self, n: usize) -> &'a [u8] {
        let end = self.at.saturating_add(n).min(self.data.len());
        let s = &self.data[self.at.min(end)..end];
        self.at = end;
        s
    }
    /// Up to `n` bytes, without consuming them.
    pub fn peek(&self, n: usize) -> &'a [u8] {
        let end = self.at.saturating_add(n).min(self.data.len());
        &self.data[self.at.min(end)..end]
    }
    pub fn rest(&mut self) -> &'a [u8] {
        self.take(usize::MAX)
    }
    fn array<const N: usize>(&mut self) -> [u8; N] {
        let mut a = [0u8; N];
        let s = self.take(N);
        a[..s.len()].copy_from_slice(s);
        a
    }
    pub fn u8(&mut self) -> u8 {
        self.array::<1>()[0]
    }
    pub fn u16(&mut self) -> u16 {
        u16::from_le_bytes(self.array())
    }
    pub fn u32(&mut self) -> u32 {
        u32::from_le_bytes(self.array())
    }
    pub fn u64(&mut self) -> u64 {
        u64::from_le_bytes(self.array())
    }
    /// A record: `len[2]` then that many bytes (fewer at the end of the input).
    pub fn record(&mut self) -> &'a [u8] {
        let n = self.u16() as usize;
        self.take(n)
    }
}

/// Appends a record as [`Input::record`] reads it.
pub fn put_record(out: &mut Vec<u8>, bytes: &[u8]) {
    let n = bytes.len().min(u16::MAX as usize);
    out.extend_from_slice(&(n as u16).to_le_bytes());
    out.extend_from_slice(&bytes[..n]);
}

/// Where the harnesses' files live for this process: `store/` (read-only share, built
/// once), `xchg-N/` (read-write share, fresh for every input), `outside/` (never shared:
/// the secret behind the symlinks that point out of the shares).
pub struct Env {
    base: tempfile::TempDir,
    store: PathBuf,
    outside: PathBuf,
    /// A random marker in `outside/secret`: a reply holding it read outside the share.
    pub secret: Vec<u8>,
    store_before: TreeState,
    outside_before: TreeState,
    xchg_serial: AtomicU64,
    /// The xchg handed out last, and its state when it was new.
    xchg_last: std::sync::Mutex<Option<(PathBuf, TreeState)>>,
}

static ENV: OnceLock<Env> = OnceLock::new();

/// The process's [`Env`], made at first use (with the process limits of [`limits`]),
/// and removed when the process exits.
pub fn env() -> &'static Env {
    ENV.get_or_init(|| {
        limits();
        install_panic_flag();
        let env = Env::new().expect("setting up the fuzz shares");
        extern "C" fn remove_env() {
            if let Some(env) = ENV.get() {
                make_removable(env.base.path());
                let _ = std::fs::remove_dir_all(env.base.path());
            }
        }
        // SAFETY: registering a plain extern "C" function.
        unsafe { libc::atexit(remove_env) };
        env
    })
}

impl Env {
    fn new() -> std::io::Result<Env> {
        let base = tempfile::Builder::new()
            .prefix("vmbuild-fuzz-")
            .tempdir_in(
                std::env::var_os("VMBUILD_FUZZ_TMP").map_or_else(std::env::temp_dir, PathBuf::from),
            )?;
        // Canonical, so that /proc/self/fd links compare with it as they are.
        let root = std::fs::canonicalize(base.path())?;
        let outside = root.join("outside");
        std::fs::create_dir(&outside)?;
        let secret = format!(
            "SECRET-OUTSIDE-{:016x}-{:08x}",
            random_u64(),
            std::process::id()
        )
        .into_bytes();
        std::fs::write(outside.join("secret"), &secret)?;
        let store = root.join("store");
        build_store(&store, &outside)?;
        let env = Env {
            store_before: TreeState::of(&store),
            outside_before: TreeState::of(&outside),
            base,
            store,
            outside,
            secret,
            xchg_serial: AtomicU64::new(0),
            xchg_last: std::sync::Mutex::new(None),
        };
        Ok(env)
    }

    pub fn store(&self) -> &Path {
        &self.store
    }

    pub fn outside(&self) -> &Path {
        &self.outside
    }

    pub fn base(&self) -> &Path {
        self.base.path()
    }

    /// A populated xchg directory as new: the previous one if nothing changed it (making
    /// files costs more than the rest of a harness), else a new one, the previous one
    /// removed.
    pub fn fresh_xchg(&self) -> PathBuf {
        let mut last = self.xchg_last.lock().unwrap();
        if let Some((dir, state)) = last.as_ref() {
            if TreeState::of(dir) == *state {
                return dir.clone();
            }
        }
        let dir = self.new_xchg();
        *last = Some((dir.clone(), TreeState::of(&dir)));
        dir
    }

    fn new_xchg(&self) -> PathBuf {
        let root = self.store.parent().unwrap();
        let n = self.xchg_serial.fetch_add(1, Ordering::Relaxed);
        if n > 0 {
            let old = root.join(format!("xchg-{}", n - 1));
            if old.exists() && std::fs::remove_dir_all(&old).is_err() {
                make_removable(&old);
                let _ = std::fs::remove_dir_all(&old);
            }
        }
        let dir = root.join(format!("xchg-{n}"));
        build_xchg(&dir, &self.outside).expect("building xchg");
        dir
    }

    /// The store and the outside directory are as they were built.
    pub fn check_unchanged(&self) {
        self.store_before
            .assert_same(&TreeState::of(&self.store), "the read-only store");
        self.outside_before.assert_same(
            &TreeState::of(&self.outside),
            "the directory outside every share",
        );
    }

    /// `reply` does not hold the secret from outside the shares (unless `input` did: the
    /// fuzzer may have learnt it from a comparison and written it into xchg itself).
    pub fn check_no_secret(&self, input: &[u8], reply: &[u8], what: &str) {
        if contains(reply, &self.secret) && !contains(input, &self.secret) {
            panic!("{what} holds the contents of a file outside every share");
        }
    }
}

/// Whether `hay` contains `needle`.
pub fn contains(hay: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty()
        && hay.len() >= needle.len()
        && hay.windows(needle.len()).any(|w| w == needle)
}

fn random_u64() -> u64 {
    let mut b = [0u8; 8];
    // SAFETY: getrandom into a buffer of the length given.
    let n = unsafe { libc::getrandom(b.as_mut_ptr().cast(), 8, 0) };
    if n != 8 {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0);
        return t ^ u64::from(std::process::id());
    }
    u64::from_le_bytes(b)
}

/// Bytes that look like a file's contents, the same for the same `seed` (made once per
/// process: the harnesses rebuild files from them for every input).
pub fn content(seed: u64, len: usize) -> Vec<u8> {
    use std::collections::HashMap;
    use std::sync::Mutex;
    type Made = HashMap<(u64, usize), Vec<u8>>;
    static MADE: Mutex<Option<Made>> = Mutex::new(None);
    MADE.lock()
        .unwrap()
        .get_or_insert_with(HashMap::new)
        .entry((seed, len))
        .or_insert_with(|| make_content(seed, len))
        .clone()
}

fn make_content(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            b"abcdefghijklmnopqrstuvwxyz0123456789 \n"[(x % 38) as usize]
        })
        .collect()
}

fn mkfifo(path: &Path) -> std::io::Result<()> {
    let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).unwrap();
    // SAFETY: a NUL-terminated path.
    if unsafe { libc::mkfifo(c.as_ptr(), 0o644) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

fn set_xattr(path: &Path, name: &str, value: &[u8]) {
    let p = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).unwrap();
    let n = std::ffi::CString::new(name).unwrap();
    // SAFETY: NUL-terminated strings and a value of the length given. Best effort: a
    // file system without user xattrs just has none.
    unsafe {
        libc::lsetxattr(
            p.as_ptr(),
            n.as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            0,
        )
    };
}

/// A small store: nested directories, files of a few sizes, an empty one, a FIFO,
/// relative symlinks inside, and symlinks that point out of the share.
fn build_store(store: &Path, outside: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::symlink;
    let pkg = store.join("nix/store/0123456789abcdfghijklmnpqrsvwxyz-hello-2.12");
    std::fs::create_dir_all(pkg.join("bin"))?;
    std::fs::create_dir_all(pkg.join("share/doc"))?;
    std::fs::create_dir_all(store.join("lib"))?;
    std::fs::write(pkg.join("bin/hello"), content(1, 20_000))?;
    std::fs::write(pkg.join("share/doc/README"), content(2, 300))?;
    std::fs::write(store.join("lib/libc.so.6"), content(3, 70_000))?;
    std::fs::write(store.join("empty"), b"")?;
    std::fs::write(store.join("hello.txt"), b"hello from the store\n")?;
    std::fs::set_permissions(
        pkg.join("bin/hello"),
        std::os::unix::fs::PermissionsExt::from_mode(0o555),
    )?;
    set_xattr(&store.join("hello.txt"), "user.fuzz", b"store xattr");
    symlink("libc.so.6", store.join("lib/libc.so"))?;
    symlink(outside.join("secret"), store.join("escape-abs"))?;
    symlink("../outside/secret", store.join("escape-rel"))?;
    symlink("../outside", store.join("escape-dir"))?;
    symlink("/", store.join("root-link"))?;
    mkfifo(&store.join("fifo"))?;
    Ok(())
}

/// A small xchg, as a build would leave it: sources, a results directory, symlinks out.
fn build_xchg(xchg: &Path, outside: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::symlink;
    std::fs::create_dir_all(xchg.join("src"))?;
    std::fs::create_dir_all(xchg.join("out"))?;
    std::fs::write(xchg.join("src/main.c"), content(4, 2_000))?;
    std::fs::write(xchg.join("src/big.bin"), content(5, 80_000))?;
    std::fs::write(xchg.join("cmd"), b"make -C /tmp/xchg/src\n")?;
    set_xattr(&xchg.join("cmd"), "user.fuzz", b"xchg xattr");
    symlink(outside.join("secret"), xchg.join("escape-abs"))?;
    symlink("../outside/secret", xchg.join("escape-rel"))?;
    symlink("../outside", xchg.join("escape-dir"))?;
    mkfifo(&xchg.join("fifo"))?;
    Ok(())
}

/// Gives the owner back every permission below `dir` (a test may have chmod-ed a
/// directory to 0), so that it can be removed.
fn make_removable(dir: &Path) {
    use std::os::unix::fs::PermissionsExt;
    let _ = std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700));
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                make_removable(&e.path());
            }
        }
    }
}

/// Everything about a tree that a write could change (not atime): per entry its inode,
/// type and mode, owner, size, link count, mtime and ctime.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TreeState(BTreeMap<PathBuf, String>);

impl TreeState {
    pub fn of(root: &Path) -> TreeState {
        let mut map = BTreeMap::new();
        walk(root, root, &mut map);
        TreeState(map)
    }

    pub fn assert_same(&self, now: &TreeState, what: &str) {
        if self == now {
            return;
        }
        let mut diff = Vec::new();
        for (k, v) in &self.0 {
            match now.0.get(k) {
                None => diff.push(format!("- {}: gone (was {v})", k.display())),
                Some(n) if n != v => diff.push(format!("~ {}: {v} -> {n}", k.display())),
                _ => {}
            }
        }
        for (k, v) in &now.0 {
            if !self.0.contains_key(k) {
                diff.push(format!("+ {}: {v}", k.display()));
            }
        }
        panic!("{what} was modified:\n{}", diff.join("\n"));
    }
}

fn walk(root: &Path, dir: &Path, map: &mut BTreeMap<PathBuf, String>) {
    // Metadata only: any change to a file's data, xattrs, mode, owner or links moves its
    // ctime, which no request can set back.
    let describe = |p: &Path| -> String {
        let Ok(m) = std::fs::symlink_metadata(p) else {
            return "unreadable".into();
        };
        let nlink = if m.is_dir() { 0 } else { m.nlink() };
        format!(
            "ino {} mode {:o} uid {} gid {} size {} nlink {nlink} mtime {}.{} ctime {}.{}",
            m.ino(),
            m.mode(),
            m.uid(),
            m.gid(),
            if m.is_dir() { 0 } else { m.size() },
            m.mtime(),
            m.mtime_nsec(),
            m.ctime(),
            m.ctime_nsec(),
        )
    };
    map.insert(
        dir.strip_prefix(root).unwrap_or(dir).to_path_buf(),
        describe(dir),
    );
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let p = e.path();
        if e.file_type().is_ok_and(|t| t.is_dir()) {
            walk(root, &p, map);
        } else {
            map.insert(
                p.strip_prefix(root).unwrap_or(&p).to_path_buf(),
                describe(&p),
            );
        }
    }
}

/// The process's open file descriptors and what they point at, to tell which ones a
/// server opened since.
pub struct Fds(HashMap<i32, ((u64, u64), String)>);

fn open_fds() -> Vec<i32> {
    let Ok(entries) = std::fs::read_dir("/proc/self/fd") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_string_lossy().parse::<i32>().ok())
        .collect()
}

/// The device and inode a descriptor holds (`None` once it is closed).
fn fd_identity(fd: i32) -> Option<(u64, u64)> {
    // SAFETY: fstat into a zeroed struct; a closed fd is an error, not UB.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    (unsafe { libc::fstat(fd, &mut st) } == 0).then_some((st.st_dev, st.st_ino))
}

fn fd_target(fd: i32) -> Option<String> {
    std::fs::read_link(format!("/proc/self/fd/{fd}"))
        .ok()
        .map(|t| t.to_string_lossy().into_owned())
}

impl Fds {
    pub fn now() -> Fds {
        let mut map = HashMap::new();
        for fd in open_fds() {
            if let (Some(id), Some(target)) = (fd_identity(fd), fd_target(fd)) {
                map.insert(fd, (id, target));
            }
        }
        Fds(map)
    }

    /// Every descriptor opened since `self` was taken points inside one of `roots` (or at
    /// no file at all: a pipe, socket, eventfd, memfd). A descriptor that still holds
    /// what it held then is not looked at again.
    pub fn check_since(&self, roots: &[&Path]) {
        for fd in open_fds() {
            let Some(id) = fd_identity(fd) else {
                continue;
            };
            if self.0.get(&fd).is_some_and(|(was, _)| *was == id) {
                continue;
            }
            let Some(target) = fd_target(fd) else {
                continue;
            };
            if fd_target_allowed(&target, roots) {
                continue;
            }
            panic!(
                "descriptor {fd} is open on {target}, outside the shares {}",
                roots
                    .iter()
                    .map(|r| r.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            );
        }
    }
}

fn fd_target_allowed(target: &str, roots: &[&Path]) -> bool {
    const NOT_FILES: &[&str] = &["anon_inode:", "pipe:", "socket:", "/memfd:", "/dev/null"];
    if NOT_FILES.iter().any(|p| target.starts_with(p)) {
        return true;
    }
    // The FUSE engine reopens inodes through its /proc/self/fd directory.
    if target == format!("/proc/{}/fd", std::process::id()) {
        return true;
    }
    roots.iter().any(|r| {
        let r = r.to_string_lossy();
        target == r
            || target
                .strip_prefix(r.as_ref())
                .is_some_and(|t| t.starts_with('/'))
    })
}

/// Limits for a process that lets a fuzzer write files: no file over 160 MiB (a write
/// or fallocate beyond fails with EFBIG instead of filling the disk; the tests' vhost-user
/// front-end needs a 128 MiB memfd), and SIGXFSZ ignored so that hitting the limit is an
/// error, not the end of the process.
pub fn limits() {
    let lim = libc::rlimit {
        rlim_cur: 160 << 20,
        rlim_max: 160 << 20,
    };
    // SAFETY: setrlimit with a valid struct; signal with SIG_IGN.
    unsafe {
        libc::setrlimit(libc::RLIMIT_FSIZE, &lim);
        libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
    }
}

static PANICKED: AtomicBool = AtomicBool::new(false);

thread_local! {
    /// Set on the threads that run a harness: their own panics fail them directly.
    static HARNESS_THREAD: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Marks the calling thread as a harness's own (see [`check_no_panic_elsewhere`]).
pub fn harness_thread() {
    HARNESS_THREAD.with(|h| h.set(true));
}

/// Records a panic on any thread but a harness's own (the previous hook still runs:
/// under libFuzzer it aborts), so that a harness notices a panic on a server's thread.
fn install_panic_flag() {
    let previous = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        if !HARNESS_THREAD.with(|h| h.get()) {
            PANICKED.store(true, Ordering::SeqCst);
        }
        previous(info);
    }));
}

/// Fails if a server's or device's thread has panicked since the process started.
pub fn check_no_panic_elsewhere() {
    assert!(
        !PANICKED.load(Ordering::SeqCst),
        "a server or device thread panicked (see above)"
    );
}
