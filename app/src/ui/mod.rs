//! One file per view. Views draw [`crate::app::UiState`] and push [`crate::app::Command`]s;
//! they never touch the worker, the disk or a tensor.

pub mod model;
