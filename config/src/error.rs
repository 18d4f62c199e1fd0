/// Why a configuration could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The TOML file or an environment variable could not be read or parsed,
    /// or names a key rim does not know.
    #[error("{0}")]
    Load(String),
    /// A value parsed but is not allowed.
    #[error("invalid value for {key}: {reason}")]
    Invalid {
        /// Dotted key, e.g. `comet.buckets`.
        key: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A key that is optional in general is required by the other values,
    /// e.g. a token when a listener binds a non-loopback address.
    #[error("{key}: {reason}")]
    Missing {
        /// Dotted key, e.g. `api.push_token`.
        key: String,
        /// Why it is required here.
        reason: String,
    },
}

/// Result of loading or validating a configuration.
pub type Result<T, E = ConfigError> = std::result::Result<T, E>;

impl ConfigError {
    pub(crate) fn invalid(key: impl Into<String>, reason: impl Into<String>) -> Self {
        ConfigError::Invalid {
            key: key.into(),
            reason: reason.into(),
        }
    }
}
