//! Remote names for `top` (`n`): reverse lookups through the host's own
//! resolver (getnameinfo: /etc/hosts, then DNS as nsswitch.conf says) on
//! a thread of their own, so that a slow DNS server never holds the view
//! or the engine. Answers are cached, at most `CACHE_LIMIT` of them, each
//! for `REMEMBERED`; the view shows the address until a name arrives.

use std::net::{IpAddr, SocketAddr};
use std::sync::mpsc::{self, SyncSender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rustc_hash::FxHashMap;

use super::lock;
use super::view::{Screen, View};

/// Addresses whose answer (a name, or none) is kept at most.
const CACHE_LIMIT: usize = 4096;
/// How long an answer is kept before it is asked again.
const REMEMBERED: Duration = Duration::from_secs(600);
/// Lookups waiting at most; past this, an address waits for the next redraw.
const QUEUE_LENGTH: usize = 256;

/// What is known of an address: its name once answered (`None` while
/// asked, or when it has none), and since when.
type Cache = FxHashMap<IpAddr, (Option<Arc<str>>, Instant)>;

/// The lookups: a queue to the thread, and the answers so far.
pub struct RemoteNames {
    requests: SyncSender<IpAddr>,
    cache: Arc<Mutex<Cache>>,
}

impl RemoteNames {
    /// Starts the lookup thread.
    pub fn start() -> std::io::Result<RemoteNames> {
        let (requests, queue) = mpsc::sync_channel::<IpAddr>(QUEUE_LENGTH);
        let cache = Arc::new(Mutex::new(Cache::default()));
        let answers = cache.clone();
        std::thread::Builder::new()
            .name("netwatch-names".into())
            .spawn(move || {
                for ip in queue {
                    let name = reverse_lookup(ip).map(Arc::from);
                    let mut cache = lock(&answers);
                    if cache.len() >= CACHE_LIMIT {
                        forget_oldest_half(&mut cache);
                    }
                    cache.insert(ip, (name, Instant::now()));
                }
            })?;
        Ok(RemoteNames { requests, cache })
    }

    /// The name of `ip` if it has arrived; else asks for it (once per
    /// `REMEMBERED`) and gives `None`. Never waits.
    pub fn name(&self, ip: IpAddr) -> Option<Arc<str>> {
        let mut cache = lock(&self.cache);
        if let Some((name, since)) = cache.get(&ip) {
            if since.elapsed() < REMEMBERED {
                return name.clone();
            }
        }
        if self.requests.try_send(ip).is_ok() {
            cache.insert(ip, (None, Instant::now()));
        }
        None
    }
}

/// Makes room: the older half of the answers go.
fn forget_oldest_half(cache: &mut Cache) {
    let mut times: Vec<Instant> = cache.values().map(|(_, since)| *since).collect();
    times.sort_unstable();
    let median = times[times.len() / 2];
    cache.retain(|_, (_, since)| *since > median);
}

/// The name the host's resolver gives `ip`, if any.
fn reverse_lookup(ip: IpAddr) -> Option<String> {
    let address = SocketAddr::new(ip, 0);
    let (storage, length) = socket_address(address);
    let mut host = [0 as libc::c_char; libc::NI_MAXHOST as usize];
    // SAFETY: getnameinfo reads `length` bytes of `storage` and writes a
    // NUL-terminated name of at most `host.len()` bytes into `host`.
    let status = unsafe {
        libc::getnameinfo(
            (&raw const storage).cast(),
            length,
            host.as_mut_ptr(),
            host.len() as libc::socklen_t,
            std::ptr::null_mut(),
            0,
            libc::NI_NAMEREQD,
        )
    };
    if status != 0 {
        return None;
    }
    // SAFETY: getnameinfo succeeded: `host` holds a NUL-terminated string.
    let name = unsafe { std::ffi::CStr::from_ptr(host.as_ptr()) };
    Some(name.to_string_lossy().into_owned())
}

/// `address` as the C sockaddr getnameinfo reads, with its length.
fn socket_address(address: SocketAddr) -> (libc::sockaddr_storage, libc::socklen_t) {
    // SAFETY: sockaddr_storage is plain old data; all zeros is valid.
    let mut storage: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let length = match address {
        SocketAddr::V4(v4) => {
            let sin = libc::sockaddr_in {
                sin_family: libc::AF_INET as libc::sa_family_t,
                sin_port: v4.port().to_be(),
                sin_addr: libc::in_addr {
                    s_addr: u32::from(*v4.ip()).to_be(),
                },
                sin_zero: [0; 8],
            };
            // SAFETY: a sockaddr_in fits in a sockaddr_storage.
            unsafe { std::ptr::write((&raw mut storage).cast(), sin) };
            std::mem::size_of::<libc::sockaddr_in>()
        }
        SocketAddr::V6(v6) => {
            let sin6 = libc::sockaddr_in6 {
                sin6_family: libc::AF_INET6 as libc::sa_family_t,
                sin6_port: v6.port().to_be(),
                sin6_flowinfo: v6.flowinfo(),
                sin6_addr: libc::in6_addr {
                    s6_addr: v6.ip().octets(),
                },
                sin6_scope_id: v6.scope_id(),
            };
            // SAFETY: a sockaddr_in6 fits in a sockaddr_storage.
            unsafe { std::ptr::write((&raw mut storage).cast(), sin6) };
            std::mem::size_of::<libc::sockaddr_in6>()
        }
    };
    (storage, length as libc::socklen_t)
}

/// Puts the names that have arrived in the rows' remote column (the
/// connections' `name:port`, the remote hosts' name).
pub fn show_names(screen: &mut Screen, name_of: impl Fn(IpAddr) -> Option<Arc<str>>) {
    let column = match screen.view {
        View::Connections => 3,
        View::Remotes => 0,
        View::Processes | View::Units => return,
    };
    for row in &mut screen.rows {
        let Some(remote) = row.remote.filter(|remote| !remote.ip().is_unspecified()) else {
            continue;
        };
        if let Some(name) = name_of(remote.ip()) {
            let port = match screen.view {
                View::Remotes => String::new(),
                _ => format!(":{}", remote.port()),
            };
            let width = usize::from(screen.view.columns()[column].width);
            row.cells[column] = fitted(&name, &port, width);
        }
    }
}

/// `name` then `port`, in `width` characters: a long name loses its end
/// to an ellipsis, never the port.
fn fitted(name: &str, port: &str, width: usize) -> String {
    let room = width.saturating_sub(port.chars().count());
    match name.chars().count() <= room {
        true => format!("{name}{port}"),
        false => {
            let kept: String = name.chars().take(room.saturating_sub(1)).collect();
            format!("{kept}…{port}")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_hosts_resolver_names_loopback_off_the_calling_thread() {
        let names = RemoteNames::start().expect("a thread");
        let loopback = IpAddr::from([127, 0, 0, 1]);
        assert_eq!(names.name(loopback), None, "asked, not yet answered");
        let deadline = Instant::now() + Duration::from_secs(10);
        let name = loop {
            if let Some(name) = names.name(loopback) {
                break name;
            }
            assert!(
                Instant::now() < deadline,
                "no name for 127.0.0.1 within 10 s"
            );
            std::thread::sleep(Duration::from_millis(10));
        };
        // /etc/hosts names it on every Debian.
        assert_eq!(&*name, "localhost");
    }

    #[test]
    fn a_long_name_loses_its_end_not_the_port() {
        assert_eq!(fitted("db.example", ":5432", 21), "db.example:5432");
        assert_eq!(
            fitted("peer.netwatch.test", ":34411", 21),
            "peer.netwatch.…:34411"
        );
        assert_eq!(fitted("peer.netwatch.test", "", 21), "peer.netwatch.test");
    }

    #[test]
    fn the_cache_forgets_its_older_half_when_full() {
        let mut cache = Cache::default();
        let start = Instant::now();
        for i in 0..100u32 {
            let at = start + Duration::from_millis(u64::from(i));
            cache.insert(IpAddr::from(i.to_be_bytes()), (None, at));
        }
        forget_oldest_half(&mut cache);
        assert_eq!(cache.len(), 49);
        assert!(cache.contains_key(&IpAddr::from(99u32.to_be_bytes())));
        assert!(!cache.contains_key(&IpAddr::from(0u32.to_be_bytes())));
    }
}
