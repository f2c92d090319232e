//! The demo processor and its live counts.
