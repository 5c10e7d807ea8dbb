//! `lb top`: a live terminal dashboard over the control socket, like HATop:
//! services and their backends (packet rates, flows), L7 frontends
//! (request rates) and pool servers (request rates, in flight), each with
//! its state and health. Keys: ↑/↓ (k/j) select a backend or pool server,
//! `d` drains it, `e` enables it, `m` puts it in maintenance (disable),
//! `q` (or Esc, Ctrl-C) quits.
//!
//! `Model` is what is shown (rows from the agent's answers, rates from two
//! samples, the selection); `run` is the terminal around it.

use std::collections::HashMap;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use ratatui::crossterm::event::{self, Event, KeyCode, KeyEventKind, KeyModifiers};
use ratatui::layout::{Constraint, Layout};
use ratatui::style::{Color, Modifier, Style, Stylize};
use ratatui::widgets::{Block, Paragraph, Row, Table};

use crate::control::{
    AdminState, BackendInfo, Health, ProxyInfo, Request, Response, ServiceInfo, client,
};

/// How many failed refreshes in a row end `lb top` (the agent went away).
const MAX_FAILURES: u32 = 5;

/// One line of the dashboard.
#[derive(Debug, Clone, PartialEq)]
pub struct Line {
    /// What it is: `service`, `backend`, `frontend`, `pool` or `server`.
    pub kind: &'static str,
    /// Service or pool (`pool:NAME`) of a backend; the name otherwise.
    pub group: String,
    /// Backend or server address; empty for the others.
    pub address: String,
    /// Administrative state (backends and servers).
    pub admin: Option<AdminState>,
    /// Health (backends and servers).
    pub health: Option<Health>,
    /// Weight (backends and servers).
    pub weight: Option<u32>,
    /// Connections or requests in flight now.
    pub current: u64,
    /// The counter whose rate is shown: packets (L4), requests (L7).
    pub total: u64,
    /// Per second since the previous refresh; None on the first.
    pub rate: Option<f64>,
}

impl Line {
    /// Whether `d`, `e` and `m` apply to it.
    pub fn selectable(&self) -> bool {
        self.admin.is_some()
    }

    fn key(&self) -> String {
        format!("{}/{}/{}", self.kind, self.group, self.address)
    }
}

/// What the dashboard shows.
#[derive(Debug, Default)]
pub struct Model {
    /// Every line, in display order.
    pub lines: Vec<Line>,
    /// Index into `lines` of the selected one (always a selectable line, if any).
    pub selected: Option<usize>,
    /// The outcome of the last action, or the last error.
    pub status: String,
    /// Totals of the previous refresh, by line, and when it was.
    previous: Option<(Instant, HashMap<String, u64>)>,
}

/// The lines of the agent's answers, without rates.
pub fn lines(services: &[ServiceInfo], backends: &[BackendInfo], proxy: &ProxyInfo) -> Vec<Line> {
    let plain = |kind, group: &str, current, total| Line {
        kind,
        group: group.to_string(),
        address: String::new(),
        admin: None,
        health: None,
        weight: None,
        current,
        total,
        rate: None,
    };
    let backend = |kind, b: &BackendInfo, current, total| Line {
        kind,
        group: b.service.clone(),
        address: b.address.to_string(),
        admin: Some(b.admin),
        health: Some(b.health),
        weight: Some(b.weight),
        current,
        total,
        rate: None,
    };
    let mut out = Vec::new();
    for s in services {
        let members: Vec<_> = backends.iter().filter(|b| b.service == s.name).collect();
        let flows = members.iter().map(|b| b.active_flows).sum();
        out.push(plain("service", &s.name, flows, s.packets));
        out.extend(
            members
                .iter()
                .map(|b| backend("backend", b, b.active_flows, b.packets)),
        );
    }
    for f in &proxy.frontends {
        let current = f.current_connections as u64;
        out.push(plain("frontend", &f.name, current, f.counters.requests));
    }
    for p in &proxy.pools {
        let group = format!("pool:{}", p.name);
        let current = p.servers.iter().map(|s| s.current as u64).sum();
        out.push(plain("pool", &group, current, p.counters.requests));
        for s in &p.servers {
            let info = backends
                .iter()
                .find(|b| b.service == group && b.address == s.address);
            if let Some(b) = info {
                out.push(backend("server", b, s.current as u64, s.counters.requests));
            }
        }
    }
    out
}

impl Model {
    /// Takes a new sample: rates against the previous one, the selection
    /// kept on the same backend if it is still there.
    pub fn update(&mut self, mut lines: Vec<Line>, now: Instant) {
        if let Some((then, totals)) = &self.previous {
            let secs = now.saturating_duration_since(*then).as_secs_f64();
            for l in &mut lines {
                if let Some(before) = totals.get(&l.key()).filter(|_| secs > 0.0) {
                    l.rate = Some(l.total.saturating_sub(*before) as f64 / secs);
                }
            }
        }
        let kept = self.selected_line().map(Line::key);
        self.previous = Some((now, lines.iter().map(|l| (l.key(), l.total)).collect()));
        self.lines = lines;
        self.selected = kept
            .and_then(|k| self.lines.iter().position(|l| l.key() == k))
            .or_else(|| self.lines.iter().position(Line::selectable));
    }

    /// The selected line.
    pub fn selected_line(&self) -> Option<&Line> {
        self.selected.and_then(|i| self.lines.get(i))
    }

    /// Moves the selection to the next (`down`) or previous selectable line.
    pub fn step(&mut self, down: bool) {
        let Some(from) = self.selected else { return };
        let n = self.lines.len();
        let found = (1..n)
            .map(|d| {
                if down {
                    (from + d) % n
                } else {
                    (from + n - d) % n
                }
            })
            .find(|&i| self.lines[i].selectable());
        if let Some(i) = found {
            self.selected = Some(i);
        }
    }

    /// The request a key asks for on the selected line, if any.
    pub fn action(&self, key: char) -> Option<Request> {
        let state = match key {
            'd' => AdminState::Drain,
            'e' => AdminState::Ready,
            'm' => AdminState::Maint,
            _ => return None,
        };
        let line = self.selected_line()?;
        Some(Request::SetBackendState {
            service: line.group.clone(),
            address: line.address.parse().ok()?,
            state,
        })
    }
}

/// Asks the agent for everything shown.
fn fetch(socket: &Path) -> Result<Vec<Line>> {
    let ask = |r| client::request(socket, r).context("asking the agent");
    let services = match ask(Request::ShowServices)? {
        Response::Services(s) => s,
        Response::Error(e) => anyhow::bail!("{e}"),
        other => anyhow::bail!("unexpected answer: {other:?}"),
    };
    let backends = match ask(Request::ShowBackends { service: None })? {
        Response::Backends(b) => b,
        Response::Error(e) => anyhow::bail!("{e}"),
        other => anyhow::bail!("unexpected answer: {other:?}"),
    };
    // A failed part fails the refresh (said on the status line): an empty
    // table would look like a proxy with no frontend.
    let proxy = match ask(Request::ShowProxy)? {
        Response::Proxy(p) => p,
        Response::Error(e) => anyhow::bail!("{e}"),
        other => anyhow::bail!("unexpected answer: {other:?}"),
    };
    Ok(lines(&services, &backends, &proxy))
}

fn style(line: &Line) -> Style {
    let colour = match (line.admin, line.health) {
        (None, _) => Color::Cyan,
        (Some(AdminState::Maint), _) => Color::DarkGray,
        (Some(AdminState::Drain), _) => Color::Blue,
        (Some(AdminState::Ready), Some(Health::Down)) => Color::Red,
        (Some(AdminState::Ready), _) => Color::Green,
    };
    Style::default().fg(colour)
}

fn row(line: &Line) -> Row<'static> {
    let name = match line.kind {
        "backend" | "server" => format!("  {}", line.address),
        _ => line.group.clone(),
    };
    let text = |v: Option<String>| v.unwrap_or_else(|| "-".into());
    Row::new(vec![
        line.kind.to_string(),
        name,
        text(line.admin.map(|a| format!("{a:?}").to_lowercase())),
        text(line.health.map(|h| format!("{h:?}").to_lowercase())),
        text(line.weight.map(|w| w.to_string())),
        line.current.to_string(),
        line.total.to_string(),
        text(line.rate.map(|r| format!("{r:.1}"))),
    ])
    .style(style(line))
}

/// Draws the model.
fn draw(frame: &mut ratatui::Frame<'_>, model: &Model) {
    let [title, body, status] = Layout::vertical([
        Constraint::Length(1),
        Constraint::Min(3),
        Constraint::Length(1),
    ])
    .areas(frame.area());
    let help = "lb top  ↑/↓ select  d drain  e enable  m maint  q quit";
    frame.render_widget(Paragraph::new(help), title);
    let widths = [
        Constraint::Length(9),
        Constraint::Min(24),
        Constraint::Length(7),
        Constraint::Length(10),
        Constraint::Length(7),
        Constraint::Length(8),
        Constraint::Length(12),
        Constraint::Length(10),
    ];
    let header = [
        "KIND", "NAME", "STATE", "HEALTH", "WEIGHT", "CUR", "TOTAL", "RATE/s",
    ];
    let rows: Vec<Row<'static>> = model
        .lines
        .iter()
        .enumerate()
        .map(|(i, l)| {
            let r = row(l);
            if Some(i) == model.selected {
                r.add_modifier(Modifier::REVERSED)
            } else {
                r
            }
        })
        .collect();
    let table = Table::new(rows, widths)
        .header(Row::new(header).add_modifier(Modifier::BOLD))
        .block(Block::bordered());
    frame.render_widget(table, body);
    frame.render_widget(Paragraph::new(model.status.as_str()), status);
}

/// What a key press asks for.
enum Key {
    Quit,
    Move(bool),
    Act(char),
    Nothing,
}

fn key(ev: Event) -> Key {
    let Event::Key(k) = ev else {
        return Key::Nothing;
    };
    if k.kind != KeyEventKind::Press {
        return Key::Nothing;
    }
    match k.code {
        KeyCode::Char('c') if k.modifiers.contains(KeyModifiers::CONTROL) => Key::Quit,
        KeyCode::Char('q') | KeyCode::Esc => Key::Quit,
        KeyCode::Down | KeyCode::Char('j') => Key::Move(true),
        KeyCode::Up | KeyCode::Char('k') => Key::Move(false),
        KeyCode::Char(c @ ('d' | 'e' | 'm')) => Key::Act(c),
        _ => Key::Nothing,
    }
}

/// Refreshes the model; counts failures in a row.
fn refresh(model: &mut Model, socket: &Path, failures: &mut u32) {
    match fetch(socket) {
        Ok(lines) => {
            model.update(lines, Instant::now());
            *failures = 0;
        }
        Err(e) => {
            model.status = format!("refresh failed: {e:#}");
            *failures += 1;
        }
    }
}

/// Carries out a key's action on the selected line; its outcome goes to the status line.
fn act(model: &mut Model, socket: &Path, c: char) {
    let Some(request) = model.action(c) else {
        return;
    };
    let what = format!("{request:?}");
    model.status = match client::request(socket, request) {
        Ok(Response::Error(e)) => format!("refused: {e}"),
        Ok(_) => format!("done: {what}"),
        Err(e) => format!("failed: {e}"),
    };
}

/// Runs the dashboard on the terminal until `q`, refreshing every `interval`;
/// ends after `MAX_FAILURES` failed refreshes in a row, or after `limit`.
pub fn run(socket: &Path, interval: Duration, limit: Option<Duration>) -> Result<()> {
    let mut terminal = ratatui::try_init().context("setting up the terminal")?;
    let result = event_loop(&mut terminal, socket, interval, limit);
    ratatui::restore();
    result
}

fn event_loop(
    terminal: &mut ratatui::DefaultTerminal,
    socket: &Path,
    interval: Duration,
    limit: Option<Duration>,
) -> Result<()> {
    let started = Instant::now();
    let mut model = Model::default();
    let mut failures = 0;
    let mut next = Instant::now();
    while limit.is_none_or(|l| started.elapsed() < l) {
        if Instant::now() >= next {
            refresh(&mut model, socket, &mut failures);
            anyhow::ensure!(failures < MAX_FAILURES, "{}", model.status);
            next = Instant::now() + interval;
        }
        terminal.draw(|f| draw(f, &model))?;
        let wait = next.saturating_duration_since(Instant::now());
        if !event::poll(wait).context("reading the terminal")? {
            continue;
        }
        match key(event::read().context("reading the terminal")?) {
            Key::Quit => break,
            Key::Move(down) => model.step(down),
            Key::Act(c) => {
                act(&mut model, socket, c);
                // Show the change at once.
                next = Instant::now();
            }
            Key::Nothing => {}
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn backend(service: &str, address: &str, admin: AdminState, packets: u64) -> BackendInfo {
        BackendInfo {
            service: service.into(),
            address: address.parse().unwrap(),
            weight: 1,
            admin,
            health: Health::Up,
            last_check: None,
            active_flows: 2,
            max_flows: 0,
            packets,
            bytes: 0,
        }
    }

    fn service(name: &str, packets: u64) -> ServiceInfo {
        ServiceInfo {
            name: name.into(),
            vip: "198.18.100.1:80".parse().unwrap(),
            protocol: crate::config::Protocol::Tcp,
            mode: crate::config::Mode::L4,
            forwarding: crate::config::Forwarding::Nat,
            hash: crate::config::FlowHash::Flow,
            backends: 2,
            packets,
            bytes: 0,
            discovery: None,
        }
    }

    #[test]
    fn rates_selection_and_actions() {
        let t0 = Instant::now();
        let bs = |p| {
            vec![
                backend("web", "10.0.0.1:80", AdminState::Ready, p),
                backend("web", "10.0.0.2:80", AdminState::Drain, 0),
            ]
        };
        let mut m = Model::default();
        m.update(
            lines(&[service("web", 10)], &bs(10), &ProxyInfo::default()),
            t0,
        );
        assert_eq!(m.lines.len(), 3);
        assert_eq!(
            m.selected,
            Some(1),
            "the first backend, not the service line"
        );
        assert_eq!(m.lines[1].rate, None);
        let t1 = t0 + Duration::from_secs(2);
        m.update(
            lines(&[service("web", 30)], &bs(30), &ProxyInfo::default()),
            t1,
        );
        assert_eq!(m.lines[0].rate, Some(10.0));
        assert_eq!(m.lines[0].current, 4, "flows of both backends");
        m.step(true);
        assert_eq!(m.selected, Some(2));
        m.step(true);
        assert_eq!(m.selected, Some(1), "wraps around, skipping the service");
        assert_eq!(
            m.action('d'),
            Some(Request::SetBackendState {
                service: "web".into(),
                address: "10.0.0.1:80".parse().unwrap(),
                state: AdminState::Drain,
            })
        );
        assert_eq!(m.action('x'), None);
    }
}
