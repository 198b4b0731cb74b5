//! The desktop app (placeholder until the workbench issue: one window that loads a model
//! on a worker thread and shows its summary).
