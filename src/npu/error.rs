//! Errors of the emulated NPU: bad shapes, bad profiles, unsupported formats.
//!
//! Owns the one error enum of the `npu` module. It must not know about tenants, gRPC codes or
//! any caller: callers map these errors to their own kinds.

use thiserror::Error;

/// Everything that can go wrong when loading a device profile or launching a kernel.
#[derive(Debug, Error)]
pub enum NpuError {
    /// An operand does not have the shape the kernel needs.
    #[error("{op}: bad shape: {detail}")]
    Shape {
        /// Kernel or constructor that rejected the operand.
        op: &'static str,
        /// Which operand and dimension were wrong, with the expected and actual values.
        detail: String,
    },
    /// A scalar argument is out of its valid range.
    #[error("{op}: invalid argument `{field}`: {detail}")]
    InvalidArgument {
        /// Kernel or constructor that rejected the argument.
        op: &'static str,
        /// Name of the argument.
        field: &'static str,
        /// Why it was rejected.
        detail: String,
    },
    /// No builtin profile has this name.
    #[error("unknown device profile `{name}` (builtin: {known})")]
    UnknownDevice {
        /// The requested name.
        name: String,
        /// Comma-separated builtin names.
        known: String,
    },
    /// A profile parsed but one of its fields is unusable.
    #[error("device profile `{profile}`: field `{field}`: {detail}")]
    Profile {
        /// Profile name (or file path when the name is unknown).
        profile: String,
        /// Dotted TOML path of the field.
        field: String,
        /// Why it was rejected.
        detail: String,
    },
    /// A profile file is not valid TOML for [`crate::npu::DeviceProfile`].
    #[error("device profile `{source_name}`: cannot parse: {message}")]
    ProfileParse {
        /// File path or builtin name.
        source_name: String,
        /// Parser message, which names the offending key and line.
        message: String,
    },
    /// A profile file could not be read.
    #[error("device profile file `{path}`: {source}")]
    Io {
        /// Path that was read.
        path: String,
        /// Underlying error.
        #[source]
        source: std::io::Error,
    },
}

/// Result alias of the `npu` module.
pub type Result<T> = std::result::Result<T, NpuError>;

/// Builds a [`NpuError::Shape`]; kept short because every kernel validates many operands.
pub(crate) fn shape_err(op: &'static str, detail: impl Into<String>) -> NpuError {
    NpuError::Shape {
        op,
        detail: detail.into(),
    }
}

/// Checks that an operand has exactly `expected` elements.
pub(crate) fn check_len(
    op: &'static str,
    what: &str,
    len: usize,
    expected: usize,
    dims: &str,
) -> Result<()> {
    if len == expected {
        Ok(())
    } else {
        Err(shape_err(
            op,
            format!("`{what}` has {len} elements, expected {dims} = {expected}"),
        ))
    }
}

/// Builds a [`NpuError::InvalidArgument`].
pub(crate) fn arg_err(
    op: &'static str,
    field: &'static str,
    detail: impl Into<String>,
) -> NpuError {
    NpuError::InvalidArgument {
        op,
        field,
        detail: detail.into(),
    }
}
