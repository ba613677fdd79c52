//! The ACPI power button as an input device: find the `/dev/input/eventN` named "Power Button"
//! and recognise KEY_POWER presses in the raw `struct input_event` stream.

use std::path::{Path, PathBuf};

/// `struct input_event` on 64-bit Linux: timeval (16 bytes), type u16, code u16, value i32.
pub const EVENT_SIZE: usize = 24;
const EV_KEY: u16 = 1;
const KEY_POWER: u16 = 116;

/// The name the ACPI button driver gives its input devices.
pub const POWER_BUTTON_NAME: &str = "Power Button";

/// One decoded input event (the timestamp is not needed).
#[derive(Debug, PartialEq, Eq)]
pub struct Event {
    pub kind: u16,
    pub code: u16,
    pub value: i32,
}

pub fn parse_event(raw: &[u8; EVENT_SIZE]) -> Event {
    let u16_at = |i: usize| u16::from_ne_bytes([raw[i], raw[i + 1]]);
    Event {
        kind: u16_at(16),
        code: u16_at(18),
        value: i32::from_ne_bytes([raw[20], raw[21], raw[22], raw[23]]),
    }
}

/// A key-down (value 1) of KEY_POWER; releases and repeats are ignored.
pub fn is_power_press(e: &Event) -> bool {
    e.kind == EV_KEY && e.code == KEY_POWER && e.value == 1
}

/// Whether any whole event in `buf` is a power press.
pub fn has_power_press(buf: &[u8]) -> bool {
    buf.chunks_exact(EVENT_SIZE)
        .filter_map(|c| <&[u8; EVENT_SIZE]>::try_from(c).ok())
        .any(|c| is_power_press(&parse_event(c)))
}

/// The `/dev/input/eventN` nodes whose device is named "Power Button".
pub fn power_buttons(class_input: &Path, dev_input: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(class_input) else { return Vec::new() };
    let mut found: Vec<PathBuf> = entries
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("event"))
        .filter(|n| {
            std::fs::read_to_string(class_input.join(n).join("device/name"))
                .is_ok_and(|s| s.trim() == POWER_BUTTON_NAME)
        })
        .map(|n| dev_input.join(n))
        .collect();
    found.sort();
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    fn raw(kind: u16, code: u16, value: i32) -> [u8; EVENT_SIZE] {
        let mut b = [0u8; EVENT_SIZE];
        b[..8].copy_from_slice(&1234i64.to_ne_bytes());
        b[16..18].copy_from_slice(&kind.to_ne_bytes());
        b[18..20].copy_from_slice(&code.to_ne_bytes());
        b[20..24].copy_from_slice(&value.to_ne_bytes());
        b
    }

    #[test]
    fn decodes_and_recognises_power_press() {
        assert_eq!(parse_event(&raw(1, 116, 1)), Event { kind: 1, code: 116, value: 1 });
        assert!(is_power_press(&parse_event(&raw(1, 116, 1))));
        assert!(!is_power_press(&parse_event(&raw(1, 116, 0))));
        assert!(!is_power_press(&parse_event(&raw(0, 0, 0))));
        let stream = [raw(1, 116, 0), raw(0, 0, 0), raw(1, 116, 1)].concat();
        assert!(has_power_press(&stream));
        assert!(!has_power_press(&stream[..48]));
    }

    #[test]
    fn finds_power_button_by_name() {
        let dir = tempfile::tempdir().unwrap();
        let class = dir.path().join("class");
        for (ev, name) in [("event0", "Power Button\n"), ("event1", "AT Translated Set 2 keyboard\n")] {
            std::fs::create_dir_all(class.join(ev).join("device")).unwrap();
            std::fs::write(class.join(ev).join("device/name"), name).unwrap();
        }
        assert_eq!(power_buttons(&class, Path::new("/dev/input")), vec![PathBuf::from("/dev/input/event0")]);
    }
}
