//! The name a connection says it is for, read from its first bytes: TLS's server name (SNI) or
//! HTTP's `Host`. Used to hold names on ports 443 and 80 to what was resolved: no domain
//! fronting through an admitted address.

/// What the first bytes tell.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Sniffed {
    /// The name (lower case, no port, no final dot).
    Name(String),
    /// Not enough bytes yet.
    Incomplete,
    /// No name can be read (not this protocol, or no name given).
    None,
}

fn clean(name: &str) -> String {
    name.trim_end_matches('.').to_ascii_lowercase()
}

/// The SNI of a TLS ClientHello.
pub fn tls_server_name(data: &[u8]) -> Sniffed {
    use tls_parser::{
        parse_tls_extensions, parse_tls_plaintext, TlsExtension, TlsMessage, TlsMessageHandshake,
    };
    // A TLS connection starts with a handshake record (22).
    match data.first() {
        None => return Sniffed::Incomplete,
        Some(22) => {}
        Some(_) => return Sniffed::None,
    }
    let record = match parse_tls_plaintext(data) {
        Ok((_, record)) => record,
        Err(tls_parser::nom::Err::Incomplete(_)) => return Sniffed::Incomplete,
        Err(_) => return Sniffed::None,
    };
    for msg in record.msg {
        if let TlsMessage::Handshake(TlsMessageHandshake::ClientHello(hello)) = msg {
            let Some(ext) = hello.ext else {
                return Sniffed::None;
            };
            let Ok((_, exts)) = parse_tls_extensions(ext) else {
                return Sniffed::None;
            };
            for e in exts {
                if let TlsExtension::SNI(names) = e {
                    for (_, name) in names {
                        if let Ok(n) = std::str::from_utf8(name) {
                            return Sniffed::Name(clean(n));
                        }
                    }
                }
            }
            return Sniffed::None;
        }
    }
    Sniffed::None
}

/// The `Host` of an HTTP/1 request head.
pub fn http_host(data: &[u8]) -> Sniffed {
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let mut req = httparse::Request::new(&mut headers);
    match req.parse(data) {
        Ok(httparse::Status::Complete(_)) => {}
        Ok(httparse::Status::Partial) => return Sniffed::Incomplete,
        Err(_) => return Sniffed::None,
    }
    let Some(host) = req
        .headers
        .iter()
        .find(|h| h.name.eq_ignore_ascii_case("host"))
        .and_then(|h| std::str::from_utf8(h.value).ok())
    else {
        return Sniffed::None;
    };
    let host = host.trim();
    // `[v6]:port`, `name:port` or a bare name.
    let name = if let Some(rest) = host.strip_prefix('[') {
        rest.split(']').next().unwrap_or("")
    } else {
        host.rsplit_once(':').map_or(host, |(h, _)| h)
    };
    Sniffed::Name(clean(name))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A minimal TLS 1.2 ClientHello with SNI `name`.
    pub fn client_hello(name: &str) -> Vec<u8> {
        let n = name.as_bytes();
        let mut sni = Vec::new();
        sni.extend_from_slice(&((n.len() + 3) as u16).to_be_bytes());
        sni.push(0);
        sni.extend_from_slice(&(n.len() as u16).to_be_bytes());
        sni.extend_from_slice(n);
        let mut ext = vec![0, 0];
        ext.extend_from_slice(&(sni.len() as u16).to_be_bytes());
        ext.extend_from_slice(&sni);
        let mut body = vec![3, 3];
        body.extend_from_slice(&[0u8; 32]);
        body.push(0);
        body.extend_from_slice(&[0, 2, 0x13, 0x01]);
        body.extend_from_slice(&[1, 0]);
        body.extend_from_slice(&(ext.len() as u16).to_be_bytes());
        body.extend_from_slice(&ext);
        let mut hs = vec![1];
        hs.extend_from_slice(&(body.len() as u32).to_be_bytes()[1..]);
        hs.extend_from_slice(&body);
        let mut rec = vec![22, 3, 1];
        rec.extend_from_slice(&(hs.len() as u16).to_be_bytes());
        rec.extend_from_slice(&hs);
        rec
    }

    #[test]
    fn reads_sni() {
        let hello = client_hello("Files.Example.com");
        assert_eq!(
            tls_server_name(&hello),
            Sniffed::Name("files.example.com".into())
        );
        assert_eq!(tls_server_name(&hello[..20]), Sniffed::Incomplete);
        assert_eq!(tls_server_name(b"GET / HTTP/1.1\r\n\r\n"), Sniffed::None);
    }

    #[test]
    fn reads_host() {
        assert_eq!(
            http_host(b"GET / HTTP/1.1\r\nHost: Example.com:8080\r\n\r\n"),
            Sniffed::Name("example.com".into())
        );
        assert_eq!(http_host(b"GET / HTTP/1.1\r\nHo"), Sniffed::Incomplete);
        assert_eq!(http_host(b"GET / HTTP/1.1\r\n\r\n"), Sniffed::None);
        assert_eq!(
            http_host(b"GET / HTTP/1.1\r\nhost: [::1]:80\r\n\r\n"),
            Sniffed::Name("::1".into())
        );
    }
}
