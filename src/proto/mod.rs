//! Sans-IO core (work in progress)
