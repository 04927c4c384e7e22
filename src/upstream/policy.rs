//! Which addresses the gateway may connect to: the defence against
//! server-side request forgery (SPEC §6).
//!
//! An address is allowed when it is not one of the gateway's own addresses,
//! no `deny` network contains it, and `allow` is empty or contains it. Deny
//! wins over allow.
//!
//! Registration checks hosts written as IP literals, in every spelling the
//! system resolver accepts (`2852039166`, `0xA9FEA9FE`, `0251.0376.0251.0376`
//! and `169.254.43518` are all 169.254.169.254). A hostname is checked after
//! resolution, at connect time, in the one place every connection is made
//! (proxied calls and health checks alike), against the exact address then
//! connected to, so DNS rebinding cannot slip past.
//!
//! # The gateway's own addresses
//!
//! An instance at the gateway's own address would have `/call/...` reach
//! the gateway itself: its registry API, or a loop. Own means the listen
//! port together with the listen address or, when that is a wildcard
//! (`0.0.0.0`, `::`), any address that reaches this listener: loopback, the
//! unspecified address, and every address of the machine (eth0's, a VPN's,
//! ...). That is deliberately blind to the family: `::` takes IPv4
//! connections too unless `IPV6_V6ONLY` is set, and refusing a `0.0.0.0`
//! gateway's IPv6 address on its own port costs nothing real.
//!
//! The machine's addresses come from the OS (getifaddrs) and change while
//! the gateway runs (DHCP, interfaces coming up, VPNs), so they are neither
//! read once at start nor on every check (every new upstream connection is
//! checked, and getifaddrs is a netlink round trip): a list read at most
//! [`MACHINE_ADDRESSES_MAX_AGE`] ago is kept behind a read-write lock. A
//! check takes the read lock and compares; the first check after the list
//! has aged takes the write lock and reads it again, so no check ever uses
//! an older list, and checks wait for at most one read per interval. The
//! list is read only for a wildcard listen address and only for addresses
//! on the listen port, the first time one is checked. Should the OS refuse
//! to list them, the previous list is kept (with a warning) until the next
//! interval.
//!
//! # IPv4 embedded in IPv6
//!
//! An IPv6 address that carries an IPv4 address reaches, or can be made to
//! reach (a dual-stack socket, a tunnel, a NAT64 gateway), that IPv4
//! address, so it is judged by the IPv4 rules as well as the IPv6 ones. The
//! forms recognised are IPv4-mapped (`::ffff:0:0/96`), IPv4-compatible
//! (`::/96`, except `::` and `::1`, which keep their IPv6 meaning:
//! unspecified and loopback) and NAT64's well-known prefix (`64:ff9b::/96`).
//! Other translation prefixes (`64:ff9b:1::/48`, a network-specific NAT64
//! prefix, 6to4's `2002::/16`) are not: where they route, deny them.
//!
//! - Own address and `deny`: refused if either form is. `[::169.254.169.254]`
//!   and `[64:ff9b::a9fe:a9fe]` are 169.254.169.254 and denied by default;
//!   `deny = ["64:ff9b::/96"]` still shuts NAT64 out whatever it carries.
//! - `allow`: the IPv4 form alone decides. An allow-list names the
//!   destinations the gateway may reach, and the destination is the IPv4
//!   address: `allow = ["10.0.0.0/8"]` admits `[64:ff9b::a00:1]` as it
//!   admits `10.0.0.1` and `[::ffff:10.0.0.1]`. An IPv6 network in `allow`
//!   never admits an embedded address by itself, so `allow = ["::/0"]` (or
//!   `["64:ff9b::/96"]`) is no back door to IPv4 addresses the list leaves
//!   out; to reach 8.8.8.8 through NAT64, allow 8.8.8.8.

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::{Arc, PoisonError, RwLock};
use std::time::{Duration, Instant};

use ipnet::IpNet;

use crate::config::UpstreamsConfig;

/// How long a list of the machine's addresses is used before it is read
/// again: short enough that an address gained by DHCP or a new interface is
/// caught within a second, long enough that the OS is asked at most once a
/// second however many connections are made.
pub const MACHINE_ADDRESSES_MAX_AGE: Duration = Duration::from_secs(1);

#[derive(Debug, Clone)]
pub struct UpstreamPolicy {
    allow: Vec<IpNet>,
    deny: Vec<IpNet>,
    /// Counts the reloads that changed `allow` or `deny`: a pooled
    /// connection checked under an older generation is not reused.
    generation: u64,
    /// The listen address, IPv4-mapped IPv6 written as IPv4.
    own: SocketAddr,
    /// The machine's addresses, for a wildcard listen address only. Shared
    /// by the clones of the policy.
    machine: Option<Arc<MachineAddresses>>,
}

/// Why an address was refused, for the error message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    OwnAddress,
    Denied(IpNet),
    NotAllowed,
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::OwnAddress => f.write_str("it is the gateway's own listening address"),
            Self::Denied(net) => write!(f, "{net} is in upstreams.deny"),
            Self::NotAllowed => f.write_str("it is outside upstreams.allow"),
        }
    }
}

impl UpstreamPolicy {
    /// `own` is the address the gateway actually listens on.
    pub fn new(config: &UpstreamsConfig, own: SocketAddr) -> Self {
        Self::with_machine_addresses(config, own, Box::new(read_machine_addresses))
    }

    /// As [`new`](Self::new), the machine's addresses coming from `read`.
    fn with_machine_addresses(
        config: &UpstreamsConfig,
        own: SocketAddr,
        read: ReadAddresses,
    ) -> Self {
        let own = SocketAddr::new(own.ip().to_canonical(), own.port());
        Self {
            allow: config.allow.clone(),
            deny: config.deny.clone(),
            generation: 0,
            own,
            machine: own
                .ip()
                .is_unspecified()
                .then(|| Arc::new(MachineAddresses::new(read))),
        }
    }

    /// The policy with the networks of a reloaded `config`, the same own
    /// addresses; a new [`generation`](Self::generation) if the networks
    /// changed.
    pub fn with_networks(&self, config: &UpstreamsConfig) -> Self {
        let changed = self.allow != config.allow || self.deny != config.deny;
        Self {
            allow: config.allow.clone(),
            deny: config.deny.clone(),
            generation: self.generation + u64::from(changed),
            own: self.own,
            machine: self.machine.clone(),
        }
    }

    /// Which version of the networks this is: connections opened under
    /// another were checked against other rules.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// Whether the gateway may connect to `addr`.
    pub fn check(&self, addr: SocketAddr) -> Result<(), Refusal> {
        let written = addr.ip();
        let embedded = match written {
            IpAddr::V6(v6) => embedded_ipv4(v6).map(IpAddr::V4),
            IpAddr::V4(_) => None,
        };
        let forms = || std::iter::once(written).chain(embedded);
        if self.is_own(addr.port(), forms()) {
            return Err(Refusal::OwnAddress);
        }
        if let Some(net) = self
            .deny
            .iter()
            .find(|net| forms().any(|ip| net.contains(&ip)))
        {
            return Err(Refusal::Denied(*net));
        }
        let destination = embedded.unwrap_or(written);
        if !self.allow.is_empty() && !self.allow.iter().any(|net| net.contains(&destination)) {
            return Err(Refusal::NotAllowed);
        }
        Ok(())
    }

    /// The registration-time check: a host written as an IP literal (in any
    /// spelling) must pass [`check`](Self::check); a hostname passes here
    /// and is checked when connecting.
    pub fn check_host(&self, host: &str, port: u16) -> Result<(), Refusal> {
        match ip_literal(host) {
            Some(ip) => self.check(SocketAddr::new(ip, port)),
            None => Ok(()),
        }
    }

    /// Whether any of `forms` (one address as written and as the IPv4
    /// address it embeds) with `port` is the gateway's own.
    fn is_own(&self, port: u16, mut forms: impl Iterator<Item = IpAddr>) -> bool {
        if port != self.own.port() {
            return false;
        }
        let own = self.own.ip();
        match &self.machine {
            Some(machine) => {
                let machine = machine.current(Instant::now());
                forms.any(|ip| is_own_address(ip, own, &machine))
            }
            None => forms.any(|ip| is_own_address(ip, own, &[])),
        }
    }
}

/// Whether `ip`, on the listen port, reaches a gateway listening on `own`
/// on a machine whose addresses are `machine`: `own` itself or, when `own`
/// is a wildcard, loopback, the unspecified address and every address of
/// the machine, whatever the family.
fn is_own_address(ip: IpAddr, own: IpAddr, machine: &[IpAddr]) -> bool {
    ip == own
        || (own.is_unspecified()
            && (ip.is_loopback() || ip.is_unspecified() || machine.contains(&ip)))
}

/// The IPv4 address an IPv6 address carries, if it is IPv4-mapped
/// (`::ffff:0:0/96`), IPv4-compatible (`::/96`, but not `::` and `::1`,
/// which are the IPv6 unspecified and loopback addresses) or NAT64
/// (`64:ff9b::/96`).
pub fn embedded_ipv4(ip: Ipv6Addr) -> Option<Ipv4Addr> {
    let [.., a, b, c, d] = ip.octets();
    let carried = Some(Ipv4Addr::new(a, b, c, d));
    match ip.segments() {
        [0, 0, 0, 0, 0, 0xffff, _, _] => carried,
        [0, 0, 0, 0, 0, 0, _, _] if !ip.is_unspecified() && !ip.is_loopback() => carried,
        [0x64, 0xff9b, 0, 0, 0, 0, _, _] => carried,
        _ => None,
    }
}

type ReadAddresses = Box<dyn Fn() -> io::Result<Vec<IpAddr>> + Send + Sync>;

/// Every address of every interface of the machine, link-local included.
fn read_machine_addresses() -> io::Result<Vec<IpAddr>> {
    Ok(if_addrs::get_if_addrs()?
        .into_iter()
        .map(|interface| interface.ip())
        .collect())
}

/// The machine's addresses, read again once older than
/// [`MACHINE_ADDRESSES_MAX_AGE`] (see the module documentation).
struct MachineAddresses {
    list: RwLock<AddressList>,
    read: ReadAddresses,
}

struct AddressList {
    /// None until first read.
    read_at: Option<Instant>,
    addresses: Arc<[IpAddr]>,
}

impl AddressList {
    fn is_fresh(&self, now: Instant) -> bool {
        self.read_at
            .is_some_and(|at| now.saturating_duration_since(at) < MACHINE_ADDRESSES_MAX_AGE)
    }
}

impl MachineAddresses {
    fn new(read: ReadAddresses) -> Self {
        Self {
            list: RwLock::new(AddressList {
                read_at: None,
                addresses: Arc::from([]),
            }),
            read,
        }
    }

    /// The addresses as of at most [`MACHINE_ADDRESSES_MAX_AGE`] before
    /// `now`, read again if the list is older.
    fn current(&self, now: Instant) -> Arc<[IpAddr]> {
        {
            let list = self.list.read().unwrap_or_else(PoisonError::into_inner);
            if list.is_fresh(now) {
                return list.addresses.clone();
            }
        }
        let mut list = self.list.write().unwrap_or_else(PoisonError::into_inner);
        // Another check may have read them while this one waited.
        if !list.is_fresh(now) {
            match (self.read)() {
                Ok(addresses) => list.addresses = addresses.into(),
                Err(e) => tracing::warn!(
                    error = %e,
                    "cannot list the machine's addresses; the gateway's own addresses are \
                     judged by the previous list"
                ),
            }
            list.read_at = Some(now);
        }
        list.addresses.clone()
    }
}

impl std::fmt::Debug for MachineAddresses {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let list = self.list.read().unwrap_or_else(PoisonError::into_inner);
        f.debug_struct("MachineAddresses")
            .field("read_at", &list.read_at)
            .field("addresses", &list.addresses)
            .finish_non_exhaustive()
    }
}

/// `host` as an IP address if it is one: `[v6]`, or IPv4 in the forms
/// inet_aton(3) accepts (1 to 4 parts, each decimal, octal with a leading
/// 0, or hex with 0x), which is how the system resolver reads it.
pub fn ip_literal(host: &str) -> Option<IpAddr> {
    if let Some(v6) = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
        return v6.parse().ok();
    }
    if let Ok(ip) = host.parse::<IpAddr>() {
        return Some(ip);
    }
    loose_ipv4(host).map(IpAddr::V4)
}

fn loose_ipv4(host: &str) -> Option<Ipv4Addr> {
    let parts: Vec<u64> = host.split('.').map(loose_number).collect::<Option<_>>()?;
    let value = match parts.as_slice() {
        [a] => *a,
        [a, b] if *a <= 0xff && *b <= 0xff_ffff => a << 24 | b,
        [a, b, c] if *a <= 0xff && *b <= 0xff && *c <= 0xffff => a << 24 | b << 16 | c,
        [a, b, c, d] if [a, b, c, d].iter().all(|p| **p <= 0xff) => a << 24 | b << 16 | c << 8 | d,
        _ => return None,
    };
    u32::try_from(value).ok().map(Ipv4Addr::from)
}

fn loose_number(part: &str) -> Option<u64> {
    if part.is_empty() {
        return None;
    }
    let (digits, radix) =
        if let Some(hex) = part.strip_prefix("0x").or_else(|| part.strip_prefix("0X")) {
            (hex, 16)
        } else if part.len() > 1 && part.starts_with('0') {
            (&part[1..], 8)
        } else {
            (part, 10)
        };
    if digits.is_empty() {
        // "0x" alone is 0 to inet_aton.
        return (radix == 16).then_some(0);
    }
    u64::from_str_radix(digits, radix)
        .ok()
        .filter(|v| *v <= u64::from(u32::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(allow: &[&str], deny: &[&str], own: &str) -> UpstreamPolicy {
        let config = UpstreamsConfig {
            allow: allow.iter().map(|n| n.parse().unwrap()).collect(),
            deny: deny.iter().map(|n| n.parse().unwrap()).collect(),
        };
        UpstreamPolicy::new(&config, own.parse().unwrap())
    }

    fn default_policy() -> UpstreamPolicy {
        UpstreamPolicy::new(
            &UpstreamsConfig::default(),
            "127.0.0.1:8080".parse().unwrap(),
        )
    }

    #[test]
    fn metadata_address_in_every_spelling_is_an_ip_literal() {
        let metadata: IpAddr = "169.254.169.254".parse().unwrap();
        for spelling in [
            "169.254.169.254",
            "2852039166",
            "0xA9FEA9FE",
            "0xa9fea9fe",
            "0251.0376.0251.0376",
            "169.254.43518",
            "169.16689662",
            "0xa9.0xfe.0xa9.0xfe",
            "[::ffff:169.254.169.254]",
            "[::ffff:a9fe:a9fe]",
        ] {
            let ip = ip_literal(spelling).unwrap_or_else(|| panic!("{spelling} not read as an IP"));
            assert_eq!(ip.to_canonical(), metadata, "{spelling}");
            assert!(
                default_policy().check_host(spelling, 80).is_err(),
                "{spelling} allowed"
            );
        }
        for hostname in ["example.com", "1.2.3.4.5", "08", "0x", "256.1.1.1", "1e3"] {
            if let Some(ip) = ip_literal(hostname) {
                // Only what inet_aton itself accepts may come out.
                assert_eq!(hostname, "0x", "{hostname} read as {ip}");
            }
        }
    }

    #[test]
    fn new_networks_keep_the_own_address_and_count_a_generation() {
        let p = policy(&[], &[], "127.0.0.1:8080");
        assert!(p.check("10.0.0.1:80".parse().unwrap()).is_ok());
        let unchanged = p.with_networks(&UpstreamsConfig {
            allow: Vec::new(),
            deny: Vec::new(),
        });
        assert_eq!(unchanged.generation(), p.generation());
        let tightened = p.with_networks(&UpstreamsConfig {
            allow: Vec::new(),
            deny: vec!["10.0.0.0/8".parse().unwrap()],
        });
        assert_eq!(tightened.generation(), p.generation() + 1);
        assert!(tightened.check("10.0.0.1:80".parse().unwrap()).is_err());
        assert_eq!(
            tightened.check("127.0.0.1:8080".parse().unwrap()),
            Err(Refusal::OwnAddress)
        );
    }

    #[test]
    fn the_default_deny_list() {
        let p = default_policy();
        for denied in [
            "169.254.169.254:80",
            "169.254.1.1:80",
            "0.0.0.0:80",
            "0.1.2.3:80",
            "224.0.0.1:80",
            "[fe80::1]:80",
            "[::]:80",
            "[ff02::1]:80",
            "[::ffff:169.254.169.254]:80",
            "[::ffff:0.0.0.0]:80",
        ] {
            assert!(p.check(denied.parse().unwrap()).is_err(), "{denied}");
        }
        for allowed in [
            "127.0.0.1:9000",
            "10.0.0.5:80",
            "[::1]:9000",
            "8.8.8.8:53",
            "[2001:db8::1]:80",
        ] {
            assert_eq!(p.check(allowed.parse().unwrap()), Ok(()), "{allowed}");
        }
    }

    #[test]
    fn own_address_is_refused() {
        let p = policy(&[], &[], "127.0.0.1:8080");
        assert_eq!(
            p.check("127.0.0.1:8080".parse().unwrap()),
            Err(Refusal::OwnAddress)
        );
        assert_eq!(p.check("127.0.0.1:8081".parse().unwrap()), Ok(()));
        let everywhere = policy(&[], &[], "0.0.0.0:8080");
        for own in [
            "127.0.0.1:8080",
            "127.0.0.2:8080",
            "[::1]:8080",
            "0.0.0.0:8080",
        ] {
            assert_eq!(
                everywhere.check(own.parse().unwrap()),
                Err(Refusal::OwnAddress),
                "{own}"
            );
        }
    }

    #[test]
    fn allow_list_and_deny_precedence() {
        let p = policy(
            &["10.0.0.0/8", "fd00::/8"],
            &["10.9.0.0/16"],
            "127.0.0.1:8080",
        );
        assert_eq!(p.check("10.1.2.3:80".parse().unwrap()), Ok(()));
        assert_eq!(p.check("[fd00::7]:80".parse().unwrap()), Ok(()));
        assert_eq!(
            p.check("192.168.1.1:80".parse().unwrap()),
            Err(Refusal::NotAllowed)
        );
        assert!(matches!(
            p.check("10.9.1.1:80".parse().unwrap()),
            Err(Refusal::Denied(_))
        ));
    }

    fn ips(list: &[&str]) -> Vec<IpAddr> {
        list.iter().map(|ip| ip.parse().unwrap()).collect()
    }

    /// A policy whose machine has `machine` for addresses, and the number of
    /// times it listed them.
    fn policy_on_machine(
        own: &str,
        machine: &[&str],
    ) -> (UpstreamPolicy, Arc<std::sync::atomic::AtomicUsize>) {
        let reads = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let (counter, machine) = (reads.clone(), ips(machine));
        let p = UpstreamPolicy::with_machine_addresses(
            &UpstreamsConfig::default(),
            own.parse().unwrap(),
            Box::new(move || {
                counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                Ok(machine.clone())
            }),
        );
        (p, reads)
    }

    #[test]
    fn on_a_wildcard_every_address_of_the_machine_is_own() {
        let machine = ips(&["192.0.2.2", "fd00::2", "fe80::fc:ff:fe00:1", "127.0.0.1"]);
        for wildcard in ["0.0.0.0", "::"] {
            let own: IpAddr = wildcard.parse().unwrap();
            for ip in [
                "192.0.2.2",
                "fd00::2",
                "fe80::fc:ff:fe00:1",
                "127.0.0.1",
                "127.0.0.53",
                "::1",
                "0.0.0.0",
                "::",
            ] {
                assert!(
                    is_own_address(ip.parse().unwrap(), own, &machine),
                    "{ip} on {wildcard}"
                );
            }
            for ip in ["198.51.100.7", "192.0.2.3", "fd00::3", "10.0.0.1"] {
                assert!(
                    !is_own_address(ip.parse().unwrap(), own, &machine),
                    "{ip} on {wildcard}"
                );
            }
        }
        // Listening on one address, only that one is own.
        let own: IpAddr = "192.0.2.2".parse().unwrap();
        assert!(is_own_address(own, own, &machine));
        for ip in ["127.0.0.1", "fd00::2", "0.0.0.0"] {
            assert!(!is_own_address(ip.parse().unwrap(), own, &machine), "{ip}");
        }
    }

    #[test]
    fn the_machines_addresses_on_the_listen_port_are_refused() {
        for listen in ["0.0.0.0:8080", "[::]:8080", "[::ffff:0.0.0.0]:8080"] {
            let (p, _) = policy_on_machine(listen, &["192.0.2.2", "fd00::2"]);
            for own in [
                "192.0.2.2:8080",
                "[fd00::2]:8080",
                // The same address embedded in IPv6.
                "[::ffff:192.0.2.2]:8080",
                "[::192.0.2.2]:8080",
                "[64:ff9b::c000:202]:8080",
                "127.0.0.1:8080",
                "[::1]:8080",
            ] {
                assert_eq!(
                    p.check(own.parse().unwrap()),
                    Err(Refusal::OwnAddress),
                    "{own} listening on {listen}"
                );
            }
            for other in ["192.0.2.2:8081", "[fd00::2]:80", "192.0.2.3:8080"] {
                assert_eq!(p.check(other.parse().unwrap()), Ok(()), "{other}");
            }
            assert_eq!(p.check_host("192.0.2.2", 8080), Err(Refusal::OwnAddress));
            assert_eq!(p.check_host("3221225986", 8080), Err(Refusal::OwnAddress));
        }
    }

    #[test]
    fn the_machines_addresses_are_listed_only_when_they_matter() {
        use std::sync::atomic::Ordering::SeqCst;
        // Listening on one address: never.
        let (p, reads) = policy_on_machine("192.0.2.2:8080", &["192.0.2.2"]);
        assert_eq!(
            p.check("192.0.2.2:8080".parse().unwrap()),
            Err(Refusal::OwnAddress)
        );
        assert_eq!(p.check("10.0.0.1:8080".parse().unwrap()), Ok(()));
        assert_eq!(reads.load(SeqCst), 0);
        // On a wildcard: not before an address on the listen port is checked.
        let (p, reads) = policy_on_machine("0.0.0.0:8080", &["192.0.2.2"]);
        assert_eq!(p.check("192.0.2.2:80".parse().unwrap()), Ok(()));
        assert_eq!(reads.load(SeqCst), 0);
        assert_eq!(
            p.check("192.0.2.2:8080".parse().unwrap()),
            Err(Refusal::OwnAddress)
        );
        assert!(reads.load(SeqCst) >= 1);
        // Clones share the list.
        let before = reads.load(SeqCst);
        let clone = p.clone();
        assert!(Arc::ptr_eq(
            p.machine.as_ref().unwrap(),
            clone.machine.as_ref().unwrap()
        ));
        assert_eq!(reads.load(SeqCst), before);
    }

    #[test]
    fn the_machines_addresses_are_read_again_once_older_than_the_max_age() {
        use std::sync::Mutex;
        use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
        let reads = Arc::new(AtomicUsize::new(0));
        let listed: Arc<Mutex<io::Result<Vec<IpAddr>>>> =
            Arc::new(Mutex::new(Ok(ips(&["192.0.2.2"]))));
        let (counter, source) = (reads.clone(), listed.clone());
        let machine = MachineAddresses::new(Box::new(move || {
            counter.fetch_add(1, SeqCst);
            match &*source.lock().unwrap() {
                Ok(list) => Ok(list.clone()),
                Err(e) => Err(io::Error::new(e.kind(), e.to_string())),
            }
        }));
        let start = Instant::now();
        assert_eq!(&*machine.current(start), ips(&["192.0.2.2"]));
        assert_eq!(reads.load(SeqCst), 1);

        // DHCP hands out a new address: seen once the list has aged, not
        // before, and the OS is not asked in between.
        *listed.lock().unwrap() = Ok(ips(&["192.0.2.9", "fd00::9"]));
        let almost = start + MACHINE_ADDRESSES_MAX_AGE - Duration::from_millis(1);
        assert_eq!(&*machine.current(almost), ips(&["192.0.2.2"]));
        assert_eq!(reads.load(SeqCst), 1);
        let aged = start + MACHINE_ADDRESSES_MAX_AGE;
        assert_eq!(&*machine.current(aged), ips(&["192.0.2.9", "fd00::9"]));
        assert_eq!(reads.load(SeqCst), 2);
        assert_eq!(&*machine.current(aged), ips(&["192.0.2.9", "fd00::9"]));
        assert_eq!(reads.load(SeqCst), 2);

        // The OS refuses: the previous list stands, asked again only once
        // that attempt has aged too.
        *listed.lock().unwrap() = Err(io::Error::other("no netlink"));
        let later = aged + MACHINE_ADDRESSES_MAX_AGE;
        assert_eq!(&*machine.current(later), ips(&["192.0.2.9", "fd00::9"]));
        assert_eq!(&*machine.current(later), ips(&["192.0.2.9", "fd00::9"]));
        assert_eq!(reads.load(SeqCst), 3);
        *listed.lock().unwrap() = Ok(Vec::new());
        let recovered = later + MACHINE_ADDRESSES_MAX_AGE;
        assert!(machine.current(recovered).is_empty());
        assert_eq!(reads.load(SeqCst), 4);
    }

    #[test]
    fn the_real_machine_addresses_count_on_a_wildcard() {
        let machine = read_machine_addresses().expect("the machine's addresses");
        let p = policy(&[], &[], "0.0.0.0:8080");
        for ip in machine {
            assert_eq!(
                p.check(SocketAddr::new(ip, 8080)),
                Err(Refusal::OwnAddress),
                "{ip}"
            );
        }
    }

    #[test]
    fn embedded_ipv4_forms() {
        let metadata: Ipv4Addr = "169.254.169.254".parse().unwrap();
        for embedding in [
            "::ffff:169.254.169.254",
            "::ffff:a9fe:a9fe",
            "::169.254.169.254",
            "::a9fe:a9fe",
            "64:ff9b::a9fe:a9fe",
            "64:ff9b::169.254.169.254",
        ] {
            let v6: Ipv6Addr = embedding.parse().unwrap();
            assert_eq!(embedded_ipv4(v6), Some(metadata), "{embedding}");
        }
        let v6 = |s: &str| s.parse::<Ipv6Addr>().unwrap();
        assert_eq!(embedded_ipv4(v6("::2")), Some(Ipv4Addr::new(0, 0, 0, 2)));
        assert_eq!(embedded_ipv4(v6("::ffff:0:0")), Some(Ipv4Addr::UNSPECIFIED));
        for not_embedding in [
            "::",
            "::1",
            "64:ff9b:1::a9fe:a9fe",
            "64:ff9b::1:a9fe:a9fe",
            "::1:a9fe:a9fe",
            "::fffe:a9fe:a9fe",
            "2001:db8::a9fe:a9fe",
            "fe80::1",
        ] {
            assert_eq!(embedded_ipv4(v6(not_embedding)), None, "{not_embedding}");
        }
    }

    #[test]
    fn embedded_ipv4_is_judged_by_the_ipv4_rules() {
        let p = default_policy();
        let metadata: IpNet = "169.254.0.0/16".parse().unwrap();
        for denied in [
            "[::169.254.169.254]:80",
            "[::a9fe:a9fe]:80",
            "[64:ff9b::a9fe:a9fe]:80",
            "[::ffff:a9fe:a9fe]:80",
        ] {
            assert_eq!(
                p.check(denied.parse().unwrap()),
                Err(Refusal::Denied(metadata)),
                "{denied}"
            );
        }
        for denied in ["[::0.0.0.2]:80", "[64:ff9b::e000:1]:80"] {
            assert!(p.check(denied.parse().unwrap()).is_err(), "{denied}");
        }
        // ::1 and :: keep their IPv6 meaning.
        assert_eq!(p.check("[::1]:9000".parse().unwrap()), Ok(()));
        assert_eq!(
            p.check("[::]:80".parse().unwrap()),
            Err(Refusal::Denied("::/128".parse().unwrap()))
        );
        for allowed in ["[64:ff9b::808:808]:53", "[::127.0.0.1]:9000"] {
            assert_eq!(p.check(allowed.parse().unwrap()), Ok(()), "{allowed}");
        }
        for spelling in ["[::169.254.169.254]", "[64:ff9b::a9fe:a9fe]"] {
            assert!(p.check_host(spelling, 80).is_err(), "{spelling}");
        }
    }

    #[test]
    fn embedded_ipv4_deny_from_either_form_and_allow_from_the_ipv4_one() {
        // allow names destinations: the IPv4 address decides.
        let p = policy(&["10.0.0.0/8"], &[], "127.0.0.1:8080");
        for allowed in [
            "10.0.0.1:80",
            "[::ffff:10.0.0.1]:80",
            "[::a00:1]:80",
            "[64:ff9b::a00:1]:80",
        ] {
            assert_eq!(p.check(allowed.parse().unwrap()), Ok(()), "{allowed}");
        }
        assert_eq!(
            p.check("[64:ff9b::c0a8:101]:80".parse().unwrap()),
            Err(Refusal::NotAllowed)
        );
        // An IPv6 network in allow admits no embedded IPv4 by itself.
        let p = policy(&["::/0"], &[], "127.0.0.1:8080");
        assert_eq!(p.check("[2001:db8::1]:80".parse().unwrap()), Ok(()));
        for outside in [
            "192.168.1.1:80",
            "[::ffff:192.168.1.1]:80",
            "[::c0a8:101]:80",
            "[64:ff9b::c0a8:101]:80",
        ] {
            assert_eq!(
                p.check(outside.parse().unwrap()),
                Err(Refusal::NotAllowed),
                "{outside}"
            );
        }
        // deny: either form refuses, whatever allow says.
        let nat64: IpNet = "64:ff9b::/96".parse().unwrap();
        let p = policy(&["10.0.0.0/8"], &["64:ff9b::/96"], "127.0.0.1:8080");
        assert_eq!(
            p.check("[64:ff9b::a00:1]:80".parse().unwrap()),
            Err(Refusal::Denied(nat64))
        );
        assert_eq!(p.check("[::ffff:10.0.0.1]:80".parse().unwrap()), Ok(()));
        let p = policy(
            &["64:ff9b::/96", "10.0.0.0/8"],
            &["10.9.0.0/16"],
            "127.0.0.1:8080",
        );
        assert!(matches!(
            p.check("[64:ff9b::a09:101]:80".parse().unwrap()),
            Err(Refusal::Denied(_))
        ));
        // The listen address, embedded, is own.
        let p = policy(&[], &[], "127.0.0.1:8080");
        for own in [
            "[::ffff:127.0.0.1]:8080",
            "[::127.0.0.1]:8080",
            "[64:ff9b::7f00:1]:8080",
        ] {
            assert_eq!(
                p.check(own.parse().unwrap()),
                Err(Refusal::OwnAddress),
                "{own}"
            );
        }
    }

    #[test]
    fn hostnames_pass_registration_and_wait_for_resolution() {
        assert_eq!(
            default_policy().check_host("metadata.google.internal", 80),
            Ok(())
        );
    }
}
