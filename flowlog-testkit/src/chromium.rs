//! A page rendered by headless Chromium (Debian's `chromium`, which `scripts/bootstrap`
//! installs): the DOM after its scripts ran, every console message it logged, and a screenshot.
//! Each run gets a fresh profile and every background fetch Chromium does by itself switched off,
//! so the page is all that is loaded.
use std::{
    path::{Path, PathBuf},
    process::{Command, Output},
};

use crate::temp_dir;

/// What Chromium made of a page.
#[derive(Debug)]
pub struct Rendered {
    /// The document after its scripts ran (`--dump-dom`).
    pub dom: String,
    /// Console messages (`console.*` and uncaught errors), one per entry, as Chromium logs them.
    pub console: Vec<String>,
    /// The PNG written (`--screenshot`).
    pub screenshot: PathBuf,
}

/// Renders the page in `html` (a file) and writes a 1200×2000 screenshot of it to
/// `screenshot`. Panics if Chromium fails or writes no DOM or no screenshot.
pub fn render(html: &Path, screenshot: &Path) -> Rendered {
    let url = format!("file://{}", html.display());
    let dump = run(&["--enable-logging=stderr", "--v=0", "--dump-dom", &url]);
    let stderr = String::from_utf8_lossy(&dump.stderr);
    // `[pid:tid:time:INFO:CONSOLE:line] "message", source: url (line)`
    let console = stderr
        .lines()
        .filter(|l| l.contains(":CONSOLE"))
        .map(str::to_string)
        .collect();
    let dom = String::from_utf8(dump.stdout).expect("chromium's DOM is UTF-8");
    assert!(
        dom.contains("</html>"),
        "chromium wrote no document for {url}: {stderr}"
    );
    let _ = std::fs::remove_file(screenshot);
    let shot = run(&[
        "--window-size=1200,2000",
        "--hide-scrollbars",
        &format!("--screenshot={}", screenshot.display()),
        &url,
    ]);
    assert!(
        screenshot.is_file(),
        "chromium wrote no screenshot of {url}: {}",
        String::from_utf8_lossy(&shot.stderr)
    );
    Rendered {
        dom,
        console,
        screenshot: screenshot.to_path_buf(),
    }
}

/// `chromium --headless` with a fresh profile and the flags of `../shared/DESIGN.md`, bounded by
/// `timeout` (a hung browser fails the test instead of hanging it).
fn run(args: &[&str]) -> Output {
    let profile = temp_dir("chromium-profile");
    let out = Command::new("timeout")
        .args(["120", "chromium"])
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--disable-default-apps",
            "--disable-extensions",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        .args(args)
        .output()
        .expect("running chromium (scripts/bootstrap installs it)");
    let _ = std::fs::remove_dir_all(&profile);
    assert!(
        out.status.success(),
        "chromium {args:?} failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    out
}
