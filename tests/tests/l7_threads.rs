//! The L7 proxy on several serving threads, through `lb run` and the XDP l7
//! pass: the configured number of `lb-proxy-N` threads runs, `maxconn` and
//! the queue hold for the whole process, leastconn counts requests of every
//! thread, and reloads (also changing the thread count) lose no request.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use lb_tests::RunningLab;
use lb_userspace::lab::services::vip_l7;
use lb_userspace::lab::{Lab, TCP_PORT, VIP_V4, backend_v4, client::http_get, run_in_ns};

/// A plain HTTP frontend on the l7 VIP over pool "app" (`servers` of the
/// lab's backends, each with `maxconn`; `pool_extra` in its table), with
/// `[proxy] threads` and `proxy_extra`.
fn config(
    threads: usize,
    proxy_extra: &str,
    servers: &[usize],
    maxconn: usize,
    pool_extra: &str,
) -> String {
    let servers: Vec<String> = servers.iter().map(|&i| server(i, maxconn)).collect();
    format!(
        "\n[proxy]\nthreads = {threads}\n{proxy_extra}\n[[frontend]]\nname = \"web\"\nbinds = [\"{}\"]\ndefault_pool = \"app\"\n\n[[pool]]\nname = \"app\"\nservers = [{}]\n{pool_extra}\n",
        vip_l7(),
        servers.join(", ")
    )
}

/// A pool's server entry for lab backend `i`.
fn server(i: usize, maxconn: usize) -> String {
    format!(
        "{{ address = \"{}:{TCP_PORT}\", maxconn = {maxconn} }}",
        backend_v4(i)
    )
}

/// Starts the lab with `config(...)` appended.
fn start(
    tag: &str,
    (threads, proxy_extra): (usize, &'static str),
    servers: &[usize],
    maxconn: usize,
    pool_extra: &'static str,
) -> RunningLab {
    let servers = servers.to_vec();
    RunningLab::start_custom(tag, 3, &[1, 1, 1], None, move |lab, _dir: &Path| {
        lab.make_local_on_balancer(VIP_V4.into())?;
        Ok(config(threads, proxy_extra, &servers, maxconn, pool_extra))
    })
    .unwrap()
}

/// The agent's threads called `lb-proxy-*`: their /proc/PID/task directories.
fn serving_thread_dirs(pid: u32) -> Vec<std::path::PathBuf> {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return Vec::new();
    };
    tasks
        .filter_map(Result::ok)
        .map(|t| t.path())
        .filter(|dir| {
            std::fs::read_to_string(dir.join("comm")).is_ok_and(|n| n.starts_with("lb-proxy-"))
        })
        .collect()
}

/// How many serving threads the agent runs.
fn serving_threads(pid: u32) -> usize {
    serving_thread_dirs(pid).len()
}

/// The CPUs each serving thread may run on (`Cpus_allowed_list`).
fn serving_thread_cpus(pid: u32) -> Vec<String> {
    serving_thread_dirs(pid)
        .iter()
        .filter_map(|dir| std::fs::read_to_string(dir.join("status")).ok())
        .filter_map(|status| {
            status
                .lines()
                .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
                .map(|v| v.trim().to_string())
        })
        .collect()
}

/// Replaces `from` (which must be there) by `to` in the config and reloads.
fn reload_replacing(lab: &RunningLab, from: &str, to: &str) {
    let text = std::fs::read_to_string(&lab.config_path).unwrap();
    assert!(text.contains(from), "{from:?} not in the config:\n{text}");
    std::fs::write(&lab.config_path, text.replacen(from, to, 1)).unwrap();
    assert!(lab.lb(&["reload"]).status.success());
}

/// Waits up to 10 s for `n` serving threads.
fn expect_threads(lab: &RunningLab, n: usize) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while serving_threads(lab.agent) != n {
        assert!(
            Instant::now() < deadline,
            "{} serving threads, expected {n}",
            serving_threads(lab.agent)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// `GET path` on the VIP from the client namespace, each on its own connection.
fn get(lab: &Lab, path: &str) -> std::io::Result<(u16, String)> {
    let (vip, path) = (vip_l7(), path.to_string());
    run_in_ns(lab.client_ns(), move || {
        http_get(vip, &path, Duration::from_secs(10))
    })
    .map_err(std::io::Error::other)?
}

/// `count` concurrent `GET path`, started `gap` apart; their bodies.
fn concurrent(lab: &RunningLab, count: usize, path: &str, gap: Duration) -> Vec<String> {
    let ns = lab.lab.client_ns().to_string();
    let handles: Vec<_> = (0..count)
        .map(|_| {
            let (ns, path) = (ns.clone(), path.to_string());
            let vip: SocketAddr = vip_l7();
            let h = std::thread::spawn(move || {
                run_in_ns(&ns, move || http_get(vip, &path, Duration::from_secs(10)))
            });
            std::thread::sleep(gap);
            h
        })
        .collect();
    handles
        .into_iter()
        .map(|h| {
            let (status, body) = h.join().unwrap().unwrap().unwrap();
            assert_eq!(status, 200, "{body}");
            body.trim().to_string()
        })
        .collect()
}

/// (server name, requests it was in when this one started) of a `/sleep` answer.
fn sleep_answer(body: &str) -> (String, usize) {
    let (name, n) = body.split_once(' ').expect("a /sleep answer");
    (name.to_string(), n.parse().expect("a count"))
}

#[test]
fn serving_threads_share_maxconn_and_its_queue() {
    let mut lab = start("l7t", (3, "cpu_map = [0]\n"), &[1], 2, "");
    expect_threads(&lab, 3);
    // cpu_map = [0]: every thread pinned to CPU 0.
    assert_eq!(serving_thread_cpus(lab.agent), ["0", "0", "0"]);
    // 8 requests of 300 ms over 8 connections, which the kernel spreads
    // over the 3 threads' listeners: never more than maxconn = 2 at once
    // on the server, the rest queued, none refused.
    let begun = Instant::now();
    let answers = concurrent(&lab, 8, "/sleep/300", Duration::ZERO);
    let took = begun.elapsed();
    let most = answers.iter().map(|b| sleep_answer(b).1).max().unwrap();
    assert_eq!(most, 2, "{answers:?}");
    assert!(took >= Duration::from_millis(1100), "{took:?}: {answers:?}");
    // A reload to 2 threads: the new proxy has 2, the old ones end.
    reload_replacing(&lab, "threads = 3\ncpu_map = [0]\n", "threads = 2\n");
    expect_threads(&lab, 2);
    assert_eq!(get(&lab.lab, "/").unwrap().0, 200);
    // Without `threads`: one per CPU the agent may run on (the test's own affinity).
    reload_replacing(&lab, "[proxy]\nthreads = 2\n", "");
    expect_threads(&lab, lb_proxy::Threads::available());
    lab.restart_agent().unwrap();
    expect_threads(&lab, lb_proxy::Threads::available());
}

#[test]
fn leastconn_counts_the_requests_of_every_thread() {
    let lab = start("l7lc", (2, ""), &[1, 2], 0, "algorithm = \"leastconn\"\n");
    expect_threads(&lab, 2);
    // Six slow requests started 100 ms apart, on connections spread over
    // both threads: each choice sees the others' requests in flight, so the
    // servers take three each, whichever thread accepted them.
    let answers = concurrent(&lab, 6, "/sleep/1500", Duration::from_millis(100));
    let mut per_server = std::collections::BTreeMap::new();
    for body in &answers {
        *per_server.entry(sleep_answer(body).0).or_insert(0) += 1;
    }
    assert_eq!(
        per_server.values().copied().collect::<Vec<_>>(),
        [3, 3],
        "{answers:?}"
    );
}

#[test]
fn reloads_with_several_threads_lose_no_request() {
    let lab = start("l7rl", (2, ""), &[1, 2], 0, "retries = 3\n");
    expect_threads(&lab, 2);
    let stop = Arc::new(AtomicBool::new(false));
    let (done, failed) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let clients: Vec<_> = (0..4)
        .map(|_| {
            let (stop, done, failed) = (stop.clone(), done.clone(), failed.clone());
            let ns = lab.lab.client_ns().to_string();
            std::thread::spawn(move || {
                run_in_ns(&ns, move || {
                    // Bounded: at most 20 s or 20 000 requests per client.
                    let until = Instant::now() + Duration::from_secs(20);
                    for _ in 0..20_000 {
                        if stop.load(Ordering::Relaxed) || Instant::now() > until {
                            break;
                        }
                        match http_get(vip_l7(), "/", Duration::from_secs(5)) {
                            Ok((200, _)) => done.fetch_add(1, Ordering::Relaxed),
                            other => {
                                eprintln!("failed: {other:?}");
                                failed.fetch_add(1, Ordering::Relaxed)
                            }
                        };
                    }
                })
                .unwrap()
            })
        })
        .collect();
    // Each reload changes the pool (be1 and be2, then be1 alone, ...) and
    // its `retries` (servers alone would change in place), so the proxy
    // restarts on new threads beside the old ones every time.
    let text = std::fs::read_to_string(&lab.config_path).unwrap();
    let both = format!("{}, {}", server(1, 0), server(2, 0));
    let one = server(1, 0);
    assert!(text.contains(&both) && text.contains("retries = 3"));
    for round in 0..6 {
        std::thread::sleep(Duration::from_millis(300));
        let next = if round % 2 == 0 {
            text.replacen(&both, &one, 1)
                .replacen("retries = 3", "retries = 2", 1)
        } else {
            text.clone()
        };
        std::fs::write(&lab.config_path, next).unwrap();
        let out = lab.lb(&["reload"]);
        assert!(out.status.success(), "{out:?}");
    }
    std::thread::sleep(Duration::from_millis(300));
    stop.store(true, Ordering::Relaxed);
    for c in clients {
        c.join().unwrap();
    }
    let (done, failed) = (done.load(Ordering::Relaxed), failed.load(Ordering::Relaxed));
    assert_eq!(failed, 0, "{failed} of {} requests failed", done + failed);
    assert!(done > 100, "only {done} requests");
    expect_threads(&lab, 2);
}

/// `GET /` on a kept-alive connection; the body (the server's name).
fn ask_kept(stream: &mut std::net::TcpStream) -> std::io::Result<String> {
    use std::io::{BufRead, BufReader, Read, Write};
    stream.write_all(b"GET / HTTP/1.1\r\nHost: lb\r\n\r\n")?;
    let mut reader = BufReader::new(&*stream);
    let mut length = 0usize;
    let mut status = String::new();
    reader.read_line(&mut status)?;
    if !status.starts_with("HTTP/1.1 200") {
        return Err(std::io::Error::other(format!("answer {status:?}")));
    }
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line)? == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        if line.trim().is_empty() {
            break;
        }
        if let Some((k, v)) = line.split_once(':')
            && k.eq_ignore_ascii_case("content-length")
        {
            length = v.trim().parse().map_err(std::io::Error::other)?;
        }
    }
    let mut body = vec![0u8; length];
    reader.read_exact(&mut body)?;
    Ok(String::from_utf8_lossy(&body).trim().to_string())
}

/// The thread ids of the serving threads.
fn serving_tids(pid: u32) -> std::collections::BTreeSet<std::ffi::OsString> {
    serving_thread_dirs(pid)
        .iter()
        .filter_map(|d| d.file_name().map(ToOwned::to_owned))
        .collect()
}

#[test]
fn pool_server_changes_from_the_cli_are_made_in_place() {
    let lab = start("l7ip", (2, ""), &[1, 2], 0, "");
    expect_threads(&lab, 2);
    let threads = serving_tids(lab.agent);
    let ns = lab.lab.client_ns().to_string();
    let mut kept = run_in_ns(&ns, || {
        std::net::TcpStream::connect_timeout(&vip_l7(), Duration::from_secs(5))
    })
    .unwrap()
    .unwrap();
    kept.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let first = ask_kept(&mut kept).unwrap();
    assert!(first == "be1" || first == "be2", "{first}");
    // be3 joins and leaves four times: more changes than dropped proxies may
    // drain, were each a restart (the fifth would close what the first kept).
    let be3 = format!("{}:{TCP_PORT}", backend_v4(3));
    let names = |n: usize| -> std::collections::BTreeSet<String> {
        (0..n)
            .map(|_| get(&lab.lab, "/").unwrap().1.trim().to_string())
            .collect()
    };
    // (The proxy takes a change just after the CLI's answer.)
    let eventually = |what: &str, holds: &dyn Fn() -> bool| {
        let deadline = Instant::now() + Duration::from_secs(5);
        while !holds() {
            assert!(Instant::now() < deadline, "{what}");
            std::thread::sleep(Duration::from_millis(50));
        }
    };
    for round in 0..4 {
        let out = lab.lb(&["add", "backend", "pool:app", &be3]);
        assert!(out.status.success(), "{out:?}");
        eventually(&format!("round {round}: be3 joined"), &|| {
            names(12).contains("be3")
        });
        let out = lab.lb(&["remove", "backend", "pool:app", &be3]);
        assert!(out.status.success(), "{out:?}");
        eventually(&format!("round {round}: be3 left"), &|| {
            !names(12).contains("be3")
        });
    }
    // The same serving threads, and the connection from before still served.
    assert_eq!(serving_tids(lab.agent), threads, "the proxy was restarted");
    for _ in 0..3 {
        let again = ask_kept(&mut kept).unwrap();
        assert!(again == "be1" || again == "be2", "{again}");
    }
}
