//! Onion service descriptors (v3), decrypted in test code the way a client does (rend-spec-v3
//! §2.5), to see what a service really published: tor's control port hands out the outer
//! document a client fetched, whose two encrypted layers only someone who knows the onion
//! address can open.
//!
//! The keys come from the address and the document alone: the blinded key is the
//! `signed-with-ed25519-key` extension of the descriptor-signing-key certificate (so no time
//! period arithmetic), credential = SHA3-256("credential" | identity key), subcredential =
//! SHA3-256("subcredential" | credential | blinded key). Each layer is SALT(16) | ciphertext |
//! MAC(32); SHAKE-256(SECRET_DATA | subcredential | INT_8(revision counter) | salt | constant)
//! gives the AES-256-CTR key (32), its IV (16) and the MAC key (32). The MAC, SHA3-256 of
//! INT_8(len(mac key)) | mac key | INT_8(len(salt)) | salt | ciphertext, is checked before
//! anything is decrypted, so a wrong key fails loudly instead of yielding noise. Without client
//! authorisation SECRET_DATA is the blinded key for both layers.
//!
//! The primitives are OpenSSL's (SHA3-256, SHAKE-256, AES-256-CTR), already in the tree for the
//! image's data pass; only the framing is ours.

use anyhow::{bail, ensure, Context, Result};
use data_encoding::{BASE32_NOPAD, BASE64};
use openssl::hash::{Hasher, MessageDigest};
use openssl::symm::Cipher;

/// The outer layer's string constant.
pub const SUPERENCRYPTED: &str = "hsdir-superencrypted-data";
/// The inner layer's string constant.
pub const ENCRYPTED: &str = "hsdir-encrypted-data";

const SALT_LEN: usize = 16;
const MAC_LEN: usize = 32;
const KEY_LEN: usize = 32;
const IV_LEN: usize = 16;
/// cert-spec: the descriptor signing key certified by the blinded key.
const CERT_TYPE_DESC_SIGNING: u8 = 0x08;
/// cert-spec: the extension that carries the signing (here: blinded) public key.
const EXT_SIGNED_WITH_ED25519_KEY: u8 = 0x04;

pub fn sha3_256(parts: &[&[u8]]) -> Result<[u8; 32]> {
    let mut h = Hasher::new(MessageDigest::sha3_256())?;
    for p in parts {
        h.update(p)?;
    }
    let digest = h.finish()?;
    let mut out = [0u8; 32];
    out.copy_from_slice(&digest);
    Ok(out)
}

/// The ed25519 identity key a v3 `.onion` address (with or without the suffix) names, its
/// version byte and checksum checked.
pub fn identity_key(address: &str) -> Result<[u8; 32]> {
    let label = address.strip_suffix(".onion").unwrap_or(address);
    let bytes = BASE32_NOPAD
        .decode(label.to_ascii_uppercase().as_bytes())
        .with_context(|| format!("{address:?} is not base32"))?;
    ensure!(bytes.len() == 35, "{address:?} is not a v3 onion address ({} bytes)", bytes.len());
    let (key, rest) = bytes.split_at(32);
    ensure!(rest[2] == 3, "{address:?} has version {}, not 3", rest[2]);
    let sum = sha3_256(&[b".onion checksum", key, &[3]])?;
    ensure!(rest[..2] == sum[..2], "{address:?} has a wrong checksum");
    let mut out = [0u8; 32];
    out.copy_from_slice(key);
    Ok(out)
}

/// The v3 address of an identity key, without `.onion` (for tests of this module).
pub fn onion_address(identity: &[u8; 32]) -> Result<String> {
    let sum = sha3_256(&[b".onion checksum", identity, &[3]])?;
    let mut bytes = identity.to_vec();
    bytes.extend_from_slice(&[sum[0], sum[1], 3]);
    Ok(BASE32_NOPAD.encode(&bytes).to_ascii_lowercase())
}

/// SHA3-256("subcredential" | SHA3-256("credential" | identity) | blinded).
pub fn subcredential(identity: &[u8; 32], blinded: &[u8; 32]) -> Result<[u8; 32]> {
    let credential = sha3_256(&[b"credential", identity])?;
    sha3_256(&[b"subcredential", &credential, blinded])
}

/// What the layers' keys derive from besides the salt.
pub struct LayerKeys<'a> {
    /// SECRET_DATA: the blinded key (| descriptor cookie with client authorisation).
    pub secret: &'a [u8],
    pub subcredential: &'a [u8; 32],
    pub revision: u64,
    /// [`SUPERENCRYPTED`] or [`ENCRYPTED`].
    pub constant: &'a str,
}

impl LayerKeys<'_> {
    /// (AES key, IV, MAC key) for `salt`.
    fn derive(&self, salt: &[u8]) -> Result<([u8; KEY_LEN], [u8; IV_LEN], [u8; MAC_LEN])> {
        let mut xof = Hasher::new(MessageDigest::shake_256())?;
        for part in [self.secret, self.subcredential, &self.revision.to_be_bytes(), salt] {
            xof.update(part)?;
        }
        xof.update(self.constant.as_bytes())?;
        let mut out = [0u8; KEY_LEN + IV_LEN + MAC_LEN];
        xof.finish_xof(&mut out)?;
        let (mut key, mut iv, mut mac) = ([0u8; KEY_LEN], [0u8; IV_LEN], [0u8; MAC_LEN]);
        key.copy_from_slice(&out[..KEY_LEN]);
        iv.copy_from_slice(&out[KEY_LEN..KEY_LEN + IV_LEN]);
        mac.copy_from_slice(&out[KEY_LEN + IV_LEN..]);
        Ok((key, iv, mac))
    }

    /// Opens SALT | ciphertext | MAC: the MAC is checked first.
    pub fn decrypt(&self, blob: &[u8]) -> Result<Vec<u8>> {
        ensure!(blob.len() >= SALT_LEN + MAC_LEN, "a {}-byte layer is too short", blob.len());
        let (salt, rest) = blob.split_at(SALT_LEN);
        let (ciphertext, mac) = rest.split_at(rest.len() - MAC_LEN);
        let (key, iv, mac_key) = self.derive(salt)?;
        let want = layer_mac(&mac_key, salt, ciphertext)?;
        ensure!(
            openssl::memcmp::eq(&want, mac),
            "the {} layer's MAC does not match: wrong address, key or revision",
            self.constant
        );
        Ok(openssl::symm::decrypt(Cipher::aes_256_ctr(), &key, Some(&iv), ciphertext)?)
    }

    /// SALT | AES-256-CTR(plaintext) | MAC, as a service writes a layer (for tests).
    pub fn encrypt(&self, salt: &[u8; SALT_LEN], plaintext: &[u8]) -> Result<Vec<u8>> {
        let (key, iv, mac_key) = self.derive(salt)?;
        let ciphertext = openssl::symm::encrypt(Cipher::aes_256_ctr(), &key, Some(&iv), plaintext)?;
        let mac = layer_mac(&mac_key, salt, &ciphertext)?;
        Ok([&salt[..], &ciphertext, &mac].concat())
    }
}

fn layer_mac(mac_key: &[u8], salt: &[u8], ciphertext: &[u8]) -> Result<[u8; 32]> {
    let (klen, slen) = ((mac_key.len() as u64).to_be_bytes(), (salt.len() as u64).to_be_bytes());
    sha3_256(&[&klen, mac_key, &slen, salt, ciphertext])
}

/// The outer document's parts the layers need.
#[derive(Debug)]
pub struct Outer {
    pub revision: u64,
    pub blinded_key: [u8; 32],
    pub superencrypted: Vec<u8>,
}

/// Reads `hs-descriptor 3`, the signing key certificate's blinded key, the revision counter
/// and the superencrypted blob.
pub fn parse_outer(text: &str) -> Result<Outer> {
    let mut lines = text.lines();
    ensure!(lines.next().map(str::trim_end) == Some("hs-descriptor 3"), "not a v3 descriptor");
    let (mut revision, mut blinded_key, mut superencrypted) = (None, None, None);
    while let Some(line) = lines.next() {
        let line = line.trim_end();
        if line == "descriptor-signing-key-cert" {
            blinded_key = Some(blinded_key_of(&object(&mut lines, "ED25519 CERT")?)?);
        } else if line == "superencrypted" {
            superencrypted = Some(object(&mut lines, "MESSAGE")?);
        } else if let Some(n) = line.strip_prefix("revision-counter ") {
            revision = Some(n.trim().parse().with_context(|| format!("revision-counter {n:?}"))?);
        }
    }
    Ok(Outer {
        revision: revision.context("no revision-counter")?,
        blinded_key: blinded_key.context("no descriptor-signing-key-cert")?,
        superencrypted: superencrypted.context("no superencrypted object")?,
    })
}

/// The base64 body of `-----BEGIN <kind>-----` … `-----END <kind>-----`, which must follow.
fn object<'a>(lines: &mut impl Iterator<Item = &'a str>, kind: &str) -> Result<Vec<u8>> {
    let begin = format!("-----BEGIN {kind}-----");
    let end = format!("-----END {kind}-----");
    ensure!(lines.next().map(str::trim_end) == Some(begin.as_str()), "no {begin}");
    let mut body = String::new();
    for line in lines.by_ref() {
        let line = line.trim_end();
        if line == end {
            return BASE64.decode(body.as_bytes()).with_context(|| format!("the {kind} is not base64"));
        }
        body.push_str(line);
    }
    bail!("no {end}")
}

/// cert-spec §2.1: VERSION 1, CERT_TYPE 08, EXPIRATION(4), KEY_TYPE, KEY(32), N_EXTENSIONS,
/// extensions (LEN(2) TYPE FLAGS DATA), SIGNATURE(64); the key of extension 04.
fn blinded_key_of(cert: &[u8]) -> Result<[u8; 32]> {
    ensure!(cert.len() >= 40 + 64, "a {}-byte certificate is too short", cert.len());
    ensure!(cert[0] == 1, "certificate version {}", cert[0]);
    ensure!(cert[1] == CERT_TYPE_DESC_SIGNING, "certificate type {:#04x}, not 08", cert[1]);
    let body = &cert[..cert.len() - 64];
    let mut at = 40;
    for _ in 0..cert[39] {
        let head = body.get(at..at + 4).context("truncated certificate extension")?;
        let len = usize::from(u16::from_be_bytes([head[0], head[1]]));
        let data = body.get(at + 4..at + 4 + len).context("truncated certificate extension")?;
        if head[2] == EXT_SIGNED_WITH_ED25519_KEY {
            let mut key = [0u8; 32];
            ensure!(data.len() == 32, "a {}-byte signing key extension", data.len());
            key.copy_from_slice(data);
            return Ok(key);
        }
        at += 4 + len;
    }
    bail!("the descriptor signing key certificate names no signing key (extension 04)")
}

/// Both layers of `descriptor` opened with the keys `address` gives: the inner plaintext
/// (`create2-formats`, `pow-params`, the introduction points).
pub fn inner_layer(descriptor: &str, address: &str) -> Result<String> {
    let identity = identity_key(address)?;
    let outer = parse_outer(descriptor)?;
    let subcred = subcredential(&identity, &outer.blinded_key)?;
    let keys = |constant| LayerKeys {
        secret: &outer.blinded_key,
        subcredential: &subcred,
        revision: outer.revision,
        constant,
    };
    let middle = keys(SUPERENCRYPTED).decrypt(&outer.superencrypted)?;
    // The service pads this layer's plaintext with NULs to a multiple of 10000 bytes.
    let end = middle.iter().rposition(|b| *b != 0).map_or(0, |i| i + 1);
    let middle = std::str::from_utf8(&middle[..end]).context("the superencrypted layer is not text")?;
    ensure!(middle.starts_with("desc-auth-type "), "the superencrypted layer starts {:?}", head(middle));
    let mut lines = middle.lines().skip_while(|l| l.trim_end() != "encrypted");
    ensure!(lines.next().is_some(), "the superencrypted layer has no encrypted object");
    let inner = keys(ENCRYPTED).decrypt(&object(&mut lines, "MESSAGE")?)?;
    let inner = String::from_utf8(inner).context("the encrypted layer is not text")?;
    ensure!(inner.starts_with("create2-formats "), "the encrypted layer starts {:?}", head(&inner));
    Ok(inner)
}

fn head(text: &str) -> &str {
    text.get(..text.len().min(40)).unwrap_or(text)
}

/// An inner layer's `pow-params v1 <seed> <suggested effort> <expiration>` line.
#[derive(Debug, PartialEq, Eq)]
pub struct PowParams {
    pub seed: [u8; 32],
    pub suggested_effort: u32,
    /// `YYYY-MM-DDTHH:MM:SS` (UTC), as seconds since the epoch.
    pub expires_unix: i64,
}

/// The one `pow-params` line of an inner layer, if there is one; a malformed one is an error.
pub fn pow_params(inner: &str) -> Result<Option<PowParams>> {
    let mut found = inner.lines().filter(|l| l.starts_with("pow-params "));
    let Some(line) = found.next() else { return Ok(None) };
    ensure!(found.next().is_none(), "more than one pow-params line");
    let words: Vec<&str> = line.split_whitespace().collect();
    ensure!(words.len() >= 5 && words[1] == "v1", "{line:?} is not pow-params v1 <seed> <effort> <expiry>");
    let seed = BASE64.decode(words[2].as_bytes()).with_context(|| format!("seed of {line:?}"))?;
    let seed: [u8; 32] =
        seed.try_into().map_err(|_| anyhow::anyhow!("{line:?}: the seed is not 32 bytes"))?;
    let suggested_effort = words[3].parse().with_context(|| format!("effort of {line:?}"))?;
    let expires_unix = iso_time(words[4]).with_context(|| format!("expiration of {line:?}"))?;
    Ok(Some(PowParams { seed, suggested_effort, expires_unix }))
}

/// `YYYY-MM-DDTHH:MM:SS` in UTC as seconds since the epoch.
fn iso_time(text: &str) -> Result<i64> {
    let b = text.as_bytes();
    ensure!(b.len() == 19 && b[4] == b'-' && b[7] == b'-' && b[10] == b'T', "{text:?}");
    ensure!(b[13] == b':' && b[16] == b':', "{text:?}");
    let n = |r: std::ops::Range<usize>| -> Result<i64> {
        let s = &text[r];
        ensure!(s.bytes().all(|c| c.is_ascii_digit()), "{text:?}");
        Ok(s.parse()?)
    };
    let (y, m, d) = (n(0..4)?, n(5..7)?, n(8..10)?);
    ensure!((1..=12).contains(&m) && (1..=31).contains(&d), "{text:?}");
    // Days from the civil date (Howard Hinnant's algorithm), March-based years.
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    Ok(days * 86_400 + n(11..13)? * 3600 + n(14..16)? * 60 + n(17..19)?)
}

/// The introduction points an inner layer lists.
pub fn intro_points(inner: &str) -> usize {
    inner.lines().filter(|l| l.starts_with("introduction-point ")).count()
}

#[cfg(test)]
mod tests {
    use super::*;

    const IDENTITY: [u8; 32] = [7; 32];
    const BLINDED: [u8; 32] = [9; 32];
    const REVISION: u64 = 0x0102_0304_0506_0708;
    const INNER: &str = "create2-formats 2\n\
        pow-params v1 AQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQE= 12 2026-12-02T03:04:05\n\
        introduction-point AQAGfwAAASMp\nonion-key ntor AAAA\n";

    /// A signing key certificate with one extension (04, the blinded key) and a dummy signature.
    fn cert(blinded: &[u8; 32]) -> Vec<u8> {
        let mut c = vec![1, CERT_TYPE_DESC_SIGNING, 0, 0, 0, 1, 1];
        c.extend_from_slice(&[5; 32]);
        c.push(1);
        c.extend_from_slice(&[0, 32, EXT_SIGNED_WITH_ED25519_KEY, 0]);
        c.extend_from_slice(blinded);
        c.extend_from_slice(&[0; 64]);
        c
    }

    fn armour(kind: &str, bytes: &[u8]) -> String {
        let b64 = BASE64.encode(bytes);
        let lines: Vec<&str> =
            b64.as_bytes().chunks(64).map(|c| std::str::from_utf8(c).unwrap_or_default()).collect();
        format!("-----BEGIN {kind}-----\n{}\n-----END {kind}-----\n", lines.join("\n"))
    }

    /// A descriptor made as a service makes one: inner layer, then the padded middle layer
    /// around it, then the outer document.
    fn descriptor(identity: &[u8; 32], blinded: &[u8; 32], inner: &str) -> String {
        let subcred = subcredential(identity, blinded).unwrap();
        let keys =
            |constant| LayerKeys { secret: blinded, subcredential: &subcred, revision: REVISION, constant };
        let encrypted = keys(ENCRYPTED).encrypt(&[1; 16], inner.as_bytes()).unwrap();
        let mut middle = format!(
            "desc-auth-type x25519\ndesc-auth-ephemeral-key AAAA\nauth-client a b c\nencrypted\n{}",
            armour("MESSAGE", &encrypted)
        )
        .into_bytes();
        middle.resize(10_000, 0);
        let superencrypted = keys(SUPERENCRYPTED).encrypt(&[2; 16], &middle).unwrap();
        format!(
            "hs-descriptor 3\ndescriptor-lifetime 180\ndescriptor-signing-key-cert\n{}\
             revision-counter {REVISION}\nsuperencrypted\n{}signature AAAA\n",
            armour("ED25519 CERT", &cert(blinded)),
            armour("MESSAGE", &superencrypted)
        )
    }

    #[test]
    fn onion_addresses_round_trip_and_a_changed_letter_fails_the_checksum() {
        let addr = onion_address(&IDENTITY).unwrap();
        assert_eq!(addr.len(), 56);
        assert_eq!(identity_key(&format!("{addr}.onion")).unwrap(), IDENTITY);
        let first = if addr.starts_with('a') { "b" } else { "a" };
        let bad = format!("{first}{}", &addr[1..]);
        assert!(identity_key(&bad).unwrap_err().to_string().contains("checksum"));
    }

    #[test]
    fn a_descriptor_made_with_the_same_kdf_opens_to_its_inner_layer() {
        let addr = onion_address(&IDENTITY).unwrap();
        let text = descriptor(&IDENTITY, &BLINDED, INNER);
        let outer = parse_outer(&text).unwrap();
        assert_eq!((outer.revision, outer.blinded_key), (REVISION, BLINDED));
        let inner = inner_layer(&text, &addr).unwrap();
        assert_eq!(inner, INNER);
        let pow = pow_params(&inner).unwrap().unwrap();
        assert_eq!(pow.seed, [1; 32]);
        assert_eq!(pow.suggested_effort, 12);
        // date -u -d 2026-12-02T03:04:05 +%s
        assert_eq!(pow.expires_unix, 1_796_180_645);
        assert_eq!(intro_points(&inner), 1);
    }

    #[test]
    fn another_services_address_fails_the_mac() {
        let text = descriptor(&IDENTITY, &BLINDED, INNER);
        let other = onion_address(&[8; 32]).unwrap();
        let err = inner_layer(&text, &other).unwrap_err().to_string();
        assert!(err.contains("hsdir-superencrypted-data layer's MAC does not match"), "{err}");
    }

    #[test]
    fn a_wrong_subcredential_or_revision_fails_the_mac() {
        let subcred = subcredential(&IDENTITY, &BLINDED).unwrap();
        let keys = LayerKeys { secret: &BLINDED, subcredential: &subcred, revision: 1, constant: ENCRYPTED };
        let blob = keys.encrypt(&[3; 16], b"create2-formats 2\n").unwrap();
        assert_eq!(keys.decrypt(&blob).unwrap(), b"create2-formats 2\n");
        let wrong = subcredential(&[8; 32], &BLINDED).unwrap();
        let err = LayerKeys { subcredential: &wrong, ..keys }.decrypt(&blob).unwrap_err();
        assert!(err.to_string().contains("MAC does not match"), "{err}");
        let later = LayerKeys { secret: &BLINDED, subcredential: &subcred, revision: 2, constant: ENCRYPTED };
        assert!(later.decrypt(&blob).is_err());
    }

    #[test]
    fn a_layer_without_pow_params_has_none_and_a_bad_one_is_an_error() {
        assert_eq!(pow_params("create2-formats 2\nintroduction-point x\n").unwrap(), None);
        assert!(pow_params("create2-formats 2\npow-params v1 short 1 2026-01-01T00:00:00\n").is_err());
        assert!(pow_params("pow-params v2 x 1 y\n").is_err());
    }

    #[test]
    fn iso_times_count_from_the_epoch() {
        assert_eq!(iso_time("1970-01-01T00:00:00").unwrap(), 0);
        assert_eq!(iso_time("2000-03-01T00:00:01").unwrap(), 951_868_801);
        assert!(iso_time("2000-03-01 00:00:01").is_err());
    }
}
