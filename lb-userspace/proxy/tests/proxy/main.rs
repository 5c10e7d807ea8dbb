//! The proxy through its public interface only: real clients, servers and
//! sockets on 127.0.0.1 (one test binary, so one link for all of them).

mod actions;
mod backends;
mod client_tls;
mod compression;
mod edge;
mod framing;
mod general;
mod h1;
mod persistence;
mod resources;
mod routing;
mod slow;
mod source_limit;
mod support;
mod tcp;
mod upstream;
