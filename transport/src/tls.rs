//! rustls configuration for mesh mTLS: only the mesh CA is trusted, both
//! sides must present a certificate with a node SAN in our trust domain, and
//! every refusal is counted by reason.

use std::fmt;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::WebPkiClientVerifier;
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{
    CertificateError, DigitallySignedStruct, DistinguishedName, RootCertStore, SignatureScheme,
};

use crate::certs::{CA_CERT, NODE_CERT, NODE_KEY};
use crate::{ALPN, Identity, IdentityError};

/// Why a peer's certificate was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RefusalReason {
    /// Not signed by the mesh CA (unknown issuer, or a bad signature from
    /// an issuer with our CA's name).
    UnknownCa,
    /// Outside its validity window.
    Expired,
    /// No `spiffe://<td>/node/<name>` SAN, or more than one.
    NoNodeSan,
    /// A node SAN from another trust domain.
    ForeignTrustDomain,
    /// Anything else (bad encoding, bad signature, wrong key usage...).
    Invalid,
}

impl RefusalReason {
    /// All reasons, for exporting zeroed counters.
    pub const ALL: [RefusalReason; 5] = [
        RefusalReason::UnknownCa,
        RefusalReason::Expired,
        RefusalReason::NoNodeSan,
        RefusalReason::ForeignTrustDomain,
        RefusalReason::Invalid,
    ];

    /// Stable label value for metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            RefusalReason::UnknownCa => "unknown_ca",
            RefusalReason::Expired => "expired",
            RefusalReason::NoNodeSan => "no_node_san",
            RefusalReason::ForeignTrustDomain => "foreign_trust_domain",
            RefusalReason::Invalid => "invalid",
        }
    }

    fn of_rustls(err: &rustls::Error) -> Self {
        match err {
            rustls::Error::InvalidCertificate(e) => match e {
                // A chain that names our CA's subject but fails its signature
                // check was not signed by our CA either.
                CertificateError::UnknownIssuer | CertificateError::BadSignature => {
                    RefusalReason::UnknownCa
                }
                CertificateError::Expired
                | CertificateError::ExpiredContext { .. }
                | CertificateError::NotValidYet
                | CertificateError::NotValidYetContext { .. } => RefusalReason::Expired,
                _ => RefusalReason::Invalid,
            },
            _ => RefusalReason::Invalid,
        }
    }
}

/// Handshake refusal counters, shared by every verifier of one endpoint.
#[derive(Debug, Default)]
pub struct Refusals {
    counts: [AtomicU64; 5],
}

impl Refusals {
    /// Count of refusals for `reason`.
    pub fn count(&self, reason: RefusalReason) -> u64 {
        self.counts[Self::index(reason)].load(Ordering::Relaxed)
    }

    fn record(&self, reason: RefusalReason) {
        self.counts[Self::index(reason)].fetch_add(1, Ordering::Relaxed);
    }

    fn index(reason: RefusalReason) -> usize {
        RefusalReason::ALL
            .iter()
            .position(|r| *r == reason)
            .unwrap_or(4)
    }
}

/// Errors loading TLS material.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{0}: no PEM certificate found")]
    NoCertificate(PathBuf),
    #[error("{0}: no PEM private key found")]
    NoKey(PathBuf),
    #[error("{path}: {source}")]
    Identity {
        path: PathBuf,
        source: IdentityError,
    },
    #[error("TLS configuration: {0}")]
    Rustls(#[from] rustls::Error),
    #[error("CA certificate rejected: {0}")]
    Verifier(String),
    #[error("{cert} is not signed by the CA in {ca}")]
    NotSignedByCa { cert: PathBuf, ca: PathBuf },
}

/// A node's certificate folder: `ca.pem`, `node.pem`, `node.key`.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    /// The folder.
    pub dir: PathBuf,
}

/// Everything built from one read of a [`TlsFiles`] folder.
pub(crate) struct TlsMaterial {
    pub identity: Identity,
    pub server: rustls::ServerConfig,
    pub client: rustls::ClientConfig,
}

impl TlsFiles {
    /// A certificate folder at `dir`.
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        TlsFiles { dir: dir.into() }
    }

    /// A fingerprint of the three files (modification times, sizes and
    /// contents), for change detection. Contents count because file systems
    /// with coarse timestamps can give a file rewritten within the same tick
    /// the same modification time; the files are a few kilobytes.
    pub(crate) fn stamp(&self) -> Option<u64> {
        use std::hash::{Hash, Hasher};
        let mut h = std::collections::hash_map::DefaultHasher::new();
        let mut any = false;
        for f in [CA_CERT, NODE_CERT, NODE_KEY] {
            let path = self.dir.join(f);
            if let Ok(m) = fs::metadata(&path) {
                any = true;
                m.modified().ok().hash(&mut h);
                m.len().hash(&mut h);
                if m.len() <= 1 << 20 {
                    fs::read(&path).ok().hash(&mut h);
                }
            }
        }
        any.then(|| h.finish())
    }

    /// Reads and checks the files, and builds server and client configs.
    pub(crate) fn load(&self, refusals: &Arc<Refusals>) -> Result<TlsMaterial, TlsError> {
        let ca_path = self.dir.join(CA_CERT);
        let cert_path = self.dir.join(NODE_CERT);
        let key_path = self.dir.join(NODE_KEY);
        let ca = read_certs(&ca_path)?;
        let chain = read_certs(&cert_path)?;
        let key = read_key(&key_path)?;
        let identity = Identity::from_der(&chain[0]).map_err(|source| TlsError::Identity {
            path: cert_path.clone(),
            source,
        })?;

        let mut roots = RootCertStore::empty();
        for c in ca {
            roots.add(c)?;
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let webpki = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
            .build()
            .map_err(|e| TlsError::Verifier(e.to_string()))?;
        // Our own certificate must come from the folder's CA: a mixed set
        // of files (another mesh's CA, or a copy caught half way) is refused
        // rather than used. Validity is not checked here; peers refuse an
        // expired certificate and count it.
        if let Err(e) = webpki.verify_client_cert(&chain[0], &chain[1..], UnixTime::now())
            && RefusalReason::of_rustls(&e) == RefusalReason::UnknownCa
        {
            return Err(TlsError::NotSignedByCa {
                cert: cert_path,
                ca: ca_path,
            });
        }
        let verifier = Arc::new(MeshVerifier {
            webpki,
            trust_domain: identity.trust_domain.clone(),
            refusals: refusals.clone(),
        });

        let mut server = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_client_cert_verifier(verifier.clone())
            .with_single_cert(chain.clone(), key.clone_key())?;
        server.alpn_protocols = vec![ALPN.to_vec()];
        server.max_early_data_size = 0;

        let mut client = rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .dangerous()
            .with_custom_certificate_verifier(verifier)
            .with_client_auth_cert(chain, key)?;
        client.alpn_protocols = vec![ALPN.to_vec()];

        Ok(TlsMaterial {
            identity,
            server,
            client,
        })
    }
}

fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem = fs::read(path).map_err(|source| TlsError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let certs: Vec<_> = rustls_pemfile::certs(&mut &pem[..])
        .filter_map(Result::ok)
        .collect();
    if certs.is_empty() {
        return Err(TlsError::NoCertificate(path.to_path_buf()));
    }
    Ok(certs)
}

fn read_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let pem = fs::read(path).map_err(|source| TlsError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    rustls_pemfile::private_key(&mut &pem[..])
        .ok()
        .flatten()
        .ok_or_else(|| TlsError::NoKey(path.to_path_buf()))
}

/// Verifies a peer (either side) against the mesh CA and our trust domain.
///
/// Chains are checked by rustls' WebPKI verifier for client authentication;
/// mesh node certificates carry both the serverAuth and clientAuth usages, so
/// the same check serves when we dial. Server names are not used: peers are
/// identified by their SPIFFE node SAN, not DNS.
struct MeshVerifier {
    webpki: Arc<dyn ClientCertVerifier>,
    trust_domain: String,
    refusals: Arc<Refusals>,
}

impl fmt::Debug for MeshVerifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MeshVerifier")
            .field("trust_domain", &self.trust_domain)
            .finish()
    }
}

impl MeshVerifier {
    fn verify(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<(), rustls::Error> {
        if let Err(e) = self
            .webpki
            .verify_client_cert(end_entity, intermediates, now)
        {
            self.refuse(RefusalReason::of_rustls(&e), &e.to_string());
            return Err(e);
        }
        match Identity::from_der(end_entity) {
            Ok(id) if id.trust_domain == self.trust_domain => Ok(()),
            Ok(id) => {
                let msg = format!("peer trust domain {:?}", id.trust_domain);
                self.refuse(RefusalReason::ForeignTrustDomain, &msg);
                Err(rustls::Error::General(msg))
            }
            Err(e) => {
                let reason = match e {
                    IdentityError::ForeignTrustDomain { .. } => RefusalReason::ForeignTrustDomain,
                    IdentityError::Malformed => RefusalReason::Invalid,
                    _ => RefusalReason::NoNodeSan,
                };
                self.refuse(reason, &e.to_string());
                Err(rustls::Error::General(e.to_string()))
            }
        }
    }

    fn refuse(&self, reason: RefusalReason, detail: &str) {
        self.refusals.record(reason);
        tracing::warn!(reason = reason.as_str(), detail, "refused peer certificate");
    }
}

impl ClientCertVerifier for MeshVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.webpki.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.verify(end_entity, intermediates, now)?;
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.webpki.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.webpki.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.webpki.supported_verify_schemes()
    }
}

impl ServerCertVerifier for MeshVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        self.verify(end_entity, intermediates, now)?;
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.webpki.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.webpki.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.webpki.supported_verify_schemes()
    }
}
