//! crypto (work in progress)
