//! The VMM side of vhost-user-net for tests and benchmarks, and test-bed helpers.
