//! Runs the built `cloister-ircgate` between a test client and a fake ngircd 26.1 that replays
//! the real server's welcome, LUSERS, MOTD and VERSION lines (formats from ngircd 26.1's
//! messages.h, login.c, irc-info.c, conn.c), and checks what crosses the gate in each direction.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

const FAKE_NAME: &str = "fakehost.internal";

/// What ngircd 26.1 sends from connect to the end of registration (Debian build, 3 users).
fn welcome(nick: &str) -> Vec<String> {
    let n = FAKE_NAME;
    vec![
        "NOTICE * :*** Looking up your hostname and checking ident".into(),
        format!("NOTICE * :*** Found your hostname: {n}"),
        "NOTICE * :*** No ident response".into(),
        format!(":{n} 001 {nick} :Welcome to the Internet Relay Network {nick}!~{nick}@localhost"),
        format!(":{n} 002 {nick} :Your host is {n}, running version ngircd-26.1 (x86_64/pc/linux-gnu)"),
        format!(":{n} 003 {nick} :This server has been started Sun Nov 23 2025 at 17:34:02 (CET)"),
        format!(":{n} 004 {nick} {n} ngircd-26.1 abBcCFiIoqrRswx abehiIklmMnoOPqQrRstvVz"),
        format!(":{n} 005 {nick} RFC2812 IRCD=ngIRCd CHARSET=UTF-8 CASEMAPPING=ascii PREFIX=(qaohv)~&@%+ CHANTYPES=#&+ CHANMODES=beI,k,l,imMnOPQRstVz CHANLIMIT=#&+:10 :are supported on this server"),
        format!(":{n} 005 {nick} CHANNELLEN=50 NICKLEN=9 TOPICLEN=490 AWAYLEN=127 KICKLEN=400 MODES=5 MAXLIST=beI:50 EXCEPTS=e INVEX=I PENALTY FNC :are supported on this server"),
        format!(":{n} 251 {nick} :There are 3 users and 0 services on 1 servers"),
        format!(":{n} 252 {nick} 1 :operator(s) online"),
        format!(":{n} 254 {nick} 4 :channels formed"),
        format!(":{n} 255 {nick} :I have 3 users, 0 services and 0 servers"),
        format!(":{n} 265 {nick} 3 7 :Current local users: 3, Max: 7"),
        format!(":{n} 266 {nick} 3 7 :Current global users: 3, Max: 7"),
        format!(":{n} 250 {nick} :Highest connection count: 8 (42 connections received)"),
        format!(":{n} 375 {nick} :- {n} message of the day"),
        format!(":{n} 372 {nick} :- Debian GNU/Linux 12 on {n}"),
        format!(":{n} 376 {nick} :End of MOTD command"),
        format!(":{n} MODE {nick} :+i"),
    ]
}

/// A fake ngircd: records every line it receives, welcomes after NICK+USER, answers PING, and
/// answers the info commands the way ngircd does (so a leak through the gate would show).
struct Fake {
    addr: SocketAddr,
    received: Arc<Mutex<Vec<String>>>,
}

impl Fake {
    fn start() -> Fake {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let received = Arc::new(Mutex::new(Vec::new()));
        let log = Arc::clone(&received);
        thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(stream) = stream else { return };
                let log = Arc::clone(&log);
                thread::spawn(move || fake_conversation(stream, &log));
            }
        });
        Fake { addr, received }
    }

    fn received(&self) -> Vec<String> {
        self.received.lock().unwrap().clone()
    }
}

fn fake_conversation(stream: TcpStream, log: &Mutex<Vec<String>>) {
    let mut out = stream.try_clone().unwrap();
    let mut nick = String::new();
    let mut got_user = false;
    for line in BufReader::new(stream).lines() {
        let Ok(line) = line else { return };
        log.lock().unwrap().push(line.clone());
        let words: Vec<&str> = line.split(' ').collect();
        let reply: Vec<String> = match words[0].to_ascii_uppercase().as_str() {
            "CAP" => vec![format!(":{FAKE_NAME} CAP * LS :multi-prefix")],
            "NICK" => {
                nick = words[1].to_string();
                if got_user {
                    welcome(&nick)
                } else {
                    vec![]
                }
            }
            "USER" => {
                got_user = true;
                if nick.is_empty() {
                    vec![]
                } else {
                    welcome(&nick)
                }
            }
            "PING" => vec![format!(":{FAKE_NAME} PONG {FAKE_NAME} :{}", words[1].trim_start_matches(':'))],
            "VERSION" => vec![format!(":{FAKE_NAME} 351 {nick} ngircd-26.1. {FAKE_NAME} :IDENT+IPv6+PAM")],
            "TIME" => {
                vec![format!(":{FAKE_NAME} 391 {nick} {FAKE_NAME} :Sunday November 23 2025 -- 17:40 CET")]
            }
            "LUSERS" => {
                vec![format!(":{FAKE_NAME} 251 {nick} :There are 3 users and 0 services on 1 servers")]
            }
            _ => vec![],
        };
        for line in reply {
            if out.write_all(format!("{line}\r\n").as_bytes()).is_err() {
                return;
            }
        }
    }
}

/// The gate binary on an ephemeral port; killed when dropped.
struct Gate {
    child: Child,
    addr: SocketAddr,
}

impl Gate {
    fn start(upstream: SocketAddr, max_clients: usize) -> Gate {
        let mut child = Command::new(env!("CARGO_BIN_EXE_cloister-ircgate"))
            .args(["--listen", "127.0.0.1:0", "--upstream", &upstream.to_string()])
            .args(["--server-name", "irc.cloister", "--max-clients", &max_clients.to_string()])
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut stderr = BufReader::new(child.stderr.take().unwrap());
        let mut first = String::new();
        stderr.read_line(&mut first).unwrap();
        let addr = first
            .split("listening on ")
            .nth(1)
            .and_then(|rest| rest.split(',').next())
            .unwrap_or_else(|| panic!("no address in {first:?}"))
            .parse()
            .unwrap();
        // Keep draining stderr so the gate never blocks on it.
        thread::spawn(move || std::io::copy(&mut stderr, &mut std::io::sink()));
        Gate { child, addr }
    }

    fn connect(&self) -> Client {
        let stream = TcpStream::connect(self.addr).unwrap();
        stream.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        Client { reader: BufReader::new(stream.try_clone().unwrap()), stream, seen: Vec::new() }
    }
}

impl Drop for Gate {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

struct Client {
    stream: TcpStream,
    reader: BufReader<TcpStream>,
    seen: Vec<String>,
}

impl Client {
    fn send(&mut self, line: &str) {
        self.stream.write_all(format!("{line}\r\n").as_bytes()).unwrap();
    }

    /// Reads lines until one contains `needle`; returns that line. Panics on timeout or EOF.
    fn until(&mut self, needle: &str) -> String {
        loop {
            let mut line = String::new();
            let n =
                self.reader.read_line(&mut line).unwrap_or_else(|e| panic!("waiting for {needle:?}: {e}"));
            assert!(n > 0, "connection closed while waiting for {needle:?}; saw {:?}", self.seen);
            let line = line.trim_end().to_string();
            self.seen.push(line.clone());
            if line.contains(needle) {
                return line;
            }
        }
    }

    /// Everything until the server closes the connection.
    fn rest(&mut self) -> String {
        let mut rest = String::new();
        let _ = self.reader.read_to_string(&mut rest);
        rest
    }

    fn register(&mut self, nick: &str) {
        self.send("CAP LS 302");
        self.send(&format!("NICK {nick}"));
        self.send(&format!("USER {nick} {nick} 127.0.0.1 :Test User"));
        self.send("CAP END");
        self.until(" 376 ");
    }

    /// Round trip through the gate and the fake: everything sent before is at the fake now.
    fn sync(&mut self, token: &str) {
        self.send(&format!("PING {token}"));
        self.until(&format!("PONG irc.cloister :{token}"));
    }
}

#[test]
fn welcome_shows_no_version_platform_host_start_or_counts() {
    let fake = Fake::start();
    let gate = Gate::start(fake.addr, 4);
    let mut client = gate.connect();
    client.register("alice");
    client.sync("done");
    let seen = client.seen.join("\n");
    let lower = seen.to_ascii_lowercase();
    for secret in
        ["ngircd", "26.1", "linux", "x86_64", FAKE_NAME, "cet", "2025", "debian", "users", "connections"]
    {
        assert!(!lower.contains(secret), "client saw {secret:?} in:\n{seen}");
    }
    assert!(seen
        .contains(":irc.cloister 001 alice :Welcome to the Internet Relay Network alice!~alice@localhost"));
    assert!(seen.contains(":irc.cloister 002 alice :Your host is irc.cloister"));
    assert!(seen.contains(":irc.cloister 004 alice irc.cloister - abBcCFiIoqrRswx abehiIklmMnoOPqQrRstvVz"));
    assert!(seen.contains(":irc.cloister 372 alice :- Welcome to irc.cloister."));
    assert!(seen.contains(":irc.cloister CAP * LS :multi-prefix"));
    assert!(fake.received().contains(&"CAP LS 302".to_string()));
}

#[test]
fn info_commands_get_421_and_never_reach_the_server() {
    let fake = Fake::start();
    let gate = Gate::start(fake.addr, 4);
    let mut client = gate.connect();
    client.register("bob");
    for cmd in ["VERSION", "INFO", "ADMIN", "STATS u", "LUSERS", "TIME", "version"] {
        client.send(cmd);
        let word = cmd.split(' ').next().unwrap();
        assert_eq!(client.until(" 421 "), format!(":irc.cloister 421 bob {word} :Unknown command"));
    }
    client.sync("after-refused");
    let received = fake.received();
    for cmd in ["VERSION", "INFO", "ADMIN", "STATS", "LUSERS", "TIME"] {
        assert!(
            !received.iter().any(|l| l.to_ascii_uppercase().starts_with(cmd)),
            "{cmd} reached the server: {received:?}"
        );
    }
    assert!(received.contains(&"PING after-refused".to_string()));
}

#[test]
fn ctcp_version_is_not_forwarded_action_is() {
    let fake = Fake::start();
    let gate = Gate::start(fake.addr, 4);
    let mut client = gate.connect();
    client.register("carol");
    client.send("PRIVMSG dave :\x01VERSION\x01");
    client.send("PRIVMSG #chat :\x01ACTION waves\x01");
    client.sync("after-ctcp");
    let received = fake.received();
    assert!(!received.iter().any(|l| l.contains("VERSION")), "CTCP VERSION forwarded: {received:?}");
    assert!(received.contains(&"PRIVMSG #chat :\x01ACTION waves\x01".to_string()), "{received:?}");
}

#[test]
fn a_600_byte_line_closes_the_connection_with_error() {
    let fake = Fake::start();
    let gate = Gate::start(fake.addr, 4);
    let mut client = gate.connect();
    let long = format!("PRIVMSG #chat :{}", "a".repeat(600 - 15 - 2));
    assert_eq!(long.len() + 2, 600);
    client.send(&long);
    let rest = client.rest();
    assert_eq!(rest, "ERROR :line too long\r\n");
    assert!(!fake.received().iter().any(|l| l.starts_with("PRIVMSG")));
}

#[test]
fn upstream_down_gives_error_and_close() {
    let unused = TcpListener::bind("127.0.0.1:0").unwrap();
    let dead = unused.local_addr().unwrap();
    drop(unused);
    let gate = Gate::start(dead, 4);
    let mut client = gate.connect();
    client.send("NICK erin");
    assert_eq!(client.rest(), "ERROR :chat server unavailable\r\n");
}

#[test]
fn max_clients_is_enforced_and_places_come_back() {
    let fake = Fake::start();
    let gate = Gate::start(fake.addr, 2);
    let mut first = gate.connect();
    first.register("one");
    let mut second = gate.connect();
    second.register("two");
    let mut third = gate.connect();
    assert_eq!(third.rest(), "ERROR :too many connections\r\n");
    drop(first);
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let mut again = gate.connect();
        again.send("NICK three");
        again.send("USER three three 127.0.0.1 :Three");
        let mut line = String::new();
        let _ = again.reader.read_line(&mut line);
        if !line.starts_with("ERROR") {
            again.seen.push(line.trim_end().to_string());
            again.until(" 376 ");
            break;
        }
        assert!(Instant::now() < deadline, "the place of a closed client never came back");
        thread::sleep(Duration::from_millis(50));
    }
}
