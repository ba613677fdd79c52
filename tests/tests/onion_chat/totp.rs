//! Two-factor login on the same VM: a user the admin adds turns TOTP on in the chat shell by
//! scanning the QR code it draws (decoded here, as a phone would), and from then on logs in
//! only with a code computed from that secret: wrong, expired and reused codes fail. The admin
//! then resets the second factor, and removes the user.

use super::*;

const USER: &str = "dave";
/// Seconds per TOTP step, as the appliance and every app count them.
const STEP: u64 = 30;

pub fn two_factor_login(ssh: &Ssh) -> Result<()> {
    let added = ssh.admin(&["user", "add", USER])?;
    let password = word_after(
        added.lines().find(|l| l.starts_with("initial password")).context("no password shown")?,
        &format!("initial password (shown only now; give it to {USER}):"),
    )?;
    std::fs::write(ssh.password_file(USER), format!("{password}\n"))?;
    let result = enrol_and_log_in(ssh);
    ssh.admin(&["user", "remove", USER])?;
    result
}

fn enrol_and_log_in(ssh: &Ssh) -> Result<()> {
    let (app, enrolled_step) = enrol(ssh)?;
    let list = ssh.admin(&["user", "list"])?;
    let row = list.lines().find(|l| l.starts_with(USER)).context("dave is not listed")?;
    ensure!(row.split_whitespace().nth(4) == Some("yes"), "no second factor listed: {row}");

    let now = unix_now()?;
    let stale = app.generate(now - 120).to_string();
    let out = ssh.session(USER, &format!("000000\n{stale}\n{stale}\n"))?;
    let text = both(&out);
    ensure!(text.contains("wrong code") && text.contains("too many wrong codes"), "{}", tail(&text));
    ensure!(!text.contains("type help"), "a wrong or expired code let dave in: {}", tail(&text));

    // The current code, unless its step is the one that confirmed the enrolment (used up):
    // then the next one, which the appliance takes too (one step of drift either way).
    let step = (unix_now()? / STEP).max(enrolled_step + 1);
    let code = app.generate(step * STEP).to_string();
    let out = ssh.session(USER, &format!("{code}\nhelp\nexit\n"))?;
    let text = both(&out);
    ensure!(text.contains("chat    open the chat") && text.contains("bye"), "{}", tail(&text));
    let out = ssh.session(USER, &format!("{code}\n"))?;
    let text = both(&out);
    ensure!(text.contains("used already") && !text.contains("type help"), "{}", tail(&text));

    let reset = ssh.admin(&["user", "reset-totp", USER])?;
    ensure!(reset.contains("second factor removed"), "{reset}");
    ensure!(ssh.logs_in(USER)?, "no password-only login after the reset");
    Ok(())
}

/// `totp` in dave's shell: the QR code read back, its key checked against the text shown, and
/// the first code typed back. Returns the app that holds the secret, and the step of that code.
fn enrol(ssh: &Ssh) -> Result<(totp_rs::Totp, u64)> {
    let t = Terminal::open(ssh, USER)?;
    t.wait_for("chat> ", Duration::from_secs(120))?;
    t.send("totp\n")?;
    t.wait_for("code from the app (empty line: cancel): ", Duration::from_secs(60))?;
    let shown = t.text_since(0);
    let uri = cloister_tests::qr::after_marker(&shown, "scan this QR code")
        .with_context(|| format!("no readable QR code:\n{}", tail(&shown)))?;
    let key = uri
        .strip_prefix(&format!("otpauth://totp/Cloister:{USER}?secret="))
        .with_context(|| format!("not a TOTP URI for {USER}: {uri}"))?;
    let typed = shown.lines().find_map(|l| l.split("or type this key into it: ").nth(1)).unwrap_or("");
    ensure!(typed.trim_end().replace(' ', "") == key, "the key shown ({typed}) is not the QR code's");
    let bytes: [u8; 20] = data_encoding::BASE32_NOPAD
        .decode(key.as_bytes())?
        .try_into()
        .map_err(|_| anyhow::anyhow!("the secret is not 160 bits"))?;
    let app = totp_rs::Builder::new().with_secret(bytes).build()?;
    let now = unix_now()?;
    t.send(&format!("{}\n", app.generate(now)))?;
    t.wait_for("two-factor login is on", Duration::from_secs(60))?;
    t.send("exit\n")?;
    t.wait_for("bye", Duration::from_secs(60))?;
    Ok((app, now / STEP))
}

fn unix_now() -> Result<u64> {
    Ok(std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_secs())
}
