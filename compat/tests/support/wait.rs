//! Waiting for a cluster to get somewhere (ready, a member joined, a lease expired, a log
//! line written): try, and try again a little later, up to a deadline, then give up with
//! the last failure, which is what a failure message should show.

use std::time::{Duration, Instant};

/// Call `attempt` every `every` until it gives `Ok`, for at most `within`: its value, or
/// its last `Err` once the time is up.
pub fn retry<T, E>(
    within: Duration,
    every: Duration,
    mut attempt: impl FnMut() -> Result<T, E>,
) -> Result<T, E> {
    let deadline = Instant::now() + within;
    loop {
        match attempt() {
            Ok(v) => return Ok(v),
            Err(e) if Instant::now() >= deadline => return Err(e),
            Err(_) => std::thread::sleep(every),
        }
    }
}

/// [`retry`] for an async attempt, sleeping without holding a thread.
pub async fn retry_async<T, E>(
    within: Duration,
    every: Duration,
    mut attempt: impl AsyncFnMut() -> Result<T, E>,
) -> Result<T, E> {
    let deadline = Instant::now() + within;
    loop {
        match attempt().await {
            Ok(v) => return Ok(v),
            Err(e) if Instant::now() >= deadline => return Err(e),
            Err(_) => tokio::time::sleep(every).await,
        }
    }
}

/// Check `f` every `every` until it holds, for at most `within`: whether it came to hold.
pub fn wait_until(within: Duration, every: Duration, mut f: impl FnMut() -> bool) -> bool {
    retry(within, every, || if f() { Ok(()) } else { Err(()) }).is_ok()
}

/// [`wait_until`], sleeping without holding a thread.
pub async fn wait_until_async(
    within: Duration,
    every: Duration,
    mut f: impl FnMut() -> bool,
) -> bool {
    retry_async(within, every, async || if f() { Ok(()) } else { Err(()) })
        .await
        .is_ok()
}
