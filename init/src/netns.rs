//! Named network namespaces, the way `ip netns` makes them: a namespace is kept alive by a bind
//! mount of its `/proc/self/ns/net` on a file, so services can join it by path (`setns`) long
//! after the process that made it moved on. PID 1 makes `chat` (loopback only) at boot.

use std::fs::File;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};

use netlink_packet_core::{NetlinkHeader, NetlinkMessage, NetlinkPayload, NLM_F_ACK, NLM_F_REQUEST};
use netlink_packet_route::link::{LinkFlags, LinkMessage};
use netlink_packet_route::RouteNetlinkMessage;
use netlink_sys::{protocols::NETLINK_ROUTE, Socket, SocketAddr};
use nix::mount::{mount, MsFlags};
use nix::sched::{setns, unshare, CloneFlags};

/// Interface index of loopback, fixed by the kernel in every namespace.
const LOOPBACK_INDEX: u32 = 1;

#[derive(Debug, thiserror::Error)]
pub enum NetnsError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{what}: {source}")]
    Sys { what: &'static str, source: nix::Error },
    #[error("bring loopback up: {0}")]
    Loopback(String),
}

/// Makes a new network namespace with loopback up, pinned at `pin`, and returns to the caller's
/// own namespace. The caller must be single-threaded: `unshare` moves only this thread.
pub fn create(pin: &Path) -> Result<(), NetnsError> {
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| NetnsError::Io { path, source }
    };
    let own = File::open("/proc/self/ns/net").map_err(io(Path::new("/proc/self/ns/net")))?;
    if let Some(dir) = pin.parent() {
        std::fs::create_dir_all(dir).map_err(io(dir))?;
    }
    File::create(pin).map_err(io(pin))?;
    unshare(CloneFlags::CLONE_NEWNET).map_err(|source| NetnsError::Sys { what: "unshare net", source })?;
    let made = pin_current(pin).and_then(|()| loopback_up());
    // Whatever happened, this thread goes home: PID 1 must stay in the machine's namespace.
    let back = setns(own.as_fd(), CloneFlags::CLONE_NEWNET)
        .map_err(|source| NetnsError::Sys { what: "setns back", source });
    made.and(back)
}

fn pin_current(pin: &Path) -> Result<(), NetnsError> {
    mount(Some("/proc/self/ns/net"), pin, None::<&str>, MsFlags::MS_BIND, None::<&str>)
        .map_err(|source| NetnsError::Sys { what: "bind the namespace", source })
}

/// Joins the namespace pinned at `pin`.
pub fn enter(pin: &Path) -> Result<(), NetnsError> {
    let ns = File::open(pin).map_err(|source| NetnsError::Io { path: pin.into(), source })?;
    setns(ns.as_fd(), CloneFlags::CLONE_NEWNET).map_err(|source| NetnsError::Sys { what: "setns", source })
}

/// `ip link set lo up` over rtnetlink, waiting for the kernel's acknowledgement.
pub fn loopback_up() -> Result<(), NetnsError> {
    let fail = |e: &dyn std::fmt::Display| NetnsError::Loopback(e.to_string());
    let mut link = LinkMessage::default();
    link.header.index = LOOPBACK_INDEX;
    link.header.flags = LinkFlags::Up;
    link.header.change_mask = LinkFlags::Up;
    let mut header = NetlinkHeader::default();
    header.flags = NLM_F_REQUEST | NLM_F_ACK;
    let mut msg = NetlinkMessage::new(header, NetlinkPayload::from(RouteNetlinkMessage::SetLink(link)));
    msg.finalize();
    let mut buf = vec![0u8; msg.buffer_len()];
    msg.serialize(&mut buf);
    let mut socket = Socket::new(NETLINK_ROUTE).map_err(|e| fail(&e))?;
    socket.bind_auto().map_err(|e| fail(&e))?;
    socket.connect(&SocketAddr::new(0, 0)).map_err(|e| fail(&e))?;
    socket.send(&buf, 0).map_err(|e| fail(&e))?;
    let mut reply = vec![0u8; 4096];
    let n = socket.recv(&mut &mut reply[..], 0).map_err(|e| fail(&e))?;
    let parsed = NetlinkMessage::<RouteNetlinkMessage>::deserialize(&reply[..n]).map_err(|e| fail(&e))?;
    match parsed.payload {
        NetlinkPayload::Error(e) if e.code.is_some() => Err(fail(&e.to_io())),
        NetlinkPayload::Error(_) => Ok(()),
        other => Err(fail(&format!("unexpected reply {other:?}"))),
    }
}
