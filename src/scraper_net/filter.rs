//! The packet filter of the scrapers' bridge: the iptables rules that keep
//! a scraper from the host, the link-local, private and shared address
//! ranges and other containers, as typed [`Step`]s that are either run
//! (the worker is root in the host's network namespace) or printed as the
//! shell commands an operator runs on the host, and verified for `check`.
//!
//! Owns the chains `ZIMFARM-SCRAPERS` (jumped to from `DOCKER-USER` for
//! IPv4 and from `FORWARD` for IPv6: forwarded traffic) and
//! `ZIMFARM-SCRAPERS-INPUT` (jumped to from `INPUT`: traffic to the host
//! itself, its bridge gateway and any port it listens on), both matched on
//! the bridge's interface name. It inserts its jumps and appends its rules
//! only when `-C` says they are missing, and never flushes, deletes or
//! reorders any rule; it must not touch Docker.

use std::fmt::Write as _;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

/// The chain of forwarded traffic from the bridge.
pub const FORWARD_CHAIN: &str = "ZIMFARM-SCRAPERS";
/// The chain of traffic from the bridge to the host itself.
pub const INPUT_CHAIN: &str = "ZIMFARM-SCRAPERS-INPUT";

/// IPv4 destinations a scraper may not reach through the host: "this"
/// network, RFC 1918 private ranges, CGNAT shared space (RFC 6598, often a
/// provider's or a VPN's internal network), loopback, link-local (cloud
/// metadata at 169.254.169.254), multicast and the reserved class E with
/// the broadcast address.
pub const BLOCKED_V4: &[&str] = &[
    "0.0.0.0/8",
    "10.0.0.0/8",
    "100.64.0.0/10",
    "127.0.0.0/8",
    "169.254.0.0/16",
    "172.16.0.0/12",
    "192.168.0.0/16",
    "224.0.0.0/4",
    "240.0.0.0/4",
];

/// Which iptables.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    V4,
    V6,
}

impl Family {
    pub fn binary(self) -> &'static str {
        match self {
            Self::V4 => "iptables",
            Self::V6 => "ip6tables",
        }
    }
}

/// Where a rule goes when it is missing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum At {
    /// At the end of the chain (the worker's own chains, in order).
    End,
    /// First in the chain (the jumps from chains others own, so that no
    /// earlier ACCEPT of theirs lets the traffic by).
    Top,
}

/// One idempotent step of the filter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// The chain exists.
    Chain { family: Family, chain: &'static str },
    /// The rule is in the chain.
    Rule {
        family: Family,
        chain: &'static str,
        args: Vec<String>,
        at: At,
    },
}

impl Step {
    fn family(&self) -> Family {
        match self {
            Self::Chain { family, .. } | Self::Rule { family, .. } => *family,
        }
    }

    /// The arguments that look whether the step is in place (exit 1 when
    /// it is not).
    fn check_argv(&self) -> Vec<&str> {
        match self {
            Self::Chain { chain, .. } => vec!["-w", "-n", "-L", chain],
            Self::Rule { chain, args, .. } => {
                let mut argv = vec!["-w", "-C", chain];
                argv.extend(args.iter().map(String::as_str));
                argv
            }
        }
    }

    /// The arguments that put the step in place.
    fn add_argv(&self) -> Vec<&str> {
        match self {
            Self::Chain { chain, .. } => vec!["-w", "-N", chain],
            Self::Rule {
                chain, args, at, ..
            } => {
                let mut argv = match at {
                    At::End => vec!["-w", "-A", chain],
                    At::Top => vec!["-w", "-I", chain, "1"],
                };
                argv.extend(args.iter().map(String::as_str));
                argv
            }
        }
    }
}

/// Why the filter cannot be installed or verified from this process.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FilterError {
    #[error("no {binary} in PATH: the worker cannot install or verify the scrapers' packet filter")]
    NoBinary { binary: &'static str },
    #[error(
        "the bridge {bridge} is not in this process's network namespace (the worker runs in a \
         container): the scrapers' packet filter must be installed on the host"
    )]
    OtherNamespace { bridge: String },
    #[error(
        "iptables ({backend}) has no DOCKER-USER chain: Docker uses the other iptables backend \
         (compare `iptables-legacy -S DOCKER-USER` and `iptables-nft -S DOCKER-USER`) or runs with \
         --iptables=false; install the filter with the iptables that Docker uses"
    )]
    NoDockerChain { backend: String },
    #[error("`{command}` failed: {problem}")]
    Command { command: String, problem: String },
}

/// What `check` finds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FilterState {
    /// Every rule and jump is there.
    InPlace { backend: String },
    /// These steps are missing.
    Missing { backend: String, missing: Vec<Step> },
}

/// The filter of one bridge.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Filter {
    pub bridge: String,
    pub steps: Vec<Step>,
}

fn args(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| (*s).to_owned()).collect()
}

impl Filter {
    /// The filter of `bridge`, letting DNS (port 53, UDP and TCP) through
    /// to `resolvers` (the host's, which may well be in a private range:
    /// Docker's embedded DNS asks them from inside the container's network
    /// namespace, so the query crosses the bridge). `ipv6`: the kernel has
    /// IPv6 (else `ip6tables` has no table to fill).
    pub fn new(bridge: &str, resolvers: &[IpAddr], ipv6: bool) -> Self {
        let mut steps = Vec::new();
        let v4_resolvers: Vec<String> = resolvers
            .iter()
            .filter(|ip| ip.is_ipv4() && !ip.is_loopback())
            .map(|ip| format!("{ip}/32"))
            .collect();
        let replies = args(&[
            "-m",
            "conntrack",
            "--ctstate",
            "RELATED,ESTABLISHED",
            "-j",
            "RETURN",
        ]);
        let dns = |chain: &'static str| {
            v4_resolvers.iter().flat_map(move |ip| {
                ["udp", "tcp"].map(|proto| Step::Rule {
                    family: Family::V4,
                    chain,
                    args: args(&["-d", ip, "-p", proto, "--dport", "53", "-j", "RETURN"]),
                    at: At::End,
                })
            })
        };
        let rule = |family, chain, list: Vec<String>| Step::Rule {
            family,
            chain,
            args: list,
            at: At::End,
        };
        // IPv4, forwarded: out to the internet, not to the blocked ranges.
        steps.push(Step::Chain {
            family: Family::V4,
            chain: FORWARD_CHAIN,
        });
        steps.push(rule(Family::V4, FORWARD_CHAIN, replies.clone()));
        steps.extend(dns(FORWARD_CHAIN));
        for range in BLOCKED_V4 {
            steps.push(rule(
                Family::V4,
                FORWARD_CHAIN,
                args(&["-d", range, "-j", "REJECT"]),
            ));
        }
        // IPv4, to the host itself: replies and DNS only.
        steps.push(Step::Chain {
            family: Family::V4,
            chain: INPUT_CHAIN,
        });
        steps.push(rule(Family::V4, INPUT_CHAIN, replies.clone()));
        steps.extend(dns(INPUT_CHAIN));
        steps.push(rule(Family::V4, INPUT_CHAIN, args(&["-j", "REJECT"])));
        // The jumps of each family after its chains: the chains are
        // complete when traffic enters them, and IPv4's are in place even
        // when IPv6's fail.
        let jump = |family, chain: &'static str, target: &str| Step::Rule {
            family,
            chain,
            args: args(&["-i", bridge, "-j", target]),
            at: At::Top,
        };
        steps.push(jump(Family::V4, "DOCKER-USER", FORWARD_CHAIN));
        steps.push(jump(Family::V4, "INPUT", INPUT_CHAIN));
        // IPv6 (on a kernel that has it): the worker's network has none, so
        // nothing is forwarded, and the host is reached only by replies
        // (link-local fe80::/10 to the bridge otherwise).
        if ipv6 {
            steps.push(Step::Chain {
                family: Family::V6,
                chain: FORWARD_CHAIN,
            });
            steps.push(rule(Family::V6, FORWARD_CHAIN, args(&["-j", "REJECT"])));
            steps.push(Step::Chain {
                family: Family::V6,
                chain: INPUT_CHAIN,
            });
            steps.push(rule(Family::V6, INPUT_CHAIN, replies));
            steps.push(rule(Family::V6, INPUT_CHAIN, args(&["-j", "REJECT"])));
            steps.push(jump(Family::V6, "FORWARD", FORWARD_CHAIN));
            steps.push(jump(Family::V6, "INPUT", INPUT_CHAIN));
        }
        Self {
            bridge: bridge.to_owned(),
            steps,
        }
    }

    /// The shell commands that install the filter, idempotent (each adds
    /// only what is missing), for an operator to run as root on the host.
    pub fn commands(&self) -> String {
        let mut text = String::new();
        for step in &self.steps {
            let bin = step.family().binary();
            // `-L` lists the chain: its output goes too.
            let quiet = match step {
                Step::Chain { .. } => ">/dev/null 2>&1",
                Step::Rule { .. } => "2>/dev/null",
            };
            let _ = writeln!(
                text,
                "{bin} {} {quiet} || {bin} {}",
                step.check_argv().join(" "),
                step.add_argv().join(" ")
            );
        }
        text
    }

    /// Installs what is missing; returns the iptables backend.
    pub async fn install(&self) -> Result<String, FilterError> {
        let backend = self.preflight().await?;
        for step in &self.steps {
            if present(step).await? {
                continue;
            }
            let made = run(step.family(), &step.add_argv()).await;
            // Another process may have made the chain meanwhile.
            if made.is_err() && !(matches!(step, Step::Chain { .. }) && present(step).await?) {
                made?;
            }
        }
        Ok(backend)
    }

    /// What is in place, when this process can look.
    pub async fn state(&self) -> Result<FilterState, FilterError> {
        let backend = self.preflight().await?;
        let mut missing = Vec::new();
        for step in &self.steps {
            if !present(step).await? {
                missing.push(step.clone());
            }
        }
        Ok(if missing.is_empty() {
            FilterState::InPlace { backend }
        } else {
            FilterState::Missing { backend, missing }
        })
    }

    /// Both binaries are there, the bridge is in this network namespace
    /// (else the rules would land in the wrong one), and Docker's
    /// `DOCKER-USER` chain is in this iptables (else Docker uses the other
    /// backend); returns `iptables --version`'s backend (`nf_tables` or
    /// `legacy`).
    async fn preflight(&self) -> Result<String, FilterError> {
        let families = self.steps.iter().map(Step::family);
        for family in [Family::V4, Family::V6] {
            if families.clone().any(|f| f == family) && find_in_path(family.binary()).is_none() {
                return Err(FilterError::NoBinary {
                    binary: family.binary(),
                });
            }
        }
        let bridge = Path::new("/sys/class/net").join(&self.bridge);
        if !tokio::fs::try_exists(&bridge).await.unwrap_or(false) {
            return Err(FilterError::OtherNamespace {
                bridge: self.bridge.clone(),
            });
        }
        let backend = backend(&run(Family::V4, &["--version"]).await?);
        let docker_user = Step::Chain {
            family: Family::V4,
            chain: "DOCKER-USER",
        };
        if !present(&docker_user).await? {
            return Err(FilterError::NoDockerChain { backend });
        }
        Ok(backend)
    }
}

/// `iptables v1.8.9 (nf_tables)` → `nf_tables`; older builds print no
/// backend and are legacy.
pub fn backend(version: &str) -> String {
    version
        .split_once('(')
        .and_then(|(_, rest)| rest.split_once(')'))
        .map_or("legacy", |(b, _)| b)
        .to_owned()
}

/// The first `name` in PATH.
fn find_in_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|p| p.is_file())
}

/// Whether a step is already in place (`-n -L` for a chain, `-C` for a
/// rule); a failure other than "not there" is an error.
async fn present(step: &Step) -> Result<bool, FilterError> {
    match run(step.family(), &step.check_argv()).await {
        Ok(_) => Ok(true),
        // iptables exits 1 for "no such rule / chain"; 2 and up for bad
        // usage, 4 for a missing permission or resource.
        Err(FilterError::Command { problem, .. }) if problem.starts_with("exit status 1:") => {
            Ok(false)
        }
        Err(error) => Err(error),
    }
}

/// Runs one iptables command; its stdout, or its exit status and stderr.
async fn run(family: Family, argv: &[&str]) -> Result<String, FilterError> {
    let command = format!("{} {}", family.binary(), argv.join(" "));
    let output = tokio::process::Command::new(family.binary())
        .args(argv)
        .kill_on_drop(true)
        .output()
        .await
        .map_err(|e| FilterError::Command {
            command: command.clone(),
            problem: e.to_string(),
        })?;
    if output.status.success() {
        return Ok(String::from_utf8_lossy(&output.stdout).into_owned());
    }
    let code = output.status.code().unwrap_or(-1);
    let stderr = String::from_utf8_lossy(&output.stderr);
    Err(FilterError::Command {
        command,
        problem: format!("exit status {code}: {}", stderr.trim()),
    })
}

/// The name servers of a resolv.conf text, as IP addresses (zone-scoped
/// IPv6 ones are skipped).
pub fn resolvers(resolv_conf: &str) -> Vec<IpAddr> {
    resolv_conf
        .lines()
        .filter_map(|line| {
            let mut words = line.split_whitespace();
            (words.next() == Some("nameserver"))
                .then(|| words.next())
                .flatten()
        })
        .filter_map(|addr| addr.parse().ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backend_names_nft_and_legacy() {
        assert_eq!(backend("iptables v1.8.9 (nf_tables)\n"), "nf_tables");
        assert_eq!(backend("iptables v1.8.7 (legacy)\n"), "legacy");
        assert_eq!(backend("iptables v1.6.1\n"), "legacy");
    }

    #[test]
    fn resolvers_are_read_from_resolv_conf() {
        let text = "# comment\nnameserver 10.255.255.53\nnameserver  ::1\nsearch x\nnameserver fe80::1%eth0\nnameserver bogus\n";
        let found: Vec<String> = resolvers(text).iter().map(ToString::to_string).collect();
        assert_eq!(found, ["10.255.255.53", "::1"]);
    }

    #[test]
    fn dns_is_let_through_before_the_private_ranges_are_rejected() {
        let filter = Filter::new(
            "zimfarm0",
            &["10.1.2.3".parse().unwrap(), "127.0.0.53".parse().unwrap()],
            true,
        );
        let text = filter.commands();
        let dns = text
            .find("-A ZIMFARM-SCRAPERS -d 10.1.2.3/32 -p udp --dport 53 -j RETURN")
            .expect("the resolver is let through");
        let private = text
            .find("-A ZIMFARM-SCRAPERS -d 10.0.0.0/8 -j REJECT")
            .expect("10/8 is rejected");
        assert!(dns < private, "{text}");
        assert!(
            !text.contains("127.0.0.53/32"),
            "loopback resolvers are Docker's own: {text}"
        );
        for range in BLOCKED_V4 {
            assert!(
                text.contains(&format!("-A {FORWARD_CHAIN} -d {range} -j REJECT")),
                "{range}"
            );
        }
    }

    #[test]
    fn jumps_come_after_their_familys_chains_match_the_bridge_and_go_first() {
        let filter = Filter::new("zimfarm0", &[], true);
        for family in [Family::V4, Family::V6] {
            let steps: Vec<&Step> = filter
                .steps
                .iter()
                .filter(|s| matches!(s, Step::Chain { family: f, .. } | Step::Rule { family: f, .. } if *f == family))
                .collect();
            let jumps: Vec<&Step> = steps
                .iter()
                .copied()
                .skip_while(|s| !matches!(s, Step::Rule { at: At::Top, .. }))
                .collect();
            assert_eq!(jumps.len(), 2, "{family:?}: {steps:?}");
            for step in jumps {
                let Step::Rule {
                    args, at, chain, ..
                } = step
                else {
                    panic!("a chain after the jumps: {step:?}");
                };
                assert_eq!(*at, At::Top);
                assert!(["DOCKER-USER", "INPUT", "FORWARD"].contains(chain));
                assert_eq!(args[..2], ["-i", "zimfarm0"]);
            }
        }
        let text = filter.commands();
        assert!(text.contains(
            "iptables -w -C DOCKER-USER -i zimfarm0 -j ZIMFARM-SCRAPERS 2>/dev/null || iptables -w -I DOCKER-USER 1 -i zimfarm0 -j ZIMFARM-SCRAPERS"
        ), "{text}");
        assert!(
            text.contains("ip6tables -w -I INPUT 1 -i zimfarm0 -j ZIMFARM-SCRAPERS-INPUT"),
            "{text}"
        );
        // Nothing that removes or reorders.
        for word in [" -F", " -D ", " -X", " -P ", " -R "] {
            assert!(!text.contains(word), "{word} in {text}");
        }
    }

    #[test]
    fn a_kernel_without_ipv6_gets_no_ip6tables_step() {
        let filter = Filter::new("zimfarm0", &[], false);
        assert!(!filter.commands().contains("ip6tables"));
        assert!(
            filter
                .commands()
                .contains("iptables -w -I INPUT 1 -i zimfarm0")
        );
    }

    #[test]
    fn the_input_chain_ends_with_a_reject_of_everything_else() {
        let filter = Filter::new("zimfarm0", &["192.168.1.1".parse().unwrap()], true);
        let input: Vec<&Vec<String>> = filter
            .steps
            .iter()
            .filter_map(|s| match s {
                Step::Rule {
                    family: Family::V4,
                    chain: INPUT_CHAIN,
                    args,
                    ..
                } => Some(args),
                _ => None,
            })
            .collect();
        assert_eq!(input.last().unwrap().join(" "), "-j REJECT");
        assert_eq!(
            input.len(),
            4,
            "replies, DNS over UDP and TCP, reject: {input:?}"
        );
    }
}
