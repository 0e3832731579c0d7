//! The network scrapers run on: the worker's own bridge network
//! ([`DEFAULT_NETWORK`] on the interface [`BRIDGE_NAME`], inter-container
//! traffic off), made at start, or the operator's `SCRAPER_NETWORK`; and
//! its packet filter ([`filter`]), installed where the worker can (root in
//! the host's network namespace) and otherwise printed for the operator.
//!
//! Owns the network's name, options and the container settings that go
//! with it. It must not touch the pipeline's containers nor any firewall
//! rule outside its own chains and jumps.

pub mod filter;

use std::collections::HashMap;

use crate::docker::{BridgeNetwork, DockerClient, DockerError, NetworkInfo};

pub use filter::{Filter, FilterError, FilterState};

/// The worker's own network's name.
pub const DEFAULT_NETWORK: &str = "zimfarm-scrapers";
/// Its bridge interface: fixed, so that the filter's rules can name it
/// before the network exists, and so that two processes making the
/// network at once cannot make two.
pub const BRIDGE_NAME: &str = "zimfarm0";
/// Docker's bridge driver options.
const OPT_BRIDGE_NAME: &str = "com.docker.network.bridge.name";
const OPT_ICC: &str = "com.docker.network.bridge.enable_icc";
/// Label on the worker's own network.
const LABEL_PURPOSE: &str = "org.openzim.zimfarm.purpose";

/// Where the host's resolvers are listed.
const RESOLV_CONF: &str = "/etc/resolv.conf";

#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error(transparent)]
    Docker(#[from] DockerError),
    #[error(
        "SCRAPER_NETWORK={0}: no such Docker network; create it (see the README's Environment \
         section) or unset SCRAPER_NETWORK for the worker's own"
    )]
    Missing(String),
    #[error(
        "the Docker network {name} exists with other options ({problem}); remove it \
         (`docker network rm {name}` once no container uses it) so that the worker makes it again, \
         or name your own in SCRAPER_NETWORK"
    )]
    NotOurs { name: String, problem: String },
}

/// The network offliners join.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScraperNetwork {
    pub name: String,
    /// Its bridge interface on the host, when it is a bridge network.
    pub bridge: Option<String>,
    /// Whether it is the worker's own (made and filtered by the worker).
    pub own: bool,
    /// Whether offliners get IPv6 turned off (the worker's own network,
    /// on a kernel that has IPv6).
    pub ipv6_off: bool,
}

/// The kernel setting that turns IPv6 off in a network namespace; absent
/// when the kernel has no IPv6 (`ipv6.disable=1`), and then a container
/// asking for it would not start.
const IPV6_SYSCTL: &str = "net.ipv6.conf.all.disable_ipv6";

/// Whether the kernel has IPv6 (its sysctl exists).
async fn kernel_has_ipv6() -> bool {
    let path = format!("/proc/sys/{}", IPV6_SYSCTL.replace('.', "/"));
    tokio::fs::try_exists(path).await.unwrap_or(false)
}

impl ScraperNetwork {
    /// Finds the operator's network, or makes (or finds) the worker's own.
    pub async fn prepare(
        docker: &DockerClient,
        configured: Option<&str>,
    ) -> Result<Self, NetError> {
        if let Some(name) = configured {
            let info = docker
                .network(name)
                .await?
                .ok_or_else(|| NetError::Missing(name.to_owned()))?;
            return Ok(Self {
                name: name.to_owned(),
                bridge: bridge_of(&info),
                own: false,
                ipv6_off: false,
            });
        }
        let info = docker.ensure_bridge_network(&own_network()).await?;
        check_own(&info)?;
        Ok(Self {
            name: DEFAULT_NETWORK.to_owned(),
            bridge: Some(BRIDGE_NAME.to_owned()),
            own: true,
            ipv6_off: kernel_has_ipv6().await,
        })
    }

    /// Finds the network without making it (for `check`): `None` when the
    /// worker's own does not exist yet.
    pub async fn find(
        docker: &DockerClient,
        configured: Option<&str>,
    ) -> Result<Option<Self>, NetError> {
        let name = configured.unwrap_or(DEFAULT_NETWORK);
        let Some(info) = docker.network(name).await? else {
            return match configured {
                Some(name) => Err(NetError::Missing(name.to_owned())),
                None => Ok(None),
            };
        };
        if configured.is_none() {
            check_own(&info)?;
        }
        Ok(Some(Self {
            name: name.to_owned(),
            bridge: bridge_of(&info),
            own: configured.is_none(),
            ipv6_off: configured.is_none() && kernel_has_ipv6().await,
        }))
    }

    /// The packet filter of this network's bridge, letting DNS through to
    /// the resolvers of this process's /etc/resolv.conf.
    pub async fn filter(&self) -> Option<Filter> {
        let bridge = self.bridge.as_deref()?;
        let text = tokio::fs::read_to_string(RESOLV_CONF)
            .await
            .unwrap_or_default();
        Some(Filter::new(
            bridge,
            &filter::resolvers(&text),
            kernel_has_ipv6().await,
        ))
    }

    /// Kernel settings of an offliner on this network: on the worker's own
    /// network (IPv4 only), IPv6 is off inside the container, so its
    /// link-local address cannot reach the host's bridge.
    pub fn sysctls(&self) -> HashMap<String, String> {
        if !self.ipv6_off {
            return HashMap::new();
        }
        HashMap::from([(IPV6_SYSCTL.to_owned(), "1".to_owned())])
    }

    /// Installs the filter at start when the worker can, and otherwise
    /// logs one line naming the problem (the commands are in the README
    /// and in `check`). An operator's network is left as it is.
    pub async fn install_filter(&self) {
        if !self.own {
            tracing::info!(network = %self.name, "SCRAPER_NETWORK: scrapers use the operator's network; its filter is the operator's (`zimfarm-worker check` reports it)");
            return;
        }
        let Some(filter) = self.filter().await else {
            return;
        };
        match filter.install().await {
            Ok(backend) => {
                tracing::info!(network = %self.name, bridge = %filter.bridge, %backend, "scrapers' packet filter in place")
            }
            Err(error) => tracing::warn!(
                network = %self.name,
                %error,
                "the worker cannot install the scrapers' packet filter: unless it is in place on the \
                 host, scrapers can reach the host, its LAN and cloud metadata; install the packet \
                 filter on the host with the commands that `zimfarm-worker check` prints (and says \
                 whether it is in place), see the README"
            ),
        }
    }
}

fn own_network() -> BridgeNetwork {
    BridgeNetwork {
        name: DEFAULT_NETWORK.to_owned(),
        options: HashMap::from([
            (OPT_BRIDGE_NAME.to_owned(), BRIDGE_NAME.to_owned()),
            (OPT_ICC.to_owned(), "false".to_owned()),
        ]),
        labels: HashMap::from([(LABEL_PURPOSE.to_owned(), "scrapers".to_owned())]),
    }
}

/// The worker's own network must be a bridge on [`BRIDGE_NAME`] with
/// inter-container traffic off.
fn check_own(info: &NetworkInfo) -> Result<(), NetError> {
    let option = |key: &str| info.options.get(key).map(String::as_str);
    let problem = if info.driver != "bridge" {
        Some(format!("driver {} instead of bridge", info.driver))
    } else if option(OPT_BRIDGE_NAME) != Some(BRIDGE_NAME) {
        Some(format!(
            "bridge interface {:?} instead of {BRIDGE_NAME}",
            option(OPT_BRIDGE_NAME)
        ))
    } else if option(OPT_ICC) != Some("false") {
        Some("inter-container traffic is on".to_owned())
    } else {
        None
    };
    match problem {
        Some(problem) => Err(NetError::NotOurs {
            name: DEFAULT_NETWORK.to_owned(),
            problem,
        }),
        None => Ok(()),
    }
}

/// A bridge network's interface: the named one, else Docker's `br-<id>`.
fn bridge_of(info: &NetworkInfo) -> Option<String> {
    if info.driver != "bridge" {
        return None;
    }
    match info.options.get(OPT_BRIDGE_NAME) {
        Some(name) if !name.is_empty() => Some(name.clone()),
        _ => Some(format!("br-{}", info.id.get(..12)?)),
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;

    fn info(driver: &str, options: &[(&str, &str)]) -> NetworkInfo {
        NetworkInfo {
            id: "0123456789abcdef0123".to_owned(),
            driver: driver.to_owned(),
            options: options
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
        }
    }

    #[test]
    fn the_own_network_is_the_bridge_it_asks_for() {
        let made = own_network();
        let found = info(
            "bridge",
            &[(OPT_BRIDGE_NAME, BRIDGE_NAME), (OPT_ICC, "false")],
        );
        assert!(check_own(&found).is_ok());
        assert_eq!(made.options.len(), found.options.len());
        assert!(BRIDGE_NAME.len() <= 15, "an interface name holds 15 bytes");
    }

    #[test]
    fn a_foreign_network_of_the_same_name_is_refused() {
        for (found, word) in [
            (
                info("bridge", &[(OPT_BRIDGE_NAME, BRIDGE_NAME)]),
                "inter-container",
            ),
            (info("bridge", &[(OPT_ICC, "false")]), "bridge interface"),
            (info("macvlan", &[]), "macvlan"),
        ] {
            let error = check_own(&found).unwrap_err().to_string();
            assert!(
                error.contains(word) && error.contains("docker network rm"),
                "{error}"
            );
        }
    }

    #[test]
    fn an_operator_bridge_is_found_by_option_or_id() {
        assert_eq!(
            bridge_of(&info("bridge", &[(OPT_BRIDGE_NAME, "scr1")])).as_deref(),
            Some("scr1")
        );
        assert_eq!(
            bridge_of(&info("bridge", &[])).as_deref(),
            Some("br-0123456789ab")
        );
        assert_eq!(bridge_of(&info("macvlan", &[])), None);
    }

    #[test]
    fn ipv6_is_turned_off_only_when_asked() {
        let mut net = ScraperNetwork {
            name: DEFAULT_NETWORK.to_owned(),
            bridge: Some(BRIDGE_NAME.to_owned()),
            own: true,
            ipv6_off: true,
        };
        assert_eq!(net.sysctls()[IPV6_SYSCTL], "1");
        net.ipv6_off = false;
        assert!(net.sysctls().is_empty());
    }

    #[tokio::test]
    async fn the_ipv6_sysctl_is_where_the_kernel_has_it() {
        let has = kernel_has_ipv6().await;
        assert_eq!(
            has,
            Path::new("/proc/sys/net/ipv6/conf/all/disable_ipv6").exists()
        );
    }
}
