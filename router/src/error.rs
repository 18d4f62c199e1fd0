//! The router's error type.

/// Why a router operation failed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// The backend could not be reached or did not answer in time; retrying later may work.
    #[error("{0}")]
    Unavailable(String),
    /// The backend answered something the router did not expect.
    #[error("{0}")]
    Backend(String),
    /// The router was set up with something unusable (a bad URL or key prefix).
    #[error("{0}")]
    Config(String),
}

impl Error {
    /// Tells whether the same call may succeed later (the backend was unreachable or slow).
    pub fn is_transient(&self) -> bool {
        matches!(self, Error::Unavailable(_))
    }
}

/// Result of a router operation.
pub type Result<T, E = Error> = std::result::Result<T, E>;
