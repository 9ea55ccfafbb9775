//! vutap: a vhost-user-net backend on macvtap/tap.
