//! What this host charges for a wake-up: the CPU an `eventfd` write costs its writer when it
//! wakes a thread asleep on that eventfd, the sleeper on another CPU or on the writer's own.
//!
//! Every interrupt vutap sends a frontend asleep on its call eventfd is such a write, and so is
//! every kick to a sleeping worker. On bare metal a wake-up across CPUs is an inter-processor
//! interrupt of a microsecond or two; inside a VM the IPI is a VM exit, priced by the
//! hypervisor. Measured once per run, it turns a cell's interrupts per frame into the CPU per
//! frame they cost on this host, which no backend that honours the guest's requests avoids.

use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use vmm_sys_util::eventfd::EventFd;
use vutap_testbed::host_cpu::this_thread_ns;

use super::error::{LoadgenError, Result};
use super::placement::pin_current_thread;

/// The writer's CPU per wake-up, the median of `samples`.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct WakeCost {
    /// The sleeper on another CPU.
    pub cross_cpu_ns: f64,
    /// The sleeper on the writer's CPU.
    pub same_cpu_ns: f64,
    pub samples: usize,
}

impl WakeCost {
    /// The most `interrupts_per_frame` can cost per frame: each one waking a sleeper on the
    /// other CPU (a frontend that was still awake costs its writer far less).
    pub fn interrupts_ns_per_frame(&self, interrupts_per_frame: f64) -> f64 {
        interrupts_per_frame * self.cross_cpu_ns
    }
}

/// How long the writer waits before each wake-up, so that the sleeper is back asleep.
const SETTLE: Duration = Duration::from_micros(300);
/// How long a sleeper may take to wake before the measurement is abandoned.
const WAKE_TIMEOUT: Duration = Duration::from_secs(1);

/// Measures [`WakeCost`] with the writer on `cpus[0]` and the cross-CPU sleeper on `cpus[1]`;
/// `None` with fewer than two CPUs or no samples. The calling thread's placement is left alone.
pub fn measure(cpus: &[usize], samples: usize) -> Result<Option<WakeCost>> {
    let &[writer, other, ..] = cpus else { return Ok(None) };
    if samples == 0 {
        return Ok(None);
    }
    let cross_cpu_ns = median_write_ns(writer, other, samples)?;
    let same_cpu_ns = median_write_ns(writer, writer, samples)?;
    Ok(Some(WakeCost { cross_cpu_ns, same_cpu_ns, samples }))
}

fn io_error(what: &str) -> impl FnOnce(io::Error) -> LoadgenError + '_ {
    move |source| LoadgenError::Io { what: format!("wake-up cost: {what}"), source }
}

/// The writer's thread CPU for a `write` that wakes a thread blocked in `read` on `sleeper_cpu`,
/// median of `samples` wake-ups.
fn median_write_ns(writer_cpu: usize, sleeper_cpu: usize, samples: usize) -> Result<f64> {
    // Blocking (no EFD_NONBLOCK): the sleeper sleeps in `read` until the write.
    let efd = Arc::new(EventFd::new(0).map_err(io_error("eventfd"))?);
    let woken = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let sleeper = {
        let (efd, woken, stop) = (efd.clone(), woken.clone(), stop.clone());
        std::thread::spawn(move || -> io::Result<()> {
            pin_current_thread(&[sleeper_cpu])?;
            while !stop.load(Ordering::Acquire) {
                efd.read()?;
                woken.fetch_add(1, Ordering::Release);
            }
            Ok(())
        })
    };
    let writer = {
        let (efd, woken) = (efd.clone(), woken.clone());
        std::thread::spawn(move || -> io::Result<Vec<f64>> {
            pin_current_thread(&[writer_cpu])?;
            let mut costs = Vec::with_capacity(samples);
            for i in 0..samples as u64 {
                // Spin rather than sleep: a writer waking from its own sleep would come back
                // with cold caches, and, on the sleeper's CPU, change whom the scheduler finds.
                let settle = Instant::now();
                while settle.elapsed() < SETTLE {
                    std::hint::spin_loop();
                }
                let before = this_thread_ns();
                efd.write(1)?;
                costs.push(this_thread_ns().saturating_sub(before) as f64);
                let deadline = Instant::now() + WAKE_TIMEOUT;
                while woken.load(Ordering::Acquire) <= i {
                    if Instant::now() > deadline {
                        return Err(io::Error::new(io::ErrorKind::TimedOut, "the sleeper did not wake"));
                    }
                    std::thread::yield_now();
                }
            }
            Ok(costs)
        })
    };
    let costs = writer.join().map_err(|_| LoadgenError::DriverPanicked)?;
    // However the writer ended, one more write releases a sleeper still in `read`.
    stop.store(true, Ordering::Release);
    efd.write(1).map_err(io_error("eventfd"))?;
    sleeper.join().map_err(|_| LoadgenError::DriverPanicked)?.map_err(io_error("sleeper"))?;
    Ok(crate::median(costs.map_err(io_error("writer"))?).unwrap_or(0.0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_wake_cost_is_measured_on_two_cpus_and_not_on_one() {
        assert_eq!(measure(&[0], 10).unwrap(), None, "one CPU: no cross-CPU wake-up to time");
        let cpus = super::super::placement::online_cpus();
        let measured = measure(&cpus, 20).unwrap();
        assert_eq!(measured.is_some(), cpus.len() >= 2, "{cpus:?}: {measured:?}");
        if let Some(w) = measured {
            assert!(w.cross_cpu_ns > 0.0 && w.same_cpu_ns > 0.0, "{w:?}");
            assert_eq!(w.samples, 20);
            assert!((w.interrupts_ns_per_frame(0.01) - w.cross_cpu_ns / 100.0).abs() < 1e-6);
        }
    }
}
