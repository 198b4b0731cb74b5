//! The built-in synthetic datasets, generated from a seed (no download): arithmetic word
//! problems with worked solutions, and small Python functions.

use rand::seq::IndexedRandom;
use rand::{Rng, SeedableRng, rngs::StdRng};

use super::data::{BuiltinSet, Example};

const NAMES: [&str; 16] = [
    "Maya", "Leo", "Ava", "Noah", "Iris", "Omar", "Lena", "Sam", "Zoe", "Ravi", "Nina", "Tom", "Ada", "Ben", "Kai",
    "Mia",
];
const ITEMS: [&str; 12] = [
    "apples", "marbles", "stickers", "books", "coins", "pencils", "cards", "shells", "stamps", "cookies", "beads",
    "tickets",
];

/// `count` examples of `set`, the same for the same seed.
pub fn generate(set: BuiltinSet, count: usize, seed: u64) -> Vec<Example> {
    let mut rng = StdRng::seed_from_u64(seed ^ ((set as u64 + 1) * 0x1000_0001));
    (0..count)
        .map(|_| match set {
            BuiltinSet::Arith => arith(&mut rng),
            BuiltinSet::Code => Example::Text { text: code(&mut rng) },
        })
        .collect()
}

fn pick<'a>(rng: &mut StdRng, from: &[&'a str]) -> &'a str {
    from.choose(rng).copied().unwrap_or_default()
}

/// One word problem; the completion walks through the computation step by step.
fn arith(rng: &mut StdRng) -> Example {
    let (who, other, item) = (pick(rng, &NAMES), pick(rng, &NAMES), pick(rng, &ITEMS));
    let a: i64 = rng.random_range(2..60);
    let b: i64 = rng.random_range(1..a.max(2));
    let c: i64 = rng.random_range(2..12);
    let (prompt, completion) = match rng.random_range(0..5) {
        0 => (
            format!("{who} has {a} {item} and gets {b} more from {other}. How many {item} does {who} have now?"),
            format!(
                "{who} starts with {a} {item}. Getting {b} more gives {a} + {b} = {}. The answer is {}.",
                a + b,
                a + b
            ),
        ),
        1 => (
            format!("{who} has {a} {item} and gives {b} to {other}. How many {item} does {who} have left?"),
            format!(
                "{who} starts with {a} {item}. Giving away {b} leaves {a} - {b} = {}. The answer is {}.",
                a - b,
                a - b
            ),
        ),
        2 => (
            format!("{who} buys {c} bags with {a} {item} in each bag. How many {item} does {who} buy?"),
            format!(
                "Each bag holds {a} {item}, and there are {c} bags. So {c} * {a} = {}. The answer is {}.",
                a * c,
                a * c
            ),
        ),
        3 => {
            let total = a * c;
            (
                format!("{who} shares {total} {item} equally among {c} friends. How many {item} does each friend get?"),
                format!("{total} {item} shared among {c} friends gives {total} / {c} = {a}. The answer is {a}."),
            )
        }
        _ => {
            let after = a - b + c;
            (
                format!(
                    "{who} has {a} {item}, gives {b} to {other}, then finds {c} more. How many {item} does {who} have now?"
                ),
                format!(
                    "{who} starts with {a} {item}. After giving {b} away: {a} - {b} = {}. After finding {c} more: {} + {c} = {after}. The answer is {after}.",
                    a - b,
                    a - b
                ),
            )
        }
    };
    Example::PromptCompletion { prompt: format!("Question: {prompt}\nAnswer:"), completion: format!(" {completion}\n") }
}

const VERBS: [&str; 10] = ["count", "sum", "scale", "filter", "merge", "clip", "join", "split", "find", "pair"];
const NOUNS: [&str; 10] = ["items", "values", "scores", "words", "prices", "points", "names", "lines", "rows", "keys"];
const VARS: [&str; 8] = ["x", "y", "n", "value", "item", "total", "result", "acc"];

/// One small Python function in a handful of common shapes.
fn code(rng: &mut StdRng) -> String {
    let name = format!("{}_{}", pick(rng, &VERBS), pick(rng, &NOUNS));
    let v = pick(rng, &VARS);
    let k: i64 = rng.random_range(1..10);
    match rng.random_range(0..6) {
        0 => format!("def {name}(a, b):\n    return a + b * {k}\n"),
        1 => format!("def {name}(xs):\n    total = 0\n    for {v} in xs:\n        total += {v}\n    return total\n"),
        2 => format!("def {name}(xs):\n    return [{v} * {k} for {v} in xs if {v} > {k}]\n"),
        3 => format!(
            "def {name}(text):\n    words = text.split()\n    return [w.lower() for w in words if len(w) > {k}]\n"
        ),
        4 => format!(
            "def {name}(xs, limit={k}):\n    result = []\n    for {v} in xs:\n        if {v} < limit:\n            result.append({v})\n    return result\n"
        ),
        _ => format!(
            "class {}:\n    def __init__(self, {v}):\n        self.{v} = {v}\n\n    def {name}(self):\n        return self.{v} * {k}\n",
            capitalize(pick(rng, &NOUNS))
        ),
    }
}

fn capitalize(s: &str) -> String {
    let mut c = s.chars();
    c.next().map(|f| f.to_uppercase().chain(c).collect()).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seeded_and_varied() {
        let a = generate(BuiltinSet::Arith, 50, 1);
        assert_eq!(a, generate(BuiltinSet::Arith, 50, 1));
        assert_ne!(a, generate(BuiltinSet::Arith, 50, 2));
        let distinct: std::collections::BTreeSet<String> = a.iter().map(|e| format!("{e:?}")).collect();
        assert!(distinct.len() > 45);
        let Example::PromptCompletion { completion, .. } = &a[0] else { panic!("arith is prompt + completion") };
        assert!(completion.contains("The answer is"));
        let c = generate(BuiltinSet::Code, 20, 0);
        assert!(
            c.iter().all(|e| matches!(e, Example::Text { text } if text.contains("def ") || text.contains("class ")))
        );
    }
}
