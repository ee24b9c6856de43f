//! The pair builder (METHOD.md §2): complete → features → K-means medoids (aligned) → greedy retrieval
//! (retrieved) → PairUG JSONL + stats + histogram.

use crate::ann::{ApproxIndex, ApproxParams};
use crate::config::PairsConfig;
use crate::encoder::{encode_pool_cached, ImageEncoder};
use crate::error::{PairsError, Result};
use crate::kmeans::{kmeans, KMeansParams};
use crate::retrieval::{exact_candidates, greedy_match, MatchParams};
use crate::stats::{pair_stats, rejections_by_reason, write_histogram_png, BuildStats};
use crate::teacher::{complete_all, Completion, McQuestion, Rejection, Sample, Teacher};
use indicatif::{ProgressBar, ProgressStyle};
use pairuni_data::{GenerationSample, PairKind, PairRecord, Quadruple, UnderstandingSample};
use std::collections::BTreeMap;
use std::path::{Component, Path, PathBuf};
use std::time::Instant;

/// Where the builder reads and writes.
#[derive(Debug, Clone)]
pub struct BuildPaths {
    /// Understanding pool JSONL.
    pub understanding: PathBuf,
    /// Generation pool JSONL.
    pub generation: PathBuf,
    /// Output PairUG JSONL; stats go to `<stem>.stats.json`, the histogram to `<stem>.similarity.png`.
    pub out: PathBuf,
}

impl BuildPaths {
    /// `<out folder>/<out stem>.stats.json`.
    pub fn stats_path(&self) -> PathBuf {
        sibling(&self.out, "stats.json")
    }

    /// `<out folder>/<out stem>.similarity.png`.
    pub fn histogram_path(&self) -> PathBuf {
        sibling(&self.out, "similarity.png")
    }

    /// Resolves a config path (cache, feature folder) against the output file's folder.
    pub fn beside_out(&self, p: &Path) -> PathBuf {
        if p.is_absolute() {
            p.to_path_buf()
        } else {
            out_dir(&self.out).join(p)
        }
    }
}

fn out_dir(out: &Path) -> PathBuf {
    match out.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

fn sibling(out: &Path, ext: &str) -> PathBuf {
    let stem = out.file_stem().and_then(|s| s.to_str()).unwrap_or("pairs");
    out_dir(out).join(format!("{stem}.{ext}"))
}

/// The builder's result (also written to disk by [`build_and_write`]).
#[derive(Debug, Clone)]
pub struct BuildOutput {
    /// The pairs, aligned first (cluster order), then retrieved (greedy order).
    pub pairs: Vec<PairRecord>,
    /// The stats written to `pairs.stats.json`.
    pub stats: BuildStats,
}

fn bar(len: usize, what: &str, show: bool) -> ProgressBar {
    if !show {
        return ProgressBar::hidden();
    }
    let pb = ProgressBar::new(len as u64);
    pb.set_style(
        ProgressStyle::with_template("{msg:>12} [{bar:40}] {pos}/{len} ({eta})")
            .expect("static template")
            .progress_chars("=> "),
    );
    pb.set_message(what.to_string());
    pb
}

/// A ticking spinner for stages without a natural count (K-means, retrieval).
fn spinner(what: &str, show: bool) -> ProgressBar {
    if !show {
        return ProgressBar::hidden();
    }
    let pb = ProgressBar::new_spinner();
    pb.set_message(what.to_string());
    pb.enable_steady_tick(std::time::Duration::from_millis(200));
    pb
}

/// `path` relative to `base` (both made absolute first), for image paths in the output file.
pub fn relative_to(path: &Path, base: &Path) -> Result<PathBuf> {
    let abs = |p: &Path| std::path::absolute(p).map_err(|e| PairsError::io(p, e));
    let norm = |p: PathBuf| -> PathBuf {
        let mut out = PathBuf::new();
        for c in p.components() {
            match c {
                Component::CurDir => {}
                Component::ParentDir => {
                    out.pop();
                }
                other => out.push(other),
            }
        }
        out
    };
    let (p, b) = (norm(abs(path)?), norm(abs(base)?));
    let pc: Vec<_> = p.components().collect();
    let bc: Vec<_> = b.components().collect();
    let common = pc.iter().zip(&bc).take_while(|(a, b)| a == b).count();
    let mut rel = PathBuf::new();
    for _ in common..bc.len() {
        rel.push("..");
    }
    for c in &pc[common..] {
        rel.push(c);
    }
    Ok(rel)
}

fn rel_string(image: &Path, out: &Path) -> Result<String> {
    Ok(relative_to(image, &out_dir(out))?
        .to_string_lossy()
        .replace('\\', "/"))
}

/// An understanding sample completed with its caption.
fn und_quad(s: &UnderstandingSample, caption: &str, image: String) -> Quadruple {
    Quadruple {
        image_path: image,
        prompt: caption.to_string(),
        question: s.question.clone(),
        answer: s.answer.clone(),
        tag: s.tag.clone(),
        id: Some(s.id.clone()),
    }
}

/// A generation sample completed with its question.
fn gen_quad(s: &GenerationSample, q: &McQuestion, image: String) -> Quadruple {
    Quadruple {
        image_path: image,
        prompt: s.prompt.clone(),
        question: q.inline(),
        answer: q.answer.clone(),
        tag: s.tag.clone(),
        id: Some(s.id.clone()),
    }
}

/// Runs the whole builder in memory (files are only read, plus the teacher and feature caches).
pub fn build_pairs(
    cfg: &PairsConfig,
    teacher: &dyn Teacher,
    encoder: &dyn ImageEncoder,
    paths: &BuildPaths,
    show_progress: bool,
) -> Result<BuildOutput> {
    if !(cfg.delta.is_finite()) || cfg.top_n == 0 {
        return Err(PairsError::Config(format!(
            "need a finite delta and top_n ≥ 1 (delta {}, top_n {})",
            cfg.delta, cfg.top_n
        )));
    }
    let mut seconds = BTreeMap::new();
    let und = pairuni_data::jsonl::read_understanding_pool(&paths.understanding)?;
    let gen = pairuni_data::jsonl::read_generation_pool(&paths.generation)?;
    let und_img: Vec<PathBuf> = und
        .iter()
        .map(|s| pairuni_data::image::resolve(&paths.understanding, &s.image_path))
        .collect();
    let gen_img: Vec<PathBuf> = gen
        .iter()
        .map(|s| pairuni_data::image::resolve(&paths.generation, &s.image_path))
        .collect();

    // 1. Complete + verify.
    let t0 = Instant::now();
    let mut jobs: Vec<(Sample<'_>, PathBuf)> = Vec::with_capacity(und.len() + gen.len());
    jobs.extend(
        und.iter()
            .zip(&und_img)
            .map(|(s, p)| (Sample::Understanding(s), p.clone())),
    );
    jobs.extend(
        gen.iter()
            .zip(&gen_img)
            .map(|(s, p)| (Sample::Generation(s), p.clone())),
    );
    let pb = bar(jobs.len(), "teacher", show_progress);
    let results = complete_all(
        teacher,
        &jobs,
        cfg.teacher.concurrency,
        cfg.teacher.verify_retries,
        &|| pb.inc(1),
    )?;
    pb.finish_and_clear();
    let mut rejections: Vec<Rejection> = vec![];
    let mut und_ok: Vec<(usize, String)> = vec![];
    let mut gen_ok: Vec<(usize, McQuestion)> = vec![];
    for (i, r) in results.into_iter().enumerate() {
        match r {
            Ok(Completion::Caption(c)) if i < und.len() => und_ok.push((i, c)),
            Ok(Completion::Question(q)) if i >= und.len() => gen_ok.push((i - und.len(), q)),
            Ok(other) => {
                return Err(PairsError::Config(format!(
                    "teacher returned {other:?} for the wrong pool (sample {i})"
                )));
            }
            Err(rej) => rejections.push(rej),
        }
    }
    seconds.insert("teacher".into(), t0.elapsed().as_secs_f64());
    tracing::info!(
        understanding = und_ok.len(),
        generation = gen_ok.len(),
        rejected = rejections.len(),
        "completed"
    );

    // 2. Features (whole pools, so the cache is independent of which samples the teacher rejected).
    let t0 = Instant::now();
    let cache_dir = paths.beside_out(&cfg.encoder.cache_dir);
    let pb = bar(und.len() + gen.len(), "features", show_progress);
    let fu = encode_pool_cached(
        encoder,
        &paths.understanding,
        &und_img,
        &cache_dir,
        cfg.encoder.batch_size,
        &|n| pb.inc(n as u64),
    )?;
    let fg = encode_pool_cached(
        encoder,
        &paths.generation,
        &gen_img,
        &cache_dir,
        cfg.encoder.batch_size,
        &|n| pb.inc(n as u64),
    )?;
    pb.finish_and_clear();
    let dim = encoder.dim();
    seconds.insert("features".into(), t0.elapsed().as_secs_f64());

    // 3. K-means over the union of the surviving samples: rows [understanding survivors; generation survivors].
    let t0 = Instant::now();
    let nu = und_ok.len();
    let mut union = Vec::with_capacity((nu + gen_ok.len()) * dim);
    for (i, _) in &und_ok {
        union.extend_from_slice(&fu[i * dim..(i + 1) * dim]);
    }
    for (i, _) in &gen_ok {
        union.extend_from_slice(&fg[i * dim..(i + 1) * dim]);
    }
    let n = nu + gen_ok.len();
    let k = cfg.kmeans.k_for(n);
    let spin = spinner(&format!("K-means: {n} points, K = {k}"), show_progress);
    let km = kmeans(
        &union,
        dim,
        &KMeansParams {
            k,
            batch_size: cfg.kmeans.batch_size,
            iterations: cfg.kmeans.iterations,
            init_sample: cfg.kmeans.init_sample,
            seed: cfg.seed,
        },
    );
    let source = Some(format!("pairuni-pairs {}", env!("CARGO_PKG_VERSION")));
    let mut pairs = vec![];
    let mut und_taken = vec![false; nu];
    let mut gen_taken = vec![false; gen_ok.len()];
    for m in km.medoids.iter().flatten() {
        let quad = if *m < nu {
            und_taken[*m] = true;
            let (i, cap) = &und_ok[*m];
            und_quad(&und[*i], cap, rel_string(&und_img[*i], &paths.out)?)
        } else {
            gen_taken[m - nu] = true;
            let (i, q) = &gen_ok[m - nu];
            gen_quad(&gen[*i], q, rel_string(&gen_img[*i], &paths.out)?)
        };
        pairs.push(PairRecord {
            similarity: 1.0,
            generate_ann: quad.clone(),
            understand_ann: quad,
            kind: Some(PairKind::Aligned),
            source: source.clone(),
        });
    }
    spin.finish_and_clear();
    seconds.insert("kmeans".into(), t0.elapsed().as_secs_f64());

    // 4. Retrieval over what remains.
    let t0 = Instant::now();
    let rest_u: Vec<usize> = (0..nu).filter(|&j| !und_taken[j]).collect();
    let rest_g: Vec<usize> = (0..gen_ok.len()).filter(|&j| !gen_taken[j]).collect();
    let db: Vec<f32> = rest_u
        .iter()
        .flat_map(|&j| union[j * dim..(j + 1) * dim].iter().copied())
        .collect();
    let qs: Vec<f32> = rest_g
        .iter()
        .flat_map(|&j| union[(nu + j) * dim..(nu + j + 1) * dim].iter().copied())
        .collect();
    let spin = spinner(
        &format!(
            "retrieval: {} queries x {} rows",
            rest_g.len(),
            rest_u.len()
        ),
        show_progress,
    );
    let params = MatchParams {
        delta: cfg.delta,
        top_n: cfg.top_n,
        seed: cfg.seed,
    };
    let cap = cfg.top_n.max(cfg.ann.candidates).max(1);
    let cands = if cfg.ann.enabled && !rest_u.is_empty() {
        let index = ApproxIndex::build(&db, dim, &ApproxParams::from_config(&cfg.ann, cfg.seed))?;
        index.candidates(&qs, cap, cfg.delta)?
    } else {
        exact_candidates(&qs, &db, dim, cap, cfg.delta)
    };
    let matches = greedy_match(&qs, &db, dim, &cands, cap, &params);
    let mut und_used = vec![false; rest_u.len()];
    let mut gen_used = vec![false; rest_g.len()];
    for m in &matches {
        und_used[m.understanding] = true;
        gen_used[m.generation] = true;
        let (gi, q) = &gen_ok[rest_g[m.generation]];
        let (ui, cap) = &und_ok[rest_u[m.understanding]];
        pairs.push(PairRecord {
            similarity: m.score as f64,
            generate_ann: gen_quad(&gen[*gi], q, rel_string(&gen_img[*gi], &paths.out)?),
            understand_ann: und_quad(&und[*ui], cap, rel_string(&und_img[*ui], &paths.out)?),
            kind: Some(PairKind::Retrieved),
            source: source.clone(),
        });
    }
    spin.finish_and_clear();
    seconds.insert("retrieval".into(), t0.elapsed().as_secs_f64());

    let count = |pool_und: usize, pool_gen: usize| {
        BTreeMap::from([
            ("understanding".to_string(), pool_und),
            ("generation".to_string(), pool_gen),
        ])
    };
    let stats = BuildStats {
        pairs: pair_stats(&pairs),
        input: count(und.len(), gen.len()),
        completed: count(nu, gen_ok.len()),
        rejections_by_reason: rejections_by_reason(&rejections),
        rejections,
        k,
        unpaired: count(
            und_used.iter().filter(|u| !**u).count(),
            gen_used.iter().filter(|u| !**u).count(),
        ),
        teacher: serde_json::json!({"describe": teacher.describe(), "counters": teacher.counters()}),
        encoder: encoder.id(),
        seconds,
    };
    Ok(BuildOutput { pairs, stats })
}

/// Runs [`build_pairs`] and writes the PairUG file, the stats JSON and the histogram PNG (each atomically).
pub fn build_and_write(
    cfg: &PairsConfig,
    teacher: &dyn Teacher,
    encoder: &dyn ImageEncoder,
    paths: &BuildPaths,
    show_progress: bool,
) -> Result<BuildOutput> {
    let out = build_pairs(cfg, teacher, encoder, paths, show_progress)?;
    pairuni_data::jsonl::write_pairs(&paths.out, &out.pairs)?;
    let json = serde_json::to_vec_pretty(&out.stats).expect("stats serialise");
    pairuni_data::atomic::write_atomic_bytes(paths.stats_path(), &json)?;
    write_histogram_png(&out.stats.pairs, &paths.histogram_path())?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relative_paths_climb_out_of_the_output_folder() {
        assert_eq!(
            relative_to(Path::new("/a/b/img/x.png"), Path::new("/a/c")).unwrap(),
            PathBuf::from("../b/img/x.png")
        );
        assert_eq!(
            relative_to(Path::new("/a/b/./x.png"), Path::new("/a/b")).unwrap(),
            PathBuf::from("x.png")
        );
    }

    #[test]
    fn stats_and_histogram_sit_beside_the_output() {
        let p = BuildPaths {
            understanding: "u".into(),
            generation: "g".into(),
            out: "/x/pairs.jsonl".into(),
        };
        assert_eq!(p.stats_path(), PathBuf::from("/x/pairs.stats.json"));
        assert_eq!(p.histogram_path(), PathBuf::from("/x/pairs.similarity.png"));
        assert_eq!(
            p.beside_out(Path::new("c.sqlite")),
            PathBuf::from("/x/c.sqlite")
        );
    }
}
