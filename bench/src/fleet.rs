//! The parent side of `client-proc`: spawns load-generator child processes,
//! sends them commands and gathers their answers and counters.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::process::Stdio;
use std::sync::Arc;

use parking_lot::Mutex;
use std::time::Duration;

use anyhow::{Context, bail};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
use tokio::process::{Child, ChildStdin, Command};
use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::clientproc::{ChildReport, ConnectCmd};
use crate::wire::Transport;

/// Latest counters of one child (from its `tick` lines).
#[derive(Clone, Copy, Debug, Default)]
pub struct Tick {
    /// Push frames received since the last reset.
    pub deliveries: u64,
    /// Clients connected.
    pub connected: u64,
    /// Clients lost.
    pub lost: u64,
    /// Clients still connecting.
    pub connecting: u64,
    /// Clients that failed to connect.
    pub failed: u64,
}

/// Answers to commands.
#[derive(Debug)]
enum Answer {
    Connected {
        ok: u64,
        failed: u64,
        hist: Vec<(u64, u64)>,
    },
    Reset,
    Report(Box<ChildReport>),
    Closed,
}

struct ChildProc {
    child: Child,
    stdin: ChildStdin,
    pid: u32,
}

/// The load-generator child processes.
pub struct Fleet {
    children: Vec<ChildProc>,
    ticks: Arc<Mutex<Vec<Tick>>>,
    answers_rx: mpsc::UnboundedReceiver<(usize, Answer)>,
}

/// Totals of a `connect` over the fleet.
#[derive(Debug, Default)]
pub struct Connected {
    /// Clients connected.
    pub ok: u64,
    /// Clients that failed.
    pub failed: u64,
    /// Connect + auth time histogram pairs, merged.
    pub hist: Vec<(u64, u64)>,
}

fn parse_tick(words: &[&str]) -> Option<Tick> {
    let n = |i: usize| words.get(i).and_then(|w| w.parse::<u64>().ok());
    Some(Tick {
        deliveries: n(0)?,
        connected: n(1)?,
        lost: n(2)?,
        connecting: n(3)?,
        failed: n(4)?,
    })
}

fn parse_answer(line: &str) -> Option<Answer> {
    let (head, rest) = line.split_once(' ').unwrap_or((line, ""));
    match head {
        "connected" => {
            let mut parts = rest.splitn(3, ' ');
            let ok = parts.next()?.parse().ok()?;
            let failed = parts.next()?.parse().ok()?;
            let hist = serde_json::from_str(parts.next()?).ok()?;
            Some(Answer::Connected { ok, failed, hist })
        }
        "reset" => Some(Answer::Reset),
        "closed" => Some(Answer::Closed),
        "report" => serde_json::from_str(rest)
            .ok()
            .map(|r| Answer::Report(Box::new(r))),
        _ => None,
    }
}

impl Fleet {
    /// Starts `count` child processes of this executable.
    pub async fn spawn(count: usize, source_addrs: u32, max_secs: u64) -> anyhow::Result<Fleet> {
        let exe = std::env::current_exe().context("locating rim-bench")?;
        let ticks = Arc::new(Mutex::new(vec![Tick::default(); count]));
        let (answers_tx, answers_rx) = mpsc::unbounded_channel();
        let mut children = Vec::with_capacity(count);
        for i in 0..count {
            let mut child = Command::new(&exe)
                .args([
                    "client-proc",
                    "--process",
                    &i.to_string(),
                    "--source-addrs",
                    &source_addrs.to_string(),
                    "--max-secs",
                    &max_secs.to_string(),
                ])
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::inherit())
                .kill_on_drop(true)
                .spawn()
                .context("starting a client process")?;
            let pid = child.id().context("client process pid")?;
            let stdin = child.stdin.take().context("client stdin")?;
            let stdout = child.stdout.take().context("client stdout")?;
            let (ticks, answers_tx) = (Arc::clone(&ticks), answers_tx.clone());
            tokio::spawn(async move {
                let mut lines = tokio::io::BufReader::new(stdout).lines();
                // Ends when the child closes its stdout (exits).
                while let Ok(Some(line)) = lines.next_line().await {
                    if let Some(rest) = line.strip_prefix("tick ") {
                        let words: Vec<&str> = rest.split_whitespace().collect();
                        if let Some(tick) = parse_tick(&words) {
                            ticks.lock()[i] = tick;
                        }
                    } else if let Some(answer) = parse_answer(&line) {
                        let _ = answers_tx.send((i, answer));
                    } else {
                        eprintln!("client-proc {i}: {line}");
                    }
                }
            });
            children.push(ChildProc { child, stdin, pid });
        }
        Ok(Fleet {
            children,
            ticks,
            answers_rx,
        })
    }

    /// The shared table of the children's latest counters.
    pub fn ticks_handle(&self) -> Arc<Mutex<Vec<Tick>>> {
        Arc::clone(&self.ticks)
    }

    /// Process ids of the children.
    pub fn pids(&self) -> Vec<u32> {
        self.children.iter().map(|c| c.pid).collect()
    }

    /// Sum of the children's latest counters.
    pub fn totals(&self) -> Tick {
        let ticks = self.ticks.lock();
        ticks.iter().fold(Tick::default(), |a, t| Tick {
            deliveries: a.deliveries + t.deliveries,
            connected: a.connected + t.connected,
            lost: a.lost + t.lost,
            connecting: a.connecting + t.connecting,
            failed: a.failed + t.failed,
        })
    }

    async fn send(&mut self, i: usize, line: &str) -> anyhow::Result<()> {
        let stdin = &mut self.children[i].stdin;
        stdin.write_all(format!("{line}\n").as_bytes()).await?;
        stdin.flush().await?;
        Ok(())
    }

    async fn send_all(&mut self, line: &str) -> anyhow::Result<()> {
        for i in 0..self.children.len() {
            self.send(i, line).await?;
        }
        Ok(())
    }

    /// Waits for one answer from every child, `limit` at most.
    async fn answers(&mut self, limit: Duration, what: &str) -> anyhow::Result<Vec<Answer>> {
        let deadline = Instant::now() + limit;
        let mut got: HashMap<usize, Answer> = HashMap::new();
        while got.len() < self.children.len() {
            match tokio::time::timeout_at(deadline, self.answers_rx.recv()).await {
                Ok(Some((i, answer))) => {
                    got.insert(i, answer);
                }
                Ok(None) => bail!("client processes ended while waiting for {what}"),
                Err(_) => bail!(
                    "{} of {} client processes answered {what} within {limit:?}",
                    got.len(),
                    self.children.len()
                ),
            }
        }
        let mut answers: Vec<(usize, Answer)> = got.into_iter().collect();
        answers.sort_by_key(|(i, _)| *i);
        Ok(answers.into_iter().map(|(_, a)| a).collect())
    }

    /// Connects `total` clients spread evenly over the children, client i to
    /// `targets[i % len]`; prints progress every second.
    #[allow(clippy::too_many_arguments)]
    pub async fn connect(
        &mut self,
        transport: Transport,
        targets: &[SocketAddr],
        total: u64,
        room_prefix: &str,
        rooms: u64,
        heartbeat_secs: u64,
        op: i32,
    ) -> anyhow::Result<Connected> {
        let n = self.children.len() as u64;
        let mut first = 0;
        for i in 0..self.children.len() {
            let count = total / n + u64::from((i as u64) < total % n);
            let cmd = ConnectCmd {
                transport,
                targets: targets.to_vec(),
                count,
                first,
                room_prefix: room_prefix.to_owned(),
                rooms,
                heartbeat_secs,
                op,
            };
            self.send(i, &cmd.to_line()).await?;
            first += count;
        }
        // Generous: ~200 connections/s at the very least, plus a minute.
        let limit = Duration::from_secs(60 + total / 200);
        let started = Instant::now();
        let deadline = started + limit;
        let mut answers: HashMap<usize, Answer> = HashMap::new();
        let mut every = tokio::time::interval(Duration::from_secs(1));
        while answers.len() < self.children.len() {
            tokio::select! {
                answer = self.answers_rx.recv() => match answer {
                    Some((i, a)) => { answers.insert(i, a); }
                    None => bail!("client processes ended while connecting"),
                },
                _ = every.tick() => {
                    let t = self.totals();
                    eprintln!(
                        "[{:>4.0}s] connecting: {} connected, {} failed, {} in progress",
                        started.elapsed().as_secs_f64(), t.connected, t.failed, t.connecting
                    );
                    if Instant::now() > deadline {
                        bail!("clients did not finish connecting within {limit:?}");
                    }
                }
            }
        }
        let mut out = Connected::default();
        let mut hist = crate::latency::histogram();
        for answer in answers.into_values() {
            if let Answer::Connected {
                ok,
                failed,
                hist: pairs,
            } = answer
            {
                out.ok += ok;
                out.failed += failed;
                crate::latency::add_pairs(&mut hist, &pairs);
            }
        }
        out.hist = crate::latency::to_pairs(&hist);
        Ok(out)
    }

    /// Zeroes every child's delivery counters and latencies.
    pub async fn reset(&mut self) -> anyhow::Result<()> {
        self.send_all("reset").await?;
        for answer in self.answers(Duration::from_secs(10), "reset").await? {
            if !matches!(answer, Answer::Reset) {
                bail!("unexpected answer to reset: {answer:?}");
            }
        }
        // Ticks sent before the reset are stale; the next ones are not.
        tokio::time::sleep(Duration::from_millis(300)).await;
        Ok(())
    }

    /// Collects every child's report.
    pub async fn report(&mut self) -> anyhow::Result<Vec<ChildReport>> {
        self.send_all("report").await?;
        self.answers(Duration::from_secs(20), "report")
            .await?
            .into_iter()
            .map(|a| match a {
                Answer::Report(r) => Ok(*r),
                other => bail!("unexpected answer to report: {other:?}"),
            })
            .collect()
    }

    /// Closes every client.
    pub async fn close(&mut self) -> anyhow::Result<()> {
        self.send_all("close").await?;
        for answer in self.answers(Duration::from_secs(30), "close").await? {
            if !matches!(answer, Answer::Closed) {
                bail!("unexpected answer to close: {answer:?}");
            }
        }
        Ok(())
    }

    /// Ends the children: closes their stdin, waits up to 10 s, then kills
    /// the ones still running (each by its own handle).
    pub async fn shutdown(self) {
        for mut c in self.children {
            drop(c.stdin);
            if tokio::time::timeout(Duration::from_secs(10), c.child.wait())
                .await
                .is_err()
            {
                let _ = c.child.kill().await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_child_lines() {
        let t = parse_tick(&["5", "4", "3", "2", "1"]).unwrap();
        assert_eq!(
            (t.deliveries, t.connected, t.lost, t.connecting, t.failed),
            (5, 4, 3, 2, 1)
        );
        assert!(parse_tick(&["5", "x"]).is_none());
        match parse_answer("connected 10 2 [[100,3]]") {
            Some(Answer::Connected { ok, failed, hist }) => {
                assert_eq!((ok, failed, hist), (10, 2, vec![(100, 3)]));
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(parse_answer("closed"), Some(Answer::Closed)));
        assert!(matches!(
            parse_answer(r#"report {"deliveries":3,"other_frames":0,"bad_bodies":0,"lost":0,"connected":1,"per_client_min":3,"per_client_max":3,"latency":[]}"#),
            Some(Answer::Report(r)) if r.deliveries == 3
        ));
        assert!(parse_answer("report {").is_none());
        assert!(parse_answer("hello").is_none());
    }
}
