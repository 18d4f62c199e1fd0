//! Lists that read from a TOML array or, for environment variables, from a
//! comma-separated string (`RIM_COMET__TCP_BIND=0.0.0.0:3101,[::]:3101`).
//! A list of URLs splits only at a comma followed by a scheme, as a URL may
//! hold commas itself (a libpq host list, `postgres://u@h1:5432,h2:5432/db`).

use std::fmt;
use std::marker::PhantomData;
use std::str::FromStr;

use serde::de::{self, Deserializer, SeqAccess, Visitor};

/// Deserializes a list from a sequence or a comma-separated string.
pub(crate) fn deserialize<'de, D, T>(deserializer: D) -> Result<Vec<T>, D::Error>
where
    D: Deserializer<'de>,
    T: FromStr + de::Deserialize<'de>,
    T::Err: fmt::Display,
{
    list(deserializer, |s| s.split(',').collect())
}

/// Deserializes a list of URLs from a sequence or a string of URLs
/// separated by commas, each starting with its scheme (`scheme://`): a
/// comma not followed by one stays in the URL before it.
pub(crate) fn deserialize_urls<'de, D, T>(deserializer: D) -> Result<Vec<T>, D::Error>
where
    D: Deserializer<'de>,
    T: FromStr + de::Deserialize<'de>,
    T::Err: fmt::Display,
{
    list(deserializer, split_urls)
}

/// Splits `s` before every comma that a `scheme://` follows.
fn split_urls(s: &str) -> Vec<&str> {
    let mut items = Vec::new();
    let mut start = 0;
    for (at, _) in s.match_indices(',') {
        if starts_with_scheme(&s[at + 1..]) {
            items.push(&s[start..at]);
            start = at + 1;
        }
    }
    items.push(&s[start..]);
    items
}

/// Whether `s` (leading blanks aside) starts with `scheme://`, a scheme
/// being a letter and then letters, digits, `+`, `-` or `.`.
fn starts_with_scheme(s: &str) -> bool {
    let s = s.trim_start();
    let Some((scheme, _)) = s.split_once("://") else {
        return false;
    };
    scheme
        .chars()
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic())
        && scheme
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.'))
}

/// Deserializes a list from a sequence, or from a string cut into items by
/// `split`.
fn list<'de, D, T>(deserializer: D, split: fn(&str) -> Vec<&str>) -> Result<Vec<T>, D::Error>
where
    D: Deserializer<'de>,
    T: FromStr + de::Deserialize<'de>,
    T::Err: fmt::Display,
{
    struct ListVisitor<T> {
        split: fn(&str) -> Vec<&str>,
        item: PhantomData<T>,
    }

    impl<'de, T> Visitor<'de> for ListVisitor<T>
    where
        T: FromStr + de::Deserialize<'de>,
        T::Err: fmt::Display,
    {
        type Value = Vec<T>;

        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a list or a comma-separated string")
        }

        fn visit_str<E: de::Error>(self, s: &str) -> Result<Vec<T>, E> {
            (self.split)(s)
                .into_iter()
                .map(str::trim)
                .filter(|item| !item.is_empty())
                .map(|item| {
                    item.parse()
                        .map_err(|e| E::custom(format!("{item:?}: {e}")))
                })
                .collect()
        }

        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<T>, A::Error> {
            let mut out = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(64));
            while let Some(item) = seq.next_element()? {
                out.push(item);
            }
            Ok(out)
        }

        fn visit_unit<E: de::Error>(self) -> Result<Vec<T>, E> {
            Ok(Vec::new())
        }
    }

    deserializer.deserialize_any(ListVisitor {
        split,
        item: PhantomData,
    })
}

#[cfg(test)]
mod tests {
    use super::split_urls;

    #[test]
    fn urls_split_only_where_a_scheme_follows() {
        assert_eq!(
            split_urls("postgres://u@h1:5432,h2:5433/db?x=1,postgresql://u@h3/db"),
            [
                "postgres://u@h1:5432,h2:5433/db?x=1",
                "postgresql://u@h3/db"
            ]
        );
        assert_eq!(
            split_urls("redis://a:1, redis://b:2"),
            ["redis://a:1", " redis://b:2"]
        );
        assert_eq!(
            split_urls("postgres://u@h1,h2/db"),
            ["postgres://u@h1,h2/db"]
        );
        assert_eq!(split_urls(""), [""]);
        // Not a scheme: stays in the URL before it.
        assert_eq!(split_urls("a://b,1x://c,://d"), ["a://b,1x://c,://d"]);
    }
}
