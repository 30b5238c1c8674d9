//! Client subcommands that talk to a running server over HTTP:
//! `lakewriter apikey create|list|delete` and `lakewriter keys rotate`.

use clap::{Args, Subcommand};
use serde_json::json;

#[derive(Debug, Clone, Args)]
pub struct ServerConn {
    /// The server's HTTP address.
    #[arg(
        long,
        env = "LAKEWRITER_SERVER",
        default_value = "http://localhost:1323"
    )]
    pub server: String,
    /// An admin API key.
    #[arg(long, env = "LAKEWRITER_ADMIN_KEY", hide_env_values = true)]
    pub admin_key: String,
}

#[derive(Debug, Subcommand)]
pub enum ApiKeyCommand {
    /// Create a key; prints it once.
    Create {
        #[arg(long)]
        tenant: String,
        #[arg(long, default_value = "")]
        name: String,
        /// Comma-separated: read, write, admin.
        #[arg(long, value_delimiter = ',', default_value = "write,read")]
        scopes: Vec<String>,
        /// Comma-separated endpoint allow-list (default: all endpoints).
        #[arg(long, value_delimiter = ',')]
        endpoints: Option<Vec<String>>,
        #[command(flatten)]
        conn: ServerConn,
    },
    /// List keys (never shows key material).
    List {
        #[command(flatten)]
        conn: ServerConn,
    },
    /// Delete a key by id.
    Delete {
        id: String,
        #[command(flatten)]
        conn: ServerConn,
    },
}

#[derive(Debug, Subcommand)]
pub enum KeysCommand {
    /// Add a new JWT signing key; tokens of the old one stay valid until they expire.
    Rotate {
        #[command(flatten)]
        conn: ServerConn,
    },
}

async fn send(req: reqwest::RequestBuilder) -> anyhow::Result<serde_json::Value> {
    let resp = req.send().await?;
    let status = resp.status();
    let text = resp.text().await?;
    let body: serde_json::Value = serde_json::from_str(&text).unwrap_or(json!({ "body": text }));
    anyhow::ensure!(
        status.is_success(),
        "server answered {status}: {}",
        body["error"].as_str().unwrap_or(&text)
    );
    Ok(body)
}

fn client(conn: &ServerConn, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
    reqwest::Client::new()
        .request(
            method,
            format!("{}{path}", conn.server.trim_end_matches('/')),
        )
        .header("x-api-key", &conn.admin_key)
}

pub async fn apikey(cmd: ApiKeyCommand) -> anyhow::Result<()> {
    match cmd {
        ApiKeyCommand::Create {
            tenant,
            name,
            scopes,
            endpoints,
            conn,
        } => {
            let body =
                json!({"tenant": tenant, "name": name, "scopes": scopes, "endpoints": endpoints});
            let out =
                send(client(&conn, reqwest::Method::POST, "/api/v1/apikeys").json(&body)).await?;
            println!("{}", serde_json::to_string_pretty(&out)?);
            eprintln!("store the key now: it is not shown again");
        }
        ApiKeyCommand::List { conn } => {
            let out = send(client(&conn, reqwest::Method::GET, "/api/v1/apikeys")).await?;
            println!("{:<28} {:<16} {:<20} scopes", "id", "tenant", "name");
            for k in out["keys"].as_array().into_iter().flatten() {
                println!(
                    "{:<28} {:<16} {:<20} {}",
                    k["id"].as_str().unwrap_or(""),
                    k["tenant"].as_str().unwrap_or(""),
                    k["name"].as_str().unwrap_or(""),
                    k["scopes"]
                );
            }
        }
        ApiKeyCommand::Delete { id, conn } => {
            send(client(
                &conn,
                reqwest::Method::DELETE,
                &format!("/api/v1/apikeys/{id}"),
            ))
            .await?;
            println!("deleted {id}");
        }
    }
    Ok(())
}

pub async fn keys(cmd: KeysCommand) -> anyhow::Result<()> {
    match cmd {
        KeysCommand::Rotate { conn } => {
            let out = send(client(
                &conn,
                reqwest::Method::POST,
                "/api/v1/admin/keys/rotate",
            ))
            .await?;
            println!("new signing key {}", out["kid"].as_str().unwrap_or("?"));
        }
    }
    Ok(())
}
