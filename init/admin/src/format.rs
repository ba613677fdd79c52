//! PID 1's JSON answers as text for a person at a terminal.

use serde_json::Value;

/// The text for `words`' answer.
pub fn answer(words: &[&str], answer: &Value) -> String {
    match words {
        ["status"] => status(answer),
        ["log"] => lines(&answer["lines"]),
        ["user" | "admin", "list"] => accounts(words[0], &answer["accounts"]),
        ["user", "add", ..] => added(answer),
        ["admin", "add", ..] => format!("admin {} added (uid {})", text(&answer["name"]), answer["uid"]),
        ["user" | "admin", "remove", ..] => format!(
            "{} {} removed; {} of its processes killed",
            words[0],
            text(&answer["name"]),
            answer["processes_killed"]
        ),
        ["user", "lock", ..] => {
            format!(
                "{} locked; {} of its processes killed",
                text(&answer["name"]),
                answer["processes_killed"]
            )
        }
        ["user", "unlock", ..] => format!("{} unlocked", text(&answer["name"])),
        ["user" | "admin", "reset-totp", ..] => match answer["had_totp"].as_bool() {
            Some(true) => format!("{}: second factor removed", text(&answer["name"])),
            _ => format!("{} had no second factor", text(&answer["name"])),
        },
        ["user", "expire", ..] => match answer["expires"].as_str() {
            Some(day) => format!("{} expires after {day}", text(&answer["name"])),
            None => format!("{} never expires", text(&answer["name"])),
        },
        ["disk", "passphrase", "add"] => format!(
            "passphrase added to {} disk container(s); each opens with it",
            answer["added"].as_array().map_or(0, Vec::len)
        ),
        ["disk", "passphrase", "remove"] => format!(
            "passphrase removed from {} disk container(s)",
            answer["removed"].as_array().map_or(0, Vec::len)
        ),
        ["poweroff"] => "powering off".into(),
        ["reboot"] => "rebooting".into(),
        _ => "ok".into(),
    }
}

/// The onion address and the host key fingerprint, each with its QR code, for users to check
/// what they connect to.
pub fn identity(answer: &Value) -> String {
    let mut out = Vec::new();
    for (key, label) in [("onion_address", "onion address"), ("ssh_host_key", "ssh host key")] {
        match answer[key]["text"].as_str() {
            Some(t) => out.push(format!("{label}: {}", text(&Value::String(t.into())))),
            None => {
                out.push(format!("{label}: not known yet"));
                continue;
            }
        }
        out.extend(answer[key]["qr"].as_array().into_iter().flatten().map(text));
    }
    out.join("\n")
}

/// A TOTP secret offered for enrolment: its QR code, then its key grouped for typing.
pub fn secret(offer: &Value) -> String {
    let uri = offer["uri"].as_str().unwrap_or("");
    let key = uri.split("secret=").nth(1).and_then(|rest| rest.split('&').next()).unwrap_or("");
    let grouped: Vec<&str> = key.as_bytes().chunks(4).filter_map(|c| std::str::from_utf8(c).ok()).collect();
    let mut out = vec!["scan this QR code with your authenticator app:".to_string()];
    out.extend(offer["qr"].as_array().into_iter().flatten().map(text));
    out.push(format!("or type this key into it: {}", text(&Value::String(grouped.join(" ")))));
    out.join("\n")
}

/// A new chat user, with its generated password when there is one.
pub fn added(answer: &Value) -> String {
    let name = text(&answer["name"]);
    let mut out = format!("user {name} added (uid {})", answer["uid"]);
    if let Some(password) = answer["password"].as_str() {
        out.push_str(&format!("\ninitial password (shown only now; give it to {name}): {password}"));
    }
    out
}

fn accounts(kind: &str, list: &Value) -> String {
    let rows = list.as_array().cloned().unwrap_or_default();
    if rows.is_empty() {
        return format!("no {kind} accounts");
    }
    let mut out =
        format!("{:<32} {:>5} {:<6} {:<10} {:<4} {}", "NAME", "UID", "LOCKED", "EXPIRES", "TOTP", "ONLINE");
    for r in rows {
        out.push_str(&format!(
            "\n{:<32} {:>5} {:<6} {:<10} {:<4} {}",
            text(&r["name"]),
            r["uid"],
            yes_no(&r["locked"]),
            r["expires"].as_str().unwrap_or("never"),
            yes_no(&r["totp"]),
            yes_no(&r["logged_in"]),
        ));
    }
    out
}

fn status(answer: &Value) -> String {
    let secs = answer["uptime_ms"].as_u64().unwrap_or(0) / 1000;
    let mut out = format!("up {}h {:02}m {:02}s", secs / 3600, secs / 60 % 60, secs % 60);
    for s in answer["services"].as_array().into_iter().flatten() {
        out.push_str(&format!(
            "\n  {:<16} {:<9} restarts {}",
            text(&s["name"]),
            text(&s["state"]),
            s["restarts"]
        ));
    }
    if !answer["network"].is_null() {
        out.push_str(&format!("\nnetwork: {}", answer["network"]));
    }
    let g = &answer["grow"];
    if !g.is_null() {
        out.push_str(&format!(
            "\ngrow: {} {}% (filled to {} of {} bytes)",
            text(&g["state"]),
            g["percent"],
            g["filled_to"],
            g["end"]
        ));
    }
    out
}

fn lines(list: &Value) -> String {
    list.as_array().into_iter().flatten().map(text).collect::<Vec<_>>().join("\n")
}

/// A string value with control characters replaced: nothing from the answer can drive the
/// admin's terminal.
fn text(v: &Value) -> String {
    let s = match v {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    };
    s.chars().map(|c| if c.is_control() { '?' } else { c }).collect()
}

fn yes_no(v: &Value) -> &'static str {
    if v.as_bool() == Some(true) {
        "yes"
    } else {
        "no"
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn lists_are_tables_and_terminal_safe() {
        let list = json!({"ok": true, "accounts": [
            {"name": "alice", "uid": 2001, "locked": false, "expires": null, "totp": true, "logged_in": true},
            {"name": "b\u{1b}[2J", "uid": 2002, "locked": true, "expires": "2027-01-31", "logged_in": false},
        ]});
        let t = answer(&["user", "list"], &list);
        let rows: Vec<&str> = t.lines().collect();
        assert!(rows[0].starts_with("NAME"), "{t}");
        assert!(rows[1].starts_with("alice") && rows[1].ends_with("no     never      yes  yes"), "{t}");
        assert!(rows[2].contains("b?[2J") && rows[2].contains("2027-01-31"), "{t}");
        assert_eq!(answer(&["admin", "list"], &json!({"accounts": []})), "no admin accounts");
    }

    #[test]
    fn a_secret_is_its_qr_code_then_its_key_in_groups() {
        let offer = json!({"ok": true, "uri": "otpauth://totp/Cloister:ops?secret=GEZDGNBVGY3TQOJQGE",
                           "qr": ["\u{2588}\u{2580}", "\u{1b}[2J"]});
        assert_eq!(
            secret(&offer),
            "scan this QR code with your authenticator app:\n\u{2588}\u{2580}\n?[2J\n\
             or type this key into it: GEZD GNBV GY3T QOJQ GE"
        );
    }

    #[test]
    fn identity_is_text_then_its_qr_lines() {
        let a = json!({"ok": true, "onion_address": {"text": "x.onion", "qr": ["\u{2588}\u{2580}", "\u{2584} "]},
                       "ssh_host_key": null});
        assert_eq!(
            identity(&a),
            "onion address: x.onion\n\u{2588}\u{2580}\n\u{2584} \nssh host key: not known yet"
        );
    }

    #[test]
    fn status_shows_the_grow_fill_when_there_is_one() {
        let a = json!({"ok": true, "uptime_ms": 61000, "services": [
            {"name": "grow-fill", "state": "ready", "restarts": 0}],
            "network": null, "grow": {"state": "filling", "percent": 25.0, "filled_to": 175, "end": 400}});
        assert_eq!(
            answer(&["status"], &a),
            "up 0h 01m 01s\n  grow-fill        ready     restarts 0\ngrow: filling 25.0% (filled to 175 of 400 bytes)"
        );
        let none = json!({"ok": true, "uptime_ms": 0, "services": [], "grow": null});
        assert_eq!(answer(&["status"], &none), "up 0h 00m 00s");
    }

    #[test]
    fn removals_say_what_was_killed() {
        let a = json!({"ok": true, "name": "carol", "uid": 2002, "processes_killed": 3});
        assert_eq!(answer(&["user", "remove", "carol"], &a), "user carol removed; 3 of its processes killed");
    }
}
