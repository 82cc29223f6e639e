//! The training text for the byte-level BPE vocabulary that `init_model_dir` writes.
//!
//! Owns a small hand-written corpus (prose about the gateway and everyday topics, some code,
//! numbers, other scripts and emoji) and a seeded generator of sentences over common English
//! words with suffixes and numbers (word frequencies follow a rough Zipf law) that widens it, so the
//! trained vocabulary merges common English words and code fragments the way a real tokenizer
//! does. It must not know the tokenizer library, models or files.

use rand_chacha::ChaCha8Rng;
use rand_chacha::rand_core::{RngCore, SeedableRng};

const PROSE: &str = "\
The gateway receives a request, checks the key of the tenant, and places the request in a fair queue. \
Each worker owns one emulated accelerator and runs the model step by step, adding new requests to the batch \
as soon as there is room. When a sequence finishes, its memory returns to the pool and the next one starts. \
Every finished request becomes one usage record with the number of prompt tokens, the number of completion \
tokens, the device time and the energy it consumed. Prices are set per million tokens, and invoices are \
written at the end of the month.\n\
Good morning! How are you today? I would like to know the weather in the city this afternoon. \
It will be sunny with a light wind from the west, and the temperature should reach twenty degrees. \
Please remind me to call my mother tomorrow evening, and add milk, bread, eggs and coffee to the shopping list. \
The meeting has been moved to Thursday at ten o'clock in the small room on the second floor.\n\
Once upon a time there was a small village near a river. The people who lived there were farmers and fishermen, \
and every year they held a festival after the harvest. Children ran between the houses, music played until \
late at night, and the old stories were told again by the fire.\n\
Question: what is the capital of France? Answer: Paris is the capital of France. \
Question: how many days are there in a week? Answer: there are seven days in a week. \
Summarize the following text in one sentence. Translate the sentence into German. Write a short poem about the sea.\n\
fn main() {\n    let numbers = vec![1, 2, 3, 4, 5];\n    let total: i32 = numbers.iter().sum();\n    println!(\"total = {}\", total);\n}\n\
def add(a, b):\n    return a + b\n\nfor i in range(10):\n    print(i, add(i, i))\n\
{\"model\": \"deepseek-v4\", \"max_tokens\": 128, \"temperature\": 0.7, \"stream\": true}\n\
SELECT tenant_id, SUM(tokens) FROM usage WHERE day >= '2026-01-01' GROUP BY tenant_id ORDER BY 2 DESC;\n\
The numbers 0 1 2 3 4 5 6 7 8 9 10 42 100 256 1024 2048 4096 3.14 2.718 1,000,000 and 99.9% appear often.\n\
Über den Wolken ist die Freiheit grenzenlos. Où est la gare, s'il vous plaît? ¿Dónde está la biblioteca?\n\
你好，世界！今天天气很好。我们一起去公园散步吧。人工智能正在改变世界。\n\
こんにちは、元気ですか？ 안녕하세요, 만나서 반갑습니다. Привет, как дела? مرحبا بالعالم\n\
Emoji are common in chat: 😀 😂 👍 🎉 🚀 ❤️ 🔥 ✅ 🤖 🌍 and flags like 🇫🇷 🇯🇵.\n";

const NOUNS: &str = "\
time year people way day man thing woman life child world school state family student \
group country problem hand part place case week company system program question work \
government number night point home water room mother area money story fact month lot right \
study book eye job word business issue side kind head house service friend father power \
hour game line end member law car city community name president team minute idea kid body \
information back parent face others level office door health person art war history party \
result change morning reason research girl guy moment air teacher force education foot boy \
age policy process music market sense nation plan college interest death experience effect \
use class control care field development role effort rate heart drug show leader light \
voice wife police mind price report decision son view relationship town road arm \
difference value building action model season society tax director position player record \
paper space ground form event official matter center couple site project activity star \
table need court oil situation cost industry figure street image phone data picture \
practice piece land product doctor wall patient worker news test movie north love support \
technology step baby computer type attention film tree source organization hair window \
evidence population truth song energy network memory request token device kernel server \
client tenant queue batch stream invoice layer expert vector matrix cache block thread \
error message answer garden river mountain village kitchen dinner coffee weather summer \
winter spring autumn train station ticket travel hotel beach ocean island forest animal \
flower bread cheese apple orange sugar salt letter pencil chair bottle glass camera screen \
keyboard mouse language science poetry painting theater festival holiday birthday wedding";
const VERBS: &str = "\
be have do say go get make know think take see come want look use find give tell work call \
try ask need feel become leave put mean keep let begin seem help talk turn start show hear \
play run move like live believe hold bring happen write provide sit stand lose pay meet \
include continue set learn change lead understand watch follow stop create speak read \
allow add spend grow open walk win offer remember love consider appear buy wait serve die \
send expect build stay fall cut reach kill remain suggest raise pass sell require report \
decide pull return explain hope develop carry break receive agree support hit produce eat \
cover catch draw choose compute measure schedule stream deploy train count store load \
check print answer update delete improve generate handle route";
const ADJECTIVES: &str = "\
good new first last long great little own other old right big high different small large \
next early young important few public bad same able free sure clear full special easy \
strong certain hard real best whole simple quick fast slow happy short local late true \
ready open better main common final warm cold dark bright quiet busy empty heavy light \
modern ancient careful";
const FUNCTION_WORDS: &str = "\
the of and to a in that it is was for on are with as his they at be this from have or by \
one had not but what all were when we there can an your which their said if do will each \
about how up out them then she many some so these would other into has more her two like \
him see time could no make than been who its now people my made over did down only way \
find use may water long little very after words called just where most know get through \
back much before go good new write our used me man too any day same right look think also \
around another came come work three word must because does part even place well such here \
take why things help put years different away again off went old number great tell men say \
small every found still between name should home big give air line set own under read last \
never us left end along while might next sound below saw something thought both few those \
always looked show large often together asked house world going want school important \
until form food keep children feet land side without boy once animals life enough took \
sometimes four head above kind began almost live page got earth need far hand high year \
mother light parts country father let night following picture being study second eyes soon \
times story boys since white days ever paper hard near sentence better best across during \
today others however sure means knew try told young miles sun ways thing whole hear \
example heard several change answer room sea against top turned learn point city play \
toward five using himself usually";
const SUFFIXES: &[&str] = &[
    "", "", "", "", "s", "s", "ed", "ing", "er", "ly", "ment", "ness", "tion", "able",
];
const PUNCT: &[&str] = &[".", ".", ".", ",", "?", "!", ";", ":"];

/// A word from `list`, favouring its first entries (a rough Zipf law, so frequent words merge
/// first as in natural text).
fn zipf<'a>(rng: &mut ChaCha8Rng, list: &[&'a str]) -> &'a str {
    let u = (rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64;
    list[((u * u * u) * list.len() as f64) as usize % list.len()]
}

fn sentence(rng: &mut ChaCha8Rng, lists: &[Vec<&str>; 4], out: &mut String) {
    let n = 6 + (rng.next_u64() % 14) as usize;
    for i in 0..n {
        let r = rng.next_u64();
        let w = match r % 10 {
            0..=3 => zipf(rng, &lists[3]),
            4..=6 => zipf(rng, &lists[0]),
            7 | 8 => zipf(rng, &lists[1]),
            _ => zipf(rng, &lists[2]),
        };
        if i > 0 {
            out.push(' ');
        }
        if i == 0 {
            let mut cs = w.chars();
            if let Some(f) = cs.next() {
                out.extend(f.to_uppercase());
                out.push_str(cs.as_str());
            }
        } else {
            out.push_str(w);
        }
        let sfx = r >> 8;
        out.push_str(SUFFIXES[(sfx % SUFFIXES.len() as u64) as usize]);
        match (r >> 16) % 40 {
            0 => out.push_str(&format!(" {}", (r >> 24) % 1000)),
            1 => out.push_str(&format!(" {}.{}", (r >> 24) % 100, (r >> 40) % 100)),
            2 => out.push_str(&format!("_{}", zipf(rng, &lists[0]))),
            3 => out.push(','),
            _ => {}
        }
    }
    out.push_str(PUNCT[(rng.next_u64() % PUNCT.len() as u64) as usize]);
}

/// The corpus: the hand-written text plus `sentences` generated ones (seeded), in lines.
pub fn training_corpus(seed: u64, sentences: usize) -> Vec<String> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let lists = [
        NOUNS.split_whitespace().collect::<Vec<_>>(),
        VERBS.split_whitespace().collect(),
        ADJECTIVES.split_whitespace().collect(),
        FUNCTION_WORDS.split_whitespace().collect(),
    ];
    let mut out: Vec<String> = PROSE.lines().map(str::to_string).collect();
    // Repeat the prose so its fragments (code, other scripts, emoji) pass min_frequency.
    out.extend(PROSE.lines().map(str::to_string));
    let mut line = String::new();
    for i in 0..sentences {
        sentence(&mut rng, &lists, &mut line);
        if i % 4 == 3 {
            out.push(std::mem::take(&mut line));
        } else {
            line.push(' ');
        }
    }
    if !line.is_empty() {
        out.push(line);
    }
    out
}
