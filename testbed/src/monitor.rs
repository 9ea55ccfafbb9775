//! QEMU's human monitor (HMP) over a unix socket (`-monitor unix:PATH,server=on,wait=off`): one
//! connection per command, reading up to the `(qemu) ` prompt.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use super::{io_err, Error, Result};

const PROMPT: &str = "(qemu) ";

/// Runs one HMP command and returns what QEMU printed before the next prompt (the echoed
/// command line removed).
pub fn hmp(socket: &Path, cmd: &str, timeout: Duration) -> Result<String> {
    let deadline = Instant::now() + timeout;
    let mut s = loop {
        match UnixStream::connect(socket) {
            Ok(s) => break s,
            Err(e) if Instant::now() < deadline => {
                log::debug!("monitor {}: {e}, retrying", socket.display());
                std::thread::sleep(Duration::from_millis(50));
            }
            Err(e) => return Err(io_err(format!("connect to monitor {}", socket.display()))(e)),
        }
    };
    s.set_read_timeout(Some(Duration::from_millis(200))).map_err(io_err("monitor read timeout"))?;
    let mut text = String::new();
    read_until_prompt(&mut s, &mut text, 0, deadline, cmd)?;
    let start = text.len();
    s.write_all(format!("{cmd}\n").as_bytes()).map_err(io_err(format!("send `{cmd}` to monitor")))?;
    read_until_prompt(&mut s, &mut text, start, deadline, cmd)?;
    let reply = &text[start..text.len() - PROMPT.len()];
    // The monitor echoes the command line (with terminal escapes) before its output.
    let reply = match reply.find('\n') {
        Some(i) if reply[..i].contains(cmd.split_whitespace().next().unwrap_or(cmd)) => &reply[i + 1..],
        _ => reply,
    };
    Ok(reply.replace('\r', ""))
}

fn read_until_prompt(s: &mut UnixStream, text: &mut String, from: usize, deadline: Instant, cmd: &str) -> Result<()> {
    let mut buf = [0u8; 4096];
    loop {
        if text[from..].ends_with(PROMPT) {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(Error::Timeout {
                what: format!("monitor prompt after `{cmd}`"),
                after: Duration::ZERO,
                tail: text[from..].to_string(),
            });
        }
        match s.read(&mut buf) {
            Ok(0) => return Err(Error::Setup(format!("monitor closed during `{cmd}`: {}", &text[from..]))),
            Ok(n) => text.push_str(&String::from_utf8_lossy(&buf[..n])),
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {}
            Err(e) => return Err(io_err(format!("read monitor reply to `{cmd}`"))(e)),
        }
    }
}
