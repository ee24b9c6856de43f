//! The PairUG-driven batch source: which understanding side and which generation side enter each slot of a
//! rollout batch, with which pair weight — and the baselines (unpaired, random pairs, subsets) as one switch each.
//!
//! Order is a seeded permutation per epoch; the position is a small [`Cursor`] value that a checkpoint stores,
//! so a resumed run draws exactly the batches the uninterrupted run would have drawn.

use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use pairuni_data::{PairKind, PairRecord, Quadruple};

use crate::config::{PairWeighting, Pairing, Subset};
use crate::loss::pair_weight;

/// Position in the stream of batch slots: epoch number and index inside that epoch's permutation.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Cursor {
    /// Completed passes over the records.
    pub epoch: u64,
    /// Next slot within the current epoch.
    pub index: usize,
}

/// One batch slot: an understanding side, a generation side and the weight their rollouts get.
#[derive(Debug, Clone, PartialEq)]
pub struct PairItem {
    /// Understanding side (image + question → answer).
    pub und: Quadruple,
    /// Generation side (prompt → image).
    pub gen: Quadruple,
    /// Pair weight w_p applied to every rollout of both sides.
    pub weight: f32,
    /// Kind of the source pair (the understanding side's record for unpaired / random slots).
    pub kind: PairKind,
}

/// Seeded, resumable batches from PairUG records.
#[derive(Debug, Clone)]
pub struct PairLoader {
    records: Vec<PairRecord>,
    pairing: Pairing,
    weighting: PairWeighting,
    seed: u64,
    /// For `Random`: the fixed generation partner of each record, drawn once from the seed.
    partner: Vec<usize>,
    /// Current position.
    pub cursor: Cursor,
}

/// Stream ids that keep the loader's random draws independent of each other.
const STREAM_ORDER: u64 = 1;
const STREAM_GEN_ORDER: u64 = 2;
const STREAM_PARTNER: u64 = 3;

fn permutation(n: usize, seed: u64, stream: u64, epoch: u64) -> Vec<usize> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0x5041_4952_4c4f_4144);
    rng.set_stream(stream.wrapping_mul(1 << 32) ^ epoch);
    let mut idx: Vec<usize> = (0..n).collect();
    idx.shuffle(&mut rng);
    idx
}

impl PairLoader {
    /// A loader over the records kept by `subset`; `None` when no record is left.
    pub fn new(
        records: Vec<PairRecord>,
        subset: Subset,
        pairing: Pairing,
        weighting: PairWeighting,
        seed: u64,
    ) -> Option<Self> {
        let records: Vec<PairRecord> = records
            .into_iter()
            .filter(|r| match subset {
                Subset::All => true,
                Subset::Aligned => r.effective_kind() == PairKind::Aligned,
                Subset::Retrieved => r.effective_kind() == PairKind::Retrieved,
            })
            .collect();
        if records.is_empty() {
            return None;
        }
        let partner = permutation(records.len(), seed, STREAM_PARTNER, 0);
        Some(Self {
            records,
            pairing,
            weighting,
            seed,
            partner,
            cursor: Cursor::default(),
        })
    }

    /// Number of records used (after the subset filter).
    pub fn len(&self) -> usize {
        self.records.len()
    }

    /// Never true (construction refuses an empty set); present for clippy's `len` convention.
    pub fn is_empty(&self) -> bool {
        self.records.is_empty()
    }

    /// The next `n` slots, advancing the cursor (wrapping into new epochs with fresh permutations).
    pub fn next_batch(&mut self, n: usize) -> Vec<PairItem> {
        let mut out = Vec::with_capacity(n);
        // Permutations are recomputed per call: cheap for PairUG sizes, and keeps the loader a pure
        // function of (seed, cursor).
        let mut order = permutation(self.len(), self.seed, STREAM_ORDER, self.cursor.epoch);
        let mut gen_order = permutation(self.len(), self.seed, STREAM_GEN_ORDER, self.cursor.epoch);
        while out.len() < n {
            if self.cursor.index >= self.len() {
                self.cursor.epoch += 1;
                self.cursor.index = 0;
                order = permutation(self.len(), self.seed, STREAM_ORDER, self.cursor.epoch);
                gen_order = permutation(self.len(), self.seed, STREAM_GEN_ORDER, self.cursor.epoch);
            }
            let i = order[self.cursor.index];
            let u = &self.records[i];
            let item = match self.pairing {
                Pairing::Paired => PairItem {
                    und: u.understand_ann.clone(),
                    gen: u.generate_ann.clone(),
                    weight: pair_weight(u.effective_kind(), u.similarity, self.weighting),
                    kind: u.effective_kind(),
                },
                Pairing::Unpaired => PairItem {
                    und: u.understand_ann.clone(),
                    gen: self.records[gen_order[self.cursor.index]]
                        .generate_ann
                        .clone(),
                    weight: 1.0,
                    kind: u.effective_kind(),
                },
                Pairing::Random => PairItem {
                    und: u.understand_ann.clone(),
                    gen: self.records[self.partner[i]].generate_ann.clone(),
                    weight: 1.0,
                    kind: u.effective_kind(),
                },
            };
            out.push(item);
            self.cursor.index += 1;
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn quad(tag: &str, i: usize) -> Quadruple {
        Quadruple {
            image_path: format!("images/{tag}{i}.png"),
            prompt: format!("{tag} prompt {i}"),
            question: format!("{tag} question {i}"),
            answer: "A".into(),
            tag: tag.into(),
            id: Some(format!("{tag}{i}")),
        }
    }

    fn records(n: usize) -> Vec<PairRecord> {
        (0..n)
            .map(|i| PairRecord {
                similarity: if i % 2 == 0 { 1.0 } else { 0.64 },
                generate_ann: quad("g", i),
                understand_ann: quad("u", i),
                kind: Some(if i % 2 == 0 {
                    PairKind::Aligned
                } else {
                    PairKind::Retrieved
                }),
                source: None,
            })
            .collect()
    }

    fn ids(items: &[PairItem]) -> Vec<(String, String)> {
        items
            .iter()
            .map(|p| (p.und.id.clone().unwrap(), p.gen.id.clone().unwrap()))
            .collect()
    }

    #[test]
    fn paired_epoch_covers_every_record_once_with_weights() {
        let mut l = PairLoader::new(
            records(6),
            Subset::All,
            Pairing::Paired,
            PairWeighting::Sqrt,
            7,
        )
        .unwrap();
        let batch = l.next_batch(6);
        let mut seen: Vec<String> = batch.iter().map(|p| p.und.id.clone().unwrap()).collect();
        seen.sort();
        assert_eq!(seen, ["u0", "u1", "u2", "u3", "u4", "u5"]);
        for p in &batch {
            assert_eq!(
                p.und.id.as_deref().unwrap()[1..],
                p.gen.id.as_deref().unwrap()[1..]
            );
            let want = if p.kind == PairKind::Aligned {
                1.0
            } else {
                0.8
            };
            assert!((p.weight - want).abs() < 1e-6);
        }
        assert_eq!(l.cursor, Cursor { epoch: 0, index: 6 });
        let next = l.next_batch(2);
        assert_eq!(l.cursor, Cursor { epoch: 1, index: 2 });
        assert_eq!(next.len(), 2);
    }

    #[test]
    fn resuming_from_a_cursor_replays_the_same_batches() {
        let mut a = PairLoader::new(
            records(5),
            Subset::All,
            Pairing::Unpaired,
            PairWeighting::Sqrt,
            3,
        )
        .unwrap();
        a.next_batch(3);
        let saved = a.cursor;
        let rest_a: Vec<_> = (0..4).map(|_| ids(&a.next_batch(3))).collect();
        let mut b = PairLoader::new(
            records(5),
            Subset::All,
            Pairing::Unpaired,
            PairWeighting::Sqrt,
            3,
        )
        .unwrap();
        b.cursor = saved;
        let rest_b: Vec<_> = (0..4).map(|_| ids(&b.next_batch(3))).collect();
        assert_eq!(rest_a, rest_b);
    }

    #[test]
    fn seeds_and_epochs_change_the_order() {
        let mut a = PairLoader::new(
            records(20),
            Subset::All,
            Pairing::Paired,
            PairWeighting::Sqrt,
            1,
        )
        .unwrap();
        let mut b = PairLoader::new(
            records(20),
            Subset::All,
            Pairing::Paired,
            PairWeighting::Sqrt,
            2,
        )
        .unwrap();
        let e0 = ids(&a.next_batch(20));
        assert_ne!(e0, ids(&b.next_batch(20)));
        assert_ne!(e0, ids(&a.next_batch(20)));
    }

    #[test]
    fn baselines_are_one_switch_each() {
        let unpaired = PairLoader::new(
            records(20),
            Subset::All,
            Pairing::Unpaired,
            PairWeighting::Sqrt,
            1,
        )
        .unwrap()
        .next_batch(20);
        assert!(unpaired.iter().all(|p| p.weight == 1.0));
        assert!(unpaired
            .iter()
            .any(|p| p.und.id.as_deref().unwrap()[1..] != p.gen.id.as_deref().unwrap()[1..]));
        // Random pairs are a fixed matching: every epoch pairs the same sides.
        let mut r = PairLoader::new(
            records(8),
            Subset::All,
            Pairing::Random,
            PairWeighting::Sqrt,
            1,
        )
        .unwrap();
        let mut e0 = ids(&r.next_batch(8));
        let mut e1 = ids(&r.next_batch(8));
        e0.sort();
        e1.sort();
        assert_eq!(e0, e1);
        let aligned = PairLoader::new(
            records(6),
            Subset::Aligned,
            Pairing::Paired,
            PairWeighting::Sqrt,
            1,
        )
        .unwrap();
        assert_eq!(aligned.len(), 3);
        let retrieved = PairLoader::new(
            records(6),
            Subset::Retrieved,
            Pairing::Paired,
            PairWeighting::Linear,
            1,
        )
        .unwrap();
        assert_eq!(retrieved.len(), 3);
        let mut retrieved = retrieved;
        assert!(retrieved
            .next_batch(3)
            .iter()
            .all(|p| (p.weight - 0.64).abs() < 1e-6));
        let none = PairLoader::new(
            records(6),
            Subset::Retrieved,
            Pairing::Paired,
            PairWeighting::None,
            1,
        )
        .unwrap()
        .next_batch(3);
        assert!(none.iter().all(|p| p.weight == 1.0));
        assert!(
            PairLoader::new(vec![], Subset::All, Pairing::Paired, PairWeighting::Sqrt, 1).is_none()
        );
    }
}
