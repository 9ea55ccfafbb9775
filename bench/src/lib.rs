//! Benchmarks of vutap, built on the test frontend (`vutap_frontend`) and the test bed
//! (`vutap_testbed`).
//!
//! - [`loadgen`]: the vhost-user load generator behind `vutap-bench`, with its reports.
//! - [`seed`]: the seed experiment behind `vutap-vm seed` (internal/external paths, vutap vs
//!   QEMU's tap backend, the VEPA check).

pub mod loadgen;
pub mod seed;

/// The median of `values` (the mean of the middle two for an even count), sorting them;
/// `None` when empty.
pub fn median(mut values: Vec<f64>) -> Option<f64> {
    values.sort_by(f64::total_cmp);
    let n = values.len();
    match n {
        0 => None,
        _ if n % 2 == 1 => Some(values[n / 2]),
        _ => Some((values[n / 2 - 1] + values[n / 2]) / 2.0),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn test_median_sorts_and_takes_the_middle() {
        assert_eq!(super::median(vec![30.0, 10.0, 20_000.0]), Some(30.0));
        assert_eq!(super::median(vec![4.0, 1.0, 3.0, 2.0]), Some(2.5));
        assert_eq!(super::median(Vec::new()), None);
    }
}
