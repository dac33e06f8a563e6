//! Schedules for the program to walk: plain round robin is the list of ready members; weighted
//! round robin is one cycle of nginx's smooth weighted round robin (every step each member's
//! `current` grows by its weight, the largest is picked and loses the total), which spreads a
//! heavy member's turns out instead of bunching them.

/// One cycle of smooth weighted round robin over `(member key, weight)`, at most `max_len`
/// entries. Members of weight 0 are left out. Weights are divided by their greatest common
/// divisor; if the cycle is still longer than `max_len` they are scaled down (each kept at
/// least 1), so shares are then approximate: a weight set needing more than `max_len` turns per
/// cycle cannot be exact with this schedule length.
pub fn smooth_weighted(weights: &[(u32, u32)], max_len: usize) -> Vec<u32> {
    let live: Vec<(u32, u64)> = weights
        .iter()
        .filter(|(_, w)| *w > 0)
        .map(|&(k, w)| (k, u64::from(w)))
        .collect();
    if live.is_empty() || max_len == 0 {
        return Vec::new();
    }
    let divisor = live.iter().fold(0, |g, &(_, w)| gcd(g, w));
    let mut scaled: Vec<(u32, u64)> = live.iter().map(|&(k, w)| (k, w / divisor)).collect();
    let total: u64 = scaled.iter().map(|&(_, w)| w).sum();
    let max = max_len as u64;
    if total > max {
        // Proportional, at least 1 each; a member count above max_len keeps the first ones.
        scaled.truncate(max_len);
        for (_, w) in scaled.iter_mut() {
            *w = (*w * max / total).max(1);
        }
        while scaled.iter().map(|&(_, w)| w).sum::<u64>() > max {
            if let Some(heaviest) = scaled.iter_mut().max_by_key(|(_, w)| *w) {
                heaviest.1 -= 1;
            }
        }
    }
    let total: u64 = scaled.iter().map(|&(_, w)| w).sum();
    let mut current = vec![0i64; scaled.len()];
    let mut out = Vec::with_capacity(total as usize);
    for _ in 0..total {
        let mut best = 0;
        for (i, &(_, w)) in scaled.iter().enumerate() {
            current[i] += w as i64;
            if current[i] > current[best] {
                best = i;
            }
        }
        current[best] -= total as i64;
        out.push(scaled[best].0);
    }
    out
}

fn gcd(a: u64, b: u64) -> u64 {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn count(s: &[u32], k: u32) -> usize {
        s.iter().filter(|&&x| x == k).count()
    }

    #[test]
    fn equal_weights_are_plain_round_robin() {
        assert_eq!(
            smooth_weighted(&[(1, 5), (2, 5), (3, 5)], 1024),
            vec![1, 2, 3]
        );
    }

    #[test]
    fn weights_give_exact_shares_spread_out() {
        // nginx's example: a=5, b=1, c=1 gives a a b a c a a.
        assert_eq!(
            smooth_weighted(&[(1, 5), (2, 1), (3, 1)], 1024),
            vec![1, 1, 2, 1, 3, 1, 1]
        );
        let s = smooth_weighted(&[(1, 3), (2, 1)], 1024);
        assert_eq!((count(&s, 1), count(&s, 2)), (3, 1));
    }

    #[test]
    fn zero_weight_is_left_out_and_empty_is_empty() {
        assert_eq!(smooth_weighted(&[(1, 0), (2, 4)], 1024), vec![2]);
        assert!(smooth_weighted(&[(1, 0)], 1024).is_empty());
        assert!(smooth_weighted(&[], 1024).is_empty());
    }

    #[test]
    fn a_cycle_too_long_is_scaled_to_fit() {
        let s = smooth_weighted(&[(1, 1000), (2, 999), (3, 1)], 100);
        assert!(s.len() <= 100);
        assert!(count(&s, 3) >= 1);
        assert!(count(&s, 1) >= 45 && count(&s, 2) >= 45);
    }
}
