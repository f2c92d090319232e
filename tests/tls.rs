//! TLS on the ingest listener (`HTTP_TLS_*`) against a mock cluster per test, with CAs and
//! certificates made in the test (rcgen): HTTPS publishes; plain HTTP on the HTTPS port gets
//! a clear 400 and garbage a closed connection, never a hang; with mutual TLS a client without
//! a certificate of the client CA is refused during the handshake and one with it is served;
//! a rotated certificate reaches new connections; unusable files stop the start-up.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use courier::app::producer::{start, ProducerOptions, RunningProducer};
use courier::testing::{
    http_get, metric_sum, post_request, rand_id, response_status, start_producer, stop_producer,
    wait_ready, TestKafka,
};
use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::{ClientConfig, RootCertStore};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_util::sync::CancellationToken;

const T: Duration = Duration::from_secs(30);
/// Longer than several reload polls (1 s each).
const RELOAD: Duration = Duration::from_secs(10);
/// Every exchange must end within this: an answer, an error or a close, never a hang.
const EXCHANGE: Duration = Duration::from_secs(10);
const EVENT: &[u8] = br#"{"type":"tls_test"}"#;

/// A CA made for the test.
struct Ca {
    issuer: CertifiedIssuer<'static, KeyPair>,
}

/// A certificate and its key, in PEM and DER.
struct Leaf {
    cert_pem: String,
    key_pem: String,
    der: Vec<u8>,
}

impl Ca {
    fn new(name: &str) -> Self {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(DnType::CommonName, format!("courier test CA {name}"));
        let issuer = CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap();
        Ca { issuer }
    }

    fn pem(&self) -> String {
        self.issuer.pem()
    }

    /// A certificate for `localhost` and 127.0.0.1 (server or client alike).
    fn leaf(&self, cn: &str) -> Leaf {
        let mut params =
            CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()]).unwrap();
        params.distinguished_name.push(DnType::CommonName, cn);
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        Leaf {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            der: cert.der().to_vec(),
        }
    }
}

/// Writes `text` to `path` by a rename, as the kubelet updates a Secret volume.
fn replace(path: &Path, text: &str) {
    let tmp = path.with_extension(format!("new-{}", rand_id()));
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

/// The server's files in a temporary directory.
struct Files {
    _dir: tempfile::TempDir,
    cert: PathBuf,
    key: PathBuf,
    client_ca: PathBuf,
}

impl Files {
    fn new(server: &Leaf) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let f = Files {
            cert: dir.path().join("tls.crt"),
            key: dir.path().join("tls.key"),
            client_ca: dir.path().join("ca.crt"),
            _dir: dir,
        };
        std::fs::write(&f.cert, &server.cert_pem).unwrap();
        std::fs::write(&f.key, &server.key_pem).unwrap();
        f
    }

    fn env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("HTTP_TLS_CERT_FILE", self.cert.display().to_string()),
            ("HTTP_TLS_KEY_FILE", self.key.display().to_string()),
        ]
    }
}

async fn producer(k: &TestKafka, extra: &[(&str, String)]) -> (RunningProducer, CancellationToken) {
    let extra: Vec<(&str, &str)> = extra.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let (running, shutdown) = start_producer(k.config(&extra)).await;
    // The ops server stays plain HTTP.
    wait_ready(&format!("http://{}/readyz", running.ops_addr), T).await;
    (running, shutdown)
}

/// A TLS client trusting `ca`, with a client certificate when `identity` is given.
fn client(ca: &str, identity: Option<&Leaf>) -> Arc<ClientConfig> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(ca.as_bytes()) {
        roots.add(c.unwrap()).unwrap();
    }
    let builder = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots);
    let config = match identity {
        None => builder.with_no_client_auth(),
        Some(leaf) => {
            let chain = CertificateDer::pem_slice_iter(leaf.cert_pem.as_bytes())
                .collect::<Result<Vec<_>, _>>()
                .unwrap();
            let key = PrivateKeyDer::from_pem_slice(leaf.key_pem.as_bytes()).unwrap();
            builder.with_client_auth_cert(chain, key).unwrap()
        }
    };
    Arc::new(config)
}

/// What an HTTPS exchange gave: the server's certificate, the status and the body.
#[derive(Debug)]
struct Exchange {
    server_cert: Vec<u8>,
    status: u16,
    body: String,
}

/// `POST path` over TLS (`token` as a bearer token when given). `Err` says where it failed:
/// the handshake, or no HTTP answer after it. Fails the test after [`EXCHANGE`].
async fn https(
    addr: SocketAddr,
    config: Arc<ClientConfig>,
    path: &str,
    token: Option<&str>,
    body: &[u8],
) -> Result<Exchange, String> {
    let exchange = async {
        let tcp = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
        let name = ServerName::try_from("localhost").unwrap();
        let mut tls = TlsConnector::from(config)
            .connect(name, tcp)
            .await
            .map_err(|e| format!("handshake: {e}"))?;
        let server_cert = tls.get_ref().1.peer_certificates().unwrap()[0].to_vec();
        let auth: Vec<Vec<u8>> = token
            .map(|t| format!("Bearer {t}").into_bytes())
            .into_iter()
            .collect();
        tls.write_all(&post_request("localhost", path, &auth, body))
            .await
            .map_err(|e| format!("write: {e}"))?;
        let mut buf = Vec::new();
        let read = tls.read_to_end(&mut buf).await;
        if buf.is_empty() {
            return Err(format!("no answer: {read:?}"));
        }
        let text = String::from_utf8_lossy(&buf).into_owned();
        let status = response_status(&text);
        let body = text
            .split_once("\r\n\r\n")
            .map_or("", |(_, b)| b)
            .to_owned();
        Ok(Exchange {
            server_cert,
            status,
            body,
        })
    };
    tokio::time::timeout(EXCHANGE, exchange)
        .await
        .unwrap_or_else(|_| panic!("no end to an HTTPS exchange within {EXCHANGE:?}"))
}

/// Sends `bytes` over plain TCP and reads until the server closes, within [`EXCHANGE`].
async fn plain(addr: SocketAddr, bytes: &[u8]) -> String {
    let exchange = async {
        let mut s = TcpStream::connect(addr).await.expect("connect");
        let _ = s.write_all(bytes).await;
        let mut buf = Vec::new();
        let _ = s.read_to_end(&mut buf).await;
        String::from_utf8_lossy(&buf).into_owned()
    };
    tokio::time::timeout(EXCHANGE, exchange)
        .await
        .unwrap_or_else(|_| panic!("the server did not close within {EXCHANGE:?}"))
}

async fn tls_reloads(p: &RunningProducer, result: &str) -> f64 {
    let (_, text) = http_get(&format!("http://{}/metrics", p.ops_addr)).await;
    metric_sum(
        &text,
        "courier_file_reloads_total",
        &["file=\"tls\"", &format!("result=\"{result}\"")],
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_with_a_test_ca_publishes_and_plain_http_gets_a_clear_400() {
    let k = TestKafka::new(1);
    let ca = Ca::new("server");
    let files = Files::new(&ca.leaf("courier"));
    // With a bearer token too: TLS and authentication compose.
    let token = format!("{}{}", rand_id(), rand_id());
    let tokens = files.cert.with_file_name("tokens");
    std::fs::write(&tokens, format!("{token}\n")).unwrap();
    let mut env = files.env();
    env.push(("HTTP_AUTH_TOKENS_FILE", tokens.display().to_string()));
    let (p, shutdown) = producer(&k, &env).await;
    let trusted = client(&ca.pem(), None);

    let ok = https(
        p.http_addr,
        trusted.clone(),
        "/v1/events",
        Some(&token),
        EVENT,
    )
    .await
    .expect("HTTPS works");
    assert_eq!(ok.status, 200, "{}", ok.body);
    let no_token = https(p.http_addr, trusted.clone(), "/v1/events", None, EVENT)
        .await
        .expect("HTTPS works");
    assert_eq!(no_token.status, 401, "{}", no_token.body);

    // Plain HTTP on the HTTPS port: a plain 400 that says to use https, then a close.
    let request = format!(
        "POST /v1/events HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        EVENT.len()
    );
    let answer = plain(p.http_addr, &[request.as_bytes(), EVENT].concat()).await;
    assert!(answer.starts_with("HTTP/1.1 400 "), "{answer:?}");
    let body = answer.split_once("\r\n\r\n").unwrap().1;
    let error: serde_json::Value = serde_json::from_str(body).expect("a JSON error");
    assert!(
        error["error"].as_str().unwrap().contains("https://"),
        "{body}"
    );
    // Neither TLS nor HTTP: closed, no answer.
    let garbage = plain(p.http_addr, &[0u8, 1, 2, 3, 0xff, 0x16, 0x03].repeat(64)).await;
    assert!(!garbage.contains("HTTP/1.1"), "{garbage:?}");
    // A client that does not trust the server's CA: the handshake fails on its side.
    let stranger = client(&Ca::new("other").pem(), None);
    let refused = https(p.http_addr, stranger, "/v1/events", Some(&token), EVENT).await;
    assert!(
        refused.as_ref().is_err_and(|e| e.starts_with("handshake")),
        "{refused:?}"
    );

    // Still serving, and only what HTTPS with the token sent was published.
    let again = https(p.http_addr, trusted, "/v1/events", Some(&token), EVENT)
        .await
        .expect("HTTPS still works");
    assert_eq!(again.status, 200, "{}", again.body);
    assert_eq!(k.end_offsets(&k.source), vec![2]);
    assert_eq!(stop_producer(p, shutdown, T).await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_tls_refuses_clients_without_a_certificate_of_the_client_ca() {
    let k = TestKafka::new(1);
    let server_ca = Ca::new("server");
    let client_ca = Ca::new("clients");
    let files = Files::new(&server_ca.leaf("courier"));
    std::fs::write(&files.client_ca, client_ca.pem()).unwrap();
    let mut env = files.env();
    env.push((
        "HTTP_TLS_CLIENT_CA_FILE",
        files.client_ca.display().to_string(),
    ));
    let (p, shutdown) = producer(&k, &env).await;

    let refused = [
        ("no client certificate", client(&server_ca.pem(), None)),
        (
            "a certificate of another CA",
            client(&server_ca.pem(), Some(&Ca::new("rogue").leaf("rogue"))),
        ),
        (
            "a certificate of the server's CA",
            client(&server_ca.pem(), Some(&server_ca.leaf("not-a-client"))),
        ),
    ];
    for (what, config) in refused {
        let r = https(p.http_addr, config, "/v1/events", None, EVENT).await;
        // TLS 1.3: the client finishes its side before the server checks its certificate,
        // so the refusal (an alert) shows when it reads; never as an HTTP answer.
        match r {
            Err(e) => println!("TLS refused {what}: {e}"),
            Ok(served) => panic!("{what}: served: {served:?}"),
        }
    }
    let good = client(&server_ca.pem(), Some(&client_ca.leaf("orders-service")));
    let ok = https(p.http_addr, good, "/v1/events", None, EVENT)
        .await
        .expect("a client with a certificate of the client CA is served");
    assert_eq!(ok.status, 200, "{}", ok.body);
    assert_eq!(
        k.end_offsets(&k.source),
        vec![1],
        "only the good client published"
    );
    assert_eq!(stop_producer(p, shutdown, T).await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotated_certificate_is_served_to_new_connections() {
    let k = TestKafka::new(1);
    let ca = Ca::new("server");
    let first = ca.leaf("first");
    let files = Files::new(&first);
    let (p, shutdown) = producer(&k, &files.env()).await;
    let trusted = client(&ca.pem(), None);
    let addr = p.http_addr;
    let served = |config: Arc<ClientConfig>| async move {
        https(addr, config, "/v1/events", None, EVENT)
            .await
            .expect("HTTPS works")
    };
    let ex = served(trusted.clone()).await;
    assert_eq!(ex.status, 200);
    assert_eq!(ex.server_cert, first.der);

    // Renewed: a new key and certificate, each file replaced by a rename (between the two,
    // the pair does not match and the first stays in force).
    let second = ca.leaf("second");
    replace(&files.key, &second.key_pem);
    replace(&files.cert, &second.cert_pem);
    let deadline = Instant::now() + RELOAD;
    loop {
        let ex = served(trusted.clone()).await;
        assert_eq!(ex.status, 200, "{}", ex.body);
        if ex.server_cert == second.der {
            break;
        }
        assert_eq!(ex.server_cert, first.der, "neither certificate");
        assert!(
            Instant::now() < deadline,
            "the rotated certificate was not served within {RELOAD:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(tls_reloads(&p, "ok").await >= 1.0);

    // A certificate without its key: refused, the second stays.
    let errors = tls_reloads(&p, "error").await;
    replace(&files.cert, &ca.leaf("third").cert_pem);
    let deadline = Instant::now() + RELOAD;
    while tls_reloads(&p, "error").await <= errors {
        assert!(
            Instant::now() < deadline,
            "a mismatched pair was not reported within {RELOAD:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(served(trusted).await.server_cert, second.der);
    assert!(k.end_offsets(&k.source)[0] >= 3);
    assert_eq!(stop_producer(p, shutdown, T).await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unusable_tls_files_stop_the_start_up_with_a_clear_error() {
    let k = TestKafka::new(1);
    let ca = Ca::new("server");
    let (one, two) = (ca.leaf("one"), ca.leaf("two"));
    let dir = tempfile::tempdir().unwrap();
    let write = |name: &str, text: &str| {
        let p = dir.path().join(name);
        std::fs::write(&p, text).unwrap();
        p.display().to_string()
    };
    let cert = write("cert", &one.cert_pem);
    let key = write("key", &one.key_pem);
    let other_key = write("other-key", &two.key_pem);
    let garbage = write("garbage", "not PEM at all\n");
    let missing = dir.path().join("missing").display().to_string();
    let cases: Vec<(Vec<(&str, &str)>, &str)> = vec![
        (
            vec![
                ("HTTP_TLS_CERT_FILE", &missing),
                ("HTTP_TLS_KEY_FILE", &key),
            ],
            "HTTP_TLS_CERT_FILE=",
        ),
        (
            vec![
                ("HTTP_TLS_CERT_FILE", &garbage),
                ("HTTP_TLS_KEY_FILE", &key),
            ],
            "no PEM certificate",
        ),
        (
            vec![("HTTP_TLS_CERT_FILE", &cert), ("HTTP_TLS_KEY_FILE", &cert)],
            "no PEM private key",
        ),
        (
            vec![
                ("HTTP_TLS_CERT_FILE", &cert),
                ("HTTP_TLS_KEY_FILE", &other_key),
            ],
            "is not the private key of the certificate",
        ),
        (
            vec![
                ("HTTP_TLS_CERT_FILE", &cert),
                ("HTTP_TLS_KEY_FILE", &key),
                ("HTTP_TLS_CLIENT_CA_FILE", &garbage),
            ],
            "HTTP_TLS_CLIENT_CA_FILE=",
        ),
    ];
    for (env, want) in cases {
        let e = start(
            k.config(&env),
            ProducerOptions::default(),
            CancellationToken::new(),
        )
        .await
        .expect_err(want);
        let e = format!("{e:#}");
        assert!(e.contains(want), "want {want:?} in: {e}");
    }
    // Half a pair, or mutual TLS without TLS: the configuration itself is refused.
    for env in [
        vec![("HTTP_TLS_CERT_FILE", cert.as_str())],
        vec![("HTTP_TLS_KEY_FILE", key.as_str())],
        vec![("HTTP_TLS_CLIENT_CA_FILE", cert.as_str())],
    ] {
        let vars = k.env(&env);
        let e = courier::config::Config::load_from(None, &vars).expect_err("refused");
        assert!(e.to_string().contains("HTTP_TLS_"), "{e}");
    }
}
