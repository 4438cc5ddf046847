//! Writing to the user's terminal: stdout without panicking on a closed pipe, and text made
//! safe to show. Much of what kdpilot prints comes from the target (module and file names,
//! LoadSymbols paths, CodeView PDB paths) or from files (PDB symbol names, logs): an escape
//! sequence in it must not reach the terminal, where it could clear the screen, retitle the
//! window, or rewrite what is shown.

use std::borrow::Cow;
use std::io::Write;

/// Prints `text` to stdout (made [`terminal_safe`]); a closed stdout is an error the caller's
/// `?` turns into a quiet exit (see `error::report`).
pub fn print(text: &str) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    out.write_all(terminal_safe(text).as_bytes())?;
    out.flush()?;
    Ok(())
}

/// `text` with control characters (C0 and C1, so ESC and CSI: every escape sequence) and the
/// Unicode direction overrides shown as `\u{1b}`-style escapes. Newlines and tabs stay.
pub fn terminal_safe(text: &str) -> Cow<'_, str> {
    let unsafe_char = |c: char| {
        (c.is_control() && c != '\n' && c != '\t')
            || matches!(c, '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
    };
    if !text.chars().any(unsafe_char) {
        return Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len() + 16);
    for c in text.chars() {
        if unsafe_char(c) {
            out.extend(c.escape_unicode());
        } else {
            out.push(c);
        }
    }
    Cow::Owned(out)
}

#[cfg(test)]
mod tests {
    use super::terminal_safe;

    #[test]
    fn escape_sequences_never_reach_the_terminal() {
        let hostile = "\x1b[2J\x1b]0;owned\x07 \u{9b}31m \r\u{202e}txt.exe\nnext\tline";
        let shown = terminal_safe(hostile);
        assert!(
            !shown.contains(['\x1b', '\x07', '\u{9b}', '\r', '\u{202e}']),
            "{shown}"
        );
        assert_eq!(
            shown,
            "\\u{1b}[2J\\u{1b}]0;owned\\u{7} \\u{9b}31m \\u{d}\\u{202e}txt.exe\nnext\tline"
        );
        assert!(matches!(
            terminal_safe("plain\n"),
            std::borrow::Cow::Borrowed(_)
        ));
    }
}
