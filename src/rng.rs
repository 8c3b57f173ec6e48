//! A tiny, fully specified PRNG, so that a seed gives the same sample in every process,
//! platform and version of this tool (external RNG crates may change their streams).

/// A bound for [`SplitMix64::below_prepared`].
#[derive(Debug, Clone, Copy)]
pub struct Bound {
    zone: u64,
    divisor: strength_reduce::StrengthReducedU64,
}

impl Bound {
    pub fn new(bound: u64) -> Self {
        assert!(bound > 0, "below(0)");
        Self {
            zone: u64::MAX - (u64::MAX % bound),
            divisor: strength_reduce::StrengthReducedU64::new(bound),
        }
    }
}

/// SplitMix64 (Steele, Lea, Flood 2014): 64-bit state, passes BigCrush, trivially portable.
#[derive(Debug, Clone)]
pub struct SplitMix64 {
    state: u64,
}

impl SplitMix64 {
    pub fn new(seed: u64) -> Self {
        Self { state: seed }
    }

    /// A generator for a named sub-stream, so that independent draws (the sample, the few-shot
    /// examples of each prompt) do not shift each other when one of them changes.
    pub fn for_stream(seed: u64, stream: &str) -> Self {
        let digest = blake3::hash(stream.as_bytes());
        let mut salt = [0u8; 8];
        salt.copy_from_slice(&digest.as_bytes()[..8]);
        Self::new(seed ^ u64::from_le_bytes(salt))
    }

    pub fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform integer in `0..bound` without modulo bias (rejection sampling).
    pub fn below(&mut self, bound: u64) -> u64 {
        assert!(bound > 0, "below(0)");
        let zone = u64::MAX - (u64::MAX % bound);
        loop {
            let x = self.next_u64();
            if x < zone {
                return x % bound;
            }
        }
    }

    /// [`SplitMix64::below`] for a bound prepared once: the same numbers, drawn without a
    /// hardware division (a bootstrap draws millions below one bound).
    pub fn below_prepared(&mut self, bound: &Bound) -> u64 {
        loop {
            let x = self.next_u64();
            if x < bound.zone {
                return x % bound.divisor;
            }
        }
    }

    /// Uniform float in `[0, 1)`.
    pub fn unit_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Fisher-Yates shuffle.
    pub fn shuffle<T>(&mut self, items: &mut [T]) {
        for i in (1..items.len()).rev() {
            let j = self.below(i as u64 + 1) as usize;
            items.swap(i, j);
        }
    }

    /// `k` distinct elements drawn without replacement, in draw order.
    /// The first `k` items that `keep` accepts, in the order `choose` would draw them: the
    /// items it rejects drop out without moving the others, so the result over a list
    /// stays the same whatever else is rejected.
    pub fn choose_where<T: Clone>(
        &mut self,
        items: &[T],
        k: usize,
        keep: &dyn Fn(&T) -> bool,
    ) -> Vec<T> {
        let mut idx: Vec<usize> = (0..items.len()).collect();
        let mut out = Vec::with_capacity(k.min(items.len()));
        for i in 0..items.len() {
            if out.len() == k {
                break;
            }
            let j = i + self.below((idx.len() - i) as u64) as usize;
            idx.swap(i, j);
            if keep(&items[idx[i]]) {
                out.push(items[idx[i]].clone());
            }
        }
        out
    }

    pub fn choose<T: Clone>(&mut self, items: &[T], k: usize) -> Vec<T> {
        let mut idx: Vec<usize> = (0..items.len()).collect();
        let k = k.min(items.len());
        for i in 0..k {
            let j = i + self.below((idx.len() - i) as u64) as usize;
            idx.swap(i, j);
        }
        idx[..k].iter().map(|&i| items[i].clone()).collect()
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_prepared_bound_draws_what_below_draws() {
        for bound in [1u64, 2, 3, 7, 1000, 25_000, 1 << 40, u64::MAX / 3, u64::MAX] {
            let (mut a, mut b) = (SplitMix64::new(bound), SplitMix64::new(bound));
            let prepared = Bound::new(bound);
            for _ in 0..2000 {
                assert_eq!(a.below(bound), b.below_prepared(&prepared), "{bound}");
            }
        }
    }

    use super::*;

    #[test]
    fn splitmix_matches_reference_stream() {
        // Reference values of SplitMix64 seeded with 1234567 (from the public-domain C code).
        let mut rng = SplitMix64::new(1234567);
        assert_eq!(rng.next_u64(), 6457827717110365317);
        assert_eq!(rng.next_u64(), 3203168211198807973);
    }

    #[test]
    fn below_stays_in_range_and_covers_it() {
        let mut rng = SplitMix64::new(7);
        let mut seen = [false; 5];
        for _ in 0..200 {
            let x = rng.below(5) as usize;
            seen[x] = true;
        }
        assert!(seen.iter().all(|&s| s));
    }

    #[test]
    fn choose_where_drops_rejected_items_without_moving_the_rest() {
        let items: Vec<u32> = (0..50).collect();
        let all = SplitMix64::new(3).choose(&items, 50);
        let kept = SplitMix64::new(3).choose_where(&items, 10, &|x| x % 7 != 0);
        let expected: Vec<u32> = all.into_iter().filter(|x| x % 7 != 0).take(10).collect();
        assert_eq!(kept, expected);
        assert_eq!(
            SplitMix64::new(3).choose_where(&items, 10, &|_| true),
            SplitMix64::new(3).choose(&items, 10)
        );
    }

    #[test]
    fn choose_is_distinct_and_deterministic() {
        let items: Vec<u32> = (0..50).collect();
        let a = SplitMix64::new(3).choose(&items, 10);
        let b = SplitMix64::new(3).choose(&items, 10);
        assert_eq!(a, b);
        let mut d = a.clone();
        d.sort();
        d.dedup();
        assert_eq!(d.len(), 10);
    }
}
