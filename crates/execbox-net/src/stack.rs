//! The server end of one sandbox's device: packets in and out of the TUN, the user-space TCP
//! stack, DNS, and one ordinary socket per admitted connection.

use std::net::{IpAddr, SocketAddr};
use std::os::fd::OwnedFd;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use netstack_smoltcp::StackBuilder;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::sniff::{self, Sniffed};
use crate::{SandboxNet, DEVICE_MTU, DNS_ADDRESS};

/// Most bytes read from a connection before its name (SNI, Host) must be known.
const MAX_SNIFF: usize = 16 * 1024;
/// How long the stack keeps a connection it closed first (TIME-WAIT, with its buffers): its
/// place among the sandbox's open connections is held as long, which bounds what the stack can
/// hold for one sandbox.
const LINGER: Duration = Duration::from_secs(11);
/// How long a connection on 443/80 may take to say which name it is for.
const SNIFF_TIMEOUT: Duration = Duration::from_secs(10);

/// Serves the sandbox's device until it goes away (the sandbox ended). Needs a tokio runtime.
pub fn start(tun: OwnedFd, net: Arc<SandboxNet>) -> std::io::Result<()> {
    let tun = Arc::new(execbox_jail::spawn::TunDevice::new(tun)?);
    let (stack, runner, _udp, listener) = StackBuilder::default()
        .enable_tcp(true)
        .enable_udp(false)
        .enable_icmp(false)
        .mtu(DEVICE_MTU as usize)
        .tcp_recv_buffer_size(net.config.tcp_window_bytes)
        .tcp_send_buffer_size(net.config.tcp_window_bytes)
        .build()?;
    let Some(mut listener) = listener else {
        return Err(std::io::Error::other("the stack has no TCP"));
    };
    let (mut to_stack, mut from_stack) = stack.split();
    let (end_tx, end_rx) = tokio::sync::watch::channel(false);

    // The stack's own work (timers, retransmissions).
    if let Some(runner) = runner {
        let mut end = end_rx.clone();
        tokio::spawn(async move {
            tokio::select! {
                r = runner => if let Err(e) = r { tracing::debug!(error = %e, "stack ended") },
                _ = end.changed() => {}
            }
        });
    }
    // Stack → device.
    {
        let tun = tun.clone();
        let mut end = end_rx.clone();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    pkt = from_stack.next() => match pkt {
                        Some(Ok(pkt)) => {
                            if tun.send(&pkt).await.is_err() {
                                break;
                            }
                        }
                        _ => break,
                    },
                    _ = end.changed() => break,
                }
            }
        });
    }
    // Connections.
    {
        let net = net.clone();
        let mut end = end_rx.clone();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    conn = listener.next() => match conn {
                        Some((stream, src, dst)) => {
                            tracing::debug!(%src, %dst, "connection from the sandbox");
                            tokio::spawn(relay(net.clone(), stream, dst));
                        }
                        None => break,
                    },
                    _ = end.changed() => break,
                }
            }
        });
    }
    // Device → stack, with admission of new connections and DNS handled here.
    tokio::spawn(async move {
        let mut buf = vec![0u8; DEVICE_MTU as usize + 64];
        loop {
            let n = match tun.recv(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            let packet = &buf[..n];
            match classify(packet) {
                Inbound::Tcp { syn: true, dst } => {
                    if let Err(why) = admit_new(&net, dst) {
                        tracing::debug!(%dst, %why, "connection refused");
                        net.counters.refused.fetch_add(1, Ordering::Relaxed);
                        if let Some(rst) = reset_for(packet) {
                            let _ = tun.send(&rst).await;
                        }
                        continue;
                    }
                    tracing::debug!(%dst, "connection admitted");
                    if to_stack.send(packet.to_vec()).await.is_err() {
                        break;
                    }
                }
                Inbound::Tcp { syn: false, .. } => {
                    if to_stack.send(packet.to_vec()).await.is_err() {
                        break;
                    }
                }
                Inbound::Dns { query, src } => {
                    let net = net.clone();
                    let tun = tun.clone();
                    tokio::spawn(async move {
                        if let Some(answer) = net.resolve(&query).await {
                            if let Some(reply) = udp_reply(src, &answer) {
                                let _ = tun.send(&reply).await;
                            }
                        }
                    });
                }
                Inbound::Other => {}
            }
        }
        let _ = end_tx.send(true);
    });
    Ok(())
}

fn admit_new(net: &SandboxNet, dst: SocketAddr) -> Result<(), String> {
    let open = net.counters.connections_open.load(Ordering::Relaxed);
    if open >= net.config.max_connections {
        return Err(format!(
            "{open} connections open (the most this sandbox may have)"
        ));
    }
    net.admit(dst.ip(), dst.port()).map(drop)
}

/// What came in from the device.
enum Inbound {
    /// TCP (the first packet of a connection when `syn`).
    Tcp { syn: bool, dst: SocketAddr },
    /// A DNS query to the sandbox's name server.
    Dns { query: Vec<u8>, src: SocketAddr },
    /// Everything else: dropped.
    Other,
}

fn classify(packet: &[u8]) -> Inbound {
    use etherparse::{NetSlice, SlicedPacket, TransportSlice};
    let Ok(sliced) = SlicedPacket::from_ip(packet) else {
        return Inbound::Other;
    };
    let Some(NetSlice::Ipv4(ip)) = sliced.net else {
        return Inbound::Other;
    };
    let (src_ip, dst_ip) = (ip.header().source_addr(), ip.header().destination_addr());
    match sliced.transport {
        Some(TransportSlice::Tcp(tcp)) => Inbound::Tcp {
            syn: tcp.syn() && !tcp.ack(),
            dst: SocketAddr::new(IpAddr::V4(dst_ip), tcp.destination_port()),
        },
        Some(TransportSlice::Udp(udp)) if dst_ip == DNS_ADDRESS && udp.destination_port() == 53 => {
            Inbound::Dns {
                query: udp.payload().to_vec(),
                src: SocketAddr::new(IpAddr::V4(src_ip), udp.source_port()),
            }
        }
        _ => Inbound::Other,
    }
}

/// The name server's answer to `to`.
fn udp_reply(to: SocketAddr, payload: &[u8]) -> Option<Vec<u8>> {
    let IpAddr::V4(dst) = to.ip() else {
        return None;
    };
    let builder =
        etherparse::PacketBuilder::ipv4(DNS_ADDRESS.octets(), dst.octets(), 64).udp(53, to.port());
    let mut out = Vec::with_capacity(builder.size(payload.len()));
    builder.write(&mut out, payload).ok()?;
    Some(out)
}

/// A TCP reset answering the SYN `packet`: the sandbox sees "connection refused" at once.
fn reset_for(packet: &[u8]) -> Option<Vec<u8>> {
    use etherparse::{NetSlice, SlicedPacket, TransportSlice};
    let sliced = SlicedPacket::from_ip(packet).ok()?;
    let (Some(NetSlice::Ipv4(ip)), Some(TransportSlice::Tcp(tcp))) = (sliced.net, sliced.transport)
    else {
        return None;
    };
    let builder =
        etherparse::PacketBuilder::ipv4(ip.header().destination(), ip.header().source(), 64)
            .tcp(tcp.destination_port(), tcp.source_port(), 0, 0)
            .rst()
            .ack(tcp.sequence_number().wrapping_add(1));
    let mut out = Vec::with_capacity(builder.size(0));
    builder.write(&mut out, &[]).ok()?;
    Some(out)
}

/// One admitted connection: the name check on 443/80, then an ordinary socket of the server
/// and bytes copied both ways, counted, until either side closes or the policy asks for every
/// connection to close.
async fn relay(net: Arc<SandboxNet>, mut inner: netstack_smoltcp::TcpStream, dst: SocketAddr) {
    // Checked again: the policy may have changed since the SYN.
    if let Err(why) = net.admit(dst.ip(), dst.port()) {
        tracing::debug!(%dst, %why, "connection refused");
        net.counters.refused.fetch_add(1, Ordering::Relaxed);
        return;
    }
    let c = &net.counters;
    c.connections.fetch_add(1, Ordering::Relaxed);
    c.connections_open.fetch_add(1, Ordering::Relaxed);
    let _open = OpenGuard(net.clone());
    let mut first = Vec::new();
    if matches!(dst.port(), 443 | 80) {
        match sniff_name(&mut inner, dst.port(), &mut first).await {
            Some(name) => {
                if let Err(why) = net.admit_name_on(&name, dst.ip(), dst.port()) {
                    tracing::debug!(%dst, %why, "connection refused");
                    c.refused.fetch_add(1, Ordering::Relaxed);
                    return;
                }
            }
            None => {
                // No name: only an address rule may admit it.
                if net.admit_name_on("", dst.ip(), dst.port()).is_err() {
                    c.refused.fetch_add(1, Ordering::Relaxed);
                    return;
                }
            }
        }
    }
    let connect = tokio::net::TcpStream::connect(dst);
    let mut outer = match tokio::time::timeout(net.config.connect_timeout, connect).await {
        Ok(Ok(s)) => s,
        _ => return,
    };
    let _ = outer.set_nodelay(true);
    if !first.is_empty() {
        if outer.write_all(&first).await.is_err() {
            return;
        }
        c.bytes_out.fetch_add(first.len() as u64, Ordering::Relaxed);
    }
    let mut generation = net.generation.subscribe();
    let (mut ir, mut iw) = tokio::io::split(inner);
    let (mut or, mut ow) = outer.split();
    let (up, down) = match &net.limits {
        Some((up, down)) => (Some(up), Some(down)),
        None => (None, None),
    };
    let out = copy_counted(&mut ir, &mut ow, &c.bytes_out, up);
    let back = copy_counted(&mut or, &mut iw, &c.bytes_in, down);
    tokio::pin!(out, back);
    let closed_first = tokio::select! {
        _ = &mut out => {
            tokio::select! { _ = &mut back => {}, _ = generation.changed() => {} }
            false
        }
        _ = &mut back => {
            tokio::select! { _ = &mut out => {}, _ = generation.changed() => {} }
            true
        }
        _ = generation.changed() => false,
    };
    if closed_first {
        // The stack closed first: it keeps the connection in TIME-WAIT; so is its place kept.
        tokio::spawn(async move {
            tokio::time::sleep(LINGER).await;
            drop(_open);
        });
    }
}

struct OpenGuard(Arc<SandboxNet>);

impl Drop for OpenGuard {
    fn drop(&mut self) {
        self.0
            .counters
            .connections_open
            .fetch_sub(1, Ordering::Relaxed);
    }
}

/// Reads the start of a connection until its name is known; the bytes read are kept in
/// `first` to be sent on.
async fn sniff_name(
    inner: &mut netstack_smoltcp::TcpStream,
    port: u16,
    first: &mut Vec<u8>,
) -> Option<String> {
    let read = async {
        let mut buf = [0u8; 4096];
        loop {
            let n = inner.read(&mut buf).await.ok()?;
            if n == 0 {
                return None;
            }
            first.extend_from_slice(&buf[..n]);
            let sniffed = if port == 443 {
                sniff::tls_server_name(first)
            } else {
                sniff::http_host(first)
            };
            match sniffed {
                Sniffed::Name(n) => return Some(n),
                Sniffed::None => return None,
                Sniffed::Incomplete if first.len() >= MAX_SNIFF => return None,
                Sniffed::Incomplete => {}
            }
        }
    };
    tokio::time::timeout(SNIFF_TIMEOUT, read)
        .await
        .ok()
        .flatten()
}

async fn copy_counted<R, W>(
    from: &mut R,
    to: &mut W,
    counter: &std::sync::atomic::AtomicU64,
    limit: Option<&crate::Limiter>,
) where
    R: tokio::io::AsyncRead + Unpin,
    W: tokio::io::AsyncWrite + Unpin,
{
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        if let Some(limit) = limit {
            limit.take(n).await;
        }
        if to.write_all(&buf[..n]).await.is_err() {
            break;
        }
        counter.fetch_add(n as u64, Ordering::Relaxed);
    }
    // Starts the close (a FIN after what is buffered) without waiting for it: the stack's side
    // reports a shutdown done only once the connection has left TIME-WAIT, seconds later.
    let _ = tokio::time::timeout(Duration::ZERO, to.shutdown()).await;
}
