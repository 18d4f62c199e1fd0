use std::path::Path;

use config::{Config, Environment, File, FileFormat, Source};
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::{ConfigError, Result};

/// Prefix of environment overrides: `RIM_<SECTION>__<KEY>`, e.g.
/// `RIM_COMET__BUCKETS=64`. Variables without `__` after the prefix (such as
/// `RIM_TEST_REDIS`) are not configuration, and variables for a section of
/// another role are ignored.
pub const ENV_PREFIX: &str = "RIM_";

/// Every section any role has. An environment override for a section of
/// another role is ignored (one environment can serve several roles); a
/// section no role has is an error, so typos are caught.
pub(crate) const ALL_SECTIONS: [&str; 9] = [
    "node",
    "comet",
    "logic",
    "api",
    "router",
    "queue",
    "job",
    "discovery",
    "metrics",
];

/// A role config that loads in layers and validates itself.
pub trait Load: Default + Serialize + DeserializeOwned {
    /// Checks every value, naming the key of the first bad one, and fills
    /// values derived from others (e.g. the job group from the region).
    fn validate(&mut self) -> Result<()>;

    /// Loads built-in defaults < the TOML file at `path` < the process environment.
    fn load(path: Option<&Path>) -> Result<Self> {
        Self::load_from(path, std::env::vars())
    }

    /// Loads built-in defaults < the TOML file at `path` < the given environment.
    fn load_from<I>(path: Option<&Path>, env: I) -> Result<Self>
    where
        I: IntoIterator<Item = (String, String)>,
    {
        let defaults = Config::try_from(&Self::default()).map_err(load_error)?;
        let own_sections: Vec<String> = defaults
            .collect()
            .map_err(load_error)?
            .into_keys()
            .collect();
        let mut builder = Config::builder().add_source(defaults);
        if let Some(path) = path {
            if !path.is_file() {
                return Err(ConfigError::Load(format!(
                    "config file {} does not exist or is not a file",
                    path.display()
                )));
            }
            builder = builder.add_source(File::from(path).format(FileFormat::Toml).required(true));
        }
        let overrides = env
            .into_iter()
            .filter(|(name, _)| {
                let Some((section, _)) = name
                    .strip_prefix(ENV_PREFIX)
                    .and_then(|rest| rest.split_once("__"))
                else {
                    return false;
                };
                let section = section.to_ascii_lowercase();
                own_sections.contains(&section) || !ALL_SECTIONS.contains(&section.as_str())
            })
            .collect();
        builder = builder.add_source(
            Environment::with_prefix(ENV_PREFIX.trim_end_matches('_'))
                .prefix_separator("_")
                .separator("__")
                .try_parsing(true)
                .source(Some(overrides)),
        );
        let mut config: Self = builder
            .build()
            .and_then(Config::try_deserialize)
            .map_err(load_error)?;
        config.validate()?;
        Ok(config)
    }
}

/// Keeps a loading error to one line.
fn load_error(err: config::ConfigError) -> ConfigError {
    let text = err.to_string();
    ConfigError::Load(text.split_whitespace().collect::<Vec<_>>().join(" "))
}
