//! Keyset pagination with opaque tokens: a token encodes the last id a page
//! returned and which listing it belongs to, so a token from one listing is
//! refused by another.

use super::TenancyError;

pub const DEFAULT_PAGE_SIZE: u32 = 100;
pub const MAX_PAGE_SIZE: u32 = 1000;

/// A validated page request: how many rows, and after which id.
#[derive(Debug, Clone, Default)]
pub struct PageRequest {
    pub size: u32,
    pub after: Option<String>,
}

/// One page of results and the token for the next one (None on the last).
#[derive(Debug, Clone)]
pub struct Page<T> {
    pub items: Vec<T>,
    pub next_token: Option<String>,
}

impl PageRequest {
    /// Validates the API's `page_size` / `page_token` for listing `kind`.
    pub fn parse(kind: &str, size: u32, token: &str) -> Result<PageRequest, TenancyError> {
        let size = match size {
            0 => DEFAULT_PAGE_SIZE,
            n if n > MAX_PAGE_SIZE => {
                return Err(TenancyError::invalid(
                    "page_size",
                    format!("at most {MAX_PAGE_SIZE}"),
                ));
            }
            n => n,
        };
        let after = if token.is_empty() {
            None
        } else {
            Some(decode(kind, token).ok_or_else(|| {
                TenancyError::invalid(
                    "page_token",
                    "not a token from a previous response of this listing",
                )
            })?)
        };
        Ok(PageRequest { size, after })
    }

    /// Rows to fetch: one more than the page, to learn whether another exists.
    pub fn fetch_limit(&self) -> i64 {
        i64::from(self.size) + 1
    }

    /// Cuts the fetched rows to the page and makes the next token.
    pub fn finish<T>(&self, kind: &str, mut rows: Vec<T>, id_of: impl Fn(&T) -> String) -> Page<T> {
        let size = self.size as usize;
        let next_token = if rows.len() > size {
            rows.truncate(size);
            rows.last().map(|last| encode(kind, &id_of(last)))
        } else {
            None
        };
        Page {
            items: rows,
            next_token,
        }
    }
}

fn encode(kind: &str, last_id: &str) -> String {
    crate::hex::encode(format!("{kind}:{last_id}").as_bytes())
}

fn decode(kind: &str, token: &str) -> Option<String> {
    let bytes = crate::hex::decode(token)?;
    let text = String::from_utf8(bytes).ok()?;
    let (token_kind, id) = text.split_once(':')?;
    (token_kind == kind && !id.is_empty()).then(|| id.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_round_trip_and_are_bound_to_their_listing() {
        let request = PageRequest::parse("tenants", 2, "").expect("first page");
        let page = request.finish("tenants", vec!["a", "b", "c"], |s| (*s).to_owned());
        assert_eq!(page.items, vec!["a", "b"]);
        let token = page.next_token.expect("more pages");
        let next = PageRequest::parse("tenants", 2, &token).expect("valid token");
        assert_eq!(next.after.as_deref(), Some("b"));
        assert!(PageRequest::parse("keys", 2, &token).is_err());
        assert!(PageRequest::parse("tenants", 2, "zz").is_err());
        assert!(PageRequest::parse("tenants", 5000, "").is_err());
    }
}
