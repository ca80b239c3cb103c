//! `raftkv cluster`: a local cluster of `raftkv serve` child processes on loopback, and
//! the live dashboard with its controls. The supervisor (`supervisor.rs`) owns the
//! members' processes, so the page can kill, pause, restart and cut them; `scenario/`
//! walks through Raft's stories on the real cluster; `load.rs` is the write load the page
//! starts; `guard.rs` says who may press the buttons.

mod guard;
mod load;
mod scenario;
mod supervisor;

use clap::Parser;
use server::network::tls;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

#[derive(Parser, Debug)]
pub struct ClusterArgs {
    /// Number of members.
    #[arg(long, default_value_t = 3)]
    nodes: usize,
    /// Where the members keep their data (one directory each) and logs.
    #[arg(long, default_value = "raftkv-data")]
    data_dir: PathBuf,
    /// Member i serves clients on base + 10·i and peers on base + 10·i + 1.
    #[arg(long, default_value_t = 2379)]
    base_port: u16,
    /// Serve clients and peers over TLS, with client certificates required on both: makes
    /// a throwaway CA and certificates under <data-dir>/tls (kept for the next run).
    #[arg(long)]
    tls: bool,
    /// Where the dashboard listens on 127.0.0.1 (default: --base-port + 100; 0 picks a
    /// free port, printed at start).
    #[arg(long)]
    dashboard_port: Option<u16>,
}

/// Start the members and the dashboard; stop them all on Ctrl-C or SIGTERM.
pub async fn run(a: ClusterArgs) -> Result<(), String> {
    if !(1..=9).contains(&a.nodes) {
        return Err("--nodes must be between 1 and 9".into());
    }
    let port = |i: usize, peer: bool| u32::from(a.base_port) + 10 * i as u32 + u32::from(peer);
    if port(a.nodes - 1, true) > u32::from(u16::MAX) {
        return Err("--base-port is too high for that many members".into());
    }
    for i in 0..a.nodes {
        for peer in [false, true] {
            let addr = format!("127.0.0.1:{}", port(i, peer));
            std::net::TcpListener::bind(&addr)
                .map_err(|e| format!("port {addr} is not free ({e}); pick another --base-port"))?;
        }
    }
    std::fs::create_dir_all(&a.data_dir).map_err(|e| format!("{}: {e}", a.data_dir.display()))?;
    let scheme = if a.tls { "https" } else { "http" };
    let names: Vec<String> = (0..a.nodes).map(|i| format!("n{i}")).collect();
    let pki = match a.tls {
        true => Some(tls::DevPki::ensure(&a.data_dir.join("tls"), &names)?),
        false => None,
    };
    let initial_cluster = (0..a.nodes)
        .map(|i| format!("n{i}={scheme}://127.0.0.1:{}", port(i, true)))
        .collect::<Vec<_>>()
        .join(",");
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let mut specs = Vec::new();
    for (i, n) in names.iter().enumerate() {
        let client = format!("{scheme}://127.0.0.1:{}", port(i, false));
        let peer = format!("{scheme}://127.0.0.1:{}", port(i, true));
        let mut args = vec!["serve".to_string()];
        if let Some(pki) = &pki {
            let path = |p: PathBuf| p.display().to_string();
            args.extend([
                format!("--cert-file={}", path(pki.server_cert(n))),
                format!("--key-file={}", path(pki.server_key(n))),
                format!("--trusted-ca-file={}", path(pki.ca())),
                "--client-cert-auth".to_string(),
                format!("--peer-cert-file={}", path(pki.peer_cert(n))),
                format!("--peer-key-file={}", path(pki.peer_key(n))),
                format!("--peer-trusted-ca-file={}", path(pki.ca())),
                "--peer-client-cert-auth".to_string(),
            ]);
        }
        // The dashboard polls each member's state over plain HTTP on loopback: the client
        // port when it is plaintext, else a metrics URL of its own (base + 10·i + 2).
        let poll_url = match a.tls {
            true => {
                let url = format!("http://127.0.0.1:{}", port(i, true) + 1);
                args.push(format!("--listen-metrics-urls={url}"));
                url
            }
            false => client.clone(),
        };
        args.extend([
            format!("--name={n}"),
            format!("--data-dir={}", a.data_dir.join(n).display()),
            format!("--listen-client-urls={client}"),
            format!("--advertise-client-urls={client}"),
            format!("--listen-peer-urls={peer}"),
            format!("--initial-advertise-peer-urls={peer}"),
            format!("--initial-cluster={initial_cluster}"),
            "--initial-cluster-token=raftkv-local".to_string(),
            // A small local cluster hashes in microseconds: check the members agree often.
            "--experimental-corrupt-check-time=1m".to_string(),
        ]);
        specs.push(supervisor::MemberSpec {
            name: n.clone(),
            args,
            log: a.data_dir.join(format!("{n}.log")),
            client_url: client,
            poll_url,
        });
    }
    if let Some(pki) = &pki {
        // The load and the scenarios' clients present the client certificate.
        tls::set_client_dialer(tls::Dialer::from_files(&tls::Files {
            cert: Some(pki.client_cert()),
            key: Some(pki.client_key()),
            trusted_ca: Some(pki.ca()),
            cert_auth: false,
        })?);
    }
    let dash_port = match a.dashboard_port {
        Some(p) => p,
        None => u16::try_from(u32::from(a.base_port) + 100).map_err(|_| {
            "--base-port is too high for the dashboard's port; give --dashboard-port"
        })?,
    };
    let dash_listener = tokio::net::TcpListener::bind(("127.0.0.1", dash_port))
        .await
        .map_err(|e| {
            format!("dashboard port 127.0.0.1:{dash_port}: {e}; pick another --dashboard-port")
        })?;
    let dash_addr = dash_listener.local_addr().map_err(|e| e.to_string())?;
    let (sup, mut exits) = supervisor::Supervisor::start(exe, specs).await?;
    // The controls obey only the page opened from the URL printed below (its token).
    let controls = Arc::new(guard::Controls::new(dash_addr));
    let app = sup.router(controls.clone());
    tokio::spawn(async move {
        if let Err(e) = axum::serve(dash_listener, app).await {
            eprintln!("raftkv: the dashboard stopped: {e}");
        }
    });
    let endpoints = (0..a.nodes)
        .map(|i| match a.tls {
            true => format!("https://127.0.0.1:{}", port(i, false)),
            false => format!("127.0.0.1:{}", port(i, false)),
        })
        .collect::<Vec<_>>()
        .join(",");
    // etcdctl's TLS flags (raftkv's client commands take the same), if any.
    let tls_flags = match &pki {
        Some(pki) => format!(
            " --cacert {} --cert {} --key {}",
            pki.ca().display(),
            pki.client_cert().display(),
            pki.client_key().display()
        ),
        None => String::new(),
    };
    println!(
        "raftkv: {} members, data in {}",
        a.nodes,
        a.data_dir.display()
    );
    for i in 0..a.nodes {
        println!(
            "  n{i}: client {scheme}://127.0.0.1:{}  peer {scheme}://127.0.0.1:{}",
            port(i, false),
            port(i, true)
        );
    }
    println!();
    println!("Dashboard (watch it, break it): {}", controls.url());
    println!();
    println!("Try it (etcd's own client, etcdctl 3.4+):");
    println!("  ETCDCTL_API=3 etcdctl --endpoints={endpoints}{tls_flags} put hello world");
    println!("  ETCDCTL_API=3 etcdctl --endpoints={endpoints}{tls_flags} endpoint status -w table");
    println!("  ETCDCTL_API=3 etcdctl --endpoints={endpoints}{tls_flags} watch hello --prev-kv   # in another terminal");
    println!();
    println!(
        "Metrics and health (etcd's names): {scheme}://127.0.0.1:{}/metrics, /health, /version",
        port(0, false)
    );
    println!();
    println!("Ctrl-C stops the cluster; running this again brings it back with its data.");
    use std::io::Write as _;
    let _ = std::io::stdout().flush();
    // Ctrl-C reaches the whole process group: each member shuts down on its own. A member
    // that exits by itself (removed from the cluster, a failed disk) is reported and the
    // others keep running; one killed from the dashboard is the dashboard's to restart.
    loop {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => break,
            _ = crate::terminated() => break,
            Some((name, status)) = exits.recv() => {
                eprintln!(
                    "raftkv: member {name} exited ({status}); see {}",
                    a.data_dir.join(format!("{name}.log")).display()
                );
            }
        }
    }
    sup.stop_all(Duration::from_secs(5)).await;
    println!("raftkv: stopped");
    Ok(())
}
