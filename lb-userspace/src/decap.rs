//! `lb decap`: the backend side of the balancer's `ipip` mode.
//!
//! Loads the `lb-decap` object (contract in `lb_common::decap`), attaches it
//! to one interface and pins the attachment and its maps in a per-interface
//! bpffs directory, so that it keeps decapsulating after the command exits.
//! `--from` restricts the outer sources decapsulated (others to a VIP are
//! dropped); without it any host that can reach the interface can tunnel
//! packets with a spoofed client source to the VIPs. Run again on the same
//! interface, it updates the VIP and source sets in place (new entries
//! first, then stale ones removed) and swaps the program in the pinned link
//! atomically: decapsulation never stops. `--detach` removes the directory,
//! which detaches the program; `--stats` reads the pinned maps.

use std::collections::BTreeSet;
use std::fs::File;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, anyhow, bail};
use aya::{
    Ebpf,
    maps::{
        Array, HashMap, Map, MapData, PerCpuArray,
        lpm_trie::{Key, LpmTrie},
    },
    programs::{
        Xdp, XdpMode,
        links::{FdLink, PinnedLink},
        xdp::XdpLink,
    },
};
use clap::Args;
use lb_common::{
    AddrKey, DECAP_MAPS, DecapLocal, DecapReason, DecapSettings, DecapSourceV4, DecapSourceV6,
    MAP_DECAP_LOCAL, MAP_DECAP_SETTINGS, MAP_DECAP_SOURCES_V4, MAP_DECAP_SOURCES_V6,
    MAP_DECAP_STATS, MAP_DECAP_VIPS, MAX_DECAP_LOCAL, MAX_DECAP_SOURCES, MAX_DECAP_VIPS,
    PROG_DECAP, Traffic,
};
use serde::{Deserialize, Serialize};

use crate::config::IpPrefix;
use crate::control::protocol::ReasonCount;
use crate::dataplane::{AttachedMode, pin};
use crate::dataplane::{addr_to_ip, ip_to_addr};

/// Root of the default pin directories, one per interface.
pub const PIN_ROOT: &str = "/sys/fs/bpf/lb-decap";
/// Name of the attachment's pin inside an interface's directory.
pub const LINK_PIN: &str = "link";
/// Environment variable naming the `lb-decap` object.
pub const OBJECT_ENV: &str = "LB_DECAP_BPF_OBJECT";

/// `lb decap` arguments.
#[derive(Debug, Clone, PartialEq, Args)]
pub struct DecapArgs {
    /// Interface the balancer's IP-in-IP packets arrive on.
    #[arg(long, short, value_name = "IF")]
    pub interface: String,
    /// VIP whose encapsulated packets are stripped (IPv4 or IPv6; repeat it
    /// or give a comma-separated list). The set replaces the interface's
    /// current one. The VIP must also be on a local interface, e.g. `lo`.
    #[arg(
        long = "vip",
        value_name = "ADDR",
        value_delimiter = ',',
        value_parser = parse_vip,
        required_unless_present_any = ["detach", "stats"],
        conflicts_with_all = ["detach", "stats"],
    )]
    pub vips: Vec<IpAddr>,
    /// Outer source prefix whose IP-in-IP packets are decapsulated (IPv4 or
    /// IPv6 CIDR, a bare address is a /32 or /128; repeat it or give a
    /// comma-separated list): the balancers' encapsulation sources. Packets
    /// to a VIP from any other outer source are dropped. The set replaces
    /// the interface's current one; without it, any source is accepted.
    #[arg(
        long = "from",
        value_name = "PREFIX",
        value_delimiter = ',',
        value_parser = parse_source,
        conflicts_with_all = ["detach", "stats"],
    )]
    pub from: Vec<IpPrefix>,
    /// Decapsulate only packets whose outer destination is one of the
    /// interface's addresses, read now (as the kernel's own tunnel takes
    /// only what is addressed to the host; others pass untouched, counted
    /// as pass_not_local). Run `lb decap` again when they change.
    #[arg(long, conflicts_with_all = ["detach", "stats"])]
    pub local_only: bool,
    /// Detach from the interface and remove the pinned maps.
    #[arg(long, conflicts_with = "stats")]
    pub detach: bool,
    /// Show the interface's VIPs and packet/byte counters by decision.
    #[arg(long)]
    pub stats: bool,
    /// With --stats: print JSON instead of a table.
    #[arg(long, requires = "stats")]
    pub json: bool,
    /// Act inside this network namespace (as `ip netns exec` would, but
    /// keeping the host's /sys/fs/bpf, so the pins outlive the command).
    #[arg(long, value_name = "NAME")]
    pub netns: Option<String>,
    /// bpffs directory for the attachment and maps (default:
    /// /sys/fs/bpf/lb-decap/IF, or /sys/fs/bpf/lb-decap/netns/NAME/IF with --netns).
    #[arg(long, value_name = "DIR")]
    pub pin_dir: Option<PathBuf>,
    /// The lb-decap eBPF object (default: $LB_DECAP_BPF_OBJECT, next to this
    /// binary, or the build tree).
    #[arg(long, value_name = "PATH")]
    pub bpf_object: Option<PathBuf>,
}

/// Parses a VIP: an IPv4 or IPv6 address a client can be served on.
pub fn parse_vip(s: &str) -> Result<IpAddr, String> {
    let ip: IpAddr = s.trim().parse().map_err(|_| {
        format!("{s:?} is not an IPv4 or IPv6 address (a VIP is given without a port)")
    })?;
    if ip.is_unspecified() || ip.is_multicast() || ip.is_loopback() {
        return Err(format!("{ip} cannot be a VIP"));
    }
    Ok(ip)
}

/// Parses an allowed outer source: an IPv4 or IPv6 prefix, host bits zero,
/// or a bare address (a /32 or /128).
pub fn parse_source(s: &str) -> Result<IpPrefix, String> {
    IpPrefix::parse(s.trim())
        .map_err(|why| format!("{s:?} is not an IPv4 or IPv6 address or prefix: {why}"))
}

/// Checks that `name` is a valid interface name, so it is also a safe path
/// component: 1-15 bytes, no '/', ':', whitespace or NUL, not "." or "..".
pub fn check_interface_name(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() < libc::IFNAMSIZ
        && name != "."
        && name != ".."
        && !name
            .bytes()
            .any(|b| b == b'/' || b == b':' || b == 0 || b.is_ascii_whitespace());
    if !ok {
        bail!("{name:?} is not a valid interface name");
    }
    Ok(())
}

/// The default pin directory of interface `iface` (in network namespace `netns`, if named).
pub fn default_pin_dir(iface: &str, netns: Option<&str>) -> PathBuf {
    let root = Path::new(PIN_ROOT);
    match netns {
        // Every namespace can have an `eth0`: each gets its own subtree.
        Some(ns) => root.join("netns").join(ns).join(iface),
        None => root.join(iface),
    }
}

/// Where the `lb-decap` object is looked for when no path is given.
pub fn default_object_path() -> Result<PathBuf> {
    if let Some(path) = std::env::var_os(OBJECT_ENV) {
        return Ok(PathBuf::from(path));
    }
    // Installed next to the `lb` binary, or in the workspace's xtask output.
    let mut candidates = Vec::new();
    if let Ok(exe) = std::env::current_exe()
        && let Some(dir) = exe.parent()
    {
        candidates.push(dir.join("lb-decap"));
    }
    candidates.push(
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../target/ebpf/bpfel-unknown-none/release/lb-decap"),
    );
    candidates.into_iter().find(|p| p.exists()).ok_or_else(|| {
        anyhow!(
            "cannot find the lb-decap eBPF object: build it with `cargo xtask build` or set {OBJECT_ENV}"
        )
    })
}

/// The `DECAP_VIPS` key of a VIP.
pub fn vip_key(ip: IpAddr) -> AddrKey {
    let (addr, family) = ip_to_addr(ip);
    AddrKey {
        addr,
        family,
        pad: [0; 3],
    }
}

/// The `DECAP_SOURCES_V4`/`_V6` key of a prefix, by family.
fn source_key(prefix: &IpPrefix) -> Result<Key<DecapSourceV4>, Key<DecapSourceV6>> {
    match prefix.addr {
        IpAddr::V4(a) => Ok(Key::new(prefix.len.into(), a.octets())),
        IpAddr::V6(a) => Err(Key::new(prefix.len.into(), a.octets())),
    }
}

/// The maps holding an interface's allowed outer sources.
struct SourceMaps {
    settings: Array<MapData, DecapSettings>,
    v4: LpmTrie<MapData, DecapSourceV4, u8>,
    v6: LpmTrie<MapData, DecapSourceV6, u8>,
}

/// A map of the `lb-decap` object as the aya type `T`.
fn typed<T: TryFrom<Map, Error = aya::maps::MapError>>(map: Option<Map>, name: &str) -> Result<T> {
    let map = map.ok_or_else(|| anyhow!("eBPF object has no map {name}"))?;
    T::try_from(map).with_context(|| format!("map {name} has an unexpected type"))
}

impl SourceMaps {
    /// Takes the source maps out of a loaded object.
    fn take(bpf: &mut Ebpf) -> Result<Self> {
        Ok(Self {
            settings: typed(bpf.take_map(MAP_DECAP_SETTINGS), MAP_DECAP_SETTINGS)?,
            v4: typed(bpf.take_map(MAP_DECAP_SOURCES_V4), MAP_DECAP_SOURCES_V4)?,
            v6: typed(bpf.take_map(MAP_DECAP_SOURCES_V6), MAP_DECAP_SOURCES_V6)?,
        })
    }

    /// Whether only the prefixes in the tries are decapsulated.
    fn restricted(&self) -> Result<bool> {
        let settings = self
            .settings
            .get(&0, 0)
            .with_context(|| format!("reading {MAP_DECAP_SETTINGS}"))?;
        Ok(settings.restrict_sources != 0)
    }

    /// Every prefix in the tries.
    fn prefixes(&self) -> Result<BTreeSet<IpPrefix>> {
        let mut out = BTreeSet::new();
        for key in self.v4.keys() {
            let key = key.with_context(|| format!("reading {MAP_DECAP_SOURCES_V4}"))?;
            out.insert(IpPrefix {
                addr: IpAddr::from(key.data()),
                len: key.prefix_len() as u8,
            });
        }
        for key in self.v6.keys() {
            let key = key.with_context(|| format!("reading {MAP_DECAP_SOURCES_V6}"))?;
            out.insert(IpPrefix {
                addr: IpAddr::from(key.data()),
                len: key.prefix_len() as u8,
            });
        }
        Ok(out)
    }

    /// Makes `wanted` the allowed sources (empty: any source). New prefixes
    /// go in before the restriction is switched on and stale ones leave after
    /// it is switched off or rewritten: no allowed source is refused meanwhile.
    fn sync(&mut self, wanted: &BTreeSet<IpPrefix>) -> Result<()> {
        let old = self.prefixes()?;
        for prefix in wanted.difference(&old) {
            let result = match source_key(prefix) {
                Ok(k) => self.v4.insert(&k, 1, 0),
                Err(k) => self.v6.insert(&k, 1, 0),
            };
            result.with_context(|| format!("adding {prefix} to the allowed sources"))?;
        }
        let settings = DecapSettings {
            restrict_sources: u32::from(!wanted.is_empty()),
        };
        self.settings
            .set(0, settings, 0)
            .with_context(|| format!("writing {MAP_DECAP_SETTINGS}"))?;
        for prefix in old.difference(wanted) {
            let result = match source_key(prefix) {
                Ok(k) => self.v4.remove(&k),
                Err(k) => self.v6.remove(&k),
            };
            match result {
                Ok(()) | Err(aya::maps::MapError::KeyNotFound) => {}
                Err(e) => {
                    return Err(e)
                        .with_context(|| format!("removing {prefix} from the allowed sources"));
                }
            }
        }
        Ok(())
    }
}

/// `DECAP_LOCAL`'s value listing `addrs` (none: any outer destination).
fn local_list(addrs: &[IpAddr]) -> Result<DecapLocal> {
    if addrs.len() > MAX_DECAP_LOCAL {
        bail!(
            "{} addresses for --local-only; an interface takes at most {MAX_DECAP_LOCAL}",
            addrs.len()
        );
    }
    let mut list = DecapLocal {
        count: addrs.len() as u32,
        ..DecapLocal::default()
    };
    for (slot, ip) in list.addrs.iter_mut().zip(addrs) {
        *slot = vip_key(*ip);
    }
    Ok(list)
}

/// The addresses of `iface`, for `--local-only`.
fn interface_local(iface: &str) -> Result<Vec<IpAddr>> {
    let all = crate::config::host_addresses().context("getifaddrs")?;
    let mine: Vec<IpAddr> = all
        .into_iter()
        .filter(|(name, _)| name == iface)
        .map(|(_, ip)| ip)
        .collect();
    if mine.is_empty() {
        bail!("--local-only: {iface} has no address, so no packet would be decapsulated");
    }
    Ok(mine)
}

/// Refuses more prefixes of one family than `DECAP_SOURCES_V4`/`_V6` hold.
fn check_source_count(sources: &BTreeSet<IpPrefix>) -> Result<()> {
    for v6 in [false, true] {
        let n = sources.iter().filter(|p| p.addr.is_ipv6() == v6).count();
        if n > MAX_DECAP_SOURCES as usize {
            bail!(
                "{n} IPv{} source prefixes given; an interface takes at most {MAX_DECAP_SOURCES}",
                if v6 { 6 } else { 4 }
            );
        }
    }
    Ok(())
}

/// What `attach` did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attached {
    /// How the program was attached; `None` when an attachment pinned by an
    /// earlier run had its program replaced in place.
    pub mode: Option<AttachedMode>,
    /// VIPs now in `DECAP_VIPS`, sorted.
    pub vips: Vec<IpAddr>,
    /// VIPs that were not there before.
    pub added: usize,
    /// VIPs that were there and are not any more.
    pub removed: usize,
    /// Allowed outer source prefixes now, sorted; empty: any source.
    pub sources: Vec<IpPrefix>,
}

/// An interface's VIPs and counters, as `lb decap --stats` shows them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Status {
    /// VIPs in `DECAP_VIPS`, sorted.
    pub vips: Vec<IpAddr>,
    /// Allowed outer source prefixes (`a.b.c.d/n`), sorted; `None`: any source.
    pub sources: Option<Vec<String>>,
    /// Packets and bytes per `DecapReason`, in counter order.
    pub stats: Vec<ReasonCount>,
}

/// Holds an exclusive lock on a pin directory while one `lb decap` changes
/// it; another one on the same interface waits instead of interleaving.
fn lock(dir: &Path) -> Result<File> {
    use std::os::fd::AsRawFd;
    let file = File::open(dir).with_context(|| format!("opening {}", dir.display()))?;
    // SAFETY: flock on a file descriptor we own.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) } != 0 {
        return Err(std::io::Error::last_os_error())
            .with_context(|| format!("locking {}", dir.display()));
    }
    Ok(file)
}

/// Index of interface `name` in the current network namespace.
fn ifindex(name: &str) -> Result<u32> {
    check_interface_name(name)?;
    let c = std::ffi::CString::new(name).map_err(|_| anyhow!("bad interface name {name:?}"))?;
    // SAFETY: a valid NUL-terminated string.
    let index = unsafe { libc::if_nametoindex(c.as_ptr()) };
    if index == 0 {
        bail!("no interface {name} in this network namespace");
    }
    Ok(index)
}

/// Fails when pins made now would vanish with this process: /sys/fs/bpf is
/// not mounted and this process has another mount namespace than the one
/// that started it, as under `ip netns exec` (whose fresh /sys goes away
/// when the command exits, and with it the attachment).
fn check_pins_outlive_us() -> Result<()> {
    let bpffs_mounted = std::fs::read_to_string("/proc/self/mounts")
        .map(|m| {
            m.lines().any(|l| {
                let mut f = l.split_whitespace();
                matches!((f.nth(1), f.next()), (Some(pin::BPFFS), Some("bpf")))
            })
        })
        .unwrap_or(true);
    // SAFETY: getppid has no preconditions.
    let parent = unsafe { libc::getppid() };
    let own_mount_ns = match (
        std::fs::read_link("/proc/self/ns/mnt"),
        std::fs::read_link(format!("/proc/{parent}/ns/mnt")),
    ) {
        (Ok(ours), Ok(init)) => ours != init,
        _ => false,
    };
    if !bpffs_mounted && own_mount_ns {
        bail!(
            "{} is not mounted in this mount namespace (as under `ip netns exec`): the attachment would end with this command; use `lb decap --netns NAME` instead",
            pin::BPFFS
        );
    }
    Ok(())
}

/// Makes `wanted` the VIPs in `vip_map`, new ones first, then the stale
/// ones removed, so a VIP in both sets is never missing; returns how many
/// were added and removed.
fn sync_vips(
    vip_map: &mut HashMap<MapData, AddrKey, u8>,
    wanted: &BTreeSet<AddrKey>,
) -> Result<(usize, usize)> {
    let old: BTreeSet<AddrKey> = vip_map
        .keys()
        .collect::<Result<_, _>>()
        .with_context(|| format!("reading {MAP_DECAP_VIPS}"))?;
    for key in wanted.difference(&old) {
        vip_map
            .insert(key, 1, 0)
            .with_context(|| format!("updating {MAP_DECAP_VIPS}"))?;
    }
    for key in old.difference(wanted) {
        match vip_map.remove(key) {
            Ok(()) | Err(aya::maps::MapError::KeyNotFound) => {}
            Err(e) => return Err(e).with_context(|| format!("removing from {MAP_DECAP_VIPS}")),
        }
    }
    Ok((
        wanted.difference(&old).count(),
        old.difference(wanted).count(),
    ))
}

/// Attaches the object at `object` to `iface` (or updates an attachment an
/// earlier run pinned in `pin_dir`) and makes `vips` its VIP set,
/// `sources` its allowed outer sources (empty: any) and `local` its only
/// outer destinations (empty: any).
pub fn attach(
    object: &Path,
    iface: &str,
    pin_dir: &Path,
    vips: &[IpAddr],
    (sources, local): (&[IpPrefix], &[IpAddr]),
) -> Result<Attached> {
    ifindex(iface)?;
    let wanted: BTreeSet<AddrKey> = vips.iter().map(|ip| vip_key(*ip)).collect();
    if wanted.is_empty() {
        bail!("no VIP given (--vip ADDR)");
    }
    if wanted.len() > MAX_DECAP_VIPS as usize {
        bail!(
            "{} VIPs given; an interface takes at most {MAX_DECAP_VIPS}",
            wanted.len()
        );
    }
    let sources: BTreeSet<IpPrefix> = sources.iter().copied().collect();
    check_source_count(&sources)?;
    check_pins_outlive_us()?;
    // Undoes what this run pinned if a later step fails; pins of an earlier
    // run are left as they are.
    let mut guard = pin::StartGuard::new(pin_dir)?;
    let _lock = lock(pin_dir)?;
    // DECAP_STATS: an older one's missing slots read as zero (`--stats`).
    pin::check_compatible(
        object,
        pin_dir,
        &DECAP_MAPS,
        &[MAP_DECAP_STATS],
        "lb decap --detach",
    )?;
    let map_pins: Vec<(&str, PathBuf)> = DECAP_MAPS.iter().map(|m| (*m, pin_dir.join(m))).collect();
    let mut loader = aya::EbpfLoader::new();
    for (name, path) in &map_pins {
        guard.will_create(path);
        // Reused with its contents if an earlier run pinned it.
        loader.map_pin_path(name, path.as_path());
    }
    let mut bpf = loader
        .load_file(object)
        .with_context(|| format!("loading eBPF object {}", object.display()))?;
    let mut vip_map: HashMap<MapData, AddrKey, u8> =
        typed(bpf.take_map(MAP_DECAP_VIPS), MAP_DECAP_VIPS)?;
    let mut source_maps = SourceMaps::take(&mut bpf)?;
    let mut local_map: Array<MapData, DecapLocal> =
        typed(bpf.take_map(MAP_DECAP_LOCAL), MAP_DECAP_LOCAL)?;
    let prog: &mut Xdp = bpf
        .program_mut(PROG_DECAP)
        .ok_or_else(|| anyhow!("eBPF object has no program {PROG_DECAP}"))?
        .try_into()?;
    prog.load().context("the kernel refused the XDP program")?;

    let (added, removed) = sync_vips(&mut vip_map, &wanted)?;
    source_maps.sync(&sources)?;
    local_map
        .set(0, local_list(local)?, 0)
        .with_context(|| format!("writing {MAP_DECAP_LOCAL}"))?;

    let link_pin = pin_dir.join(LINK_PIN);
    let mode = if link_pin.exists() {
        replace_program(prog, iface, &link_pin)?;
        None
    } else {
        guard.will_create(&link_pin);
        Some(attach_new(prog, iface, &link_pin)?)
    };
    guard.commit();
    let mut now: Vec<IpAddr> = wanted
        .iter()
        .map(|k| addr_to_ip(&k.addr, k.family))
        .collect();
    now.sort();
    Ok(Attached {
        mode,
        vips: now,
        added,
        removed,
        sources: sources.into_iter().collect(),
    })
}

/// Swaps `prog` into the attachment pinned at `link_pin`, atomically: no
/// packet goes without a program meanwhile.
fn replace_program(prog: &mut Xdp, iface: &str, link_pin: &Path) -> Result<()> {
    let link = PinnedLink::from_pin(link_pin)
        .with_context(|| format!("opening pinned link {}", link_pin.display()))?;
    let fd: FdLink = link.into();
    let xdp_link = XdpLink::try_from(fd)
        .map_err(|e| anyhow!("pinned link {} is not an XDP link: {e}", link_pin.display()))?;
    // The link (and its pin) stays; only the handle this process got goes.
    prog.attach_to_link(xdp_link).with_context(|| {
        format!(
            "replacing the program attached to {iface} through {} (if the interface was re-created, run `lb decap --interface {iface} --detach` first)",
            link_pin.display()
        )
    })?;
    Ok(())
}

/// Attaches `prog` to `iface` in driver mode (generic if the driver cannot,
/// as the agent does) and pins the attachment at `link_pin`.
fn attach_new(prog: &mut Xdp, iface: &str, link_pin: &Path) -> Result<AttachedMode> {
    let (mode, id) = match prog.attach(iface, XdpMode::Driver) {
        Ok(id) => (AttachedMode::Driver, id),
        Err(err) => {
            tracing::warn!(%iface, error = %err, "native XDP attach failed; falling back to generic (skb) mode, which is slower");
            let id = prog
                .attach(iface, XdpMode::Skb)
                .with_context(|| format!("attaching XDP (generic) to {iface}"))?;
            (AttachedMode::Generic, id)
        }
    };
    let link = prog.take_link(id)?;
    let fd = FdLink::try_from(link).map_err(|e| {
        anyhow!("the attachment to {iface} cannot be pinned (the kernel has no XDP links?): {e}")
    })?;
    fd.pin(link_pin)
        .with_context(|| format!("pinning the link of {iface} at {}", link_pin.display()))?;
    Ok(mode)
}

/// Removes the attachment and maps pinned in `pin_dir` (removing the last
/// reference to the link detaches the program); returns whether there was one.
/// Empty directories left under `PIN_ROOT` go too.
pub fn detach(pin_dir: &Path) -> Result<bool> {
    if !pin_dir.exists() {
        return Ok(false);
    }
    {
        // Not while another run is changing it.
        let _lock = lock(pin_dir)?;
        pin::remove_all(pin_dir)?;
    }
    let mut parent = pin_dir.parent();
    while let Some(dir) = parent
        && dir.starts_with(PIN_ROOT)
    {
        // Fails (and stops) at the first directory still in use.
        if std::fs::remove_dir(dir).is_err() {
            break;
        }
        parent = dir.parent();
    }
    Ok(true)
}

/// Reads the VIPs and counters pinned in `pin_dir`.
pub fn status(pin_dir: &Path) -> Result<Status> {
    let pinned = |name: &str| -> Result<Map> {
        let path = pin_dir.join(name);
        if !path.exists() {
            bail!(
                "nothing attached: {} does not exist (attach with `lb decap --interface IF --vip ADDR`)",
                path.display()
            );
        }
        let data =
            MapData::from_pin(&path).with_context(|| format!("opening {}", path.display()))?;
        Map::from_map_data(data).with_context(|| format!("opening {}", path.display()))
    };
    let vip_map: HashMap<MapData, AddrKey, u8> =
        typed(Some(pinned(MAP_DECAP_VIPS)?), MAP_DECAP_VIPS)?;
    // An attachment made before `--from` existed has no source maps: any source.
    let sources = if pin_dir.join(MAP_DECAP_SETTINGS).exists() {
        let maps = SourceMaps {
            settings: typed(Some(pinned(MAP_DECAP_SETTINGS)?), MAP_DECAP_SETTINGS)?,
            v4: typed(Some(pinned(MAP_DECAP_SOURCES_V4)?), MAP_DECAP_SOURCES_V4)?,
            v6: typed(Some(pinned(MAP_DECAP_SOURCES_V6)?), MAP_DECAP_SOURCES_V6)?,
        };
        if maps.restricted()? {
            Some(maps.prefixes()?.iter().map(IpPrefix::to_string).collect())
        } else {
            None
        }
    } else {
        None
    };
    let stats_map: PerCpuArray<MapData, Traffic> = PerCpuArray::try_from(pinned(MAP_DECAP_STATS)?)
        .with_context(|| format!("map {MAP_DECAP_STATS} has an unexpected type"))?;
    let mut vips: Vec<IpAddr> = vip_map
        .keys()
        .map(|k| k.map(|k| addr_to_ip(&k.addr, k.family)))
        .collect::<Result<_, _>>()
        .with_context(|| format!("reading {MAP_DECAP_VIPS}"))?;
    vips.sort();
    let mut stats = Vec::new();
    for reason in DecapReason::ALL {
        let index = reason as u32;
        // A map pinned by an older `lb decap` may have fewer slots: those read as zero.
        let total = if index < stats_map.len() {
            let per_cpu = stats_map
                .get(&index, 0)
                .with_context(|| format!("reading {MAP_DECAP_STATS}"))?;
            per_cpu.iter().fold(Traffic::default(), |a, t| Traffic {
                packets: a.packets + t.packets,
                bytes: a.bytes + t.bytes,
            })
        } else {
            Traffic::default()
        };
        stats.push(ReasonCount {
            reason: reason.name().to_string(),
            packets: total.packets,
            bytes: total.bytes,
        });
    }
    Ok(Status {
        vips,
        sources,
        stats,
    })
}

/// The VIPs that are no address of any interface here: decapsulated packets
/// to them would not be delivered locally.
fn non_local(vips: &[IpAddr]) -> Vec<IpAddr> {
    let Ok(all) = crate::config::host_addresses() else {
        return Vec::new();
    };
    let local: BTreeSet<IpAddr> = all.into_iter().map(|(_, ip)| ip).collect();
    vips.iter()
        .filter(|v| !local.contains(v))
        .copied()
        .collect()
}

/// What to warn about the outer sources `attach` left: none restricted (any
/// host can inject), or a VIP family without an allowed source prefix (its
/// packets are all dropped).
pub fn source_warnings(iface: &str, done: &Attached) -> Vec<String> {
    if done.sources.is_empty() {
        return vec![format!(
            "no --from: any host that can reach {iface} can inject packets to the VIPs with a spoofed client source; restrict it with --from and the balancers' encapsulation source addresses (their encap_source_v4/_v6)"
        )];
    }
    let mut out = Vec::new();
    for v6 in [false, true] {
        let has_vip = done.vips.iter().any(|v| v.is_ipv6() == v6);
        let has_source = done.sources.iter().any(|p| p.addr.is_ipv6() == v6);
        if has_vip && !has_source {
            let family = if v6 { 6 } else { 4 };
            out.push(format!(
                "--from has no IPv{family} prefix: every tunnelled packet to the IPv{family} VIPs is dropped"
            ));
        }
    }
    out
}

/// Renders a `Status` as `lb decap --stats` prints it without `--json`.
pub fn status_text(iface: &str, status: &Status) -> String {
    let vips: Vec<String> = status.vips.iter().map(IpAddr::to_string).collect();
    format!(
        "interface {iface}, VIPs: {}\nouter sources: {}\n{}",
        if vips.is_empty() {
            "none".to_string()
        } else {
            vips.join(", ")
        },
        match &status.sources {
            Some(list) if !list.is_empty() => list.join(", "),
            // Restricted to nothing cannot be set by `lb decap`, but say so if found.
            Some(_) => "none".to_string(),
            None => "any".to_string(),
        },
        crate::control::cli::stats_table(&status.stats)
    )
}

/// Runs `lb decap` (the caller has already entered `--netns`).
pub fn run(args: &DecapArgs) -> Result<()> {
    check_interface_name(&args.interface)?;
    let pin_dir = args
        .pin_dir
        .clone()
        .unwrap_or_else(|| default_pin_dir(&args.interface, args.netns.as_deref()));
    if args.detach {
        if detach(&pin_dir)? {
            println!(
                "{}: detached; {} removed",
                args.interface,
                pin_dir.display()
            );
        } else {
            println!(
                "{}: nothing attached ({} does not exist)",
                args.interface,
                pin_dir.display()
            );
        }
        return Ok(());
    }
    if args.stats {
        let status = status(&pin_dir)?;
        if args.json {
            println!(
                "{}",
                serde_json::to_string_pretty(&status).context("encoding JSON")?
            );
        } else {
            print!("{}", status_text(&args.interface, &status));
        }
        return Ok(());
    }
    let object = match &args.bpf_object {
        Some(path) => path.clone(),
        None => default_object_path()?,
    };
    let local = match args.local_only {
        true => interface_local(&args.interface)?,
        false => Vec::new(),
    };
    let limits = (&args.from[..], &local[..]);
    let done = attach(&object, &args.interface, &pin_dir, &args.vips, limits)?;
    let how = match done.mode {
        Some(AttachedMode::Driver) => "attached in driver mode",
        Some(AttachedMode::Generic) => "attached in generic mode",
        Some(AttachedMode::Auto) => "attached",
        None => "updated in place",
    };
    let vips: Vec<String> = done.vips.iter().map(IpAddr::to_string).collect();
    let sources: Vec<String> = done.sources.iter().map(IpPrefix::to_string).collect();
    println!(
        "{}: {how}; VIPs {} ({} added, {} removed); outer sources {}; pinned in {}",
        args.interface,
        vips.join(", "),
        done.added,
        done.removed,
        if sources.is_empty() {
            "any".to_string()
        } else {
            sources.join(", ")
        },
        pin_dir.display()
    );
    for warning in source_warnings(&args.interface, &done) {
        eprintln!("lb decap: warning: {warning}");
    }
    for vip in non_local(&done.vips) {
        let len = if vip.is_ipv4() { 32 } else { 128 };
        eprintln!(
            "lb decap: warning: {vip} is no local address, so its decapsulated packets are not delivered here; add it to lo (`ip addr add {vip}/{len} dev lo`)"
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Debug, Parser)]
    struct Cli {
        #[command(flatten)]
        args: DecapArgs,
    }

    fn parse(args: &[&str]) -> Result<DecapArgs, clap::Error> {
        Cli::try_parse_from(std::iter::once("decap").chain(args.iter().copied())).map(|c| c.args)
    }

    #[test]
    fn vips_repeat_or_come_as_a_list() {
        let a = parse(&[
            "--interface",
            "eth0",
            "--vip",
            "198.18.100.1,fd00:18:100::1",
            "--vip",
            "198.18.100.2",
        ])
        .unwrap();
        let want: Vec<IpAddr> = ["198.18.100.1", "fd00:18:100::1", "198.18.100.2"]
            .iter()
            .map(|s| s.parse().unwrap())
            .collect();
        assert_eq!(a.vips, want);
        assert!(!a.detach && !a.stats);
    }

    #[test]
    fn bad_arguments_are_refused_clearly() {
        let err = parse(&["--interface", "eth0", "--vip", "198.18.100.1:80"]).unwrap_err();
        assert!(err.to_string().contains("without a port"), "{err}");
        let err = parse(&["--interface", "eth0", "--vip", "0.0.0.0"]).unwrap_err();
        assert!(err.to_string().contains("cannot be a VIP"), "{err}");
        assert!(parse(&["--interface", "eth0"]).is_err(), "a VIP is needed");
        assert!(parse(&["--interface", "eth0", "--detach", "--vip", "1.2.3.4"]).is_err());
        assert!(parse(&["--interface", "eth0", "--json"]).is_err());
        assert!(
            parse(&["--vip", "1.2.3.4"]).is_err(),
            "an interface is needed"
        );
        let a = parse(&["-i", "eth0", "--detach"]).unwrap();
        assert!(a.detach && a.vips.is_empty());
        let a = parse(&["-i", "eth0", "--stats", "--json"]).unwrap();
        assert!(a.stats && a.json);
    }

    #[test]
    fn interface_names_are_safe_path_components() {
        for good in ["eth0", "enp3s0f1", "veth-a.100", "x"] {
            check_interface_name(good).unwrap();
        }
        for bad in [
            "",
            ".",
            "..",
            "a/b",
            "../x",
            "eth0:1",
            "a b",
            "sixteen-chars-xx",
        ] {
            assert!(check_interface_name(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn pin_dirs_are_per_interface_and_namespace() {
        assert_eq!(
            default_pin_dir("eth0", None),
            Path::new("/sys/fs/bpf/lb-decap/eth0")
        );
        assert_eq!(
            default_pin_dir("eth0", Some("be1")),
            Path::new("/sys/fs/bpf/lb-decap/netns/be1/eth0")
        );
    }

    #[test]
    fn vip_keys_carry_the_family() {
        let k = vip_key("198.18.100.1".parse().unwrap());
        assert_eq!(k.family, lb_common::FAMILY_V4);
        assert_eq!(addr_to_ip(&k.addr, k.family).to_string(), "198.18.100.1");
        let k = vip_key("fd00:18:100::1".parse().unwrap());
        assert_eq!(k.family, lb_common::FAMILY_V6);
        assert_eq!(addr_to_ip(&k.addr, k.family).to_string(), "fd00:18:100::1");
    }

    #[test]
    fn status_renders_as_a_table() {
        let mut status = Status {
            vips: vec!["198.18.100.1".parse().unwrap()],
            sources: None,
            stats: vec![ReasonCount {
                reason: "decap_v4".into(),
                packets: 3,
                bytes: 300,
            }],
        };
        assert_eq!(
            status_text("eth0", &status),
            "interface eth0, VIPs: 198.18.100.1\nouter sources: any\nREASON    PACKETS  BYTES\ndecap_v4        3    300\n"
        );
        status.sources = Some(vec!["198.18.2.0/24".into(), "fd00:18:2::1/128".into()]);
        assert!(
            status_text("eth0", &status)
                .contains("\nouter sources: 198.18.2.0/24, fd00:18:2::1/128\n")
        );
    }

    #[test]
    fn sources_repeat_or_come_as_a_list_and_bare_addresses_are_hosts() {
        let a = parse(&[
            "-i",
            "eth0",
            "--vip",
            "198.18.100.1",
            "--from",
            "198.18.2.1,198.18.3.0/24",
            "--from",
            "fd00:18:2::/64",
        ])
        .unwrap();
        let got: Vec<String> = a.from.iter().map(ToString::to_string).collect();
        assert_eq!(got, ["198.18.2.1/32", "198.18.3.0/24", "fd00:18:2::/64"]);
        let a = parse(&["-i", "eth0", "--vip", "198.18.100.1", "--from", "fd00::1"]).unwrap();
        assert_eq!(a.from[0].len, 128);
        let a = parse(&["-i", "eth0", "--vip", "198.18.100.1"]).unwrap();
        assert!(a.from.is_empty(), "no --from: any source");
    }

    #[test]
    fn bad_sources_are_refused_naming_the_value() {
        for (bad, why) in [
            ("198.18.2.0/33", "prefix length"),
            ("198.18.2.1/24", "host bits are set"),
            ("bogus", "\"bogus\""),
            ("fd00::/129", "prefix length"),
            ("198.18.2.1:80", "\"198.18.2.1:80\""),
        ] {
            let err = parse(&["-i", "eth0", "--vip", "198.18.100.1", "--from", bad]).unwrap_err();
            let text = err.to_string();
            assert!(text.contains(bad) && text.contains(why), "{bad}: {text}");
        }
        assert!(parse(&["-i", "eth0", "--stats", "--from", "198.18.2.1"]).is_err());
        assert!(parse(&["-i", "eth0", "--detach", "--from", "198.18.2.1"]).is_err());
    }

    #[test]
    fn unrestricted_or_one_sided_sources_are_warned_about() {
        let vip = |s: &str| -> IpAddr { s.parse().unwrap() };
        let mut done = Attached {
            mode: None,
            vips: vec![vip("198.18.100.1"), vip("fd00:18:100::1")],
            added: 0,
            removed: 0,
            sources: Vec::new(),
        };
        let w = source_warnings("eth0", &done);
        assert_eq!(w.len(), 1, "one line: {w:?}");
        assert!(
            w[0].contains("any host") && w[0].contains("--from"),
            "{w:?}"
        );
        done.sources = vec![parse_source("198.18.2.1").unwrap()];
        let w = source_warnings("eth0", &done);
        assert_eq!(w.len(), 1, "{w:?}");
        assert!(w[0].contains("no IPv6 prefix"), "{w:?}");
        done.sources.push(parse_source("fd00:18:2::1").unwrap());
        assert!(source_warnings("eth0", &done).is_empty());
    }
}
