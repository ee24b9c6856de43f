//! Micro-batch passes run from several host threads at once, their results merged in pass order.
//!
//! On a GPU a training pass is bound by its host: each of its tens of thousands of candle ops costs tens of µs to
//! issue, and each loss or statistic read back to the host waits for the device to drain. Passes of one update
//! are independent until their gradients are summed, so several host threads can issue them onto the device's
//! one stream, where they run in submission order. The merge still happens in pass order on the calling thread,
//! so sums (losses, statistics, gradients) are added in the order a single thread adds them, and the update is the
//! same bit for bit whatever the thread count.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{mpsc, Condvar, Mutex};

use candle_core::Device;

/// How many passes run at once: `setting` when it is not 0 (auto), else 2 on accelerators and 1 on the CPU (whose
/// ops already use every core).
pub fn concurrent_passes(setting: usize, device: &Device) -> usize {
    match setting {
        0 if device.is_cpu() => 1,
        0 => 2,
        n => n,
    }
}

/// The `prepare` of [`run_in_order`] for passes on `device`: makes it current on each worker thread (a CUDA
/// context is current per thread, and cuBLAS uses whichever is).
pub fn bind_device<E: From<pairuni_model::ModelError>>(
    device: &Device,
) -> impl Fn() -> Result<(), E> + Sync + '_ {
    move || {
        pairuni_model::device::bind_thread(device)
            .map_err(|e| pairuni_model::ModelError::Device(e.to_string()).into())
    }
}

/// What the merge tells the runner after each pass.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Merged {
    /// Go on with the next pass.
    Continue,
    /// Stop: later passes are not merged (and those not started do not run).
    Stop,
}

/// Runs `work(i)` for every pass `i` in `0..n` on up to `threads` threads (the calling thread merges) and hands
/// each result to `merge` in order of `i`. `prepare` runs first on every worker thread (making the device current
/// there). No pass starts more than `threads` places ahead of the merge, so at most that many results wait. With
/// one thread, or one pass, everything runs on the calling thread, one pass after the other.
///
/// The first error, of a pass or of the merge, is returned once every started pass has finished; passes not yet
/// started are skipped.
pub fn run_in_order<T, E>(
    n: usize,
    threads: usize,
    prepare: impl Fn() -> Result<(), E> + Sync,
    work: impl Fn(usize) -> Result<T, E> + Sync,
    mut merge: impl FnMut(usize, T) -> Result<Merged, E>,
) -> Result<(), E>
where
    T: Send,
    E: Send,
{
    let threads = threads.clamp(1, n.max(1));
    if threads == 1 {
        for i in 0..n {
            if merge(i, work(i)?)? == Merged::Stop {
                break;
            }
        }
        return Ok(());
    }
    let next = AtomicUsize::new(0);
    let stop = AtomicBool::new(false);
    // How many passes the merge has taken: a worker starts pass i only once i < merged + threads, so that at most
    // `threads` results (a set of gradients each) wait for the merge however the passes' times differ.
    let merged = (Mutex::new(0usize), Condvar::new());
    let advance = |to: usize| {
        if let Ok(mut m) = merged.0.lock() {
            *m = to;
        }
        merged.1.notify_all();
    };
    std::thread::scope(|scope| {
        let (tx, rx) = mpsc::channel::<(usize, Result<T, E>)>();
        for _ in 0..threads {
            let tx = tx.clone();
            let (next, stop, prepare, work, merged) = (&next, &stop, &prepare, &work, &merged);
            scope.spawn(move || {
                if let Err(e) = prepare() {
                    stop.store(true, Ordering::SeqCst);
                    merged.1.notify_all();
                    // The pass index is past every real one: the merge reports it after the others.
                    let _ = tx.send((usize::MAX, Err(e)));
                    return;
                }
                while !stop.load(Ordering::SeqCst) {
                    let i = next.fetch_add(1, Ordering::SeqCst);
                    if i >= n {
                        break;
                    }
                    let Ok(mut m) = merged.0.lock() else {
                        break;
                    };
                    while i >= *m + threads && !stop.load(Ordering::SeqCst) {
                        m = match merged.1.wait(m) {
                            Ok(m) => m,
                            Err(_) => return,
                        };
                    }
                    drop(m);
                    if stop.load(Ordering::SeqCst) {
                        break;
                    }
                    let result = work(i);
                    if result.is_err() {
                        stop.store(true, Ordering::SeqCst);
                        merged.1.notify_all();
                    }
                    if tx.send((i, result)).is_err() {
                        break;
                    }
                }
            });
        }
        drop(tx);
        let mut pending: BTreeMap<usize, Result<T, E>> = BTreeMap::new();
        let (mut wanted, mut done) = (0, false);
        let mut outcome: Result<(), E> = Ok(());
        for (i, result) in rx {
            // After a stop the remaining results are drained (so the workers can finish) and dropped.
            if done {
                continue;
            }
            pending.insert(i, result);
            // Passes are taken in index order and a started pass always reports, so every pass before one that
            // arrived arrives too.
            while let Some(result) = pending.remove(&wanted) {
                wanted += 1;
                match result.and_then(|t| merge(wanted - 1, t)) {
                    Ok(Merged::Continue) => {}
                    Ok(Merged::Stop) => done = true,
                    Err(e) => {
                        outcome = Err(e);
                        done = true;
                    }
                }
                if done {
                    stop.store(true, Ordering::SeqCst);
                    pending.clear();
                    break;
                }
            }
            advance(wanted);
        }
        // A thread that could not start stopped the others before every pass ran: its error is what is left.
        if !done {
            if let Some((_, Err(e))) = pending.into_iter().find(|(_, r)| r.is_err()) {
                outcome = Err(e);
            }
        }
        outcome
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ordered(threads: usize, n: usize) -> Vec<usize> {
        let mut seen = Vec::new();
        run_in_order::<_, String>(
            n,
            threads,
            || Ok(()),
            |i| {
                // Later passes finish first, so the merge has to hold them back.
                std::thread::sleep(std::time::Duration::from_millis(((n - i) * 3) as u64));
                Ok(i * 10)
            },
            |i, v| {
                assert_eq!(v, i * 10);
                seen.push(i);
                Ok(Merged::Continue)
            },
        )
        .unwrap();
        seen
    }

    #[test]
    fn results_are_merged_in_pass_order_whatever_the_thread_count() {
        for threads in [1, 2, 3, 8] {
            assert_eq!(
                ordered(threads, 6),
                (0..6).collect::<Vec<_>>(),
                "{threads} threads"
            );
        }
        assert!(ordered(4, 0).is_empty());
    }

    #[test]
    fn passes_run_on_several_threads_at_once() {
        let busy = AtomicUsize::new(0);
        let most = AtomicUsize::new(0);
        run_in_order::<_, String>(
            4,
            2,
            || Ok(()),
            |_| {
                let now = busy.fetch_add(1, Ordering::SeqCst) + 1;
                most.fetch_max(now, Ordering::SeqCst);
                std::thread::sleep(std::time::Duration::from_millis(30));
                busy.fetch_sub(1, Ordering::SeqCst);
                Ok(())
            },
            |_, ()| Ok(Merged::Continue),
        )
        .unwrap();
        assert_eq!(most.load(Ordering::SeqCst), 2);
    }

    #[test]
    fn a_slow_first_pass_holds_back_the_others_to_the_thread_count() {
        // Pass 0 is slow; the other thread must not run far ahead, or its results would pile up unmerged.
        let started = Mutex::new(Vec::new());
        run_in_order::<_, String>(
            8,
            2,
            || Ok(()),
            |i| {
                started.lock().unwrap().push(i);
                if i == 0 {
                    std::thread::sleep(std::time::Duration::from_millis(150));
                    let ahead = started.lock().unwrap().len();
                    assert!(ahead <= 3, "{ahead} passes started while the first ran");
                }
                Ok(i)
            },
            |_, _| Ok(Merged::Continue),
        )
        .unwrap();
        assert_eq!(started.lock().unwrap().len(), 8);
    }

    #[test]
    fn a_failing_pass_is_reported_and_later_passes_are_not_merged() {
        for threads in [1, 2] {
            let merged = Mutex::new(Vec::new());
            let err = run_in_order(
                6,
                threads,
                || Ok(()),
                |i| {
                    if i == 2 {
                        Err(format!("pass {i} failed"))
                    } else {
                        Ok(i)
                    }
                },
                |i, _| {
                    merged.lock().unwrap().push(i);
                    Ok(Merged::Continue)
                },
            )
            .unwrap_err();
            assert_eq!(err, "pass 2 failed");
            assert_eq!(*merged.lock().unwrap(), vec![0, 1], "{threads} threads");
        }
    }

    #[test]
    fn a_stop_from_the_merge_ends_the_merging() {
        for threads in [1, 3] {
            let mut merged = Vec::new();
            run_in_order::<_, String>(
                8,
                threads,
                || Ok(()),
                Ok,
                |i, _| {
                    merged.push(i);
                    Ok(if i == 3 {
                        Merged::Stop
                    } else {
                        Merged::Continue
                    })
                },
            )
            .unwrap();
            assert_eq!(merged, vec![0, 1, 2, 3], "{threads} threads");
        }
    }

    #[test]
    fn a_thread_that_cannot_start_is_an_error() {
        let err = run_in_order::<(), _>(
            4,
            2,
            || Err("no device".to_string()),
            |_| Ok(()),
            |_, ()| Ok(Merged::Continue),
        )
        .unwrap_err();
        assert_eq!(err, "no device");
    }

    #[test]
    fn auto_runs_one_pass_at_a_time_on_the_cpu_and_a_set_count_stands() {
        assert_eq!(concurrent_passes(0, &Device::Cpu), 1);
        assert_eq!(concurrent_passes(3, &Device::Cpu), 3);
    }
}
