//! gzip of servers' responses for clients that accept it
//! (`[frontend.compression]`, HAProxy's `compression algo gzip`, nginx's
//! `gzip on`): which requests and responses qualify, the header changes,
//! and a body compressed frame by frame.
//!
//! Each data frame is compressed and flushed (a sync flush, a few bytes) as
//! it comes, so a streamed response (server-sent events, a slow report) is
//! not held back waiting for a full deflate block; a response read whole is
//! one frame. Frontends with compression serve on hyper's path only.

use std::io::Write;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::Bytes;
use flate2::write::GzEncoder;
use http::header::{self, HeaderMap, HeaderValue};
use http::{Method, StatusCode};
use http_body_util::BodyExt;
use http_body_util::combinators::UnsyncBoxBody;
use hyper::body::{Body, Frame};

use super::model::Compression;
use super::stats::Shard;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Whether a request may get a gzip answer: not a HEAD, and its
/// Accept-Encoding takes `gzip` (or `x-gzip`, or `*`) with a non-zero q.
/// An explicit `gzip;q=0` wins over `*`.
pub(crate) fn wanted(method: &Method, headers: &HeaderMap) -> bool {
    if method == Method::HEAD {
        return false;
    }
    let (mut gzip, mut any) = (None, None);
    let values = headers.get_all(header::ACCEPT_ENCODING);
    for item in values
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
    {
        let mut params = item.split(';');
        let coding = params.next().unwrap_or("").trim();
        // A weight that is not a qvalue (0 to 1) makes the coding unwanted:
        // the answer as it is always suits.
        let q = params
            .filter_map(|p| p.trim().split_once('='))
            .find(|(name, _)| name.trim().eq_ignore_ascii_case("q"))
            .map_or(1.0, |(_, q)| {
                q.trim()
                    .parse::<f32>()
                    .ok()
                    .filter(|q| (0.0..=1.0).contains(q))
                    .unwrap_or(0.0)
            });
        if coding.eq_ignore_ascii_case("gzip") || coding.eq_ignore_ascii_case("x-gzip") {
            gzip = Some(gzip.map_or(q, |g: f32| g.max(q)));
        } else if coding == "*" {
            any = Some(q);
        }
    }
    gzip.or(any).is_some_and(|q| q > 0.0)
}

/// Whether a response qualifies: 200 to 203, not encoded already, not a
/// range, of a configured media type, at least `min_size` when its length is
/// known, and no `Cache-Control: no-transform`.
fn qualifies(cfg: &Compression, status: StatusCode, headers: &HeaderMap) -> bool {
    if !(200..=203).contains(&status.as_u16()) || headers.contains_key(header::CONTENT_RANGE) {
        return false;
    }
    let encoded = headers
        .get_all(header::CONTENT_ENCODING)
        .iter()
        .any(|v| !v.as_bytes().eq_ignore_ascii_case(b"identity"));
    if encoded {
        return false;
    }
    let no_transform = headers
        .get_all(header::CACHE_CONTROL)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|d| d.trim().eq_ignore_ascii_case("no-transform"));
    if no_transform {
        return false;
    }
    let length = headers
        .get(header::CONTENT_LENGTH)
        .map(|v| v.to_str().ok().and_then(|s| s.trim().parse::<u64>().ok()));
    match length {
        Some(Some(n)) if n < cfg.min_size => return false,
        Some(None) => return false,
        _ => {}
    }
    let Some(media) = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .map(str::trim)
    else {
        return false;
    };
    cfg.types.iter().any(|t| match t.strip_suffix("/*") {
        Some(kind) => media
            .split_once('/')
            .is_some_and(|(k, _)| k.eq_ignore_ascii_case(kind)),
        None => media.eq_ignore_ascii_case(t),
    })
}

/// The body the client gets: `body` compressed, its headers changed, when
/// the request `wanted` it and the response qualifies; else as it is. The
/// frontend's `stats` count what is compressed (HAProxy's `comp_*`).
pub(crate) fn response(
    (cfg, stats): (Option<&Compression>, &crate::stats::Counters),
    wanted: bool,
    status: StatusCode,
    headers: &mut HeaderMap,
    body: UnsyncBoxBody<Bytes, BoxError>,
) -> UnsyncBoxBody<Bytes, BoxError> {
    let Some(cfg) = cfg.filter(|c| qualifies(c, status, headers)) else {
        return body;
    };
    // Gzipped or not by the client's Accept-Encoding: a cache must know,
    // for the plain answer too (or it would serve it to every client).
    let varies = headers
        .get_all(header::VARY)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|v| v.trim() == "*" || v.trim().eq_ignore_ascii_case("accept-encoding"));
    if !varies {
        headers.append(header::VARY, HeaderValue::from_static("Accept-Encoding"));
    }
    if !wanted {
        return body;
    }
    headers.remove(header::CONTENT_LENGTH);
    // A range of the compressed body is not one of the server's.
    headers.remove(header::ACCEPT_RANGES);
    headers.insert(header::CONTENT_ENCODING, HeaderValue::from_static("gzip"));
    // Not the server's bytes any more: a strong validator becomes weak.
    if let Some(tag) = headers.get(header::ETAG)
        && !tag.as_bytes().starts_with(b"W/")
    {
        let mut weak = b"W/".to_vec();
        weak.extend_from_slice(tag.as_bytes());
        if let Ok(v) = HeaderValue::from_bytes(&weak) {
            headers.insert(header::ETAG, v);
        }
    }
    let stats = stats.shard();
    stats.compressed_response();
    Gzip {
        stats,
        left: Bytes::new(),
        yield_next: false,
        inner: body,
        encoder: Some(GzEncoder::new(
            Vec::new(),
            flate2::Compression::new(cfg.level),
        )),
        trailers: None,
    }
    .boxed_unsync()
}

/// Most bytes compressed in one poll (a 64 KiB answer took about 180 µs of
/// user time in `bench l7`'s gzip row: a slice, a quarter of that): a
/// large answer read whole is compressed a slice at a time, the
/// task yielding between slices, so the other connections of its thread
/// do not wait behind the whole of it.
const SLICE: usize = 16 * 1024;

/// A body compressed as it is read.
struct Gzip {
    /// The frontend's counters (this thread's part).
    stats: std::sync::Arc<Shard>,
    inner: UnsyncBoxBody<Bytes, BoxError>,
    /// None once the gzip trailer is out.
    encoder: Option<GzEncoder<Vec<u8>>>,
    /// What is left of the server's last data frame, to compress.
    left: Bytes,
    /// A slice went out and more is left: yield once before the next.
    yield_next: bool,
    /// The server's trailers, sent after the last compressed bytes.
    trailers: Option<HeaderMap>,
}

impl Gzip {
    /// Compresses the next slice of `left`; the bytes it made (possibly
    /// none: deflate holds some back until a flush, done at each slice's end).
    fn slice(&mut self) -> Result<Vec<u8>, BoxError> {
        let Some(encoder) = self.encoder.as_mut() else {
            return Ok(Vec::new());
        };
        let data = self.left.split_to(self.left.len().min(SLICE));
        encoder.write_all(&data)?;
        encoder.flush()?;
        let out = std::mem::take(encoder.get_mut());
        self.stats.compressed(data.len() as u64, out.len() as u64);
        self.yield_next = !self.left.is_empty();
        Ok(out)
    }
}

impl Body for Gzip {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        loop {
            if this.yield_next {
                this.yield_next = false;
                cx.waker().wake_by_ref();
                return Poll::Pending;
            }
            if this.encoder.is_none() {
                return Poll::Ready(this.trailers.take().map(|t| Ok(Frame::trailers(t))));
            }
            if !this.left.is_empty() {
                let out = this.slice()?;
                if !out.is_empty() {
                    return Poll::Ready(Some(Ok(Frame::data(out.into()))));
                }
                continue;
            }
            match ready!(Pin::new(&mut this.inner).poll_frame(cx)) {
                Some(Ok(frame)) => match frame.into_data() {
                    Ok(data) => this.left = data,
                    Err(frame) => {
                        if let Ok(t) = frame.into_trailers() {
                            this.trailers = Some(t);
                        }
                    }
                },
                Some(Err(e)) => return Poll::Ready(Some(Err(e))),
                None => {
                    let last = this.encoder.take().map(GzEncoder::finish).transpose()?;
                    let last = last.unwrap_or_default();
                    this.stats.compressed(0, last.len() as u64);
                    return Poll::Ready(Some(Ok(Frame::data(last.into()))));
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.encoder.is_none() && self.trailers.is_none()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::Full;
    use std::io::Read;

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(*k, HeaderValue::from_static(v));
        }
        h
    }

    #[test]
    fn accept_encoding_is_read_with_its_weights() {
        let get = Method::GET;
        let ok = |v: &'static str| wanted(&get, &headers(&[("accept-encoding", v)]));
        assert!(ok("gzip"));
        assert!(ok("br, GZIP;q=0.5"));
        assert!(ok("deflate, x-gzip"));
        assert!(ok("*"));
        assert!(!ok("gzip;q=0"));
        assert!(!ok("gzip;q=0, *"));
        assert!(!ok("br, deflate"));
        assert!(!ok("identity"));
        assert!(ok("gzip;Q=0.8"));
        assert!(!ok("gzip;q=high"), "not a qvalue");
        assert!(!ok("gzip;q=2"), "not a qvalue");
        assert!(!ok("gzip;q=NaN"), "not a qvalue");
        assert!(!wanted(&get, &HeaderMap::new()));
        assert!(!wanted(
            &Method::HEAD,
            &headers(&[("accept-encoding", "gzip")])
        ));
    }

    #[test]
    fn only_qualifying_responses_are_compressed() {
        let cfg = Compression::default();
        let ok = StatusCode::OK;
        let html = [("content-type", "text/html; charset=utf-8")];
        assert!(qualifies(&cfg, ok, &headers(&html)));
        assert!(qualifies(
            &cfg,
            ok,
            &headers(&[("content-type", "Application/JSON")])
        ));
        assert!(!qualifies(
            &cfg,
            StatusCode::PARTIAL_CONTENT,
            &headers(&html)
        ));
        assert!(!qualifies(&cfg, StatusCode::NOT_MODIFIED, &headers(&html)));
        assert!(!qualifies(
            &cfg,
            ok,
            &headers(&[("content-type", "image/png")])
        ));
        assert!(!qualifies(&cfg, ok, &HeaderMap::new()));
        let with = |extra: (&'static str, &'static str)| headers(&[html[0], extra]);
        assert!(!qualifies(&cfg, ok, &with(("content-encoding", "br"))));
        assert!(qualifies(&cfg, ok, &with(("content-encoding", "identity"))));
        assert!(!qualifies(
            &cfg,
            ok,
            &with(("cache-control", "public, no-transform"))
        ));
        assert!(!qualifies(&cfg, ok, &with(("content-length", "1023"))));
        assert!(qualifies(&cfg, ok, &with(("content-length", "1024"))));
        assert!(!qualifies(
            &cfg,
            ok,
            &with(("content-range", "bytes 0-1/2"))
        ));
        let images = Compression {
            types: vec!["image/*".into()],
            ..Compression::default()
        };
        assert!(qualifies(
            &images,
            ok,
            &headers(&[("content-type", "image/svg+xml")])
        ));
        assert!(!qualifies(&images, ok, &headers(&html)));
    }

    #[tokio::test]
    async fn a_compressed_body_inflates_to_the_original_with_its_headers_changed() {
        let text = "the quick brown fox jumps over the lazy dog\n".repeat(500);
        let mut h = headers(&[
            ("content-type", "text/plain"),
            ("content-length", "22000"),
            ("etag", "\"v1\""),
            ("accept-ranges", "bytes"),
            ("vary", "Cookie"),
        ]);
        let body = Full::new(Bytes::from(text.clone()))
            .map_err(|never| match never {})
            .boxed_unsync();
        let cfg = Compression::default();
        let stats = crate::stats::Counters::default();
        let out = response((Some(&cfg), &stats), true, StatusCode::OK, &mut h, body);
        assert_eq!(h["content-encoding"], "gzip");
        assert_eq!(h["etag"], "W/\"v1\"");
        assert!(!h.contains_key("content-length") && !h.contains_key("accept-ranges"));
        let vary: Vec<_> = h.get_all("vary").iter().collect();
        assert_eq!(vary, ["Cookie", "Accept-Encoding"]);
        let gz = out.collect().await.unwrap().to_bytes();
        let counted = stats.snapshot();
        assert_eq!(counted.comp_responses, 1);
        assert_eq!(
            (counted.comp_in, counted.comp_out),
            (22_000, gz.len() as u64)
        );
        assert!(gz.len() < text.len() / 10, "{} bytes", gz.len());
        let mut back = String::new();
        flate2::read::GzDecoder::new(&gz[..])
            .read_to_string(&mut back)
            .unwrap();
        assert_eq!(back, text);
        // Not wanted: untouched.
        let mut h = headers(&[("content-type", "text/plain")]);
        let body = Full::new(Bytes::from_static(b"plain"))
            .map_err(|never| match never {})
            .boxed_unsync();
        let out = response((Some(&cfg), &stats), false, StatusCode::OK, &mut h, body);
        assert!(!h.contains_key("content-encoding"));
        assert_eq!(out.collect().await.unwrap().to_bytes(), "plain");
    }

    #[tokio::test]
    async fn an_answer_read_whole_is_compressed_a_slice_per_poll() {
        let text = "<td>a row of a report</td>\n".repeat(2600);
        let text = &text[..4 * SLICE];
        let mut h = headers(&[("content-type", "text/html")]);
        let body = Full::new(Bytes::from(text.to_string()))
            .map_err(|never| match never {})
            .boxed_unsync();
        let stats = crate::stats::Counters::default();
        let cfg = Compression::default();
        let mut body = response((Some(&cfg), &stats), true, StatusCode::OK, &mut h, body);
        let (mut yields, mut gz) = (0, Vec::new());
        loop {
            let step =
                std::future::poll_fn(|cx| Poll::Ready(Pin::new(&mut body).poll_frame(cx))).await;
            match step {
                Poll::Pending => yields += 1,
                Poll::Ready(Some(frame)) => {
                    gz.extend_from_slice(&frame.unwrap().into_data().unwrap())
                }
                Poll::Ready(None) => break,
            }
        }
        // Four slices, a yield between each two.
        assert_eq!(yields, 3);
        let mut back = String::new();
        flate2::read::GzDecoder::new(&gz[..])
            .read_to_string(&mut back)
            .unwrap();
        assert_eq!(back, text);
    }
}
