//! What the user hands the CLI — tickets and media inputs — checked with errors in their words.
//!
//! A ticket is copied by hand between terminals, so the usual damage is a cut-off end, a
//! character lost or added, or a line break from the terminal's wrapping. Whitespace is dropped
//! (a wrapped ticket still works); anything else is reported as "damaged or incomplete" with
//! what can be seen from the text (the wrong prefix, a character no ticket contains), never the
//! decoder's internals.
//!
//! Media inputs: a file or `-` (stdin), whose container is recognised from its first bytes by the
//! library; here we check that it was given to the right flag (an Ogg file is audio, so `--video
//! talk.ogg` is refused) and that at most one input reads stdin.

use anyhow::bail;
use waterfall::media::{FileSource, MediaKind, MediaSource, SourceError, SourceOptions};
use waterfall::wire::{self, Ticket, WireError};

/// The base58 alphabet (Bitcoin's) that ticket bodies are written in.
const BASE58: &str = "123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz";
/// What every ticket starts with.
const PREFIX: &str = "wf1";

/// Parses a ticket as a person pasted it.
pub fn parse_ticket(text: &str) -> anyhow::Result<Ticket> {
    let t: String = text.chars().filter(|c| !c.is_whitespace()).collect();
    let Some(body) = t.strip_prefix(PREFIX) else {
        bail!(
            "this is not a waterfall ticket: tickets start with {PREFIX:?} (copy the whole line \
             `waterfall broadcast` printed; to find a room by its name, use --room NAME)"
        );
    };
    if body.is_empty() {
        bail!("this ticket is damaged or incomplete: nothing follows {PREFIX:?}");
    }
    if let Some((i, c)) = body.char_indices().find(|(_, c)| !BASE58.contains(*c)) {
        bail!(
            "this ticket is damaged or incomplete: it contains {c:?} at character {}, which no \
             ticket contains (copy it again from the broadcaster's terminal)",
            PREFIX.len() + i + 1
        );
    }
    match t.parse::<Ticket>() {
        Ok(ticket) => Ok(ticket),
        Err(WireError::UnknownVersion { found, .. }) => bail!(
            "this ticket was made by another version of waterfall (ticket version {found}, this \
             one reads version {})",
            wire::VERSION
        ),
        Err(WireError::TooLarge { len, max, .. }) => {
            bail!("this ticket is damaged: {len} characters, more than a ticket can have ({max})")
        }
        Err(_) => bail!(
            "this ticket is damaged or incomplete: its {} characters do not decode to a ticket \
             (was the end cut off when it was copied?)",
            t.len()
        ),
    }
}

/// Which flag an input was given with.
#[derive(Debug, Clone, Copy)]
pub enum Role {
    Video,
    Audio,
}

impl Role {
    fn kind(self) -> MediaKind {
        match self {
            Role::Video => MediaKind::Video,
            Role::Audio => MediaKind::Audio,
        }
    }
}

/// Opens `--video SPEC` or `--audio SPEC`: a file, or `-` for stdin (the container recognised
/// from its first bytes). Refuses audio given as video and the other way round.
pub async fn open_source(
    spec: &str,
    role: Role,
    looped: bool,
) -> anyhow::Result<Box<dyn MediaSource>> {
    let opts = SourceOptions {
        loops: looped.then_some(u32::MAX),
        ..SourceOptions::default()
    };
    let (what, src) = if spec == "-" {
        let s = FileSource::from_async_read_detect(tokio::io::stdin(), opts)
            .await
            .map_err(describe)?;
        ("stdin".to_owned(), s)
    } else {
        let s = FileSource::open(spec, opts).await.map_err(describe)?;
        (spec.to_owned(), s)
    };
    let kind = src.codec().kind();
    if kind != role.kind() {
        let (is, flag) = match kind {
            MediaKind::Audio => ("audio", "--audio"),
            MediaKind::Video => ("video", "--video"),
        };
        let mime = src.codec().mime_type();
        bail!(
            "{what} holds {is} ({}), not {}: give it with {flag}",
            mime.rsplit('/').next().unwrap_or(mime),
            match role {
                Role::Video => "video",
                Role::Audio => "audio",
            }
        );
    }
    Ok(Box::new(src))
}

/// A source error as one readable sentence (the library's messages already name the file).
fn describe(e: SourceError) -> anyhow::Error {
    match e {
        SourceError::Open { path, source } if source.kind() == std::io::ErrorKind::NotFound => {
            anyhow::anyhow!("no such file: {}", path.display())
        }
        other => anyhow::Error::new(other),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(text: &str) -> String {
        format!("{:#}", parse_ticket(text).expect_err(text))
    }

    #[test]
    fn damaged_tickets_say_so_in_words() {
        let good = Ticket {
            v: wire::VERSION,
            room: "standup".into(),
            broadcaster: waterfall::proto::NodeId([7; 32]),
            addrs: vec!["/ip4/127.0.0.1/tcp/4001".into()],
            check: vec![1; 8],
        }
        .to_string();
        // A wrapped ticket still parses.
        let (a, b) = good.split_at(20);
        assert_eq!(
            parse_ticket(&format!(" {a}\n  {b}\n")).unwrap().room,
            "standup"
        );
        // Cut short, a character dropped in the middle, a mistyped character, no prefix.
        for bad in [
            &good[..good.len() - 5],
            &good[..good.len() / 2],
            &format!("{}{}", &good[..30], &good[31..]),
        ] {
            let e = err(bad);
            assert!(e.contains("damaged or incomplete"), "{bad}: {e}");
            assert!(!e.contains("Syntax") && !e.contains("Semantic") && !e.contains("CBOR"));
        }
        let e = err(&format!("{}0{}", &good[..10], &good[11..]));
        assert!(e.contains("'0' at character 11"), "{e}");
        assert!(err("standup").contains("not a waterfall ticket"));
        assert!(err("wf1").contains("nothing follows"));
    }
}
