//! Splitting pure work over the machine's cores. Results come back in input order, so the
//! output is the same whatever the number of threads.

use std::num::NonZeroUsize;

/// Below this many items a single thread is faster than starting more.
const MIN_ITEMS_PER_THREAD: usize = 512;

/// Applies `f` to contiguous chunks of `items`, one chunk per available core, and returns the
/// results in chunk order.
pub fn map_chunks<T: Sync, R: Send>(items: &[T], f: impl Fn(&[T]) -> R + Sync) -> Vec<R> {
    let threads = std::thread::available_parallelism()
        .map(NonZeroUsize::get)
        .unwrap_or(1)
        .min(items.len() / MIN_ITEMS_PER_THREAD)
        .max(1);
    if threads == 1 {
        return vec![f(items)];
    }
    let chunk = items.len().div_ceil(threads);
    std::thread::scope(|scope| {
        let f = &f;
        let handles: Vec<_> = items
            .chunks(chunk)
            .map(|part| scope.spawn(move || f(part)))
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
            })
            .collect()
    })
}

/// Runs two closures, in parallel when that is worth it.
pub fn join<A: Send, B: Send>(
    a: impl FnOnce() -> A + Send,
    b: impl FnOnce() -> B + Send,
) -> (A, B) {
    std::thread::scope(|scope| {
        let other = scope.spawn(b);
        let first = a();
        let second = other
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic));
        (first, second)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_keep_order() {
        let items: Vec<usize> = (0..5000).collect();
        let sums = map_chunks(&items, |part| part.to_vec());
        assert_eq!(sums.concat(), items);
        assert_eq!(map_chunks(&items[..3], |p| p.len()), vec![3]);
    }
}
