//! The rules for everything the shell takes from outside: TERM and LANG from the environment
//! (with safe fallbacks), new passwords, and the echo of an unknown command.

use std::ffi::OsStr;

/// Used when TERM is missing or does not match the allowed pattern.
pub const FALLBACK_TERM: &str = "vt100";
/// Used when LANG is missing or does not match the allowed pattern.
pub const FALLBACK_LANG: &str = "C.UTF-8";
/// The longest unknown command echoed back; longer ones are shown as `?`.
pub const MAX_ECHO: usize = 32;

/// Why a new password was refused before it was sent.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PasswordError {
    #[error("the two new passwords differ")]
    Mismatch,
    /// The rules PID 1 checks again (`cloister_proto::session`).
    #[error(transparent)]
    Rule(#[from] cloister_proto::session::NewPasswordProblem),
}

/// TERM if it matches `^[A-Za-z0-9][A-Za-z0-9.+_-]{0,63}$`, otherwise the fallback.
pub fn term(value: Option<&OsStr>) -> &str {
    value.and_then(OsStr::to_str).filter(|term| is_valid_term(term)).unwrap_or(FALLBACK_TERM)
}

/// LANG if it is `C`, `POSIX` or matches the locale pattern of the design, otherwise the fallback.
pub fn lang(value: Option<&OsStr>) -> &str {
    value.and_then(OsStr::to_str).filter(|lang| is_valid_lang(lang)).unwrap_or(FALLBACK_LANG)
}

pub use cloister_proto::session::{is_valid_lang, is_valid_term};

/// The checks a new password passes before it leaves the shell; the server may refuse more.
pub fn check_new_password(current: &str, new: &str, again: &str) -> Result<(), PasswordError> {
    if new != again {
        return Err(PasswordError::Mismatch);
    }
    Ok(cloister_proto::session::check_new_password(current, new)?)
}

/// What the shell may repeat back of a word it did not understand: the word itself if it is 1 to
/// 32 printable ASCII characters, otherwise `?`, so that nothing typed (or pasted) can reach the
/// terminal as an escape sequence or flood it.
pub fn sanitise_word(word: &str) -> &str {
    let printable = word.bytes().all(|byte| (0x21..0x7f).contains(&byte));
    if printable && (1..=MAX_ECHO).contains(&word.len()) {
        word
    } else {
        "?"
    }
}

/// Server text shown to the user: printable ASCII kept, anything else replaced by `?`, at most
/// 200 characters.
pub fn sanitise_text(text: &str) -> String {
    text.chars().take(200).map(|c| if (' '..='~').contains(&c) { c } else { '?' }).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use cloister_proto::session::NewPasswordProblem;

    #[test]
    fn term_accepts_the_pattern() {
        for good in [
            "xterm-256color",
            "vt100",
            "screen.xterm-256color",
            "rxvt-unicode+x",
            "a_b",
            "0",
            &"a".repeat(64),
        ] {
            assert!(is_valid_term(good), "{good}");
            assert_eq!(term(Some(OsStr::new(good))), good);
        }
    }

    #[test]
    fn term_falls_back_on_anything_else() {
        let long = "a".repeat(65);
        for bad in [
            "",
            "$(evil)",
            "-xterm",
            ".x",
            "xterm 256",
            "xterm\n",
            "x/y",
            "xterm;id",
            long.as_str(),
            "x\u{e9}",
        ] {
            assert!(!is_valid_term(bad), "{bad:?}");
            assert_eq!(term(Some(OsStr::new(bad))), "vt100");
        }
        assert_eq!(term(None), "vt100");
    }

    #[test]
    fn term_that_is_not_unicode_falls_back() {
        use std::os::unix::ffi::OsStrExt;
        assert_eq!(term(Some(OsStr::from_bytes(b"xterm\xff"))), "vt100");
    }

    #[test]
    fn lang_accepts_the_pattern() {
        for good in [
            "C",
            "POSIX",
            "C.UTF-8",
            "en_US.UTF-8",
            "de_DE@euro",
            "en",
            "sr_RS@latin",
            "ja_JP.eucJP",
            "abcdefgh",
        ] {
            assert!(is_valid_lang(good), "{good}");
            assert_eq!(lang(Some(OsStr::new(good))), good);
        }
    }

    #[test]
    fn lang_falls_back_on_anything_else() {
        for bad in [
            "",
            "$(evil)",
            "en_USA",
            "en_",
            "en.",
            "en@",
            "abcdefghi",
            "en@euro.UTF-8",
            "en.UTF_8",
            "en_US.UTF-8@a@b",
            "en_US.12345678901234567",
            "e1",
            "C.UTF-8 ",
            "../../etc",
            "en_U1",
        ] {
            assert!(!is_valid_lang(bad), "{bad:?}");
            assert_eq!(lang(Some(OsStr::new(bad))), "C.UTF-8");
        }
        assert_eq!(lang(None), "C.UTF-8");
    }

    #[test]
    fn password_rules() {
        let ok = "correct horse battery";
        assert_eq!(check_new_password("old password!", ok, ok), Ok(()));
        assert_eq!(check_new_password("old", "123456789012", "123456789012"), Ok(()));
        assert_eq!(
            check_new_password("old", "12345678901", "12345678901"),
            Err(PasswordError::Rule(NewPasswordProblem::TooShort))
        );
        assert_eq!(check_new_password("old", ok, "correct horse batterY"), Err(PasswordError::Mismatch));
        assert_eq!(
            check_new_password(ok, ok, ok),
            Err(PasswordError::Rule(NewPasswordProblem::SameAsCurrent))
        );
        let tab = "correct\thorse battery";
        assert_eq!(
            check_new_password("old", tab, tab),
            Err(PasswordError::Rule(NewPasswordProblem::ControlCharacters))
        );
        let esc = "correct\u{1b}horse battery";
        assert_eq!(
            check_new_password("old", esc, esc),
            Err(PasswordError::Rule(NewPasswordProblem::ControlCharacters))
        );
    }

    #[test]
    fn password_length_counts_characters_not_bytes() {
        let short = "\u{e9}".repeat(11);
        assert_eq!(
            check_new_password("old", &short, &short),
            Err(PasswordError::Rule(NewPasswordProblem::TooShort))
        );
    }

    #[test]
    fn unknown_word_echo_is_sanitised() {
        assert_eq!(sanitise_word("lss"), "lss");
        assert_eq!(sanitise_word(&"a".repeat(32)), "a".repeat(32));
        assert_eq!(sanitise_word(&"a".repeat(33)), "?");
        assert_eq!(sanitise_word("\u{1b}[2J"), "?");
        assert_eq!(sanitise_word("caf\u{e9}"), "?");
        assert_eq!(sanitise_word("a\tb"), "?");
        assert_eq!(sanitise_word(""), "?");
    }

    #[test]
    fn server_text_is_sanitised() {
        assert_eq!(sanitise_text("no such user"), "no such user");
        assert_eq!(sanitise_text("bad\u{1b}[31m\u{e9}"), "bad?[31m?");
        assert_eq!(sanitise_text(&"x".repeat(500)).len(), 200);
    }
}
