//! The in-process L2 switch. Built by issue #4; the crate exists so the workspace has its final shape.
