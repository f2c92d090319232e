//! The built-in processors: `log` and `http`.
