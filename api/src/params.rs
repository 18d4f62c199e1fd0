//! Query-string parameters the goim way: lists are repeated parameters
//! (`mids=1&mids=2`); every error names the parameter.

use std::collections::HashMap;
use std::str::FromStr;

use crate::HttpError;

/// The parsed query string.
#[derive(Debug, Default)]
pub(crate) struct Params {
    values: HashMap<String, Vec<String>>,
}

impl Params {
    pub(crate) fn parse(query: Option<&str>) -> Params {
        let mut values: HashMap<String, Vec<String>> = HashMap::new();
        for (name, value) in form_urlencoded::parse(query.unwrap_or("").as_bytes()) {
            values
                .entry(name.into_owned())
                .or_default()
                .push(value.into_owned());
        }
        Params { values }
    }

    /// Returns an optional single parameter.
    pub(crate) fn opt(&self, name: &str) -> Option<&str> {
        self.values
            .get(name)
            .and_then(|v| v.first())
            .map(String::as_str)
    }

    /// Returns a required, non-empty single parameter.
    pub(crate) fn required(&self, name: &str) -> Result<&str, HttpError> {
        match self.opt(name) {
            Some(value) if !value.is_empty() => Ok(value),
            Some(_) => Err(HttpError::BadRequest(format!(
                "invalid parameter \"{name}\": empty"
            ))),
            None => Err(HttpError::BadRequest(format!(
                "missing parameter \"{name}\""
            ))),
        }
    }

    /// Parses a required single parameter.
    pub(crate) fn parse_required<T: FromStr>(
        &self,
        name: &str,
        what: &str,
    ) -> Result<T, HttpError> {
        let raw = self.required(name)?;
        raw.parse().map_err(|_| {
            HttpError::BadRequest(format!(
                "invalid parameter \"{name}\": {raw:?} is not {what}"
            ))
        })
    }

    /// Parses an optional single parameter (absent or empty: `None`).
    pub(crate) fn parse_opt<T: FromStr>(
        &self,
        name: &str,
        what: &str,
    ) -> Result<Option<T>, HttpError> {
        match self.opt(name) {
            None | Some("") => Ok(None),
            Some(raw) => raw.parse().map(Some).map_err(|_| {
                HttpError::BadRequest(format!(
                    "invalid parameter \"{name}\": {raw:?} is not {what}"
                ))
            }),
        }
    }

    /// Parses an optional single parameter, with a default.
    pub(crate) fn parse_or<T: FromStr>(
        &self,
        name: &str,
        what: &str,
        default: T,
    ) -> Result<T, HttpError> {
        Ok(self.parse_opt(name, what)?.unwrap_or(default))
    }

    /// Returns a required list (a repeated parameter), without empty items.
    /// Values are not split on commas: a connection key may contain one.
    pub(crate) fn list(&self, name: &str) -> Result<Vec<String>, HttpError> {
        let items: Vec<String> = self
            .values
            .get(name)
            .into_iter()
            .flatten()
            .filter(|v| !v.is_empty())
            .cloned()
            .collect();
        if items.is_empty() {
            return Err(HttpError::BadRequest(format!(
                "missing parameter \"{name}\""
            )));
        }
        Ok(items)
    }

    /// Parses a required list.
    pub(crate) fn parse_list<T: FromStr>(
        &self,
        name: &str,
        what: &str,
    ) -> Result<Vec<T>, HttpError> {
        // Numbers may also be comma-separated (`mids=1,2`).
        self.list(name)?
            .iter()
            .flat_map(|v| v.split(','))
            .map(str::trim)
            .filter(|v| !v.is_empty())
            .map(|raw| {
                raw.parse().map_err(|_| {
                    HttpError::BadRequest(format!(
                        "invalid parameter \"{name}\": {raw:?} is not {what}"
                    ))
                })
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repeated_and_comma_separated_lists_parse() {
        let p = Params::parse(Some("mids=1&mids=2,3&mids=&op=1000&keys=a%2Cb&keys=c"));
        assert_eq!(p.list("keys").unwrap(), vec!["a,b", "c"]);
        assert_eq!(
            p.parse_list::<i64>("mids", "an integer").unwrap(),
            vec![1, 2, 3]
        );
        assert_eq!(p.parse_required::<i32>("op", "an integer").unwrap(), 1000);
    }

    #[test]
    fn errors_name_the_parameter() {
        let p = Params::parse(Some("mids=1&mids=x&operation="));
        let err = p
            .parse_list::<i64>("mids", "an integer")
            .unwrap_err()
            .to_string();
        assert_eq!(err, "invalid parameter \"mids\": \"x\" is not an integer");
        assert_eq!(
            p.required("operation").unwrap_err().to_string(),
            "invalid parameter \"operation\": empty"
        );
        assert_eq!(
            p.required("room").unwrap_err().to_string(),
            "missing parameter \"room\""
        );
        assert_eq!(
            p.list("keys").unwrap_err().to_string(),
            "missing parameter \"keys\""
        );
    }
}
