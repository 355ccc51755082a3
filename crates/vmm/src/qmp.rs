//! A QMP client (QEMU's JSON machine protocol) over a Unix socket: the greeting, the
//! capabilities handshake, then commands answered by `return` or `error`. Events the
//! server sends between replies are kept, in order, for [`Qmp::events`].

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use serde_json::{Value, json};

use crate::Error;

/// A connected QMP session.
#[derive(Debug)]
pub struct Qmp {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
    events: Vec<Value>,
}

fn api(what: &str, e: impl std::fmt::Display) -> Error {
    Error::Api(format!("QMP {what}: {e}"))
}

impl Qmp {
    /// Connects to `socket`, reads the greeting and enters command mode. Replies taking
    /// longer than `timeout` are errors.
    pub fn connect(socket: &Path, timeout: Duration) -> Result<Qmp, Error> {
        let s = UnixStream::connect(socket)
            .map_err(|e| api(&format!("connect {}", socket.display()), e))?;
        s.set_read_timeout(Some(timeout))
            .map_err(|e| api("socket", e))?;
        let writer = s.try_clone().map_err(|e| api("socket", e))?;
        let mut q = Qmp {
            reader: BufReader::new(s),
            writer,
            events: Vec::new(),
        };
        let greeting = q.read()?;
        if greeting.get("QMP").is_none() {
            return Err(api("greeting", format!("unexpected {greeting}")));
        }
        q.execute("qmp_capabilities", json!({}))?;
        Ok(q)
    }

    fn read(&mut self) -> Result<Value, Error> {
        let mut line = String::new();
        let n = self
            .reader
            .read_line(&mut line)
            .map_err(|e| api("read", e))?;
        if n == 0 {
            return Err(api("read", "the connection closed"));
        }
        serde_json::from_str(&line).map_err(|e| api("reply", format!("{e}: {line}")))
    }

    /// Runs `command` with `arguments`; returns its `return` value.
    pub fn execute(&mut self, command: &str, arguments: Value) -> Result<Value, Error> {
        let mut msg = json!({ "execute": command });
        if arguments.as_object().is_some_and(|o| !o.is_empty()) {
            msg["arguments"] = arguments;
        }
        let mut line = msg.to_string();
        line.push('\n');
        self.writer
            .write_all(line.as_bytes())
            .map_err(|e| api(command, e))?;
        loop {
            let v = self.read()?;
            if v.get("event").is_some() {
                self.events.push(v);
                continue;
            }
            if let Some(r) = v.get("return") {
                return Ok(r.clone());
            }
            if let Some(e) = v.get("error") {
                return Err(Error::Refused {
                    command: command.to_string(),
                    class: e["class"].as_str().unwrap_or("?").to_string(),
                    desc: e["desc"].as_str().unwrap_or("?").to_string(),
                });
            }
            return Err(api(command, format!("unexpected reply {v}")));
        }
    }

    /// The events received so far (each `{"event": NAME, "data": ..., "timestamp": ...}`).
    pub fn events(&self) -> &[Value] {
        &self.events
    }
}
