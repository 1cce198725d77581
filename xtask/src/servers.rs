//! Real servers the integration tests and the benchmarks run.

use std::path::Path;
use std::process::Command;

/// Debian's nginx in the foreground with `workers` worker processes,
/// answering "ok\n" to every request on 127.0.0.1:`port` (keep-alive
/// connections kept for 60 s and any number of requests), its files in
/// `dir`, which must exist. Writes its configuration there.
pub fn nginx(dir: &Path, port: u16, workers: u32) -> std::io::Result<Command> {
    let at = dir.display();
    let config = format!(
        "daemon off; master_process on; worker_processes {workers}; pid {at}/nginx.pid;
         error_log {at}/error.log;
         events {{ worker_connections 1024; }}
         http {{
           access_log off;
           client_body_temp_path {at}/body; proxy_temp_path {at}/proxy;
           fastcgi_temp_path {at}/fastcgi; uwsgi_temp_path {at}/uwsgi; scgi_temp_path {at}/scgi;
           server {{
             listen 127.0.0.1:{port}; keepalive_timeout 60; keepalive_requests 100000000;
             location / {{ return 200 \"ok\\n\"; }}
           }}
         }}"
    );
    let config_path = dir.join("nginx.conf");
    std::fs::write(&config_path, config)?;
    let mut command = Command::new("nginx");
    command
        .arg("-p")
        .arg(dir)
        .arg("-c")
        .arg(&config_path)
        .arg("-e")
        .arg(dir.join("error.log"));
    Ok(command)
}
