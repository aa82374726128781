//! The crate's one error type.

use std::path::PathBuf;

/// Everything that can go wrong opening, creating or validating tickwire's
/// shared-memory files. Messages name the file and what was wrong with it.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An I/O call failed.
    #[error("{op} {path}: {source}")]
    Io {
        /// What we were doing.
        op: &'static str,
        /// The file.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The file does not start with the expected magic.
    #[error("{path}: not a tickwire {what} file (magic {found:#018x}, expected {expected:#018x})")]
    BadMagic {
        /// The file.
        path: PathBuf,
        /// `ring` or `symbology`.
        what: &'static str,
        /// Magic found.
        found: u64,
        /// Magic expected.
        expected: u64,
    },
    /// The file's major layout version is not ours.
    #[error(
        "{path}: layout version {found_major}.{found_minor} is not supported (this build knows {known_major}.{known_minor}); a file of another layout is never reused: delete the node directory's files to start anew, or run the tickwire that wrote them"
    )]
    UnsupportedVersion {
        /// The file.
        path: PathBuf,
        /// Found major.
        found_major: u16,
        /// Found minor.
        found_minor: u16,
        /// Known major.
        known_major: u16,
        /// Known minor.
        known_minor: u16,
    },
    /// A header field has a value that cannot be right.
    #[error("{path}: bad header field {field} = {value}: {expected}")]
    BadHeader {
        /// The file.
        path: PathBuf,
        /// Field name.
        field: &'static str,
        /// Value found.
        value: u64,
        /// What it must be.
        expected: String,
    },
    /// The file is shorter than its header says it must be.
    #[error("{path}: file is {len} bytes, its header needs {need}")]
    Short {
        /// The file.
        path: PathBuf,
        /// Actual length.
        len: u64,
        /// Needed length.
        need: u64,
    },
    /// Another process holds the writer lock.
    #[error(
        "{path}: another writer (pid {pid}) holds this file (a ring has exactly one writer; is another tickwire serve running on this node directory?)"
    )]
    WriterLocked {
        /// The file.
        path: PathBuf,
        /// The holder's pid as it recorded it (0 if unknown).
        pid: u64,
    },
    /// Permission denied, with the file's mode and group and who we are.
    #[error("{op} {path}: permission denied: {detail}")]
    Permission {
        /// What we were doing.
        op: &'static str,
        /// The file.
        path: PathBuf,
        /// Mode, owner, group, our ids and what access is needed.
        detail: String,
    },
    /// The file system has no room for a file.
    #[error("no space left on device: need {need} bytes for {path}")]
    NoSpace {
        /// The file.
        path: PathBuf,
        /// Bytes it needs.
        need: u64,
    },
    /// A ring file is shorter than its slots need.
    #[error(
        "{path}: file is {len} bytes, but its {capacity} slots of {slot_size} bytes after the header need {need}"
    )]
    SlotsShort {
        /// The file.
        path: PathBuf,
        /// Actual length.
        len: u64,
        /// Needed length.
        need: u64,
        /// Slots.
        capacity: u64,
        /// Bytes per slot.
        slot_size: u32,
    },
    /// The ring holds what its protocol cannot have written: refused
    /// rather than continued at a wrong sequence.
    #[error(
        "{path}: corrupt ring, refusing to continue it: {what} (delete the ring's files to start it anew)"
    )]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// The field and what is wrong with it.
        what: String,
    },
    /// A tethered reader needs write access to the reader-state file.
    #[error("{path}: a tethered reader needs write access to this reader-state file: {detail}")]
    ReadOnlyReaders {
        /// The reader-state file.
        path: PathBuf,
        /// Mode, owner, group and our ids.
        detail: String,
    },
    /// An existing ring was created with different parameters.
    #[error(
        "{path}: {what} is {on_disk} on disk but {requested} was requested; refusing to reuse the ring (delete its files to change this)"
    )]
    Mismatch {
        /// The file.
        path: PathBuf,
        /// The parameter.
        what: &'static str,
        /// On disk.
        on_disk: u64,
        /// Asked for.
        requested: u64,
    },
    /// A record of a file (a bar, say) fails its check.
    #[error("{path}: {what}")]
    BadRecord {
        /// The file.
        path: PathBuf,
        /// Which record and what is wrong with it.
        what: String,
    },
    /// A parameter passed by the caller is invalid.
    #[error("invalid {what}: {why}")]
    Invalid {
        /// What.
        what: &'static str,
        /// Why.
        why: String,
    },
    /// All reader slots of a ring are taken by live readers.
    #[error("{path}: all {slots} reader slots are in use by live readers")]
    ReadersFull {
        /// The file.
        path: PathBuf,
        /// How many slots there are.
        slots: usize,
    },
    /// The symbology table is full.
    #[error("{path}: symbology table is full ({capacity} instruments)")]
    SymbologyFull {
        /// The file.
        path: PathBuf,
        /// Its capacity.
        capacity: u32,
    },
}

impl Error {
    /// A header field that cannot be right.
    pub(crate) fn bad_header<T>(
        path: &std::path::Path,
        field: &'static str,
        value: u64,
        expected: impl Into<String>,
    ) -> Result<T> {
        Err(Error::BadHeader {
            path: path.to_path_buf(),
            field,
            value,
            expected: expected.into(),
        })
    }

    pub(crate) fn io(op: &'static str, path: &std::path::Path, source: std::io::Error) -> Error {
        if source.kind() == std::io::ErrorKind::PermissionDenied {
            return Error::Permission {
                op,
                path: path.to_path_buf(),
                detail: crate::file::describe_access(path),
            };
        }
        Error::Io {
            op,
            path: path.to_path_buf(),
            source,
        }
    }
}

/// The crate's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;
