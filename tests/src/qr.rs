//! Reads a QR code the appliance drew with half blocks (`init/qr`: light modules drawn,
//! dark ones blank) back into its text, with `rqrr`, as a phone would from the screen.

/// The QR code drawn right after the first line holding `marker` in `console`: the lines with
/// half blocks that follow it (a kernel message, `[ …`, may sit among them), decoded.
pub fn after_marker(console: &str, marker: &str) -> Option<String> {
    let mut lines =
        console.lines().map(|l| l.trim_end_matches('\r')).skip_while(|l| !l.contains(marker)).skip(1);
    let mut code = Vec::new();
    for line in lines.by_ref() {
        if has_blocks(line) {
            code.push(line);
        } else if !line.starts_with('[') {
            break;
        }
    }
    decode(&code)
}

fn has_blocks(line: &str) -> bool {
    line.chars().any(|c| "\u{2580}\u{2584}\u{2588}".contains(c))
}

/// The text of the first QR code in `lines` (other lines are ignored only if they hold no
/// half-block characters).
pub fn decode(lines: &[&str]) -> Option<String> {
    let rows: Vec<Vec<char>> = lines.iter().filter(|l| has_blocks(l)).map(|l| l.chars().collect()).collect();
    let width = rows.iter().map(Vec::len).max()?;
    let height = rows.len() * 2;
    // A drawn half is a light module; everything else (blank, or past a line's end) is dark.
    let light = |x: usize, y: usize| {
        let c = rows[y / 2].get(x).copied().unwrap_or(' ');
        matches!((c, y % 2), ('\u{2588}', _) | ('\u{2580}', 0) | ('\u{2584}', 1))
    };
    // A few pixels per module: the detector needs room to find the finder patterns.
    const SCALE: usize = 4;
    let mut image = rqrr::PreparedImage::prepare_from_greyscale(width * SCALE, height * SCALE, |x, y| {
        if light(x / SCALE, y / SCALE) {
            255
        } else {
            0
        }
    });
    let grids = image.detect_grids();
    grids.first().and_then(|g| g.decode().ok()).map(|(_, text)| text)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Drawn the way the appliance draws (qrcode's half blocks, colours swapped).
    fn draw(text: &str) -> String {
        use qrcode::render::unicode::Dense1x2;
        qrcode::QrCode::new(text.as_bytes())
            .unwrap()
            .render::<Dense1x2>()
            .dark_color(Dense1x2::Light)
            .light_color(Dense1x2::Dark)
            .quiet_zone(true)
            .build()
    }

    #[test]
    fn reads_back_what_was_drawn() {
        let onion = format!("{}.onion", "a2".repeat(28));
        let drawn = draw(&onion);
        let mut lines = vec!["cloister: onion address x"];
        lines.extend(drawn.lines());
        assert_eq!(decode(&lines), Some(onion.clone()));
        assert_eq!(decode(&["no code here"]), None);
        let console = format!("before\r\ncloister: onion address {onion}\r\n{drawn}\r\nafter\r\n");
        assert_eq!(after_marker(&console, "cloister: onion address"), Some(onion));
    }
}
