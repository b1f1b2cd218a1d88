//! Mutual TLS of the agent's gRPC API, reloaded while serving. The certificate, key and client
//! CA are files the kubelet refreshes when their Secret is renewed; every `--tls-reload-interval`
//! the agent reads them again and, when their content changed and is valid, handshakes new
//! connections with the new configuration. Invalid files leave the previous configuration
//! serving. When the client CA changes, connections a client authenticated under the old CA are
//! closed (the coordinator reconnects and re-attaches to its runs by id; runs are not touched).

use std::hash::{DefaultHasher, Hash, Hasher};
use std::io;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::rustls::server::WebPkiClientVerifier;
use tokio_rustls::rustls::{RootCertStore, ServerConfig};
use tokio_rustls::server::TlsStream;
use tokio_stream::Stream;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};
use tonic::transport::server::{Connected, TcpConnectInfo, TlsConnectInfo};

/// How long a client gets to finish its handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("read {path}: {source}")]
    Read { path: String, source: io::Error },
    #[error("{0}: no PEM certificate in it")]
    NoCertificate(&'static str),
    #[error("{0}: {1}")]
    Pem(&'static str, String),
    #[error("{0}")]
    Rustls(String),
}

/// The three PEM files of the serving identity and the CA its clients must be signed by.
#[derive(Clone, Debug)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub client_ca: PathBuf,
}

/// What the files held when they were read.
#[derive(Clone, PartialEq, Eq, Hash)]
struct Contents {
    cert: Vec<u8>,
    key: Vec<u8>,
    client_ca: Vec<u8>,
}

impl TlsFiles {
    fn read(&self) -> Result<Contents, TlsError> {
        let read = |p: &PathBuf| {
            std::fs::read(p).map_err(|source| TlsError::Read {
                path: p.display().to_string(),
                source,
            })
        };
        Ok(Contents {
            cert: read(&self.cert)?,
            key: read(&self.key)?,
            client_ca: read(&self.client_ca)?,
        })
    }
}

fn hash_of(value: &impl Hash) -> u64 {
    let mut h = DefaultHasher::new();
    value.hash(&mut h);
    h.finish()
}

/// A rustls server configuration that requires a client certificate signed by `client_ca` and
/// speaks HTTP/2 (pure: PEM in, configuration or the reason out).
pub fn server_config(cert: &[u8], key: &[u8], client_ca: &[u8]) -> Result<ServerConfig, TlsError> {
    let certs = |what: &'static str, pem: &[u8]| -> Result<Vec<CertificateDer<'static>>, TlsError> {
        let certs = CertificateDer::pem_slice_iter(pem)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| TlsError::Pem(what, e.to_string()))?;
        if certs.is_empty() {
            return Err(TlsError::NoCertificate(what));
        }
        Ok(certs)
    };
    let chain = certs("certificate", cert)?;
    let key = PrivateKeyDer::from_pem_slice(key).map_err(|e| TlsError::Pem("key", e.to_string()))?;
    let mut roots = RootCertStore::empty();
    for ca in certs("client CA", client_ca)? {
        roots
            .add(ca)
            .map_err(|e| TlsError::Pem("client CA", e.to_string()))?;
    }
    // Only ring is compiled in; naming it keeps the choice independent of crate features
    // enabled elsewhere in the dependency graph.
    let provider = Arc::new(tokio_rustls::rustls::crypto::ring::default_provider());
    let verifier = WebPkiClientVerifier::builder_with_provider(roots.into(), Arc::clone(&provider))
        .build()
        .map_err(|e| TlsError::Rustls(format!("client CA: {e}")))?;
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Rustls(e.to_string()))?
        .with_client_cert_verifier(verifier)
        // Fails when the key is not the certificate's.
        .with_single_cert(chain, key)
        .map_err(|e| TlsError::Rustls(format!("certificate and key: {e}")))?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(config)
}

/// The configuration new handshakes use, and the token that closes the connections accepted
/// under its client CA.
struct Active {
    config: Arc<ServerConfig>,
    trust: CancellationToken,
}

/// The agent's TLS state: the files, what was last read from them, and the active
/// configuration.
pub struct ReloadingTls {
    files: TlsFiles,
    state: Mutex<State>,
}

struct State {
    active: Active,
    /// Hash of the contents the active configuration was built from.
    active_hash: u64,
    client_ca_hash: u64,
    /// Hash of the last contents (or read error) looked at, so each change is logged once.
    seen_hash: u64,
}

/// What one look at the files found.
#[derive(Debug, PartialEq, Eq)]
pub enum Reload {
    Unchanged,
    /// New configuration in use; `client_ca_changed` says whether old connections were closed.
    Reloaded {
        client_ca_changed: bool,
    },
    /// The files changed but are not usable; the previous configuration keeps serving.
    Rejected(String),
}

impl ReloadingTls {
    /// Reads the files; fails when they do not make a valid configuration.
    pub fn load(files: TlsFiles) -> Result<Self, TlsError> {
        let contents = files.read()?;
        let config = server_config(&contents.cert, &contents.key, &contents.client_ca)?;
        let hash = hash_of(&contents);
        Ok(Self {
            state: Mutex::new(State {
                active: Active {
                    config: Arc::new(config),
                    trust: CancellationToken::new(),
                },
                active_hash: hash,
                client_ca_hash: hash_of(&contents.client_ca),
                seen_hash: hash,
            }),
            files,
        })
    }

    /// Reads the files again and switches to them if they changed and are valid.
    pub fn reload(&self) -> Reload {
        let read = self.files.read();
        let hash = match &read {
            Ok(c) => hash_of(c),
            Err(e) => hash_of(&e.to_string()),
        };
        let mut state = self.state.lock().expect("tls state");
        if hash == state.seen_hash {
            return Reload::Unchanged;
        }
        state.seen_hash = hash;
        if hash == state.active_hash {
            // Back to what is serving after a bad intermediate state.
            return Reload::Unchanged;
        }
        let built = read.and_then(|c| {
            let config = server_config(&c.cert, &c.key, &c.client_ca)?;
            Ok((config, hash_of(&c.client_ca)))
        });
        match built {
            Ok((config, ca_hash)) => {
                let client_ca_changed = ca_hash != state.client_ca_hash;
                let trust = if client_ca_changed {
                    state.active.trust.cancel();
                    CancellationToken::new()
                } else {
                    state.active.trust.clone()
                };
                state.active = Active {
                    config: Arc::new(config),
                    trust,
                };
                state.active_hash = hash;
                state.client_ca_hash = ca_hash;
                Reload::Reloaded { client_ca_changed }
            }
            Err(e) => Reload::Rejected(e.to_string()),
        }
    }

    fn active(&self) -> (TlsAcceptor, CancellationToken) {
        let state = self.state.lock().expect("tls state");
        (
            TlsAcceptor::from(Arc::clone(&state.active.config)),
            state.active.trust.clone(),
        )
    }

    /// Looks at the files every `interval`, logging what changed, until the process ends.
    pub async fn watch(self: Arc<Self>, interval: Duration) {
        let mut tick = tokio::time::interval(interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await;
        loop {
            tick.tick().await;
            match self.reload() {
                Reload::Unchanged => {}
                Reload::Reloaded { client_ca_changed } => tracing::info!(
                    cert = %self.files.cert.display(),
                    client_ca_changed,
                    "reloaded the TLS certificate, key and client CA{}",
                    if client_ca_changed {
                        "; closing connections authenticated by the previous CA"
                    } else {
                        ""
                    }
                ),
                Reload::Rejected(why) => tracing::warn!(
                    error = %why,
                    "the TLS files changed but are not usable; still serving the previous ones"
                ),
            }
        }
    }

    /// Accepts connections on `listener` and yields those that complete a TLS handshake with
    /// the configuration active when they arrived. Handshakes run concurrently, each bounded
    /// by a timeout, so a slow client holds up no one else. Stops when the stream is dropped.
    pub fn incoming(self: Arc<Self>, listener: TcpListener) -> impl Stream<Item = Result<Conn, io::Error>> {
        let (tx, rx) = tokio::sync::mpsc::channel(16);
        tokio::spawn(async move {
            loop {
                let (tcp, peer) = tokio::select! {
                    _ = tx.closed() => return,
                    accepted = listener.accept() => match accepted {
                        Ok(a) => a,
                        Err(e) => {
                            // E.g. out of file descriptors: back off instead of spinning.
                            tracing::warn!(error = %e, "accept failed");
                            tokio::time::sleep(Duration::from_millis(100)).await;
                            continue;
                        }
                    },
                };
                let (acceptor, trust) = self.active();
                let tx = tx.clone();
                tokio::spawn(async move {
                    match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                        Ok(Ok(tls)) => {
                            let conn = Conn {
                                tls,
                                revoked: Box::pin(trust.cancelled_owned()),
                            };
                            let _ = tx.send(Ok(conn)).await;
                        }
                        Ok(Err(e)) => tracing::debug!(%peer, error = %e, "TLS handshake failed"),
                        Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
                    }
                });
            }
        });
        ReceiverStream::new(rx)
    }
}

/// A TLS connection that ends when the CA that authenticated its client is replaced.
pub struct Conn {
    tls: TlsStream<TcpStream>,
    revoked: Pin<Box<WaitForCancellationFutureOwned>>,
}

impl Conn {
    fn check(&mut self, cx: &mut Context<'_>) -> io::Result<()> {
        match self.revoked.as_mut().poll(cx) {
            Poll::Ready(()) => Err(io::Error::new(
                io::ErrorKind::ConnectionAborted,
                "the client CA was replaced",
            )),
            Poll::Pending => Ok(()),
        }
    }
}

impl Connected for Conn {
    type ConnectInfo = TlsConnectInfo<TcpConnectInfo>;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.tls.connect_info()
    }
}

impl AsyncRead for Conn {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        // hyper always has a read pending on a live connection, so this also wakes it when the
        // CA is replaced.
        this.check(cx)?;
        Pin::new(&mut this.tls).poll_read(cx, buf)
    }
}

impl AsyncWrite for Conn {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        this.check(cx)?;
        Pin::new(&mut this.tls).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().tls).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().tls).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use restic_operator_e2e::certs::Ca;

    struct Pki {
        ca: String,
        cert: String,
        key: String,
    }

    fn pki() -> Pki {
        let ca = Ca::new("agent-ca").unwrap();
        let server = ca.server("restic-agent", &["restic-agent"]).unwrap();
        Pki {
            ca: ca.pair().cert_pem,
            cert: server.cert_pem,
            key: server.key_pem,
        }
    }

    fn write(dir: &std::path::Path, p: &Pki) -> TlsFiles {
        std::fs::write(dir.join("tls.crt"), &p.cert).unwrap();
        std::fs::write(dir.join("tls.key"), &p.key).unwrap();
        std::fs::write(dir.join("ca.crt"), &p.ca).unwrap();
        TlsFiles {
            cert: dir.join("tls.crt"),
            key: dir.join("tls.key"),
            client_ca: dir.join("ca.crt"),
        }
    }

    #[test]
    fn a_certificate_with_a_key_that_is_not_its_own_is_refused() {
        let (a, b) = (pki(), pki());
        assert!(server_config(a.cert.as_bytes(), a.key.as_bytes(), a.ca.as_bytes()).is_ok());
        let err = server_config(a.cert.as_bytes(), b.key.as_bytes(), a.ca.as_bytes()).unwrap_err();
        assert!(err.to_string().contains("certificate and key"), "{err}");
        let err = server_config(a.cert.as_bytes(), a.key.as_bytes(), b"not a pem").unwrap_err();
        assert!(err.to_string().contains("client CA"), "{err}");
        let err = server_config(b"", a.key.as_bytes(), a.ca.as_bytes()).unwrap_err();
        assert!(err.to_string().contains("certificate"), "{err}");
    }

    #[test]
    fn changed_files_are_used_once_valid_and_a_new_client_ca_revokes_old_connections() {
        let dir = tempfile::tempdir().unwrap();
        let first = pki();
        let files = write(dir.path(), &first);
        let tls = ReloadingTls::load(files.clone()).unwrap();
        assert_eq!(tls.reload(), Reload::Unchanged);
        let (_, first_trust) = tls.active();

        // A half-written key: rejected once, not again and again.
        std::fs::write(&files.key, "-----BEGIN PRIVATE KEY-----\ngarbage").unwrap();
        assert!(matches!(tls.reload(), Reload::Rejected(_)));
        assert_eq!(tls.reload(), Reload::Unchanged);
        assert!(!first_trust.is_cancelled());

        // Back to the serving files: nothing to do.
        std::fs::write(&files.key, &first.key).unwrap();
        assert_eq!(tls.reload(), Reload::Unchanged);

        // A new serving certificate with the same client CA keeps connections.
        let renewed = pki();
        std::fs::write(&files.cert, &renewed.cert).unwrap();
        std::fs::write(&files.key, &renewed.key).unwrap();
        assert_eq!(
            tls.reload(),
            Reload::Reloaded {
                client_ca_changed: false
            }
        );
        assert!(!first_trust.is_cancelled());

        // A new CA closes the connections its predecessor authenticated.
        write(dir.path(), &pki());
        assert_eq!(
            tls.reload(),
            Reload::Reloaded {
                client_ca_changed: true
            }
        );
        assert!(first_trust.is_cancelled());
        assert!(!tls.active().1.is_cancelled());
    }
}
