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
        ["console-password"] => format!("console password set for {}", text(&answer["name"])),
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
    // Admins have a console password or not; chat users have no such column.
    let console = |r: &Value| r.get("console").map(|c| format!(" {:<7}", yes_no(c))).unwrap_or_default();
    let header = if rows[0].get("console").is_some() { " CONSOLE" } else { "" };
    let mut out = format!(
        "{:<32} {:>5} {:<6} {:<10} {:<4}{header} {}",
        "NAME", "UID", "LOCKED", "EXPIRES", "TOTP", "ONLINE"
    );
    for r in rows {
        out.push_str(&format!(
            "\n{:<32} {:>5} {:<6} {:<10} {:<4}{} {}",
            text(&r["name"]),
            r["uid"],
            yes_no(&r["locked"]),
            r["expires"].as_str().unwrap_or("never"),
            yes_no(&r["totp"]),
            console(&r),
            yes_no(&r["logged_in"]),
        ));
    }
    out
}

fn status(answer: &Value) -> String {
    let secs = answer["uptime_ms"].as_u64().unwrap_or(0) / 1000;
    let mut out = format!("up {}h {:02}m {:02}s", secs / 3600, secs / 60 % 60, secs % 60);
    for s in answer["services"].as_array().into_iter().flatten() {
        let row = format!(
            "\n  {:<16} {:<9} restarts {:<3} {}",
            text(&s["name"]),
            text(&s["state"]),
            s["restarts"],
            mib(&s["memory"]["pss_kib"]).map(|m| format!("{m} MiB")).unwrap_or_default(),
        );
        // A service without a memory figure would end in padding.
        out.push_str(row.trim_end());
    }
    let total = &answer["memory"]["total"];
    if let (Some(pss), Some(rss)) = (mib(&total["pss_kib"]), mib(&total["rss_kib"])) {
        out.push_str(&format!(
            "\nmemory: {pss} MiB in {} processes (resident: {rss} MiB)",
            total["processes"]
        ));
    }
    if !answer["firewall"].is_null() {
        out.push_str(&format!("\nfirewall: {}", firewall(&answer["firewall"])));
    }
    if !answer["network"].is_null() {
        out.push_str(&format!("\nnetwork: {}", network(&answer["network"])));
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

/// KiB as MiB with one decimal.
fn mib(kib: &Value) -> Option<String> {
    kib.as_u64().map(|k| format!("{:.1}", k as f64 / 1024.0))
}

/// `verified (inet cloister, netdev cloister: egress on eth0); dropped: input 3, ...`, or what
/// differs.
fn firewall(fw: &Value) -> String {
    let tables: Vec<String> = fw["tables"].as_array().into_iter().flatten().map(text).collect();
    let mut out = format!("{} ({}", text(&fw["state"]), tables.join(", "));
    if !fw["egress"].is_null() {
        out.push_str(&format!(": egress on {}", text(&fw["egress"]["device"])));
    }
    out.push(')');
    if let Some(dropped) = fw["dropped_packets"].as_object() {
        let counts: Vec<String> =
            dropped.iter().map(|(chain, n)| format!("{} {n}", text(&Value::String(chain.clone())))).collect();
        out.push_str(&format!("; dropped packets: {}", counts.join(", ")));
    }
    out
}

/// `eth0 02:…:… (random MAC), 10.0.0.5/24 by dhcp, lease ends in 590 s`.
fn network(net: &Value) -> String {
    if net["uplink"].is_null() {
        return "no uplink".into();
    }
    let random = if net["mac_randomized"].as_bool() == Some(true) { "random MAC" } else { "its own MAC" };
    let address = if net["address"].is_null() { "no address".into() } else { text(&net["address"]) };
    let lease = match &net["lease"] {
        Value::Object(l) => {
            format!(", lease ends in {} s", l.get("expires_in_s").map(text).unwrap_or_default())
        }
        _ => String::new(),
    };
    format!(
        "{} {} ({random}), {address} by {}{lease}",
        text(&net["uplink"]),
        text(&net["mac"]),
        text(&net["mode"])
    )
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
    fn status_shows_each_service_and_the_memory_taken() {
        let status = json!({"ok": true, "uptime_ms": 3_723_000, "services": [
            {"name": "tor", "state": "ready", "restarts": 0, "memory": {"processes": 3, "rss_kib": 51200, "pss_kib": 40960}},
            {"name": "crasher", "state": "failed", "restarts": 3, "memory": null},
        ], "memory": {"total": {"processes": 40, "rss_kib": 204800, "pss_kib": 102400}}});
        let t = answer(&["status"], &status);
        let rows: Vec<&str> = t.lines().collect();
        assert_eq!(rows[0], "up 1h 02m 03s");
        assert!(rows[1].contains("tor") && rows[1].ends_with("40.0 MiB"), "{t}");
        assert!(rows[2].contains("failed") && !rows[2].contains("MiB"), "{t}");
        assert_eq!(rows[3], "memory: 100.0 MiB in 40 processes (resident: 200.0 MiB)");
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
    fn status_says_what_the_firewall_and_the_network_are() {
        let a = json!({"ok": true, "uptime_ms": 61_000, "services": [
            {"name": "tor", "state": "ready", "restarts": 0}],
            "firewall": {"state": "verified", "tables": ["inet cloister", "netdev cloister"], "uplink": "eth0",
                         "egress": {"device": "eth0"},
                         "dropped_packets": {"egress": 2, "forward": 0, "input": 17, "output": 1}},
            "network": {"uplink": "eth0", "mac": "02:ab:00:01:02:03", "mac_randomized": true, "mode": "dhcp",
                        "address": "10.0.0.5/24", "lease": {"expires_in_s": 590}}});
        let t = answer(&["status"], &a);
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(lines[0], "up 0h 01m 01s");
        assert_eq!(
            lines[2],
            "firewall: verified (inet cloister, netdev cloister: egress on eth0); \
             dropped packets: egress 2, forward 0, input 17, output 1"
        );
        assert_eq!(
            lines[3],
            "network: eth0 02:ab:00:01:02:03 (random MAC), 10.0.0.5/24 by dhcp, lease ends in 590 s"
        );
        let bad = json!({"firewall": {"state": "differs: unexpected table x (family 2)\u{1b}", "tables": ["inet cloister"]},
                         "network": {"uplink": null, "lease": "none"}});
        let t = answer(&["status"], &bad);
        assert!(t.contains("firewall: differs: unexpected table x (family 2)? (inet cloister)"), "{t}");
        assert!(t.ends_with("network: no uplink"), "{t}");
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
