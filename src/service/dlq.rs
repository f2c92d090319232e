//! Dead-letter topic operations: filters, what a DLQ entry says, and replay records.
