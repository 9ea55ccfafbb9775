//! Running host commands (`ip`, `ss`, ...) with errors that say which command failed and why.

use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};

use super::{io_err, Error, Result};

fn render(prog: &str, args: &[&str]) -> String {
    std::iter::once(prog).chain(args.iter().copied()).collect::<Vec<_>>().join(" ")
}

/// Runs `prog args...`, returns its stdout; a non-zero exit is an error carrying stderr.
pub fn run(prog: &str, args: &[&str]) -> Result<String> {
    let shown = render(prog, args);
    let out = Command::new(prog).args(args).stdin(Stdio::null()).output().map_err(io_err(format!("spawn `{shown}`")))?;
    if !out.status.success() {
        return Err(Error::Command {
            cmd: shown,
            status: out.status.to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Runs a command for cleanup: failures are logged, not returned (the object may already be gone).
pub fn run_quiet(prog: &str, args: &[&str]) {
    if let Err(e) = run(prog, args) {
        log::debug!("cleanup: {e}");
    }
}

/// Makes the child get SIGKILL when the thread that spawned it dies, so a test runner killed
/// hard does not leave TCG guests burning the host's two cores. Callers keep the child's guard
/// on the spawning thread (all guards here do), since the signal follows that thread's exit.
pub fn die_with_parent(cmd: &mut Command) {
    // SAFETY: runs in the forked child before exec; prctl(PR_SET_PDEATHSIG) is async-signal-safe
    // and touches no memory of the parent.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}
