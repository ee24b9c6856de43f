//! The same measurement as `pairuni bench retrieval`, without building the whole CLI:
//! `cargo run --release -p pairuni-pairs --example bench_retrieval -- N QUERIES DIM [KEY=VALUE…]` with keys
//! `index` (ivf|hnsw), `reduce_dim`, `rerank`, `lists`, `probes`, `pca_sample`, `m`, `ef_c`, `ef_s`,
//! `cluster_size`, or the single word `noann`. Unset keys take the `[pairs.ann]` defaults.

use pairuni_pairs::ann::ApproxParams;
use pairuni_pairs::bench::{run_retrieval_bench, RetrievalBenchParams};
use pairuni_pairs::config::{AnnConfig, AnnIndexKind};

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let num = |i: usize, d: usize| args.get(i).and_then(|s| s.parse().ok()).unwrap_or(d);
    let mut cfg = AnnConfig::default();
    let mut cluster_size = 50;
    let mut ann = true;
    for a in args.iter().skip(3) {
        if a == "noann" {
            ann = false;
            continue;
        }
        let (k, v) = a.split_once('=').expect("KEY=VALUE");
        let n = || v.parse::<usize>().expect("a number");
        match k {
            "index" => {
                cfg.index = match v {
                    "ivf" => AnnIndexKind::Ivf,
                    "hnsw" => AnnIndexKind::Hnsw,
                    _ => panic!("index is ivf or hnsw"),
                }
            }
            "reduce_dim" => cfg.reduce_dim = n(),
            "rerank" => cfg.rerank = n(),
            "lists" => cfg.lists = Some(n()),
            "probes" => cfg.probes = n(),
            "pca_sample" => cfg.pca_sample = n(),
            "m" => cfg.max_connections = n(),
            "ef_c" => cfg.ef_construction = n(),
            "ef_s" => cfg.ef_search = n(),
            "cluster_size" => cluster_size = n(),
            _ => panic!("unknown key {k}"),
        }
    }
    let p = RetrievalBenchParams {
        n: num(0, 50_000),
        queries: num(1, 50_000),
        dim: num(2, 2048),
        cluster_size,
        seed: 0,
        ann: ann.then(|| ApproxParams::from_config(&cfg, 0)),
        delta: 0.6,
    };
    let r = run_retrieval_bench(&p, &|s| eprintln!("{s}")).expect("bench");
    println!("{}", serde_json::to_string_pretty(&r).expect("json"));
}
