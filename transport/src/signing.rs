//! Signing with a mesh key, and verifying what a certificate holder signed.
//!
//! TLS proves who is at the other end of a connection; it says nothing about
//! bytes that were relayed. Gossip and policy travel through third parties, so
//! each value carries a signature made with its author's certificate key, and
//! readers check the certificate against the mesh CA before trusting the
//! signature. This module is the primitive both use: [`Signer`] (a node's or an
//! operator's key, ECDSA P-256 / SHA-256, ASN.1 signatures) and [`CertChecker`]
//! (chain to the mesh CA at a given time, then the SPIFFE identity).

use std::fs;
use std::path::Path;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use ring::rand::SystemRandom;
use ring::signature::{
    ECDSA_P256_SHA256_ASN1, ECDSA_P256_SHA256_ASN1_SIGNING, EcdsaKeyPair, UnparsedPublicKey,
};
use rustls::RootCertStore;
use rustls::server::WebPkiClientVerifier;
use rustls::server::danger::ClientCertVerifier;
use rustls_pki_types::{CertificateDer, PrivatePkcs8KeyDer, UnixTime};
use x509_parser::prelude::{FromDer, X509Certificate};

use crate::identity::Identity;

/// Why a signing key or a signed value was refused.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum SignError {
    /// A file could not be read.
    #[error("{path}: {detail}")]
    Io { path: String, detail: String },
    /// The key is not a PKCS#8 ECDSA P-256 key matching the certificate.
    #[error("{0}: not a PKCS#8 ECDSA P-256 private key")]
    BadKey(String),
    /// The certificate does not chain to the mesh CA (or is outside its validity).
    #[error("certificate refused: {0}")]
    Chain(String),
    /// The certificate carries no usable identity.
    #[error("certificate identity: {0}")]
    Identity(String),
    /// The signature does not verify.
    #[error("bad signature")]
    BadSignature,
}

/// A certificate's key, able to sign.
pub struct Signer {
    key: EcdsaKeyPair,
    cert: CertificateDer<'static>,
    rng: SystemRandom,
}

impl std::fmt::Debug for Signer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Signer").finish_non_exhaustive()
    }
}

impl Signer {
    /// Reads `cert_pem` (the first certificate is the signer's) and `key_pem`
    /// (PKCS#8, as `shoal cert` writes it).
    pub fn from_files(cert_pem: &Path, key_pem: &Path) -> Result<Self, SignError> {
        let io = |p: &Path, e: std::io::Error| SignError::Io {
            path: p.display().to_string(),
            detail: e.to_string(),
        };
        let cert = fs::read(cert_pem).map_err(|e| io(cert_pem, e))?;
        let key = fs::read(key_pem).map_err(|e| io(key_pem, e))?;
        Self::from_pem(&cert, &key).map_err(|e| match e {
            SignError::BadKey(_) => SignError::BadKey(key_pem.display().to_string()),
            other => other,
        })
    }

    /// Builds a signer from PEM text.
    pub fn from_pem(cert_pem: &[u8], key_pem: &[u8]) -> Result<Self, SignError> {
        let cert = rustls_pemfile::certs(&mut &cert_pem[..])
            .find_map(Result::ok)
            .ok_or_else(|| SignError::Identity("no certificate in PEM".into()))?;
        let key = rustls_pemfile::pkcs8_private_keys(&mut &key_pem[..])
            .find_map(Result::ok)
            .ok_or_else(|| SignError::BadKey("key".into()))?;
        Self::from_der(cert, key)
    }

    /// Builds a signer from DER.
    pub fn from_der(
        cert: CertificateDer<'static>,
        key: PrivatePkcs8KeyDer<'_>,
    ) -> Result<Self, SignError> {
        let rng = SystemRandom::new();
        let key = EcdsaKeyPair::from_pkcs8(
            &ECDSA_P256_SHA256_ASN1_SIGNING,
            key.secret_pkcs8_der(),
            &rng,
        )
        .map_err(|_| SignError::BadKey("key".into()))?;
        let public = public_key_of(&cert)?;
        if ring::signature::KeyPair::public_key(&key).as_ref() != public.as_slice() {
            return Err(SignError::BadKey(
                "key does not match the certificate".into(),
            ));
        }
        Ok(Signer { key, cert, rng })
    }

    /// Signs `message`.
    pub fn sign(&self, message: &[u8]) -> Vec<u8> {
        self.key
            .sign(&self.rng, message)
            .map(|s| s.as_ref().to_vec())
            .unwrap_or_default()
    }

    /// The signer's certificate (DER).
    pub fn cert_der(&self) -> &CertificateDer<'static> {
        &self.cert
    }
}

/// A certificate that chains to the mesh CA, with what readers need from it.
#[derive(Debug, Clone)]
pub struct CheckedCert {
    /// The SPIFFE identity (node or operator name, services).
    pub identity: Identity,
    /// The raw public key (uncompressed EC point).
    pub public_key: Vec<u8>,
    /// End of validity, seconds since the epoch.
    pub not_after: i64,
}

impl CheckedCert {
    /// Verifies `signature` over `message` with this certificate's key.
    pub fn verify(&self, message: &[u8], signature: &[u8]) -> Result<(), SignError> {
        verify_with_key(&self.public_key, message, signature)
    }

    /// Whether the certificate is still valid at `now`.
    pub fn valid_at(&self, now: SystemTime) -> bool {
        let secs = now
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs() as i64)
            .unwrap_or(0);
        secs <= self.not_after
    }
}

/// Verifies an ECDSA P-256 / SHA-256 signature with a raw public key.
pub fn verify_with_key(
    public_key: &[u8],
    message: &[u8],
    signature: &[u8],
) -> Result<(), SignError> {
    UnparsedPublicKey::new(&ECDSA_P256_SHA256_ASN1, public_key)
        .verify(message, signature)
        .map_err(|_| SignError::BadSignature)
}

/// Checks certificates against the mesh CA.
#[derive(Clone)]
pub struct CertChecker {
    webpki: Arc<dyn ClientCertVerifier>,
    trust_domain: String,
}

impl std::fmt::Debug for CertChecker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CertChecker")
            .field("trust_domain", &self.trust_domain)
            .finish()
    }
}

impl CertChecker {
    /// A checker trusting the CA certificates in `ca_pem` for `trust_domain`.
    pub fn new(ca_pem: &[u8], trust_domain: &str) -> Result<Self, SignError> {
        let mut roots = RootCertStore::empty();
        for c in rustls_pemfile::certs(&mut &ca_pem[..]).filter_map(Result::ok) {
            roots
                .add(c)
                .map_err(|e| SignError::Chain(format!("CA certificate: {e}")))?;
        }
        if roots.is_empty() {
            return Err(SignError::Chain("no CA certificate".into()));
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let webpki = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
            .build()
            .map_err(|e| SignError::Chain(e.to_string()))?;
        Ok(CertChecker {
            webpki,
            trust_domain: trust_domain.to_string(),
        })
    }

    /// Reads `ca.pem` from a certificate folder; the trust domain is the one
    /// in `node.pem` beside it.
    pub fn from_dir(dir: &Path) -> Result<Self, SignError> {
        let read = |f: &str| {
            let p = dir.join(f);
            fs::read(&p).map_err(|e| SignError::Io {
                path: p.display().to_string(),
                detail: e.to_string(),
            })
        };
        let ca = read("ca.pem")?;
        let node = read("node.pem")?;
        let cert = rustls_pemfile::certs(&mut &node[..])
            .find_map(Result::ok)
            .ok_or_else(|| SignError::Identity("node.pem holds no certificate".into()))?;
        let id = Identity::from_der(&cert).map_err(|e| SignError::Identity(e.to_string()))?;
        Self::new(&ca, &id.trust_domain)
    }

    /// The trust domain.
    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    /// Checks a node certificate at `now`: chain to the CA, validity, exactly
    /// one node SAN in our trust domain.
    pub fn check_node(&self, der: &[u8], now: SystemTime) -> Result<CheckedCert, SignError> {
        let der = CertificateDer::from(der.to_vec());
        self.chain(&der, now)?;
        let identity = Identity::from_der(&der).map_err(|e| SignError::Identity(e.to_string()))?;
        if identity.trust_domain != self.trust_domain {
            return Err(SignError::Identity(format!(
                "trust domain {:?}, expected {:?}",
                identity.trust_domain, self.trust_domain
            )));
        }
        let (public_key, not_after) = key_and_expiry(&der)?;
        Ok(CheckedCert {
            identity,
            public_key,
            not_after,
        })
    }

    /// Only the chain and validity at `now` (for certificates whose SANs the
    /// caller checks itself, such as operator certificates).
    pub fn check_chain(&self, der: &[u8], now: SystemTime) -> Result<(Vec<u8>, i64), SignError> {
        let der = CertificateDer::from(der.to_vec());
        self.chain(&der, now)?;
        key_and_expiry(&der)
    }

    fn chain(&self, der: &CertificateDer<'_>, now: SystemTime) -> Result<(), SignError> {
        let secs = now
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        self.webpki
            .verify_client_cert(
                der,
                &[],
                UnixTime::since_unix_epoch(std::time::Duration::from_secs(secs)),
            )
            .map(|_| ())
            .map_err(|e| SignError::Chain(e.to_string()))
    }
}

fn public_key_of(der: &CertificateDer<'_>) -> Result<Vec<u8>, SignError> {
    key_and_expiry(der).map(|(k, _)| k)
}

fn key_and_expiry(der: &CertificateDer<'_>) -> Result<(Vec<u8>, i64), SignError> {
    let (_, cert) = X509Certificate::from_der(der)
        .map_err(|_| SignError::Identity("certificate is not valid DER X.509".into()))?;
    let key = cert.public_key().subject_public_key.data.to_vec();
    Ok((key, cert.validity().not_after.timestamp()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::certs::{Ca, Validity};

    fn signer_for(ca: &Ca, name: &str) -> Signer {
        let cert = ca.issue(name, &["web".into()], Validity::days(1)).unwrap();
        Signer::from_pem(cert.cert_pem.as_bytes(), cert.key_pem.as_bytes()).unwrap()
    }

    #[test]
    fn a_signature_verifies_only_with_the_signers_certificate() {
        crate::install_crypto_provider();
        let ca = Ca::generate("t.shoal", 1).unwrap();
        let checker = CertChecker::new(ca.cert_pem().as_bytes(), "t.shoal").unwrap();
        let a = signer_for(&ca, "a");
        let b = signer_for(&ca, "b");
        let sig = a.sign(b"hello");
        let now = SystemTime::now();
        let ca_a = checker.check_node(a.cert_der(), now).unwrap();
        let ca_b = checker.check_node(b.cert_der(), now).unwrap();
        assert_eq!(ca_a.identity.node, "a");
        ca_a.verify(b"hello", &sig).unwrap();
        assert_eq!(ca_a.verify(b"hellO", &sig), Err(SignError::BadSignature));
        assert_eq!(ca_b.verify(b"hello", &sig), Err(SignError::BadSignature));
    }

    #[test]
    fn a_foreign_ca_is_refused() {
        crate::install_crypto_provider();
        let ours = Ca::generate("t.shoal", 1).unwrap();
        let theirs = Ca::generate("t.shoal", 1).unwrap();
        let checker = CertChecker::new(ours.cert_pem().as_bytes(), "t.shoal").unwrap();
        let rogue = signer_for(&theirs, "a");
        assert!(matches!(
            checker.check_node(rogue.cert_der(), SystemTime::now()),
            Err(SignError::Chain(_))
        ));
    }
}
