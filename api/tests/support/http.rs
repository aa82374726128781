//! A tiny HTTP/1.1 client over tokio for the tests (keeps reqwest's build
//! out of the tree). Shared by the edge tests of `api` and `broker`, which
//! each use some of it.
#![allow(dead_code)]

use tokio::io::{AsyncReadExt, AsyncWriteExt};

pub struct Client;

impl Client {
    pub async fn request_auth(
        &self,
        method: &str,
        url: &str,
        body: &str,
        auth: &str,
    ) -> (u16, String) {
        let rest = url.strip_prefix("http://").expect("http url");
        let (host, path) = rest
            .split_once('/')
            .map_or((rest, "/".to_string()), |(h, p)| (h, format!("/{p}")));
        let mut s = tokio::net::TcpStream::connect(host).await.expect("connect");
        let auth = if auth.is_empty() {
            String::new()
        } else {
            format!("authorization: {auth}\r\n")
        };
        let req = format!(
            "{} {path} HTTP/1.1\r\nhost: {host}\r\n{auth}content-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
            method.to_uppercase(),
            body.len()
        );
        s.write_all(req.as_bytes()).await.expect("write");
        let mut out = Vec::new();
        s.read_to_end(&mut out).await.expect("read");
        let text = String::from_utf8_lossy(&out).into_owned();
        let code: u16 = text
            .split(' ')
            .nth(1)
            .and_then(|c| c.parse().ok())
            .expect("status");
        let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
        let body = if head
            .to_ascii_lowercase()
            .contains("transfer-encoding: chunked")
        {
            dechunk(body)
        } else {
            body.to_string()
        };
        (code, body)
    }
    pub async fn request(&self, method: &str, url: &str, body: &str) -> (u16, String) {
        self.request_auth(method, url, body, "").await
    }
    pub async fn get_text(&self, url: &str) -> (u16, String) {
        self.request("get", url, "").await
    }
    pub async fn get(&self, url: &str) -> (u16, serde_json::Value) {
        let (c, b) = self.request("get", url, "").await;
        (
            c,
            serde_json::from_str(&b).unwrap_or(serde_json::Value::Null),
        )
    }
    pub async fn get_auth(&self, url: &str, auth: &str) -> (u16, serde_json::Value) {
        let (c, b) = self.request_auth("get", url, "", auth).await;
        (
            c,
            serde_json::from_str(&b).unwrap_or(serde_json::Value::Null),
        )
    }
    pub async fn post(&self, url: &str, body: &str) -> (u16, serde_json::Value) {
        let (c, b) = self.request("post", url, body).await;
        (
            c,
            serde_json::from_str(&b).unwrap_or(serde_json::Value::Null),
        )
    }
    pub async fn patch(&self, url: &str, body: &str) -> (u16, serde_json::Value) {
        let (c, b) = self.request("patch", url, body).await;
        (
            c,
            serde_json::from_str(&b).unwrap_or(serde_json::Value::Null),
        )
    }
    pub async fn delete(&self, url: &str) -> (u16, serde_json::Value) {
        let (c, b) = self.request("delete", url, "").await;
        (
            c,
            serde_json::from_str(&b).unwrap_or(serde_json::Value::Null),
        )
    }
}

fn dechunk(mut s: &str) -> String {
    let mut out = String::new();
    while let Some((len, rest)) = s.split_once("\r\n") {
        let n = usize::from_str_radix(len.trim(), 16).unwrap_or(0);
        if n == 0 || rest.len() < n {
            break;
        }
        out.push_str(&rest[..n]);
        s = rest[n..].trim_start_matches("\r\n");
    }
    out
}
