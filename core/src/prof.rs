//! TEMPORARY profiler (not to be committed).
#![allow(missing_docs)]
#![allow(unsafe_code)]
use std::cell::Cell;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, Once};
static ON: AtomicBool = AtomicBool::new(false);
static INIT: Once = Once::new();
static TABLE: Mutex<Vec<(String, u64, u64)>> = Mutex::new(Vec::new());
thread_local! { static MODE: Cell<&'static str> = const { Cell::new("") }; }
pub fn enable(on: bool) { ON.store(on, Ordering::Relaxed); }
pub fn set_mode(m: &'static str) { MODE.with(|c| c.set(m)); }
extern "C" fn at_exit() { report(1); }
fn on() -> bool {
    INIT.call_once(|| {
        if std::env::var("MTP_PROF").is_ok() {
            ON.store(true, Ordering::Relaxed);
            unsafe { libc::atexit(at_exit) };
        }
    });
    ON.load(Ordering::Relaxed)
}
pub fn time<T>(name: &'static str, f: impl FnOnce() -> T) -> T {
    if !on() { return f(); }
    let t = std::time::Instant::now();
    let y = f();
    let ns = t.elapsed().as_nanos() as u64;
    let key = format!("{}{}", MODE.with(Cell::get), name);
    let mut tb = TABLE.lock().unwrap();
    if let Some(e) = tb.iter_mut().find(|e| e.0 == key) { e.1 += ns; e.2 += 1; } else { tb.push((key, ns, 1)); }
    y
}
pub fn report(calls: u64) {
    let mut tb = TABLE.lock().unwrap().clone();
    tb.sort();
    for (n, ns, c) in tb.iter() {
        let us = *ns as f64 / 1e3 / calls as f64;
        eprintln!("{n:<28} {us:>12.1} us  {c:>8} calls  {:>8.2} us/call", *ns as f64 / 1e3 / *c as f64);
    }
}
pub fn add(name: &'static str, since: std::time::Instant) {
    if !on() { return; }
    let ns = since.elapsed().as_nanos() as u64;
    let key = format!("{}{}", MODE.with(Cell::get), name);
    let mut tb = TABLE.lock().unwrap();
    if let Some(e) = tb.iter_mut().find(|e| e.0 == key) { e.1 += ns; e.2 += 1; } else { tb.push((key, ns, 1)); }
}
