//! Node identities read from certificate URI SANs.
//!
//! A mesh certificate names its node as `spiffe://<trust-domain>/node/<name>`
//! and each service the node may serve or call as
//! `spiffe://<trust-domain>/svc/<service>`.

use std::fmt;

use rustls_pki_types::CertificateDer;
use x509_parser::extensions::GeneralName;
use x509_parser::prelude::{FromDer, X509Certificate};

/// Who a certificate says its holder is.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Identity {
    /// Trust domain, e.g. `demo.shoal`.
    pub trust_domain: String,
    /// Node name from the `node/<name>` SAN.
    pub node: String,
    /// Services from `svc/<service>` SANs, in certificate order.
    pub services: Vec<String>,
}

/// Why a certificate does not carry a usable identity.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum IdentityError {
    #[error("certificate is not valid DER X.509")]
    Malformed,
    #[error("certificate has no spiffe://<trust-domain>/node/<name> URI SAN")]
    NoNodeSan,
    #[error("certificate has more than one node SAN")]
    SeveralNodeSans,
    #[error("certificate belongs to trust domain {found:?}, expected {expected:?}")]
    ForeignTrustDomain { expected: String, found: String },
}

impl Identity {
    /// Reads the identity from a DER certificate.
    pub fn from_der(der: &CertificateDer<'_>) -> Result<Self, IdentityError> {
        let (_, cert) = X509Certificate::from_der(der).map_err(|_| IdentityError::Malformed)?;
        let mut uris = Vec::new();
        if let Ok(Some(san)) = cert.subject_alternative_name() {
            for name in &san.value.general_names {
                if let GeneralName::URI(uri) = name {
                    uris.push((*uri).to_string());
                }
            }
        }
        Self::from_uris(&uris)
    }

    /// Builds an identity from SPIFFE URIs (the node URI is required).
    pub fn from_uris(uris: &[String]) -> Result<Self, IdentityError> {
        let mut node: Option<(String, String)> = None;
        let mut services = Vec::new();
        let mut svc_domains = Vec::new();
        for uri in uris {
            let Some(rest) = uri.strip_prefix("spiffe://") else {
                continue;
            };
            let Some((domain, path)) = rest.split_once('/') else {
                continue;
            };
            if let Some(name) = path.strip_prefix("node/") {
                if node.is_some() {
                    return Err(IdentityError::SeveralNodeSans);
                }
                node = Some((domain.to_string(), name.to_string()));
            } else if let Some(svc) = path.strip_prefix("svc/") {
                services.push(svc.to_string());
                svc_domains.push(domain.to_string());
            }
        }
        let (trust_domain, node) = node.ok_or(IdentityError::NoNodeSan)?;
        if let Some(found) = svc_domains.into_iter().find(|d| *d != trust_domain) {
            return Err(IdentityError::ForeignTrustDomain {
                expected: trust_domain,
                found,
            });
        }
        Ok(Identity {
            trust_domain,
            node,
            services,
        })
    }

    /// The node's SPIFFE ID.
    pub fn node_id(&self) -> String {
        format!("spiffe://{}/node/{}", self.trust_domain, self.node)
    }

    /// SPIFFE IDs of the services this identity may serve or call as.
    pub fn service_ids(&self) -> impl Iterator<Item = String> + '_ {
        self.services
            .iter()
            .map(|s| format!("spiffe://{}/svc/{}", self.trust_domain, s))
    }

    /// Whether this identity names `service`.
    pub fn may_serve(&self, service: &str) -> bool {
        self.services.iter().any(|s| s == service)
    }
}

impl fmt::Display for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.node_id())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn uris(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn reads_node_and_services() {
        let id = Identity::from_uris(&uris(&[
            "spiffe://demo.shoal/node/n1",
            "spiffe://demo.shoal/svc/web",
            "spiffe://demo.shoal/svc/api",
        ]))
        .unwrap();
        assert_eq!(id.node, "n1");
        assert_eq!(id.trust_domain, "demo.shoal");
        assert_eq!(id.services, vec!["web", "api"]);
        assert!(id.may_serve("web"));
        assert!(!id.may_serve("db"));
        assert_eq!(id.to_string(), "spiffe://demo.shoal/node/n1");
    }

    #[test]
    fn requires_exactly_one_node_san_in_one_domain() {
        assert_eq!(
            Identity::from_uris(&uris(&["spiffe://demo.shoal/svc/web"])),
            Err(IdentityError::NoNodeSan)
        );
        assert_eq!(
            Identity::from_uris(&uris(&["spiffe://a/node/x", "spiffe://a/node/y"])),
            Err(IdentityError::SeveralNodeSans)
        );
        assert!(matches!(
            Identity::from_uris(&uris(&["spiffe://a/node/x", "spiffe://b/svc/web"])),
            Err(IdentityError::ForeignTrustDomain { .. })
        ));
    }
}
