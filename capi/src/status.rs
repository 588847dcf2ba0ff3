//! Status codes and messages: every entry point runs its body through [`run`],
//! which turns the outcome into an `int` and a message in the caller's buffer
//! and keeps a panic from unwinding into C.

use core::ffi::{c_char, c_int};
use core::fmt::{self, Write as _};
use std::panic::{AssertUnwindSafe, catch_unwind};

use merge_core::Error;

use crate::{
    MC_ERR_INVALID_ARGUMENT, MC_ERR_INVALID_HYPERPARAMETER, MC_ERR_LENGTH_MISMATCH, MC_ERR_MISUSE, MC_ERR_NON_FINITE,
    MC_ERR_NON_FINITE_REDUCTION, MC_ERR_OUT_OF_RANGE, MC_ERR_PANIC, MC_ERR_STORAGE_OVERFLOW, MC_OK,
};

/// Why a call failed: merge-core refused, or the arguments could not be read.
#[derive(Debug)]
pub(crate) enum Failure {
    Core(Error),
    Argument(String),
}

impl Failure {
    pub(crate) fn argument(message: String) -> Failure {
        Failure::Argument(message)
    }

    fn code(&self) -> c_int {
        match self {
            Failure::Core(e) => match e {
                Error::NonFinite { .. } => MC_ERR_NON_FINITE,
                Error::InvalidHyperparameter { .. } => MC_ERR_INVALID_HYPERPARAMETER,
                Error::LengthMismatch { .. } => MC_ERR_LENGTH_MISMATCH,
                Error::StorageOverflow { .. } => MC_ERR_STORAGE_OVERFLOW,
                Error::NonFiniteReduction { .. } => MC_ERR_NON_FINITE_REDUCTION,
                Error::OutOfRange { .. } => MC_ERR_OUT_OF_RANGE,
                Error::Misuse { .. } => MC_ERR_MISUSE,
            },
            Failure::Argument(_) => MC_ERR_INVALID_ARGUMENT,
        }
    }
}

impl From<Error> for Failure {
    fn from(e: Error) -> Failure {
        Failure::Core(e)
    }
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Failure::Core(e) => e.fmt(f),
            Failure::Argument(m) => write!(f, "invalid argument: {m}"),
        }
    }
}

/// Room for any message: merge-core's names are at most 96 bytes, so its
/// messages stay far below this; longer text is cut like any truncation.
const MESSAGE_ROOM: usize = 1024;

/// Formats into a fixed buffer, dropping whatever does not fit at a character
/// boundary (and everything after it, so a cut message has no gap).
struct Message {
    bytes: [u8; MESSAGE_ROOM],
    len: usize,
    cut: bool,
}

impl fmt::Write for Message {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        if self.cut {
            return Ok(());
        }
        let room = MESSAGE_ROOM - self.len;
        let mut end = s.len().min(room);
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        self.bytes[self.len..self.len + end].copy_from_slice(&s.as_bytes()[..end]);
        self.len += end;
        self.cut = end < s.len();
        Ok(())
    }
}

impl Message {
    fn new() -> Message {
        Message { bytes: [0; MESSAGE_ROOM], len: 0, cut: false }
    }

    /// The longest prefix of at most `cap` bytes that ends at a character boundary.
    fn prefix(&self, cap: usize) -> &[u8] {
        let text = &self.bytes[..self.len];
        let mut end = cap.min(text.len());
        // Continuation bytes are 0b10xxxxxx: back up to the start of a character.
        while end < text.len() && end > 0 && text[end] & 0xc0 == 0x80 {
            end -= 1;
        }
        &text[..end]
    }
}

/// Writes `message` NUL-terminated into the caller's buffer, truncated at a
/// character boundary to `cap - 1` bytes.
///
/// # Safety
/// `msg` is null, or `cap` writable bytes. The call's slices are gone by the time
/// this runs, so `msg` may even share memory with one of its buffers.
unsafe fn deliver(message: &Message, msg: *mut c_char, cap: usize) {
    if msg.is_null() || cap == 0 {
        return;
    }
    let text = message.prefix(cap - 1);
    // SAFETY: the caller provides `cap` writable bytes at `msg`; `text.len() + 1 <= cap`,
    // and `text` lives in this function's own stack buffer, so the two do not overlap.
    unsafe {
        core::ptr::copy_nonoverlapping(text.as_ptr(), msg.cast::<u8>(), text.len());
        msg.add(text.len()).write(0);
    }
}

/// Runs an entry point's body: `MC_OK` and an empty message, or the failure's
/// code and message. A panic (a bug here or in merge-core) is caught, reported as
/// `MC_ERR_PANIC`, and never unwinds into the caller's frames.
///
/// # Safety
/// As [`deliver`] for `msg` and `cap`.
pub(crate) unsafe fn run(msg: *mut c_char, cap: usize, body: impl FnOnce() -> Result<(), Failure>) -> c_int {
    // The body only reads and writes the caller's buffers, so a panic leaves no
    // broken invariant behind that a later call could observe.
    let outcome = catch_unwind(AssertUnwindSafe(body));
    let mut message = Message::new();
    let code = match outcome {
        Ok(Ok(())) => MC_OK,
        Ok(Err(failure)) => {
            let _ = write!(message, "{failure}");
            failure.code()
        }
        Err(payload) => {
            let what = payload.downcast_ref::<&str>().copied().or_else(|| payload.downcast_ref::<String>().map(String::as_str)).unwrap_or("(no message)");
            let _ = write!(message, "internal error, a bug in merge-core or its C ABI: panicked: {what}");
            MC_ERR_PANIC
        }
    };
    // SAFETY: forwarded to this function's contract.
    unsafe { deliver(&message, msg, cap) };
    code
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(text: &str) -> Message {
        let mut m = Message::new();
        m.write_str(text).unwrap();
        m
    }

    #[test]
    fn truncation_never_splits_a_character() {
        let m = message("ab\u{e9}c"); // é is two bytes: 61 62 c3 a9 63
        assert_eq!(m.prefix(5), "ab\u{e9}c".as_bytes());
        assert_eq!(m.prefix(4), "ab\u{e9}".as_bytes());
        assert_eq!(m.prefix(3), b"ab");
        assert_eq!(m.prefix(0), b"");
    }

    #[test]
    fn a_panic_becomes_a_status_and_a_message() {
        let mut msg = [0xffu8; 128];
        // SAFETY: msg has 128 writable bytes.
        let code = unsafe { run(msg.as_mut_ptr().cast(), msg.len(), || panic!("a bug")) };
        assert_eq!(code, MC_ERR_PANIC);
        let end = msg.iter().position(|&b| b == 0).unwrap();
        assert_eq!(&msg[..end], b"internal error, a bug in merge-core or its C ABI: panicked: a bug");
    }

    #[test]
    fn a_message_longer_than_the_room_is_cut_without_a_gap() {
        let mut m = Message::new();
        m.write_str(&"x".repeat(MESSAGE_ROOM - 1)).unwrap();
        m.write_str("\u{e9}").unwrap(); // does not fit: dropped
        m.write_str("y").unwrap(); // would fit, but after a cut
        assert_eq!(m.len, MESSAGE_ROOM - 1);
        assert!(m.cut);
    }
}
