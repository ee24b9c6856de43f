//! Statistics of a PairUG file (ours or official): counts by kind and tag, similarity quantiles and
//! histogram, plus — for files the builder wrote — the rejected samples; and the histogram PNG.

use crate::error::{PairsError, Result};
use crate::teacher::{RejectReason, Rejection};
use pairuni_data::{PairKind, PairRecord};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::Path;

/// Similarity quantiles.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Quantiles {
    /// Smallest.
    pub min: f64,
    /// 5th percentile.
    pub p05: f64,
    /// 25th percentile.
    pub p25: f64,
    /// Median.
    pub p50: f64,
    /// 75th percentile.
    pub p75: f64,
    /// 95th percentile.
    pub p95: f64,
    /// Largest.
    pub max: f64,
    /// Mean.
    pub mean: f64,
}

/// One histogram bin: [lo, hi) (the last bin includes hi).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Bin {
    /// Lower edge.
    pub lo: f64,
    /// Upper edge.
    pub hi: f64,
    /// Pairs in the bin.
    pub count: usize,
}

/// Counts and distributions of a set of pairs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PairStats {
    /// Number of pairs.
    pub pairs: usize,
    /// Pairs by kind (`aligned`, `retrieved`; inferred for official files without a kind).
    pub by_kind: BTreeMap<String, usize>,
    /// Pairs by the generation side's tag.
    pub by_generation_tag: BTreeMap<String, usize>,
    /// Pairs by the understanding side's tag.
    pub by_understanding_tag: BTreeMap<String, usize>,
    /// Quantiles of the retrieved pairs' similarity (aligned pairs are all 1); None when there are none.
    pub retrieved_similarity: Option<Quantiles>,
    /// Histogram of every pair's similarity over [0, 1] in 20 bins (values outside are clamped).
    pub histogram: Vec<Bin>,
}

/// What the builder writes to `pairs.stats.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BuildStats {
    /// The pairs.
    pub pairs: PairStats,
    /// Samples in each input pool.
    pub input: BTreeMap<String, usize>,
    /// Samples that survived completion + verification, per pool.
    pub completed: BTreeMap<String, usize>,
    /// Dropped samples by reason.
    pub rejections_by_reason: BTreeMap<String, usize>,
    /// Every dropped sample, with the raw reply where it did not parse.
    pub rejections: Vec<Rejection>,
    /// K used by K-means and clusters that produced an aligned pair.
    pub k: usize,
    /// Completed samples left unpaired (no partner above δ), per pool.
    pub unpaired: BTreeMap<String, usize>,
    /// Teacher description and counters.
    pub teacher: serde_json::Value,
    /// Encoder id.
    pub encoder: String,
    /// Seconds per stage.
    pub seconds: BTreeMap<String, f64>,
}

const BINS: usize = 20;

fn quantile(sorted: &[f64], q: f64) -> f64 {
    let pos = q * (sorted.len() - 1) as f64;
    let (lo, hi) = (pos.floor() as usize, pos.ceil() as usize);
    sorted[lo] + (sorted[hi] - sorted[lo]) * (pos - lo as f64)
}

/// Quantiles of `values` (linear interpolation); None when empty.
pub fn quantiles(values: &[f64]) -> Option<Quantiles> {
    if values.is_empty() {
        return None;
    }
    let mut s = values.to_vec();
    s.sort_by(f64::total_cmp);
    Some(Quantiles {
        min: s[0],
        p05: quantile(&s, 0.05),
        p25: quantile(&s, 0.25),
        p50: quantile(&s, 0.5),
        p75: quantile(&s, 0.75),
        p95: quantile(&s, 0.95),
        max: s[s.len() - 1],
        mean: s.iter().sum::<f64>() / s.len() as f64,
    })
}

/// Computes [`PairStats`] for any PairUG records.
pub fn pair_stats(pairs: &[PairRecord]) -> PairStats {
    let mut by_kind = BTreeMap::new();
    let mut by_g = BTreeMap::new();
    let mut by_u = BTreeMap::new();
    let mut retrieved = vec![];
    let mut histogram: Vec<Bin> = (0..BINS)
        .map(|i| Bin {
            lo: i as f64 / BINS as f64,
            hi: (i + 1) as f64 / BINS as f64,
            count: 0,
        })
        .collect();
    for p in pairs {
        let kind = p.effective_kind();
        *by_kind.entry(kind_name(kind).to_string()).or_insert(0) += 1;
        *by_g.entry(p.generate_ann.tag.clone()).or_insert(0) += 1;
        *by_u.entry(p.understand_ann.tag.clone()).or_insert(0) += 1;
        if kind == PairKind::Retrieved {
            retrieved.push(p.similarity);
        }
        let b = ((p.similarity.clamp(0.0, 1.0) * BINS as f64) as usize).min(BINS - 1);
        histogram[b].count += 1;
    }
    PairStats {
        pairs: pairs.len(),
        by_kind,
        by_generation_tag: by_g,
        by_understanding_tag: by_u,
        retrieved_similarity: quantiles(&retrieved),
        histogram,
    }
}

/// `aligned` / `retrieved`.
pub fn kind_name(k: PairKind) -> &'static str {
    match k {
        PairKind::Aligned => "aligned",
        PairKind::Retrieved => "retrieved",
    }
}

/// Counts rejections by reason.
pub fn rejections_by_reason(rejections: &[Rejection]) -> BTreeMap<String, usize> {
    let mut m = BTreeMap::new();
    for r in rejections {
        let name = match r.reason {
            RejectReason::FailedVerification => "failed_verification",
            RejectReason::Unparseable => "unparseable",
            RejectReason::Unavailable => "unavailable",
            RejectReason::Declined => "declined",
        };
        *m.entry(name.to_string()).or_insert(0) += 1;
    }
    m
}

/// Human-readable summary (what `pairuni pairs stats` prints).
pub fn render_text(s: &PairStats) -> String {
    let mut out = format!("pairs: {}\n", s.pairs);
    for (k, v) in &s.by_kind {
        out += &format!("  {k}: {v}\n");
    }
    out += "by generation tag:\n";
    for (k, v) in &s.by_generation_tag {
        out += &format!("  {}: {v}\n", if k.is_empty() { "(none)" } else { k });
    }
    out += "by understanding tag:\n";
    for (k, v) in &s.by_understanding_tag {
        out += &format!("  {}: {v}\n", if k.is_empty() { "(none)" } else { k });
    }
    if let Some(q) = &s.retrieved_similarity {
        out += &format!(
            "retrieved similarity: min {:.3} p05 {:.3} p25 {:.3} median {:.3} p75 {:.3} p95 {:.3} max {:.3} mean {:.3}\n",
            q.min, q.p05, q.p25, q.p50, q.p75, q.p95, q.max, q.mean
        );
    }
    out += "similarity histogram:\n";
    let peak = s
        .histogram
        .iter()
        .map(|b| b.count)
        .max()
        .unwrap_or(0)
        .max(1);
    for b in s.histogram.iter().filter(|b| b.count > 0) {
        out += &format!(
            "  [{:.2}, {:.2}) {:>8} {}\n",
            b.lo,
            b.hi,
            b.count,
            "#".repeat(b.count * 40 / peak)
        );
    }
    out
}

/// Draws the similarity histogram as a PNG (bars only, no text: the numbers are in the stats JSON, and a
/// font-free drawing cannot fail on a machine without fonts).
pub fn write_histogram_png(s: &PairStats, path: &Path) -> Result<()> {
    use plotters::prelude::*;
    let perr = |e: String| PairsError::Plot {
        path: path.to_path_buf(),
        message: e,
    };
    let (w, h) = (640u32, 360u32);
    let mut buf = vec![0u8; (w * h * 3) as usize];
    {
        let root = BitMapBackend::with_buffer(&mut buf, (w, h)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| perr(e.to_string()))?;
        let peak = s
            .histogram
            .iter()
            .map(|b| b.count)
            .max()
            .unwrap_or(0)
            .max(1) as f64;
        let (x0, y0, x1, y1) = (20i32, 20i32, w as i32 - 20, h as i32 - 20);
        let bw = (x1 - x0) as f64 / s.histogram.len().max(1) as f64;
        for (i, b) in s.histogram.iter().enumerate() {
            let top = y1 - ((y1 - y0) as f64 * b.count as f64 / peak) as i32;
            let left = x0 + (i as f64 * bw) as i32 + 1;
            let right = x0 + ((i + 1) as f64 * bw) as i32 - 1;
            root.draw(&Rectangle::new([(left, top), (right, y1)], BLUE.filled()))
                .map_err(|e| perr(e.to_string()))?;
        }
        // Axes, and a tick every 0.1 of similarity.
        root.draw(&PathElement::new(vec![(x0, y1), (x1, y1)], BLACK))
            .map_err(|e| perr(e.to_string()))?;
        root.draw(&PathElement::new(vec![(x0, y0), (x0, y1)], BLACK))
            .map_err(|e| perr(e.to_string()))?;
        for t in 0..=10 {
            let x = x0 + ((x1 - x0) as f64 * t as f64 / 10.0) as i32;
            root.draw(&PathElement::new(vec![(x, y1), (x, y1 + 6)], BLACK))
                .map_err(|e| perr(e.to_string()))?;
        }
        root.present().map_err(|e| perr(e.to_string()))?;
    }
    let img = image::RgbImage::from_raw(w, h, buf).ok_or_else(|| perr("buffer size".into()))?;
    let mut png = std::io::Cursor::new(Vec::new());
    img.write_to(&mut png, image::ImageFormat::Png)
        .map_err(|e| perr(e.to_string()))?;
    pairuni_data::atomic::write_atomic_bytes(path, png.get_ref())?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use pairuni_data::Quadruple;

    fn quad(img: &str, tag: &str) -> Quadruple {
        Quadruple {
            image_path: img.into(),
            prompt: "p".into(),
            question: "q".into(),
            answer: "A".into(),
            tag: tag.into(),
            id: None,
        }
    }

    #[test]
    fn official_records_without_kind_are_classified() {
        let pairs = vec![
            PairRecord {
                similarity: 1.0,
                generate_ann: quad("a.png", "t1"),
                understand_ann: quad("a.png", "u"),
                kind: None,
                source: None,
            },
            PairRecord {
                similarity: 0.7,
                generate_ann: quad("b.png", "t1"),
                understand_ann: quad("c.png", "u"),
                kind: None,
                source: None,
            },
            PairRecord {
                similarity: 0.9,
                generate_ann: quad("d.png", "t2"),
                understand_ann: quad("e.png", "v"),
                kind: None,
                source: None,
            },
        ];
        let s = pair_stats(&pairs);
        assert_eq!(s.by_kind["aligned"], 1);
        assert_eq!(s.by_kind["retrieved"], 2);
        assert_eq!(s.by_generation_tag["t1"], 2);
        let q = s.retrieved_similarity.unwrap();
        assert_eq!((q.min, q.max, q.p50), (0.7, 0.9, 0.8));
        let counts: Vec<usize> = s.histogram.iter().map(|b| b.count).collect();
        assert_eq!((counts[14], counts[18], counts[19]), (1, 1, 1));
        assert_eq!(counts.iter().sum::<usize>(), 3);
    }

    #[test]
    fn histogram_png_is_written() {
        let dir = tempfile::tempdir().unwrap();
        let s = pair_stats(&[]);
        let p = dir.path().join("h.png");
        write_histogram_png(&s, &p).unwrap();
        let img = image::open(&p).unwrap();
        assert_eq!((img.width(), img.height()), (640, 360));
    }
}
