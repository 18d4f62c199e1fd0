use std::path::Path;

use config::{Config, Environment, File, FileFormat, Source};
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::{ConfigError, Result};

/// Prefix of environment overrides: `RIM_<SECTION>__<KEY>`, e.g.
/// `RIM_COMET__BUCKETS=64`. Variables without `__` after the prefix (such as
/// `RIM_TEST_REDIS`) are not configuration, and variables for a section of
/// another role are ignored (see [`Load::inapplicable_overrides`]).
pub const ENV_PREFIX: &str = "RIM_";

/// Every section any role has. An environment override for a section of
/// another role is ignored (one environment can serve several roles); a
/// section no role has is an error, so typos are caught.
pub(crate) const ALL_SECTIONS: [&str; 10] = [
    "node",
    "comet",
    "logic",
    "api",
    "router",
    "queue",
    "job",
    "discovery",
    "metrics",
    "im",
];

/// A role config that loads in layers and validates itself.
pub trait Load: Default + Serialize + DeserializeOwned {
    /// Checks every value, naming the key of the first bad one, and fills
    /// values derived from others (e.g. the job group from the region).
    fn validate(&mut self) -> Result<()>;

    /// Returns the listeners that can push or kick and bind a non-loopback
    /// address without their token; `validate` refuses them unless
    /// `node.allow_unauthenticated`, and a role started anyway warns about
    /// each.
    fn open_listeners(&self) -> Vec<crate::OpenListener> {
        Vec::new()
    }

    /// Loads built-in defaults < the TOML file at `path` < the process environment.
    fn load(path: Option<&Path>) -> Result<Self> {
        Self::load_from(path, std::env::vars())
    }

    /// Returns the names of the variables in `env` that override a section
    /// of another role: this role ignores them, and its caller should say so
    /// (a variable meant for this role but named after another section
    /// would otherwise be dropped silently).
    fn inapplicable_overrides<I>(env: I) -> Result<Vec<String>>
    where
        I: IntoIterator<Item = (String, String)>,
    {
        let own = own_sections::<Self>()?;
        Ok(env
            .into_iter()
            .filter(|(name, _)| classify(name, &own) == Override::OtherRole)
            .map(|(name, _)| name)
            .collect())
    }

    /// Loads built-in defaults < the TOML file at `path` < the given environment.
    fn load_from<I>(path: Option<&Path>, env: I) -> Result<Self>
    where
        I: IntoIterator<Item = (String, String)>,
    {
        let own = own_sections::<Self>()?;
        let defaults = Config::try_from(&Self::default()).map_err(load_error)?;
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
        // Unknown sections go through, so that loading names the typo.
        let overrides = env
            .into_iter()
            .filter(|(name, _)| matches!(classify(name, &own), Override::Own | Override::Unknown))
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

/// The sections of role config `C` (its top-level keys).
fn own_sections<C: Load>() -> Result<Vec<String>> {
    Ok(Config::try_from(&C::default())
        .and_then(|defaults| defaults.collect())
        .map_err(load_error)?
        .into_keys()
        .collect())
}

/// What an environment variable is to a role.
#[derive(Debug, PartialEq, Eq)]
enum Override {
    /// Not `RIM_<SECTION>__<KEY>`: not configuration.
    NotConfig,
    /// Overrides a section of this role.
    Own,
    /// Overrides a section only other roles have: ignored.
    OtherRole,
    /// Names a section no role has: an error when loading.
    Unknown,
}

fn classify(name: &str, own_sections: &[String]) -> Override {
    let Some((section, _)) = name
        .strip_prefix(ENV_PREFIX)
        .and_then(|rest| rest.split_once("__"))
    else {
        return Override::NotConfig;
    };
    let section = section.to_ascii_lowercase();
    if own_sections.contains(&section) {
        Override::Own
    } else if ALL_SECTIONS.contains(&section.as_str()) {
        Override::OtherRole
    } else {
        Override::Unknown
    }
}

/// Keeps a loading error to one line.
fn load_error(err: config::ConfigError) -> ConfigError {
    let text = err.to_string();
    ConfigError::Load(text.split_whitespace().collect::<Vec<_>>().join(" "))
}
