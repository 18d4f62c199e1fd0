//! The browser demo in Debian's headless Chromium against `rim standalone`:
//! two pages in one room see each other's messages and the online count;
//! the chat view keeps two devices of one user and a second user in step,
//! through an offline spell, a reload and history paging.

mod support;

use std::process::Command;

/// Runs `script` (in tests/browser) with node against a fresh standalone and
/// asserts it printed `ok_line`.
fn run_in_chromium(script: &str, ok_line: &str) {
    let dir = format!("{}/tests/browser", env!("CARGO_MANIFEST_DIR"));
    assert!(
        std::path::Path::new(&format!("{dir}/node_modules/playwright-core")).exists(),
        "playwright-core is not installed in {dir}: run deploy/test.sh (it runs npm ci there)"
    );
    let mut rim = support::start_standalone(
        &format!("browser-{}", script.trim_end_matches(".mjs")),
        &[("RIM_COMET__ROOM_REPORT_INTERVAL", "300ms")],
    );
    let api = rim.addr_after("http api serving");
    let out = Command::new("timeout")
        .args(["120", "node", script, &format!("http://{api}")])
        .current_dir(&dir)
        .output()
        .expect("node runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains(ok_line),
        "{script} failed ({:?}):\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    rim.stop();
}

#[test]
#[ignore = "needs Chromium and node's playwright-core: run deploy/test.sh"]
fn two_browser_pages_chat_in_one_room() {
    run_in_chromium("demo.mjs", "browser demo: ok");
}

#[test]
#[ignore = "needs Chromium and node's playwright-core: run deploy/test.sh"]
fn chat_view_converges_across_devices_and_catches_up_after_offline() {
    run_in_chromium("chat.mjs", "chat demo: ok");
}
