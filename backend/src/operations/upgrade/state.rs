//! The hand-over's state: what the fds do not carry, as versioned JSON. Every fd is named by its
//! index in the list sent alongside (SCM_RIGHTS), never by number.
//!
//! Compatibility: `major` changes when an older binary could not run a device from the state
//! (a field changes meaning, or a new one must be understood); `minor` when fields are only
//! added, with defaults (`#[serde(default)]`), so version N+1 reads N's state and N ignores
//! N+1's additions. A process refuses a state of another major version.

use serde::{Deserialize, Serialize};
use thiserror::Error;

/// The major version this build writes and accepts.
pub const STATE_MAJOR: u32 = 1;
/// The minor version this build writes.
pub const STATE_MINOR: u32 = 0;

#[derive(Debug, Error, PartialEq)]
pub enum StateError {
    #[error("hand-over state is not valid JSON for this vutap: {0}")]
    Parse(String),
    #[error("hand-over state has major version {got}, this vutap accepts only {STATE_MAJOR} (a newer or older vutap that cannot take over from this one; restart instead)")]
    Major { got: u32 },
    #[error("hand-over state names fd #{index} but only {count} fds came with it")]
    FdIndex { index: usize, count: usize },
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Version {
    pub major: u32,
    pub minor: u32,
}

impl Version {
    pub fn current() -> Self {
        Version { major: STATE_MAJOR, minor: STATE_MINOR }
    }
}

/// The whole process: its devices (in configuration order) and the listeners around them.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ProcessState {
    pub version: Version,
    pub devices: Vec<DeviceState>,
    /// `--metrics-addr`'s listener.
    #[serde(default)]
    pub metrics_tcp: Option<usize>,
    /// `--metrics-unix`'s listener.
    #[serde(default)]
    pub metrics_unix: Option<usize>,
    /// The control socket's listener (where `vutap upgrade` connects).
    #[serde(default)]
    pub control: Option<usize>,
}

fn link_up_default() -> bool {
    true
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct DeviceState {
    /// The vhost-user socket path: how the new process matches its configured devices.
    pub socket: String,
    pub label: String,
    pub name: String,
    pub macvtap: bool,
    pub mac: [u8; 6],
    pub mtu: u16,
    /// The link state last announced to the frontend.
    #[serde(default = "link_up_default")]
    pub link_up: bool,
    /// One tap queue fd per queue pair, still attached where a pair runs.
    pub tap_queues: Vec<usize>,
    /// The vhost-user listening socket (server mode).
    #[serde(default)]
    pub listener: Option<usize>,
    #[serde(default)]
    pub connection: Option<ConnectionState>,
    /// Per queue pair: counter name -> value.
    #[serde(default)]
    pub pair_counters: Vec<Vec<(String, u64)>>,
    /// Device counters: name -> value.
    #[serde(default)]
    pub device_counters: Vec<(String, u64)>,
}

/// A frontend connection in the middle of its life.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ConnectionState {
    pub stream: usize,
    /// SET_OWNER was received.
    pub owned: bool,
    /// The acked virtio features (SET_FEATURES), if any.
    pub features: Option<u64>,
    pub acked_protocol: u64,
    pub memory: Vec<RegionState>,
    #[serde(default)]
    pub log: Option<LogState>,
    pub vrings: Vec<VringState>,
    /// SET_BACKEND_REQ_FD's channel.
    #[serde(default)]
    pub backend_channel: Option<ChannelState>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct RegionState {
    pub guest_phys_addr: u64,
    pub memory_size: u64,
    pub user_addr: u64,
    pub mmap_offset: u64,
    pub fd: usize,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct LogState {
    pub size: u64,
    pub offset: u64,
    pub fd: usize,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ChannelState {
    pub fd: usize,
    pub config_acked: bool,
}

/// One ring as the frontend set it up, stopped at a batch boundary: `next_avail` includes the
/// rewind over RX chains the old process held; `next_used` is the used index in guest memory.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct VringState {
    pub size: u16,
    pub desc: u64,
    pub avail: u64,
    pub used: u64,
    pub next_avail: u16,
    pub kick: Option<usize>,
    pub call: Option<usize>,
    pub enabled: bool,
    pub started: bool,
}

impl ProcessState {
    pub fn to_json(&self) -> Vec<u8> {
        // Plain data with string keys: serialising it cannot fail.
        serde_json::to_vec(self).unwrap_or_default()
    }

    /// Parses a state and checks that this build can run it, before anything is touched.
    pub fn from_json(bytes: &[u8], fd_count: usize) -> Result<Self, StateError> {
        // The version first, so a future layout is refused for its version, not for a field.
        #[derive(Deserialize)]
        struct Head {
            version: Version,
        }
        let head: Head = serde_json::from_slice(bytes).map_err(|e| StateError::Parse(e.to_string()))?;
        if head.version.major != STATE_MAJOR {
            return Err(StateError::Major { got: head.version.major });
        }
        let state: ProcessState = serde_json::from_slice(bytes).map_err(|e| StateError::Parse(e.to_string()))?;
        if let Some(index) = state.fd_indices().into_iter().find(|&i| i >= fd_count) {
            return Err(StateError::FdIndex { index, count: fd_count });
        }
        Ok(state)
    }

    fn fd_indices(&self) -> Vec<usize> {
        let mut all: Vec<usize> = [self.metrics_tcp, self.metrics_unix, self.control].into_iter().flatten().collect();
        for d in &self.devices {
            all.extend(&d.tap_queues);
            all.extend(d.listener);
            if let Some(c) = &d.connection {
                all.push(c.stream);
                all.extend(c.memory.iter().map(|r| r.fd));
                all.extend(c.log.as_ref().map(|l| l.fd));
                all.extend(c.backend_channel.as_ref().map(|b| b.fd));
                for v in &c.vrings {
                    all.extend(v.kick);
                    all.extend(v.call);
                }
            }
        }
        all
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> ProcessState {
        ProcessState {
            version: Version::current(),
            devices: vec![DeviceState {
                socket: "/run/vutap/a.sock".into(),
                label: "mvt0".into(),
                name: "mvt0".into(),
                macvtap: true,
                mac: [0x52, 0x54, 0, 1, 2, 3],
                mtu: 1500,
                link_up: true,
                tap_queues: vec![0],
                listener: Some(1),
                connection: Some(ConnectionState {
                    stream: 2,
                    owned: true,
                    features: Some(0x1_0000_0000),
                    acked_protocol: 0x3,
                    memory: vec![RegionState {
                        guest_phys_addr: 0,
                        memory_size: 1 << 20,
                        user_addr: 0x7f00_0000_0000,
                        mmap_offset: 0,
                        fd: 3,
                    }],
                    log: None,
                    vrings: vec![VringState {
                        size: 256,
                        kick: Some(4),
                        call: Some(5),
                        enabled: true,
                        started: true,
                        ..Default::default()
                    }],
                    backend_channel: None,
                }),
                pair_counters: vec![vec![("tx_frames".into(), 7)]],
                device_counters: vec![],
            }],
            metrics_tcp: None,
            metrics_unix: None,
            control: Some(6),
        }
    }

    #[test]
    fn test_state_round_trips() {
        let s = sample();
        assert_eq!(ProcessState::from_json(&s.to_json(), 7).unwrap(), s);
    }

    #[test]
    fn test_state_of_a_newer_minor_with_unknown_fields_is_accepted() {
        let mut v: serde_json::Value = serde_json::from_slice(&sample().to_json()).unwrap();
        v["version"]["minor"] = (STATE_MINOR + 1).into();
        v["devices"][0]["something_new"] = "ignored".into();
        let parsed = ProcessState::from_json(&serde_json::to_vec(&v).unwrap(), 7).unwrap();
        assert_eq!(parsed.devices, sample().devices);
    }

    #[test]
    fn test_state_of_an_older_minor_without_optional_fields_is_accepted() {
        let mut v: serde_json::Value = serde_json::from_slice(&sample().to_json()).unwrap();
        v.as_object_mut().unwrap().remove("metrics_tcp");
        v["devices"][0].as_object_mut().unwrap().remove("pair_counters");
        let parsed = ProcessState::from_json(&serde_json::to_vec(&v).unwrap(), 7).unwrap();
        assert!(parsed.devices[0].pair_counters.is_empty());
    }

    #[test]
    fn test_state_of_another_major_is_refused_with_its_version() {
        let mut v: serde_json::Value = serde_json::from_slice(&sample().to_json()).unwrap();
        v["version"]["major"] = (STATE_MAJOR + 1).into();
        v["devices"] = "a layout this build does not know".into();
        let err = ProcessState::from_json(&serde_json::to_vec(&v).unwrap(), 7).unwrap_err();
        assert_eq!(err, StateError::Major { got: STATE_MAJOR + 1 });
        assert!(err.to_string().contains("major version 2, this vutap accepts only 1"), "{err}");
    }

    #[test]
    fn test_state_naming_a_missing_fd_is_refused() {
        let err = ProcessState::from_json(&sample().to_json(), 6).unwrap_err();
        assert_eq!(err, StateError::FdIndex { index: 6, count: 6 });
    }
}
