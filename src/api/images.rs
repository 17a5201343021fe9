//! Images in requests: Ollama's base64 `images`, OpenAI's `image_url` parts (data URLs;
//! http(s) URLs are fetched only when `WICK_FETCH_IMAGES=1`, since a server that fetches
//! what clients name can be pointed at its own network) and Anthropic's base64 sources.
//! Each becomes bytes in [`super::infer::InferRequest::images`], and a [`MARKER`] in the
//! message text where the chat template will render it; the model's vision turns the pair
//! into embeddings at that place.

use base64::Engine as _;
use std::time::Duration;

use super::error::ApiError;

/// Stands for an image in message text (U+FFFC, the object replacement character).
pub const MARKER: char = '\u{FFFC}';

/// Images one request may carry: each costs a pass of the vision tower.
pub const MAX_IMAGES: usize = 16;

/// The largest image a URL may return.
const MAX_FETCH_BYTES: usize = 32 << 20;

/// Where an image comes from.
pub enum Source {
    Bytes(Vec<u8>),
    Url(String),
}

/// Standard padded base64, as Ollama decodes it (a `data:` URI is an error here, with the
/// offset Go's decoder names).
pub fn from_base64(s: &str) -> Result<Vec<u8>, ApiError> {
    let bytes = s.as_bytes();
    let body = bytes.len()
        - bytes
            .iter()
            .rev()
            .take(2)
            .take_while(|&&b| b == b'=')
            .count();
    let bad = bytes[..body]
        .iter()
        .position(|&b| !(b.is_ascii_alphanumeric() || b == b'+' || b == b'/'))
        .or_else(|| (!bytes.len().is_multiple_of(4)).then_some(bytes.len() - bytes.len() % 4));
    if let Some(at) = bad {
        return Err(ApiError::BadRequest(format!(
            "invalid image data: illegal base64 data at input byte {at}"
        )));
    }
    base64::engine::general_purpose::STANDARD
        .decode(bytes)
        .map_err(|e| ApiError::BadRequest(format!("invalid image data: {e}")))
}

/// An OpenAI `image_url`: a `data:<type>;base64,...` URL now, an http(s) URL to fetch.
pub fn from_url(url: &str) -> Result<Source, ApiError> {
    if let Some(rest) = url.strip_prefix("data:") {
        let (_, data) = rest
            .split_once(";base64,")
            .ok_or_else(|| ApiError::BadRequest("image data URLs must be base64".into()))?;
        return Ok(Source::Bytes(from_base64(data)?));
    }
    if url.starts_with("http://") || url.starts_with("https://") {
        return Ok(Source::Url(url.to_string()));
    }
    Err(ApiError::BadRequest(
        "image_url must be a data URL or an http(s) URL".into(),
    ))
}

/// Refuses more than [`MAX_IMAGES`] images in one request.
pub fn check_count(n: usize) -> Result<(), ApiError> {
    if n > MAX_IMAGES {
        return Err(ApiError::BadRequest(format!(
            "at most {MAX_IMAGES} images per request, got {n}"
        )));
    }
    Ok(())
}

/// The bytes of every source, in order: URLs fetched when `fetch` allows (10 s, 32 MiB
/// each), refused otherwise.
pub async fn resolve(sources: Vec<Source>, fetch: bool) -> Result<Vec<Vec<u8>>, ApiError> {
    check_count(sources.len())?;
    let mut out = Vec::with_capacity(sources.len());
    for s in sources {
        out.push(match s {
            Source::Bytes(b) => b,
            Source::Url(_) if !fetch => {
                return Err(ApiError::BadRequest(
                    "image URLs are not fetched by this server (WICK_FETCH_IMAGES=1 allows it); send the image as a data URL".into(),
                ))
            }
            Source::Url(u) => fetch_image(&u).await?,
        });
    }
    Ok(out)
}

async fn fetch_image(url: &str) -> Result<Vec<u8>, ApiError> {
    let bad = |e: String| ApiError::BadRequest(format!("fetching image {url}: {e}"));
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .map_err(|e| bad(e.to_string()))?;
    let mut resp = client
        .get(url)
        .send()
        .await
        .and_then(reqwest::Response::error_for_status)
        .map_err(|e| bad(e.to_string()))?;
    let mut body = Vec::new();
    while let Some(chunk) = resp.chunk().await.map_err(|e| bad(e.to_string()))? {
        if body.len() + chunk.len() > MAX_FETCH_BYTES {
            return Err(bad(format!("larger than {MAX_FETCH_BYTES} bytes")));
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

/// A message's text built from its parts, as the dialects with content parts send it: text
/// parts joined by a blank line, each image a [`MARKER`] where it stands.
#[derive(Default)]
pub struct PartsText {
    text: String,
    after_text: bool,
}

impl PartsText {
    pub fn text(&mut self, t: &str) {
        if self.after_text {
            self.text.push_str("\n\n");
        }
        self.text.push_str(t);
        self.after_text = true;
    }

    pub fn image(&mut self) {
        self.text.push(MARKER);
        self.after_text = false;
    }

    pub fn is_empty(&self) -> bool {
        self.text.is_empty()
    }

    pub fn finish(self) -> String {
        self.text
    }
}

/// Text with a marker per image before it (where Ollama puts a message's images).
pub fn marked(images: usize, text: &str) -> String {
    std::iter::repeat_n(MARKER, images)
        .chain(text.chars())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_and_data_urls() {
        assert_eq!(from_base64("aGk=").unwrap(), b"hi");
        let e = from_base64("data:image/png;base64,aGk=").unwrap_err();
        assert!(
            e.to_string()
                .contains("illegal base64 data at input byte 4"),
            "{e}"
        );
        match from_url("data:image/png;base64,aGk=").unwrap() {
            Source::Bytes(b) => assert_eq!(b, b"hi"),
            Source::Url(_) => panic!("a data URL is bytes"),
        }
        assert!(matches!(
            from_url("https://example.com/a.png"),
            Ok(Source::Url(_))
        ));
        assert!(from_url("file:///etc/passwd").is_err());
        assert!(from_url("data:image/png,raw").is_err());
        assert_eq!(marked(2, "hi"), "\u{FFFC}\u{FFFC}hi");
    }

    #[tokio::test]
    async fn urls_need_the_setting() {
        let e = resolve(vec![Source::Url("http://127.0.0.1:1/x.png".into())], false)
            .await
            .unwrap_err();
        assert!(e.to_string().contains("WICK_FETCH_IMAGES"), "{e}");
        let many = (0..=MAX_IMAGES).map(|_| Source::Bytes(vec![1])).collect();
        assert!(resolve(many, true).await.is_err());
    }
}
