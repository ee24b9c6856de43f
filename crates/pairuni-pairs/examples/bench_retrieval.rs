//! The same measurement as `pairuni bench retrieval`, without building the whole CLI:
//! `cargo run --release -p pairuni-pairs --example bench_retrieval -- N QUERIES DIM [M EF_C EF_S | noann]`.

use pairuni_pairs::ann::AnnParams;
use pairuni_pairs::bench::{run_retrieval_bench, RetrievalBenchParams};

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let num = |i: usize, d: usize| args.get(i).and_then(|s| s.parse().ok()).unwrap_or(d);
    let ann = if args.get(3).map(String::as_str) == Some("noann") {
        None
    } else {
        Some(AnnParams {
            max_connections: num(3, 16),
            ef_construction: num(4, 64),
            ef_search: num(5, 64),
        })
    };
    let p = RetrievalBenchParams {
        n: num(0, 50_000),
        queries: num(1, 50_000),
        dim: num(2, 2048),
        cluster_size: 50,
        seed: 0,
        ann,
        delta: 0.6,
    };
    let r = run_retrieval_bench(&p, &|s| eprintln!("{s}")).expect("bench");
    println!("{}", serde_json::to_string_pretty(&r).expect("json"));
}
