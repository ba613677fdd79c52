//! QR codes drawn with text, for the console, the admin CLI and the restricted shell: users check
//! the onion address and sshd's host key fingerprint by scanning them, and enrol a TOTP secret,
//! with no outside service involved.
//! Two modules per character cell (upper and lower half blocks). Light modules are the drawn
//! ones, as qrencode's UTF8 mode does: consoles are light text on a dark background, and a
//! code must be dark on light to scan.

use qrcode::render::unicode::Dense1x2;
use qrcode::{EcLevel, QrCode};

/// The lines of `text`'s QR code (error correction M, a quiet zone around it); none when it
/// does not fit a QR code.
pub fn lines(text: &str) -> Vec<String> {
    match QrCode::with_error_correction_level(text.as_bytes(), EcLevel::M) {
        Ok(code) => code
            .render::<Dense1x2>()
            .dark_color(Dense1x2::Light)
            .light_color(Dense1x2::Dark)
            .quiet_zone(true)
            .build()
            .lines()
            .map(str::to_owned)
            .collect(),
        Err(_) => Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_onion_address_is_a_square_of_half_blocks() {
        let onion = format!("{}.onion", "a2".repeat(28));
        let rows = lines(&onion);
        // Version 4 at level M: 33 modules, 4 of quiet zone on each side, 2 rows per line.
        assert_eq!(rows.len(), (33 + 8_usize).div_ceil(2), "{rows:?}");
        assert!(rows.iter().all(|r| r.chars().count() == 41));
        assert!(rows.iter().flat_map(|r| r.chars()).all(|c| " \u{2580}\u{2584}\u{2588}".contains(c)));
        // The quiet zone is light: drawn.
        assert!(rows[0].chars().all(|c| c == '\u{2588}'), "{}", rows[0]);
        assert!(lines(&"x".repeat(8000)).is_empty());
    }
}
