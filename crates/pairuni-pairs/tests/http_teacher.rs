//! The OpenAI-compatible teacher against a real chat-completions server on 127.0.0.1, scripted per sample to
//! answer well, answer garbage, fail with 500/429, or hang past the timeout; plus a kill -9 of a build in a
//! child process and a resume that must not pay for any answered request twice.

use pairuni_data::{GenerationSample, UnderstandingSample};
use pairuni_pairs::config::{PairsConfig, TeacherConfig, TeacherKind};
use pairuni_pairs::teacher::cache::TeacherCache;
use pairuni_pairs::teacher::http::HttpTeacher;
use pairuni_pairs::teacher::templates::Templates;
use pairuni_pairs::teacher::RejectReason;
use pairuni_pairs::{build_and_write, BuildPaths, ImageEncoder};
use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Per request body: (times received, times answered 200).
type Counts = Arc<Mutex<HashMap<String, (usize, usize)>>>;

struct Server {
    addr: String,
    counts: Counts,
    /// Answer at most this many requests with 200, hang on the rest (crash test); usize::MAX = no limit.
    answer_budget: Arc<AtomicUsize>,
    answered: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
}

impl Server {
    fn start() -> Server {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let s = Server {
            addr,
            counts: Arc::default(),
            answer_budget: Arc::new(AtomicUsize::new(usize::MAX)),
            answered: Arc::default(),
            stop: Arc::default(),
        };
        let (counts, budget, answered, stop) = (
            s.counts.clone(),
            s.answer_budget.clone(),
            s.answered.clone(),
            s.stop.clone(),
        );
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                if stop.load(Ordering::SeqCst) {
                    return;
                }
                let Ok(conn) = conn else { continue };
                let (counts, budget, answered) = (counts.clone(), budget.clone(), answered.clone());
                std::thread::spawn(move || handle(conn, &counts, &budget, &answered));
            }
        });
        s
    }

    fn base_url(&self) -> String {
        format!("http://{}/v1", self.addr)
    }

    fn received(&self, marker: &str) -> usize {
        self.counts
            .lock()
            .unwrap()
            .iter()
            .filter(|(b, _)| b.contains(marker))
            .map(|(_, c)| c.0)
            .sum()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect(&self.addr);
    }
}

fn handle(mut conn: TcpStream, counts: &Counts, budget: &AtomicUsize, answered: &AtomicUsize) {
    let mut reader = BufReader::new(conn.try_clone().unwrap());
    let mut request_line = String::new();
    if reader.read_line(&mut request_line).is_err() || request_line.is_empty() {
        return;
    }
    let mut len = 0usize;
    loop {
        let mut h = String::new();
        reader.read_line(&mut h).unwrap();
        if h == "\r\n" || h.is_empty() {
            break;
        }
        if let Some(v) = h.to_ascii_lowercase().strip_prefix("content-length:") {
            len = v.trim().parse().unwrap();
        }
    }
    let mut body = vec![0u8; len];
    reader.read_exact(&mut body).unwrap();
    let body = String::from_utf8(body).unwrap();
    assert!(
        request_line.starts_with("POST /v1/chat/completions"),
        "{request_line}"
    );
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    let text = v["messages"][0]["content"][0]["text"]
        .as_str()
        .unwrap()
        .to_string();
    let image = v["messages"][0]["content"][1]["image_url"]["url"]
        .as_str()
        .unwrap();
    assert!(
        image.starts_with("data:image/png;base64,iVBOR"),
        "image must be a PNG data URL"
    );
    let received = {
        let mut c = counts.lock().unwrap();
        let e = c.entry(body.clone()).or_default();
        e.0 += 1;
        e.0
    };
    let is_verify = text.contains("You are checking");
    let is_question = text.contains("text-to-image sample");
    let reply = |status: u16, content: Option<&str>, raw: Option<&str>| {
        let payload = match (content, raw) {
            (Some(c), _) => {
                serde_json::json!({"choices": [{"message": {"role": "assistant", "content": c}}]})
                    .to_string()
            }
            (None, Some(r)) => r.to_string(),
            _ => "{}".to_string(),
        };
        format!("HTTP/1.1 {status} X\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{payload}", payload.len())
    };
    let hang = || std::thread::sleep(Duration::from_secs(3));
    let good = if is_verify {
        r#"{"verdict": "accept", "reason": "fine"}"#
    } else if is_question {
        r#"{"question": "Which shape?", "options": ["circle", "square", "triangle", "star"], "answer": "A"}"#
    } else {
        r#"{"caption": "a red circle in the top-left cell"}"#
    };
    let ok = |counts: &Counts| counts.lock().unwrap().get_mut(&body).unwrap().1 += 1;
    let response = if text.contains("MARK-garbage") && !is_verify {
        ok(counts);
        reply(200, Some("Sure! The image shows a red circle."), None)
    } else if text.contains("MARK-notjson") && !is_verify {
        ok(counts);
        reply(200, None, Some("<html>gateway</html>"))
    } else if text.contains("MARK-500") {
        reply(500, None, Some("{\"error\": \"boom\"}"))
    } else if text.contains("MARK-429") && received <= 2 {
        reply(429, None, Some("{\"error\": \"slow down\"}"))
    } else if text.contains("MARK-hang") {
        hang();
        return;
    } else if text.contains("MARK-reject") && is_verify {
        ok(counts);
        reply(
            200,
            Some(r#"{"verdict": "reject", "reason": "caption names a missing object"}"#),
            None,
        )
    } else {
        // Crash test: past the budget, hold the connection without answering.
        if answered.load(Ordering::SeqCst) >= budget.load(Ordering::SeqCst) {
            hang();
            return;
        }
        answered.fetch_add(1, Ordering::SeqCst);
        ok(counts);
        reply(200, Some(good), None)
    };
    let _ = conn.write_all(response.as_bytes());
}

/// Mean colour: enough to give features to the test pools.
struct MeanColour;

impl ImageEncoder for MeanColour {
    fn id(&self) -> String {
        "mean-colour".into()
    }
    fn dim(&self) -> usize {
        3
    }
    fn encode_batch(&self, images: &[image::RgbImage]) -> pairuni_pairs::Result<Vec<f32>> {
        Ok(images
            .iter()
            .flat_map(|im| {
                let p = im.get_pixel(0, 0);
                [p[0] as f32 + 1.0, p[1] as f32 + 1.0, p[2] as f32 + 1.0]
            })
            .collect())
    }
}

/// Writes pools whose questions/prompts carry the given markers; returns (understanding, generation) paths.
fn write_pools(dir: &Path, und_marks: &[&str], gen_marks: &[&str]) -> (PathBuf, PathBuf) {
    std::fs::create_dir_all(dir.join("images")).unwrap();
    let img = |name: &str, k: usize| {
        let c = [(k * 40 % 256) as u8, (k * 90 % 256) as u8, 200];
        image::RgbImage::from_pixel(8, 8, image::Rgb(c))
            .save(dir.join("images").join(name))
            .unwrap();
        format!("images/{name}")
    };
    let und: Vec<UnderstandingSample> = und_marks
        .iter()
        .enumerate()
        .map(|(i, m)| UnderstandingSample {
            id: format!("u{i}"),
            image_path: img(&format!("u{i}.png"), i),
            question: format!(
                "What shape is red? MARK-{m} A. circle B. square C. triangle D. star"
            ),
            answer: "A".into(),
            options: None,
            tag: "colour".into(),
        })
        .collect();
    let gen: Vec<GenerationSample> = gen_marks
        .iter()
        .enumerate()
        .map(|(i, m)| GenerationSample {
            id: format!("g{i}"),
            prompt: format!("a red circle MARK-{m}"),
            image_path: img(&format!("g{i}.png"), i + 3),
            tag: "single_object".into(),
        })
        .collect();
    let (u, g) = (
        dir.join("understanding.jsonl"),
        dir.join("generation.jsonl"),
    );
    pairuni_data::jsonl::write_understanding_pool(&u, &und).unwrap();
    pairuni_data::jsonl::write_generation_pool(&g, &gen).unwrap();
    (u, g)
}

fn config(server: &Server, cache: &Path) -> PairsConfig {
    let mut cfg = PairsConfig {
        teacher: TeacherConfig {
            kind: TeacherKind::Openai,
            base_url: server.base_url(),
            model: "test-model".into(),
            api_key_env: "PAIRUNI_TEST_KEY_THAT_IS_NOT_SET".into(),
            concurrency: 4,
            timeout_s: 0.5,
            max_retries: 2,
            backoff_s: 0.01,
            verify_retries: 1,
            cache: cache.to_path_buf(),
            ..TeacherConfig::default()
        },
        delta: 0.0,
        ..PairsConfig::default()
    };
    cfg.kmeans.k = Some(1);
    cfg
}

fn teacher(cfg: &PairsConfig) -> HttpTeacher {
    let cache = TeacherCache::open(&cfg.teacher.cache).unwrap();
    HttpTeacher::new(&cfg.teacher, Templates::builtin(), cache).unwrap()
}

#[test]
fn scripted_server_gives_the_right_rejections() {
    let server = Server::start();
    let dir = tempfile::tempdir().unwrap();
    let (u, g) = write_pools(
        dir.path(),
        &[
            "good-u0",
            "garbage-u1",
            "500-u2",
            "429-u3",
            "hang-u4",
            "reject-u5",
            "notjson-u6",
            "good-u7",
        ],
        &["good-g0", "garbage-g1", "reject-g2", "good-g3"],
    );
    let cfg = config(&server, &dir.path().join("cache.sqlite"));
    let t = teacher(&cfg);
    let paths = BuildPaths {
        understanding: u,
        generation: g,
        out: dir.path().join("out/pairs.jsonl"),
    };
    let out = build_and_write(&cfg, &t, &MeanColour, &paths, false).unwrap();

    let mut why: Vec<(String, RejectReason)> = out
        .stats
        .rejections
        .iter()
        .map(|r| (r.id.clone(), r.reason))
        .collect();
    why.sort();
    assert_eq!(
        why,
        vec![
            ("g1".into(), RejectReason::Unparseable),
            ("g2".into(), RejectReason::FailedVerification),
            ("u1".into(), RejectReason::Unparseable),
            ("u2".into(), RejectReason::Unavailable),
            ("u4".into(), RejectReason::Unavailable),
            ("u5".into(), RejectReason::FailedVerification),
            ("u6".into(), RejectReason::Unparseable),
        ]
    );
    let garbage = out.stats.rejections.iter().find(|r| r.id == "u1").unwrap();
    assert_eq!(
        garbage.raw.as_deref(),
        Some("Sure! The image shows a red circle."),
        "raw reply kept"
    );
    assert_eq!(
        garbage.attempts, 2,
        "unparseable replies are retried up to verify_retries"
    );
    // 500: one try plus max_retries retries, then given up (not retried across attempts).
    assert_eq!(server.received("MARK-500"), 3);
    // 429 twice then fine: the sample survives.
    assert_eq!(
        out.stats.completed["understanding"], 3,
        "u0, u3 and u7 survive"
    );
    assert_eq!(out.stats.completed["generation"], 2);
    assert!(
        server.received("MARK-hang") >= 3,
        "a hang is retried after each timeout"
    );
    // Everything that survived is paired: 1 aligned, and retrieval at δ = 0 pairs the rest one-to-one.
    // 3 understanding + 2 generation survivors, K = 1: an understanding medoid leaves 2 + 2 (2 retrieved), a
    // generation medoid leaves 3 + 1 (1 retrieved).
    let medoid_is_und = out.pairs[0]
        .understand_ann
        .id
        .as_deref()
        .unwrap()
        .starts_with('u');
    assert_eq!(out.stats.pairs.pairs, if medoid_is_und { 3 } else { 2 });
    // The files exist and the stats file lists the rejections.
    let stats: serde_json::Value =
        serde_json::from_slice(&std::fs::read(paths.stats_path()).unwrap()).unwrap();
    assert_eq!(stats["rejections"].as_array().unwrap().len(), 7);
    assert!(paths.histogram_path().exists());
    let written = pairuni_data::jsonl::read_pairs(&paths.out).unwrap();
    assert_eq!(written, out.pairs);
    assert!(written.iter().all(|p| dir
        .path()
        .join("out")
        .join(&p.generate_ann.image_path)
        .exists()));

    // A rerun is served from the cache: no request that was answered is sent again.
    let before: HashMap<String, (usize, usize)> = server.counts.lock().unwrap().clone();
    let t2 = teacher(&cfg);
    let out2 = build_and_write(&cfg, &t2, &MeanColour, &paths, false).unwrap();
    assert_eq!(out2.pairs, out.pairs);
    let after = server.counts.lock().unwrap().clone();
    for (body, (_, ok)) in &after {
        assert!(*ok <= 1, "answered twice: {}", &body[..body.len().min(200)]);
        if before.get(body).is_some_and(|b| b.1 >= 1) {
            assert_eq!(
                after[body].0, before[body].0,
                "a cached request was sent again"
            );
        }
    }
    assert!(t2.http_counters().cache_hits > 0);
}

const CHILD_ENV: &str = "PAIRUNI_PAIRS_CRASH_CHILD";

/// Helper run in a child process by `resume_after_kill_never_pays_twice` (ignored when run on its own).
#[test]
#[ignore = "helper: runs only as the child process of resume_after_kill_never_pays_twice"]
fn crash_child() {
    let Ok(spec) = std::env::var(CHILD_ENV) else {
        eprintln!("crash_child only runs under resume_after_kill_never_pays_twice");
        return;
    };
    let (base_url, dir) = spec.split_once('|').unwrap();
    let dir = PathBuf::from(dir);
    let mut cfg: PairsConfig =
        serde_json::from_str(&std::fs::read_to_string(dir.join("cfg.json")).unwrap()).unwrap();
    cfg.teacher.base_url = base_url.to_string();
    cfg.teacher.timeout_s = 60.0;
    let t = teacher(&cfg);
    let paths = BuildPaths {
        understanding: dir.join("understanding.jsonl"),
        generation: dir.join("generation.jsonl"),
        out: dir.join("pairs.jsonl"),
    };
    let _ = build_and_write(&cfg, &t, &MeanColour, &paths, false);
    panic!("the parent kills this process before the build ends");
}

#[test]
fn resume_after_kill_never_pays_twice() {
    let server = Server::start();
    let dir = tempfile::tempdir().unwrap();
    let marks: Vec<String> = (0..10).map(|i| format!("good-{i}")).collect();
    let marks: Vec<&str> = marks.iter().map(String::as_str).collect();
    let (u, g) = write_pools(dir.path(), &marks, &marks);
    let cache = dir.path().join("cache.sqlite");
    let cfg = config(&server, &cache);
    std::fs::write(
        dir.path().join("cfg.json"),
        serde_json::to_string(&cfg).unwrap(),
    )
    .unwrap();
    // 40 exchanges in all (20 samples × complete + verify); answer 15, then hang, then kill -9.
    server.answer_budget.store(15, Ordering::SeqCst);
    let mut child = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "crash_child",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(
            CHILD_ENV,
            format!("{}|{}", server.base_url(), dir.path().display()),
        )
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let t0 = std::time::Instant::now();
    loop {
        let rows = TeacherCache::open(&cache)
            .ok()
            .and_then(|c| c.len().ok())
            .unwrap_or(0);
        if rows >= 15 {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "child never cached 15 replies ({rows})"
        );
        assert!(child.try_wait().unwrap().is_none(), "child exited early");
        std::thread::sleep(Duration::from_millis(20));
    }
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    assert_eq!(server.answered.load(Ordering::SeqCst), 15);

    server.answer_budget.store(usize::MAX, Ordering::SeqCst);
    let t = teacher(&cfg);
    let paths = BuildPaths {
        understanding: u,
        generation: g,
        out: dir.path().join("pairs.jsonl"),
    };
    let out = build_and_write(&cfg, &t, &MeanColour, &paths, false).unwrap();
    assert!(out.stats.rejections.is_empty());
    assert_eq!(
        out.stats.completed["understanding"] + out.stats.completed["generation"],
        20
    );
    let counts = server.counts.lock().unwrap().clone();
    assert_eq!(counts.len(), 40, "40 distinct exchanges");
    for (body, (_, ok)) in &counts {
        assert_eq!(
            *ok,
            1,
            "each exchange answered exactly once: {}",
            &body[..body.len().min(200)]
        );
    }
    assert_eq!(server.answered.load(Ordering::SeqCst), 40);
    assert_eq!(
        t.http_counters().cache_hits,
        15,
        "the 15 exchanges answered before the kill come from the cache"
    );
}
