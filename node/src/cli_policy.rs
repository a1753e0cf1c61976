//! `shoal policy ...`: the operator's side of the policy admin API.

use std::path::Path;

use http::{Method, StatusCode};
use serde_json::Value;

use crate::cli::{PolicyCommand, render_table, request};
use crate::config::EXIT_USAGE;
use policy::Kind;
use policy::trust::{self, OperatorKey};

pub(crate) async fn run(
    admin: &str,
    token_file: Option<&Path>,
    operator: Option<&Path>,
    cmd: PolicyCommand,
) -> i32 {
    match go(admin, token_file, operator, cmd).await {
        Ok(code) => code,
        Err(e) => {
            eprintln!("shoal policy: {e}");
            1
        }
    }
}

/// The operator key for a write, or the one-line usage error.
fn operator_key(operator: Option<&Path>, verb: &str) -> Result<OperatorKey, i32> {
    let Some(dir) = operator else {
        eprintln!(
            "shoal policy: {verb} must be signed: pass --operator-cert DIR (or set SHOAL_OPERATOR); make one with `shoal cert issue-operator`"
        );
        return Err(EXIT_USAGE);
    };
    OperatorKey::load(dir).map_err(|e| {
        eprintln!("shoal policy: --operator-cert: {e}");
        EXIT_USAGE
    })
}

async fn go(
    admin: &str,
    token_file: Option<&Path>,
    operator: Option<&Path>,
    cmd: PolicyCommand,
) -> Result<i32, String> {
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
            let key = match operator_key(operator, "apply") {
                Ok(k) => k,
                Err(code) => return Ok(code),
            };
            let parsed: Kind = kind.parse().map_err(|e| format!("kind: {e}"))?;
            let sig = key.sign(parsed, name, Some(&text));
            headers.extend(trust::to_headers(&sig));
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
            let key = match operator_key(operator, "delete") {
                Ok(k) => k,
                Err(code) => return Ok(code),
            };
            let parsed: Kind = kind.parse().map_err(|e| format!("kind: {e}"))?;
            let sig = key.sign(parsed, &name, None);
            headers.extend(trust::to_headers(&sig));
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
            if let Ok((s, list)) =
                request(admin, Method::GET, "/v1/policies", &[], Default::default()).await
                && s.is_success()
            {
                let rows: Vec<Value> = serde_json::from_slice(&list).unwrap_or_default();
                for r in rows {
                    if r["kind"] == kind.as_str()
                        && r["name"] == name.as_str()
                        && let Some(line) = conflict_line(&r)
                    {
                        eprintln!("{line}");
                    }
                }
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
                [
                    "KIND",
                    "NAME",
                    "VERSION",
                    "ORIGIN",
                    "OPERATOR",
                    "APPLIED ON",
                ]
                .map(String::from)
                .to_vec(),
            ];
            for r in &rows {
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
                    r["operator"]
                        .as_str()
                        .and_then(|o| o.rsplit('/').next())
                        .unwrap_or("-")
                        .into(),
                    format!("{}/{}", r["applied_on"], r["live_nodes"]),
                ]);
            }
            print!("{}", render_table(&table));
            for r in rows_conflicts(admin).await {
                println!("{r}");
            }
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
            for r in rows_conflicts(admin).await {
                println!("{r}");
            }
            Ok(0)
        }
    }
}

/// One line per unresolved conflict, from `/v1/policies`.
async fn rows_conflicts(admin: &str) -> Vec<String> {
    let Ok((status, body)) =
        request(admin, Method::GET, "/v1/policies", &[], Default::default()).await
    else {
        return Vec::new();
    };
    if !status.is_success() {
        return Vec::new();
    }
    let rows: Vec<Value> = serde_json::from_slice(&body).unwrap_or_default();
    rows.iter().filter_map(conflict_line).collect()
}

fn conflict_line(row: &Value) -> Option<String> {
    let winner = row["conflict"]["winner"].as_str()?;
    let loser = row["conflict"]["loser"].as_str()?;
    Some(format!(
        "CONFLICT {}/{}: version {} won over {}, written concurrently (neither writer saw the other); the loser was discarded; apply again to resolve",
        row["kind"].as_str().unwrap_or("-"),
        row["name"].as_str().unwrap_or("-"),
        winner,
        loser
    ))
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
            if let Some(p) = v["pending"].as_array() {
                let list: Vec<String> = p
                    .iter()
                    .map(|n| {
                        format!(
                            "{} ({})",
                            n["node"].as_str().unwrap_or("-"),
                            n["state"].as_str().unwrap_or("-")
                        )
                    })
                    .collect();
                println!("pending: {}", list.join(", "));
            }
            return Ok(2);
        }
        println!("applied on {done}/{} live nodes", nodes.len());
    }
    Ok(0)
}

fn errors(status: StatusCode, body: &[u8]) -> String {
    let v: Value = serde_json::from_slice(body).unwrap_or_default();
    match v["errors"].as_array() {
        Some(list) if list.len() == 1 => {
            format!("{status}: {}", list[0].as_str().unwrap_or("-"))
        }
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
