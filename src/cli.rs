//! Client subcommands that talk to a running server over HTTP:
//! `lakewriter apikey create|list|delete`, `lakewriter keys rotate` and
//! `lakewriter query "SQL"`.

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

/// `lakewriter query "SQL"`: runs read-only SQL on a server, prints a table.
#[derive(Debug, Clone, Args)]
pub struct QueryArgs {
    /// The SQL (tables: spans, state_patches, one per DataRecord endpoint).
    pub sql: String,
    /// The server's HTTP address.
    #[arg(
        long,
        env = "LAKEWRITER_SERVER",
        default_value = "http://localhost:1323"
    )]
    pub server: String,
    /// An API key with the `read` scope.
    #[arg(long, env = "LAKEWRITER_API_KEY", hide_env_values = true)]
    pub api_key: String,
}

pub async fn query(args: QueryArgs) -> anyhow::Result<()> {
    let resp = reqwest::Client::new()
        .post(format!(
            "{}/api/v1/query",
            args.server.trim_end_matches('/')
        ))
        .header("x-api-key", &args.api_key)
        .header("accept", crate::http::query::ARROW_STREAM)
        .json(&json!({ "sql": args.sql }))
        .send()
        .await?;
    let status = resp.status();
    let bytes = resp.bytes().await?;
    if !status.is_success() {
        let body: serde_json::Value = serde_json::from_slice(&bytes).unwrap_or(json!({}));
        anyhow::bail!(
            "server answered {status}: {}",
            body["error"]
                .as_str()
                .unwrap_or(&String::from_utf8_lossy(&bytes))
        );
    }
    let reader = arrow::ipc::reader::StreamReader::try_new(std::io::Cursor::new(bytes), None)?;
    let batches = reader.collect::<Result<Vec<_>, _>>()?;
    let rows: usize = batches.iter().map(|b| b.num_rows()).sum();
    println!("{}", arrow::util::pretty::pretty_format_batches(&batches)?);
    eprintln!("{rows} row(s)");
    Ok(())
}
