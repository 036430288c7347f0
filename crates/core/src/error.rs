//! The error type shared by the diffuse crates.
//!
//! Messages are meant for users: they name the file, the field or the tensor at fault.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A configuration value is missing, of the wrong type or out of range.
    #[error("{context}: field `{field}`: {message}")]
    Config {
        context: String,
        field: String,
        message: String,
    },

    /// A file could not be read or written.
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    /// Weights that do not fit the model (missing, unexpected or mis-shaped tensors).
    #[error("{0}")]
    Weights(String),

    /// Anything else a user did wrong (bad argument, unsupported option).
    #[error("{0}")]
    Invalid(String),

    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub fn config(
        context: impl Into<String>,
        field: impl Into<String>,
        message: impl Into<String>,
    ) -> Self {
        Error::Config {
            context: context.into(),
            field: field.into(),
            message: message.into(),
        }
    }

    pub fn invalid(message: impl Into<String>) -> Self {
        Error::Invalid(message.into())
    }

    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }
}
