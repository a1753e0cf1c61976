//! A deliberately careless QUIC client for negative tests: it presents a
//! certificate but accepts any server certificate, as an attacker's would.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use rustls::DigitallySignedStruct;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};

#[derive(Debug)]
struct AcceptAnything;

impl ServerCertVerifier for AcceptAnything {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        _: &[u8],
        _: &CertificateDer<'_>,
        _: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Ok(HandshakeSignatureValid::assertion())
    }
    fn verify_tls13_signature(
        &self,
        _: &[u8],
        _: &CertificateDer<'_>,
        _: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Ok(HandshakeSignatureValid::assertion())
    }
    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        rustls::crypto::ring::default_provider()
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// Dials `addr` with the certificate in `dir`, not verifying the server, and
/// opens a stream so the server's verdict on our certificate is seen.
pub async fn dial_without_verifying(dir: &Path, addr: SocketAddr) -> Result<(), String> {
    transport::install_crypto_provider();
    let pem = std::fs::read(dir.join("node.pem")).map_err(|e| e.to_string())?;
    let chain: Vec<_> = rustls_pemfile::certs(&mut &pem[..])
        .filter_map(Result::ok)
        .collect();
    let key_pem = std::fs::read(dir.join("node.key")).map_err(|e| e.to_string())?;
    let key = rustls_pemfile::private_key(&mut &key_pem[..])
        .map_err(|e| e.to_string())?
        .ok_or("no key")?;
    let mut tls = rustls::ClientConfig::builder()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AcceptAnything))
        .with_client_auth_cert(chain, key)
        .map_err(|e| e.to_string())?;
    tls.alpn_protocols = vec![transport::ALPN.to_vec()];
    let crypto =
        quinn::crypto::rustls::QuicClientConfig::try_from(tls).map_err(|e| e.to_string())?;
    let client = quinn::ClientConfig::new(Arc::new(crypto));
    let endpoint =
        quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).map_err(|e| e.to_string())?;
    let result = async {
        let conn = endpoint
            .connect_with(client, addr, "shoal.mesh")
            .map_err(|e| e.to_string())?
            .await
            .map_err(|e| e.to_string())?;
        let (mut send, mut recv) = conn.open_bi().await.map_err(|e| e.to_string())?;
        send.write_all(b"hello").await.map_err(|e| e.to_string())?;
        send.finish().map_err(|e| e.to_string())?;
        recv.read_to_end(16).await.map_err(|e| e.to_string())?;
        Ok(())
    }
    .await;
    endpoint.close(0u32.into(), b"");
    result
}
