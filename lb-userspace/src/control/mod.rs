//! Runtime control of a running agent over a Unix socket: the protocol, its
//! framing, the agent's server, the client and the `lb` subcommands using it.

pub mod cli;
pub mod client;
pub mod frame;
pub mod protocol;
pub mod server;

pub use cli::{ControlCommand, SOCKET_ENV, SocketArg};
pub use client::{ClientError, request};
pub use frame::{FrameError, decode, encode};
pub use protocol::{
    AdminState, BackendInfo, DEFAULT_SOCKET, Envelope, Health, MAX_FRAME, PROTOCOL_VERSION,
    ProxyInfo, ReasonCount, Request, Response, ServiceInfo,
};
pub use server::{Handler, remove_socket, serve};
