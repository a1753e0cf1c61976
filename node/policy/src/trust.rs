//! Operator signatures on policy writes.
//!
//! A node does not decide policy: an operator does. Every write (a document
//! or a delete) carries the operator's certificate, the operator's clock in
//! milliseconds, and an ECDSA P-256 SHA-256 signature over [`message`]. Each
//! node checks all three before applying a write, whether it came over HTTP
//! or from a peer, so a node holding only a node certificate cannot change
//! policy anywhere, and cannot replay an older signed body as newer (the
//! version's wall part must equal the signed timestamp).
//!
//! The HTTP carriage (see docs/POLICY.md): headers [`HEADER_CERT`] (the
//! operator certificate, DER as hex), [`HEADER_SIGNED_AT`] (decimal ms) and
//! [`HEADER_SIGNATURE`] (the DER signature as hex).

use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use ring::signature::{self, EcdsaKeyPair, KeyPair, UnparsedPublicKey};
use transport::certs::{OperatorCertError, OperatorVerifier};

use super::doc::Kind;
use super::hlc::{MAX_AHEAD_MS, Version};
use super::store::{Signature, content_hash, hex};

/// Header carrying the operator's certificate: DER, lower- or upper-case hex.
pub const HEADER_CERT: &str = "shoal-operator-cert";
/// Header carrying the operator's timestamp: decimal ms since the Unix epoch.
pub const HEADER_SIGNED_AT: &str = "shoal-signed-at";
/// Header carrying the signature: ECDSA P-256 SHA-256, ASN.1 DER, hex.
pub const HEADER_SIGNATURE: &str = "shoal-signature";
/// First line of every signed message.
pub const DOMAIN: &str = "shoal-policy-v1";
/// How far an HTTP write's signed timestamp may be from the node's clock
/// either way (a captured request cannot be replayed later than this).
pub const MAX_HTTP_SKEW: Duration = Duration::from_millis(MAX_AHEAD_MS);

/// The bytes an operator signs for a write of `kind/name`:
///
/// ```text
/// shoal-policy-v1\n<put|delete>\n<Kind>\n<name>\n<signed_at_ms>\n<sha256 hex of the body, or ->\n
/// ```
pub fn message(kind: Kind, name: &str, signed_at_ms: u64, body: Option<&str>) -> Vec<u8> {
    let (op, digest) = match body {
        Some(b) => ("put", content_hash(b)),
        None => ("delete", "-".to_string()),
    };
    format!("{DOMAIN}\n{op}\n{kind}\n{name}\n{signed_at_ms}\n{digest}\n").into_bytes()
}

/// Why a write was refused. Each has a stable metric label ([`Refusal::reason`]).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// No signature at all.
    #[error(
        "signature: this write is not signed; sign it with an operator certificate (shoal policy apply --operator-cert DIR)"
    )]
    Unsigned,
    /// Headers present but not decodable.
    #[error("signature: {0}")]
    Malformed(String),
    /// The certificate is not an operator certificate of this mesh.
    #[error("operator certificate: {0}")]
    Cert(OperatorCertError),
    /// The signature does not verify with the certificate's key.
    #[error(
        "signature: does not verify for this kind, name, timestamp and body (tampered, or signed with another key)"
    )]
    BadSignature,
    /// The signed timestamp is too far ahead of this node's clock.
    #[error("signed-at: {ahead_ms} ms ahead of this node's clock (the bound is {MAX_AHEAD_MS} ms)")]
    ClockAhead {
        /// By how much.
        ahead_ms: u64,
    },
    /// An HTTP write signed too long ago (a replayed request).
    #[error(
        "signed-at: {behind_ms} ms behind this node's clock (the bound is {MAX_AHEAD_MS} ms); sign again"
    )]
    TooOld {
        /// By how much.
        behind_ms: u64,
    },
    /// A peer's record whose version does not carry its signed timestamp.
    #[error("version {version} does not carry the operator's timestamp {signed_at_ms}")]
    VersionMismatch {
        /// The record's version.
        version: String,
        /// What was signed.
        signed_at_ms: u64,
    },
}

impl Refusal {
    /// Stable label value for `shoal_policy_refused_total{reason}`.
    pub fn reason(&self) -> &'static str {
        match self {
            Refusal::Unsigned => "unsigned",
            Refusal::Malformed(_) => "malformed_signature",
            Refusal::Cert(e) => e.reason(),
            Refusal::BadSignature => "bad_signature",
            Refusal::ClockAhead { .. } => "clock_ahead",
            Refusal::TooOld { .. } => "signed_too_long_ago",
            Refusal::VersionMismatch { .. } => "version_mismatch",
        }
    }
}

/// Checks operator signatures against the mesh CA.
#[derive(Debug)]
pub struct Trust {
    verifier: OperatorVerifier,
}

impl Trust {
    /// Trusts operators certified by the CA in `ca_pem` for `trust_domain`.
    pub fn new(ca_pem: &[u8], trust_domain: &str) -> Result<Self, transport::certs::CertError> {
        Ok(Trust {
            verifier: OperatorVerifier::new(ca_pem, trust_domain)?,
        })
    }

    /// Loads the CA from a node's certificate folder (`<dir>/ca.pem`).
    pub fn from_cert_dir(
        dir: &Path,
        trust_domain: &str,
    ) -> Result<Self, transport::certs::CertError> {
        let path = dir.join(transport::certs::CA_CERT);
        let pem = std::fs::read(&path)
            .map_err(|source| transport::certs::CertError::Io { path, source })?;
        Self::new(&pem, trust_domain)
    }

    /// Verifies a signature over a write of `kind/name` with `body` (`None`
    /// for a delete); returns the operator's SPIFFE ID. Checks the
    /// certificate (chain to the mesh CA, validity, operator SAN in our
    /// trust domain), the signature, and that the timestamp is not more
    /// than the bound ahead of `now_ms`.
    pub fn verify(
        &self,
        kind: Kind,
        name: &str,
        body: Option<&str>,
        sig: &Signature,
        now_ms: u64,
    ) -> Result<String, Refusal> {
        let op = self
            .verifier
            .verify(&sig.cert, SystemTime::now())
            .map_err(Refusal::Cert)?;
        let msg = message(kind, name, sig.signed_at_ms, body);
        UnparsedPublicKey::new(&signature::ECDSA_P256_SHA256_ASN1, &op.public_key)
            .verify(&msg, &sig.sig)
            .map_err(|_| Refusal::BadSignature)?;
        if sig.signed_at_ms > now_ms.saturating_add(MAX_AHEAD_MS) {
            return Err(Refusal::ClockAhead {
                ahead_ms: sig.signed_at_ms - now_ms,
            });
        }
        Ok(op.id())
    }

    /// [`Trust::verify`] for a record a peer sent: also requires the
    /// version's wall part to be the signed timestamp, so an old signed body
    /// cannot be presented as a newer version.
    pub fn verify_record(
        &self,
        kind: Kind,
        name: &str,
        body: Option<&str>,
        version: &Version,
        sig: Option<&Signature>,
        now_ms: u64,
    ) -> Result<String, Refusal> {
        let sig = sig.ok_or(Refusal::Unsigned)?;
        if version.wall_ms != sig.signed_at_ms {
            return Err(Refusal::VersionMismatch {
                version: version.to_string(),
                signed_at_ms: sig.signed_at_ms,
            });
        }
        self.verify(kind, name, body, sig, now_ms)
    }
}

/// Reads a signature from the HTTP headers of a write; `Ok(None)` when the
/// request carries none of them.
pub fn from_headers(headers: &http::HeaderMap) -> Result<Option<Signature>, Refusal> {
    let get = |h: &str| headers.get(h).map(|v| v.to_str().map(str::trim));
    let (cert, at, sig) = (
        get(HEADER_CERT),
        get(HEADER_SIGNED_AT),
        get(HEADER_SIGNATURE),
    );
    if cert.is_none() && at.is_none() && sig.is_none() {
        return Ok(None);
    }
    fn need<'a>(
        v: Option<Result<&'a str, http::header::ToStrError>>,
        h: &str,
    ) -> Result<&'a str, Refusal> {
        v.ok_or_else(|| Refusal::Malformed(format!("{h} header missing")))?
            .map_err(|_| Refusal::Malformed(format!("{h} header is not ASCII")))
    }
    let cert = unhex(need(cert, HEADER_CERT)?)
        .ok_or_else(|| Refusal::Malformed(format!("{HEADER_CERT}: not hex")))?;
    let signed_at_ms = need(at, HEADER_SIGNED_AT)?.parse::<u64>().map_err(|_| {
        Refusal::Malformed(format!(
            "{HEADER_SIGNED_AT}: not milliseconds since the epoch"
        ))
    })?;
    let sig = unhex(need(sig, HEADER_SIGNATURE)?)
        .ok_or_else(|| Refusal::Malformed(format!("{HEADER_SIGNATURE}: not hex")))?;
    Ok(Some(Signature {
        cert,
        signed_at_ms,
        sig,
    }))
}

/// The headers carrying `sig`.
pub fn to_headers(sig: &Signature) -> Vec<(&'static str, String)> {
    vec![
        (HEADER_CERT, hex(&sig.cert)),
        (HEADER_SIGNED_AT, sig.signed_at_ms.to_string()),
        (HEADER_SIGNATURE, hex(&sig.sig)),
    ]
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) || s.len() > 16 * 1024 {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

/// An operator's signing key and certificate, as `shoal cert issue-operator`
/// writes them (`operator.pem`, `operator.key`).
pub struct OperatorKey {
    cert: Vec<u8>,
    key: EcdsaKeyPair,
}

impl std::fmt::Debug for OperatorKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OperatorKey").finish_non_exhaustive()
    }
}

impl OperatorKey {
    /// Loads `dir/operator.pem` and `dir/operator.key`.
    pub fn load(dir: &Path) -> Result<Self, String> {
        let read = |f: &str| {
            let p = dir.join(f);
            std::fs::read_to_string(&p).map_err(|e| format!("{}: {e}", p.display()))
        };
        let cert_pem = read(transport::certs::OPERATOR_CERT)?;
        let key_pem = read(transport::certs::OPERATOR_KEY)?;
        let cert = pem_block(&cert_pem, "CERTIFICATE").ok_or_else(|| {
            format!(
                "{}: no PEM certificate",
                dir.join(transport::certs::OPERATOR_CERT).display()
            )
        })?;
        let pkcs8 = pem_block(&key_pem, "PRIVATE KEY").ok_or_else(|| {
            format!(
                "{}: no PKCS#8 PEM private key",
                dir.join(transport::certs::OPERATOR_KEY).display()
            )
        })?;
        Self::from_der(cert, &pkcs8)
    }

    /// From a DER certificate and a PKCS#8 DER P-256 key.
    pub fn from_der(cert: Vec<u8>, pkcs8: &[u8]) -> Result<Self, String> {
        let rng = ring::rand::SystemRandom::new();
        let key = EcdsaKeyPair::from_pkcs8(&signature::ECDSA_P256_SHA256_ASN1_SIGNING, pkcs8, &rng)
            .map_err(|e| format!("operator key: not an ECDSA P-256 PKCS#8 key ({e})"))?;
        Ok(OperatorKey { cert, key })
    }

    /// The certificate, DER.
    pub fn cert_der(&self) -> &[u8] {
        &self.cert
    }

    /// The public key (uncompressed point).
    pub fn public_key(&self) -> &[u8] {
        self.key.public_key().as_ref()
    }

    /// Signs a write of `kind/name` with `body` (`None`: a delete) at `signed_at_ms`.
    pub fn sign_at(
        &self,
        kind: Kind,
        name: &str,
        body: Option<&str>,
        signed_at_ms: u64,
    ) -> Signature {
        let rng = ring::rand::SystemRandom::new();
        let msg = message(kind, name, signed_at_ms, body);
        let sig = self
            .key
            .sign(&rng, &msg)
            .map(|s| s.as_ref().to_vec())
            .unwrap_or_default();
        Signature {
            cert: self.cert.clone(),
            signed_at_ms,
            sig,
        }
    }

    /// Signs at the current time.
    pub fn sign(&self, kind: Kind, name: &str, body: Option<&str>) -> Signature {
        self.sign_at(kind, name, body, now_ms())
    }
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// The DER inside the first `-----BEGIN <label>-----` block of `pem`.
fn pem_block(pem: &str, label: &str) -> Option<Vec<u8>> {
    let begin = format!("-----BEGIN {label}-----");
    let end = format!("-----END {label}-----");
    let start = pem.find(&begin)? + begin.len();
    let stop = start + pem[start..].find(&end)?;
    let b64: String = pem[start..stop]
        .chars()
        .filter(|c| !c.is_whitespace())
        .collect();
    base64_decode(&b64)
}

fn base64_decode(s: &str) -> Option<Vec<u8>> {
    let val = |c: u8| -> Option<u32> {
        Some(match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => return None,
        } as u32)
    };
    let bytes = s.trim_end_matches('=').as_bytes();
    let mut out = Vec::with_capacity(bytes.len() * 3 / 4);
    for chunk in bytes.chunks(4) {
        let mut acc = 0u32;
        for (i, &c) in chunk.iter().enumerate() {
            acc |= val(c)? << (18 - 6 * i);
        }
        let n = match chunk.len() {
            4 => 3,
            3 => 2,
            2 => 1,
            _ => return None,
        };
        for i in 0..n {
            out.push((acc >> (16 - 8 * i)) as u8);
        }
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use transport::certs::{Ca, Validity};

    fn operator(ca: &Ca, name: &str) -> OperatorKey {
        let dir = tempfile::tempdir().unwrap();
        let cert = ca.issue_operator(name, Validity::days(1)).unwrap();
        transport::certs::write_operator_dir(dir.path(), &ca.cert_pem(), &cert, false).unwrap();
        OperatorKey::load(dir.path()).unwrap()
    }

    #[test]
    fn signatures_verify_and_any_change_breaks_them() {
        transport::install_crypto_provider();
        let ca = Ca::generate("t.shoal", 1).unwrap();
        let trust = Trust::new(ca.cert_pem().as_bytes(), "t.shoal").unwrap();
        let alice = operator(&ca, "alice");
        let now = now_ms();
        let body = "kind: RateLimit";
        let sig = alice.sign_at(Kind::RateLimit, "a", Some(body), now);
        assert_eq!(
            trust.verify(Kind::RateLimit, "a", Some(body), &sig, now),
            Ok("spiffe://t.shoal/operator/alice".to_string())
        );
        // Another body, name, kind, time, or a delete: refused.
        let bad = Err(Refusal::BadSignature);
        assert_eq!(
            trust.verify(Kind::RateLimit, "a", Some("x"), &sig, now),
            bad
        );
        assert_eq!(
            trust.verify(Kind::RateLimit, "b", Some(body), &sig, now),
            bad
        );
        assert_eq!(
            trust.verify(Kind::HttpRoute, "a", Some(body), &sig, now),
            bad
        );
        assert_eq!(trust.verify(Kind::RateLimit, "a", None, &sig, now), bad);
        let mut later = sig.clone();
        later.signed_at_ms += 1;
        assert_eq!(
            trust.verify(Kind::RateLimit, "a", Some(body), &later, now),
            bad
        );
        // A foreign CA's operator.
        let other = Ca::generate("t.shoal", 1).unwrap();
        let mallory = operator(&other, "alice");
        let forged = mallory.sign_at(Kind::RateLimit, "a", Some(body), now);
        assert_eq!(
            trust
                .verify(Kind::RateLimit, "a", Some(body), &forged, now)
                .unwrap_err()
                .reason(),
            "unknown_ca"
        );
        // Far future, and a record whose version is not its signed time.
        let ahead = alice.sign_at(Kind::RateLimit, "a", Some(body), now + MAX_AHEAD_MS + 1000);
        assert!(matches!(
            trust.verify(Kind::RateLimit, "a", Some(body), &ahead, now),
            Err(Refusal::ClockAhead { .. })
        ));
        let v: Version = format!("{}.0@n1", now + 5).parse().unwrap();
        assert!(matches!(
            trust.verify_record(Kind::RateLimit, "a", Some(body), &v, Some(&sig), now),
            Err(Refusal::VersionMismatch { .. })
        ));
        let v: Version = format!("{now}.3@n1").parse().unwrap();
        assert!(
            trust
                .verify_record(Kind::RateLimit, "a", Some(body), &v, Some(&sig), now)
                .is_ok()
        );
        assert_eq!(
            trust.verify_record(Kind::RateLimit, "a", Some(body), &v, None, now),
            Err(Refusal::Unsigned)
        );
    }

    #[test]
    fn headers_round_trip_and_garbage_is_malformed() {
        let sig = Signature {
            cert: vec![1, 2, 0xff],
            signed_at_ms: 42,
            sig: vec![9, 8],
        };
        let mut h = http::HeaderMap::new();
        assert_eq!(from_headers(&h), Ok(None));
        for (k, v) in to_headers(&sig) {
            h.insert(k, v.parse().unwrap());
        }
        assert_eq!(from_headers(&h), Ok(Some(sig)));
        h.insert(HEADER_SIGNATURE, "zz".parse().unwrap());
        assert!(matches!(from_headers(&h), Err(Refusal::Malformed(_))));
        h.remove(HEADER_SIGNED_AT);
        assert!(matches!(from_headers(&h), Err(Refusal::Malformed(_))));
        assert_eq!(base64_decode("aGVsbG8="), Some(b"hello".to_vec()));
    }
}
