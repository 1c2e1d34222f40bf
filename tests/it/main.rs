//! Integration tests: real sockets on 127.0.0.1:0, in-process servers, one binary.

mod control;
mod control_binary;
mod support;
