//! Two-factor login on the same VM: a user the admin adds turns TOTP on in the chat shell by
//! scanning the QR code it draws (decoded here, as a phone would), and from then on logs in
//! only with a code computed from that secret: wrong, expired and reused codes fail. The admin
//! then resets the second factor, and removes the user. The admin does the same for itself at
//! the admin CLI.

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
    let mut app = {
        let t = Terminal::open(ssh, USER)?;
        t.wait_for("chat> ", Duration::from_secs(120))?;
        t.send("totp\n")?;
        let app = enrol_on(&t, "code from the app (empty line: cancel): ", USER)?;
        t.send("exit\n")?;
        t.wait_for("bye", Duration::from_secs(60))?;
        app
    };
    let list = ssh.admin(&["user", "list"])?;
    let row = list.lines().find(|l| l.starts_with(USER)).context("dave is not listed")?;
    ensure!(row.split_whitespace().nth(4) == Some("yes"), "no second factor listed: {row}");

    let stale = app.code_at(unix_now()? - 120);
    let out = ssh.session(USER, &format!("000000\n{stale}\n{stale}\n"))?;
    let text = both(&out);
    ensure!(text.contains("wrong code") && text.contains("too many wrong codes"), "{}", tail(&text));
    ensure!(!text.contains("type help"), "a wrong or expired code let dave in: {}", tail(&text));

    let code = app.next_code()?;
    let out = ssh.session(USER, &format!("{code}\nhelp\nexit\n"))?;
    let text = both(&out);
    ensure!(text.contains("chat    open the chat") && text.contains("bye"), "{}", tail(&text));
    // A terminal session ends only by the shell: two non-codes use up the tries.
    let out = ssh.session(USER, &format!("{code}\nx\nx\n"))?;
    let text = both(&out);
    ensure!(text.contains("used already") && !text.contains("type help"), "{}", tail(&text));

    let reset = ssh.admin(&["user", "reset-totp", USER])?;
    ensure!(reset.contains("second factor removed"), "{reset}");
    ensure!(ssh.logs_in(USER)?, "no password-only login after the reset");
    Ok(())
}

/// The admin turns on two-factor login at the CLI's prompt; from then on each login of the
/// CLI needs a code (here as stdin's first line, as a script would give it), until another
/// reset. It ends with the admin's second factor dropped, for the scenarios after it.
pub fn admin_two_factor_login(ssh: &Ssh) -> Result<()> {
    let mut app = {
        let t = Terminal::open(ssh, admin::ADMIN)?;
        t.wait_for("admin> ", Duration::from_secs(120))?;
        t.send("totp enrol\n")?;
        let app = enrol_on(&t, "code from the app: ", admin::ADMIN)?;
        t.send("exit\n")?;
        t.wait_for("bye", Duration::from_secs(60))?;
        app
    };
    let out = ssh.run(admin::ADMIN, &[], &["user", "list"], "")?;
    ensure!(!out.status.success() && !stdout(&out).contains("alice"), "no code asked: {}", both(&out));
    let stale = app.code_at(unix_now()? - 120);
    let out = ssh.run(admin::ADMIN, &[], &["user", "list"], &format!("{stale}\n"))?;
    ensure!(!out.status.success() && both(&out).contains("wrong code"), "{}", both(&out));
    let code = app.next_code()?;
    let out = ssh.run(admin::ADMIN, &[], &["user", "list"], &format!("{code}\n"))?;
    ensure!(out.status.success() && stdout(&out).contains("alice"), "{}", both(&out));
    let out = ssh.run(admin::ADMIN, &[], &["user", "list"], &format!("{code}\n"))?;
    ensure!(!out.status.success() && both(&out).contains("used already"), "{}", both(&out));
    let code = app.next_code()?;
    let out = ssh.run(admin::ADMIN, &[], &["admin", "reset-totp", admin::ADMIN], &format!("{code}\n"))?;
    ensure!(out.status.success() && stdout(&out).contains("second factor removed"), "{}", both(&out));
    ensure!(ssh.admin(&["user", "list"])?.contains("alice"), "a code is still asked after the reset");
    Ok(())
}

/// An authenticator app holding one secret, and the newest step it gave a code of.
pub struct App {
    totp: totp_rs::Totp,
    last_step: u64,
}

impl App {
    /// Scans the QR code of an enrolment shown in `shown` (a terminal's or the console's text)
    /// for `account`, checking that the key typed out beside it is the QR code's.
    pub fn from_enrolment(shown: &str, account: &str) -> Result<App> {
        let uri = cloister_tests::qr::after_marker(shown, "scan this QR code")
            .with_context(|| format!("no readable QR code:\n{}", tail(shown)))?;
        let key = uri
            .strip_prefix(&format!("otpauth://totp/Cloister:{account}?secret="))
            .with_context(|| format!("not a TOTP URI for {account}: {uri}"))?;
        let typed =
            shown.lines().rev().find_map(|l| l.split("or type this key into it: ").nth(1)).unwrap_or("");
        ensure!(typed.trim_end().replace(' ', "") == key, "the key shown ({typed}) is not the QR code's");
        let bytes: [u8; 20] = data_encoding::BASE32_NOPAD
            .decode(key.as_bytes())?
            .try_into()
            .map_err(|_| anyhow::anyhow!("the secret is not 160 bits"))?;
        // The code of the step in which it was enrolled is what the first one types back.
        let last_step = unix_now()? / STEP - 1;
        Ok(App { totp: totp_rs::Builder::new().with_secret(bytes).build()?, last_step })
    }

    pub fn code_at(&self, at: u64) -> String {
        self.totp.generate(at).to_string()
    }

    /// A code the appliance has not taken yet: the current step's, or the next one's (which
    /// it takes too: one step of drift) when the current one was used; past that, it waits.
    pub fn next_code(&mut self) -> Result<String> {
        let step = (unix_now()? / STEP).max(self.last_step + 1);
        while unix_now()? / STEP + 1 < step {
            std::thread::sleep(Duration::from_millis(500));
        }
        self.last_step = step;
        Ok(self.code_at(step * STEP))
    }
}

/// Enrolment on terminal `t`, which has just been asked to enrol and shows `prompt` once the
/// secret is out: the QR code read back, its key checked against the text shown, and the
/// first code typed back.
fn enrol_on(t: &Terminal, prompt: &str, account: &str) -> Result<App> {
    t.wait_for(prompt, Duration::from_secs(60))?;
    let mut app = App::from_enrolment(&t.text_since(0), account)?;
    t.send(&format!("{}\n", app.next_code()?))?;
    t.wait_for("two-factor login is on", Duration::from_secs(60))?;
    Ok(app)
}

fn unix_now() -> Result<u64> {
    Ok(std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_secs())
}
