//! The kernel's events as netwatch's records.

use std::mem::offset_of;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;

use netwatch_common::{
    event_kind, ByteCounts, KernelEvent, KernelEventWithCommandLine, AF_INET6, COMMAND_LINE_BYTES,
};

use crate::model::{OwnerCause, OwnerEvent, Proto, Record, Task, TcpState, Transition, Tuple};

/// The event in one ring buffer item (a [`KernelEvent`], or one that
/// starts a [`KernelEventWithCommandLine`]); `None` when the item is
/// shorter than an event (the kernel writes whole events, so it should not be).
pub fn decode_event(item: &[u8]) -> Option<KernelEvent> {
    (item.len() >= size_of::<KernelEvent>())
        // SAFETY: the item holds a whole KernelEvent (checked length), and
        // any bit pattern is a valid one.
        .then(|| unsafe { std::ptr::read_unaligned(item.as_ptr().cast::<KernelEvent>()) })
}

/// The command line a ring buffer item carries, where it is a
/// [`KernelEventWithCommandLine`] whose read succeeded.
fn command_line_in(item: &[u8]) -> Option<Arc<[u8]>> {
    if item.len() < size_of::<KernelEventWithCommandLine>() {
        return None;
    }
    let at = offset_of!(KernelEventWithCommandLine, length);
    let length = u32::from_ne_bytes(item.get(at..at + 4)?.try_into().ok()?) as usize;
    let start = offset_of!(KernelEventWithCommandLine, command_line);
    let bytes = item.get(start..start + length.min(COMMAND_LINE_BYTES))?;
    (!bytes.is_empty()).then(|| Arc::from(bytes))
}

/// The record a ring buffer item describes; `None` for an item shorter
/// than an event, or a kind or state number the kernel should not send.
pub fn to_record(item: &[u8]) -> Option<Record> {
    record_of(&decode_event(item)?, command_line_in(item))
}

/// The record an event describes, its process's command line where the
/// kernel sent it.
fn record_of(event: &KernelEvent, command_line: Option<Arc<[u8]>>) -> Option<Record> {
    let task = Task {
        pid: event.tgid,
        comm: event.comm,
        start_ns: (event.start_ns != 0).then_some(event.start_ns),
        cgroup_id: (event.start_ns != 0).then_some(event.cgroup_id),
        command_line,
    };
    let cause = match event.kind {
        event_kind::TRANSITION => return to_transition(event, task).map(Record::Transition),
        event_kind::EXEC => return Some(Record::Exec(task)),
        event_kind::ACCEPT => OwnerCause::Accept,
        event_kind::HANDOFF => OwnerCause::Handoff,
        event_kind::FIRST_IO => OwnerCause::FirstIo,
        _ => return None,
    };
    Some(Record::Owner(OwnerEvent {
        ts_ns: event.ts_ns,
        skaddr: event.skaddr,
        tuple: tuple_of(event),
        state: TcpState::from_kernel(event.newstate),
        task,
        uid: (event.uid != u32::MAX).then_some(event.uid),
        netns: (event.netns != 0).then_some(event.netns),
        cause,
    }))
}

fn to_transition(event: &KernelEvent, task: Task) -> Option<Transition> {
    Some(Transition {
        ts_ns: event.ts_ns,
        skaddr: event.skaddr,
        tuple: tuple_of(event),
        old: TcpState::from_kernel(event.oldstate)?,
        new: TcpState::from_kernel(event.newstate)?,
        task,
        uid: (event.uid != u32::MAX).then_some(event.uid),
        netns: (event.netns != 0).then_some(event.netns),
        bytes: ByteCounts {
            sent: event.bytes_sent,
            received: event.bytes_received,
        },
        recovered: event.recovered != 0,
        error: (event.sk_err != 0).then_some(event.sk_err),
    })
}

fn tuple_of(event: &KernelEvent) -> Tuple {
    let ipv6 = event.family == AF_INET6;
    let ip = |bytes: [u8; 16]| -> IpAddr {
        if ipv6 {
            IpAddr::V6(Ipv6Addr::from(bytes))
        } else {
            IpAddr::V4(Ipv4Addr::new(bytes[0], bytes[1], bytes[2], bytes[3]))
        }
    };
    Tuple {
        proto: Proto::tcp_for(ipv6),
        local: SocketAddr::new(ip(event.saddr), event.sport),
        remote: SocketAddr::new(ip(event.daddr), event.dport),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use netwatch_common::AF_INET;

    fn kernel_event(kind: u8) -> KernelEvent {
        let mut event = KernelEvent {
            ts_ns: 5,
            skaddr: 0xffff_8880_0000_1000,
            bytes_sent: 10,
            bytes_received: 20,
            start_ns: 77,
            cgroup_id: 1,
            saddr: [0; 16],
            daddr: [0; 16],
            comm: [0; 16],
            tgid: 42,
            netns: 4026531840,
            uid: u32::MAX,
            sport: 8080,
            dport: 40000,
            family: AF_INET,
            oldstate: 10,
            newstate: 3,
            recovered: 0,
            kind,
            sk_err: 0,
        };
        event.saddr[..4].copy_from_slice(&[127, 0, 0, 1]);
        event.daddr[..4].copy_from_slice(&[127, 0, 0, 2]);
        event.comm[..4].copy_from_slice(b"curl");
        event
    }

    #[test]
    fn events_become_transitions() {
        let mut event = kernel_event(event_kind::TRANSITION);
        let Some(Record::Transition(t)) = record_of(&event, None) else {
            panic!("a transition");
        };
        assert_eq!(t.tuple.proto, Proto::Tcp);
        assert_eq!(t.tuple.local, "127.0.0.1:8080".parse().unwrap());
        assert_eq!(t.tuple.remote, "127.0.0.2:40000".parse().unwrap());
        assert_eq!((t.old, t.new), (TcpState::Listen, TcpState::SynRecv));
        assert_eq!((t.task.pid, &t.task.comm[..5]), (42, &b"curl\0"[..]));
        assert_eq!(t.task.start_ns, Some(77));
        assert_eq!((t.netns, t.uid), (Some(4026531840), None));
        assert_eq!(
            t.bytes,
            ByteCounts {
                sent: 10,
                received: 20
            }
        );

        event.family = AF_INET6;
        event.saddr = std::net::Ipv6Addr::LOCALHOST.octets();
        let Some(Record::Transition(t)) = record_of(&event, None) else {
            panic!("a transition");
        };
        assert_eq!(t.tuple.local, "[::1]:8080".parse().unwrap());
        event.newstate = 0;
        assert_eq!(record_of(&event, None), None);
    }

    /// The bytes of a ring buffer item holding `value`.
    fn item<T>(value: &T) -> Vec<u8> {
        // SAFETY: the kernel's records have no padding; every byte is initialised.
        unsafe { std::slice::from_raw_parts((value as *const T).cast::<u8>(), size_of::<T>()) }
            .to_vec()
    }

    #[test]
    fn an_item_with_a_command_line_gives_it_to_the_task() {
        let mut named = KernelEventWithCommandLine {
            event: kernel_event(event_kind::FIRST_IO),
            length: 9,
            _pad: [0; 4],
            command_line: [0xaa; COMMAND_LINE_BYTES],
        };
        named.command_line[..9].copy_from_slice(b"socat\0-d\0");
        let Some(Record::Owner(owner)) = to_record(&item(&named)) else {
            panic!("an owner event");
        };
        assert_eq!(
            owner.task.command_line.as_deref(),
            Some(&b"socat\0-d\0"[..])
        );
        // A plain event, or a read that failed, gives none.
        let plain = to_record(&item(&named.event));
        assert!(matches!(plain, Some(Record::Owner(owner)) if owner.task.command_line.is_none()));
        named.length = 0;
        let failed = to_record(&item(&named));
        assert!(matches!(failed, Some(Record::Owner(owner)) if owner.task.command_line.is_none()));
        // A length beyond the buffer is cut to it.
        named.length = u32::MAX;
        let Some(Record::Owner(owner)) = to_record(&item(&named)) else {
            panic!("an owner event");
        };
        let line = owner.task.command_line.expect("a command line");
        assert_eq!(line.len(), COMMAND_LINE_BYTES);
        // An item shorter than an event is none.
        assert_eq!(
            to_record(&item(&named)[..size_of::<KernelEvent>() - 1]),
            None
        );
    }

    #[test]
    fn owner_and_exec_events_become_their_records() {
        let mut event = kernel_event(event_kind::HANDOFF);
        event.oldstate = 1;
        event.newstate = 1;
        let Some(Record::Owner(owner)) = record_of(&event, None) else {
            panic!("an owner event");
        };
        assert_eq!(owner.cause, OwnerCause::Handoff);
        assert_eq!(owner.state, Some(TcpState::Established));
        assert_eq!((owner.task.pid, owner.task.start_ns), (42, Some(77)));
        assert_eq!(owner.tuple.local, "127.0.0.1:8080".parse().unwrap());
        event.kind = event_kind::ACCEPT;
        event.start_ns = 0;
        let Some(Record::Owner(owner)) = record_of(&event, None) else {
            panic!("an owner event");
        };
        assert_eq!(
            (owner.cause, owner.task.start_ns),
            (OwnerCause::Accept, None)
        );
        event.kind = event_kind::FIRST_IO;
        assert!(
            matches!(record_of(&event, None), Some(Record::Owner(owner)) if owner.cause == OwnerCause::FirstIo)
        );
        event.kind = event_kind::EXEC;
        assert!(matches!(record_of(&event, None), Some(Record::Exec(task)) if task.pid == 42));
        event.kind = 200;
        assert_eq!(record_of(&event, None), None);
    }
}
