//! Our few-query attention kernel (`model::few_queries`) against libtorch's CPU kernel,
//! in turns in one process, for three head shapes (SmolLM2-135M's 9 / 3 heads of 64, the
//! launch-bound proxy's 4 / 2 of 16, the demo's 8 / 4 of 32), 1 to 128 query rows over 0,
//! 100 and 500 cached positions (causal prefill when none, else an additive mask); mean
//! microseconds a call, two turns each.
//! `cargo run --release -p mtp-core --example attention_kernels [ROWS,..] [CACHED,..]`
use mtp_core::model::attention::attend;
use tch::{Kind, Tensor};

fn main() {
    let _g = tch::no_grad_guard();
    let o = (Kind::Float, tch::Device::Cpu);
    for (h, kv, hd) in [(9i64, 3i64, 64i64), (4, 2, 16), (8, 4, 32)] {
        for t in std::env::args()
            .nth(1)
            .map_or(vec![1i64, 9, 25, 64, 128], |a| a.split(',').filter_map(|x| x.parse().ok()).collect())
        {
            // Second argument: the cached positions, comma-separated (default 0,100,500).
            let pasts: Vec<i64> = std::env::args()
                .nth(2)
                .map_or(vec![0, 100, 500], |a| a.split(',').filter_map(|x| x.parse().ok()).collect());
            for past in pasts {
                if past == 0 && t == 1 {
                    continue;
                }
                let s = past + t;
                let q = Tensor::randn([1, h, t, hd], o);
                let k = Tensor::randn([1, kv, s, hd], o);
                let v = Tensor::randn([1, kv, s, hd], o);
                let causal = past == 0;
                let mask = (!causal && t > 1).then(|| Tensor::zeros([t, s], o));
                let mut times = vec![];
                for ours in [true, false, true, false] {
                    mtp_core::model::few_queries::set_enabled(ours);
                    let n = 200;
                    let start = std::time::Instant::now();
                    for _ in 0..n {
                        let _ = attend(&q, &k, &v, mask.as_ref(), causal, 0.1);
                    }
                    times.push(start.elapsed().as_secs_f64() * 1e6 / n as f64);
                }
                println!(
                    "heads {h}/{kv} of {hd}, {t} rows over {past} cached: ours {:.1} {:.1}, libtorch {:.1} {:.1}",
                    times[0], times[2], times[1], times[3]
                );
            }
        }
    }
    mtp_core::model::few_queries::set_enabled(true);
}
