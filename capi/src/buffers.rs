//! The caller's pointers, checked before they become slices: null only where the
//! length is 0 (or where the argument is optional), aligned, no larger than a
//! slice may be, and no buffer written by the call overlapping any other buffer
//! of the call. Rust's `&mut` must not alias, so an overlap the check let through
//! would be undefined behaviour, not merely a wrong result.

use core::ffi::c_char;
use core::fmt;

use merge_core::dtype::{Dst, Src};

use crate::status::Failure;
use crate::{MC_DTYPE_BF16, MC_DTYPE_F16, MC_DTYPE_F32, McDst, McSrc};

/// Names an argument in a message: `theta`, `jobs[2].theta`, `models[1]`,
/// `tensors[0].models[3]`.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Label {
    item: Option<(&'static str, usize)>,
    field: &'static str,
    index: Option<usize>,
}

impl Label {
    pub(crate) const fn arg(field: &'static str) -> Label {
        Label { item: None, field, index: None }
    }

    /// `field` of the `i`th entry of the array argument `list`, or plain `field`
    /// when the entry was passed on its own (`list` is `None`).
    pub(crate) const fn of(list: Option<&'static str>, i: usize, field: &'static str) -> Label {
        match list {
            Some(list) => Label { item: Some((list, i)), field, index: None },
            None => Label::arg(field),
        }
    }

    /// Element `i` of the array this label names.
    pub(crate) const fn at(self, i: usize) -> Label {
        Label { index: Some(i), ..self }
    }
}

impl fmt::Display for Label {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some((list, i)) = self.item {
            write!(f, "{list}[{i}].")?;
        }
        f.write_str(self.field)?;
        if let Some(i) = self.index {
            write!(f, "[{i}]")?;
        }
        Ok(())
    }
}

struct Region {
    start: usize,
    end: usize,
    writable: bool,
    label: Label,
}

/// Every buffer one call reads or writes, for the overlap check.
#[derive(Default)]
pub(crate) struct Buffers {
    regions: Vec<Region>,
}

/// A buffer the call reads: checked, not yet a slice.
pub(crate) struct Input<T> {
    ptr: *const T,
    len: usize,
}

/// A buffer the call writes: checked, not yet a slice.
pub(crate) struct Output<T> {
    ptr: *mut T,
    len: usize,
}

impl<T> Clone for Input<T> {
    fn clone(&self) -> Self {
        *self
    }
}

impl<T> Copy for Input<T> {}

/// A typed tensor the call reads.
#[derive(Clone, Copy)]
pub(crate) enum InputSrc {
    F32(Input<f32>),
    Bf16(Input<u16>),
    F16(Input<u16>),
}

/// A typed tensor the call writes.
pub(crate) enum OutputDst {
    F32(Output<f32>),
    Bf16(Output<u16>),
    F16(Output<u16>),
}

fn dtype_error(label: Label, dtype: u32) -> Failure {
    Failure::argument(format!("{label}: dtype {dtype} is none of MC_DTYPE_F32 (0), MC_DTYPE_BF16 (1), MC_DTYPE_F16 (2)"))
}

impl Buffers {
    /// Checks `len` elements of `T` at `ptr` and records where they lie.
    fn claim<T>(&mut self, ptr: *const T, len: usize, writable: bool, label: Label) -> Result<(), Failure> {
        if len == 0 {
            return Ok(());
        }
        if ptr.is_null() {
            return Err(Failure::argument(format!("{label} is null (it should hold {len} element{})", if len == 1 { "" } else { "s" })));
        }
        if !ptr.is_aligned() {
            return Err(Failure::argument(format!("{label} is not aligned to {} bytes", align_of::<T>())));
        }
        let start = ptr.addr();
        let end = len
            .checked_mul(size_of::<T>())
            .filter(|&bytes| bytes <= isize::MAX as usize)
            .and_then(|bytes| start.checked_add(bytes))
            .ok_or_else(|| Failure::argument(format!("{label}: {len} elements do not fit in the address space")))?;
        self.regions.push(Region { start, end, writable, label });
        Ok(())
    }

    pub(crate) fn input<T>(&mut self, ptr: *const T, len: usize, label: Label) -> Result<Input<T>, Failure> {
        self.claim(ptr, len, false, label)?;
        Ok(Input { ptr, len })
    }

    pub(crate) fn output<T>(&mut self, ptr: *mut T, len: usize, label: Label) -> Result<Output<T>, Failure> {
        self.claim(ptr, len, true, label)?;
        Ok(Output { ptr, len })
    }

    /// An output that may be left out: null gives an empty slice, which merge-core
    /// refuses, naming it, where the step needs it.
    pub(crate) fn optional_output<T>(&mut self, ptr: *mut T, len: usize, label: Label) -> Result<Output<T>, Failure> {
        self.output(ptr, if ptr.is_null() { 0 } else { len }, label)
    }

    /// `len` bytes of UTF-8 at `ptr`.
    pub(crate) fn name(&mut self, ptr: *const c_char, len: usize, label: Label) -> Result<Input<u8>, Failure> {
        self.input(ptr.cast::<u8>(), len, label)
    }

    pub(crate) fn src(&mut self, src: McSrc, len: usize, label: Label) -> Result<InputSrc, Failure> {
        Ok(match src.dtype {
            MC_DTYPE_F32 => InputSrc::F32(self.input(src.data.cast(), len, label)?),
            MC_DTYPE_BF16 => InputSrc::Bf16(self.input(src.data.cast(), len, label)?),
            MC_DTYPE_F16 => InputSrc::F16(self.input(src.data.cast(), len, label)?),
            other => return Err(dtype_error(label, other)),
        })
    }

    /// A tensor that may be left out (a task vector plain AdamW does not read).
    pub(crate) fn optional_src(&mut self, src: McSrc, len: usize, label: Label) -> Result<InputSrc, Failure> {
        self.src(src, if src.data.is_null() { 0 } else { len }, label)
    }

    pub(crate) fn dst(&mut self, dst: McDst, len: usize, label: Label) -> Result<OutputDst, Failure> {
        Ok(match dst.dtype {
            MC_DTYPE_F32 => OutputDst::F32(self.output(dst.data.cast(), len, label)?),
            MC_DTYPE_BF16 => OutputDst::Bf16(self.output(dst.data.cast(), len, label)?),
            MC_DTYPE_F16 => OutputDst::F16(self.output(dst.data.cast(), len, label)?),
            other => return Err(dtype_error(label, other)),
        })
    }

    /// Refuses a written buffer that shares a byte with any other buffer. Sorted
    /// by start, a region overlaps an earlier one iff it starts before the
    /// furthest end seen so far; tracking that end for all regions and for the
    /// written ones finds every overlap that involves a written region.
    pub(crate) fn check_disjoint(&mut self) -> Result<(), Failure> {
        self.regions.sort_by_key(|r| r.start);
        let mut furthest: Option<&Region> = None;
        let mut furthest_written: Option<&Region> = None;
        for r in &self.regions {
            let clash = if r.writable { furthest } else { furthest_written };
            if let Some(c) = clash.filter(|c| c.end > r.start) {
                return Err(Failure::argument(format!("{} overlaps {}; a buffer the call writes must not share memory with another", c.label, r.label)));
            }
            if furthest.is_none_or(|f| r.end > f.end) {
                furthest = Some(r);
            }
            if r.writable && furthest_written.is_none_or(|f| r.end > f.end) {
                furthest_written = Some(r);
            }
        }
        Ok(())
    }
}

impl<T> Input<T> {
    /// # Safety
    /// `len` initialized elements at `ptr` stay valid for `'a`, and nothing writes
    /// them while the slice is in use: not the caller (its contract), and not this
    /// call, which makes no overlapping [`Output`] a slice meanwhile
    /// ([`Buffers::check_disjoint`] guarantees it for the buffers claimed with this one).
    pub(crate) unsafe fn slice<'a>(self) -> &'a [T] {
        if self.len == 0 {
            return &[];
        }
        // SAFETY: `claim` checked non-null, alignment and a size below isize::MAX
        // without address wrap-around; validity and exclusivity for 'a are this
        // function's contract.
        unsafe { core::slice::from_raw_parts(self.ptr, self.len) }
    }
}

impl Input<u8> {
    /// # Safety
    /// As [`Input::slice`].
    pub(crate) unsafe fn utf8<'a>(self, label: Label) -> Result<&'a str, Failure> {
        // SAFETY: forwarded to this function's contract.
        let bytes = unsafe { self.slice() };
        core::str::from_utf8(bytes).map_err(|e| Failure::argument(format!("{label} is not UTF-8: {e}")))
    }
}

impl<T> Output<T> {
    /// # Safety
    /// `len` initialized elements at `ptr` stay valid and untouched by anyone else
    /// for `'a`, and [`Buffers::check_disjoint`] passed for the call's buffers.
    pub(crate) unsafe fn slice<'a>(self) -> &'a mut [T] {
        if self.len == 0 {
            return &mut [];
        }
        // SAFETY: as in `Input::slice`; `check_disjoint` guarantees no other slice
        // of this call overlaps this one, so the `&mut` is unique.
        unsafe { core::slice::from_raw_parts_mut(self.ptr, self.len) }
    }
}

impl InputSrc {
    /// # Safety
    /// As [`Input::slice`].
    pub(crate) unsafe fn src<'a>(self) -> Src<'a> {
        // SAFETY: forwarded to this function's contract.
        unsafe {
            match self {
                InputSrc::F32(x) => Src::F32(x.slice()),
                InputSrc::Bf16(x) => Src::Bf16(x.slice()),
                InputSrc::F16(x) => Src::F16(x.slice()),
            }
        }
    }
}

impl OutputDst {
    /// # Safety
    /// As [`Output::slice`].
    pub(crate) unsafe fn dst<'a>(self) -> Dst<'a> {
        // SAFETY: forwarded to this function's contract.
        unsafe {
            match self {
                OutputDst::F32(x) => Dst::F32(x.slice()),
                OutputDst::Bf16(x) => Dst::Bf16(x.slice()),
                OutputDst::F16(x) => Dst::F16(x.slice()),
            }
        }
    }
}
