//! The gate's policy as pure functions: parsing IRC lines (RFC 1459/2812 framing), the client
//! command allowlist, and the rewriting of ngircd 26.1's replies so that no line a chat user
//! receives carries the server's version, OS, build, host name, start time, time zone or counts.
//!
//! Both directions are driven by reviewed tables ([`CLIENT_RULES`], [`SERVER_RULES`]); a command
//! missing from the client table is refused, a reply missing from the server table passes with
//! only the upstream server name replaced. Lines are bytes, not `str`: IRC does not promise UTF-8
//! and a lossy conversion would alter what users say.

/// Longest line a client may send, without its terminator (RFC 2812: 512 bytes with CR LF).
pub const CLIENT_LINE_MAX: usize = 510;
/// Longest line taken from the server, without its terminator; longer ones are dropped whole.
pub const SERVER_LINE_MAX: usize = 8192;

/// What the gate says instead of ngircd's info string in WHOIS (312).
pub const SERVER_INFO: &str = "cloister";

/// One parsed IRC message. `trailing` records that the last parameter was written with `:`,
/// so that a rewritten line keeps the shape of the original.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    pub prefix: Option<Vec<u8>>,
    pub command: Vec<u8>,
    pub params: Vec<Vec<u8>>,
    pub trailing: bool,
}

/// Parses one line (terminator already removed). `None` for a line with no command.
pub fn parse(line: &[u8]) -> Option<Message> {
    let mut rest = trim_spaces(line);
    let mut prefix = None;
    if let Some(after) = rest.strip_prefix(b":") {
        let end = after.iter().position(|&b| b == b' ')?;
        prefix = Some(after[..end].to_vec());
        rest = trim_spaces(&after[end..]);
    }
    let end = rest.iter().position(|&b| b == b' ').unwrap_or(rest.len());
    let command = rest[..end].to_vec();
    if command.is_empty() {
        return None;
    }
    rest = trim_spaces(&rest[end..]);
    let mut params = Vec::new();
    let mut trailing = false;
    while !rest.is_empty() {
        if let Some(text) = rest.strip_prefix(b":") {
            params.push(text.to_vec());
            trailing = true;
            break;
        }
        let end = rest.iter().position(|&b| b == b' ').unwrap_or(rest.len());
        params.push(rest[..end].to_vec());
        rest = trim_spaces(&rest[end..]);
    }
    Some(Message { prefix, command, params, trailing })
}

fn trim_spaces(mut s: &[u8]) -> &[u8] {
    while let Some(rest) = s.strip_prefix(b" ") {
        s = rest;
    }
    s
}

impl Message {
    /// A message from the gate itself, its last parameter always in trailing form.
    pub fn new(prefix: Option<&str>, command: &str, params: &[&[u8]]) -> Message {
        Message {
            prefix: prefix.map(|p| p.as_bytes().to_vec()),
            command: command.as_bytes().to_vec(),
            params: params.iter().map(|p| p.to_vec()).collect(),
            trailing: true,
        }
    }

    /// The wire form, ending in CR LF.
    pub fn to_line(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(64);
        if let Some(prefix) = &self.prefix {
            out.push(b':');
            out.extend_from_slice(prefix);
            out.push(b' ');
        }
        out.extend_from_slice(&self.command);
        let last = self.params.len().saturating_sub(1);
        for (i, param) in self.params.iter().enumerate() {
            out.push(b' ');
            let needs_colon = param.is_empty() || param.contains(&b' ') || param.starts_with(b":");
            if i == last && (self.trailing || needs_colon) {
                out.push(b':');
            }
            out.extend_from_slice(param);
        }
        out.extend_from_slice(b"\r\n");
        out
    }

    fn is(&self, command: &str) -> bool {
        self.command.eq_ignore_ascii_case(command.as_bytes())
    }
}

/// Fixed settings of one gate.
#[derive(Debug, Clone)]
pub struct Config {
    /// The name clients see for the server, in place of ngircd's configured name.
    pub server_name: String,
}

/// What the gate learns about one connection from the server's replies.
#[derive(Debug, Clone, Default)]
pub struct Session {
    /// The client's nick, from the 001 and the client's own NICK changes.
    pub nick: Option<Vec<u8>>,
    /// ngircd's real server name: the first prefix without `!`/`@` it sends (a CAP reply or the
    /// 001), since ngircd's name is whatever its config says.
    pub upstream_name: Option<Vec<u8>>,
}

impl Session {
    fn nick_or_star(&self) -> &[u8] {
        self.nick.as_deref().unwrap_or(b"*")
    }
}

// ---------------------------------------------------------------------------------------------
// Client → server
// ---------------------------------------------------------------------------------------------

/// What the gate does with one client command.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientRule {
    /// Forwarded (without any prefix the client put on it).
    Forward,
    /// Forwarded unless its text is a CTCP other than ACTION (then dropped silently).
    Message,
    /// Forwarded with only its first parameter: a second one names a target server, which would
    /// be our fake name and get a 402 from ngircd.
    Ping,
    /// Forwarded unless it names `&SERVER`, ngircd's channel of server log messages.
    Join,
    /// Answered by the gate with its fixed MOTD.
    LocalMotd,
}

/// The client allowlist: (command, rule, why irssi needs it). Any other command, including
/// VERSION, INFO, ADMIN, STATS, LUSERS, TIME, LINKS, TRACE, SERVLIST, SQUERY, CONNECT, OPER, KILL,
/// DIE, REHASH, RESTART, WALLOPS, SERVER, SERVICE, WHOWAS, USERS, SUMMON, HELP, WEBIRC, CHARCONV,
/// SQUIT, GLINE, KLINE, is answered `421 <nick> <CMD> :Unknown command` and never reaches ngircd.
pub const CLIENT_RULES: &[(&str, ClientRule, &str)] = &[
    ("CAP", ClientRule::Forward, "irssi 1.4 opens with CAP LS 302; ngircd offers only multi-prefix"),
    ("PASS", ClientRule::Forward, "registration"),
    ("NICK", ClientRule::Forward, "registration, nick changes"),
    ("USER", ClientRule::Forward, "registration"),
    ("PING", ClientRule::Ping, "irssi's lag check sends PING <server-name>"),
    ("PONG", ClientRule::Forward, "answer to ngircd's keepalive PING"),
    ("QUIT", ClientRule::Forward, "leaving"),
    ("JOIN", ClientRule::Join, "channels"),
    ("PART", ClientRule::Forward, "channels"),
    ("PRIVMSG", ClientRule::Message, "chatting; CTCP other than ACTION is dropped"),
    ("NOTICE", ClientRule::Message, "chatting; CTCP other than ACTION is dropped"),
    ("TOPIC", ClientRule::Forward, "channels"),
    ("NAMES", ClientRule::Forward, "channel members"),
    ("LIST", ClientRule::Forward, "channel list"),
    ("MODE", ClientRule::Forward, "irssi sets +i and syncs channel modes and ban lists"),
    ("KICK", ClientRule::Forward, "channel operators"),
    ("INVITE", ClientRule::Forward, "channel operators"),
    ("WHO", ClientRule::Forward, "irssi syncs channel members with WHO #chan; 352's server is renamed"),
    ("WHOIS", ClientRule::Forward, "user info; 312 is rewritten"),
    ("AWAY", ClientRule::Forward, "away status"),
    ("ISON", ClientRule::Forward, "irssi's notify list"),
    ("USERHOST", ClientRule::Forward, "302 carries nick=+user@host: user hosts, no server facts"),
    ("MOTD", ClientRule::LocalMotd, "/motd shows the gate's fixed MOTD"),
];

/// What the gate does with one client line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientAction {
    /// Send this line (with CR LF) to the server.
    Forward(Vec<u8>),
    /// Send these lines back to the client; nothing goes to the server.
    Reply(Vec<Vec<u8>>),
    /// Nothing to anyone.
    Drop,
}

/// Applies [`CLIENT_RULES`] to one client line (terminator removed).
pub fn filter_client(line: &[u8], cfg: &Config, session: &Session) -> ClientAction {
    // ngircd reads lines as C strings: what follows a NUL would be a part we never checked.
    if line.contains(&0) {
        return ClientAction::Drop;
    }
    let Some(mut msg) = parse(line) else { return ClientAction::Drop };
    // ngircd ignores or rejects a client's prefix; dropping it keeps what we checked and what
    // ngircd parses the same.
    msg.prefix = None;
    let rule = CLIENT_RULES.iter().find(|(cmd, _, _)| msg.is(cmd)).map(|(_, rule, _)| *rule);
    match rule {
        None => ClientAction::Reply(vec![unknown_command(&msg.command, cfg, session)]),
        Some(ClientRule::Forward) => ClientAction::Forward(msg.to_line()),
        Some(ClientRule::Message) => match msg.params.get(1) {
            Some(text) if !ctcp_allowed(text) => ClientAction::Drop,
            _ => ClientAction::Forward(msg.to_line()),
        },
        Some(ClientRule::Ping) => {
            msg.params.truncate(1);
            ClientAction::Forward(msg.to_line())
        }
        Some(ClientRule::Join) => join(msg, cfg, session),
        Some(ClientRule::LocalMotd) => ClientAction::Reply(fixed_motd(cfg, session)),
    }
}

fn unknown_command(command: &[u8], cfg: &Config, session: &Session) -> Vec<u8> {
    Message::new(Some(&cfg.server_name), "421", &[session.nick_or_star(), command, b"Unknown command"])
        .to_line()
}

fn join(msg: Message, cfg: &Config, session: &Session) -> ClientAction {
    let names_server_channel = msg
        .params
        .first()
        .is_some_and(|chans| chans.split(|&b| b == b',').any(|c| c.eq_ignore_ascii_case(b"&SERVER")));
    if names_server_channel {
        let reply = Message::new(
            Some(&cfg.server_name),
            "403",
            &[session.nick_or_star(), b"&SERVER", b"No such channel"],
        );
        return ClientAction::Reply(vec![reply.to_line()]);
    }
    ClientAction::Forward(msg.to_line())
}

/// True if a PRIVMSG/NOTICE text may cross the gate: no CTCP at all, or one ACTION (`/me`).
/// Any other `\x01` anywhere is refused, so no CTCP VERSION/TIME/PING/CLIENTINFO query or reply
/// and no DCC offer reaches another user, whatever a client does with embedded CTCP.
pub fn ctcp_allowed(text: &[u8]) -> bool {
    let Some(body) = text.strip_prefix(b"\x01") else { return !text.contains(&1) };
    let body = body.strip_suffix(b"\x01").unwrap_or(body);
    let is_action = body == b"ACTION" || body.starts_with(b"ACTION ");
    is_action && !body.contains(&1)
}

/// The gate's own MOTD, sent at registration and for /motd.
pub fn fixed_motd(cfg: &Config, session: &Session) -> Vec<Vec<u8>> {
    let name = cfg.server_name.as_str();
    let nick = session.nick_or_star();
    let start = format!("- {name} message of the day");
    let body = format!("- Welcome to {name}.");
    vec![
        Message::new(Some(name), "375", &[nick, start.as_bytes()]).to_line(),
        Message::new(Some(name), "372", &[nick, body.as_bytes()]).to_line(),
        Message::new(Some(name), "376", &[nick, b"End of MOTD command"]).to_line(),
    ]
}

// ---------------------------------------------------------------------------------------------
// Server → client
// ---------------------------------------------------------------------------------------------

/// What the gate does with one kind of server line (after learning the nick and upstream name).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ServerRule {
    /// Never shown.
    Drop,
    /// 001: learn the nick; pass renamed.
    Welcome,
    /// 002: `Your host is <server-name>`.
    YourHost,
    /// 003: `This server was created sometime`.
    Created,
    /// 004: `<nick> <server-name> - <umodes> <cmodes>`.
    MyInfo,
    /// 005: drop the IRCD= token and any token naming the software.
    ISupport,
    /// 376/422: replaced by the gate's fixed MOTD.
    MotdEnd,
    /// 312: `<me> <nick> <server-name> :cloister`.
    WhoisServer,
    /// PRIVMSG/NOTICE: dropped when sent by the server itself (host/ident lookups, connection
    /// statistics, +s/+c server notices, &SERVER log lines); from users, CTCP other than ACTION
    /// is dropped.
    Text,
    /// NICK: follow the client's own nick changes; pass renamed.
    Nick,
}

/// The server table: (reply, rule, what ngircd 26.1 would leak). Every line, whatever its rule,
/// gets ngircd's real name replaced by the gate's server name (prefix, any parameter equal to it,
/// and inside the text of numerics and ERROR).
pub const SERVER_RULES: &[(&str, ServerRule, &str)] = &[
    ("001", ServerRule::Welcome, "nothing; it tells the nick and ngircd's name"),
    ("002", ServerRule::YourHost, "ngircd-26.1 (x86_64/pc/linux-gnu)"),
    ("003", ServerRule::Created, "start date, in the server's local time zone"),
    ("004", ServerRule::MyInfo, "ngircd-26.1"),
    ("005", ServerRule::ISupport, "IRCD=ngIRCd"),
    ("200", ServerRule::Drop, "TRACE link: version, debug level"),
    ("204", ServerRule::Drop, "TRACE operator"),
    ("206", ServerRule::Drop, "TRACE server: version"),
    ("211", ServerRule::Drop, "STATS l: link traffic"),
    ("212", ServerRule::Drop, "STATS m: command counts"),
    ("216", ServerRule::Drop, "STATS k/g: bans"),
    ("219", ServerRule::Drop, "end of STATS"),
    ("234", ServerRule::Drop, "SERVLIST"),
    ("235", ServerRule::Drop, "end of SERVLIST"),
    ("242", ServerRule::Drop, "STATS u: uptime"),
    ("250", ServerRule::Drop, "LUSERS: highest connection count, connections received"),
    ("251", ServerRule::Drop, "LUSERS: user/service/server counts"),
    ("252", ServerRule::Drop, "LUSERS: operator count"),
    ("253", ServerRule::Drop, "LUSERS: unknown connections"),
    ("254", ServerRule::Drop, "LUSERS: channel count"),
    ("255", ServerRule::Drop, "LUSERS: local counts"),
    ("256", ServerRule::Drop, "ADMIN"),
    ("257", ServerRule::Drop, "ADMIN location"),
    ("258", ServerRule::Drop, "ADMIN location"),
    ("259", ServerRule::Drop, "ADMIN e-mail"),
    ("262", ServerRule::Drop, "end of TRACE: version"),
    ("265", ServerRule::Drop, "LUSERS: local users, max"),
    ("266", ServerRule::Drop, "LUSERS: global users, max"),
    ("312", ServerRule::WhoisServer, "server info string (WHOWAS: a local-time date)"),
    ("314", ServerRule::Drop, "WHOWAS: past hosts"),
    ("351", ServerRule::Drop, "VERSION: ngircd-26.1, build options"),
    ("364", ServerRule::Drop, "LINKS: server info string"),
    ("365", ServerRule::Drop, "end of LINKS"),
    ("369", ServerRule::Drop, "end of WHOWAS"),
    ("371", ServerRule::Drop, "INFO: version, birth date, start date"),
    ("372", ServerRule::Drop, "MOTD body: replaced"),
    ("374", ServerRule::Drop, "end of INFO"),
    ("375", ServerRule::Drop, "MOTD start: replaced"),
    ("376", ServerRule::MotdEnd, "end of MOTD: the fixed MOTD goes here"),
    ("391", ServerRule::Drop, "TIME: real time and time zone"),
    ("422", ServerRule::MotdEnd, "no MOTD: the fixed MOTD goes here"),
    ("NICK", ServerRule::Nick, "nothing"),
    ("NOTICE", ServerRule::Text, "*** Looking up your hostname/ident; server notices"),
    ("PRIVMSG", ServerRule::Text, "&SERVER log lines; CTCP"),
];

/// Applies [`SERVER_RULES`] to one server line (terminator removed); returns the lines (with
/// CR LF) to send to the client, none when the line is dropped.
pub fn filter_server(line: &[u8], cfg: &Config, session: &mut Session) -> Vec<Vec<u8>> {
    let Some(mut msg) = parse(line) else { return Vec::new() };
    learn_upstream_name(&msg, session);
    let rule = SERVER_RULES.iter().find(|(cmd, _, _)| msg.is(cmd)).map(|(_, rule, _)| *rule);
    let from_server = is_from_server(&msg, session);
    match rule {
        Some(ServerRule::Drop) => return Vec::new(),
        Some(ServerRule::MotdEnd) => return fixed_motd(cfg, session),
        Some(ServerRule::Text) if from_server => return Vec::new(),
        Some(ServerRule::Text) => match msg.params.get(1) {
            Some(text) if !ctcp_allowed(text) => return Vec::new(),
            _ => {}
        },
        Some(ServerRule::Welcome) => session.nick = msg.params.first().cloned(),
        Some(ServerRule::Nick) => follow_nick(&msg, session),
        Some(ServerRule::YourHost) => set_text(&mut msg, format!("Your host is {}", cfg.server_name)),
        Some(ServerRule::Created) => set_text(&mut msg, "This server was created sometime".into()),
        Some(ServerRule::MyInfo) => my_info(&mut msg, cfg),
        Some(ServerRule::ISupport) => isupport(&mut msg),
        Some(ServerRule::WhoisServer) => whois_server(&mut msg, cfg),
        None => {}
    }
    rename_server(&mut msg, cfg, session);
    vec![msg.to_line()]
}

fn learn_upstream_name(msg: &Message, session: &mut Session) {
    let Some(prefix) = &msg.prefix else { return };
    let is_server = !prefix.contains(&b'!') && !prefix.contains(&b'@');
    if msg.is("001") || (session.upstream_name.is_none() && is_server) {
        session.upstream_name = Some(prefix.clone());
    }
}

/// ngircd writes its pre-registration notices without a prefix; everything else it says itself
/// carries its name.
fn is_from_server(msg: &Message, session: &Session) -> bool {
    match (&msg.prefix, &session.upstream_name) {
        (None, _) => true,
        (Some(prefix), Some(name)) => prefix.eq_ignore_ascii_case(name),
        (Some(prefix), None) => !prefix.contains(&b'!') && !prefix.contains(&b'@'),
    }
}

fn follow_nick(msg: &Message, session: &mut Session) {
    let (Some(prefix), Some(new)) = (&msg.prefix, msg.params.first()) else { return };
    let old = prefix.split(|&b| b == b'!').next().unwrap_or_default();
    if session.nick.as_deref().is_some_and(|nick| nick.eq_ignore_ascii_case(old)) {
        session.nick = Some(new.clone());
    }
}

/// Replaces the last parameter (the human text) of a `<nick> :<text>` reply.
fn set_text(msg: &mut Message, text: String) {
    msg.params.truncate(1);
    msg.params.push(text.into_bytes());
    msg.trailing = true;
}

fn my_info(msg: &mut Message, cfg: &Config) {
    if let Some(name) = msg.params.get_mut(1) {
        *name = cfg.server_name.as_bytes().to_vec();
    }
    if let Some(version) = msg.params.get_mut(2) {
        *version = b"-".to_vec();
    }
}

fn isupport(msg: &mut Message) {
    let text = if msg.trailing { msg.params.pop() } else { None };
    let nick = if msg.params.is_empty() { Vec::new() } else { msg.params.remove(0) };
    msg.params.retain(|token| !isupport_token_leaks(token));
    msg.params.insert(0, nick);
    msg.params.extend(text);
}

fn isupport_token_leaks(token: &[u8]) -> bool {
    let key = token.split(|&b| b == b'=').next().unwrap_or_default();
    key.eq_ignore_ascii_case(b"IRCD") || contains_ignore_case(token, b"ngircd")
}

fn whois_server(msg: &mut Message, cfg: &Config) {
    msg.params.truncate(2);
    msg.params.push(cfg.server_name.as_bytes().to_vec());
    msg.params.push(SERVER_INFO.as_bytes().to_vec());
    msg.trailing = true;
}

/// Replaces ngircd's real name: as the prefix, as any whole parameter, and inside the text of
/// numerics and ERROR; never inside what users say (PRIVMSG/NOTICE).
fn rename_server(msg: &mut Message, cfg: &Config, session: &Session) {
    let Some(real) = session.upstream_name.as_deref() else { return };
    let fake = cfg.server_name.as_bytes();
    if msg.prefix.as_deref().is_some_and(|p| p.eq_ignore_ascii_case(real)) {
        msg.prefix = Some(fake.to_vec());
    }
    if msg.is("PRIVMSG") || msg.is("NOTICE") {
        return;
    }
    let in_text = msg.command.iter().all(u8::is_ascii_digit) || msg.is("ERROR");
    for param in &mut msg.params {
        if param.eq_ignore_ascii_case(real) {
            *param = fake.to_vec();
        } else if in_text {
            *param = replace_ignore_case(param, real, fake);
        }
    }
}

fn contains_ignore_case(haystack: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty() && haystack.windows(needle.len()).any(|w| w.eq_ignore_ascii_case(needle))
}

fn replace_ignore_case(haystack: &[u8], needle: &[u8], with: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(haystack.len());
    let mut rest = haystack;
    while !rest.is_empty() {
        match rest.get(..needle.len()) {
            Some(head) if !needle.is_empty() && head.eq_ignore_ascii_case(needle) => {
                out.extend_from_slice(with);
                rest = &rest[needle.len()..];
            }
            _ => {
                out.push(rest[0]);
                rest = &rest[1..];
            }
        }
    }
    out
}

#[cfg(test)]
#[path = "filter_tests.rs"]
mod tests;
