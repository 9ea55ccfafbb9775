//! vhost-user-net frontend (the VMM side), for tests and benchmarks.
