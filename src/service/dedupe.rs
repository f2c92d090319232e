//! The dedupe store: at most one successful processing per `message-id` within a window.
