//! `vmbuild doctor` reports every capability with a status, in text and JSON.

use std::process::Command;

#[test]
fn doctor_reports_what_this_host_can_do() {
    let out = Command::new(env!("CARGO_BIN_EXE_vmbuild"))
        .args(["doctor", "--json"])
        .output()
        .unwrap();
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).expect("one JSON object");
    let findings = report["findings"].as_array().unwrap();
    let status = |check: &str| {
        findings
            .iter()
            .find(|f| f["check"] == check)
            .map(|f| f["status"].as_str().unwrap().to_owned())
    };
    // The test machines have QEMU, the kit, tun and root (CI installs them).
    for check in ["qemu", "qemu_vhost_user_fs", "guest_kit", "tun"] {
        assert_eq!(status(check).as_deref(), Some("ok"), "{check}: {report}");
    }
    // Whether KVM runs Linux here is the probe's answer either way, with a reason.
    if status("kvm_device").as_deref() == Some("ok") {
        let probe = findings
            .iter()
            .find(|f| f["check"] == "kvm_runs_linux")
            .expect("probe ran");
        assert!(!probe["detail"].as_str().unwrap().is_empty());
    }
    assert_eq!(report["usable"], true);
    assert_eq!(out.status.code(), Some(0));

    let text = Command::new(env!("CARGO_BIN_EXE_vmbuild"))
        .arg("doctor")
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&text.stdout).contains("vmbuild can run guests here."));
}
