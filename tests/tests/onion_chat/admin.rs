//! The admin path on the same VM: the test image's admin (`ops`, key only, made per build by
//! `cargo xtask test`) manages chat users through the onion service with the admin CLI, and
//! every change shows in what a chat user can do next; `status` shows the firewall and uplink.

use super::*;

/// The test image's admin account; the other scenarios name it `admin::ADMIN`.
pub use cloister_tests::onion::ADMIN;

pub fn admin_manages_chat_users(ssh: &Ssh) -> Result<()> {
    let list = ssh.admin(&["user", "list"])?;
    ensure!(list.contains("alice") && list.contains("bob"), "user list:\n{list}");
    let added = ssh.admin(&["user", "add", "carol"])?;
    let password = word_after(
        added.lines().find(|l| l.starts_with("initial password")).context("no password shown")?,
        "initial password (shown only now; give it to carol):",
    )?;
    ensure!(password.len() == 24, "generated password {password:?}");
    std::fs::write(ssh.password_file("carol"), format!("{password}\n"))?;
    ensure!(ssh.logs_in("carol")?, "the new user cannot log in");

    ssh.admin(&["user", "lock", "carol"])?;
    ensure!(!ssh.logs_in("carol")?, "a locked user logged in");
    ssh.admin(&["user", "unlock", "carol"])?;
    ssh.admin(&["user", "expire", "carol", "2001-01-01"])?;
    ensure!(!ssh.logs_in("carol")?, "an expired user logged in");
    let listed = ssh.admin(&["user", "list"])?;
    ensure!(listed.lines().any(|l| l.starts_with("carol") && l.contains("2001-01-01")), "{listed}");
    ssh.admin(&["user", "expire", "carol", "never"])?;
    ensure!(ssh.logs_in("carol")?, "carol cannot log in after unlock and `expire never`");

    removal_ends_the_session(ssh)?;
    chosen_password(ssh)
}

/// `user add <name> --password` without a terminal reads the password twice from stdin; it
/// is never shown, and it logs in.
fn chosen_password(ssh: &Ssh) -> Result<()> {
    let chosen = format!("chosen-{}", token()?);
    let out =
        ssh.run(ADMIN, &[], &["user", "add", "erin", "--password"], &format!("{chosen}\n{chosen}\n"))?;
    let text = both(&out);
    ensure!(out.status.success() && text.contains("user erin added"), "{text}");
    ensure!(!text.contains(&chosen), "the chosen password was shown: {text}");
    std::fs::write(ssh.password_file("erin"), format!("{chosen}\n"))?;
    ensure!(ssh.logs_in("erin")?, "erin cannot log in with the password chosen for her");
    ssh.admin(&["user", "remove", "erin"])?;
    Ok(())
}

/// carol is logged in when she is removed: by the time `user remove` answers, her processes
/// are gone (the answer counts them), her ssh connection ends, and she cannot log in again.
fn removal_ends_the_session(ssh: &Ssh) -> Result<()> {
    let session = ssh.spawn_session("carol")?;
    let mut session = KillOnDrop(session);
    let online = retry_until(Duration::from_secs(120), || {
        let list = ssh.admin(&["user", "list"])?;
        let row = list.lines().find(|l| l.starts_with("carol")).map(str::to_string);
        Ok(row.filter(|r| r.ends_with("yes")))
    })?;
    eprintln!("before removal: {online}");
    let removed = ssh.admin(&["user", "remove", "carol"])?;
    let killed: u32 = removed
        .split_whitespace()
        .find_map(|w| w.parse().ok())
        .with_context(|| format!("no count of killed processes in {removed:?}"))?;
    ensure!(killed >= 1, "carol's session was not killed: {removed}");
    let deadline = Instant::now() + Duration::from_secs(90);
    while session.0.try_wait()?.is_none() {
        ensure!(Instant::now() < deadline, "carol's ssh session is still open after her removal");
        std::thread::sleep(Duration::from_millis(500));
    }
    ensure!(!ssh.logs_in("carol")?, "a removed user logged in");
    let list = ssh.admin(&["user", "list"])?;
    ensure!(!list.contains("carol"), "carol is still listed:\n{list}");
    Ok(())
}

/// `show`: the onion address and the host key fingerprint, each followed by its QR code, and
/// both what the console said.
pub fn admin_shows_identity(ssh: &Ssh, onion: &str, host_key: &str) -> Result<()> {
    let shown = ssh.admin(&["show"])?;
    for (label, value) in [("onion address: ", onion), ("ssh host key: ", host_key)] {
        ensure!(shown.contains(&format!("{label}{value}")), "{label} missing:\n{shown}");
        let scanned = cloister_tests::qr::after_marker(&shown, label);
        ensure!(scanned.as_deref() == Some(value), "the QR after {label:?} reads {scanned:?}:\n{shown}");
    }
    Ok(())
}

/// `status`: the firewall read back afresh and still exactly what PID 1 applied, both tables
/// with the egress one on the uplink, and the uplink with its random MAC and DHCP lease.
pub fn admin_shows_status(ssh: &Ssh) -> Result<()> {
    let status = ssh.admin(&["status"])?;
    let line = |prefix: &str| status.lines().find(|l| l.starts_with(prefix)).map(str::to_string);
    let fw = line("firewall: ").with_context(|| format!("no firewall line:\n{status}"))?;
    ensure!(fw.starts_with("firewall: verified (inet cloister, netdev cloister: egress on "), "{fw}");
    ensure!(fw.contains("dropped packets: "), "{fw}");
    let net = line("network: ").with_context(|| format!("no network line:\n{status}"))?;
    ensure!(net.contains("(random MAC)") && net.contains(" by dhcp, lease ends in "), "{net}");
    eprintln!("{fw}\n{net}");
    Ok(())
}

/// Refusals through the admin CLI, each a clear error that changes nothing; the last admin
/// stays; chat users get no admin CLI and the admin gets no password login.
pub fn admin_refusals(ssh: &Ssh) -> Result<()> {
    for (command, says) in [
        (&["user", "add", "x;id"][..], "not a name"),
        (&["user", "add", "root"], "reserved"),
        (&["user", "add", "alice"], "already exists"),
        (&["user", "expire", "alice", "2027-02-30"], "not a date"),
        (&["user", "remove", "ops"], "no chat account"),
        (&["admin", "remove", "ops"], "last admin"),
        (&["admin", "add", "eve", "ssh-rsa", "AAAAB3NzaC1yc2E"], "key type"),
        (&["sh"], "unknown command"),
    ] {
        let out = ssh.admin_output(command)?;
        let text = both(&out);
        ensure!(!out.status.success() && text.contains(says), "{command:?}: {text}");
    }
    let session = ssh.run(ADMIN, &["-tt"], &[], "user list\n\u{1b}[2J\nexit\n")?;
    let text = both(&session);
    ensure!(text.contains("admin> ") && text.contains("alice") && text.contains("bye"), "{text}");
    ensure!(text.contains("control characters"), "control characters passed: {text}");
    // bob: alice's password changed in the passwd scenario.
    let out = ssh.run("bob", &[], &["user", "list"], "")?;
    ensure!(both(&out).contains("this account is for chat only"), "bob: {}", both(&out));
    let out = ssh.password_login_as_admin("a guess at a password")?;
    ensure!(!out.status.success() && !both(&out).contains("admin> "), "password login: {}", both(&out));
    Ok(())
}
