//! `shoal policy ...`: the operator's side of the policy admin API.

use std::path::Path;

use http::{Method, StatusCode};
use serde_json::Value;

use crate::cli::{PolicyCommand, render_table, request};

pub(crate) async fn run(admin: &str, token_file: Option<&Path>, cmd: PolicyCommand) -> i32 {
    match go(admin, token_file, cmd).await {
        Ok(code) => code,
        Err(e) => {
            eprintln!("shoal policy: {e}");
            1
        }
    }
}

async fn go(admin: &str, token_file: Option<&Path>, cmd: PolicyCommand) -> Result<i32, String> {
    let mut headers: Vec<(&str, String)> = Vec::new();
    if let Some(path) = token_file {
        let token =
            std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
        headers.push(("authorization", format!("Bearer {}", token.trim())));
    }
    match cmd {
        PolicyCommand::Apply {
            file,
            wait,
            timeout,
        } => {
            let text =
                std::fs::read_to_string(&file).map_err(|e| format!("{}: {e}", file.display()))?;
            let value: Value =
                serde_yaml::from_str(&text).map_err(|e| format!("{}: {e}", file.display()))?;
            let kind = value["kind"].as_str().ok_or("document has no kind")?;
            let name = value["metadata"]["name"]
                .as_str()
                .ok_or("document has no metadata.name")?;
            let ct = if text.trim_start().starts_with('{') {
                "application/json"
            } else {
                "application/yaml"
            };
            headers.push(("content-type", ct.into()));
            let mut path = format!("/v1/policies/{kind}/{name}");
            if wait {
                path.push_str(&format!("?wait=all&timeout={timeout}"));
            }
            let (status, body) = request(admin, Method::PUT, &path, &headers, text.into()).await?;
            report_write(status, &body, &format!("{kind}/{name}"), "configured")
        }
        PolicyCommand::Delete { kind, name, wait } => {
            let mut path = format!("/v1/policies/{kind}/{name}");
            if wait {
                path.push_str("?wait=all");
            }
            let (status, body) =
                request(admin, Method::DELETE, &path, &headers, Default::default()).await?;
            report_write(status, &body, &format!("{kind}/{name}"), "deleted")
        }
        PolicyCommand::Get { kind, name, output } => {
            headers.push(("accept", format!("application/{output}")));
            let (status, body) = request(
                admin,
                Method::GET,
                &format!("/v1/policies/{kind}/{name}"),
                &headers,
                Default::default(),
            )
            .await?;
            if !status.is_success() {
                return Err(errors(status, &body));
            }
            print!("{}", String::from_utf8_lossy(&body));
            if !body.ends_with(b"\n") {
                println!();
            }
            Ok(0)
        }
        PolicyCommand::List => {
            let (status, body) = request(
                admin,
                Method::GET,
                "/v1/policies",
                &headers,
                Default::default(),
            )
            .await?;
            if !status.is_success() {
                return Err(errors(status, &body));
            }
            let rows: Vec<Value> = serde_json::from_slice(&body).map_err(|e| e.to_string())?;
            let mut table = vec![
                ["KIND", "NAME", "VERSION", "ORIGIN", "APPLIED ON"]
                    .map(String::from)
                    .to_vec(),
            ];
            for r in rows {
                let deleted = r["deleted"].as_bool() == Some(true);
                table.push(vec![
                    r["kind"].as_str().unwrap_or("-").into(),
                    format!(
                        "{}{}",
                        r["name"].as_str().unwrap_or("-"),
                        if deleted { " (deleted)" } else { "" }
                    ),
                    r["version"].as_str().unwrap_or("-").into(),
                    r["origin"].as_str().unwrap_or("-").into(),
                    format!("{}/{}", r["applied_on"], r["live_nodes"]),
                ]);
            }
            print!("{}", render_table(&table));
            Ok(0)
        }
        PolicyCommand::Status => {
            let (status, body) = request(
                admin,
                Method::GET,
                "/v1/policies/status",
                &headers,
                Default::default(),
            )
            .await?;
            if !status.is_success() {
                return Err(errors(status, &body));
            }
            let nodes: Vec<Value> = serde_json::from_slice(&body).map_err(|e| e.to_string())?;
            let mut table = vec![["NODE", "POLICY", "VERSION"].map(String::from).to_vec()];
            for n in nodes {
                let node = n["node"].as_str().unwrap_or("-").to_string();
                let policies = n["policies"].as_object().cloned().unwrap_or_default();
                if policies.is_empty() {
                    table.push(vec![node.clone(), "-".into(), "-".into()]);
                }
                let mut ids: Vec<_> = policies.into_iter().collect();
                ids.sort_by(|a, b| a.0.cmp(&b.0));
                for (id, v) in ids {
                    table.push(vec![node.clone(), id, v.as_str().unwrap_or("-").into()]);
                }
            }
            print!("{}", render_table(&table));
            Ok(0)
        }
    }
}

fn report_write(status: StatusCode, body: &[u8], id: &str, verb: &str) -> Result<i32, String> {
    if !status.is_success() {
        return Err(errors(status, body));
    }
    let v: Value = serde_json::from_slice(body).unwrap_or_default();
    let version = v["version"].as_str().unwrap_or("?");
    println!("{id} {verb}: version {version}");
    if let Some(nodes) = v["nodes"].as_array() {
        let done = nodes
            .iter()
            .filter(|n| n["version"].as_str() == Some(version))
            .count();
        if status == StatusCode::ACCEPTED {
            println!(
                "not yet applied everywhere: {done}/{} live nodes run it",
                nodes.len()
            );
            return Ok(2);
        }
        println!("applied on {done}/{} live nodes", nodes.len());
    }
    Ok(0)
}

fn errors(status: StatusCode, body: &[u8]) -> String {
    let v: Value = serde_json::from_slice(body).unwrap_or_default();
    match v["errors"].as_array() {
        Some(list) => {
            let lines: Vec<String> = list
                .iter()
                .filter_map(|e| e.as_str().map(|s| format!("  {s}")))
                .collect();
            format!("{status}\n{}", lines.join("\n"))
        }
        None => format!("{status}: {}", String::from_utf8_lossy(body).trim()),
    }
}
