//! Writing to stdout without panicking on a closed pipe.

use std::io::Write;

/// Prints `text` to stdout; a closed stdout is an error the caller's `?` turns into a quiet
/// exit (see `error::report`).
pub fn print(text: &str) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    out.write_all(text.as_bytes())?;
    out.flush()?;
    Ok(())
}
