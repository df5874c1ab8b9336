//! The sandbox's name server, at the wire level: a query in, an answer out. Parsing and
//! encoding are `hickory-proto`'s; what to answer is the caller's.

use std::net::Ipv4Addr;

use hickory_proto::op::{Message, MessageType, OpCode, Query, ResponseCode};
use hickory_proto::rr::{rdata::A, RData, Record, RecordType};

/// One question of a query.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Question {
    /// The name asked for, lower case, without the final dot.
    pub name: String,
    /// What is asked: `A` is answered with addresses; other types get an empty answer for an
    /// admitted name.
    pub wants_a: bool,
}

/// A parsed query and what it asks.
pub struct Request {
    message: Message,
    query: Option<Query>,
}

impl Request {
    /// Parses a query datagram; `None` for anything that is not one.
    pub fn parse(datagram: &[u8]) -> Option<Request> {
        let message = Message::from_vec(datagram).ok()?;
        if message.metadata.message_type != MessageType::Query {
            return None;
        }
        let query = message.queries.first().cloned();
        Some(Request { message, query })
    }

    /// The question, when there is exactly one of the standard kind.
    pub fn question(&self) -> Option<Question> {
        if self.message.metadata.op_code != OpCode::Query || self.message.queries.len() != 1 {
            return None;
        }
        let q = self.query.as_ref()?;
        Some(Question {
            name: q
                .name()
                .to_ascii()
                .trim_end_matches('.')
                .to_ascii_lowercase(),
            wants_a: q.query_type() == RecordType::A,
        })
    }

    fn response(&self, code: ResponseCode) -> Message {
        let mut m = Message::response(self.message.metadata.id, self.message.metadata.op_code);
        m.metadata.recursion_desired = self.message.metadata.recursion_desired;
        m.metadata.recursion_available = true;
        m.metadata.response_code = code;
        if let Some(q) = &self.query {
            m.add_query(q.clone());
        }
        m
    }

    fn encode(m: &Message) -> Vec<u8> {
        m.to_vec().unwrap_or_default()
    }

    /// The addresses of the question's name (an empty answer for other types than A).
    pub fn answer(&self, addresses: &[Ipv4Addr], ttl: u32) -> Vec<u8> {
        let mut m = self.response(ResponseCode::NoError);
        if let Some(q) = self
            .query
            .as_ref()
            .filter(|q| q.query_type() == RecordType::A)
        {
            for ip in addresses {
                m.add_answer(Record::from_rdata(q.name().clone(), ttl, RData::A(A(*ip))));
            }
        }
        Self::encode(&m)
    }

    /// "No such name".
    pub fn nxdomain(&self) -> Vec<u8> {
        Self::encode(&self.response(ResponseCode::NXDomain))
    }

    /// A failure to answer (the name could not be resolved upstream).
    pub fn servfail(&self) -> Vec<u8> {
        Self::encode(&self.response(ResponseCode::ServFail))
    }

    /// A query of a kind this server does not answer.
    pub fn refused(&self) -> Vec<u8> {
        Self::encode(&self.response(ResponseCode::Refused))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hickory_proto::rr::Name;
    use std::str::FromStr;

    fn query(name: &str, t: RecordType) -> Vec<u8> {
        let mut m = Message::new(0x1234, MessageType::Query, OpCode::Query);
        m.metadata.recursion_desired = true;
        m.add_query(Query::query(Name::from_str(name).unwrap(), t));
        m.to_vec().unwrap()
    }

    #[test]
    fn answers_and_refusals_round_trip() {
        let r = Request::parse(&query("Files.Example.COM.", RecordType::A)).unwrap();
        let q = r.question().unwrap();
        assert_eq!(
            q,
            Question {
                name: "files.example.com".into(),
                wants_a: true
            }
        );
        let a = Message::from_vec(&r.answer(&[Ipv4Addr::new(203, 0, 113, 5)], 30)).unwrap();
        assert_eq!(a.metadata.id, 0x1234);
        assert_eq!(a.metadata.message_type, MessageType::Response);
        assert_eq!(a.answers.len(), 1);
        assert_eq!(a.answers[0].ttl, 30);
        let nx = Message::from_vec(&r.nxdomain()).unwrap();
        assert_eq!(nx.metadata.response_code, ResponseCode::NXDomain);
        let r6 = Request::parse(&query("a.example.", RecordType::AAAA)).unwrap();
        assert!(!r6.question().unwrap().wants_a);
        let e = Message::from_vec(&r6.answer(&[Ipv4Addr::LOCALHOST], 30)).unwrap();
        assert!(e.answers.is_empty());
        assert!(Request::parse(b"garbage").is_none());
    }
}
