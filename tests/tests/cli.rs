//! The `lb` binary's configuration handling, as an operator meets it.

use std::os::unix::fs::FileTypeExt as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use lb_userspace::lab::testrun::TestRunNet;

fn lb() -> Command {
    let bin = std::env::var_os("LB_BIN").expect("LB_BIN is not set; run via `cargo xtask test`");
    Command::new(bin)
}

fn write(name: &str, text: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("lb-cli-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path
}

// `lb check` looks for the interfaces on this machine: loopback is everywhere.
const GOOD: &str = r#"interfaces = ["lo"]
[[service]]
name = "web"
vip = "198.18.100.1:80"
[[service.backend]]
address = "198.18.2.11:8080"
"#;

const BAD: &str = r#"interfaces = ["eth0"]
[[service]]
name = "web"
vip = "198.18.100.1:80"
ring_size = 1000
[[service.backend]]
address = "[fd00:18:2::11]:8080"
[[service.backend]]
address = "198.18.2.12:8080"
weight = 70000
"#;

#[test]
fn check_accepts_a_good_file() {
    let path = write("good.toml", GOOD);
    let out = lb().arg("check").arg(&path).output().unwrap();
    assert!(out.status.success(), "{out:?}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("OK (1 services, 1 backends)"), "{stdout}");
}

#[test]
fn check_replays_the_journal_beside_the_file_as_lb_run_does() {
    let path = write("journaled.toml", GOOD);
    let journal = path.with_file_name("journaled.toml.state");
    // Truncated: `lb run` refuses to start on it, so `lb check` fails.
    std::fs::write(&journal, r#"[{"AddBackend":{"service":"web""#).unwrap();
    let out = lb().arg("check").arg(&path).output().unwrap();
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("not a valid runtime state file"),
        "{stderr}"
    );
    // Entries `lb run` would drop are said, and the check passes.
    let entries = r#"[
        {"SetWeight":{"service":"web","address":"198.18.2.11:8080","weight":3}},
        {"SetWeight":{"service":"gone","address":"198.18.2.11:8080","weight":3}},
        "Reload"
    ]"#;
    std::fs::write(&journal, entries).unwrap();
    let out = lb().arg("check").arg(&path).output().unwrap();
    assert!(out.status.success(), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("unknown service \"gone\""), "{stderr}");
    assert!(stderr.contains("Reload: not a change"), "{stderr}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("(3 entries, 1 kept after compaction, 2 dropped)"),
        "{stdout}"
    );
    let _ = std::fs::remove_file(&journal);
}

#[test]
fn check_reports_every_error_with_file_line_and_reason() {
    let path = write("bad.toml", BAD);
    let out = lb().arg("check").arg(&path).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    let file = path.display().to_string();
    for (line, reason) in [
        (5, "not a prime"),
        (7, "NAT does not translate"),
        (10, "out of range"),
    ] {
        assert!(
            stderr
                .lines()
                .any(|l| l.starts_with(&format!("{file}:{line}:")) && l.contains(reason)),
            "no error at line {line} mentioning {reason:?} in:\n{stderr}"
        );
    }
}

#[test]
fn run_refuses_a_bad_file_before_touching_the_kernel() {
    let path = write("bad-run.toml", BAD);
    let out = lb().arg("run").arg("--config").arg(&path).output().unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("invalid configuration"), "{stderr}");
    assert!(
        stderr.contains(&format!("{}:5:", path.display())),
        "{stderr}"
    );
}

#[test]
fn check_reports_a_syntax_error_with_its_line() {
    let path = write(
        "syntax.toml",
        "interfaces = [\"eth0\"]\n[[service]\nname = 1\n",
    );
    let out = lb().arg("check").arg(&path).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(&format!("{}:2:", path.display())),
        "{stderr}"
    );
}

#[test]
fn check_reports_a_missing_interface_at_its_position() {
    let path = write(
        "missing-if.toml",
        &GOOD.replace("[\"lo\"]", "[\"lo\", \"lbnosuch0\"]"),
    );
    let out = lb().arg("check").arg(&path).output().unwrap();
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(&format!(
            "{}:1:21: interface \"lbnosuch0\" does not exist",
            path.display()
        )),
        "{stderr}"
    );
}

/// Runs `lb ARGS` to completion (20 s at most).
fn lb_output(args: &[&std::ffi::OsStr]) -> Output {
    lb_tests::output_within(lb().args(args), Duration::from_secs(20))
}

/// Runs `lb run` in namespace `ns` with `config`, its pins in `pin_dir`
/// and its control socket beside the config (`.sock`).
fn lb_run(ns: &str, config: &Path, pin_dir: &Path) -> Output {
    lb_output(&[
        "run".as_ref(),
        "--netns".as_ref(),
        ns.as_ref(),
        "--config".as_ref(),
        config.as_os_str(),
        "--pin-dir".as_ref(),
        pin_dir.as_os_str(),
        "--socket".as_ref(),
        config.with_extension("sock").as_os_str(),
    ])
}

/// Whether any interface in namespace `ns` has an XDP program attached.
fn xdp_attached_in(ns: &str) -> String {
    let out = Command::new("ip")
        .args(["-n", ns, "link", "show"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.contains("xdp"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// Starts `lb run` in a fresh namespace with `config` (interfaces `lbc`,
/// `lbb` exist there) and expects it to fail; returns its stderr and the
/// config's path, after checking that it left no pin directory, no
/// attachment and no control socket.
fn failed_start(tag: &str, config: &str) -> (String, PathBuf) {
    let net = TestRunNet::create(tag).expect("namespace");
    let path = write(&format!("{tag}.toml"), config);
    let pin_dir =
        Path::new("/sys/fs/bpf").join(format!("lb-cli-test-{tag}-{}", std::process::id()));
    let socket = path.with_extension("sock");
    let out = lb_run(net.ns(), &path, &pin_dir);
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success(), "the start must fail: {out:?}");
    // Logged to a pipe: no colour escape codes.
    assert!(!out.stdout.contains(&0x1b), "{out:?}");
    let left = pin_dir.exists();
    // Clean up before asserting, so a failure does not leak into other tests.
    let _ = std::fs::remove_dir_all(&pin_dir);
    assert!(!left, "{} was left behind: {stderr}", pin_dir.display());
    assert_eq!(
        xdp_attached_in(net.ns()),
        "",
        "an attachment was left behind"
    );
    let left = std::fs::symlink_metadata(&socket).is_ok_and(|m| m.file_type().is_socket());
    assert!(!left, "the control socket was left behind");
    (stderr, path)
}

#[test]
fn run_with_a_missing_interface_reports_its_position_and_attaches_nothing() {
    let config = GOOD.replace("[\"lo\"]", "[\"lbc\", \"lbnosuch0\"]");
    let (stderr, path) = failed_start("missing-if", &config);
    assert!(
        stderr.contains(&format!(
            "{}:1:22: interface \"lbnosuch0\" does not exist",
            path.display()
        )),
        "{stderr}"
    );
}

#[test]
fn a_start_failing_after_the_attach_leaves_nothing_behind() {
    // A plain file where the control socket goes: the start's last step
    // (after the program is loaded and attached) refuses to replace it.
    let socket = write("late-fail.sock", "not a socket");
    let config = GOOD.replace("[\"lo\"]", "[\"lbc\", \"lbb\"]");
    let (stderr, _) = failed_start("late-fail", &config);
    assert!(stderr.contains("exists and is not a socket"), "{stderr}");
    assert_eq!(std::fs::read_to_string(&socket).unwrap(), "not a socket");
}

#[test]
fn run_refuses_a_metrics_address_it_cannot_bind_before_attaching() {
    // 192.0.2.1 (TEST-NET-1) is no address of the namespace.
    let config = GOOD.replace(
        "[\"lo\"]",
        "[\"lbc\", \"lbb\"]\nmetrics = \"192.0.2.1:9100\"",
    );
    let (stderr, path) = failed_start("metrics-bind", &config);
    let why = format!(
        "{}:2:11: metrics listens on 192.0.2.1:9100, which cannot be bound: Cannot assign requested address",
        path.display()
    );
    assert!(stderr.contains(&why), "{stderr}");
}

#[test]
fn run_refuses_maps_pinned_with_another_layout_and_keeps_them() {
    let net = TestRunNet::create("old-pins").expect("namespace");
    let path = write(
        "old-pins.toml",
        &GOOD.replace("[\"lo\"]", "[\"lbc\", \"lbb\"]"),
    );
    let pin_dir =
        Path::new("/sys/fs/bpf").join(format!("lb-cli-test-old-pins-{}", std::process::id()));
    std::fs::create_dir_all(&pin_dir).unwrap();
    // FLOWS as a build with 4 bytes less per value would have left it.
    let entries = lb_common::FLOW_TABLE_SIZE.to_string();
    let flows = pin_dir.join("FLOWS");
    let made = Command::new("bpftool")
        .args(["map", "create"])
        .arg(&flows)
        .args(["type", "lru_hash", "key", "40", "value", "28"])
        .args(["entries", &entries, "name", "FLOWS"])
        .output()
        .unwrap();
    let out = if made.status.success() {
        Some(lb_run(net.ns(), &path, &pin_dir))
    } else {
        None
    };
    let left: Vec<String> = std::fs::read_dir(&pin_dir)
        .map(|d| {
            d.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    // Clean up before asserting, so a failure does not leak into other tests.
    let _ = std::fs::remove_dir_all(&pin_dir);
    let out = out.unwrap_or_else(|| panic!("bpftool map create: {made:?}"));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "the start must fail: {out:?}");
    assert!(
        stderr.contains("the map FLOWS pinned in")
            && stderr.contains("there: LruHash, key 40 B, value 28 B")
            && stderr.contains("lb stop --detach"),
        "{stderr}"
    );
    assert_eq!(left, ["FLOWS"], "the old map stays, nothing else is pinned");
    assert_eq!(xdp_attached_in(net.ns()), "", "nothing is attached");
}

#[test]
fn lb_decap_adopts_an_older_counter_array_with_fewer_reasons() {
    let net = TestRunNet::create("old-stats").expect("namespace");
    let pin_dir =
        Path::new("/sys/fs/bpf").join(format!("lb-cli-test-old-stats-{}", std::process::id()));
    std::fs::create_dir_all(&pin_dir).unwrap();
    // DECAP_STATS as `lb decap` from before `--from` pinned it: 8 reasons.
    let made = Command::new("bpftool")
        .args(["map", "create"])
        .arg(pin_dir.join("DECAP_STATS"))
        .args(["type", "percpu_array", "key", "4", "value", "16"])
        .args(["entries", "8", "name", "DECAP_STATS"])
        .output()
        .unwrap();
    let decap = |extra: &[&str]| {
        let mut args: Vec<&std::ffi::OsStr> = ["decap", "--netns", net.ns(), "-i", "lbc"]
            .into_iter()
            .map(std::ffi::OsStr::new)
            .collect();
        args.extend(extra.iter().map(|a| std::ffi::OsStr::new(*a)));
        args.extend(["--pin-dir".as_ref(), pin_dir.as_os_str()]);
        lb_output(&args)
    };
    let (started, stats) = if made.status.success() {
        let started = decap(&["--vip", "198.18.100.1", "--from", "198.18.1.1"]);
        (Some(started), Some(decap(&["--stats"])))
    } else {
        (None, None)
    };
    let detached = decap(&["--detach"]);
    let _ = std::fs::remove_dir_all(&pin_dir);
    let started = started.unwrap_or_else(|| panic!("bpftool map create: {made:?}"));
    assert!(started.status.success(), "{started:?}");
    let stats = String::from_utf8_lossy(&stats.expect("stats").stdout).into_owned();
    assert!(stats.contains("drop_foreign_source"), "{stats}");
    assert!(detached.status.success(), "{detached:?}");
}

#[test]
fn lb_run_adopts_an_older_counter_array_with_fewer_reasons() {
    let net = TestRunNet::create("old-reasons").expect("namespace");
    let path = write(
        "old-reasons.toml",
        &GOOD.replace("[\"lo\"]", "[\"lbc\", \"lbb\"]"),
    );
    let socket = path.with_extension("sock");
    let pin_dir =
        Path::new("/sys/fs/bpf").join(format!("lb-cli-test-old-reasons-{}", std::process::id()));
    std::fs::create_dir_all(&pin_dir).unwrap();
    // REASON_STATS as an agent that knew one reason less pinned it.
    let entries = (lb_common::REASON_COUNT - 1).to_string();
    let made = Command::new("bpftool")
        .args(["map", "create"])
        .arg(pin_dir.join("REASON_STATS"))
        .args(["type", "percpu_array", "key", "4", "value", "16"])
        .args(["entries", &entries, "name", "REASON_STATS"])
        .output()
        .unwrap();
    let mut run = made.status.success().then(|| {
        lb().arg("run")
            .args(["--netns", net.ns()])
            .arg("--config")
            .arg(&path)
            .arg("--pin-dir")
            .arg(&pin_dir)
            .arg("--socket")
            .arg(&socket)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap()
    });
    // Up once its socket answers (10 s at most), or gone.
    let mut stats = None;
    for _ in 0..100 {
        let exited = run
            .as_mut()
            .is_none_or(|c| c.try_wait().ok().flatten().is_some());
        if exited {
            break;
        }
        let out = lb_output(&[
            "show".as_ref(),
            "stats".as_ref(),
            "--socket".as_ref(),
            socket.as_os_str(),
        ]);
        if out.status.success() {
            stats = Some(String::from_utf8_lossy(&out.stdout).into_owned());
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let stop = lb_output(&[
        "stop".as_ref(),
        "--detach".as_ref(),
        "--socket".as_ref(),
        socket.as_os_str(),
    ]);
    let ended = run.map(|mut c| {
        let _ = c.kill();
        c.wait_with_output().unwrap()
    });
    let _ = std::fs::remove_dir_all(&pin_dir);
    assert!(made.status.success(), "bpftool map create: {made:?}");
    let ended = ended.expect("started");
    let stats = stats.unwrap_or_else(|| {
        panic!(
            "lb run never answered: {}",
            String::from_utf8_lossy(&ended.stderr)
        )
    });
    assert!(stats.contains("pass_not_vip"), "{stats}");
    assert!(stop.status.success(), "{stop:?}");
}

/// The soft RLIMIT_NOFILE of process `pid`, from /proc.
fn soft_fd_limit(pid: u32) -> Option<u64> {
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).ok()?;
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    line.split_whitespace().nth(3)?.parse().ok()
}

#[test]
fn run_raises_its_file_descriptor_limit_to_what_the_frontends_may_use() {
    // A port of loopback nobody else has: bound, then released.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .unwrap()
        .port();
    let config = format!(
        "[[frontend]]\nname = \"web\"\nbinds = [\"127.0.0.1:{port}\"]\ndefault_pool = \"app\"\n\
         max_connections = 1500\n\n[[pool]]\nname = \"app\"\nservers = [{{ address = \"127.0.0.1:9\" }}]\n"
    );
    let path = write("fd-limit.toml", &config);
    let socket = path.with_extension("sock");
    let mut cmd = lb();
    cmd.arg("run")
        .arg("--config")
        .arg(&path)
        .arg("--socket")
        .arg(&socket);
    cmd.stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
    // Started as a service manager would start it: 256, hard 8192.
    // SAFETY: setrlimit is async-signal-safe; it reads the struct it is given.
    unsafe {
        use std::os::unix::process::CommandExt as _;
        cmd.pre_exec(|| {
            let l = libc::rlimit {
                rlim_cur: 256,
                rlim_max: 8192,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &l) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = cmd.spawn().unwrap();
    let pid = child.id();
    // Two per connection the frontend allows, and 1024 besides.
    let want = 2 * 1500 + 1024;
    let until = std::time::Instant::now() + Duration::from_secs(10);
    let mut seen = soft_fd_limit(pid);
    while seen != Some(want) && std::time::Instant::now() < until {
        std::thread::sleep(Duration::from_millis(50));
        seen = soft_fd_limit(pid);
    }
    // SAFETY: a signal to the child this test started.
    unsafe { libc::kill(pid as i32, libc::SIGTERM) };
    let _ = child.wait();
    assert_eq!(seen, Some(want), "the agent's soft limit");
}
