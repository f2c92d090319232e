//! The per-partition offset tracker: the commit point is the lowest unfinished offset.
