//! The mesh CA, node certificates and operator certificates (`shoal cert
//! init` / `shoal cert issue` / `shoal cert issue-operator`).
//!
//! An operator certificate names `spiffe://<td>/operator/<name>` and nothing
//! else: it carries no node SAN, so the mesh's TLS verifier refuses it as a
//! QUIC peer, and only the clientAuth usage, so it cannot serve either. Its
//! key signs policy writes; [`OperatorVerifier`] checks such a certificate
//! against the mesh CA.
//!
//! Keys are ECDSA P-256 signing with SHA-256. A CA is valid for
//! [`DEFAULT_CA_DAYS`] days and a node certificate for [`DEFAULT_NODE_DAYS`]
//! unless told otherwise. Key files are written with mode 0600 and nothing is
//! overwritten without `force`.

use std::fs;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose, PKCS_ECDSA_P256_SHA256, SanType,
};
use time::{Duration, OffsetDateTime};

/// Default CA validity, in days (10 years).
pub const DEFAULT_CA_DAYS: u32 = 3650;
/// Default node certificate validity, in days.
pub const DEFAULT_NODE_DAYS: u32 = 365;
/// File names inside a CA folder.
pub const CA_CERT: &str = "ca.pem";
/// CA private key file name.
pub const CA_KEY: &str = "ca.key";
/// Node certificate file name inside a node folder.
pub const NODE_CERT: &str = "node.pem";
/// Node private key file name inside a node folder.
pub const NODE_KEY: &str = "node.key";
/// Operator certificate file name inside an operator folder.
pub const OPERATOR_CERT: &str = "operator.pem";
/// Operator private key file name inside an operator folder.
pub const OPERATOR_KEY: &str = "operator.key";
/// Default operator certificate validity, in days.
pub const DEFAULT_OPERATOR_DAYS: u32 = 90;

/// Errors from certificate tooling.
#[derive(Debug, thiserror::Error)]
pub enum CertError {
    #[error("{0} already exists (pass --force to overwrite)")]
    Exists(PathBuf),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("certificate generation failed: {0}")]
    Generate(#[from] rcgen::Error),
    #[error("{0} is not a Shoal CA certificate (no spiffe://<trust-domain> URI SAN)")]
    NotMeshCa(PathBuf),
    #[error("invalid name {0:?}: use letters, digits, '-', '_' and '.' (1-63 chars)")]
    InvalidName(String),
}

/// A mesh certificate authority held in memory.
pub struct Ca {
    cert: rcgen::Certificate,
    key: KeyPair,
    trust_domain: String,
}

/// A node certificate and its key, PEM encoded.
#[derive(Debug, Clone)]
pub struct NodeCert {
    /// PEM certificate.
    pub cert_pem: String,
    /// PEM PKCS#8 private key.
    pub key_pem: String,
}

/// Validity window for an issued certificate.
#[derive(Debug, Clone, Copy)]
pub struct Validity {
    /// Start of validity.
    pub not_before: OffsetDateTime,
    /// End of validity.
    pub not_after: OffsetDateTime,
}

impl Validity {
    /// Valid from one hour ago (tolerates clock skew) for `days` days.
    pub fn days(days: u32) -> Self {
        let now = OffsetDateTime::now_utc();
        Validity {
            not_before: now - Duration::hours(1),
            not_after: now + Duration::days(i64::from(days)),
        }
    }
}

impl Ca {
    /// Generates a new CA for `trust_domain`.
    pub fn generate(trust_domain: &str, days: u32) -> Result<Self, CertError> {
        check_name(trust_domain)?;
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, format!("Shoal mesh CA {trust_domain}"));
        dn.push(DnType::OrganizationName, "Shoal");
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        params.subject_alt_names = vec![uri_san(&format!("spiffe://{trust_domain}"))?];
        let v = Validity::days(days);
        params.not_before = v.not_before;
        params.not_after = v.not_after;
        let cert = params.self_signed(&key)?;
        Ok(Ca {
            cert,
            key,
            trust_domain: trust_domain.to_string(),
        })
    }

    /// Loads a CA from `dir/ca.pem` and `dir/ca.key`.
    pub fn load(dir: &Path) -> Result<Self, CertError> {
        let cert_path = dir.join(CA_CERT);
        let cert_pem = read(&cert_path)?;
        let key_pem = read(&dir.join(CA_KEY))?;
        let key = KeyPair::from_pem(&key_pem)?;
        let params = CertificateParams::from_ca_cert_pem(&cert_pem)?;
        let trust_domain = params
            .subject_alt_names
            .iter()
            .find_map(|san| match san {
                SanType::URI(uri) => uri.as_str().strip_prefix("spiffe://").map(str::to_string),
                _ => None,
            })
            .ok_or_else(|| CertError::NotMeshCa(cert_path.clone()))?;
        // Re-signing with the same key and subject yields an issuer identical
        // for chain building; the original PEM stays the trust anchor on disk.
        let cert = params.self_signed(&key)?;
        Ok(Ca {
            cert,
            key,
            trust_domain,
        })
    }

    /// The trust domain this CA signs for.
    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    /// The CA certificate, PEM encoded (as generated; see [`Ca::load`]).
    pub fn cert_pem(&self) -> String {
        self.cert.pem()
    }

    /// Issues a node certificate naming `node` and `services`.
    pub fn issue(
        &self,
        node: &str,
        services: &[String],
        validity: Validity,
    ) -> Result<NodeCert, CertError> {
        check_name(node)?;
        for s in services {
            check_name(s)?;
        }
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, node);
        dn.push(DnType::OrganizationName, "Shoal");
        params.distinguished_name = dn;
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.use_authority_key_identifier_extension = true;
        let td = &self.trust_domain;
        let mut sans = vec![uri_san(&format!("spiffe://{td}/node/{node}"))?];
        for s in services {
            sans.push(uri_san(&format!("spiffe://{td}/svc/{s}"))?);
        }
        params.subject_alt_names = sans;
        params.not_before = validity.not_before;
        params.not_after = validity.not_after;
        let cert = params.signed_by(&key, &self.cert, &self.key)?;
        Ok(NodeCert {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }

    /// Issues an operator certificate naming `spiffe://<td>/operator/<name>`:
    /// clientAuth only, no node or service SAN.
    pub fn issue_operator(&self, name: &str, validity: Validity) -> Result<NodeCert, CertError> {
        check_name(name)?;
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, format!("operator {name}"));
        dn.push(DnType::OrganizationName, "Shoal");
        params.distinguished_name = dn;
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        params.use_authority_key_identifier_extension = true;
        params.subject_alt_names = vec![uri_san(&format!(
            "spiffe://{}/operator/{name}",
            self.trust_domain
        ))?];
        params.not_before = validity.not_before;
        params.not_after = validity.not_after;
        let cert = params.signed_by(&key, &self.cert, &self.key)?;
        Ok(NodeCert {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }

    /// Writes `ca.pem` and `ca.key` into `dir`.
    pub fn write(&self, dir: &Path, force: bool) -> Result<(), CertError> {
        let cert_path = dir.join(CA_CERT);
        let key_path = dir.join(CA_KEY);
        refuse_existing(&[&cert_path, &key_path], force)?;
        mkdir(dir)?;
        write_file(&cert_path, self.cert.pem().as_bytes(), 0o644)?;
        write_file(&key_path, self.key.serialize_pem().as_bytes(), 0o600)
    }
}

/// `shoal cert init`: makes a new CA in `out`.
pub fn init_ca(out: &Path, trust_domain: &str, days: u32, force: bool) -> Result<Ca, CertError> {
    refuse_existing(&[&out.join(CA_CERT), &out.join(CA_KEY)], force)?;
    let ca = Ca::generate(trust_domain, days)?;
    ca.write(out, force)?;
    Ok(ca)
}

/// `shoal cert issue`: issues a node certificate from the CA in `ca_dir`
/// into `out/{ca.pem,node.pem,node.key}`.
pub fn issue_node(
    ca_dir: &Path,
    node: &str,
    services: &[String],
    out: &Path,
    validity: Validity,
    force: bool,
) -> Result<(), CertError> {
    let ca_pem = read(&ca_dir.join(CA_CERT))?;
    let ca = Ca::load(ca_dir)?;
    let files = [out.join(CA_CERT), out.join(NODE_CERT), out.join(NODE_KEY)];
    refuse_existing(&files.iter().collect::<Vec<_>>(), force)?;
    let cert = ca.issue(node, services, validity)?;
    write_node_dir(out, &ca_pem, &cert, force)
}

/// Writes a node folder: `ca.pem`, `node.pem`, `node.key` (0600).
pub fn write_node_dir(
    out: &Path,
    ca_pem: &str,
    cert: &NodeCert,
    force: bool,
) -> Result<(), CertError> {
    let files = [out.join(CA_CERT), out.join(NODE_CERT), out.join(NODE_KEY)];
    refuse_existing(&files.iter().collect::<Vec<_>>(), force)?;
    mkdir(out)?;
    write_file(&files[0], ca_pem.as_bytes(), 0o644)?;
    // Key first, then certificate: a reloader that sees the new certificate
    // also finds its key.
    write_file(&files[2], cert.key_pem.as_bytes(), 0o600)?;
    write_file(&files[1], cert.cert_pem.as_bytes(), 0o644)
}

/// `shoal cert issue-operator`: issues an operator certificate from the CA in
/// `ca_dir` into `out/{ca.pem,operator.pem,operator.key}` (key 0600).
pub fn issue_operator(
    ca_dir: &Path,
    name: &str,
    out: &Path,
    validity: Validity,
    force: bool,
) -> Result<(), CertError> {
    let ca_pem = read(&ca_dir.join(CA_CERT))?;
    let ca = Ca::load(ca_dir)?;
    let files = [
        out.join(CA_CERT),
        out.join(OPERATOR_CERT),
        out.join(OPERATOR_KEY),
    ];
    refuse_existing(&files.iter().collect::<Vec<_>>(), force)?;
    let cert = ca.issue_operator(name, validity)?;
    write_operator_dir(out, &ca_pem, &cert, force)
}

/// Writes an operator folder: `ca.pem`, `operator.pem`, `operator.key` (0600).
pub fn write_operator_dir(
    out: &Path,
    ca_pem: &str,
    cert: &NodeCert,
    force: bool,
) -> Result<(), CertError> {
    let files = [
        out.join(CA_CERT),
        out.join(OPERATOR_CERT),
        out.join(OPERATOR_KEY),
    ];
    refuse_existing(&files.iter().collect::<Vec<_>>(), force)?;
    mkdir(out)?;
    write_file(&files[0], ca_pem.as_bytes(), 0o644)?;
    write_file(&files[2], cert.key_pem.as_bytes(), 0o600)?;
    write_file(&files[1], cert.cert_pem.as_bytes(), 0o644)
}

/// What one certificate says about itself: subject, URI SANs and end of
/// validity (for expiry metrics, `shoal check` and `shoal cert renew`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertSummary {
    /// The subject's common name (or the whole subject if it has none).
    pub subject: String,
    /// Every URI SAN, in certificate order.
    pub uris: Vec<String>,
    /// End of validity, seconds since the Unix epoch.
    pub not_after: i64,
    /// Whether it is a CA certificate.
    pub is_ca: bool,
}

impl CertSummary {
    /// Days from `now_unix` until it expires (negative once expired).
    pub fn days_left(&self, now_unix: i64) -> i64 {
        (self.not_after - now_unix).div_euclid(86_400)
    }
}

/// Summaries of every certificate in a PEM file (`ca.pem` may hold several:
/// two CAs are trusted while the CA itself is rotated).
pub fn summarize_pem_file(path: &Path) -> Result<Vec<CertSummary>, CertError> {
    let pem = fs::read(path).map_err(|source| CertError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let bad = |msg: &str| CertError::Io {
        path: path.to_path_buf(),
        source: std::io::Error::new(std::io::ErrorKind::InvalidData, msg.to_string()),
    };
    let mut out = Vec::new();
    for der in rustls_pemfile::certs(&mut &pem[..]) {
        let der = der.map_err(|_| bad("unreadable PEM block"))?;
        out.push(summarize_der(&der).ok_or_else(|| bad("not a DER X.509 certificate"))?);
    }
    if out.is_empty() {
        return Err(bad("holds no certificate"));
    }
    Ok(out)
}

/// The first certificate in a PEM file, DER encoded.
pub fn first_cert_der(path: &Path) -> Result<Vec<u8>, CertError> {
    let pem = fs::read(path).map_err(|source| CertError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    rustls_pemfile::certs(&mut &pem[..])
        .find_map(Result::ok)
        .map(|d| d.to_vec())
        .ok_or_else(|| CertError::Io {
            path: path.to_path_buf(),
            source: std::io::Error::new(std::io::ErrorKind::InvalidData, "holds no certificate"),
        })
}

/// The summary of one DER certificate, or `None` if it does not parse.
pub fn summarize_der(der: &[u8]) -> Option<CertSummary> {
    use x509_parser::extensions::GeneralName;
    use x509_parser::prelude::{FromDer, X509Certificate};
    let (_, cert) = X509Certificate::from_der(der).ok()?;
    let subject = cert
        .subject()
        .iter_common_name()
        .next()
        .and_then(|cn| cn.as_str().ok())
        .map(str::to_string)
        .unwrap_or_else(|| cert.subject().to_string());
    let uris = cert
        .subject_alternative_name()
        .ok()
        .flatten()
        .map(|ext| {
            ext.value
                .general_names
                .iter()
                .filter_map(|n| match n {
                    GeneralName::URI(u) => Some(u.to_string()),
                    _ => None,
                })
                .collect()
        })
        .unwrap_or_default();
    Some(CertSummary {
        subject,
        uris,
        not_after: cert.validity().not_after.timestamp(),
        is_ca: cert.is_ca(),
    })
}

/// What `shoal cert renew` did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Renewed {
    /// The node the certificate names.
    pub node: String,
    /// The services it names.
    pub services: Vec<String>,
    /// End of validity of the new certificate, seconds since the Unix epoch.
    pub not_after: i64,
}

/// `shoal cert renew`: reissues the node certificate in `certs_dir` from the
/// CA in `ca_dir` with the same node and service names and a new key,
/// replacing `node.key` then `node.pem` (each written whole, by rename) so a
/// running node picks it up by hot reload. `ca.pem` in `certs_dir` is left
/// as it is; the CA must be one it already trusts, or the running node would
/// refuse the new certificate.
pub fn renew_node(
    ca_dir: &Path,
    certs_dir: &Path,
    validity: Validity,
) -> Result<Renewed, CertError> {
    let invalid = |path: PathBuf, msg: String| CertError::Io {
        path,
        source: std::io::Error::new(std::io::ErrorKind::InvalidData, msg),
    };
    let node_path = certs_dir.join(NODE_CERT);
    let node_pem = fs::read(&node_path).map_err(|source| CertError::Io {
        path: node_path.clone(),
        source,
    })?;
    let der = rustls_pemfile::certs(&mut &node_pem[..])
        .find_map(Result::ok)
        .ok_or_else(|| invalid(node_path.clone(), "holds no certificate".into()))?;
    let id =
        crate::Identity::from_der(&der).map_err(|e| invalid(node_path.clone(), e.to_string()))?;
    let ca = Ca::load(ca_dir)?;
    if ca.trust_domain() != id.trust_domain {
        return Err(invalid(
            node_path,
            format!(
                "names trust domain {:?} but the CA in {} signs for {:?}",
                id.trust_domain,
                ca_dir.display(),
                ca.trust_domain()
            ),
        ));
    }
    let signing_ca = read(&ca_dir.join(CA_CERT))?;
    let signing_der: Vec<Vec<u8>> = rustls_pemfile::certs(&mut signing_ca.as_bytes())
        .filter_map(Result::ok)
        .map(|d| d.to_vec())
        .collect();
    let trusted_path = certs_dir.join(CA_CERT);
    let trusted = read(&trusted_path)?;
    let trusted_der: Vec<Vec<u8>> = rustls_pemfile::certs(&mut trusted.as_bytes())
        .filter_map(Result::ok)
        .map(|d| d.to_vec())
        .collect();
    if !signing_der.iter().any(|d| trusted_der.contains(d)) {
        return Err(invalid(
            trusted_path,
            format!(
                "does not hold the CA certificate of {}; add it first (two CAs may be trusted at once: append it to this file)",
                ca_dir.display()
            ),
        ));
    }
    let cert = ca.issue(&id.node, &id.services, validity)?;
    write_file(&certs_dir.join(NODE_KEY), cert.key_pem.as_bytes(), 0o600)?;
    write_file(&node_path, cert.cert_pem.as_bytes(), 0o644)?;
    Ok(Renewed {
        node: id.node,
        services: id.services,
        not_after: validity.not_after.unix_timestamp(),
    })
}

/// An operator as a verified certificate names it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Operator {
    /// Trust domain.
    pub trust_domain: String,
    /// Operator name (`spiffe://<td>/operator/<name>`).
    pub name: String,
    /// The certificate's public key: an uncompressed P-256 point (SEC 1),
    /// what `ring`'s ECDSA verification takes.
    pub public_key: Vec<u8>,
}

impl Operator {
    /// `spiffe://<td>/operator/<name>`.
    pub fn id(&self) -> String {
        format!("spiffe://{}/operator/{}", self.trust_domain, self.name)
    }
}

/// Why an operator certificate was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OperatorCertError {
    /// Not valid DER X.509.
    #[error("operator certificate is not valid DER X.509")]
    Malformed,
    /// Does not chain to the mesh CA.
    #[error("operator certificate is not signed by this mesh's CA")]
    UnknownCa,
    /// Outside its validity window.
    #[error("operator certificate is expired or not yet valid")]
    Expired,
    /// Chains, but fails another WebPKI check (key usage...).
    #[error("operator certificate refused: {0}")]
    Invalid(String),
    /// No `spiffe://<td>/operator/<name>` SAN (e.g. a node certificate).
    #[error(
        "certificate has no spiffe://<trust-domain>/operator/<name> URI SAN (not an operator certificate)"
    )]
    NotOperator,
    /// An operator SAN of another trust domain.
    #[error("operator certificate belongs to trust domain {found:?}, expected {expected:?}")]
    ForeignTrustDomain {
        /// Ours.
        expected: String,
        /// Theirs.
        found: String,
    },
}

impl OperatorCertError {
    /// Stable label value for metrics.
    pub fn reason(&self) -> &'static str {
        match self {
            OperatorCertError::Malformed => "malformed_cert",
            OperatorCertError::UnknownCa => "unknown_ca",
            OperatorCertError::Expired => "cert_expired",
            OperatorCertError::Invalid(_) => "invalid_cert",
            OperatorCertError::NotOperator => "not_operator",
            OperatorCertError::ForeignTrustDomain { .. } => "foreign_trust_domain",
        }
    }
}

/// Checks operator certificates against the mesh CA and trust domain.
pub struct OperatorVerifier {
    webpki: std::sync::Arc<dyn rustls::server::danger::ClientCertVerifier>,
    trust_domain: String,
}

impl std::fmt::Debug for OperatorVerifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OperatorVerifier")
            .field("trust_domain", &self.trust_domain)
            .finish()
    }
}

impl OperatorVerifier {
    /// A verifier trusting the CA certificates in `ca_pem` for `trust_domain`.
    pub fn new(ca_pem: &[u8], trust_domain: &str) -> Result<Self, CertError> {
        let bad = |e: String| CertError::Io {
            path: PathBuf::from(CA_CERT),
            source: std::io::Error::new(std::io::ErrorKind::InvalidData, e),
        };
        let mut roots = rustls::RootCertStore::empty();
        for c in rustls_pemfile::certs(&mut &ca_pem[..]).filter_map(Result::ok) {
            roots.add(c).map_err(|e| bad(e.to_string()))?;
        }
        if roots.is_empty() {
            return Err(bad("no CA certificate".into()));
        }
        let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
        let webpki = rustls::server::WebPkiClientVerifier::builder_with_provider(
            std::sync::Arc::new(roots),
            provider,
        )
        .build()
        .map_err(|e| bad(e.to_string()))?;
        Ok(OperatorVerifier {
            webpki,
            trust_domain: trust_domain.to_string(),
        })
    }

    /// The trust domain operators must belong to.
    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    /// Verifies `der` at `now`: chains to the CA, is within validity, and
    /// names exactly one operator in our trust domain.
    pub fn verify(
        &self,
        der: &[u8],
        now: std::time::SystemTime,
    ) -> Result<Operator, OperatorCertError> {
        use rustls::CertificateError as CE;
        use x509_parser::extensions::GeneralName;
        use x509_parser::prelude::{FromDer, X509Certificate};
        let (_, cert) = X509Certificate::from_der(der).map_err(|_| OperatorCertError::Malformed)?;
        let end = rustls_pki_types::CertificateDer::from(der);
        let unix = rustls_pki_types::UnixTime::since_unix_epoch(
            now.duration_since(std::time::UNIX_EPOCH)
                .unwrap_or_default(),
        );
        if let Err(e) = self.webpki.verify_client_cert(&end, &[], unix) {
            return Err(match e {
                rustls::Error::InvalidCertificate(CE::UnknownIssuer | CE::BadSignature) => {
                    OperatorCertError::UnknownCa
                }
                rustls::Error::InvalidCertificate(
                    CE::Expired
                    | CE::ExpiredContext { .. }
                    | CE::NotValidYet
                    | CE::NotValidYetContext { .. },
                ) => OperatorCertError::Expired,
                other => OperatorCertError::Invalid(other.to_string()),
            });
        }
        let mut operator: Option<(String, String)> = None;
        let mut other_identity = false;
        if let Ok(Some(san)) = cert.subject_alternative_name() {
            for name in &san.value.general_names {
                let GeneralName::URI(uri) = name else {
                    continue;
                };
                let Some((domain, path)) = uri
                    .strip_prefix("spiffe://")
                    .and_then(|r| r.split_once('/'))
                else {
                    continue;
                };
                match path.strip_prefix("operator/") {
                    Some(n) if operator.is_none() && !n.is_empty() && !n.contains('/') => {
                        operator = Some((domain.to_string(), n.to_string()))
                    }
                    _ => other_identity = true,
                }
            }
        }
        // A certificate that is also a node or service is not an operator's.
        let (domain, name) = match operator {
            Some(o) if !other_identity => o,
            _ => return Err(OperatorCertError::NotOperator),
        };
        if domain != self.trust_domain {
            return Err(OperatorCertError::ForeignTrustDomain {
                expected: self.trust_domain.clone(),
                found: domain,
            });
        }
        let public_key = cert.public_key().subject_public_key.data.to_vec();
        Ok(Operator {
            trust_domain: domain,
            name,
            public_key,
        })
    }
}

fn check_name(name: &str) -> Result<(), CertError> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        && !name.starts_with(['-', '.']);
    if ok {
        Ok(())
    } else {
        Err(CertError::InvalidName(name.to_string()))
    }
}

fn uri_san(uri: &str) -> Result<SanType, CertError> {
    Ok(SanType::URI(uri.try_into()?))
}

fn refuse_existing(paths: &[&PathBuf], force: bool) -> Result<(), CertError> {
    if force {
        return Ok(());
    }
    match paths.iter().find(|p| p.exists()) {
        Some(p) => Err(CertError::Exists((*p).clone())),
        None => Ok(()),
    }
}

fn mkdir(dir: &Path) -> Result<(), CertError> {
    fs::create_dir_all(dir).map_err(|source| CertError::Io {
        path: dir.to_path_buf(),
        source,
    })
}

fn read(path: &Path) -> Result<String, CertError> {
    fs::read_to_string(path).map_err(|source| CertError::Io {
        path: path.to_path_buf(),
        source,
    })
}

/// Writes through a temporary file and renames, so readers never see half a file.
fn write_file(path: &Path, data: &[u8], mode: u32) -> Result<(), CertError> {
    let io = |source| CertError::Io {
        path: path.to_path_buf(),
        source,
    };
    let tmp = path.with_extension("tmp");
    let _ = fs::remove_file(&tmp);
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&tmp)
        .map_err(io)?;
    f.write_all(data).map_err(io)?;
    f.sync_all().map_err(io)?;
    fs::rename(&tmp, path).map_err(io)
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;
    use crate::Identity;

    #[test]
    fn init_then_issue_writes_files_with_modes_and_refuses_overwrite() {
        let dir = tempfile::tempdir().unwrap();
        let ca_dir = dir.path().join("certs");
        init_ca(&ca_dir, "demo.shoal", DEFAULT_CA_DAYS, false).unwrap();
        let mode = fs::metadata(ca_dir.join(CA_KEY))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        assert!(matches!(
            init_ca(&ca_dir, "demo.shoal", DEFAULT_CA_DAYS, false),
            Err(CertError::Exists(_))
        ));

        let out = ca_dir.join("n1");
        let svcs = vec!["web".to_string()];
        issue_node(&ca_dir, "n1", &svcs, &out, Validity::days(1), false).unwrap();
        let mode = fs::metadata(out.join(NODE_KEY))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        assert!(matches!(
            issue_node(&ca_dir, "n1", &svcs, &out, Validity::days(1), false),
            Err(CertError::Exists(_))
        ));
        issue_node(&ca_dir, "n1", &svcs, &out, Validity::days(1), true).unwrap();

        let pem = fs::read(out.join(NODE_CERT)).unwrap();
        let der = rustls_pemfile::certs(&mut &pem[..])
            .next()
            .unwrap()
            .unwrap();
        let id = Identity::from_der(&der).unwrap();
        assert_eq!(id.node, "n1");
        assert_eq!(id.trust_domain, "demo.shoal");
        assert_eq!(id.services, vec!["web"]);
    }

    #[test]
    fn rejects_bad_names() {
        let ca = Ca::generate("t", 1).unwrap();
        assert!(matches!(
            ca.issue("a/b", &[], Validity::days(1)),
            Err(CertError::InvalidName(_))
        ));
    }

    fn der_of(pem: &str) -> Vec<u8> {
        rustls_pemfile::certs(&mut pem.as_bytes())
            .next()
            .unwrap()
            .unwrap()
            .to_vec()
    }

    #[test]
    fn operator_certificates_verify_only_against_their_ca_and_are_not_nodes() {
        crate::install_crypto_provider();
        let ca = Ca::generate("demo.shoal", 1).unwrap();
        let v = OperatorVerifier::new(ca.cert_pem().as_bytes(), "demo.shoal").unwrap();
        let now = std::time::SystemTime::now();
        let alice = ca.issue_operator("alice", Validity::days(1)).unwrap();
        let der = der_of(&alice.cert_pem);
        let op = v.verify(&der, now).unwrap();
        assert_eq!(op.id(), "spiffe://demo.shoal/operator/alice");
        assert_eq!(op.public_key.len(), 65);
        // Not usable as a node.
        assert_eq!(
            Identity::from_der(&der.clone().into()),
            Err(crate::IdentityError::NoNodeSan)
        );
        // A node certificate is not an operator's.
        let node = ca.issue("n1", &[], Validity::days(1)).unwrap();
        assert_eq!(
            v.verify(&der_of(&node.cert_pem), now),
            Err(OperatorCertError::NotOperator)
        );
        // Another CA's operator, and an expired one.
        let other = Ca::generate("demo.shoal", 1).unwrap();
        let mallory = other.issue_operator("alice", Validity::days(1)).unwrap();
        assert_eq!(
            v.verify(&der_of(&mallory.cert_pem), now),
            Err(OperatorCertError::UnknownCa)
        );
        let later = now + std::time::Duration::from_secs(3 * 86_400);
        assert_eq!(v.verify(&der, later), Err(OperatorCertError::Expired));
        let foreign = OperatorVerifier::new(ca.cert_pem().as_bytes(), "other.shoal").unwrap();
        assert!(matches!(
            foreign.verify(&der, now),
            Err(OperatorCertError::ForeignTrustDomain { .. })
        ));
    }

    #[test]
    fn issue_operator_writes_a_private_key_and_refuses_overwrite() {
        let dir = tempfile::tempdir().unwrap();
        let ca_dir = dir.path().join("ca");
        init_ca(&ca_dir, "demo.shoal", 1, false).unwrap();
        let out = dir.path().join("alice");
        issue_operator(&ca_dir, "alice", &out, Validity::days(1), false).unwrap();
        let mode = fs::metadata(out.join(OPERATOR_KEY))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        assert!(matches!(
            issue_operator(&ca_dir, "alice", &out, Validity::days(1), false),
            Err(CertError::Exists(_))
        ));
        issue_operator(&ca_dir, "alice", &out, Validity::days(1), true).unwrap();
    }

    #[test]
    fn renew_keeps_the_names_replaces_the_key_and_refuses_an_untrusted_ca() {
        let dir = tempfile::tempdir().unwrap();
        let ca_dir = dir.path().join("ca");
        init_ca(&ca_dir, "demo.shoal", 30, false).unwrap();
        let out = dir.path().join("n1");
        let svcs = vec!["web".to_string(), "api".to_string()];
        issue_node(&ca_dir, "n1", &svcs, &out, Validity::days(2), false).unwrap();
        let old_key = fs::read(out.join(NODE_KEY)).unwrap();
        let before = summarize_pem_file(&out.join(NODE_CERT)).unwrap();
        let now = time::OffsetDateTime::now_utc().unix_timestamp();
        assert!((1..=2).contains(&before[0].days_left(now)));

        let r = renew_node(&ca_dir, &out, Validity::days(10)).unwrap();
        assert_eq!(r.node, "n1");
        assert_eq!(r.services, svcs);
        let after = summarize_pem_file(&out.join(NODE_CERT)).unwrap();
        assert_eq!(after[0].uris, before[0].uris);
        assert!((9..=10).contains(&after[0].days_left(now)));
        assert_ne!(fs::read(out.join(NODE_KEY)).unwrap(), old_key);
        let mode = fs::metadata(out.join(NODE_KEY))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);

        // A CA the folder does not trust is refused, and nothing changes.
        let other = dir.path().join("other");
        init_ca(&other, "demo.shoal", 30, false).unwrap();
        let pem = fs::read(out.join(NODE_CERT)).unwrap();
        let err = renew_node(&other, &out, Validity::days(10)).unwrap_err();
        assert!(err.to_string().contains("does not hold the CA"), "{err}");
        assert_eq!(fs::read(out.join(NODE_CERT)).unwrap(), pem);
        // So is a CA of another trust domain.
        let foreign = dir.path().join("foreign");
        init_ca(&foreign, "other.shoal", 30, false).unwrap();
        let err = renew_node(&foreign, &out, Validity::days(10)).unwrap_err();
        assert!(err.to_string().contains("trust domain"), "{err}");

        // Once the second CA is appended to ca.pem (CA rotation), it may renew.
        let mut bundle = fs::read_to_string(out.join(CA_CERT)).unwrap();
        bundle.push_str(&fs::read_to_string(other.join(CA_CERT)).unwrap());
        fs::write(out.join(CA_CERT), &bundle).unwrap();
        let cas = summarize_pem_file(&out.join(CA_CERT)).unwrap();
        assert_eq!(cas.len(), 2);
        assert!(
            cas.iter()
                .all(|c| c.is_ca && c.uris == ["spiffe://demo.shoal"])
        );
        renew_node(&other, &out, Validity::days(10)).unwrap();
    }
}
