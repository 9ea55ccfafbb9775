//! The guest's serial console as a line protocol: a reader thread collects everything QEMU
//! prints (also teeing it to a log file), and [`Console::run`] frames each command between unique
//! markers so its output and exit status can be picked out of the stream.

use std::io::{Read, Write};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::{io_err, Error, Result};

#[derive(Default)]
struct Buffer {
    /// All console output so far, with `\r` removed.
    text: String,
    /// Set when QEMU closed its stdout (it exited).
    closed: bool,
}

/// Serial console of a running guest.
pub struct Console {
    input: Box<dyn Write + Send>,
    shared: Arc<(Mutex<Buffer>, Condvar)>,
    reader: Option<JoinHandle<()>>,
    next_id: u64,
}

impl Console {
    /// Starts collecting `output`, copying it raw to `log`. `input`/`output` are QEMU's stdio
    /// pipes, or both halves of a unix socket chardev (a libvirt `<serial type='unix'>`).
    pub fn new(input: impl Write + Send + 'static, mut output: impl Read + Send + 'static, mut log: std::fs::File) -> Console {
        let shared = Arc::new((Mutex::new(Buffer::default()), Condvar::new()));
        let sh = Arc::clone(&shared);
        let reader = std::thread::spawn(move || {
            let mut chunk = [0u8; 8192];
            loop {
                let n = match output.read(&mut chunk) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => n,
                };
                let _ = log.write_all(&chunk[..n]);
                let text = String::from_utf8_lossy(&chunk[..n]).replace('\r', "");
                let (lock, cv) = &*sh;
                lock.lock().unwrap_or_else(|p| p.into_inner()).text.push_str(&text);
                cv.notify_all();
            }
            let (lock, cv) = &*sh;
            lock.lock().unwrap_or_else(|p| p.into_inner()).closed = true;
            cv.notify_all();
        });
        Console { input: Box::new(input), shared, reader: Some(reader), next_id: 0 }
    }

    /// Length of the output so far; pass it to [`Console::wait_for`] to search only newer text.
    pub fn mark(&self) -> usize {
        self.shared.0.lock().unwrap_or_else(|p| p.into_inner()).text.len()
    }

    /// Waits until `needle` shows up in the output after byte offset `from`; returns the offset
    /// just past it.
    pub fn wait_for(&self, needle: &str, from: usize, timeout: Duration) -> Result<usize> {
        self.wait_until(needle, timeout, |text| text.get(from..)?.find(needle).map(|i| from + i + needle.len()))
    }

    /// Waits until `check` finds something in the whole output.
    fn wait_until<T>(&self, what: &str, timeout: Duration, mut check: impl FnMut(&str) -> Option<T>) -> Result<T> {
        let deadline = Instant::now() + timeout;
        let (lock, cv) = &*self.shared;
        let mut buf = lock.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            if let Some(found) = check(&buf.text) {
                return Ok(found);
            }
            let now = Instant::now();
            if buf.closed || now >= deadline {
                let what = if buf.closed { format!("{what} (QEMU exited)") } else { what.to_string() };
                return Err(Error::Timeout { what, after: timeout, tail: tail(&buf.text, 1500) });
            }
            buf = cv.wait_timeout(buf, deadline - now).unwrap_or_else(|p| p.into_inner()).0;
        }
    }

    /// Sends one line to the guest shell.
    pub fn send_line(&mut self, line: &str) -> Result<()> {
        self.input
            .write_all(format!("{line}\n").as_bytes())
            .and_then(|_| self.input.flush())
            .map_err(io_err("write to guest serial console"))
    }

    /// Runs a single-line shell command in the guest; returns `(exit status, output)`.
    ///
    /// The markers are printed by `echo` with the name split by quotes, so the command line
    /// itself can never match them even if the tty were echoing input.
    pub fn run(&mut self, cmd: &str, timeout: Duration) -> Result<(i32, String)> {
        if cmd.contains('\n') {
            return Err(Error::Setup(format!("guest command must be one line: {cmd:?}")));
        }
        self.next_id += 1;
        let id = self.next_id;
        let start = format!("__S_{id}__\n");
        let end = format!("__E_{id}_");
        let from = self.mark();
        // Separate lines: a syntax error in `cmd` still lets the end marker run.
        self.send_line(&format!("echo \"__S\"\"_{id}__\"\n{cmd}\necho \"__E\"\"_{id}_$?__\""))?;
        let what = format!("guest command `{cmd}`");
        self.wait_until(&what, timeout, |text| {
            let text = text.get(from..)?;
            let s = text.find(&start)? + start.len();
            let e = s + text[s..].find(&end)?;
            let rest = &text[e + end.len()..];
            let code_end = rest.find("__")?;
            let code = rest[..code_end].parse::<i32>().ok()?;
            Some((code, text[s..e].to_string()))
        })
    }

    /// Last `n` bytes of output (for error messages).
    pub fn tail(&self, n: usize) -> String {
        tail(&self.shared.0.lock().unwrap_or_else(|p| p.into_inner()).text, n)
    }
}

impl Drop for Console {
    fn drop(&mut self) {
        // The reader ends when QEMU's stdout (or the socket) closes; the owner stops QEMU first.
        if let Some(r) = self.reader.take() {
            let _ = r.join();
        }
    }
}

fn tail(s: &str, n: usize) -> String {
    let mut start = s.len().saturating_sub(n);
    while !s.is_char_boundary(start) {
        start += 1;
    }
    s[start..].to_string()
}
