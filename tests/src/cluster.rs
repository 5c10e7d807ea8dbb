//! Helpers of the cluster tests and benchmark (`RunningCluster` labs).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use lb_userspace::lab::{client::TcpSession, run_in_ns, services};

use crate::RunningCluster;

/// Per-request timeout of the probes.
const T: Duration = Duration::from_secs(3);

/// How a [`Prober`] run went.
#[derive(Debug)]
pub struct ProbeReport {
    /// Rounds over all connections.
    pub rounds: usize,
    /// Connections probed.
    pub connections: usize,
    /// Requests that failed or came from another backend.
    pub failures: Vec<String>,
    /// The slowest round.
    pub slowest: Duration,
}

/// Asks every session once; returns the failures (empty if all answered as before).
fn ask_all(sessions: &mut [(TcpSession, String)]) -> Vec<String> {
    let mut failures = Vec::new();
    for (i, (session, name)) in sessions.iter_mut().enumerate() {
        match session.ask() {
            Ok(got) if got == *name => {}
            other => failures.push(format!("connection {i} to {name}: {other:?}")),
        }
    }
    failures
}

/// 100 long-lived connections to the TCP VIP, asked in rounds from another
/// thread until `finish`: each must keep answering from its first backend.
pub struct Prober {
    stop: Arc<AtomicBool>,
    rounds: Arc<AtomicUsize>,
    thread: std::thread::JoinHandle<(usize, Vec<String>, Duration)>,
}

impl Prober {
    pub fn start(c: &RunningCluster) -> Prober {
        let vip = services::vip_tcp4();
        let stop = Arc::new(AtomicBool::new(false));
        let rounds = Arc::new(AtomicUsize::new(0));
        let (client, stop2, rounds2) =
            (c.lab.client_ns().to_string(), stop.clone(), rounds.clone());
        let thread = std::thread::spawn(move || {
            run_in_ns(&client, move || {
                let mut sessions: Vec<(TcpSession, String)> = (0..100)
                    .map(|i| {
                        let mut s = TcpSession::connect(vip, T)
                            .unwrap_or_else(|e| panic!("connection {i}: {e}"));
                        let name = s.ask().unwrap_or_else(|e| panic!("connection {i}: {e}"));
                        (s, name)
                    })
                    .collect();
                let (mut failures, mut slowest) = (Vec::new(), Duration::ZERO);
                // Bounded, so a failed test leaves no thread spinning behind it.
                let deadline = Instant::now() + Duration::from_secs(90);
                while !stop2.load(Ordering::SeqCst)
                    && failures.len() < 500
                    && Instant::now() < deadline
                {
                    let start = Instant::now();
                    failures.extend(ask_all(&mut sessions));
                    slowest = slowest.max(start.elapsed());
                    rounds2.fetch_add(1, Ordering::SeqCst);
                }
                (sessions.len(), failures, slowest)
            })
            .expect("client namespace")
        });
        let p = Prober {
            stop,
            rounds,
            thread,
        };
        p.wait_rounds(2);
        p
    }

    /// Waits until `n` more rounds are done.
    pub fn wait_rounds(&self, n: usize) {
        let target = self.rounds.load(Ordering::SeqCst) + n;
        let deadline = Instant::now() + Duration::from_secs(20);
        while self.rounds.load(Ordering::SeqCst) < target {
            assert!(
                Instant::now() < deadline && !self.thread.is_finished(),
                "the prober stalled"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Stops it and says how it went.
    pub fn finish(self) -> ProbeReport {
        self.stop.store(true, Ordering::SeqCst);
        let (connections, failures, slowest) = self.thread.join().expect("prober");
        let report = ProbeReport {
            rounds: self.rounds.load(Ordering::SeqCst),
            connections,
            failures,
            slowest,
        };
        println!(
            "{} rounds over {} connections, slowest round {:?}, {} failures",
            report.rounds,
            report.connections,
            report.slowest,
            report.failures.len()
        );
        report
    }
}
