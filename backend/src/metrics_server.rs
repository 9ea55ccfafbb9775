//! Prometheus text exposition of every device's counters, on an opt-in endpoint:
//! `--metrics-addr HOST:PORT` (HTTP, `GET /metrics`) and/or `--metrics-unix PATH` (a unix
//! socket that writes the same text to whoever connects, then closes; `vutap stats` reads it).

use std::fmt::Write as _;
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use log::{debug, info, warn};
use thiserror::Error;

use crate::device::Device;
use crate::metrics::PairCounts;
use crate::sandbox::{self, ThreadKind};

#[derive(Debug, Error)]
pub enum MetricsError {
    #[error("--metrics-addr {addr}: cannot listen: {source}")]
    BindTcp { addr: SocketAddr, #[source] source: io::Error },
    #[error("--metrics-unix {path}: cannot listen: {source}")]
    BindUnix { path: PathBuf, #[source] source: io::Error },
    #[error("cannot spawn the metrics thread: {0}")]
    Spawn(#[source] io::Error),
}

fn escape(v: &str) -> String {
    v.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

/// The text format (version 0.0.4) for `devices`.
pub fn render(devices: &[Arc<Device>]) -> String {
    let mut out = String::new();
    for (name, help) in PairCounts::HELP {
        let _ = writeln!(out, "# HELP vutap_{name}_total {help}\n# TYPE vutap_{name}_total counter");
        for d in devices {
            for (pair, m) in d.metrics.iter().enumerate() {
                let v = m.snapshot().fields().iter().find(|(k, _)| k == name).map_or(0, |(_, v)| *v);
                let _ = writeln!(out, "vutap_{name}_total{{device=\"{}\",queue_pair=\"{pair}\"}} {v}", escape(&d.label));
            }
        }
    }
    if let Some(d0) = devices.first() {
        for (i, (name, help, _)) in d0.device_metrics.fields().iter().enumerate() {
            let _ = writeln!(out, "# HELP vutap_device_{name}_total {help}\n# TYPE vutap_device_{name}_total counter");
            for d in devices {
                let v = d.device_metrics.fields()[i].2;
                let _ = writeln!(out, "vutap_device_{name}_total{{device=\"{}\"}} {v}", escape(&d.label));
            }
        }
    }
    type Gauge = (&'static str, &'static str, fn(&Device) -> u64);
    let gauges: [Gauge; 2] = [
        ("link_up", "1 when the tap has carrier (announced to the frontend as VIRTIO_NET_S_LINK_UP)", |d| u64::from(d.link.is_up())),
        ("queue_pairs", "queue pairs offered", |d| d.queue_pairs() as u64),
    ];
    for (name, help, f) in gauges {
        let _ = writeln!(out, "# HELP vutap_{name} {help}\n# TYPE vutap_{name} gauge");
        for d in devices {
            let _ = writeln!(out, "vutap_{name}{{device=\"{}\"}} {}", escape(&d.label), f(d));
        }
    }
    out
}

/// Listening endpoints, bound before privileges are dropped and served by [`MetricsServer::spawn`].
pub struct MetricsServer {
    tcp: Option<TcpListener>,
    unix: Option<(UnixListener, PathBuf)>,
}

impl MetricsServer {
    pub fn bind(addr: Option<SocketAddr>, unix: Option<&Path>) -> Result<MetricsServer, MetricsError> {
        let tcp = addr.map(|a| TcpListener::bind(a).map_err(|source| MetricsError::BindTcp { addr: a, source })).transpose()?;
        let unix = match unix {
            Some(p) => {
                if p.exists() && std::os::unix::net::UnixStream::connect(p).is_err() {
                    let _ = std::fs::remove_file(p);
                }
                let l = UnixListener::bind(p).map_err(|source| MetricsError::BindUnix { path: p.to_path_buf(), source })?;
                Some((l, p.to_path_buf()))
            }
            None => None,
        };
        Ok(MetricsServer { tcp, unix })
    }

    /// Listeners handed over by a previous vutap (live upgrade).
    pub fn from_listeners(tcp: Option<TcpListener>, unix: Option<(UnixListener, PathBuf)>) -> MetricsServer {
        MetricsServer { tcp, unix }
    }

    /// Dups of the listeners, for a live upgrade.
    pub fn dup_fds(&self) -> io::Result<(Option<std::os::fd::OwnedFd>, Option<std::os::fd::OwnedFd>)> {
        use std::os::fd::AsFd;
        let tcp = self.tcp.as_ref().map(|l| l.as_fd().try_clone_to_owned()).transpose()?;
        let unix = self.unix.as_ref().map(|(l, _)| l.as_fd().try_clone_to_owned()).transpose()?;
        Ok((tcp, unix))
    }

    /// The bound TCP address (useful with port 0).
    pub fn tcp_addr(&self) -> Option<SocketAddr> {
        self.tcp.as_ref().and_then(|l| l.local_addr().ok())
    }

    /// Serves both endpoints on their own threads until the process exits.
    pub fn spawn(self, devices: Vec<Arc<Device>>) -> Result<(), MetricsError> {
        if let Some(l) = self.tcp {
            let devs = devices.clone();
            if let Ok(a) = l.local_addr() {
                info!("metrics: http://{a}/metrics");
            }
            std::thread::Builder::new()
                .name("vutap-metrics".into())
                .spawn(move || {
                    sandbox::enter(ThreadKind::Metrics);
                    for s in l.incoming() {
                        match s {
                            Ok(s) => {
                                if let Err(e) = answer_http(s, &devs) {
                                    debug!("metrics request: {e}");
                                }
                            }
                            Err(e) => warn!("metrics accept: {e}"),
                        }
                    }
                })
                .map_err(MetricsError::Spawn)?;
        }
        if let Some((l, path)) = self.unix {
            info!("metrics: unix socket {}", path.display());
            std::thread::Builder::new()
                .name("vutap-metrics-unix".into())
                .spawn(move || {
                    sandbox::enter(ThreadKind::Metrics);
                    for s in l.incoming() {
                        match s {
                            Ok(mut s) => {
                                let _ = s.write_all(render(&devices).as_bytes());
                            }
                            Err(e) => warn!("metrics accept: {e}"),
                        }
                    }
                })
                .map_err(MetricsError::Spawn)?;
        }
        Ok(())
    }
}

/// Reads one request head; answers `GET /metrics` (or `/`) with the text, anything else 404.
fn answer_http(mut s: TcpStream, devices: &[Arc<Device>]) -> io::Result<()> {
    s.set_read_timeout(Some(Duration::from_secs(2)))?;
    let mut head = Vec::new();
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < 8192 {
        let n = s.read(&mut buf)?;
        if n == 0 {
            break;
        }
        head.extend_from_slice(&buf[..n]);
    }
    let line = String::from_utf8_lossy(&head);
    let mut parts = line.split_whitespace();
    let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let (status, ctype, body) = match (method, path.split('?').next().unwrap_or("")) {
        ("GET", "/metrics") | ("GET", "/") => ("200 OK", "text/plain; version=0.0.4; charset=utf-8", render(devices)),
        ("GET", _) => ("404 Not Found", "text/plain", "try /metrics\n".to_string()),
        _ => ("405 Method Not Allowed", "text/plain", "GET only\n".to_string()),
    };
    write!(s, "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}", body.len())?;
    s.flush()
}
