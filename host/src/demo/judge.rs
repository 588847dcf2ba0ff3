//! The programmatic judge and the capability checker. Both read only the text a
//! model produced after the prompt, so they score sampled generations the same way
//! whichever model or optimizer produced them.

use crate::data::builtin::{Problem, END, STYLE_PREFIX, STYLE_SUFFIX};

/// The response up to (not including) the first newline: generation may run past
/// the end of the answer, and only the first line is the answer.
fn first_line(response: &str) -> &str {
    response.split(END).next().unwrap_or("")
}

/// The judge's score for one response, in `[0, 1]`: half for the polite prefix,
/// half for the closing mark, exactly what the preference data rewards. It is
/// blind to arithmetic, as the preference labels are.
pub fn judge(response: &str) -> f64 {
    let line = first_line(response);
    let prefix = line.starts_with(STYLE_PREFIX);
    // A bare "!" after the prefix is not a closing mark on an answer.
    let suffix = line.ends_with(STYLE_SUFFIX) && line.trim_start_matches(STYLE_PREFIX).len() > STYLE_SUFFIX.len();
    0.5 * (prefix as u8 as f64) + 0.5 * (suffix as u8 as f64)
}

/// The number a response states: the first run of decimal digits on its first
/// line, or `None` when there is none (or it does not fit a `u64`).
pub fn stated_answer(response: &str) -> Option<u64> {
    let line = first_line(response);
    let start = line.find(|c: char| c.is_ascii_digit())?;
    let digits: &str = &line[start..];
    let end = digits.find(|c: char| !c.is_ascii_digit()).unwrap_or(digits.len());
    digits[..end].parse().ok()
}

/// Whether the response states the right sum, in whatever style.
pub fn is_correct(problem: &Problem, response: &str) -> bool {
    stated_answer(response) == Some(problem.answer())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn judge_scores_style_only() {
        assert_eq!(judge("Sure, 68!\n"), 1.0);
        assert_eq!(judge("Sure, 67!"), 1.0, "the judge does not check arithmetic");
        assert_eq!(judge("Sure, 68\n"), 0.5);
        assert_eq!(judge("68!\n"), 0.5);
        assert_eq!(judge("68\n"), 0.0);
        assert_eq!(judge(""), 0.0);
        assert_eq!(judge("Sure, !"), 0.5, "a bare mark after the prefix is no closing");
        // Only the first line counts.
        assert_eq!(judge("68\nSure, 68!\n"), 0.0);
        assert_eq!(judge("Sure, 68!\ngarbage"), 1.0);
    }

    #[test]
    fn capability_reads_the_first_number() {
        let p = Problem { a: 23, b: 45 };
        assert!(is_correct(&p, "68\n"));
        assert!(is_correct(&p, "Sure, 68!\n"));
        assert!(!is_correct(&p, "Sure, 67!\n"));
        assert!(!is_correct(&p, "680\n"));
        assert!(!is_correct(&p, "6\n8\n"));
        assert!(!is_correct(&p, "Sure!\n"));
        assert_eq!(stated_answer("x 12 y 34"), Some(12));
        assert_eq!(stated_answer("99999999999999999999999"), None);
    }
}
