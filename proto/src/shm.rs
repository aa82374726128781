//! The marker for types that may live in shared memory.

/// A type that may be placed in memory shared between processes and read by
/// a process that did not write it.
///
/// # Safety
///
/// An implementor must be:
/// - `#[repr(C)]` (or transparent over such a type), with a layout fixed by
///   this crate's documentation and checked by `const` asserts;
/// - free of pointers, references and anything else whose meaning depends on
///   the address space (it must be self-contained);
/// - valid for every bit pattern a writer or a crash could leave behind, so
///   that a reader never has undefined behaviour whatever the file holds.
pub unsafe trait ShmSafe {}
