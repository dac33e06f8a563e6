//! Balancing policies: which worker gets the next connection.
//!
//! [`Policy::order`] fills the caller's reusable `Vec` with candidate indexes in the order to
//! try them; the caller sends to the first one that takes the connection and reports it with
//! [`Policy::chose`]. No allocation beyond `out`.
//!
//! * **round-robin**: candidates in `(slot, key)` order, starting just after the last chosen
//!   worker. A worker that is missing from the candidates (full, not ready) is skipped
//!   without piling its turn onto its neighbour: the rotation continues from the last choice.
//!   When the candidates' weights differ (per generation: the `weight` key, or a canary's),
//!   **smooth weighted round robin** (nginx's): every connection each candidate's
//!   `current_weight` grows by its weight, the largest goes first and loses the sum of the
//!   weights. Shares follow the weights exactly and a heavy worker's turns are spread out
//!   (5:1:1 gives a a b a c a a). A missing candidate neither gains nor loses.
//! * **ip-hash**: rendezvous (highest random weight) hashing of the client address with the
//!   slot. The same address goes to the same slot while that slot is a candidate; when a
//!   slot disappears only its addresses move (spread over the others). Without a peer
//!   address (unix sockets): round-robin. The hash is a fixed FNV-1a + splitmix64 mix, so
//!   the mapping is the same on every build and every Rust version.
//! * **least-connections**: the fewest open connections (`open`, from close reports; a worker
//!   without reports is measured by `queued`), then the fewest queued, then round-robin.
//! * **shared**: workers accept themselves; `order` returns nothing.

use crate::config::DispatchPolicy;
use std::cmp::Ordering;
use std::collections::{HashMap, HashSet};
use std::net::IpAddr;

/// A worker that could take a connection now: ready, and with room in its channel window.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Candidate {
    /// The worker's slot (`SOCKVISOR_WORKER_ID`): stable across restarts, the ip-hash key.
    pub slot: usize,
    /// A unique key of this worker incarnation (e.g. its pid), for round-robin position.
    pub key: u64,
    /// Connections waiting in its channel.
    pub queued: usize,
    /// Connections it holds open, if it sends close reports; `None` if it never did.
    pub open: Option<u64>,
    /// Its weight in round-robin (>= 1; equal weights are plain round-robin).
    pub weight: u32,
}

impl Candidate {
    fn position(&self) -> (usize, u64) {
        (self.slot, self.key)
    }

    /// The least-connections load: open connections, or the queue when it never reported.
    fn load(&self) -> u64 {
        self.open.unwrap_or(self.queued as u64)
    }
}

/// Per-listener policy state.
#[derive(Debug)]
pub struct Policy {
    kind: DispatchPolicy,
    /// Round-robin position: the `(slot, key)` of the last chosen worker.
    last: Option<(usize, u64)>,
    /// Smooth weighted round robin: each worker's `current_weight`, by key.
    current: HashMap<u64, i64>,
    /// The sum of the weights of the last weighted `order`: what the chosen one loses.
    weight_total: i64,
}

impl Policy {
    pub fn new(kind: DispatchPolicy) -> Policy {
        Policy {
            kind,
            last: None,
            current: HashMap::new(),
            weight_total: 0,
        }
    }

    pub fn kind(&self) -> DispatchPolicy {
        self.kind
    }

    /// Candidates in the order to try them for this connection. The first that accepts the
    /// connection gets it; the caller then calls [`Policy::chose`].
    pub fn order(&mut self, candidates: &[Candidate], peer: Option<IpAddr>, out: &mut Vec<usize>) {
        out.clear();
        match self.kind {
            // Not channel policies: nothing to order (never a Handoff's policy).
            DispatchPolicy::Shared | DispatchPolicy::Auto | DispatchPolicy::Reuseport => {}
            DispatchPolicy::RoundRobin if weighted(candidates) => {
                self.smooth_weighted(candidates, out)
            }
            DispatchPolicy::RoundRobin => self.round_robin(candidates, out),
            DispatchPolicy::IpHash => match peer {
                Some(ip) => {
                    let h = hash_ip(ip);
                    out.extend(0..candidates.len());
                    out.sort_unstable_by(|&a, &b| {
                        let (ca, cb) = (&candidates[a], &candidates[b]);
                        score(h, cb.slot)
                            .cmp(&score(h, ca.slot))
                            .then(ca.position().cmp(&cb.position()))
                    });
                }
                None => self.round_robin(candidates, out),
            },
            DispatchPolicy::LeastConnections => {
                self.round_robin(candidates, out);
                // Stable insertion sort (no allocation, n is the worker count): equal loads
                // keep their round-robin order.
                insertion_sort_by(out, |&a, &b| {
                    let (ca, cb) = (&candidates[a], &candidates[b]);
                    ca.load().cmp(&cb.load()).then(ca.queued.cmp(&cb.queued))
                });
            }
        }
    }

    /// The connection went to `candidates[index]`.
    pub fn chose(&mut self, candidate: &Candidate) {
        self.last = Some(candidate.position());
        if self.weight_total > 0 {
            if let Some(c) = self.current.get_mut(&candidate.key) {
                *c -= self.weight_total;
            }
            self.weight_total = 0;
        }
    }

    /// nginx's smooth weighted round robin: every candidate's `current_weight` grows by its
    /// weight; the order is by `current_weight`, largest first (ties by position), and
    /// [`Policy::chose`] takes the sum of the weights off the one that got the connection.
    fn smooth_weighted(&mut self, candidates: &[Candidate], out: &mut Vec<usize>) {
        // Forget workers that are gone (a worker missing only for now keeps its value).
        if self.current.len() > 4 * candidates.len() + 16 {
            let live: HashSet<u64> = candidates.iter().map(|c| c.key).collect();
            self.current.retain(|k, _| live.contains(k));
        }
        let mut total = 0i64;
        for c in candidates {
            let w = i64::from(c.weight.max(1));
            *self.current.entry(c.key).or_insert(0) += w;
            total += w;
        }
        self.weight_total = total;
        out.extend(0..candidates.len());
        let current = &self.current;
        out.sort_unstable_by(|&a, &b| {
            let (ca, cb) = (&candidates[a], &candidates[b]);
            current[&cb.key]
                .cmp(&current[&ca.key])
                .then(ca.position().cmp(&cb.position()))
        });
    }

    /// All candidates by `(slot, key)`, rotated to start just after the last choice.
    fn round_robin(&self, candidates: &[Candidate], out: &mut Vec<usize>) {
        out.extend(0..candidates.len());
        out.sort_unstable_by_key(|&i| candidates[i].position());
        if let Some((slot, key)) = self.last {
            // Just after the last chosen worker if it is still a candidate; otherwise after
            // its slot (a restarted slot's new incarnation does not get a second turn).
            let start = match out.iter().position(|&i| candidates[i].key == key) {
                Some(p) => p + 1,
                None => out.partition_point(|&i| candidates[i].slot <= slot),
            };
            let len = out.len().max(1);
            out.rotate_left(start % len);
        }
    }
}

/// Whether the candidates' weights differ (equal weights: plain round-robin, exactly as
/// before weights existed).
fn weighted(candidates: &[Candidate]) -> bool {
    candidates
        .windows(2)
        .any(|w| w[0].weight.max(1) != w[1].weight.max(1))
}

/// The canary bucket of a client address, `0..1000`: the same address always falls in the
/// same bucket, so a canary by client address (`canary_by = "client"`) keeps a client on the
/// same generation for the whole rollout while the share stays the same.
pub fn client_bucket(ip: IpAddr) -> u32 {
    (mix64(hash_ip(ip) ^ 0x6361_6e61_7279) % 1000) as u32
}

fn insertion_sort_by<T: Copy>(v: &mut [T], mut cmp: impl FnMut(&T, &T) -> Ordering) {
    for i in 1..v.len() {
        let mut j = i;
        while j > 0 && cmp(&v[j - 1], &v[j]) == Ordering::Greater {
            v.swap(j - 1, j);
            j -= 1;
        }
    }
}

/// splitmix64 finalizer: a fixed, well-mixed 64-bit permutation.
fn mix64(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// FNV-1a over the address bytes. IPv4-mapped IPv6 addresses hash as the IPv4 address, so a
/// dual-stack listener maps a client the same way as a v4 one.
fn hash_ip(ip: IpAddr) -> u64 {
    const OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
    const PRIME: u64 = 0x0000_0100_0000_01b3;
    let fnv = |tag: u8, bytes: &[u8]| {
        let mut h = OFFSET;
        for &b in std::iter::once(&tag).chain(bytes) {
            h ^= u64::from(b);
            h = h.wrapping_mul(PRIME);
        }
        h
    };
    match ip.to_canonical() {
        IpAddr::V4(v4) => fnv(4, &v4.octets()),
        IpAddr::V6(v6) => fnv(6, &v6.octets()),
    }
}

/// Rendezvous weight of `slot` for an address hash.
fn score(ip_hash: u64, slot: usize) -> u64 {
    mix64(ip_hash ^ mix64(slot as u64))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{Ipv4Addr, Ipv6Addr};

    fn cands(n: usize) -> Vec<Candidate> {
        (0..n)
            .map(|i| Candidate {
                slot: i,
                key: 1000 + i as u64,
                queued: 0,
                open: None,
                weight: 1,
            })
            .collect()
    }

    /// Dispatch one connection the way the supervisor does: the first candidate takes it.
    fn dispatch(
        p: &mut Policy,
        c: &[Candidate],
        peer: Option<IpAddr>,
        out: &mut Vec<usize>,
    ) -> usize {
        p.order(c, peer, out);
        assert_eq!(out.len(), c.len());
        let i = out[0];
        p.chose(&c[i]);
        c[i].slot
    }

    #[test]
    fn round_robin_is_exactly_even() {
        let c = cands(4);
        let mut p = Policy::new(DispatchPolicy::RoundRobin);
        let mut out = Vec::new();
        let mut count = [0u32; 4];
        for _ in 0..100_000 {
            count[dispatch(&mut p, &c, None, &mut out)] += 1;
        }
        assert_eq!(count, [25_000; 4]);
    }

    #[test]
    fn round_robin_order_lists_everyone_after_the_last_choice() {
        let c = cands(4);
        let mut p = Policy::new(DispatchPolicy::RoundRobin);
        let mut out = Vec::new();
        p.order(&c, None, &mut out);
        assert_eq!(out, [0, 1, 2, 3]);
        p.chose(&c[1]);
        p.order(&c, None, &mut out);
        assert_eq!(out, [2, 3, 0, 1]);
        // candidates given in any order are still tried by slot
        let rev: Vec<_> = c.iter().rev().copied().collect();
        p.order(&rev, None, &mut out);
        assert_eq!(
            out.iter().map(|&i| rev[i].slot).collect::<Vec<_>>(),
            [2, 3, 0, 1]
        );
    }

    #[test]
    fn round_robin_skips_a_full_worker_without_piling_on_the_next() {
        let all = cands(4);
        let without_1: Vec<_> = all.iter().filter(|c| c.slot != 1).copied().collect();
        let mut p = Policy::new(DispatchPolicy::RoundRobin);
        let mut out = Vec::new();
        let mut count = [0u32; 4];
        // worker 1 is full for 30_000 connections, then has room again
        for n in 0..60_000 {
            let c = if n < 30_000 { &without_1 } else { &all };
            count[dispatch(&mut p, c, None, &mut out)] += 1;
        }
        assert_eq!(count, [17_500, 7_500, 17_500, 17_500]);
        // while it was missing, 0, 2 and 3 shared evenly: no neighbour got its turns
        let mut p = Policy::new(DispatchPolicy::RoundRobin);
        let mut count = [0u32; 4];
        for _ in 0..30_000 {
            count[dispatch(&mut p, &without_1, None, &mut out)] += 1;
        }
        assert_eq!(count, [10_000, 0, 10_000, 10_000]);
    }

    #[test]
    fn round_robin_survives_a_restarted_worker() {
        let mut c = cands(3);
        let mut p = Policy::new(DispatchPolicy::RoundRobin);
        let mut out = Vec::new();
        assert_eq!(dispatch(&mut p, &c, None, &mut out), 0);
        assert_eq!(dispatch(&mut p, &c, None, &mut out), 1);
        c[1].key = 9999; // slot 1 restarted with a new pid
        assert_eq!(dispatch(&mut p, &c, None, &mut out), 2);
        assert_eq!(dispatch(&mut p, &c, None, &mut out), 0);
        assert_eq!(dispatch(&mut p, &c, None, &mut out), 1);
        // and an empty candidate list is fine
        p.order(&[], None, &mut out);
        assert!(out.is_empty());
    }

    #[test]
    fn round_robin_visits_two_incarnations_of_one_slot() {
        // during a reload the old and the new worker of a slot are both candidates
        let mut c = cands(2);
        c.push(Candidate {
            slot: 0,
            key: 5,
            queued: 0,
            open: None,
            weight: 1,
        });
        let mut p = Policy::new(DispatchPolicy::RoundRobin);
        let mut out = Vec::new();
        let mut count = std::collections::HashMap::new();
        for _ in 0..300 {
            p.order(&c, None, &mut out);
            p.chose(&c[out[0]]);
            *count.entry(c[out[0]].key).or_insert(0) += 1;
        }
        assert_eq!(count.values().copied().collect::<Vec<_>>(), [100, 100, 100]);
    }

    fn ips(n: u32) -> impl Iterator<Item = IpAddr> {
        (0..n).map(|i| {
            IpAddr::V4(Ipv4Addr::from(
                0x0a00_0000u32.wrapping_add(i.wrapping_mul(2_654_435_761)),
            ))
        })
    }

    #[test]
    fn ip_hash_is_sticky_and_spread() {
        let c = cands(4);
        let mut p = Policy::new(DispatchPolicy::IpHash);
        let mut out = Vec::new();
        let mut count = [0u32; 4];
        for ip in ips(20_000) {
            let s = dispatch(&mut p, &c, Some(ip), &mut out);
            count[s] += 1;
            // sticky, whatever happened in between
            assert_eq!(dispatch(&mut p, &c, Some(ip), &mut out), s);
        }
        let (max, min) = (*count.iter().max().unwrap(), *count.iter().min().unwrap());
        assert!(f64::from(max) / f64::from(min) < 1.1, "{count:?}");
        // v4-mapped v6 is the same client
        let v4 = Ipv4Addr::new(192, 0, 2, 7);
        assert_eq!(
            dispatch(&mut p, &c, Some(IpAddr::V4(v4)), &mut out),
            dispatch(&mut p, &c, Some(IpAddr::V6(v4.to_ipv6_mapped())), &mut out)
        );
        // the order is by slot, so a new incarnation of a slot keeps its addresses
        let mut c2 = c.clone();
        for x in &mut c2 {
            x.key += 77;
        }
        for ip in ips(1000) {
            assert_eq!(
                dispatch(&mut p, &c, Some(ip), &mut out),
                dispatch(&mut p, &c2, Some(ip), &mut out)
            );
        }
    }

    #[test]
    fn ip_hash_mapping_is_stable_across_builds() {
        // Pinned values: a change here remaps every client of every deployment.
        let c = cands(8);
        let mut p = Policy::new(DispatchPolicy::IpHash);
        let mut out = Vec::new();
        let got: Vec<usize> = [
            IpAddr::V4(Ipv4Addr::new(127, 0, 0, 1)),
            IpAddr::V4(Ipv4Addr::new(10, 1, 2, 3)),
            IpAddr::V6(Ipv6Addr::LOCALHOST),
            IpAddr::V6("2001:db8::1".parse().unwrap()),
        ]
        .into_iter()
        .map(|ip| dispatch(&mut p, &c, Some(ip), &mut out))
        .collect();
        assert_eq!(got, PINNED);
    }
    const PINNED: [usize; 4] = [0, 5, 3, 0];

    #[test]
    fn ip_hash_moves_only_the_removed_slots_addresses() {
        let n = 5;
        let c = cands(n);
        let fewer: Vec<_> = c.iter().filter(|x| x.slot != 2).copied().collect();
        let mut p = Policy::new(DispatchPolicy::IpHash);
        let mut out = Vec::new();
        let total = 50_000;
        let mut moved = 0;
        for ip in ips(total) {
            let before = dispatch(&mut p, &c, Some(ip), &mut out);
            let after = dispatch(&mut p, &fewer, Some(ip), &mut out);
            if before != after {
                assert_eq!(before, 2, "{ip} moved from a slot that stayed");
                moved += 1;
            } else {
                assert_ne!(before, 2);
            }
        }
        let share = moved as f64 / total as f64;
        assert!((share - 1.0 / n as f64).abs() < 0.02, "moved {share}");
    }

    #[test]
    fn ip_hash_without_peer_is_round_robin() {
        let c = cands(3);
        let mut p = Policy::new(DispatchPolicy::IpHash);
        let mut out = Vec::new();
        let got: Vec<_> = (0..6)
            .map(|_| dispatch(&mut p, &c, None, &mut out))
            .collect();
        assert_eq!(got, [0, 1, 2, 0, 1, 2]);
    }

    #[test]
    fn least_connections_order() {
        let mut c = cands(4);
        c[0].open = Some(5);
        c[1].open = Some(2);
        c[2].open = Some(2);
        c[2].queued = 1;
        c[3].open = None;
        c[3].queued = 3; // no reports: measured by its queue
        let mut p = Policy::new(DispatchPolicy::LeastConnections);
        let mut out = Vec::new();
        p.order(&c, None, &mut out);
        assert_eq!(out, [1, 2, 3, 0]);
        // equal loads rotate round-robin
        let c = cands(3);
        let got: Vec<_> = (0..6)
            .map(|_| dispatch(&mut p, &c, None, &mut out))
            .collect();
        assert_eq!(got, [0, 1, 2, 0, 1, 2]);
    }

    #[test]
    fn least_connections_balances_a_simulation() {
        // Every worker holds connections; the caller updates `open` as it dispatches.
        let mut c = cands(4);
        for x in &mut c {
            x.open = Some(0);
        }
        c[2].open = Some(10);
        let mut p = Policy::new(DispatchPolicy::LeastConnections);
        let mut out = Vec::new();
        for _ in 0..30 {
            p.order(&c, None, &mut out);
            let i = out[0];
            p.chose(&c[i]);
            *c[i].open.as_mut().unwrap() += 1;
        }
        let open: Vec<_> = c.iter().map(|x| x.open.unwrap()).collect();
        assert_eq!(open, [10, 10, 10, 10]);
    }

    #[test]
    fn weighted_round_robin_gives_exact_shares_spread_out() {
        let mut c = cands(2);
        c[0].weight = 3;
        let mut p = Policy::new(DispatchPolicy::RoundRobin);
        let mut out = Vec::new();
        let mut count = [0u32; 2];
        let mut first = Vec::new();
        for n in 0..4_000 {
            let s = dispatch(&mut p, &c, None, &mut out);
            count[s] += 1;
            if n < 8 {
                first.push(s);
            }
        }
        assert_eq!(count, [3_000, 1_000]);
        assert_eq!(first, [0, 0, 1, 0, 0, 0, 1, 0]);
        // nginx's example: 5:1:1 gives a a b a c a a
        let mut c = cands(3);
        c[0].weight = 5;
        let mut p = Policy::new(DispatchPolicy::RoundRobin);
        let got: Vec<_> = (0..7)
            .map(|_| dispatch(&mut p, &c, None, &mut out))
            .collect();
        assert_eq!(got, [0, 0, 1, 0, 2, 0, 0]);
    }

    #[test]
    fn weighted_round_robin_skips_a_full_worker_without_piling_on() {
        // weights 2:1:1; worker 0 is full for a while: 1 and 2 share evenly meanwhile, and
        // 0 does not catch up afterwards with a burst
        let mut all = cands(3);
        all[0].weight = 2;
        let without_0: Vec<_> = all.iter().filter(|c| c.slot != 0).copied().collect();
        let mut p = Policy::new(DispatchPolicy::RoundRobin);
        let mut out = Vec::new();
        let mut count = [0u32; 3];
        for _ in 0..1_000 {
            count[dispatch(&mut p, &without_0, None, &mut out)] += 1;
        }
        assert_eq!(count, [0, 500, 500]);
        let mut count = [0u32; 3];
        for _ in 0..4_000 {
            count[dispatch(&mut p, &all, None, &mut out)] += 1;
        }
        assert!(count[0].abs_diff(2_000) <= 2, "{count:?}");
    }

    #[test]
    fn client_buckets_are_spread_and_stable() {
        let mut below = 0;
        for ip in ips(20_000) {
            let b = client_bucket(ip);
            assert!(b < 1000);
            assert_eq!(b, client_bucket(ip));
            below += u32::from(b < 100);
        }
        assert!(below.abs_diff(2_000) < 200, "{below}");
    }

    #[test]
    fn shared_orders_nothing() {
        let c = cands(3);
        let mut p = Policy::new(DispatchPolicy::Shared);
        let mut out = vec![7];
        p.order(&c, Some(IpAddr::V4(Ipv4Addr::LOCALHOST)), &mut out);
        assert!(out.is_empty());
        assert_eq!(p.kind(), DispatchPolicy::Shared);
    }
}
