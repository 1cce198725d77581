//! The table's listening sockets, by port: an accepted socket's first
//! owner is its listener's.

use std::net::IpAddr;
use std::rc::Rc;

use super::{LiveSocket, Process, SocketTable};
use crate::model::{Proto, Transition};

/// A listening socket, to give accepted sockets their owner.
#[derive(Debug)]
pub(super) struct Listener {
    proto: Proto,
    ip: IpAddr,
    netns: Option<u32>,
    process: Option<Rc<Process>>,
}

impl SocketTable {
    pub(super) fn listener_owner(&self, accepted: &Transition) -> Option<Rc<Process>> {
        let tuple = &accepted.tuple;
        let candidates = self.listeners.get(&tuple.local.port())?;
        let ip = tuple.local.ip();
        let matching = |exact: bool| {
            candidates.iter().find(|listener| {
                listener.proto == tuple.proto
                    && (listener.netns.is_none()
                        || accepted.netns.is_none()
                        || listener.netns == accepted.netns)
                    && if exact {
                        listener.ip == ip
                    } else {
                        listener.ip.is_unspecified()
                    }
            })
        };
        matching(true).or_else(|| matching(false))?.process.clone()
    }

    pub(super) fn add_listener(&mut self, socket: &LiveSocket) {
        self.listeners
            .entry(socket.tuple.local.port())
            .or_default()
            .push(Listener {
                proto: socket.tuple.proto,
                ip: socket.tuple.local.ip(),
                netns: socket.netns,
                process: socket.process.clone(),
            });
    }

    pub(super) fn remove_listener(&mut self, socket: &LiveSocket) {
        let tuple = &socket.tuple;
        let port = tuple.local.port();
        if let Some(listeners) = self.listeners.get_mut(&port) {
            if let Some(at) = listeners.iter().position(|listener| {
                listener.proto == tuple.proto
                    && listener.ip == tuple.local.ip()
                    && listener.netns == socket.netns
            }) {
                listeners.swap_remove(at);
            }
            if listeners.is_empty() {
                self.listeners.remove(&port);
            }
        }
    }
}
