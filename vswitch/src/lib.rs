//! vswitch: vmbuild's in-process L2 learning switch, replacing `vde_switch`.
//!
//! * [`Switch`]: MAC learning per (VLAN, MAC) with aging and a bounded table, flooding of
//!   unknown unicast / broadcast / multicast, 802.1Q access and trunk ports, hub mode.
//! * Ports: [`InProcessPort`] (a function call per frame), [`tap::TapPort`] (Linux taps),
//!   [`stream::StreamPort`] (QEMU's `-netdev stream`), vhost-user-net,
//!   and the management console ([`mgmt`]).
//! * Frames are checked with etherparse; what cannot be forwarded is dropped and counted.

mod fast_hash;
pub mod frame;
pub mod inproc;
pub mod mac_table;
pub mod managed;
pub mod mgmt;
pub mod offload;
pub mod port;
pub use sockfile;
pub mod stream;
pub mod switch;
pub mod tap;
pub mod vde_plug;
pub mod vhost_user_net;
mod vhost_user_relay;

pub use inproc::InProcessPort;
pub use port::{PortId, PortSink, VlanMode};
pub use switch::{Switch, SwitchConfig};
