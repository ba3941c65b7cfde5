//! systemd notifications: `READY=1` once migrations ran and the socket is
//! bound, `STOPPING=1` at shutdown, `STATUS=`, and watchdog pings when the
//! unit sets `WatchdogSec=`. Outside systemd (no `NOTIFY_SOCKET`) every call
//! does nothing.

use std::time::Duration;

use sd_notify::NotifyState;

pub fn ready(status: &str) {
    notify(&[NotifyState::Ready, NotifyState::Status(status)]);
}

pub fn stopping(status: &str) {
    notify(&[NotifyState::Stopping, NotifyState::Status(status)]);
}

pub fn watchdog() {
    notify(&[NotifyState::Watchdog]);
}

/// Half the unit's `WatchdogSec=`, if the watchdog is on for this process.
pub fn watchdog_interval() -> Option<Duration> {
    let mut usec = 0u64;
    if sd_notify::watchdog_enabled(false, &mut usec) && usec > 0 {
        Some(Duration::from_micros(usec) / 2)
    } else {
        None
    }
}

fn notify(states: &[NotifyState<'_>]) {
    if std::env::var_os("NOTIFY_SOCKET").is_none() {
        return;
    }
    if let Err(e) = sd_notify::notify(false, states) {
        log::warn!("systemd notify failed: {e}");
    }
}
