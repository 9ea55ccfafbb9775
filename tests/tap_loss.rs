//! `--exit-on-tap-loss`: when the tap vanishes under traffic, vutap exits with status 75
//! (EX_TEMPFAIL) and says why, so a supervisor can restart it once the device is back.
//! Needs root (it creates a tap).

mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use vutap_frontend::{FrontendOptions, NetFrontend, VirtioNetHdr};
use vutap_testbed::Vutap;

#[test]
fn test_tap_loss_exit_option_exits_75() {
    let _g = serial();
    let name = format!("vtl{}", unique());
    let sock = socket_path();
    let log = std::env::temp_dir().join(format!("{name}.log"));
    let mut child = Command::new(Vutap::binary().unwrap())
        .args(["--socket", sock.to_str().unwrap(), "--tap", &name, "--exit-on-tap-loss"])
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    assert!(wait_until(Duration::from_secs(10), || sock.exists()), "vutap did not listen");
    let mut fe = NetFrontend::connect(&sock, FrontendOptions::default()).expect("handshake");
    let frame = test_frame([0xff; 6], [0x52, 0x54, 0, 0, 0, 1], 200, 1);
    fe.send_frame(0, &VirtioNetHdr::default(), &frame).unwrap();
    sh("ip", &["link", "del", &name]);
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        // Keep frames coming: the worker notices the loss on its next write or read.
        let _ = fe.send_frame(0, &VirtioNetHdr::default(), &frame);
        if let Some(s) = child.try_wait().unwrap() {
            break Some(s);
        }
        if Instant::now() > deadline {
            break None;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    let Some(status) = status else {
        let _ = child.kill();
        panic!("vutap did not exit after its tap was deleted:\n{text}");
    };
    assert_eq!(status.code(), Some(75), "{text}");
    assert!(text.contains("exiting with status 75 (--exit-on-tap-loss)"), "{text}");
    let _ = std::fs::remove_file(&log);
    let _ = std::fs::remove_file(&sock);
}
