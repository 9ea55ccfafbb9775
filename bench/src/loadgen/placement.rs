//! Where the threads of a case run. On a small host the backend under test and the load
//! (frontend driver, far-end sink or source) compete for the same cores, and the scheduler's
//! choices then move results by tens of percent from run to run. So with one queue pair the
//! backend gets CPU 0 to itself and the load runs on the other CPUs, for every backend alike
//! (vutap, DPDK's forwarding lcore, the raw loop), like a host that keeps the VMs' vCPUs off the
//! backend's core. Multi-pair cases run unpinned, so that they can spread.

use std::io;

/// The CPUs of one side.
pub type Cpus = Vec<usize>;

/// CPUs for the backend and for the load; `None` = unpinned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Placement {
    pub backend: Cpus,
    pub load: Cpus,
}

/// The CPUs this process may use.
pub fn online_cpus() -> Cpus {
    // SAFETY: cpu_set_t is plain data; sched_getaffinity fills it.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: pid 0 = this thread; the size matches the set we pass.
    if unsafe { libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) } != 0 {
        return vec![0];
    }
    // SAFETY: CPU_ISSET reads the set we own.
    (0..libc::CPU_SETSIZE as usize).filter(|&c| unsafe { libc::CPU_ISSET(c, &set) }).collect()
}

/// The CPUs this process could use when first asked (before any pinning).
pub fn online_cpus_at_start() -> Cpus {
    static AT_START: std::sync::OnceLock<Cpus> = std::sync::OnceLock::new();
    AT_START.get_or_init(online_cpus).clone()
}

/// The placement for a case with `pairs` queue pairs on `cpus` (see the module docs).
pub fn for_case(pairs: u16, enabled: bool, cpus: &[usize]) -> Option<Placement> {
    (enabled && pairs == 1 && cpus.len() >= 2).then(|| Placement { backend: cpus[..1].to_vec(), load: cpus[1..].to_vec() })
}

/// Restricts the calling thread (and the threads and processes it creates later) to `cpus`.
pub fn pin_current_thread(cpus: &[usize]) -> io::Result<()> {
    // SAFETY: cpu_set_t is plain data; CPU_SET writes into the set we own.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    for &c in cpus {
        // SAFETY: as above.
        unsafe { libc::CPU_SET(c, &mut set) };
    }
    // SAFETY: pid 0 = this thread; the size matches the set we pass.
    if unsafe { libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_one_pair_splits_backend_from_load() {
        let p = for_case(1, true, &[0, 1, 2]).unwrap();
        assert_eq!(p, Placement { backend: vec![0], load: vec![1, 2] });
        assert_eq!(for_case(2, true, &[0, 1]), None, "multi-pair cases spread");
        assert_eq!(for_case(1, false, &[0, 1]), None, "--no-pin");
        assert_eq!(for_case(1, true, &[0]), None, "one CPU: nothing to split");
    }
}
