//! Operators for tests: an operator certificate from the test PKI, and
//! signed policy writes through a node's admin API, as `shoal policy` sends them.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use node::policy::trust::{self, OperatorKey};
use node::policy::{Kind, Signature};
use transport::certs::{Validity, write_operator_dir};

use crate::{Pki, admin_request};

/// An operator: its certificate folder and signing key.
pub struct Operator {
    /// The folder holding `ca.pem`, `operator.pem`, `operator.key`.
    pub dir: PathBuf,
    key: OperatorKey,
}

impl Pki {
    /// Issues a one-day operator certificate for `name` into `<tmp>/operator-<name>`.
    pub fn operator(&self, name: &str) -> Operator {
        let dir = self.path().join(format!("operator-{name}"));
        let cert = self
            .ca()
            .issue_operator(name, Validity::days(1))
            .expect("issue operator");
        write_operator_dir(&dir, &self.ca().cert_pem(), &cert, true).expect("write operator");
        Operator::load(&dir)
    }
}

impl Operator {
    /// Loads an operator folder.
    pub fn load(dir: &Path) -> Self {
        Operator {
            dir: dir.to_path_buf(),
            key: OperatorKey::load(dir).expect("load operator key"),
        }
    }

    /// A signer from any certificate and its PKCS#8 key, copied into `dir`
    /// (e.g. a node's own, for tests that a node certificate cannot sign policy).
    pub fn from_pem_files(dir: &Path, cert_pem: &Path, key_pem: &Path) -> Self {
        std::fs::create_dir_all(dir).expect("mkdir");
        std::fs::copy(cert_pem, dir.join("operator.pem")).expect("copy cert");
        std::fs::copy(key_pem, dir.join("operator.key")).expect("copy key");
        Self::load(dir)
    }

    /// The key.
    pub fn key(&self) -> &OperatorKey {
        &self.key
    }

    /// A signature over a write (`body: None` is a delete) at `signed_at_ms`.
    pub fn sign_at(&self, kind: Kind, name: &str, body: Option<&str>, at: u64) -> Signature {
        self.key.sign_at(kind, name, body, at)
    }

    /// The signature headers for a write, signed now.
    pub fn headers(
        &self,
        kind: Kind,
        name: &str,
        body: Option<&str>,
    ) -> Vec<(&'static str, String)> {
        trust::to_headers(&self.key.sign(kind, name, body))
    }

    /// A signed PUT of `body` to `admin` (`query` may be empty or `?wait=all`).
    pub async fn put(
        &self,
        admin: SocketAddr,
        kind: &str,
        name: &str,
        body: &str,
        query: &str,
        extra: &[(&str, &str)],
    ) -> (u16, String) {
        let k: Kind = kind.parse().unwrap_or(Kind::RateLimit);
        let signed = self.headers(k, name, Some(body));
        let mut headers: Vec<(&str, &str)> = Vec::new();
        if !extra
            .iter()
            .any(|(k, _)| k.eq_ignore_ascii_case("content-type"))
        {
            headers.push(("content-type", "application/yaml"));
        }
        headers.extend(signed.iter().map(|(k, v)| (*k, v.as_str())));
        headers.extend_from_slice(extra);
        admin_request(
            admin,
            "PUT",
            &format!("/v1/policies/{kind}/{name}{query}"),
            &headers,
            body,
        )
        .await
    }

    /// A signed DELETE.
    pub async fn delete(
        &self,
        admin: SocketAddr,
        kind: &str,
        name: &str,
        query: &str,
    ) -> (u16, String) {
        let k: Kind = kind.parse().unwrap_or(Kind::RateLimit);
        let signed = self.headers(k, name, None);
        let headers: Vec<(&str, &str)> = signed.iter().map(|(k, v)| (*k, v.as_str())).collect();
        admin_request(
            admin,
            "DELETE",
            &format!("/v1/policies/{kind}/{name}{query}"),
            &headers,
            "",
        )
        .await
    }
}
