//! The browser demo in Debian's headless Chromium against `rim standalone`:
//! two pages in one room see each other's messages and the online count.

mod support;

use std::process::Command;

#[test]
#[ignore = "needs Chromium and node's playwright-core: run deploy/test.sh"]
fn two_browser_pages_chat_in_one_room() {
    let dir = format!("{}/tests/browser", env!("CARGO_MANIFEST_DIR"));
    assert!(
        std::path::Path::new(&format!("{dir}/node_modules/playwright-core")).exists(),
        "playwright-core is not installed in {dir}: run deploy/test.sh (it runs npm ci there)"
    );
    let mut rim = support::start_standalone(
        "browser-test",
        &[("RIM_COMET__ROOM_REPORT_INTERVAL", "300ms")],
    );
    let api = rim.addr_after("http api serving");
    let out = Command::new("timeout")
        .args(["120", "node", "demo.mjs", &format!("http://{api}")])
        .current_dir(&dir)
        .output()
        .expect("node runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains("browser demo: ok"),
        "demo test failed ({:?}):\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    rim.stop();
}
