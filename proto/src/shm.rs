//! The marker for types that may live in shared memory, and the one way
//! this crate turns mapped bytes into references to them.

/// A type that may be placed in memory shared between processes and read by
/// a process that did not write it (iceoryx2's `ZeroCopySend` plays this
/// part). Every view this crate takes into a mapping is of a `ShmSafe` type,
/// through [`Region`].
///
/// # Safety
///
/// An implementor must be:
/// - `#[repr(C)]` (or transparent over such a type), with a layout fixed by
///   this crate's documentation and checked by `const` asserts;
/// - free of pointers, references and anything else whose meaning depends on
///   the address space (it must be self-contained);
/// - valid for every bit pattern a writer or a crash could leave behind, so
///   that a reader never has undefined behaviour whatever the file holds;
/// - mutated, if at all, only through atomics (another process may write
///   the same bytes at any time).
pub unsafe trait ShmSafe {}

/// A mapped byte range, borrowed for `'a`: hands out `&'a T` for
/// [`ShmSafe`] types after checking bounds and alignment, so no reference
/// it gives can outlive the mapping it points into.
#[derive(Clone, Copy)]
pub(crate) struct Region<'a> {
    ptr: *const u8,
    len: usize,
    _borrow: core::marker::PhantomData<&'a [u8]>,
}

impl<'a> Region<'a> {
    /// The bytes of a mapping.
    #[cfg(not(loom))]
    pub(crate) fn of(map: &'a memmap2::MmapRaw) -> Region<'a> {
        Region {
            ptr: map.as_ptr(),
            len: map.len(),
            _borrow: core::marker::PhantomData,
        }
    }

    /// A `&T` at `offset`, or `None` if it does not fit or is misaligned.
    pub(crate) fn get<T: ShmSafe>(&self, offset: usize) -> Option<&'a T> {
        self.slice::<T>(offset, 1).map(|s| &s[0])
    }

    /// `count` consecutive `T`s at `offset`, or `None` if they do not fit or
    /// are misaligned.
    pub(crate) fn slice<T: ShmSafe>(&self, offset: usize, count: usize) -> Option<&'a [T]> {
        let bytes = count.checked_mul(core::mem::size_of::<T>())?;
        if offset.checked_add(bytes)? > self.len {
            return None;
        }
        // SAFETY: `offset` is within the mapping (checked just above).
        let p = unsafe { self.ptr.add(offset) };
        if !(p as usize).is_multiple_of(core::mem::align_of::<T>()) {
            return None;
        }
        // SAFETY: the range lies inside a mapping that lives for 'a (the
        // borrow this region was made from), is aligned for T (checked),
        // and T is `ShmSafe`: valid for any bytes, self-contained, and only
        // ever mutated through atomics, so shared references are sound.
        Some(unsafe { core::slice::from_raw_parts(p as *const T, count) })
    }
}
