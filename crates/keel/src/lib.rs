//! Library side of the `keel` package: the server's configuration and runtime, the local
//! cluster launcher, and the HTTP client shared by `keelctl` and the tests.

pub mod client;
pub mod cluster;
pub mod config;
pub mod server;
