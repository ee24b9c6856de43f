//! Micro-batch passes run from several host threads at once, their results merged in pass order.
//!
//! On a GPU a training pass is bound by its host: each of its tens of thousands of candle ops costs tens of µs to
//! issue, and each loss or statistic read back to the host waits for the device to drain. Passes of one update
//! are independent until their gradients are summed, so several host threads can issue them onto the device's
//! one stream, where they run in submission order. The merge still happens in pass order on the calling thread,
//! so sums (losses, statistics, gradients) are added in the order a single thread adds them, and the update is the
//! same bit for bit whatever the thread count.
//!
//! On the CPU the same passes are the better unit of parallel work for a small model: candle spreads each op
//! over the cores, and at the toy's widths (160) most ops are too small to pay for the hand-off, so an SFT step
//! on two cores was barely faster than on one. Passes on one core each, side by side, took 1.6× less time
//! (docs/BENCHMARKS.md, "CPU passes"). So on the CPU each worker runs its passes inside its own one-thread rayon
//! pool, where candle's matrix products stay on that thread.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{mpsc, Condvar, Mutex};

use candle_core::Device;

/// Sets up the process for passes side by side on the CPU; the `pairuni` binary calls it first thing in `main`,
/// and so should any program that trains through this crate. It keeps candle's element-wise ops on the calling
/// thread and freed tensor buffers in one glibc heap (both below). Neither changes a number, only the time.
pub fn prepare_cpu_process() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    keep_freed_buffers();
    keep_elementwise_ops_on_their_thread();
}

/// Keeps freed tensor buffers in glibc's heap for reuse. candle allocates every op's output anew; glibc serves
/// an allocation above its mmap threshold with fresh pages (faulted in on first touch) and unmaps it on free, and
/// it moves that threshold as chunks are freed, so a step's cost depended on what ran before it (PairGRPO
/// rollouts after micro-batched updates took 1.5 s instead of 1.1 s on the toy). Fixed thresholds of 256 MiB
/// (mapping) and 1 GiB (returning the heap's top) make the toy's PairGRPO step ≈ 11 % and an SFT step ≈ 4 % faster
/// (docs/BENCHMARKS.md), with the same results and peak memory. One arena for every thread, because glibc maps and
/// unmaps the heaps of a thread's own arena as that thread frees its buffers, the same page faults again for
/// the micro-batch passes that run on threads of their own (a PairGRPO update of 64 rollouts per pass: 2.85 s
/// with an arena per thread, 1.53 s with one). Best effort: a refused setting changes nothing.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn keep_freed_buffers() {
    // SAFETY: mallopt only sets allocator parameters, under glibc's own lock; the arena limit applies to arenas
    // created afterwards, so it is best called before other threads allocate.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 256 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 1 << 30);
        libc::mallopt(libc::M_ARENA_MAX, 1);
    }
}

/// Keeps candle's element-wise CPU ops on the thread that issues them (`CANDLE_NUM_THREADS=1`) unless the user
/// chose otherwise. candle runs a large element-wise op on its own pool of spinning workers, one per core besides
/// the caller, which serves one caller at a time: passes side by side would queue on it, and its spinning workers
/// take the cores from the passes' matrix products. With it off, two passes on two cores took an SFT step of the
/// toy in 0.42 s against 0.68 s for one pass with every op spread over both cores (docs/BENCHMARKS.md, "CPU
/// passes"). Matrix products still use every core outside the passes (rollouts, evaluation), through rayon's
/// pool. It has to run before candle's pool first starts (the first large element-wise op), which reads it once.
fn keep_elementwise_ops_on_their_thread() {
    if std::env::var_os("CANDLE_NUM_THREADS").is_none() {
        std::env::set_var("CANDLE_NUM_THREADS", "1");
    }
}

/// How a step's passes run: how many at once, and whether each worker keeps candle's CPU ops on its own thread.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PassThreads {
    /// Passes in flight at once (at least 1).
    pub count: usize,
    /// Run each worker's passes inside a one-thread rayon pool, so that candle's CPU matrix products (which
    /// split over the current rayon pool) do not compete with the other workers for the cores.
    pub own_cpu_pool: bool,
}

impl PassThreads {
    /// `count` passes at once on `device`; on the CPU, with more than one, each worker keeps its ops to itself.
    pub fn on(device: &Device, count: usize) -> Self {
        let count = count.max(1);
        Self {
            count,
            own_cpu_pool: device.is_cpu() && count > 1,
        }
    }
}

/// How many passes run at once: `setting` when it is not 0 (auto), else 1 on accelerators (on an H200 two passes
/// in flight were no faster than one: 747 against 733 ms, docs/BENCHMARKS.md), and on the CPU one per
/// rayon thread when candle's element-wise ops run on the calling thread (`CANDLE_NUM_THREADS=1`, which
/// [`prepare_cpu_process`] sets unless told otherwise), or 1 when they run on candle's own spinning pool, where
/// concurrent passes would wait on each other's ops.
pub fn concurrent_passes(setting: usize, device: &Device) -> PassThreads {
    let count = match setting {
        0 if device.is_cpu() => {
            if candle_core::utils::barrier_pool().n_workers() == 0 {
                rayon::current_num_threads()
            } else {
                1
            }
        }
        0 => 1,
        n => n,
    };
    PassThreads::on(device, count)
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

/// Runs `work(i)` for every pass `i` in `0..n` on up to `threads.count` threads (the calling thread merges) and
/// hands each result to `merge` in order of `i`. `prepare` runs first on every worker thread (making the device
/// current there). No pass starts more than `threads.count` places ahead of the merge, so at most that many results
/// wait. With one thread, or one pass, everything runs on the calling thread, one pass after the other.
///
/// The first error, of a pass or of the merge, is returned once every started pass has finished; passes not yet
/// started are skipped.
pub fn run_in_order<T, E>(
    n: usize,
    threads: PassThreads,
    prepare: impl Fn() -> Result<(), E> + Sync,
    work: impl Fn(usize) -> Result<T, E> + Sync,
    mut merge: impl FnMut(usize, T) -> Result<Merged, E>,
) -> Result<(), E>
where
    T: Send,
    E: Send,
{
    let own_cpu_pool = threads.own_cpu_pool;
    let threads = threads.count.clamp(1, n.max(1));
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
            let body = move || {
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
            };
            scope.spawn(move || match own_pool(own_cpu_pool) {
                Some(pool) => pool.install(body),
                None => body(),
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

/// A one-thread rayon pool for a worker's passes when `wanted`; `None` (the passes then run on the worker, with
/// candle's ops spread over the global pool: slower, not wrong) when not, or when the pool cannot be built.
fn own_pool(wanted: bool) -> Option<rayon::ThreadPool> {
    if !wanted {
        return None;
    }
    match rayon::ThreadPoolBuilder::new()
        .num_threads(1)
        .thread_name(|_| "pairuni-pass".into())
        .build()
    {
        Ok(pool) => Some(pool),
        Err(e) => {
            tracing::warn!(error = %e, "no one-thread pool for a CPU pass; its ops use the global pool");
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `n` passes at once on plain threads.
    fn plain(n: usize) -> PassThreads {
        PassThreads {
            count: n,
            own_cpu_pool: false,
        }
    }

    fn ordered(threads: usize, n: usize) -> Vec<usize> {
        let mut seen = Vec::new();
        run_in_order::<_, String>(
            n,
            plain(threads),
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
            plain(2),
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
            plain(2),
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
                plain(threads),
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
                plain(threads),
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
            plain(2),
            || Err("no device".to_string()),
            |_| Ok(()),
            |_, ()| Ok(Merged::Continue),
        )
        .unwrap_err();
        assert_eq!(err, "no device");
    }

    #[test]
    fn cpu_workers_run_their_passes_and_ops_on_a_one_thread_pool_of_their_own() {
        // Each pass sees a rayon pool of one thread (where candle's matrix products then stay) and runs on a
        // thread of its own; the plain workers see the global pool.
        let seen = Mutex::new(Vec::new());
        let threads = PassThreads::on(&Device::Cpu, 2);
        assert!(threads.own_cpu_pool);
        run_in_order::<_, String>(
            6,
            threads,
            || Ok(()),
            |i| {
                let name = std::thread::current().name().map(str::to_string);
                seen.lock()
                    .unwrap()
                    .push((rayon::current_num_threads(), name));
                std::thread::sleep(std::time::Duration::from_millis(((6 - i) * 2) as u64));
                Ok(i)
            },
            |_, _| Ok(Merged::Continue),
        )
        .unwrap();
        let seen = seen.into_inner().unwrap();
        assert_eq!(seen.len(), 6);
        assert!(seen
            .iter()
            .all(|(n, name)| *n == 1 && name.as_deref() == Some("pairuni-pass")));
        let global = rayon::current_num_threads();
        let plain_seen = Mutex::new(Vec::new());
        run_in_order::<_, String>(
            2,
            plain(2),
            || Ok(()),
            |_| {
                plain_seen
                    .lock()
                    .unwrap()
                    .push(rayon::current_num_threads());
                Ok(())
            },
            |_, ()| Ok(Merged::Continue),
        )
        .unwrap();
        assert_eq!(plain_seen.into_inner().unwrap(), vec![global, global]);
    }

    #[test]
    fn a_set_count_stands_and_only_cpu_workers_get_their_own_pool() {
        assert_eq!(
            concurrent_passes(3, &Device::Cpu),
            PassThreads {
                count: 3,
                own_cpu_pool: true
            }
        );
        assert_eq!(
            concurrent_passes(1, &Device::Cpu),
            PassThreads::on(&Device::Cpu, 1)
        );
        // Auto on the CPU: one pass per rayon thread only when candle's element-wise ops run on the calling
        // thread; with candle's own pool of workers, one pass at a time.
        let auto = concurrent_passes(0, &Device::Cpu);
        if candle_core::utils::barrier_pool().n_workers() > 0 {
            assert_eq!(auto, PassThreads::on(&Device::Cpu, 1));
        } else {
            assert_eq!(
                auto,
                PassThreads::on(&Device::Cpu, rayon::current_num_threads())
            );
        }
    }
}
