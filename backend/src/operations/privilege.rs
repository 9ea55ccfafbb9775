//! `--user NAME`: after the taps and sockets are open, become that user with no capabilities.
//!
//! Must run before any other thread exists: the capability sets are per thread. Order: drop
//! every capability from the bounding set (needs CAP_SETPCAP, which root has), set
//! PR_SET_NO_NEW_PRIVS, switch groups and uids (which empties the permitted and effective sets
//! of a non-root uid), clear the ambient set and, to be sure, capset() everything to zero; then
//! check that /proc/self/status shows no effective or permitted capability and that uid 0 cannot
//! be regained.

use std::ffi::CString;

use thiserror::Error;

#[derive(Debug, Error)]
pub enum PrivilegeError {
    #[error("--user {0:?}: no such user")]
    NoSuchUser(String),
    #[error("--user {0:?}: user name contains a NUL byte")]
    BadName(String),
    #[error("{step} failed: {source}")]
    Syscall {
        step: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("privileges not dropped: {0}")]
    Verify(String),
}

fn check(step: &'static str, rc: libc::c_int) -> Result<(), PrivilegeError> {
    if rc < 0 {
        return Err(PrivilegeError::Syscall { step, source: std::io::Error::last_os_error() });
    }
    Ok(())
}

/// uid, primary gid and home of user `name`.
pub fn lookup_user(name: &str) -> Result<(libc::uid_t, libc::gid_t), PrivilegeError> {
    let cname = CString::new(name).map_err(|_| PrivilegeError::BadName(name.into()))?;
    // SAFETY: an all-zero passwd is a valid out-parameter; getpwnam_r fills it, pointing into
    // `buf`, which outlives every use below.
    let mut pw: libc::passwd = unsafe { std::mem::zeroed() };
    let mut result: *mut libc::passwd = std::ptr::null_mut();
    let mut buf = vec![0 as libc::c_char; 16384];
    // SAFETY: all pointers are valid for the call and `buf.len()` is its real size.
    let rc = unsafe { libc::getpwnam_r(cname.as_ptr(), &mut pw, buf.as_mut_ptr(), buf.len(), &mut result) };
    if rc != 0 || result.is_null() {
        return Err(PrivilegeError::NoSuchUser(name.into()));
    }
    Ok((pw.pw_uid, pw.pw_gid))
}

/// The CapEff/CapPrm/CapAmb lines of /proc/self/status (hex masks).
pub fn capability_masks() -> Vec<(String, u64)> {
    let status = std::fs::read_to_string("/proc/thread-self/status").unwrap_or_default();
    status
        .lines()
        .filter_map(|l| {
            let (k, v) = l.split_once(':')?;
            matches!(k, "CapInh" | "CapPrm" | "CapEff" | "CapBnd" | "CapAmb")
                .then(|| (k.to_string(), u64::from_str_radix(v.trim(), 16).unwrap_or(u64::MAX)))
        })
        .collect()
}

/// Becomes `name` with no capabilities at all (see the module doc).
pub fn drop_to_user(name: &str) -> Result<(libc::uid_t, libc::gid_t), PrivilegeError> {
    let (uid, gid) = lookup_user(name)?;
    // Bounding set: drop 0..=63; EINVAL marks the end of the kernel's capability list.
    for cap in 0..64 {
        // SAFETY: prctl with integer arguments only.
        let rc = unsafe { libc::prctl(libc::PR_CAPBSET_DROP, cap as libc::c_ulong, 0, 0, 0) };
        if rc < 0 {
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::EINVAL) {
                break;
            }
            return Err(PrivilegeError::Syscall { step: "PR_CAPBSET_DROP", source: e });
        }
    }
    // SAFETY: prctl with integer arguments only.
    check("PR_SET_NO_NEW_PRIVS", unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) })?;
    let groups = [gid];
    // SAFETY: `groups` is a valid array of one gid.
    check("setgroups", unsafe { libc::setgroups(1, groups.as_ptr()) })?;
    // SAFETY: plain id syscalls (glibc applies them to every thread of the process).
    check("setresgid", unsafe { libc::setresgid(gid, gid, gid) })?;
    // SAFETY: as above.
    check("setresuid", unsafe { libc::setresuid(uid, uid, uid) })?;
    // SAFETY: prctl with integer arguments only.
    let _ = unsafe { libc::prctl(libc::PR_CAP_AMBIENT, libc::PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0) };
    capset_zero()?;
    verify(uid)?;
    Ok((uid, gid))
}

#[repr(C)]
struct CapHeader {
    version: u32,
    pid: libc::c_int,
}

#[repr(C)]
#[derive(Default, Clone, Copy)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

const LINUX_CAPABILITY_VERSION_3: u32 = 0x2008_0522;

fn capset_zero() -> Result<(), PrivilegeError> {
    let mut hdr = CapHeader { version: LINUX_CAPABILITY_VERSION_3, pid: 0 };
    let data = [CapData::default(); 2];
    // SAFETY: capset(2) reads a v3 header and two data structs, which are laid out as the
    // kernel's __user_cap_header_struct / __user_cap_data_struct (repr(C)) and alive for the call.
    let rc = unsafe { libc::syscall(libc::SYS_capset, &mut hdr as *mut CapHeader, data.as_ptr()) };
    check("capset", rc as libc::c_int)
}

fn verify(uid: libc::uid_t) -> Result<(), PrivilegeError> {
    for (k, v) in capability_masks() {
        if matches!(k.as_str(), "CapEff" | "CapPrm" | "CapAmb" | "CapBnd") && v != 0 {
            return Err(PrivilegeError::Verify(format!("{k} is {v:#x}")));
        }
    }
    if uid != 0 {
        // SAFETY: plain id syscall; it must fail now.
        if unsafe { libc::setuid(0) } == 0 {
            return Err(PrivilegeError::Verify("setuid(0) still works".into()));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_lookup_user() {
        assert_eq!(lookup_user("root").unwrap().0, 0);
        assert!(matches!(lookup_user("vutap-no-such-user"), Err(PrivilegeError::NoSuchUser(_))));
        assert!(matches!(lookup_user("a\0b"), Err(PrivilegeError::BadName(_))));
    }

    #[test]
    fn test_capability_masks_parse() {
        let m = capability_masks();
        assert!(m.iter().any(|(k, _)| k == "CapEff"), "{m:?}");
    }
}
