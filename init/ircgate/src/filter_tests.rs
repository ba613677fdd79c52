//! Rule-by-rule tests of the filter, fed with lines in the formats of ngircd 26.1's
//! `src/ngircd/messages.h`, `login.c`, `irc-info.c` and `conn.c` (server name `real.example`,
//! as ngircd's config or the host name would set it).

use super::*;

const REAL: &str = "real.example";

fn cfg() -> Config {
    Config { server_name: "irc.cloister".into() }
}

/// A session after registration: nick and ngircd's name known.
fn registered() -> Session {
    Session { nick: Some(b"alice".to_vec()), upstream_name: Some(REAL.as_bytes().to_vec()) }
}

fn server(line: &str, session: &mut Session) -> Vec<String> {
    filter_server(line.as_bytes(), &cfg(), session)
        .into_iter()
        .map(|l| String::from_utf8(l).unwrap().trim_end_matches("\r\n").to_string())
        .collect()
}

fn one(line: &str) -> String {
    let out = server(line, &mut registered());
    assert_eq!(out.len(), 1, "{line} gave {out:?}");
    out.into_iter().next().unwrap()
}

fn dropped(line: &str) {
    assert_eq!(server(line, &mut registered()), Vec::<String>::new(), "{line} was not dropped");
}

fn client(line: &str) -> ClientAction {
    filter_client(line.as_bytes(), &cfg(), &registered())
}

fn forwarded(line: &str) -> String {
    match client(line) {
        ClientAction::Forward(out) => String::from_utf8(out).unwrap(),
        other => panic!("{line} not forwarded: {other:?}"),
    }
}

fn replied(line: &str) -> Vec<String> {
    match client(line) {
        ClientAction::Reply(lines) => lines.into_iter().map(|l| String::from_utf8(l).unwrap()).collect(),
        other => panic!("{line} not answered locally: {other:?}"),
    }
}

// --- parsing --------------------------------------------------------------------------------

#[test]
fn parse_splits_prefix_command_middle_and_trailing() {
    let msg =
        parse(b":real.example 001 alice :Welcome to the Internet Relay Network alice!~a@localhost").unwrap();
    assert_eq!(msg.prefix.as_deref(), Some(&b"real.example"[..]));
    assert_eq!(msg.command, b"001");
    assert_eq!(
        msg.params,
        vec![b"alice".to_vec(), b"Welcome to the Internet Relay Network alice!~a@localhost".to_vec()]
    );
    assert!(msg.trailing);
}

#[test]
fn parse_without_prefix_or_trailing_and_with_extra_spaces() {
    let msg = parse(b"MODE  #chan   +o  bob").unwrap();
    assert_eq!(msg.prefix, None);
    assert_eq!(msg.params, vec![b"#chan".to_vec(), b"+o".to_vec(), b"bob".to_vec()]);
    assert!(!msg.trailing);
}

#[test]
fn parse_rejects_lines_without_command() {
    assert_eq!(parse(b""), None);
    assert_eq!(parse(b"   "), None);
    assert_eq!(parse(b":prefix-only"), None);
}

#[test]
fn to_line_round_trips_shape() {
    for line in
        ["PRIVMSG #c :hello world", "PING :x", "MODE #c +o bob", ":a!b@c PRIVMSG #c ::-)", "TOPIC #c :"]
    {
        assert_eq!(parse(line.as_bytes()).unwrap().to_line(), format!("{line}\r\n").into_bytes());
    }
}

// --- client → server --------------------------------------------------------------------------

#[test]
fn refused_commands_get_421_and_are_not_forwarded() {
    for cmd in [
        "VERSION",
        "version",
        "INFO",
        "ADMIN",
        "STATS u",
        "LUSERS",
        "TIME",
        "LINKS",
        "TRACE",
        "SERVLIST",
        "SQUERY x :y",
        "CONNECT a 1",
        "OPER a b",
        "KILL x :y",
        "DIE",
        "REHASH",
        "RESTART",
        "WALLOPS :x",
        "SERVER x",
        "SERVICE a b c d e f",
        "WHOWAS bob",
        "USERS",
        "SUMMON x",
        "HELP",
        "WEBIRC p g h i",
        "CHARCONV latin1",
        "SQUIT x :y",
        "GLINE",
        "KLINE",
        "001 x",
    ] {
        let word = cmd.split(' ').next().unwrap();
        assert_eq!(
            replied(cmd),
            vec![format!(":irc.cloister 421 alice {word} :Unknown command\r\n")],
            "{cmd}"
        );
    }
}

#[test]
fn refusal_before_registration_uses_star() {
    let out = filter_client(b"VERSION", &cfg(), &Session::default());
    assert_eq!(out, ClientAction::Reply(vec![b":irc.cloister 421 * VERSION :Unknown command\r\n".to_vec()]));
}

#[test]
fn irssi_registration_and_chat_commands_pass_unchanged() {
    for line in [
        "CAP LS 302",
        "CAP END",
        "PASS secret",
        "NICK alice",
        "USER alice host 127.0.0.1 :Alice",
        "PONG :irc.cloister",
        "QUIT :bye",
        "JOIN #chat",
        "PART #chat :bye",
        "PRIVMSG #chat :hi all",
        "NOTICE bob :hi",
        "TOPIC #chat :new",
        "NAMES #chat",
        "LIST",
        "MODE alice +i",
        "MODE #chat b",
        "KICK #chat bob :out",
        "INVITE bob #chat",
        "WHO #chat",
        "WHOIS bob",
        "AWAY :lunch",
        "ISON bob",
        "USERHOST bob",
    ] {
        assert_eq!(forwarded(line), format!("{line}\r\n"), "{line}");
    }
}

#[test]
fn client_prefix_is_removed() {
    assert_eq!(forwarded(":mallory PRIVMSG #chat :hi"), "PRIVMSG #chat :hi\r\n");
}

#[test]
fn ping_keeps_only_its_token() {
    assert_eq!(forwarded("PING irc.cloister"), "PING irc.cloister\r\n");
    assert_eq!(forwarded("PING tok irc.cloister"), "PING tok\r\n");
}

#[test]
fn ctcp_queries_are_dropped_action_passes() {
    assert_eq!(client("PRIVMSG bob :\x01VERSION\x01"), ClientAction::Drop);
    assert_eq!(client("NOTICE bob :\x01VERSION irssi v1.4.3\x01"), ClientAction::Drop);
    assert_eq!(client("PRIVMSG bob :\x01DCC SEND f 2130706433 5000 10\x01"), ClientAction::Drop);
    assert_eq!(client("PRIVMSG bob :hi \x01TIME\x01"), ClientAction::Drop);
    assert_eq!(client("PRIVMSG bob :\x01ACTION waves\x01 \x01VERSION\x01"), ClientAction::Drop);
    assert_eq!(forwarded("PRIVMSG #chat :\x01ACTION waves\x01"), "PRIVMSG #chat :\x01ACTION waves\x01\r\n");
}

#[test]
fn join_to_server_log_channel_is_refused() {
    assert_eq!(replied("JOIN #a,&server"), vec![":irc.cloister 403 alice &SERVER :No such channel\r\n"]);
    assert_eq!(forwarded("JOIN &local"), "JOIN &local\r\n");
}

#[test]
fn motd_is_answered_locally() {
    let out = replied("MOTD");
    assert_eq!(out[0], ":irc.cloister 375 alice :- irc.cloister message of the day\r\n");
    assert_eq!(out.last().unwrap(), ":irc.cloister 376 alice :End of MOTD command\r\n");
}

#[test]
fn lines_with_nul_or_nothing_are_dropped() {
    assert_eq!(client("PRIVMSG #c :a\0VERSION"), ClientAction::Drop);
    assert_eq!(client(""), ClientAction::Drop);
}

// --- server → client: welcome ------------------------------------------------------------------

#[test]
fn welcome_001_teaches_nick_and_name_and_is_renamed() {
    let mut session = Session::default();
    let out = server(
        ":real.example 001 alice :Welcome to the Internet Relay Network alice!~alice@localhost",
        &mut session,
    );
    assert_eq!(
        out,
        vec![":irc.cloister 001 alice :Welcome to the Internet Relay Network alice!~alice@localhost"]
    );
    assert_eq!(session.nick.as_deref(), Some(&b"alice"[..]));
    assert_eq!(session.upstream_name.as_deref(), Some(REAL.as_bytes()));
}

#[test]
fn yourhost_002_loses_version_and_platform() {
    // RPL_YOURHOST_MSG "002 %s :Your host is %s, running version ngircd-%s (%s/%s/%s)"
    let out = one(":real.example 002 alice :Your host is real.example, running version ngircd-26.1 (x86_64/pc/linux-gnu)");
    assert_eq!(out, ":irc.cloister 002 alice :Your host is irc.cloister");
}

#[test]
fn created_003_loses_start_date() {
    // RPL_CREATED_MSG "003 %s :This server has been started %s", "%a %b %d %Y at %H:%M:%S (%Z)"
    let out = one(":real.example 003 alice :This server has been started Sun Nov 23 2025 at 17:34:02 (CET)");
    assert_eq!(out, ":irc.cloister 003 alice :This server was created sometime");
}

#[test]
fn myinfo_004_loses_version() {
    // RPL_MYINFO_MSG "004 %s %s ngircd-%s %s %s"
    let out = one(":real.example 004 alice real.example ngircd-26.1 abBcCFiIoqrRswx abehiIklmMnoOPqQrRstvVz");
    assert_eq!(out, ":irc.cloister 004 alice irc.cloister - abBcCFiIoqrRswx abehiIklmMnoOPqQrRstvVz");
}

#[test]
fn isupport_005_loses_ircd_token_keeps_the_rest() {
    // RPL_ISUPPORT1_MSG
    let out = one(":real.example 005 alice RFC2812 IRCD=ngIRCd CHARSET=UTF-8 CASEMAPPING=ascii \
        PREFIX=(qaohv)~&@%+ CHANTYPES=#&+ CHANMODES=beI,k,l,imMnOPQRstVz CHANLIMIT=#&+:10 :are supported on this server");
    assert_eq!(
        out,
        ":irc.cloister 005 alice RFC2812 CHARSET=UTF-8 CASEMAPPING=ascii PREFIX=(qaohv)~&@%+ \
        CHANTYPES=#&+ CHANMODES=beI,k,l,imMnOPQRstVz CHANLIMIT=#&+:10 :are supported on this server"
    );
    // RPL_ISUPPORT2_MSG passes as it is.
    let second = ":real.example 005 alice CHANNELLEN=50 NICKLEN=9 TOPICLEN=490 AWAYLEN=127 KICKLEN=400 \
        MODES=5 MAXLIST=beI:50 EXCEPTS=e INVEX=I PENALTY FNC :are supported on this server";
    assert_eq!(one(second), second.replace("real.example", "irc.cloister"));
    // RPL_ISUPPORTNET_MSG
    assert_eq!(
        one(":real.example 005 alice NETWORK=cloister :is my network name"),
        ":irc.cloister 005 alice NETWORK=cloister :is my network name"
    );
}

// --- server → client: counts, MOTD, info replies ------------------------------------------------

#[test]
fn lusers_replies_are_dropped() {
    dropped(":real.example 251 alice :There are 3 users and 0 services on 1 servers");
    dropped(":real.example 252 alice 1 :operator(s) online");
    dropped(":real.example 253 alice 2 :unknown connection(s)");
    dropped(":real.example 254 alice 4 :channels formed");
    dropped(":real.example 255 alice :I have 3 users, 0 services and 0 servers");
    dropped(":real.example 265 alice 3 5 :Current local users: 3, Max: 5");
    dropped(":real.example 266 alice 3 5 :Current global users: 3, Max: 5");
    dropped(":real.example 250 alice :Highest connection count: 6 (42 connections received)");
}

#[test]
fn server_motd_is_replaced_by_the_fixed_one() {
    dropped(":real.example 375 alice :- real.example message of the day");
    dropped(":real.example 372 alice :- Debian GNU/Linux on real.example");
    let end = server(":real.example 376 alice :End of MOTD command", &mut registered());
    assert_eq!(
        end,
        vec![
            ":irc.cloister 375 alice :- irc.cloister message of the day",
            ":irc.cloister 372 alice :- Welcome to irc.cloister.",
            ":irc.cloister 376 alice :End of MOTD command",
        ]
    );
    assert_eq!(server(":real.example 422 alice :MOTD file is missing", &mut registered()), end);
}

#[test]
fn info_version_time_admin_stats_links_trace_whowas_replies_are_dropped() {
    dropped(":real.example 351 alice ngircd-26.1. real.example :CHARCONV+IDENT+IPv6+IRCPLUS+PAM+SSL+SYSLOG+TCPWRAP+ZLIB");
    dropped(":real.example 371 alice :ngIRCd 26.1-CHARCONV+IDENT+IPv6+IRCPLUS+PAM+SSL+SYSLOG+TCPWRAP+ZLIB");
    dropped(":real.example 371 alice :Birth Date: Jan  1 2024 at 00:00:00");
    dropped(":real.example 371 alice :On-line since Sun Nov 23 2025 at 17:34:02 (CET)");
    dropped(":real.example 374 alice :End of INFO list");
    dropped(":real.example 391 alice real.example :Sunday November 23 2025 -- 17:40 CET");
    dropped(":real.example 256 alice real.example :Administrative info");
    dropped(":real.example 257 alice :Somewhere");
    dropped(":real.example 258 alice :Else");
    dropped(":real.example 259 alice :root@real.example");
    dropped(":real.example 242 alice :Server Up 0 days 0:06:12");
    dropped(":real.example 219 alice u :End of STATS report");
    dropped(":real.example 364 alice real.example real.example :0 Server Info Text");
    dropped(":real.example 365 alice * :End of LINKS list");
    dropped(":real.example 262 alice real.example ngircd-26.1. :End of TRACE");
    dropped(":real.example 314 alice bob ~bob localhost * :Bob");
    dropped(":real.example 369 alice bob :End of WHOWAS list");
}

#[test]
fn whois_server_312_shows_fixed_name_and_info() {
    // RPL_WHOISSERVER_MSG "312 %s %s %s :%s"
    assert_eq!(
        one(":real.example 312 alice bob real.example :Server Info Text"),
        ":irc.cloister 312 alice bob irc.cloister :cloister"
    );
}

#[test]
fn who_352_and_pong_and_ping_carry_the_fixed_name() {
    // RPL_WHOREPLY_MSG "352 %s %s %s %s %s %s %s :%d %s"
    assert_eq!(
        one(":real.example 352 alice #chat ~bob localhost real.example bob H :0 Bob"),
        ":irc.cloister 352 alice #chat ~bob localhost irc.cloister bob H :0 Bob"
    );
    assert_eq!(
        one(":real.example PONG real.example :irc.cloister"),
        ":irc.cloister PONG irc.cloister :irc.cloister"
    );
    assert_eq!(one("PING :real.example"), "PING :irc.cloister");
}

#[test]
fn server_name_inside_numeric_text_and_error_is_replaced() {
    assert_eq!(
        one(":real.example 402 alice real.example.org :No such server"),
        ":irc.cloister 402 alice irc.cloister.org :No such server"
    );
    assert_eq!(one("ERROR :Closing Link: real.example (bye)"), "ERROR :Closing Link: irc.cloister (bye)");
}

// --- server → client: notices and messages -------------------------------------------------------

#[test]
fn connect_notices_are_dropped() {
    let mut fresh = Session::default();
    for line in [
        "NOTICE * :*** Looking up your hostname and checking ident",
        "NOTICE * :*** Looking up your hostname",
        "NOTICE * :*** Found your hostname: localhost",
        "NOTICE * :*** Got ident response: alice",
        "NOTICE * :*** No ident response",
    ] {
        assert_eq!(server(line, &mut fresh), Vec::<String>::new(), "{line}");
    }
}

#[test]
fn notices_and_messages_from_the_server_itself_are_dropped() {
    dropped(":real.example NOTICE alice :Connection statistics: client 0.1 kb, server 1.2 kb.");
    dropped(":real.example NOTICE alice :Got invalid OPER from \"alice\"");
    dropped(":real.example PRIVMSG &SERVER :Server going down NOW!");
}

#[test]
fn user_messages_pass_but_not_their_ctcp() {
    let hi = ":bob!~bob@localhost PRIVMSG #chat :hi alice";
    assert_eq!(one(hi), hi);
    let action = ":bob!~bob@localhost PRIVMSG #chat :\x01ACTION waves\x01";
    assert_eq!(one(action), action);
    dropped(":bob!~bob@localhost PRIVMSG alice :\x01VERSION\x01");
    dropped(":bob!~bob@localhost NOTICE alice :\x01PING 1234\x01");
}

#[test]
fn user_text_mentioning_the_real_name_is_left_alone() {
    let line = ":bob!~bob@localhost PRIVMSG #chat :real.example";
    assert_eq!(one(line), line);
}

#[test]
fn cap_reply_before_001_is_renamed() {
    let mut fresh = Session::default();
    assert_eq!(
        server(":real.example CAP * LS :multi-prefix", &mut fresh),
        vec![":irc.cloister CAP * LS :multi-prefix"]
    );
    assert_eq!(fresh.upstream_name.as_deref(), Some(REAL.as_bytes()));
}

#[test]
fn own_nick_change_is_followed() {
    let mut session = registered();
    server(":alice!~alice@localhost NICK :alice2", &mut session);
    assert_eq!(session.nick.as_deref(), Some(&b"alice2"[..]));
    server(":bob!~bob@localhost NICK :bob2", &mut session);
    assert_eq!(session.nick.as_deref(), Some(&b"alice2"[..]));
}

#[test]
fn other_replies_pass_unchanged_but_renamed() {
    let line = ":bob!~bob@localhost JOIN :#chat";
    assert_eq!(one(line), line);
    assert_eq!(
        one(":real.example 353 alice = #chat :@alice bob"),
        ":irc.cloister 353 alice = #chat :@alice bob"
    );
    assert_eq!(one(":real.example MODE alice :+i"), ":irc.cloister MODE alice :+i");
}

#[test]
fn every_server_rule_is_listed_once() {
    for (i, (cmd, _, _)) in SERVER_RULES.iter().enumerate() {
        assert!(SERVER_RULES[i + 1..].iter().all(|(other, _, _)| other != cmd), "{cmd} twice");
    }
    for (i, (cmd, _, _)) in CLIENT_RULES.iter().enumerate() {
        assert!(CLIENT_RULES[i + 1..].iter().all(|(other, _, _)| other != cmd), "{cmd} twice");
    }
}
