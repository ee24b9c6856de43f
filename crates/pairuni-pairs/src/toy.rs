//! Toy-world checks of pair quality: how often a retrieved pair's two images share at least one
//! (shape, colour) object, against random pairs of the same images. Objects are read back with the toy world's
//! exact detector, so no label files are needed.

use crate::error::{PairsError, Result};
use pairuni_data::{PairKind, PairRecord};
use pairuni_toyworld::Kind;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};

/// Shared-object rates of retrieved pairs and of random pairs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SharedObjectRates {
    /// Retrieved pairs examined.
    pub retrieved_pairs: usize,
    /// Fraction of retrieved pairs whose images share ≥ 1 (shape, colour) object.
    pub retrieved_rate: f64,
    /// Random pairs examined (the same images, understanding side shuffled).
    pub random_pairs: usize,
    /// Fraction of random pairs whose images share ≥ 1 object.
    pub random_rate: f64,
}

/// The set of (colour, shape) kinds the detector reads in an image.
pub fn kinds_in(path: &Path) -> Result<BTreeSet<Kind>> {
    let img = crate::encoder::load_rgb(path)?;
    Ok(pairuni_toyworld::read_scene(&img)
        .objects()
        .iter()
        .map(|o| o.kind())
        .collect())
}

/// Rates over the retrieved pairs of `pairs` (image paths relative to `pairs_dir`); the random baseline pairs
/// each generation image with a seeded random understanding image from the same pairs.
pub fn shared_object_rates(
    pairs: &[PairRecord],
    pairs_dir: &Path,
    seed: u64,
) -> Result<SharedObjectRates> {
    let retrieved: Vec<&PairRecord> = pairs
        .iter()
        .filter(|p| p.effective_kind() == PairKind::Retrieved)
        .collect();
    let mut cache: HashMap<PathBuf, BTreeSet<Kind>> = HashMap::new();
    let mut kinds = |rel: &str| -> Result<BTreeSet<Kind>> {
        let p = pairs_dir.join(rel);
        if let Some(k) = cache.get(&p) {
            return Ok(k.clone());
        }
        let k = kinds_in(&p)?;
        cache.insert(p, k.clone());
        Ok(k)
    };
    let mut g = vec![];
    let mut u = vec![];
    for p in &retrieved {
        g.push(kinds(&p.generate_ann.image_path)?);
        u.push(kinds(&p.understand_ann.image_path)?);
    }
    if g.is_empty() {
        return Err(PairsError::Config("no retrieved pairs to measure".into()));
    }
    let shares = |a: &BTreeSet<Kind>, b: &BTreeSet<Kind>| !a.is_disjoint(b);
    let hit = g.iter().zip(&u).filter(|(a, b)| shares(a, b)).count();
    let mut perm: Vec<usize> = (0..u.len()).collect();
    perm.shuffle(&mut ChaCha8Rng::seed_from_u64(seed));
    let rhit = g
        .iter()
        .zip(&perm)
        .filter(|(a, &j)| shares(a, &u[j]))
        .count();
    let n = g.len();
    Ok(SharedObjectRates {
        retrieved_pairs: n,
        retrieved_rate: hit as f64 / n as f64,
        random_pairs: n,
        random_rate: rhit as f64 / n as f64,
    })
}
