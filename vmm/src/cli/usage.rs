//! A usage error: bad input found before anything starts, printed as one line
//! (`vmbuild SUBCOMMAND: …`) with exit 2. `usage!` returns one from the function it is in.

pub(super) struct Usage(pub(super) String);

macro_rules! usage {
    ($($t:tt)*) => { return Err(Usage(format!($($t)*))) };
}
pub(super) use usage;
