//! Frames for the packet-level tests (`tests/packet.rs`, `icmp.rs`, `dsr.rs`,
//! `decap.rs`): the lab's packets written by etherparse, checksums computed
//! from scratch, to feed the programs and to compare their output with,
//! byte for byte.
//!
//! A [`Frame`] starts as a client's packet arriving on the balancer's client
//! side (`CLIENT_MAC` to `LBC_MAC`, TTL 64, [`PAYLOAD`]); a test changes what
//! its case needs (`.to_backend(1).ttl(63)`, `.syn()`, ...) and writes it
//! with [`Frame::bytes`].

use std::net::IpAddr;

use etherparse::{
    IcmpEchoHeader, Icmpv4Type, Icmpv6Type, IpDscp, IpEcn, IpHeaders, Ipv4Header, Ipv4Options,
    Ipv6FlowLabel, Ipv6Header, PacketBuilder, TcpOptionElement, VlanId, icmpv4,
};
use lb_userspace::lab::{
    CLIENT_V4, CLIENT_V6, VIP_V4, VIP_V6, backend_mac,
    testrun::{CLIENT_MAC, LBB_MAC, LBC_MAC},
};

/// What the frames carry unless a test says otherwise.
pub const PAYLOAD: &[u8] = b"hello, backend";
/// The client's port.
pub const CPORT: u16 = 40000;

/// What rides on IP.
#[derive(Clone, Debug)]
pub enum Transport {
    /// TCP.
    Tcp(Tcp),
    /// UDP.
    Udp,
    /// ICMPv4; the payload is what it quotes.
    Icmpv4(Icmpv4Type),
    /// ICMPv6; the payload is what it quotes.
    Icmpv6(Icmpv6Type),
}

impl From<Icmpv4Type> for Transport {
    fn from(ty: Icmpv4Type) -> Self {
        Self::Icmpv4(ty)
    }
}

impl From<Icmpv6Type> for Transport {
    fn from(ty: Icmpv6Type) -> Self {
        Self::Icmpv6(ty)
    }
}

/// A TCP header's fields other than the ports.
#[derive(Clone, Debug)]
pub struct Tcp {
    /// Sequence number.
    seq: u32,
    /// Window.
    window: u16,
    /// The SYN flag.
    syn: bool,
    /// Acknowledgment number, with the ACK flag.
    ack: Option<u32>,
    /// Options.
    options: Vec<TcpOptionElement>,
}

/// An Ethernet frame with an IPv4 or IPv6 packet in it, to be written by
/// [`Frame::bytes`].
#[derive(Clone, Debug)]
pub struct Frame {
    /// Source MAC.
    smac: [u8; 6],
    /// Destination MAC.
    dmac: [u8; 6],
    /// An 802.1Q tag's VLAN ID.
    vlan: Option<u16>,
    /// Source address; of the destination's family.
    src: IpAddr,
    /// Destination address.
    dst: IpAddr,
    /// TTL (IPv4) or hop limit (IPv6).
    ttl: u8,
    /// DSCP and ECN: the IPv4 TOS byte, or the IPv6 traffic class.
    tos: u8,
    /// IPv4 "don't fragment" (set by default, as etherparse sets it).
    df: bool,
    /// IPv4 options (a multiple of 4 bytes).
    ip_options: Vec<u8>,
    /// IPv6 flow label.
    flow_label: u32,
    /// Source port (TCP, UDP).
    sport: u16,
    /// Destination port (TCP, UDP).
    dport: u16,
    /// TCP, UDP or ICMP.
    transport: Transport,
    /// What follows the transport header.
    payload: Vec<u8>,
}

impl Frame {
    /// A client's packet to the balancer: `CLIENT_MAC` to `LBC_MAC`, TTL 64,
    /// carrying [`PAYLOAD`].
    fn new(src: IpAddr, dst: IpAddr, sport: u16, dport: u16, transport: Transport) -> Self {
        Self {
            smac: CLIENT_MAC,
            dmac: LBC_MAC,
            vlan: None,
            src,
            dst,
            ttl: 64,
            tos: 0,
            df: true,
            ip_options: Vec::new(),
            flow_label: 0,
            sport,
            dport,
            transport,
            payload: PAYLOAD.to_vec(),
        }
    }

    /// A TCP segment without flags: sequence number 0x01020304 and window
    /// 8192 over IPv4, 7 and 1000 over IPv6 (what the tests have always sent).
    pub fn tcp(src: impl Into<IpAddr>, dst: impl Into<IpAddr>, sport: u16, dport: u16) -> Self {
        let src = src.into();
        let (seq, window) = if src.is_ipv4() {
            (0x0102_0304, 8192)
        } else {
            (7, 1000)
        };
        let tcp = Tcp {
            seq,
            window,
            syn: false,
            ack: None,
            options: Vec::new(),
        };
        Self::new(src, dst.into(), sport, dport, Transport::Tcp(tcp))
    }

    /// A UDP datagram.
    pub fn udp(src: impl Into<IpAddr>, dst: impl Into<IpAddr>, sport: u16, dport: u16) -> Self {
        Self::new(src.into(), dst.into(), sport, dport, Transport::Udp)
    }

    /// An ICMP message of type `ty` (an `Icmpv4Type` or `Icmpv6Type`, of the
    /// addresses' family) quoting `quote` (IP header onward).
    pub fn icmp(
        src: impl Into<IpAddr>,
        dst: impl Into<IpAddr>,
        ty: impl Into<Transport>,
        quote: &[u8],
    ) -> Self {
        Self::new(src.into(), dst.into(), 0, 0, ty.into()).payload(quote)
    }

    /// An echo request (id 1, sequence 1) carrying "ping", of `dst`'s family.
    pub fn echo_request(src: impl Into<IpAddr>, dst: impl Into<IpAddr>) -> Self {
        let (src, dst) = (src.into(), dst.into());
        let echo = IcmpEchoHeader { id: 1, seq: 1 };
        let ty = if dst.is_ipv4() {
            Transport::Icmpv4(Icmpv4Type::EchoRequest(echo))
        } else {
            Transport::Icmpv6(Icmpv6Type::EchoRequest(echo))
        };
        Self::new(src, dst, 0, 0, ty).payload(b"ping")
    }

    /// From `smac` to `dmac`.
    pub fn macs(mut self, smac: [u8; 6], dmac: [u8; 6]) -> Self {
        (self.smac, self.dmac) = (smac, dmac);
        self
    }

    /// As the balancer sends it to the client (`LBC_MAC` to `CLIENT_MAC`).
    pub fn to_client(self) -> Self {
        self.macs(LBC_MAC, CLIENT_MAC)
    }

    /// As the balancer sends it to lab backend `i` (`LBB_MAC` to its MAC).
    pub fn to_backend(self, i: usize) -> Self {
        self.macs(LBB_MAC, backend_mac(i))
    }

    /// As lab backend `i` sends it to the balancer (its MAC to `LBB_MAC`).
    pub fn from_backend(self, i: usize) -> Self {
        self.macs(backend_mac(i), LBB_MAC)
    }

    /// With an 802.1Q tag of VLAN `id`.
    pub fn vlan(mut self, id: u16) -> Self {
        self.vlan = Some(id);
        self
    }

    /// With TTL (hop limit) `ttl`.
    pub fn ttl(mut self, ttl: u8) -> Self {
        self.ttl = ttl;
        self
    }

    /// With DSCP and ECN `tos` (IPv4 TOS byte, IPv6 traffic class).
    pub fn tos(mut self, tos: u8) -> Self {
        self.tos = tos;
        self
    }

    /// With IPv4 "don't fragment" set or not.
    pub fn df(mut self, df: bool) -> Self {
        self.df = df;
        self
    }

    /// With IPv4 options `options` (the header grows by their length).
    pub fn ip_options(mut self, options: &[u8]) -> Self {
        self.ip_options = options.to_vec();
        self
    }

    /// With IPv6 flow label `label`.
    pub fn flow_label(mut self, label: u32) -> Self {
        self.flow_label = label;
        self
    }

    /// The TCP header, for the setters below.
    fn tcp_mut(&mut self) -> &mut Tcp {
        match &mut self.transport {
            Transport::Tcp(tcp) => tcp,
            other => panic!("not a TCP frame: {other:?}"),
        }
    }

    /// With the SYN flag.
    pub fn syn(mut self) -> Self {
        self.tcp_mut().syn = true;
        self
    }

    /// With the ACK flag and acknowledgment number `ack`.
    pub fn ack(mut self, ack: u32) -> Self {
        self.tcp_mut().ack = Some(ack);
        self
    }

    /// With TCP sequence number `seq`.
    pub fn seq(mut self, seq: u32) -> Self {
        self.tcp_mut().seq = seq;
        self
    }

    /// With TCP window `window`.
    pub fn window(mut self, window: u16) -> Self {
        self.tcp_mut().window = window;
        self
    }

    /// With TCP options `options`.
    pub fn tcp_options(mut self, options: &[TcpOptionElement]) -> Self {
        self.tcp_mut().options = options.to_vec();
        self
    }

    /// Carrying `payload` (an ICMP message: quoting it).
    pub fn payload(mut self, payload: &[u8]) -> Self {
        self.payload = payload.to_vec();
        self
    }

    /// Carrying 0x5a bytes, as many as make the IP packet `len` bytes long
    /// with the headers as they are now (options first, then this).
    pub fn ip_len(self, len: usize) -> Self {
        let headers = self.clone().payload(&[]).ip_packet().len();
        self.payload(&vec![0x5a; len - headers])
    }

    /// The frame's bytes, lengths and checksums filled in.
    pub fn bytes(&self) -> Vec<u8> {
        let eth = PacketBuilder::ethernet2(self.smac, self.dmac);
        let ip = match self.vlan {
            Some(id) => eth
                .single_vlan(VlanId::try_new(id).expect("a 12-bit VLAN ID"))
                .ip(self.ip_header()),
            None => eth.ip(self.ip_header()),
        };
        let mut v = Vec::new();
        match &self.transport {
            Transport::Tcp(t) => {
                let mut tcp = ip.tcp(self.sport, self.dport, t.seq, t.window);
                if t.syn {
                    tcp = tcp.syn();
                }
                if let Some(ack) = t.ack {
                    tcp = tcp.ack(ack);
                }
                if !t.options.is_empty() {
                    tcp = tcp.options(&t.options).expect("TCP options fit");
                }
                tcp.write(&mut v, &self.payload)
            }
            Transport::Udp => ip.udp(self.sport, self.dport).write(&mut v, &self.payload),
            Transport::Icmpv4(ty) => {
                assert!(self.dst.is_ipv4(), "ICMPv4 over IPv6");
                ip.icmpv4(ty.clone()).write(&mut v, &self.payload)
            }
            Transport::Icmpv6(ty) => {
                assert!(self.dst.is_ipv6(), "ICMPv6 over IPv4");
                ip.icmpv6(*ty).write(&mut v, &self.payload)
            }
        }
        .expect("build frame");
        v
    }

    /// The IP packet alone (IP header onward): what a tunnel or an ICMP
    /// error carries.
    pub fn ip_packet(&self) -> Vec<u8> {
        let link = if self.vlan.is_some() { 18 } else { 14 };
        self.bytes().split_off(link)
    }

    /// The IP header; PacketBuilder fills in lengths, protocol and checksum.
    fn ip_header(&self) -> IpHeaders {
        match (self.src, self.dst) {
            (IpAddr::V4(src), IpAddr::V4(dst)) => IpHeaders::Ipv4(
                Ipv4Header {
                    dscp: IpDscp::try_new(self.tos >> 2).unwrap(),
                    ecn: IpEcn::try_new(self.tos & 3).unwrap(),
                    dont_fragment: self.df,
                    time_to_live: self.ttl,
                    source: src.octets(),
                    destination: dst.octets(),
                    options: Ipv4Options::try_from(&self.ip_options[..])
                        .expect("up to 40 bytes of options, a multiple of 4"),
                    ..Default::default()
                },
                Default::default(),
            ),
            (IpAddr::V6(src), IpAddr::V6(dst)) => {
                assert!(self.ip_options.is_empty(), "IPv4 options on IPv6");
                IpHeaders::Ipv6(
                    Ipv6Header {
                        traffic_class: self.tos,
                        flow_label: Ipv6FlowLabel::try_new(self.flow_label)
                            .expect("a 20-bit flow label"),
                        hop_limit: self.ttl,
                        source: src.octets(),
                        destination: dst.octets(),
                        ..Default::default()
                    },
                    Default::default(),
                )
            }
            (src, dst) => panic!("{src} and {dst} are of different families"),
        }
    }
}

/// ICMPv4 "fragmentation needed" with next-hop MTU `mtu`.
pub fn frag_needed(mtu: u16) -> Icmpv4Type {
    Icmpv4Type::DestinationUnreachable(icmpv4::DestUnreachableHeader::FragmentationNeeded {
        next_hop_mtu: mtu,
    })
}

/// The ICMPv4 error the balancer answers a client's frame `about` with:
/// from `VIP_V4`, precedence "internetwork control", no DF, quoting its
/// (20-byte) IP header and 8 bytes (RFC 792).
pub fn icmp4_from_vip(ty: Icmpv4Type, about: &[u8]) -> Vec<u8> {
    Frame::icmp(VIP_V4, CLIENT_V4, ty, &about[14..14 + 20 + 8])
        .to_client()
        .tos(0xc0)
        .df(false)
        .bytes()
}

/// The ICMPv6 error the balancer answers a client's frame `about` with:
/// from `VIP_V6`, quoting as much as fits in 1280 bytes (RFC 4443).
pub fn icmp6_from_vip(ty: Icmpv6Type, about: &[u8]) -> Vec<u8> {
    let end = about.len().min(14 + 1280 - 48);
    Frame::icmp(VIP_V6, CLIENT_V6, ty, &about[14..end])
        .to_client()
        .bytes()
}

/// Recomputes the header checksum of the IPv4 packet `ip` (header first),
/// after a test edited it; an IHL under 5 still sums 20 bytes.
pub fn fix_ipv4_checksum(ip: &mut [u8]) {
    let ihl = usize::from(ip[0] & 0x0f) * 4;
    ip[10..12].copy_from_slice(&[0, 0]);
    let sum = lb_common::csum::checksum(&ip[..ihl.max(20)]);
    ip[10..12].copy_from_slice(&sum.to_be_bytes());
}
