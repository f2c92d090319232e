//! TLS on the ingest listener (rustls, `ring` provider): `HTTP_TLS_CERT_FILE` and
//! `HTTP_TLS_KEY_FILE` turn on HTTPS; `HTTP_TLS_CLIENT_CA_FILE` turns on mutual TLS, where a
//! client without a certificate signed by one of those CAs is refused during the handshake.
//!
//! The three files are [`Watched`]: when one changes (cert-manager renewing the Secret) or on
//! SIGHUP the whole server configuration is built again, and every new connection takes the
//! configuration in force when it arrives, so new connections get the new certificate (and
//! the new client CAs) while open ones finish on the old. A certificate and key that do not
//! match, or a file that cannot be read, keep the old configuration.
//!
//! [`TlsListener`] does the handshakes off the accept loop (at most [`MAX_HANDSHAKES`] at
//! once, each within [`HANDSHAKE_TIMEOUT`]) and hands finished TLS streams to axum. A
//! plain-HTTP request on the HTTPS port gets a plain `400` with a JSON error saying to use
//! https, and the connection is closed: no hang, no garbage.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, Semaphore};
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;

use super::watch::{Summary, Watched};
use crate::config::HttpConfig;

/// Handshakes in progress at most; the accept loop waits above it.
pub(crate) const MAX_HANDSHAKES: usize = 512;
/// Time a client has from connecting to a finished handshake.
pub(crate) const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// The ingest listener's TLS configuration, as loaded from its files.
pub(crate) struct TlsConfig {
    config: Arc<ServerConfig>,
    chain: usize,
    client_cas: Option<usize>,
}

impl Summary for TlsConfig {
    fn summary(&self) -> String {
        match self.client_cas {
            Some(n) => format!(
                "a chain of {} certificates, mutual TLS with {n} client CAs",
                self.chain
            ),
            None => format!("a chain of {} certificates", self.chain),
        }
    }
}

/// The TLS files of the configuration, watched for changes; `None` without
/// `HTTP_TLS_CERT_FILE` (plain HTTP).
///
/// # Errors
/// An unreadable file, no certificate or key in it, a key that does not match the
/// certificate, a client CA file without a usable CA certificate.
pub(crate) fn load(http: &HttpConfig) -> Result<Option<Arc<Watched<TlsConfig>>>, String> {
    let (Some(cert), Some(key)) = (&http.tls_cert_file, &http.tls_key_file) else {
        return Ok(None);
    };
    let files = Files {
        cert: cert.into(),
        key: key.into(),
        client_ca: http.tls_client_ca_file.as_ref().map(PathBuf::from),
    };
    let mut paths = vec![files.cert.clone(), files.key.clone()];
    paths.extend(files.client_ca.clone());
    let watched = Watched::load("tls", paths, move || build(&files))?;
    Ok(Some(Arc::new(watched)))
}

struct Files {
    cert: PathBuf,
    key: PathBuf,
    client_ca: Option<PathBuf>,
}

fn read(var: &str, path: &Path) -> Result<Vec<u8>, String> {
    std::fs::read(path).map_err(|e| format!("{var}={}: cannot read: {e}", path.display()))
}

fn certificates(var: &str, path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let at = || format!("{var}={}", path.display());
    let pem = read(var, path)?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("{}: malformed PEM: {e}", at()))?;
    if certs.is_empty() {
        return Err(format!(
            "{}: no PEM certificate in it (-----BEGIN CERTIFICATE-----)",
            at()
        ));
    }
    Ok(certs)
}

/// Builds the server configuration from the files.
fn build(files: &Files) -> Result<TlsConfig, String> {
    const CERT: &str = "HTTP_TLS_CERT_FILE";
    const KEY: &str = "HTTP_TLS_KEY_FILE";
    const CA: &str = "HTTP_TLS_CLIENT_CA_FILE";
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let chain = certificates(CERT, &files.cert)?;
    let key_at = format!("{KEY}={}", files.key.display());
    let key = PrivateKeyDer::from_pem_slice(&read(KEY, &files.key)?).map_err(|e| match e {
        rustls::pki_types::pem::Error::NoItemsFound => {
            format!("{key_at}: no PEM private key in it (PKCS#8, PKCS#1 or SEC1, unencrypted)")
        }
        e => format!("{key_at}: malformed PEM: {e}"),
    })?;
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS: {e}"))?;
    let (builder, client_cas) = match &files.client_ca {
        None => (builder.with_no_client_auth(), None),
        Some(path) => {
            let at = format!("{CA}={}", path.display());
            let mut roots = RootCertStore::empty();
            let (added, _) = roots.add_parsable_certificates(certificates(CA, path)?);
            if added == 0 {
                return Err(format!("{at}: no usable CA certificate in it"));
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(roots.into(), provider)
                .build()
                .map_err(|e| format!("{at}: {e}"))?;
            (builder.with_client_cert_verifier(verifier), Some(added))
        }
    };
    let n = chain.len();
    let mut config = builder.with_single_cert(chain, key).map_err(|e| match e {
        rustls::Error::InconsistentKeys(_) => format!(
            "{key_at} is not the private key of the certificate in {CERT}={}",
            files.cert.display()
        ),
        e => format!(
            "{CERT}={} with {key_at}: unusable: {e}",
            files.cert.display()
        ),
    })?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(TlsConfig {
        config: Arc::new(config),
        chain: n,
        client_cas,
    })
}

/// A listener that does the TLS handshake of every connection before axum sees it.
pub(crate) struct TlsListener {
    ready: mpsc::Receiver<(TlsStream<TcpStream>, SocketAddr)>,
    local: SocketAddr,
}

impl TlsListener {
    /// Accepts on `tcp` in a task of its own, which ends when this listener is dropped.
    ///
    /// # Errors
    /// When the socket's address cannot be read.
    pub(crate) fn new(tcp: TcpListener, tls: Arc<Watched<TlsConfig>>) -> std::io::Result<Self> {
        let local = tcp.local_addr()?;
        let (tx, ready) = mpsc::channel(64);
        tokio::spawn(accept_loop(tcp, tls, tx));
        Ok(TlsListener { ready, local })
    }
}

impl axum::serve::Listener for TlsListener {
    type Io = TlsStream<TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.ready.recv().await {
            Some(conn) => conn,
            // The accept loop ended: only when the listener is dropped, so never seen here.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        Ok(self.local)
    }
}

type Ready = mpsc::Sender<(TlsStream<TcpStream>, SocketAddr)>;

async fn accept_loop(tcp: TcpListener, tls: Arc<Watched<TlsConfig>>, ready: Ready) {
    let slots = Arc::new(Semaphore::new(MAX_HANDSHAKES));
    loop {
        let slot = tokio::select! {
            _ = ready.closed() => return,
            s = slots.clone().acquire_owned() => match s {
                Ok(s) => s,
                Err(_) => return,
            },
        };
        let (stream, peer) = tokio::select! {
            _ = ready.closed() => return,
            r = tcp.accept() => match r {
                Ok(conn) => conn,
                Err(e) => {
                    accept_error(e).await;
                    continue;
                }
            },
        };
        let config = tls.get().config.clone();
        let ready = ready.clone();
        tokio::spawn(async move {
            let _slot = slot;
            match tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake(stream, config)).await {
                Ok(Ok(Some(conn))) => {
                    let _ = ready.send((conn, peer)).await;
                }
                Ok(Ok(None)) => {}
                Ok(Err(e)) => {
                    tracing::debug!(%peer, error = %e, "An ingest TLS handshake failed.");
                }
                Err(_) => {
                    tracing::debug!(%peer, "An ingest TLS handshake did not finish in time.");
                }
            }
        });
    }
}

/// As axum does for its own listener: connection errors are the client's; anything else
/// (out of file descriptors) is logged and waited out.
async fn accept_error(e: std::io::Error) {
    use std::io::ErrorKind::{ConnectionAborted, ConnectionRefused, ConnectionReset};
    if matches!(
        e.kind(),
        ConnectionRefused | ConnectionAborted | ConnectionReset
    ) {
        return;
    }
    tracing::error!(error = %e, "The ingest listener cannot accept connections.");
    tokio::time::sleep(Duration::from_secs(1)).await;
}

/// The TLS stream, or `None` when the client closed or spoke plain HTTP (answered here).
async fn handshake(
    stream: TcpStream,
    config: Arc<ServerConfig>,
) -> std::io::Result<Option<TlsStream<TcpStream>>> {
    let _ = stream.set_nodelay(true);
    let mut first = [0u8; 1];
    if stream.peek(&mut first).await? == 0 {
        return Ok(None);
    }
    // A TLS record starts with its content type (22 for a handshake); an HTTP request with
    // its method's first letter.
    if first[0].is_ascii_alphabetic() {
        refuse_plain_http(stream).await;
        return Ok(None);
    }
    TlsAcceptor::from(config).accept(stream).await.map(Some)
}

/// Answers a plain-HTTP request on the HTTPS port with a 400 and closes, reading what the
/// client sent meanwhile (a bounded amount) so that the close does not reset the answer.
async fn refuse_plain_http(mut stream: TcpStream) {
    const BODY: &str =
        r#"{"error":"this port serves HTTPS only (HTTP_TLS_CERT_FILE is set): use https://"}"#;
    let answer = format!(
        "HTTP/1.1 400 Bad Request\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{BODY}",
        BODY.len()
    );
    tracing::debug!("A plain-HTTP request reached the HTTPS ingest listener; answered 400.");
    if stream.write_all(answer.as_bytes()).await.is_err() {
        return;
    }
    let _ = stream.shutdown().await;
    let drain = async {
        let mut buf = [0u8; 8192];
        let mut left = 1024 * 1024usize;
        while left > 0 {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => left = left.saturating_sub(n),
            }
        }
    };
    let _ = tokio::time::timeout(Duration::from_secs(1), drain).await;
}
