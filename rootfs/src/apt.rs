//! Package resolution and download with the host's own apt, unprivileged, in a private state
//! directory (the way mmdebstrap reuses apt): apt resolves dependencies and checks repository
//! signatures; this module only verifies each .deb against the index's SHA256 and keeps a
//! content-addressed cache so a warm build never touches the network.
//!
//! Isolation: apt reads its configuration from `APT_CONFIG` (our file) before any parts
//! directory, so pointing `Dir::Etc` at the private root keeps the host's `apt.conf.d` out.
//! That matters: host files may carry hooks (`APT::Update::Post-Invoke`) that would run with our
//! privileges, pinning, or extra index targets. Only the host's `Acquire::*` scalars (proxies,
//! date checks of a snapshot mirror) are carried over, because fetching depends on them.

use std::ffi::OsString;
use std::fs;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, SystemTime};

use serde::Serialize;
use sha2::{Digest, Sha256};

/// Where the host keeps its apt sources.
const HOST_SOURCES: &str = "/etc/apt/sources.list";
const HOST_SOURCES_DIR: &str = "/etc/apt/sources.list.d";
/// Keyring used for a `--mirror` override (Debian's own archive keys).
const DEBIAN_KEYRING: &str = "/usr/share/keyrings/debian-archive-keyring.gpg";
const SUITE: &str = "bookworm";
const ARCH: &str = "amd64";
/// Host `Acquire::` subtrees we do not copy: they select what to download, not how.
const ACQUIRE_SKIP: &[&str] = &[
    "Acquire::IndexTargets",
    "Acquire::Languages",
    "Acquire::Changelogs",
    "Acquire::cdrom",
    "Acquire::CompressionTypes",
];

#[derive(Debug, thiserror::Error)]
pub enum AptError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("apt cache directory {0:?} must be valid UTF-8 without quotes")]
    BadCacheDir(PathBuf),
    #[error("no apt sources found in {HOST_SOURCES} or {HOST_SOURCES_DIR}; pass a mirror URL")]
    NoSources,
    #[error("cannot run {command}: {source}")]
    Spawn { command: String, source: std::io::Error },
    #[error("{command} failed ({status}): {stderr}")]
    Failed { command: String, status: std::process::ExitStatus, stderr: String },
    #[error("unknown package {name}: {message}")]
    UnknownPackage { name: String, message: String },
    #[error("cannot parse apt output line {line:?}")]
    BadUriLine { line: String },
    #[error("apt did not download {filename} for {package}")]
    Missing { package: String, filename: String },
    #[error("{package}: sha256 mismatch: expected {expected}, got {actual} ({path})")]
    HashMismatch { package: String, expected: String, actual: String, path: PathBuf },
}

/// One binary package as apt resolved it; goes into the image manifest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DebSpec {
    pub name: String,
    pub version: String,
    pub arch: String,
    pub uri: String,
    /// The pool file name as apt prints it (URL-encoded, e.g. `%3a` for an epoch's colon).
    pub filename: String,
    pub size: u64,
    /// Lowercase hex, from the signed index.
    pub sha256: String,
}

/// A verified .deb in the content-addressed cache.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FetchedDeb {
    pub spec: DebSpec,
    pub path: PathBuf,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    /// Files already in the cache, re-hashed.
    Cached,
    /// apt is downloading; `done_bytes` is apt's own estimate.
    Downloading,
    /// A downloaded file was hashed and moved into the cache.
    Verified,
}

/// Progress of [`AptRoot::fetch`], for a progress bar.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Progress {
    pub stage: Stage,
    pub done_debs: usize,
    pub total_debs: usize,
    pub done_bytes: u64,
    pub total_bytes: u64,
}

/// A private apt root below a cache directory.
#[derive(Debug, Clone)]
pub struct AptRoot {
    root: PathBuf,
    debs: PathBuf,
    /// `(key, value)` pairs written to `apt.conf` and repeated as `-o` options.
    options: Vec<(String, String)>,
    sources: String,
    wrapper: Vec<OsString>,
}

/// One `deb` source, in deb822 field names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SourceEntry {
    pub uris: Vec<String>,
    pub suites: Vec<String>,
    pub components: Vec<String>,
    /// Other fields (`Signed-By`, `Architectures`, …) as written; multi-line values keep their
    /// continuation lines.
    pub options: Vec<(String, String)>,
}

impl AptRoot {
    /// Creates (or reuses) `<cache_dir>/apt` with sources copied from the host, or with one
    /// bookworm main source at `mirror` checked against Debian's archive keyring.
    pub fn prepare(cache_dir: &Path, mirror: Option<&str>) -> Result<AptRoot, AptError> {
        let entries = match mirror {
            Some(url) => vec![mirror_entry(url)],
            None => host_sources()?,
        };
        if entries.is_empty() {
            return Err(AptError::NoSources);
        }
        let root = cache_dir.join("apt");
        let debs = cache_dir.join("debs");
        for dir in ["etc/apt/sources.list.d", "etc/apt/apt.conf.d", "etc/apt/preferences.d"] {
            mkdir(&root.join(dir))?;
        }
        for dir in
            ["var/lib/apt/lists/partial", "var/lib/dpkg", "var/cache/apt/archives/partial", "var/log/apt"]
        {
            mkdir(&root.join(dir))?;
        }
        mkdir(&debs)?;
        let root_str =
            root.to_str().filter(|s| !s.contains('"')).ok_or_else(|| AptError::BadCacheDir(root.clone()))?;
        let mut options = base_options(root_str);
        options.extend(host_acquire_options());
        let sources = render_sources(&entries);
        write_if_changed(&root.join("etc/apt/sources.list.d/cloister.sources"), sources.as_bytes())?;
        write_if_changed(&root.join("etc/apt/apt.conf"), render_conf(&options).as_bytes())?;
        let status = root.join("var/lib/dpkg/status");
        if !status.exists() {
            write(&status, b"")?;
        }
        Ok(AptRoot { root, debs, options, sources, wrapper: Vec::new() })
    }

    /// Runs apt-get through a command prefix, e.g. `setpriv --reuid=nobody --regid=nogroup
    /// --clear-groups` so a build started as root fetches without privileges. The cache
    /// directory must then be writable by that user.
    pub fn with_wrapper<S: Into<OsString>>(mut self, wrapper: impl IntoIterator<Item = S>) -> Self {
        self.wrapper = wrapper.into_iter().map(Into::into).collect();
        self
    }

    /// The private root (holds `etc/apt`, `var/lib/apt/lists`, …).
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Runs `apt-get update` when forced, when the lists were never fetched for the current
    /// sources, or when they are older than `max_age`.
    pub fn update(&self, max_age: Duration, force: bool) -> Result<bool, AptError> {
        let stamp = self.root.join("update-stamp");
        let fresh = fs::read_to_string(&stamp).ok().filter(|s| *s == self.sources).and_then(|_| {
            let age = fs::metadata(&stamp).and_then(|m| m.modified()).ok()?;
            SystemTime::now().duration_since(age).ok().map(|a| a <= max_age)
        });
        if !force && fresh == Some(true) {
            return Ok(false);
        }
        self.apt_get(&["update", "-q"], None, None)?;
        write(&stamp, self.sources.as_bytes())?;
        Ok(true)
    }

    /// Resolves `packages` and their dependencies (no recommends) with apt's own resolver.
    pub fn resolve(&self, packages: &[String]) -> Result<Vec<DebSpec>, AptError> {
        let empty = self.root.join("var/cache/apt/archives");
        let mut args: Vec<OsString> = ["install", "--print-uris", "-qq", "--no-install-recommends"]
            .iter()
            .map(OsString::from)
            .collect();
        args.push(archives_option(&empty));
        args.extend(packages.iter().map(OsString::from));
        let out = self.apt_get(&args, None, None).map_err(unknown_package)?;
        let mut specs = Vec::new();
        for line in String::from_utf8_lossy(&out).lines().filter(|l| l.starts_with('\'')) {
            specs.push(parse_uri_line(line)?);
        }
        specs.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(specs)
    }

    /// Makes every spec available as a verified file in `<cache>/debs/<sha256>.deb`, letting
    /// apt download the missing ones.
    pub fn fetch(
        &self,
        specs: &[DebSpec],
        progress: &mut dyn FnMut(Progress),
    ) -> Result<Vec<FetchedDeb>, AptError> {
        let mut p = Progress {
            stage: Stage::Cached,
            done_debs: 0,
            total_debs: specs.len(),
            done_bytes: 0,
            total_bytes: specs.iter().map(|s| s.size).sum(),
        };
        let mut missing = Vec::new();
        for spec in specs {
            if self.cached(spec)? {
                p.done_debs += 1;
                p.done_bytes += spec.size;
                progress(p);
            } else {
                missing.push(spec);
            }
        }
        if !missing.is_empty() {
            self.download(&missing, &mut p, progress)?;
        }
        Ok(specs.iter().map(|s| FetchedDeb { spec: s.clone(), path: self.cache_path(s) }).collect())
    }

    fn cache_path(&self, spec: &DebSpec) -> PathBuf {
        self.debs.join(format!("{}.deb", spec.sha256))
    }

    /// True when the cached file exists and still has the right hash; a corrupt one is removed.
    fn cached(&self, spec: &DebSpec) -> Result<bool, AptError> {
        let path = self.cache_path(spec);
        if !path.exists() {
            return Ok(false);
        }
        let actual = sha256_file(&path)?;
        if actual == spec.sha256 {
            return Ok(true);
        }
        eprintln!(
            "cloister: cached {} for {} has sha256 {actual}; fetching again",
            path.display(),
            spec.name
        );
        fs::remove_file(&path).map_err(|source| AptError::Io { path, source })?;
        Ok(false)
    }

    fn download(
        &self,
        missing: &[&DebSpec],
        p: &mut Progress,
        progress: &mut dyn FnMut(Progress),
    ) -> Result<(), AptError> {
        let tmp = self.debs.join(format!(".tmp-{}", std::process::id()));
        let _ = fs::remove_dir_all(&tmp);
        mkdir(&tmp)?;
        let result = self.download_into(&tmp, missing, p, progress);
        let _ = fs::remove_dir_all(&tmp);
        result
    }

    fn download_into(
        &self,
        tmp: &Path,
        missing: &[&DebSpec],
        p: &mut Progress,
        progress: &mut dyn FnMut(Progress),
    ) -> Result<(), AptError> {
        // `download` takes exactly these versions (no dependencies: those are specs of their
        // own) and still checks them against the signed index.
        let mut args: Vec<String> = ["download", "-qq", "-o", "APT::Status-Fd=1"].map(String::from).to_vec();
        args.extend(missing.iter().map(|s| format!("{}={}", s.name, s.version)));
        let base = *p;
        let missing_bytes: u64 = missing.iter().map(|s| s.size).sum();
        let mut on_line = |line: &str| {
            if let Some(pct) = parse_dlstatus(line) {
                let mut q = base;
                q.stage = Stage::Downloading;
                q.done_bytes += (missing_bytes as f64 * pct / 100.0) as u64;
                progress(q);
            }
        };
        self.apt_get(&args, Some(tmp), Some(&mut on_line))?;
        for spec in missing {
            let src = tmp.join(&spec.filename);
            if !src.exists() {
                return Err(AptError::Missing {
                    package: spec.name.clone(),
                    filename: spec.filename.clone(),
                });
            }
            let actual = sha256_file(&src)?;
            if actual != spec.sha256 {
                return Err(AptError::HashMismatch {
                    package: spec.name.clone(),
                    expected: spec.sha256.clone(),
                    actual,
                    path: src,
                });
            }
            let dst = self.cache_path(spec);
            fs::rename(&src, &dst).map_err(|source| AptError::Io { path: dst, source })?;
            p.stage = Stage::Verified;
            p.done_debs += 1;
            p.done_bytes += spec.size;
            progress(*p);
        }
        Ok(())
    }

    /// Runs apt-get in the private root; returns stdout, or streams it line by line to `lines`.
    fn apt_get<S: AsRef<std::ffi::OsStr>>(
        &self,
        args: &[S],
        cwd: Option<&Path>,
        lines: Option<&mut dyn FnMut(&str)>,
    ) -> Result<Vec<u8>, AptError> {
        let mut cmd = match self.wrapper.split_first() {
            Some((prog, rest)) => {
                let mut c = Command::new(prog);
                c.args(rest).arg("apt-get");
                c
            }
            None => Command::new("apt-get"),
        };
        if let Some(dir) = cwd {
            cmd.current_dir(dir);
        }
        cmd.env("APT_CONFIG", self.root.join("etc/apt/apt.conf")).env("LC_ALL", "C");
        for (k, v) in &self.options {
            cmd.arg("-o").arg(format!("{k}={v}"));
        }
        cmd.args(args).stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
        let command = describe(args);
        let spawn = |source| AptError::Spawn { command: command.clone(), source };
        let mut child = cmd.spawn().map_err(spawn)?;
        let mut stderr = child.stderr.take();
        let err_thread = std::thread::spawn(move || {
            let mut buf = String::new();
            if let Some(e) = stderr.as_mut() {
                let _ = e.read_to_string(&mut buf);
            }
            buf
        });
        let mut out = Vec::new();
        if let Some(stdout) = child.stdout.take() {
            match lines {
                Some(f) => BufReader::new(stdout).lines().map_while(Result::ok).for_each(|l| f(&l)),
                None => {
                    BufReader::new(stdout).read_to_end(&mut out).map_err(spawn)?;
                }
            }
        }
        let status = child.wait().map_err(spawn)?;
        let stderr = err_thread.join().unwrap_or_default();
        if !status.success() {
            return Err(AptError::Failed { command, status, stderr: stderr.trim().to_owned() });
        }
        Ok(out)
    }
}

fn describe<S: AsRef<std::ffi::OsStr>>(args: &[S]) -> String {
    let words: Vec<_> = args.iter().take(2).map(|a| a.as_ref().to_string_lossy().into_owned()).collect();
    format!("apt-get {}", words.join(" "))
}

fn archives_option(dir: &Path) -> OsString {
    let mut o = OsString::from("-oDir::Cache::archives=");
    o.push(dir.as_os_str());
    o.push("/");
    o
}

/// Turns apt's "Unable to locate package X" into an error naming X.
fn unknown_package(e: AptError) -> AptError {
    if let AptError::Failed { stderr, .. } = &e {
        for line in stderr.lines() {
            if let Some(name) = line.split("Unable to locate package ").nth(1) {
                return AptError::UnknownPackage { name: name.trim().to_owned(), message: stderr.clone() };
            }
        }
    }
    e
}

fn base_options(root: &str) -> Vec<(String, String)> {
    let pairs = [
        ("Dir", format!("{root}/")),
        ("Dir::Etc", format!("{root}/etc/apt/")),
        ("Dir::State", format!("{root}/var/lib/apt/")),
        ("Dir::State::status", format!("{root}/var/lib/dpkg/status")),
        ("Dir::Cache", format!("{root}/var/cache/apt/")),
        ("Dir::Log", format!("{root}/var/log/apt/")),
        // Sources without Signed-By rely on the host's trusted keys, as on the host.
        ("Dir::Etc::Trusted", "/etc/apt/trusted.gpg".to_owned()),
        ("Dir::Etc::TrustedParts", "/etc/apt/trusted.gpg.d/".to_owned()),
        ("Debug::NoLocking", "1".to_owned()),
        ("APT::Architecture", ARCH.to_owned()),
        ("APT::Architectures", ARCH.to_owned()),
        ("Acquire::Languages", "none".to_owned()),
        // print-uris otherwise prints the first hash the index has, which may be MD5.
        ("Acquire::ForceHash", "SHA256".to_owned()),
        ("APT::Install-Recommends", "false".to_owned()),
    ];
    pairs.into_iter().map(|(k, v)| (k.to_owned(), v)).collect()
}

/// The host's `Acquire::*` scalar settings (proxy, `Check-Valid-Until` for snapshot mirrors).
fn host_acquire_options() -> Vec<(String, String)> {
    let out = Command::new("apt-config")
        .args(["dump", "--format", "%f\t%v%n", "Acquire"])
        .env_remove("APT_CONFIG")
        .stderr(Stdio::null())
        .output();
    let Ok(out) = out else { return Vec::new() };
    parse_acquire_dump(&String::from_utf8_lossy(&out.stdout))
}

fn parse_acquire_dump(dump: &str) -> Vec<(String, String)> {
    dump.lines()
        .filter_map(|l| l.split_once('\t'))
        .filter(|(k, v)| !v.is_empty() && !k.ends_with("::") && !v.contains('"'))
        .filter(|(k, _)| !ACQUIRE_SKIP.iter().any(|s| k.starts_with(s)))
        .filter(|(k, _)| *k != "Acquire::ForceHash")
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect()
}

fn render_conf(options: &[(String, String)]) -> String {
    let mut s =
        String::from("// Written by cloister: a private apt root, isolated from the host's apt.conf.d.\n");
    for (k, v) in options {
        s.push_str(&format!("{k} \"{v}\";\n"));
    }
    s
}

fn mirror_entry(url: &str) -> SourceEntry {
    SourceEntry {
        uris: vec![url.to_owned()],
        suites: vec![SUITE.to_owned()],
        components: vec!["main".to_owned()],
        options: vec![("Signed-By".to_owned(), DEBIAN_KEYRING.to_owned())],
    }
}

fn host_sources() -> Result<Vec<SourceEntry>, AptError> {
    let mut files = vec![PathBuf::from(HOST_SOURCES)];
    if let Ok(dir) = fs::read_dir(HOST_SOURCES_DIR) {
        let mut more: Vec<PathBuf> = dir.filter_map(|e| e.ok().map(|e| e.path())).collect();
        more.sort();
        files.extend(more);
    }
    let mut entries = Vec::new();
    for f in files {
        let ext = f.extension().and_then(|e| e.to_str());
        let parse: fn(&str) -> Vec<SourceEntry> = match ext {
            Some("list") => parse_one_line,
            Some("sources") => parse_deb822,
            _ => continue,
        };
        match fs::read_to_string(&f) {
            Ok(text) => entries.extend(parse(&text)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(source) => return Err(AptError::Io { path: f, source }),
        }
    }
    Ok(entries)
}

/// Parses `sources.list` one-line syntax, keeping binary (`deb`) lines only.
pub fn parse_one_line(text: &str) -> Vec<SourceEntry> {
    let mut out = Vec::new();
    for line in text.lines() {
        let line = line.split('#').next().unwrap_or("");
        let mut words = line.split_whitespace();
        if words.next() != Some("deb") {
            continue;
        }
        let mut rest: Vec<&str> = words.collect();
        let mut options = Vec::new();
        if rest.first().is_some_and(|w| w.starts_with('[')) {
            let end = rest.iter().position(|w| w.ends_with(']')).unwrap_or(rest.len() - 1);
            let inside = rest[..=end].join(" ");
            let inside = inside.trim_start_matches('[').trim_end_matches(']');
            options =
                inside.split_whitespace().filter_map(|o| o.split_once('=')).map(one_line_option).collect();
            rest.drain(..=end);
        }
        if rest.len() < 2 {
            continue;
        }
        out.push(SourceEntry {
            uris: vec![rest[0].to_owned()],
            suites: vec![rest[1].to_owned()],
            components: rest[2..].iter().map(|s| s.to_string()).collect(),
            options,
        });
    }
    out
}

/// Maps a one-line option (`arch=amd64`, `signed-by=/k.gpg`) to its deb822 field.
fn one_line_option((key, value): (&str, &str)) -> (String, String) {
    let lists = [("arch", "Architectures"), ("lang", "Languages"), ("target", "Targets")];
    for (short, long) in lists {
        let suffix = match key.strip_prefix(short) {
            Some("") => "",
            Some("+") => "-Add",
            Some("-") => "-Remove",
            _ => continue,
        };
        return (format!("{long}{suffix}"), value.replace(',', " "));
    }
    let field: Vec<String> = key
        .split('-')
        .map(|w| {
            let mut c = w.chars();
            c.next().map(|f| f.to_uppercase().chain(c).collect()).unwrap_or_default()
        })
        .collect();
    (field.join("-"), value.to_owned())
}

/// Parses deb822 `.sources` stanzas, keeping enabled binary (`deb`) sources only.
pub fn parse_deb822(text: &str) -> Vec<SourceEntry> {
    let mut out = Vec::new();
    let mut fields: Vec<(String, String)> = Vec::new();
    for line in text.lines().chain(std::iter::once("")) {
        if line.starts_with('#') {
            continue;
        }
        if line.trim().is_empty() {
            if let Some(e) = stanza_entry(&fields) {
                out.push(e);
            }
            fields.clear();
        } else if line.starts_with([' ', '\t']) {
            if let Some((_, v)) = fields.last_mut() {
                v.push('\n');
                v.push_str(line);
            }
        } else if let Some((k, v)) = line.split_once(':') {
            fields.push((k.trim().to_owned(), v.trim().to_owned()));
        }
    }
    out
}

fn stanza_entry(fields: &[(String, String)]) -> Option<SourceEntry> {
    let get = |name: &str| fields.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str());
    let words = |name: &str| get(name).map(|v| v.split_whitespace().map(str::to_owned).collect::<Vec<_>>());
    if !words("Types")?.iter().any(|t| t == "deb") || get("Enabled").is_some_and(|v| v == "no") {
        return None;
    }
    let own = ["Types", "URIs", "Suites", "Components", "Enabled"];
    Some(SourceEntry {
        uris: words("URIs")?,
        suites: words("Suites")?,
        components: words("Components").unwrap_or_default(),
        options: fields
            .iter()
            .filter(|(k, _)| !own.iter().any(|o| k.eq_ignore_ascii_case(o)))
            .cloned()
            .collect(),
    })
}

/// Writes entries as one deb822 file (binary sources only: we never need deb-src).
pub fn render_sources(entries: &[SourceEntry]) -> String {
    let mut s = String::new();
    for e in entries {
        s.push_str(&format!(
            "Types: deb\nURIs: {}\nSuites: {}\nComponents: {}\n",
            e.uris.join(" "),
            e.suites.join(" "),
            e.components.join(" ")
        ));
        for (k, v) in &e.options {
            s.push_str(&format!("{k}: {v}\n"));
        }
        s.push('\n');
    }
    s
}

/// Parses `'URI' filename size SHA256:hex` from `apt-get --print-uris`.
pub fn parse_uri_line(line: &str) -> Result<DebSpec, AptError> {
    let bad = || AptError::BadUriLine { line: line.to_owned() };
    let rest = line.strip_prefix('\'').ok_or_else(bad)?;
    let (uri, rest) = rest.split_once("' ").ok_or_else(bad)?;
    let mut words = rest.split_whitespace();
    let (Some(filename), Some(size), Some(hash), None) =
        (words.next(), words.next(), words.next(), words.next())
    else {
        return Err(bad());
    };
    let size = size.parse().map_err(|_| bad())?;
    let sha256 = hash.strip_prefix("SHA256:").filter(|h| h.len() == 64).ok_or_else(bad)?.to_ascii_lowercase();
    let (name, version, arch) = split_filename(filename).ok_or_else(bad)?;
    Ok(DebSpec { name, version, arch, uri: uri.to_owned(), filename: filename.to_owned(), size, sha256 })
}

/// Splits `name_version_arch.deb` (URL-encoded) into its three decoded parts.
pub fn split_filename(filename: &str) -> Option<(String, String, String)> {
    let stem = filename.strip_suffix(".deb")?;
    let mut parts = stem.split('_');
    let (Some(n), Some(v), Some(a), None) = (parts.next(), parts.next(), parts.next(), parts.next()) else {
        return None;
    };
    Some((url_decode(n)?, url_decode(v)?, url_decode(a)?))
}

fn url_decode(s: &str) -> Option<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = s.get(i + 1..i + 3)?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok().filter(|r| !r.is_empty())
}

/// Parses `dlstatus:<n>:<percent>:<text>` from apt's status fd.
fn parse_dlstatus(line: &str) -> Option<f64> {
    let rest = line.strip_prefix("dlstatus:")?;
    rest.split(':').nth(1)?.parse().ok()
}

pub fn sha256_file(path: &Path) -> Result<String, AptError> {
    let io = |source| AptError::Io { path: path.to_owned(), source };
    let mut f = fs::File::open(path).map_err(io)?;
    let mut h = Sha256::new();
    std::io::copy(&mut f, &mut h).map_err(io)?;
    Ok(hex::encode(h.finalize()))
}

fn mkdir(path: &Path) -> Result<(), AptError> {
    fs::create_dir_all(path).map_err(|source| AptError::Io { path: path.to_owned(), source })
}

fn write(path: &Path, data: &[u8]) -> Result<(), AptError> {
    fs::write(path, data).map_err(|source| AptError::Io { path: path.to_owned(), source })
}

/// Leaves an unchanged file alone, so its mtime keeps meaning "last written".
fn write_if_changed(path: &Path, data: &[u8]) -> Result<(), AptError> {
    if fs::read(path).ok().as_deref() == Some(data) {
        return Ok(());
    }
    write(path, data)
}

#[cfg(test)]
mod tests {
    use super::*;

    const HASH: &str = "2e6e2f1a0007dc43bc91c273fd36e91e40a4f1c2765a03eca68b70a42103878a";

    #[test]
    fn uri_line_parses_into_spec() {
        let uri = "http://mirror.invalid/debian/pool/main/h/hello/hello_2.10-3_amd64.deb";
        let line = format!("'{uri}' hello_2.10-3_amd64.deb 53080 SHA256:{HASH}");
        let spec = parse_uri_line(&line).unwrap();
        assert_eq!(
            spec,
            DebSpec {
                name: "hello".into(),
                version: "2.10-3".into(),
                arch: "amd64".into(),
                uri: "http://mirror.invalid/debian/pool/main/h/hello/hello_2.10-3_amd64.deb".into(),
                filename: "hello_2.10-3_amd64.deb".into(),
                size: 53080,
                sha256: HASH.into(),
            }
        );
    }

    #[test]
    fn uri_line_refuses_other_hashes_and_garbage() {
        let md5 = "'http://m.invalid/a_1_all.deb' a_1_all.deb 5 MD5Sum:d04c2e9639dee67aa836d8232b1ca658";
        assert!(parse_uri_line(md5).is_err());
        assert!(parse_uri_line("Reading package lists...").is_err());
        let short = "'http://m.invalid/a_1_all.deb' a_1_all.deb 5 SHA256:abcd";
        assert!(parse_uri_line(short).is_err());
    }

    #[test]
    fn filename_splits_and_decodes_epoch() {
        let check = |f: &str, n: &str, v: &str, a: &str| {
            assert_eq!(split_filename(f), Some((n.to_owned(), v.to_owned(), a.to_owned())), "{f}");
        };
        check("hello_2.10-3_amd64.deb", "hello", "2.10-3", "amd64");
        check("libc6_2.36-9%2bdeb12u10_amd64.deb", "libc6", "2.36-9+deb12u10", "amd64");
        check(
            "openssh-server_1%3a9.2p1-2%2bdeb12u5_amd64.deb",
            "openssh-server",
            "1:9.2p1-2+deb12u5",
            "amd64",
        );
        check("tzdata_2024a-0%2bdeb12u1_all.deb", "tzdata", "2024a-0+deb12u1", "all");
        assert_eq!(split_filename("a_b.deb"), None);
        assert_eq!(split_filename("a_b_c_d.deb"), None);
        assert_eq!(split_filename("a_1_amd64.udeb"), None);
        assert_eq!(split_filename("a_1%zz_amd64.deb"), None);
    }

    #[test]
    fn one_line_sources_parse_with_options_and_comments() {
        let text = "# a comment\n\
            deb [arch=amd64,i386 signed-by=/usr/share/keyrings/k.gpg] \
            http://m.invalid/debian bookworm main contrib # tail\n\
            deb-src http://m.invalid/debian bookworm main\n\
            #deb http://disabled.invalid/debian bookworm main\n\
            deb [ trusted=yes ] http://n.invalid/ ./\n\
            \n";
        let e = parse_one_line(text);
        assert_eq!(e.len(), 2);
        assert_eq!(e[0].uris, ["http://m.invalid/debian"]);
        assert_eq!(e[0].suites, ["bookworm"]);
        assert_eq!(e[0].components, ["main", "contrib"]);
        assert_eq!(
            e[0].options,
            [
                ("Architectures".to_owned(), "amd64 i386".to_owned()),
                ("Signed-By".to_owned(), "/usr/share/keyrings/k.gpg".to_owned())
            ]
        );
        assert_eq!(e[1].suites, ["./"]);
        assert!(e[1].components.is_empty());
        assert_eq!(e[1].options, [("Trusted".to_owned(), "yes".to_owned())]);
    }

    #[test]
    fn deb822_sources_parse_stanzas_and_inline_keys() {
        let text = "Types: deb deb-src\n\
            # http://comment.invalid/\n\
            URIs: http://m.invalid/debian\n\
            Suites: bookworm bookworm-updates\n\
            Components: main\n\
            Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg\n\
            \n\
            Types: deb-src\n\
            URIs: http://m.invalid/debian\n\
            Suites: bookworm\n\
            Components: main\n\
            \n\
            Types: deb\n\
            Enabled: no\n\
            URIs: http://off.invalid/\n\
            Suites: x\n\
            \n\
            Types: deb\n\
            URIs: http://k.invalid/\n\
            Suites: stable\n\
            Components: main\n\
            Signed-By:\n -----BEGIN PGP PUBLIC KEY BLOCK-----\n .\n abc\n";
        let e = parse_deb822(text);
        assert_eq!(e.len(), 2);
        assert_eq!(e[0].suites, ["bookworm", "bookworm-updates"]);
        assert_eq!(
            e[0].options,
            [("Signed-By".to_owned(), "/usr/share/keyrings/debian-archive-keyring.gpg".to_owned())]
        );
        assert_eq!(e[1].options[0].1, "\n -----BEGIN PGP PUBLIC KEY BLOCK-----\n .\n abc");
        // Rendering and parsing again is the identity: the inline key survives the copy.
        assert_eq!(parse_deb822(&render_sources(&e)), e);
        assert!(render_sources(&e).starts_with("Types: deb\nURIs: http://m.invalid/debian\n"));
    }

    #[test]
    fn host_acquire_settings_are_filtered() {
        let dump = "Acquire\t\nAcquire::Check-Valid-Until\tfalse\n\
            Acquire::http::Proxy\thttp://p.invalid:3128\nAcquire::Languages::\tnone\n\
            Acquire::IndexTargets::deb::DEP-11::MetaKey\tx\nAcquire::ForceHash\tMD5Sum\n";
        assert_eq!(
            parse_acquire_dump(dump),
            [
                ("Acquire::Check-Valid-Until".to_owned(), "false".to_owned()),
                ("Acquire::http::Proxy".to_owned(), "http://p.invalid:3128".to_owned())
            ]
        );
    }

    #[test]
    fn dlstatus_lines_give_percent() {
        assert_eq!(parse_dlstatus("dlstatus:3:42.5:Retrieving file 3 of 9"), Some(42.5));
        assert_eq!(parse_dlstatus("pmstatus:x:1:y"), None);
    }

    /// Uses the host's sources (the mirror is reachable from the test machines).
    fn hello_root(dir: &Path) -> (AptRoot, Vec<DebSpec>) {
        let apt = AptRoot::prepare(dir, None).unwrap();
        assert!(apt.update(Duration::from_secs(3600), false).unwrap(), "first update must run");
        assert!(!apt.update(Duration::from_secs(3600), false).unwrap(), "fresh lists must be reused");
        let specs = apt.resolve(&["hello".to_owned()]).unwrap();
        (apt, specs)
    }

    #[test]
    fn resolve_fetch_cache_and_repair_hello() {
        let dir = tempfile::tempdir().unwrap();
        let (apt, specs) = hello_root(dir.path());
        let names: Vec<_> = specs.iter().map(|s| s.name.as_str()).collect();
        assert!(names.contains(&"hello") && names.contains(&"libc6"), "{names:?}");

        let mut events = Vec::new();
        let fetched = apt.fetch(&specs, &mut |p| events.push(p)).unwrap();
        assert_eq!(fetched.len(), specs.len());
        for f in &fetched {
            assert_eq!(sha256_file(&f.path).unwrap(), f.spec.sha256);
            assert_eq!(f.path, dir.path().join("debs").join(format!("{}.deb", f.spec.sha256)));
        }
        let last = events.last().unwrap();
        assert_eq!(
            (last.stage, last.done_debs, last.done_bytes),
            (Stage::Verified, specs.len(), last.total_bytes)
        );

        // Warm: everything comes from the cache, nothing is rewritten.
        let hello = fetched.iter().find(|f| f.spec.name == "hello").unwrap();
        let mtime = fs::metadata(&hello.path).unwrap().modified().unwrap();
        events.clear();
        apt.fetch(&specs, &mut |p| events.push(p)).unwrap();
        assert!(events.iter().all(|p| p.stage == Stage::Cached), "{events:?}");
        assert_eq!(fs::metadata(&hello.path).unwrap().modified().unwrap(), mtime);

        // A corrupted cache entry is detected, dropped and fetched again.
        fs::write(&hello.path, b"not a deb").unwrap();
        events.clear();
        apt.fetch(&specs, &mut |p| events.push(p)).unwrap();
        assert_eq!(events.iter().filter(|p| p.stage == Stage::Verified).count(), 1);
        assert_eq!(sha256_file(&hello.path).unwrap(), hello.spec.sha256);

        match apt.resolve(&["hello".to_owned(), "cloister-no-such-package".to_owned()]) {
            Err(AptError::UnknownPackage { name, .. }) => assert_eq!(name, "cloister-no-such-package"),
            other => panic!("expected unknown package, got {other:?}"),
        }
    }

    #[test]
    fn update_and_resolve_run_as_nobody() {
        let dir = tempfile::tempdir().unwrap();
        AptRoot::prepare(dir.path(), None).unwrap();
        let st = Command::new("chown").args(["-R", "nobody:nogroup"]).arg(dir.path()).status().unwrap();
        assert!(st.success());
        let apt = AptRoot::prepare(dir.path(), None).unwrap().with_wrapper([
            "setpriv",
            "--reuid=nobody",
            "--regid=nogroup",
            "--clear-groups",
        ]);
        assert!(apt.update(Duration::from_secs(3600), false).unwrap());
        let specs = apt.resolve(&["hello".to_owned()]).unwrap();
        assert!(specs.iter().any(|s| s.name == "hello"));
        // The lists were written by apt running as nobody, not by us.
        let lists = dir.path().join("apt/var/lib/apt/lists");
        let release = fs::read_dir(&lists)
            .unwrap()
            .map(|e| e.unwrap().path())
            .find(|p| p.to_string_lossy().ends_with("InRelease"))
            .expect("an InRelease file");
        use std::os::unix::fs::MetadataExt;
        assert_eq!(fs::metadata(release).unwrap().uid(), 65534);
    }
}
